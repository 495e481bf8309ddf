//! The log filter and the audit trail (issue 13; PROTOCOL §1, §8): an invalid `RUST_LOG` is a
//! start error (exit 2, one line naming the variable), and the audit trail on stderr does not
//! depend on `RUST_LOG` at all.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn start_with_filter(filter: &str) -> std::process::Output {
    let mut child = Command::new(bin())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FEDMCP_LISTEN", "127.0.0.1:0")
        .env("FEDMCP_STATE_DIR", "")
        .env("FEDMCP_JWT_SECRET", SECRET)
        .env("RUST_LOG", filter)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let t0 = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        if t0.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_invalid_rust_log_is_a_start_error() {
    for bad in ["garbage", "fedmcp=loud", "warn,nosuchcrate=debug"] {
        let out = start_with_filter(bad);
        assert_eq!(out.status.code(), Some(2), "RUST_LOG={bad}");
        assert!(out.stdout.is_empty(), "it must not listen: RUST_LOG={bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("RUST_LOG: "), "{err}");
        assert!(err.contains("expected"), "{err}");
    }
}

#[test]
fn the_audit_trail_on_stderr_does_not_depend_on_the_log_filter() {
    for filter in ["off", "error", "warn,fedmcp=off"] {
        let p = Proxy::start(&[("RUST_LOG", filter)]);
        // A refused token and a session: both audited.
        let r = p.http("GET", "/v1/servers", Some("not-a-token"), None);
        assert_eq!(r.status, 401);
        let (_ws, _) = p.online(&p.federation_token("alice"), serde_json::json!({}));
        let t0 = Instant::now();
        loop {
            let err = p.stderr_text();
            let audit: Vec<&str> = err.lines().filter(|l| l.contains(" audit] {")).collect();
            let has = |e: &str| {
                audit
                    .iter()
                    .any(|l| l.contains(&format!("\"event\":\"{e}\"")))
            };
            if has("auth_failed") && has("session_opened") {
                // Nothing but audit lines at `off`.
                if filter == "off" {
                    assert_eq!(audit.len(), err.lines().count(), "{err}");
                }
                for l in &audit {
                    let json = &l[l.find('{').unwrap()..];
                    let v: serde_json::Value = serde_json::from_str(json).unwrap();
                    assert!(v["ts"].is_i64(), "{l}");
                    assert!(l.starts_with('[') && l.contains("Z INFO  audit] "), "{l}");
                }
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "RUST_LOG={filter}: no audit lines on stderr:\n{err}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_memory_only_start_error_is_one_line() {
    let out = Command::new(bin())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FEDMCP_LISTEN", "127.0.0.1:0")
        .env("FEDMCP_STATE_DIR", "")
        .env("FEDMCP_AUDIT_LOG", "/nonexistent/fedmcp/audit.log")
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("FEDMCP_AUDIT_LOG: "), "{err}");
}
