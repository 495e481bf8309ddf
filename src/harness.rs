//! A control session without a network peer, for fuzzing and tests (`fuzz/session`).
//!
//! Owns nothing the proxy uses in production. It builds a real `Proxy` with one connection
//! (a loopback socket pair, never read or written here) already upgraded to a session, then
//! plays a script: client frames (masked here, so the fuzzer reaches the JSON-RPC layer),
//! raw bytes, timer ticks on a virtual clock, and the peer reading its output. Everything
//! runs through the same code as the reactor does: `ws_input`, `session_timer`, `commit`.
//! Time is virtual: the proxy's turn time starts at a fixed wall-clock moment and moves only
//! when the script says, so a script plays the same way every time.

use crate::audit::Audit;
use crate::clock::Now;
use crate::config::Config;
use crate::conn::{Conn, ConnState, HttpConn};
use crate::jwt::{Claims, TokenType};
use crate::proxy::Proxy;
use crate::ws::client_frame;
use std::time::Duration;

/// Plays `script` against one session. Ops (one byte each, then operands):
/// `0 op len(2) payload` a final frame · `1 op len(2) payload` a non-final frame ·
/// `2 len(1) bytes` raw bytes · `3 n` the clock moves n × 100 ms and timers run ·
/// `4` the peer reads everything owed. Returns the proxy and the session's connection for
/// inspection (`None` when the harness itself could not be set up).
pub fn play_session(script: &[u8]) -> Option<(Proxy, crate::conn::ConnId)> {
    let mut cfg = Config::default_for_tests();
    cfg.max_message_bytes = 4096;
    cfg.heartbeat = Duration::from_millis(1000);
    let audit = Audit::open(None).ok()?;
    // 2026-01-01T00:00:00Z, whatever the real clock says.
    let start = Now {
        at: std::time::Instant::now(),
        wall_ms: 1_767_225_600_000,
    };
    let mut p = Proxy::new(
        cfg,
        b"harness-secret-0123456789-abcdefghij".to_vec(),
        audit,
        start,
    );
    p.seed_ids(7);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    let _client = std::net::TcpStream::connect(listener.local_addr().ok()?).ok()?;
    let (server, peer) = listener.accept().ok()?;
    server.set_nonblocking(true).ok()?;
    let sock = mio::net::TcpStream::from_std(server);
    let id = p.insert_conn(|id| {
        Conn::new(
            id,
            sock,
            peer,
            ConnState::Http(HttpConn::new(start.at + Duration::from_secs(10))),
        )
    })?;
    // Another server, offline, so sends can queue.
    let _ = p.find_or_insert("peer");
    let now_s = start.secs();
    let claims = Claims {
        server_id: "fuzz".into(),
        token_type: TokenType::Federation,
        iat: now_s,
        exp: now_s + 3600,
        nbf: None,
        jti: None,
    };
    p.open_session(
        id,
        &claims,
        start.at + Duration::from_secs(10),
        tungstenite::protocol::Role::Server,
    )
    .ok()?;
    let mut i = 0;
    play(&mut p, id, script, &mut i);
    Some((p, id))
}

fn play(p: &mut Proxy, id: crate::conn::ConnId, script: &[u8], i: &mut usize) -> Option<()> {
    let take = |i: &mut usize, n: usize| -> Option<&[u8]> {
        let s = script.get(*i..*i + n)?;
        *i += n;
        Some(s)
    };
    while *i < script.len() {
        p.conn(id)?;
        let op = take(i, 1)?[0];
        match op % 5 {
            0 | 1 => {
                let opcode = take(i, 1)?[0];
                let len = u16::from_be_bytes(take(i, 2)?.try_into().ok()?) as usize % 8192;
                let payload = script.get(*i..(*i + len).min(script.len()))?;
                *i += payload.len();
                p.ws_input(id, &client_frame(opcode, op % 5 == 0, payload));
            }
            2 => {
                let len = take(i, 1)?[0] as usize;
                let raw = script.get(*i..(*i + len).min(script.len()))?;
                *i += raw.len();
                p.ws_input(id, raw);
            }
            3 => {
                p.now = p
                    .now
                    .after(Duration::from_millis(100 * take(i, 1)?[0] as u64));
                let at = p.now.at;
                while let Some(k) = p.timers.pop_due(at) {
                    if let crate::proxy::TimerKey::Conn(c) = k {
                        if let Some(conn) = p.conn_mut(c) {
                            conn.timer = None;
                        }
                        p.session_timer(c, at);
                    }
                }
            }
            _ => {
                if let Some(c) = p.conn_mut(id) {
                    c.out.clear();
                    c.out_pos = 0;
                }
            }
        }
        p.commit();
        // Invariant: what the proxy owes one peer stays bounded.
        let owed = p.conn(id).map_or(0, |c| c.unsent());
        assert!(
            owed <= p.hard_output_bound() + 64 * 1024,
            "output grew to {owed}"
        );
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_reaches_the_json_rpc_layer() {
        let mut s = vec![0u8, 1];
        let msg = br#"{"jsonrpc":"2.0","id":1,"result":{}}"#; // answers the welcome (id 1)
        s.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        s.extend_from_slice(msg);
        let send = br#"{"jsonrpc":"2.0","id":2,"method":"federation/send","params":{"to":"peer","message":1,"queue":true}}"#;
        s.extend_from_slice(&[0, 1]);
        s.extend_from_slice(&(send.len() as u16).to_be_bytes());
        s.extend_from_slice(send);
        s.push(4);
        let (p, id) = play_session(&s).expect("harness");
        let peer = p.registry.by_id("peer").unwrap();
        assert_eq!(
            peer.queue.len(),
            1,
            "the send was queued for the offline peer"
        );
        assert!(p.conn(id).is_some(), "the session is still open");
        // Silence past two heartbeats drops the session; garbage closes it 1002.
        let mut s2 = s.clone();
        s2.extend_from_slice(&[3, 30]);
        let (p, id) = play_session(&s2).expect("harness");
        assert!(
            p.conn(id).is_none(),
            "dropped after two silent heartbeat intervals"
        );
        let mut s3 = s.clone();
        s3.extend_from_slice(&[2, 6, 0x83, 0x80, 0, 0, 0, 0]); // reserved opcode 3
        let (p, id) = play_session(&s3).expect("harness");
        assert!(
            !matches!(p.conn(id).map(|c| &c.state), Some(ConnState::Ws(_))),
            "garbage ends the session"
        );
    }
}
