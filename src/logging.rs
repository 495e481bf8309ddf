//! Logging to stderr (env_logger, `RUST_LOG`, default `info`) behind one guard: no token,
//! secret or signature may reach a log line.
//!
//! Our own log lines never carry them. Dependencies can: tungstenite's debug/trace lines print
//! whole frames (which carry tokens in `federation/refresh` answers and `sig` values in
//! deliveries), and rustls' trace lines print handshake details. So records from those crates
//! are passed only at `info` and above, whatever `RUST_LOG` asks for.

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

/// Installs the guarded logger; a second call is a no-op.
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Guarded { inner })).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(target: &str, level: Level) -> bool {
        allowed(&Metadata::builder().target(target).level(level).build())
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
