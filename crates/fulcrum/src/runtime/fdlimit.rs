//! The process's file descriptor limit (`RLIMIT_NOFILE`): raised at start from the soft limit
//! (often 1024) to the hard limit, and checked against what the listeners may need.

use nix::sys::resource::{getrlimit, rlim_t, setrlimit, Resource, RLIM_INFINITY};

/// Descriptors kept for everything but proxied connections: listening sockets, the admin API,
/// health checks, DNS, the epoll sets, log and certificate files.
pub const MARGIN: rlim_t = 256;

/// Where the hard limit is unlimited, the soft limit is raised to this instead (Linux's default
/// `fs.nr_open`: the kernel refuses a soft limit above it).
const UNLIMITED_FALLBACK: rlim_t = 1 << 20;

/// Descriptors that listeners with these `max_connections` may hold at once: each client
/// connection may have one backend connection beside it, plus [`MARGIN`].
pub fn needed(max_connections: impl IntoIterator<Item = usize>) -> rlim_t {
    max_connections
        .into_iter()
        .map(|max| {
            rlim_t::try_from(max)
                .unwrap_or(rlim_t::MAX)
                .saturating_mul(2)
        })
        .fold(MARGIN, rlim_t::saturating_add)
}

/// The soft limit to ask for: the hard limit, or [`UNLIMITED_FALLBACK`] when there is none;
/// never below the current soft limit.
pub fn target(soft: rlim_t, hard: rlim_t) -> rlim_t {
    let hard = if hard == RLIM_INFINITY {
        UNLIMITED_FALLBACK
    } else {
        hard
    };
    hard.max(soft)
}

/// The outcome of [`raise`]: the soft limit before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// The soft limit the process started with.
    pub before: rlim_t,
    /// The soft limit now (what the process can hold).
    pub now: rlim_t,
    /// The hard limit.
    pub hard: rlim_t,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Errors are returned for the caller to log;
/// the limit is then unchanged.
pub fn raise() -> nix::Result<Raised> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let wanted = target(soft, hard);
    if wanted == soft {
        return Ok(Raised {
            before: soft,
            now: soft,
            hard,
        });
    }
    setrlimit(Resource::RLIMIT_NOFILE, wanted, hard)?;
    Ok(Raised {
        before: soft,
        now: wanted,
        hard,
    })
}

/// Logs a warning when the soft limit in force cannot hold what listeners with these
/// `max_connections` may need (see [`needed`]).
pub fn warn_if_short(max_connections: impl IntoIterator<Item = usize>) {
    let Ok((limit, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let needed = needed(max_connections);
    if let Some(warning) = shortfall(needed, limit) {
        tracing::warn!(limit, needed, "{warning}");
    }
}

/// The warning to log when `limit` descriptors cannot hold `needed` ones, if so.
pub fn shortfall(needed: rlim_t, limit: rlim_t) -> Option<String> {
    (needed > limit).then(|| {
        format!(
            "the open file limit ({limit}) is below what the listeners' max_connections may need ({needed}: two descriptors per connection plus {MARGIN}); raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower max_connections"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_two_descriptors_per_connection_plus_the_margin() {
        assert_eq!(needed([]), MARGIN);
        assert_eq!(needed([10_000]), 20_000 + MARGIN);
        assert_eq!(needed([10_000, 500]), 21_000 + MARGIN);
        assert_eq!(needed([usize::MAX, usize::MAX]), rlim_t::MAX);
    }

    #[test]
    fn target_is_the_hard_limit_never_lower_than_the_soft_one() {
        assert_eq!(target(256, 4096), 4096);
        assert_eq!(target(4096, 4096), 4096);
        assert_eq!(target(1024, RLIM_INFINITY), UNLIMITED_FALLBACK);
        assert_eq!(target(RLIM_INFINITY, RLIM_INFINITY), RLIM_INFINITY);
    }

    #[test]
    fn warns_only_when_the_limit_is_short() {
        assert_eq!(shortfall(20_256, 1_048_576), None);
        assert_eq!(shortfall(4096, 4096), None);
        let warning = shortfall(20_256, 4096).expect("short");
        assert!(
            warning.contains("(4096)") && warning.contains("(20256"),
            "{warning}"
        );
    }
}
