//! Slow consumers (contract §4 `recipient_overloaded`, §7 bounded memory): a recipient that
//! never reads cannot make the proxy's memory grow with what a fast sender pushes at it,
//! and every other session keeps being served.
mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_reader_that_never_reads_cannot_grow_memory() {
    let p = Proxy::start(&[]);
    let (ta, tb, tc) = (p.register("alice"), p.register("bob"), p.register("carol"));
    let (mut alice, _) = p.online(&ta, json!({}));
    let (_bob, _) = p.online(&tb, json!({})); // online, and never reads again
    let (mut carol, _) = p.online(&tc, json!({}));
    let before = rss_kib(p.pid());

    // 100 sends of ~1 MiB (just under FEDMCP_MAX_MESSAGE_BYTES): 100 MiB pushed at bob.
    let blob = "x".repeat(1_000_000);
    let mut overloaded = 0;
    let mut answered = 0;
    let mut peak = before;
    for i in 0..100u32 {
        let msg = json!({"jsonrpc": "2.0", "id": i, "method": "federation/send",
                         "params": {"to": "bob", "message": {"blob": blob}}});
        alice.send(&msg);
        // Refusals come back at once; accepted ones stay pending (bob never answers).
        alice
            .ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        while let Ok(tungstenite::Message::Text(t)) = alice.ws.read() {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            answered += 1;
            assert_eq!(
                v["error"]["code"], -32004,
                "only recipient_overloaded comes back at once: {v}"
            );
            assert_eq!(v["error"]["data"]["reason"], "recipient_overloaded");
            overloaded += 1;
        }
        peak = peak.max(rss_kib(p.pid()));
    }
    alice.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    assert!(
        overloaded >= 90,
        "most sends must be refused fast, got {overloaded} of {answered}"
    );

    // Other sessions are still served promptly.
    let t0 = Instant::now();
    carol.send(&json!({"jsonrpc": "2.0", "id": "c", "method": "federation/servers"}));
    let r = carol.recv_id(&json!("c"));
    assert!(r["result"]["servers"].is_array());
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "carol waited {:?}",
        t0.elapsed()
    );
    assert_eq!(p.http("GET", "/healthz", None, None).status, 200);

    // Memory: the bound is a few MiB per session (2 x max message + 64 KiB of unsent
    // output), not the 100 MiB pushed.
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 24 * 1024,
        "RSS grew by {growth} KiB while 100 MiB was pushed at a reader that never reads"
    );
}
