//! Control sessions without a network, for fuzzing and tests (`fuzz/session`).
//!
//! Owns nothing the proxy uses in production. It builds the real [`Federation`] core with one
//! session already open (`fuzz`) and plays a script against it: text frames from the
//! session's peer, a second member (`peer`) that comes and goes and answers what it is
//! delivered, timer ticks on a virtual clock, the peer reading its output, sessions lost and
//! reopened, commits. It plays the reactor's part by hand: the core's actions are taken after
//! every step (frames for `peer` are read by it, the rest counted as owed until the script
//! reads them). No socket, no thread, no clock: time starts at a fixed wall-clock moment and
//! moves only when the script says, and ids come from a fixed seed, so a script plays the
//! same way every time. The WebSocket framing in front of a session is fuzzed on its own
//! (`fuzz/ws_frames`).

use crate::audit::Audit;
use crate::clock::Now;
use crate::config::Config;
use crate::federation::Federation;
use crate::federation::action::{Action, SessionId};
use crate::federation::control::Opening;
use crate::proto::jwt::{Claims, TokenType};
use serde_json::Value;
use std::time::Duration;

/// The harness's state after a script: the core and its two members' sessions.
pub struct Played {
    pub fed: Federation,
    /// The scripted session (`None` once it ended and was not reopened).
    pub fuzz: Option<SessionId>,
    pub peer: Option<SessionId>,
}

impl Played {
    /// Whether the scripted session is still open in the core.
    pub fn fuzz_open(&self) -> bool {
        self.fuzz.is_some_and(|s| self.fed.session(s).is_some())
    }
}

fn claims(server_id: &str, now: Now) -> Claims {
    Claims {
        server_id: server_id.into(),
        token_type: TokenType::Federation,
        iat: now.secs(),
        exp: now.secs() + 3600,
        nbf: None,
        jti: None,
    }
}

fn open(fed: &mut Federation, server_id: &str) -> Option<SessionId> {
    let now = fed.now;
    let c = claims(server_id, now);
    let o = Opening {
        claims: &c,
        welcome_by: now.at + Duration::from_secs(10),
        outbound: false,
        peer: None,
    };
    fed.open_session(o).ok()
}

/// A core on a virtual clock that starts at 2026-01-01T00:00:00Z whatever the real clock
/// says, with ids from `seed` and messages of at most 4096 bytes.
fn core(mut cfg: Config, seed: u64) -> Option<Federation> {
    cfg.max_message_bytes = 4096;
    let audit = Audit::discard();
    let start = Now {
        at: std::time::Instant::now(),
        wall_ms: 1_767_225_600_000,
    };
    let secret = b"harness-secret-0123456789-abcdefghij".to_vec();
    let mut fed = Federation::new(cfg, secret, audit, start);
    fed.seed_ids(seed);
    Some(fed)
}

/// Plays `script` (ops of one byte each, then operands; the op is the byte modulo 6):
/// `0 len(2) payload` a text frame from `fuzz` (not UTF-8: closed 1007, as the reactor
/// does) · `1 len(1) payload` a text frame from `peer` · `2` `peer` answers every delivery
/// it holds · `3 n` the clock moves n × 100 ms and due timers fire · `4` `fuzz` reads
/// everything owed · `5 k` an event: `fuzz` reconnects (k % 5 = 0), `peer` connects (1) or
/// goes away (2), a commit (3), the next commit fails (4). The core is durable, on an
/// in-memory disk committed after every op (as the reactor commits every turn). Returns
/// `None` only when the harness itself could not be set up.
pub fn play_session(script: &[u8]) -> Option<Played> {
    let mut cfg = Config::default_for_tests();
    cfg.heartbeat = Duration::from_millis(1000);
    cfg.queue_max_messages = 8;
    cfg.queue_max_bytes = 8192;
    let mut fed = core(cfg, 7)?;
    // Durable, with an in-memory disk: answers that promise durability wait for commits.
    fed.batch = Some(crate::store::state::Batch::default());
    // Another server, offline for now, so sends can queue.
    let _ = fed.find_or_insert("peer");
    let fuzz = open(&mut fed, "fuzz")?;
    let mut h = Harness {
        fed,
        fuzz: Some(fuzz),
        peer: None,
        peer_inbox: Vec::new(),
        disk: Vec::new(),
        fail_next_commit: false,
    };
    h.take();
    let mut i = 0;
    h.play(script, &mut i);
    Some(Played {
        fed: h.fed,
        fuzz: h.fuzz,
        peer: h.peer,
    })
}

struct Harness {
    fed: Federation,
    fuzz: Option<SessionId>,
    peer: Option<SessionId>,
    /// Ids of deliveries `peer` holds unanswered.
    peer_inbox: Vec<String>,
    /// The records the core committed (its "disk").
    disk: Vec<u8>,
    /// The next commit fails, as on a full disk.
    fail_next_commit: bool,
}

impl Harness {
    /// Takes the core's actions: `peer` reads its frames (answering its welcome); what goes
    /// to `fuzz` stays owed (the core counts it) until the script reads.
    fn take(&mut self) {
        for a in self.fed.take_actions() {
            match a {
                Action::Send { session, text } if Some(session) == self.peer => {
                    self.peer_reads(&text)
                }
                Action::Close { session, .. } | Action::Drop { session, .. }
                    if Some(session) == self.peer =>
                {
                    self.peer = None;
                    self.peer_inbox.clear();
                }
                _ => {}
            }
        }
        if let Some(p) = self.peer {
            self.fed.set_unsent(p, 0);
        }
    }

    fn peer_reads(&mut self, text: &str) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let id = v.get("id").map(|i| i.to_string());
        match (v.get("method").and_then(Value::as_str), id) {
            (Some("federation/welcome"), Some(id)) => {
                if let Some(p) = self.peer {
                    let answer = format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{}}}}");
                    self.fed.on_text(p, &answer);
                }
            }
            (Some("federation/deliver"), Some(id)) => self.peer_inbox.push(id),
            _ => {}
        }
    }

    fn play(&mut self, script: &[u8], i: &mut usize) -> Option<()> {
        let take = |i: &mut usize, n: usize| -> Option<&[u8]> {
            let s = script.get(*i..*i + n)?;
            *i += n;
            Some(s)
        };
        while *i < script.len() {
            let op = take(i, 1)?[0];
            match op % 6 {
                0 => {
                    let len = u16::from_be_bytes(take(i, 2)?.try_into().ok()?) as usize % 8192;
                    let payload = script.get(*i..(*i + len).min(script.len()))?;
                    *i += payload.len();
                    if let Some(s) = self.fuzz {
                        self.fed.session_heard(s);
                        match std::str::from_utf8(payload) {
                            Ok(text) => self.fed.on_text(s, text),
                            Err(_) => self.fed.close_session(s, 1007, "invalid UTF-8"),
                        }
                    }
                }
                1 => {
                    let len = take(i, 1)?[0] as usize;
                    let payload = script.get(*i..(*i + len).min(script.len()))?;
                    *i += payload.len();
                    if let (Some(p), Ok(text)) = (self.peer, std::str::from_utf8(payload)) {
                        self.fed.session_heard(p);
                        self.fed.on_text(p, text);
                    }
                }
                2 => {
                    if let Some(p) = self.peer {
                        self.fed.session_heard(p);
                        for id in std::mem::take(&mut self.peer_inbox) {
                            let answer =
                                format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":\"ok\"}}");
                            self.fed.on_text(p, &answer);
                        }
                    }
                }
                3 => {
                    let n = take(i, 1)?[0] as u64;
                    self.fed.now = self.fed.now.after(Duration::from_millis(100 * n));
                    let at = self.fed.now.at;
                    self.fed.fire_due(at);
                }
                4 => {
                    if let Some(s) = self.fuzz {
                        self.fed.session_drained(s, 0);
                    }
                }
                _ => match take(i, 1)?[0] % 5 {
                    0 => {
                        if let Some(s) = self.fuzz.take() {
                            self.fed.session_lost(s, "harness: reconnect");
                        }
                        self.fuzz = open(&mut self.fed, "fuzz");
                    }
                    1 if self.peer.is_none() => self.peer = open(&mut self.fed, "peer"),
                    2 => {
                        if let Some(p) = self.peer.take() {
                            self.fed.session_lost(p, "harness: peer gone");
                            self.peer_inbox.clear();
                        }
                    }
                    3 => self.commit(),
                    _ => self.fail_next_commit = true,
                },
            }
            self.take();
            self.commit();
            self.take();
            self.check();
        }
        Some(())
    }

    /// The turn's commit, as the reactor makes it (to the in-memory disk, or failing).
    fn commit(&mut self) {
        let Some(bytes) = self.fed.begin_commit() else {
            return;
        };
        let r = if std::mem::take(&mut self.fail_next_commit) {
            Err("harness: the disk is full".to_string())
        } else {
            self.disk.extend_from_slice(&bytes);
            Ok(())
        };
        self.fed.committed(r);
    }

    /// Invariants: what the proxy owes one peer and holds for one recipient stay bounded.
    fn check(&self) {
        if let Some(s) = self.fuzz.and_then(|s| self.fed.session(s)) {
            assert!(
                s.unsent <= self.fed.hard_output_bound() + 64 * 1024,
                "output grew to {}",
                s.unsent
            );
        }
        for e in self.fed.registry.entries() {
            assert!(e.queue.len() <= self.fed.cfg.queue_max_messages);
            assert!(e.queue_bytes + e.inflight_bytes <= self.fed.cfg.queue_max_bytes);
        }
    }
}

/// Plays `script` against the MCP facade (§9) of a core with one member online (`alpha`,
/// declaring two tools) that answers every delivery: the script is a list of messages, each
/// `len(2) bytes`, sent in turn over Streamable HTTP (in the session an `initialize` opened
/// first) and over a WebSocket session; the member answers each call with a result or, when
/// the message's last byte is odd, an error. Returns `None` only when the harness itself
/// could not be set up. Asserts that every answer is one JSON-RPC message.
pub fn play_mcp(script: &[u8]) -> Option<()> {
    use crate::federation::action::{Answer, LinkId, RequestId};
    use crate::federation::mcp::McpReply;
    let mut fed = core(Config::default_for_tests(), 11)?;
    let alpha = open(&mut fed, "alpha")?;
    let mut welcome_id = None;
    for a in fed.take_actions() {
        if let Action::Send { text, .. } = a
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            welcome_id = v.get("id").cloned();
        }
    }
    let caps =
        r#"{"tools":[{"name":"echo","inputSchema":{"type":"object"}},{"name":"two__parts"}]}"#;
    fed.on_text(
        alpha,
        &format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{{\"capabilities\":{caps}}}}}",
            welcome_id?
        ),
    );
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18"}}"#;
    let session = match fed.mcp_http(RequestId(1), "client", None, None, init) {
        Ok(McpReply::Now { session, .. }) => session,
        _ => None,
    };
    let link = LinkId(7);
    fed.mcp_ws_open(link, "client", None);
    let check = |text: &str| {
        let v: Value = serde_json::from_str(text).expect("an answer is JSON");
        assert!(v.is_object(), "one message, not a batch: {text}");
        assert_eq!(v["jsonrpc"], "2.0", "{text}");
    };
    let mut i = 0;
    let mut n = 2u64;
    while i + 2 <= script.len() {
        let len = u16::from_be_bytes([script[i], script[i + 1]]) as usize % 4096;
        i += 2;
        let msg = &script[i..(i + len).min(script.len())];
        i += msg.len();
        let Ok(text) = std::str::from_utf8(msg) else {
            continue;
        };
        n += 1;
        if n.is_multiple_of(2) {
            if let Ok(McpReply::Now { text, .. }) =
                fed.mcp_http(RequestId(n), "client", None, session.as_deref(), text)
            {
                check(&text);
            }
        } else {
            fed.mcp_ws_text(link, text);
        }
        fed.mcp_end_turn();
        // The member answers what it was delivered; the answers that come back are checked.
        let fail = msg.last().is_some_and(|b| b % 2 == 1);
        for _ in 0..2 {
            for a in fed.take_actions() {
                match a {
                    Action::Send { session, text } if session == alpha => {
                        let Ok(v) = serde_json::from_str::<Value>(&text) else {
                            continue;
                        };
                        let Some(id) = v.get("id") else { continue };
                        let answer = if fail {
                            format!(
                                "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{{\"code\":-1,\"message\":\"no\"}}}}"
                            )
                        } else {
                            format!(
                                "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"content\":[]}}}}"
                            )
                        };
                        fed.on_text(alpha, &answer);
                    }
                    Action::McpSend { text, .. } => check(&text),
                    Action::Respond {
                        resp: Answer::Mcp(text),
                        ..
                    } => check(&text),
                    _ => {}
                }
            }
        }
        assert!(
            fed.pending.len() <= 64,
            "deliveries pile up: {}",
            fed.pending.len()
        );
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &mut Vec<u8>, text: &[u8]) {
        s.push(0);
        s.extend_from_slice(&(text.len() as u16).to_be_bytes());
        s.extend_from_slice(text);
    }

    #[test]
    fn a_script_reaches_the_json_rpc_layer() {
        let mut s = Vec::new();
        // Answers the welcome (id 1), then queues a message for the offline peer.
        frame(&mut s, br#"{"jsonrpc":"2.0","id":1,"result":{}}"#);
        frame(
            &mut s,
            br#"{"jsonrpc":"2.0","id":2,"method":"federation/send","params":{"to":"peer","message":1,"queue":true}}"#,
        );
        s.push(4);
        let p = play_session(&s).expect("harness");
        let peer = p.fed.registry.by_id("peer").unwrap();
        assert_eq!(
            peer.queue.len(),
            1,
            "the send was queued for the offline peer"
        );
        assert!(p.fuzz_open(), "the session is still open");
        // The peer comes online: its queue is delivered, it answers, the queue empties.
        let mut s1 = s.clone();
        s1.extend_from_slice(&[5, 1, 2]);
        let p = play_session(&s1).expect("harness");
        assert!(p.peer.is_some());
        assert_eq!(p.fed.registry.by_id("peer").unwrap().queue.len(), 0);
        // Silence past two heartbeats drops the session; bytes that are not UTF-8 close it.
        let mut s2 = s.clone();
        s2.extend_from_slice(&[3, 30]);
        assert!(!play_session(&s2).expect("harness").fuzz_open());
        let mut s3 = s.clone();
        frame(&mut s3, &[0xff, 0xfe]);
        assert!(!play_session(&s3).expect("harness").fuzz_open());
    }

    fn msgs(ms: &[&str]) -> Vec<u8> {
        let mut s = Vec::new();
        for m in ms {
            s.extend_from_slice(&(m.len() as u16).to_be_bytes());
            s.extend_from_slice(m.as_bytes());
        }
        s
    }

    #[test]
    fn the_mcp_script_reaches_calls_lists_and_errors() {
        let s = msgs(&[
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"alpha__echo","arguments":{}}}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"alpha__two__parts"}}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/list","params":{"cursor":"x"}}"#,
            r#"[1,2]"#,
            "not json",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        ]);
        assert!(play_mcp(&s).is_some());
        assert!(play_mcp(&[]).is_some());
        assert!(play_mcp(&[0xff, 0xff, 0, 1, 2]).is_some());
    }

    #[test]
    fn a_script_plays_the_same_every_time() {
        let script: Vec<u8> = (0..4000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let a = play_session(&script).expect("harness");
        let b = play_session(&script).expect("harness");
        let state = |p: &Played| {
            let q: Vec<(String, usize, u64)> = p
                .fed
                .registry
                .entries()
                .map(|e| (e.server_id.clone(), e.queue.len(), e.received))
                .collect();
            (q, p.fuzz_open(), p.fed.pending.len())
        };
        assert_eq!(state(&a), state(&b));
    }
}
