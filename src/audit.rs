//! The audit trail: one JSON object per line, `{"ts", "event", "serverId"?, "peer"?, "reason"?}`.
//!
//! Owns the audit sink: a file opened for append (mode 0600) when `FEDMCP_AUDIT_LOG` is set,
//! else the `audit` log target on stderr. Lines are buffered and written once per loop turn
//! (`flush`), so a burst of events costs one write. `ts` is milliseconds since the epoch.
//! It must never receive a token, secret or signature: callers pass only server ids, peer
//! addresses and fixed reason codes, and strings are JSON-escaped here.

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
        }
    }
}

/// Bytes buffered before a turn's flush is forced early.
const AUDIT_BUFFER_BYTES: usize = 64 * 1024;

pub struct Audit {
    file: Option<File>,
    buf: Vec<u8>,
}

impl Audit {
    /// Opens the sink; `None` logs to stderr under the `audit` target.
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let file = match path {
            Some(p) => {
                let mut o = OpenOptions::new();
                o.create(true).append(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    o.mode(0o600);
                }
                Some(o.open(p)?)
            }
            None => None,
        };
        Ok(Audit {
            file,
            buf: Vec::new(),
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
        line.push('}');
        match self.file {
            Some(_) => {
                self.buf.extend_from_slice(line.as_bytes());
                self.buf.push(b'\n');
                if self.buf.len() > AUDIT_BUFFER_BYTES {
                    self.flush();
                }
            }
            None => log::info!(target: "audit", "{line}"),
        }
    }

    /// Writes buffered lines; an error is logged and the lines are dropped (the loop goes on).
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Some(f) = self.file.as_mut()
            && let Err(e) = f.write_all(&self.buf)
        {
            log::error!("audit log write failed: {e}");
        }
        self.buf.clear();
    }
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
}
