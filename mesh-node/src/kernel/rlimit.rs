//! The open-files limit (`RLIMIT_NOFILE`). A proxy holds about one descriptor per proxied
//! connection on each side (plus a pipe pair per spliced same-node connection), so the usual
//! soft limit of 1024 caps it near 500 connections. Like ztunnel and Envoy, the proxy raises its
//! soft limit to the hard limit when it starts; the hard limit is the operator's (systemd
//! `LimitNOFILE=`, the container runtime's `nofile` ulimit). See docs/operations.md ("Limits").

use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum RlimitError {
    #[error("getrlimit(RLIMIT_NOFILE): {0}")]
    Get(std::io::Error),
    #[error("setrlimit(RLIMIT_NOFILE) to {want}: {source}")]
    Set { want: u64, source: std::io::Error },
}

/// The limit before and after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nofile {
    pub before: u64,
    pub soft: u64,
    pub hard: u64,
}

fn get() -> Result<libc::rlimit, RlimitError> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an owned rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(RlimitError::Get(std::io::Error::last_os_error()));
    }
    Ok(l)
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (never lowers it, never touches
/// the hard limit).
pub fn raise_nofile() -> Result<Nofile, RlimitError> {
    let l = get()?;
    let before = l.rlim_cur;
    if l.rlim_cur < l.rlim_max {
        let new = libc::rlimit {
            rlim_cur: l.rlim_max,
            rlim_max: l.rlim_max,
        };
        // SAFETY: a valid pointer to an owned rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
            return Err(RlimitError::Set {
                want: l.rlim_max,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let after = get()?;
    Ok(Nofile {
        before,
        soft: after.rlim_cur,
        hard: after.rlim_max,
    })
}

/// [`raise_nofile`] at the start of a long-running command: logs the limit in force, and a
/// failure as a warning (the process goes on with the limit it had).
pub fn raise_nofile_logged(component: &str) {
    match raise_nofile() {
        Ok(n) => {
            info!(
                component,
                before = n.before,
                soft = n.soft,
                hard = n.hard,
                "RLIMIT_NOFILE"
            );
            if n.soft < 65_536 {
                warn!(
                    component,
                    soft = n.soft,
                    "open-files limit below 65536: each proxied connection holds about 2 descriptors; raise the hard limit (LimitNOFILE=, ulimit -Hn)"
                );
            }
        }
        Err(e) => warn!(component, error = %e, "could not raise RLIMIT_NOFILE"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_raised_to_hard() {
        let l = get().expect("getrlimit");
        // Start below the hard limit, as a shell's default 1024 does.
        let low = libc::rlimit {
            rlim_cur: l.rlim_cur.min(l.rlim_max).min(512),
            rlim_max: l.rlim_max,
        };
        // SAFETY: a valid pointer to an owned rlimit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        let n = raise_nofile().expect("raise");
        assert_eq!(n.before, low.rlim_cur);
        assert_eq!(n.soft, l.rlim_max);
        assert_eq!(n.hard, l.rlim_max);
        let again = get().expect("getrlimit");
        assert_eq!(again.rlim_cur, again.rlim_max);
    }
}
