//! Logging to stderr (env_logger, `RUST_LOG`, default `info`) behind one guard: no token,
//! secret or signature may reach a log line.
//!
//! `RUST_LOG` is checked before it is used ([`check_filter`]): env_logger takes any word as a
//! module name, so a typo (`RUST_LOG=garbage`) would silently drop every line; here it is a
//! start error like any other bad value. The audit trail does not go through this logger
//! (`audit` writes its own lines), so no filter can turn it off.
//!
//! Our own log lines never carry them. Dependencies can: tungstenite's debug/trace lines print
//! whole frames (which carry tokens in `federation/refresh` answers and `sig` values in
//! deliveries), and rustls' trace lines print handshake details (rustls is built without its
//! `logging` feature, so it logs nothing today; the guard stays). So records from those
//! crates are passed only at `info` and above, whatever `RUST_LOG` asks for.

use log::{Level, Log, Metadata, Record};

/// Crates whose debug/trace output may contain message bodies.
const QUIET_CRATES: [&str; 2] = ["tungstenite", "rustls"];

struct Guarded {
    inner: env_logger::Logger,
}

fn allowed(meta: &Metadata<'_>) -> bool {
    let t = meta.target();
    let quiet = QUIET_CRATES
        .iter()
        .any(|c| t == *c || t.strip_prefix(c).is_some_and(|rest| rest.starts_with("::")));
    !(quiet && meta.level() > Level::Info)
}

impl Log for Guarded {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        allowed(meta) && self.inner.enabled(meta)
    }

    fn log(&self, record: &Record<'_>) {
        if allowed(record.metadata()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// The roots of the log targets this binary has: a filter naming anything else matches
/// nothing, which is a mistake, not a wish.
const KNOWN_TARGETS: [&str; 6] = [
    "fedmcp",
    "audit",
    "tungstenite",
    "rustls",
    "mio",
    "signal_hook",
];

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The one accepted form, quoted in the error.
const FILTER_EXPECTED: &str = "an env_logger filter of levels (off, error, warn, info, debug, trace) and targets of fedmcp, e.g. info, warn,fedmcp::io=debug or fedmcp=trace";

fn is_level(s: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s))
}

fn known_target(t: &str) -> bool {
    KNOWN_TARGETS
        .iter()
        .any(|k| t == *k || t.strip_prefix(k).is_some_and(|r| r.starts_with("::")))
}

/// Checks a `RUST_LOG` value: comma-separated directives, each a level, a target, or
/// `target=level`, optionally followed by `/text` (lines must contain it: env_logger is
/// built without its regex feature). `Err` is the one stderr line (§1 form).
pub fn check_filter(spec: &str) -> Result<(), String> {
    let directives = spec.split_once('/').map_or(spec, |(d, _)| d);
    for d in directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        let ok = match d.split_once('=') {
            Some((target, level)) => {
                known_target(target.trim()) && (level.trim().is_empty() || is_level(level.trim()))
            }
            None => is_level(d) || known_target(d),
        };
        if !ok {
            let shown: String = d.chars().take(60).collect();
            return Err(format!(
                "RUST_LOG: {shown:?} is not a log level and names no log target of fedmcp; expected {FILTER_EXPECTED}"
            ));
        }
    }
    Ok(())
}

/// Checks `RUST_LOG` and installs the guarded logger (a second call installs nothing).
pub fn init() -> Result<(), String> {
    let spec = match std::env::var("RUST_LOG") {
        Ok(s) if s.trim().is_empty() => "info".to_string(),
        Ok(s) => s,
        Err(std::env::VarError::NotPresent) => "info".to_string(),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(format!(
                "RUST_LOG: the value is not valid UTF-8; expected {FILTER_EXPECTED}"
            ));
        }
    };
    check_filter(&spec)?;
    let inner = env_logger::Builder::new().parse_filters(&spec).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Guarded { inner })).is_ok() {
        log::set_max_level(max);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(target: &str, level: Level) -> bool {
        allowed(&Metadata::builder().target(target).level(level).build())
    }

    #[test]
    fn filters_are_checked() {
        for ok in [
            "info",
            "INFO",
            "warn,fedmcp::io=debug",
            "fedmcp=trace",
            "fedmcp",
            "off",
            "debug,tungstenite=off",
            "info/session",
            " info , fedmcp::federation::cluster=debug ",
            "fedmcp::io::nats=",
        ] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in [
            "garbage",
            "fedmcpx",
            "fedmcp=loud",
            "inf",
            "foo=info",
            "warn,bar",
        ] {
            let e = check_filter(bad).unwrap_err();
            assert!(e.starts_with("RUST_LOG: "), "{e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn dependency_trace_is_held_back() {
        assert!(!meta("tungstenite::protocol", Level::Trace));
        assert!(!meta("tungstenite", Level::Debug));
        assert!(!meta("rustls::conn", Level::Debug));
        assert!(meta("tungstenite::protocol", Level::Warn));
        assert!(meta("fedmcp::federation::control", Level::Trace));
        assert!(meta("tungstenite_like", Level::Trace));
    }
}
