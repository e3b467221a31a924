//! `/logging`: the log filter in force (`GET`), replaced at run time (`POST ?level=LEVEL` for
//! one level everywhere, or `POST ?filter=DIRECTIVES` in `RUST_LOG` syntax). A bad level or
//! directive gets `400` naming it, and the filter in force stays.

use http::{Method, StatusCode};
use serde_json::json;
use tracing::info;

use super::Reply;
use crate::telemetry::logging::{self, FilterError};

/// What a `POST /logging` asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Level(String),
    Filter(String),
}

/// Reads `level=..` or `filter=..` (exactly one) from a query string (percent-encoded, `+` a
/// space, as a form).
pub fn parse_query(query: Option<&str>) -> Result<Change, String> {
    let mut found = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        match k.as_str() {
            "level" => found.push(Change::Level(v)),
            "filter" => found.push(Change::Filter(v)),
            other => {
                return Err(format!(
                    "unknown parameter `{other}`: give `level=LEVEL` or `filter=DIRECTIVES`"
                ));
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err("give `level=LEVEL` or `filter=DIRECTIVES`".into()),
        _ => Err("give one of `level` or `filter`, once".into()),
    }
}

/// Percent-decoding of a query component (`+` is a space).
pub fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-encoding in `{s}`"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8 once decoded"))
}

pub fn handle(method: &Method, query: Option<&str>) -> Reply {
    let current = logging::current_filter();
    if method == Method::GET {
        return Reply::json(StatusCode::OK, &json!({ "filter": current }));
    }
    let change = match parse_query(query) {
        Ok(c) => c,
        Err(e) => return refused(&e, current),
    };
    let result = match &change {
        Change::Level(l) => logging::set_level(l),
        Change::Filter(f) => logging::set_filter(f),
    };
    match result {
        Ok(previous) => {
            let filter = logging::current_filter();
            info!(
                filter = filter.as_deref().unwrap_or(""),
                %previous,
                "log filter changed through the admin API"
            );
            Reply::json(
                StatusCode::OK,
                &json!({ "filter": filter, "previous": previous }),
            )
        }
        Err(e @ (FilterError::NotInitialized | FilterError::Reload(_))) => Reply::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": e.to_string(), "filter": current }),
        ),
        Err(e) => refused(&e.to_string(), current),
    }
}

fn refused(why: &str, current: Option<String>) -> Reply {
    Reply::json(
        StatusCode::BAD_REQUEST,
        &json!({ "error": why, "filter": current }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        assert_eq!(
            parse_query(Some("level=debug")),
            Ok(Change::Level("debug".into()))
        );
        assert_eq!(
            parse_query(Some("filter=info,access=off,mesh_node::proxy=debug")),
            Ok(Change::Filter(
                "info,access=off,mesh_node::proxy=debug".into()
            ))
        );
        assert_eq!(
            parse_query(Some(
                "filter=info%2Caccess%3Doff%2Cmesh_node%3A%3Aproxy%3Ddebug"
            )),
            Ok(Change::Filter(
                "info,access=off,mesh_node::proxy=debug".into()
            ))
        );
        assert!(parse_query(None).is_err());
        assert!(parse_query(Some("")).is_err());
        assert!(parse_query(Some("level=debug&filter=info")).is_err());
        assert!(parse_query(Some("lvl=debug")).is_err());
        assert!(parse_query(Some("filter=%zz")).is_err());
        assert!(parse_query(Some("filter=%ff")).is_err());
        assert_eq!(decode("a+b%20c"), Ok("a b c".into()));
        assert!(decode("%2").is_err());
    }

    #[test]
    fn a_bad_change_is_refused_with_the_reason() {
        // Validation comes before the (process-wide) filter is touched.
        for q in [
            "level=loud",
            "filter=info,access=nope",
            "filter=verbose",
            "filter=",
            "x=1",
        ] {
            let r = handle(&Method::POST, Some(q));
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.body);
            let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{q}");
        }
        let r = handle(&Method::POST, Some("filter=info,access=nope"));
        assert!(r.body.contains("access=nope"), "{}", r.body);
        let r = handle(&Method::GET, None);
        assert_eq!(r.status, StatusCode::OK);
    }
}
