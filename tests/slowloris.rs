//! Slow or stalled clients cannot hold the loop or take more than `FEDMCP_MAX_CONNECTIONS`
//! slots (contract §3, issue 5): others keep being served, and past the limit a new
//! connection is refused at once with a 503 while existing sessions are unaffected.
mod common;
use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn two_hundred_slow_heads_do_not_delay_a_normal_client() {
    let p = Proxy::start(&[("FEDMCP_HANDSHAKE_TIMEOUT_MS", "3000")]);
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(p.addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap(); // and then nothing
        slow.push(s);
    }
    for round in 0..3 {
        for s in slow.iter_mut() {
            let _ = s.write_all(b"s"); // a byte at a time, never finishing the head
        }
        let t0 = Instant::now();
        let r = p.http("GET", "/healthz", None, None);
        assert_eq!(r.status, 200);
        assert!(
            t0.elapsed() < Duration::from_millis(1000),
            "round {round}: {:?}",
            t0.elapsed()
        );
    }
    // The stalled heads are answered 408 and closed at the handshake deadline.
    let s = &mut slow[0];
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
}

#[test]
fn past_max_connections_new_sockets_get_503_and_sessions_carry_on() {
    let p = Proxy::start(&[("FEDMCP_MAX_CONNECTIONS", "20")]);
    let t = p.register("keeper");
    let (mut ws, _) = p.online(&t, json!({}));
    // Fill the table with authenticated sessions: idle unauthenticated sockets would be
    // displaced by a newcomer (contract v1.1 §1), sessions are not.
    std::thread::sleep(Duration::from_millis(200));
    let mut held = Vec::new();
    for i in 0..19 {
        held.push(
            p.online(&p.federation_token(&format!("holder-{i}")), json!({}))
                .0,
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    // The next one is refused at once.
    let t0 = Instant::now();
    let mut extra = TcpStream::connect(p.addr).unwrap();
    extra.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = Vec::new();
    let _ = extra.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
    assert!(text.contains("too_many_connections"), "{text:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    // The session already open is unaffected.
    ws.send(&json!({"jsonrpc": "2.0", "id": "k", "method": "federation/servers"}));
    let r = ws.recv_id(&json!("k"));
    assert!(r["result"]["servers"].is_array());
    // Free slots: new connections are served again.
    drop(held);
    let start = Instant::now();
    loop {
        let mut s = TcpStream::connect(p.addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).to_string();
        if text.starts_with("HTTP/1.1 200") {
            let refused: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("fedmcp_connections_refused_total "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            assert!(refused >= 1, "the refusal is counted: {text}");
            break;
        }
        assert!(start.elapsed() < WAIT, "slots never freed: {text:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
