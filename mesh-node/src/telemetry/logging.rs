//! Structured logs through `tracing`: text for people, JSON for machines. The filter comes
//! from `RUST_LOG` (default `info`) and can be replaced while the process runs
//! ([`set_filter`], [`set_level`]; the proxy's admin API `POST /logging`).
//!
//! The filter is an [`EnvFilter`] behind a [`reload`] layer: a new one is checked directive
//! by directive first, so a bad one is refused (naming the directive) and the old one stays.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, filter::Directive, reload};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info";

/// The levels [`set_level`] takes.
pub const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("empty filter: give directives such as `info,access=off,mesh_node::proxy=debug`")]
    Empty,
    #[error("bad directive `{directive}`: {reason}")]
    Directive { directive: String, reason: String },
    #[error("bad level `{0}`: expected one of trace, debug, info, warn, error, off")]
    Level(String),
    #[error("logging was not set up with a reloadable filter in this process")]
    NotInitialized,
    #[error("the log filter could not be replaced: {0}")]
    Reload(String),
}

/// Parses `filter` as `RUST_LOG` directives (comma-separated `target[span{field}]=level` or a
/// bare level), refusing the whole string if any directive is bad. Stricter than `RUST_LOG`
/// in one way: a bare word must be a level. (`RUST_LOG` reads `debgu` as "target `debgu` at
/// every level" and everything else off; at run time that typo would silence the proxy.)
pub fn parse_filter(filter: &str) -> Result<EnvFilter, FilterError> {
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(FilterError::Empty);
    }
    let mut parsed: Vec<Directive> = Vec::with_capacity(directives.len());
    for d in directives {
        if !d.contains(['=', '[']) && !is_level(d) {
            return Err(FilterError::Directive {
                directive: d.to_string(),
                reason: format!(
                    "not a level ({}); for a target write `{d}=LEVEL`",
                    LEVELS.join(", ")
                ),
            });
        }
        parsed.push(
            d.parse()
                .map_err(
                    |e: tracing_subscriber::filter::ParseError| FilterError::Directive {
                        directive: d.to_string(),
                        reason: e.to_string(),
                    },
                )?,
        );
    }
    Ok(parsed
        .into_iter()
        .fold(EnvFilter::default(), EnvFilter::add_directive))
}

/// The directives in `filter`, normalised (trimmed, empty ones dropped).
fn normalise(filter: &str) -> String {
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

fn is_level(s: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s)) || s.parse::<u8>().is_ok_and(|n| n <= 5)
}

/// A filter that can be replaced at run time: the reload handle and the text in force.
pub struct Reloadable {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl Reloadable {
    /// The reload layer to put first on a [`Registry`], and its controller.
    pub fn new(initial: &str) -> (reload::Layer<EnvFilter, Registry>, Reloadable) {
        // As `RUST_LOG` always was: the whole string or, if any directive is bad, `info`.
        let (filter, text) = match EnvFilter::builder().parse(initial) {
            Ok(f) if !normalise(initial).is_empty() => (f, normalise(initial)),
            _ => (EnvFilter::new(DEFAULT_FILTER), DEFAULT_FILTER.to_string()),
        };
        let (layer, handle) = reload::Layer::new(filter);
        (
            layer,
            Reloadable {
                handle,
                current: Mutex::new(text),
            },
        )
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the filter with `filter`; returns the one it replaced. On error nothing
    /// changes.
    pub fn set(&self, filter: &str) -> Result<String, FilterError> {
        let new = parse_filter(filter)?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        self.handle
            .reload(new)
            .map_err(|e| FilterError::Reload(e.to_string()))?;
        // Records of the `log` crate (rustls) are first held to its own maximum level, which
        // was set from the filter at start.
        log::set_max_level(as_log(tracing::level_filters::LevelFilter::current()));
        Ok(std::mem::replace(&mut *current, normalise(filter)))
    }
}

fn as_log(l: tracing::level_filters::LevelFilter) -> log::LevelFilter {
    use tracing::level_filters::LevelFilter as L;
    match l {
        L::OFF => log::LevelFilter::Off,
        L::ERROR => log::LevelFilter::Error,
        L::WARN => log::LevelFilter::Warn,
        L::INFO => log::LevelFilter::Info,
        L::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

static FILTER: OnceLock<Reloadable> = OnceLock::new();

/// Sets up the process's logging on stderr: the filter from `RUST_LOG` (when it is unset or
/// does not parse, `info`), replaceable later through [`set_filter`].
pub fn init(format: LogFormat) {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| DEFAULT_FILTER.to_string());
    let (filter, control) = Reloadable::new(&initial);
    let registry = tracing_subscriber::registry().with(filter);
    let done = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if done.is_ok() {
        let _ = FILTER.set(control);
    }
}

/// The filter in force, as it was given (`RUST_LOG`, or the last [`set_filter`]); `None`
/// when [`init`] has not run in this process.
pub fn current_filter() -> Option<String> {
    FILTER.get().map(Reloadable::current)
}

/// Replaces the process's log filter (directives as in `RUST_LOG`); returns the previous one.
/// A bad directive changes nothing.
pub fn set_filter(filter: &str) -> Result<String, FilterError> {
    match FILTER.get() {
        Some(f) => f.set(filter),
        None => {
            parse_filter(filter)?;
            Err(FilterError::NotInitialized)
        }
    }
}

/// One level for every target (replacing per-target directives); returns the previous filter.
pub fn set_level(level: &str) -> Result<String, FilterError> {
    let level = level.trim();
    if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
        return Err(FilterError::Level(level.to_string()));
    }
    set_filter(&level.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn good_filters_parse() {
        for f in [
            "info",
            "DEBUG",
            "info,access=off",
            "info,access=off,mesh_node::proxy=debug",
            " warn , mesh_node=trace ",
            "mesh_node[http]=debug",
            "off",
            "3",
            "mesh_node=info",
        ] {
            assert!(parse_filter(f).is_ok(), "{f}: {:?}", parse_filter(f).err());
        }
    }

    #[test]
    fn bad_filters_name_the_directive() {
        assert_eq!(parse_filter("").err(), Some(FilterError::Empty));
        assert_eq!(parse_filter(" , ,").err(), Some(FilterError::Empty));
        match parse_filter("info,access=loud") {
            Err(FilterError::Directive { directive, .. }) => assert_eq!(directive, "access=loud"),
            other => panic!("access=loud: {other:?}"),
        }
        match parse_filter("info,verbose") {
            Err(FilterError::Directive { directive, reason }) => {
                assert_eq!(directive, "verbose");
                assert!(reason.contains("not a level"), "{reason}");
            }
            other => panic!("verbose: {other:?}"),
        }
        let e = parse_filter("mesh_node[=debug").err();
        assert!(
            matches!(&e, Some(FilterError::Directive { directive, .. }) if directive == "mesh_node[=debug"),
            "{e:?}"
        );
        assert!(matches!(
            parse_filter("mesh_node"),
            Err(FilterError::Directive { .. })
        ));
        assert_eq!(
            set_level("loud").err(),
            Some(FilterError::Level("loud".into()))
        );
        assert_eq!(
            set_level("info,access=off").err(),
            Some(FilterError::Level("info,access=off".into()))
        );
    }

    /// Counts events that pass the filter.
    struct Count(Arc<AtomicUsize>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
        fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_reload_takes_effect_and_a_bad_filter_keeps_the_old_one() {
        let n = Arc::new(AtomicUsize::new(0));
        let (layer, control) = Reloadable::new("info,access=off");
        let subscriber = tracing_subscriber::registry()
            .with(layer)
            .with(Count(n.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let seen = || {
                n.store(0, Ordering::Relaxed);
                tracing::info!(target: "access", "connection complete");
                tracing::debug!(target: "mesh_node::proxy", "detail");
                tracing::info!(target: "mesh_node::proxy", "news");
                n.load(Ordering::Relaxed)
            };
            assert_eq!(control.current(), "info,access=off");
            assert_eq!(seen(), 1, "access off, debug off");
            assert_eq!(
                control.set("info,mesh_node::proxy=debug").as_deref(),
                Ok("info,access=off")
            );
            assert_eq!(seen(), 3, "access on, debug on");
            assert!(control.set("info,access=nope").is_err());
            assert_eq!(control.current(), "info,mesh_node::proxy=debug");
            assert_eq!(seen(), 3, "a bad filter changed nothing");
            assert!(control.set("off").is_ok());
            assert_eq!(seen(), 0);
        });
    }

    #[test]
    fn an_unparsable_rust_log_falls_back_to_info() {
        let (_layer, control) = Reloadable::new("info,access=nope");
        assert_eq!(control.current(), DEFAULT_FILTER);
        let (_layer, control) = Reloadable::new("warn,access=off");
        assert_eq!(control.current(), "warn,access=off");
    }
}
