//! The audit trail: one JSON object per line, `{"ts", "event", "serverId"?, "peer"?, "reason"?}`.
//!
//! Owns the audit sink: a file opened for append (mode 0600) when `FEDMCP_AUDIT_LOG` is set,
//! else stderr, each line prefixed `[<UTC time> INFO  audit] ` (the look of a log line of
//! target `audit`). It never goes through the logger: no `RUST_LOG` filter can turn the audit
//! trail off. Lines are buffered and written once per loop turn (`flush`), so a burst of
//! events costs one write. `ts` is milliseconds since the epoch.
//! It must never receive a token, secret or signature: callers pass only server ids, peer
//! addresses and fixed reason codes, and strings are JSON-escaped here.
//!
//! `auth_failed` lines are limited to [`AUTH_FAILED_PER_SEC`] a second in all (contract §8):
//! a refused-token flood must not fill the disk. The first line written after a suppressed
//! stretch carries `"suppressed": N`, the number left out; the metric counts every one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    AuthFailed,
    SessionOpened,
    SessionClosed,
    ServerRegistered,
    ServerRemoved,
    TokenIssued,
    RateLimited,
    TokenRevoked,
    SigningKeyRotated,
    McpSessionOpened,
    McpSessionClosed,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::AuthFailed => "auth_failed",
            Event::SessionOpened => "session_opened",
            Event::SessionClosed => "session_closed",
            Event::ServerRegistered => "server_registered",
            Event::ServerRemoved => "server_removed",
            Event::TokenIssued => "token_issued",
            Event::RateLimited => "rate_limited",
            Event::TokenRevoked => "token_revoked",
            Event::SigningKeyRotated => "signing_key_rotated",
            Event::McpSessionOpened => "mcp_session_opened",
            Event::McpSessionClosed => "mcp_session_closed",
        }
    }
}

/// Bytes buffered before a turn's flush is forced early.
const AUDIT_BUFFER_BYTES: usize = 64 * 1024;

/// `auth_failed` lines written per second at most (contract §8).
pub const AUTH_FAILED_PER_SEC: u32 = 10;

/// Where audit lines go.
enum Sink {
    /// `FEDMCP_AUDIT_LOG`.
    File(File),
    /// stderr, each line prefixed.
    Stderr,
    /// Nowhere: a core without a process around it (simulation, fuzzing, unit tests).
    Discard,
}

pub struct Audit {
    sink: Sink,
    buf: Vec<u8>,
    /// The second (ms / 1000) `auth_failed` lines are being counted in, and how many were
    /// written in it.
    auth_second: i64,
    auth_written: u32,
    /// `auth_failed` lines left out since the last one written.
    auth_suppressed: u64,
}

impl Audit {
    /// An audit trail that keeps nothing (for a core driven by a simulation or a test).
    pub fn discard() -> Audit {
        Audit {
            sink: Sink::Discard,
            buf: Vec::new(),
            auth_second: i64::MIN,
            auth_written: 0,
            auth_suppressed: 0,
        }
    }

    /// Opens the sink: the file at `path`, or stderr.
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let sink = match path {
            Some(p) => {
                let mut o = OpenOptions::new();
                o.create(true).append(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    o.mode(0o600);
                }
                Sink::File(o.open(p)?)
            }
            None => Sink::Stderr,
        };
        Ok(Audit {
            sink,
            buf: Vec::new(),
            auth_second: i64::MIN,
            auth_written: 0,
            auth_suppressed: 0,
        })
    }

    pub fn record(
        &mut self,
        ts_ms: i64,
        event: Event,
        server_id: Option<&str>,
        peer: Option<SocketAddr>,
        reason: Option<&str>,
    ) {
        let mut suppressed = 0;
        if event == Event::AuthFailed {
            let second = ts_ms.div_euclid(1000);
            if second != self.auth_second {
                self.auth_second = second;
                self.auth_written = 0;
            }
            if self.auth_written >= AUTH_FAILED_PER_SEC {
                self.auth_suppressed = self.auth_suppressed.saturating_add(1);
                return;
            }
            self.auth_written += 1;
            suppressed = std::mem::take(&mut self.auth_suppressed);
        }
        let mut line = String::with_capacity(128);
        line.push_str("{\"ts\":");
        line.push_str(&ts_ms.to_string());
        line.push_str(",\"event\":\"");
        line.push_str(event.as_str());
        line.push('"');
        if let Some(id) = server_id {
            line.push_str(",\"serverId\":");
            push_json_str(&mut line, id);
        }
        if let Some(p) = peer {
            line.push_str(",\"peer\":");
            push_json_str(&mut line, &p.to_string());
        }
        if let Some(r) = reason {
            line.push_str(",\"reason\":");
            push_json_str(&mut line, r);
        }
        if suppressed > 0 {
            line.push_str(",\"suppressed\":");
            line.push_str(&suppressed.to_string());
        }
        line.push('}');
        if let Sink::Discard = self.sink {
            return;
        }
        if let Sink::Stderr = self.sink {
            // On stderr, the line says what it is (and when), like a log line would.
            self.buf.push(b'[');
            self.buf.extend_from_slice(utc_seconds(ts_ms).as_bytes());
            self.buf.extend_from_slice(b" INFO  audit] ");
        }
        self.buf.extend_from_slice(line.as_bytes());
        self.buf.push(b'\n');
        if self.buf.len() > AUDIT_BUFFER_BYTES {
            self.flush();
        }
    }

    /// Writes buffered lines; an error is logged and the lines are dropped (the loop goes on).
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let written = match &mut self.sink {
            Sink::File(f) => f.write_all(&self.buf),
            Sink::Stderr => std::io::stderr().lock().write_all(&self.buf),
            Sink::Discard => Ok(()),
        };
        if let Err(e) = written {
            log::error!("audit log write failed: {e}");
        }
        self.buf.clear();
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a time in ms since the epoch (UTC, proleptic Gregorian).
pub fn utc_seconds(ts_ms: i64) -> String {
    let secs = ts_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_json_object_per_line() {
        let dir = std::env::temp_dir().join(format!("fedmcp-audit-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let mut a = Audit::open(Some(&dir)).unwrap();
        a.record(
            5,
            Event::AuthFailed,
            None,
            Some("127.0.0.1:9".parse().unwrap()),
            Some("expired"),
        );
        a.record(6, Event::SessionOpened, Some("a\"b"), None, None);
        a.flush();
        let text = std::fs::read_to_string(&dir).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["event"], "auth_failed");
        assert_eq!(lines[0]["peer"], "127.0.0.1:9");
        assert_eq!(lines[0]["reason"], "expired");
        assert_eq!(lines[1]["serverId"], "a\"b");
        assert_eq!(lines[1]["ts"], 6);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn auth_failed_lines_are_limited_with_a_suppressed_count() {
        let path = std::env::temp_dir().join(format!("fedmcp-audit-rl-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut a = Audit::open(Some(&path)).unwrap();
        // 25 refusals in one second: 10 lines; other events are never limited.
        for i in 0..25 {
            a.record(10_000 + i, Event::AuthFailed, None, None, Some("expired"));
            a.record(10_000 + i, Event::SessionOpened, Some("s"), None, None);
        }
        // The next second: the first line carries the 15 left out.
        a.record(11_000, Event::AuthFailed, None, None, Some("bad_signature"));
        a.record(11_001, Event::AuthFailed, None, None, Some("bad_signature"));
        a.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let auth: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["event"] == "auth_failed")
            .collect();
        assert_eq!(auth.len(), 12);
        assert!(auth[..10].iter().all(|l| l.get("suppressed").is_none()));
        assert_eq!(auth[10]["suppressed"], 15);
        assert_eq!(auth[10]["reason"], "bad_signature");
        assert!(auth[11].get("suppressed").is_none());
        assert_eq!(
            lines
                .iter()
                .filter(|l| l["event"] == "session_opened")
                .count(),
            25
        );
        let _ = std::fs::remove_file(&path);
    }
}
