//! The control channel (docs/PROTOCOL.md §4, with §2 for the upgrade's tokens and §6 for `sig`),
//! end to end against the real binary: upgrade, welcome, send/deliver, queue, JSON-RPC framing,
//! close codes, heartbeat and rate limit.
//!
//! Every wait is bounded: harness reads time out after `WAIT`, polling loops carry their own
//! deadline, and sleeps are only as long as the behaviour under test needs.
mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Response;
use tungstenite::http::HeaderValue;
use tungstenite::{HandshakeError, Message};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// A JSON-RPC request.
fn rpc(id: Value, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// A `federation/send` request to `to`.
fn send_req(id: &str, to: &str, message: Value) -> Value {
    rpc(
        json!(id),
        "federation/send",
        json!({"to": to, "message": message}),
    )
}

/// A `federation/send` notification (no id) to `to`.
fn send_note(to: &str, message: Value) -> Value {
    json!({"jsonrpc": "2.0", "method": "federation/send", "params": {"to": to, "message": message}})
}

/// Sends a request and waits for its answer.
fn call(ws: &mut Ws, id: &str, method: &str, params: Value) -> Value {
    ws.send(&rpc(json!(id), method, params));
    ws.recv_id(&json!(id))
}

/// Sends a fresh request and asserts that the very next message is its answer: nothing was
/// waiting for this session (the proxy handles one session's messages in order, so anything
/// caused earlier would already be ahead of the answer).
fn assert_quiet(ws: &mut Ws, tag: &str) {
    ws.send(&rpc(json!(tag), "federation/servers", json!({})));
    let m = ws.recv();
    assert_eq!(
        m["id"],
        json!(tag),
        "expected nothing but the answer to {tag}, got {m}"
    );
    assert!(m.get("method").is_none(), "{m}");
    assert!(m["result"]["servers"].is_array(), "{m}");
}

/// A proxy error: `code`, a message, and `data.reason` (contract §4: `data` always holds it).
fn assert_error(m: &Value, code: i64, reason: &str) {
    assert!(m.get("result").is_none(), "expected an error, got {m}");
    assert_eq!(m["error"]["code"], json!(code), "{m}");
    assert_eq!(m["error"]["data"]["reason"], json!(reason), "{m}");
    assert!(m["error"]["message"].is_string(), "{m}");
}

/// `GET /v1/servers/{id}` with an admin token; must be 200.
fn entry(p: &Proxy, id: &str) -> Value {
    let r = p.http(
        "GET",
        &format!("/v1/servers/{id}"),
        Some(&p.admin_token()),
        None,
    );
    assert_eq!(r.status, 200, "GET /v1/servers/{id}: {}", r.text());
    r.json()
}

/// Polls the registry entry until its `state` is `state`; returns how long that took.
fn wait_state(p: &Proxy, id: &str, state: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let e = entry(p, id);
        if e["state"] == state {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{id} did not become {state} within {within:?}: {e}"
        );
        sleep_ms(20);
    }
}

/// K = HMAC-SHA256(secret, "fedmcp/v1/sign/" + serverId + "/" + epoch) at epoch 1 (a
/// server registered once, or known from its token; contract §6), raw bytes.
fn signing_key(server_id: &str) -> Vec<u8> {
    let b64 = jwt::hmac_b64(
        SECRET.as_bytes(),
        &[b"fedmcp/v1/sign/", server_id.as_bytes(), b"/1"],
    );
    URL_SAFE_NO_PAD.decode(b64).unwrap()
}

/// The `sig` the proxy must put on a delivery to `recipient`.
fn delivery_sig(recipient: &str, msg_id: &str, from: &str, message: &str) -> String {
    jwt::hmac_b64(
        &signing_key(recipient),
        &[
            msg_id.as_bytes(),
            b"\n",
            from.as_bytes(),
            b"\n",
            message.as_bytes(),
        ],
    )
}

/// The `sig` a sender puts on its own send (msgId and from empty).
fn sender_sig(sender: &str, message: &str) -> String {
    jwt::hmac_b64(&signing_key(sender), &[b"\n\n", message.as_bytes()])
}

/// The exact bytes of `params.message` in a raw `federation/deliver` text.
fn raw_message_of(text: &str) -> String {
    #[derive(Deserialize)]
    struct Params<'a> {
        #[serde(borrow)]
        message: &'a RawValue,
    }
    #[derive(Deserialize)]
    struct Deliver<'a> {
        #[serde(borrow)]
        params: Params<'a>,
    }
    let d: Deliver = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    d.params.message.get().to_string()
}

/// Checks the shape of a `federation/deliver` and its signature over the delivered message
/// bytes (re-serialized canonically here, so only use with compact messages built by json!).
fn check_deliver(d: &Value, recipient: &str, from: &str) {
    assert_eq!(d["method"], "federation/deliver", "{d}");
    let p = &d["params"];
    assert!(p["msgId"].as_str().is_some_and(|s| !s.is_empty()), "{d}");
    assert_eq!(p["from"], from, "{d}");
    assert!(p.get("message").is_some(), "{d}");
    let sent_at = p["sentAt"]
        .as_i64()
        .unwrap_or_else(|| panic!("sentAt: {d}"));
    assert!(
        (sent_at - now_ms()).abs() < 60_000,
        "sentAt is not ms since the epoch: {d}"
    );
    let sig = p["sig"].as_str().unwrap_or_else(|| panic!("sig: {d}"));
    let msg = p["message"].to_string();
    assert_eq!(
        sig,
        delivery_sig(recipient, p["msgId"].as_str().unwrap(), from, &msg),
        "{d}"
    );
}

/// Opens a session and answers the welcome, with no round trip afterwards (so that messages
/// arriving right after the answer, such as queued deliveries, are not skipped).
fn connect_answer(p: &Proxy, token: &str, caps: Value) -> (Ws, Value) {
    let mut ws = p.ws_raw(token).expect("upgrade");
    let w = ws.recv();
    assert_eq!(w["method"], "federation/welcome", "{w}");
    ws.send(&json!({"jsonrpc": "2.0", "id": w["id"], "result": {"capabilities": caps}}));
    (ws, w)
}

/// Upgrades `path` with extra request headers; the error carries the HTTP response when the
/// proxy refused.
fn connect(
    p: &Proxy,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<(Ws, Response), tungstenite::Error> {
    let mut req = format!("ws://{}{}", p.addr, path).into_client_request()?;
    for (k, v) in headers {
        req.headers_mut()
            .insert(*k, HeaderValue::from_str(v).unwrap());
    }
    let stream = TcpStream::connect(p.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    match tungstenite::client::client(req, stream) {
        Ok((ws, resp)) => Ok((Ws { ws }, resp)),
        Err(HandshakeError::Failure(e)) => Err(e),
        Err(HandshakeError::Interrupted(_)) => Err(tungstenite::Error::ConnectionClosed),
    }
}

/// The refusal of an upgrade: status, JSON body, `WWW-Authenticate`.
fn refused(r: Result<(Ws, Response), tungstenite::Error>) -> (u16, Value, String) {
    match r {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!(
                    "refusal body is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&body)
                )
            });
            let www = resp
                .headers()
                .get("www-authenticate")
                .map(|h| h.to_str().unwrap_or("").to_string())
                .unwrap_or_default();
            (resp.status().as_u16(), v, www)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

fn assert_unauthorized(r: Result<(Ws, Response), tungstenite::Error>, code: &str) {
    let (status, body, www) = refused(r);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        www.starts_with("Bearer") && www.contains("error=\"invalid_token\""),
        "WWW-Authenticate: {www:?}"
    );
}

/// Writes several messages and flushes once, so the proxy sees them back to back.
fn send_burst(ws: &mut Ws, msgs: &[Value]) {
    for m in msgs {
        ws.ws.write(Message::text(m.to_string())).expect("ws write");
    }
    ws.ws.flush().expect("ws flush");
}

/// A minimal WebSocket client over a raw socket, for a peer that stops reading entirely.
struct RawWs {
    s: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    fn upgrade(p: &Proxy, token: &str) -> RawWs {
        Self::upgrade_after(p, token, Duration::ZERO)
    }

    /// Connects, waits `delay` before sending the request head, then upgrades.
    fn upgrade_after(p: &Proxy, token: &str, delay: Duration) -> RawWs {
        let mut s = TcpStream::connect(p.addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        std::thread::sleep(delay);
        write!(
            s,
            "GET /v1/control HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        let mut raw = RawWs { s, buf: Vec::new() };
        let end = loop {
            if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            raw.more();
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.buf.drain(..end);
        raw
    }

    fn more(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = self.s.read(&mut chunk).expect("raw read");
        assert!(n > 0, "connection closed");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    fn fill(&mut self, n: usize) {
        while self.buf.len() < n {
            self.more();
        }
    }

    /// One server frame (unmasked, unfragmented): opcode and payload.
    fn read_frame(&mut self) -> (u8, Vec<u8>) {
        self.fill(2);
        let op = self.buf[0] & 0x0f;
        assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
        let (len, off) = match self.buf[1] & 0x7f {
            126 => {
                self.fill(4);
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                self.fill(10);
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        self.fill(off + len);
        let payload = self.buf[off..off + len].to_vec();
        self.buf.drain(..off + len);
        (op, payload)
    }

    /// The next text frame as JSON (control frames skipped).
    fn read_json(&mut self) -> Value {
        loop {
            let (op, payload) = self.read_frame();
            match op {
                1 => return serde_json::from_slice(&payload).unwrap(),
                8 => panic!("closed: {payload:?}"),
                _ => continue,
            }
        }
    }

    /// A masked, final text frame.
    fn write_text(&mut self, text: &str) {
        self.write_frame(true, 1, text.as_bytes());
    }

    /// A masked frame: `fin`, `opcode` (0 continuation, 1 text, ...), payload.
    fn write_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Upgrade
// ---------------------------------------------------------------------------------------------

#[test]
fn upgrade_with_a_missing_or_bad_token_is_401_before_any_upgrade() {
    let p = Proxy::start(&[]);
    p.register("alice");
    assert_unauthorized(connect(&p, "/v1/control", &[]), "missing_token");
    assert_unauthorized(
        connect(
            &p,
            "/v1/control",
            &[("Authorization", "Bearer not-a-token")],
        ),
        "malformed_token",
    );
    let now = now_secs();
    let other_secret = jwt::sign(
        b"another-secret-0123456789-abcdefghijklmnop",
        &Claims {
            server_id: "alice".into(),
            token_type: TokenType::Federation,
            iat: now,
            exp: now + 3600,
            nbf: None,
            jti: None,
        },
    );
    assert_unauthorized(
        connect(
            &p,
            "/v1/control",
            &[("Authorization", &format!("Bearer {other_secret}"))],
        ),
        "bad_signature",
    );
    let expired = p.token_with("alice", TokenType::Federation, now - 7200, now - 3600);
    assert_unauthorized(
        connect(
            &p,
            "/v1/control",
            &[("Authorization", &format!("Bearer {expired}"))],
        ),
        "expired",
    );
    assert_unauthorized(
        connect(&p, "/v1/control?token=not-a-token", &[]),
        "malformed_token",
    );
    // Nothing of these left a session behind.
    assert_eq!(entry(&p, "alice")["state"], "offline");
}

#[test]
fn upgrade_with_an_admin_token_is_403() {
    let p = Proxy::start(&[]);
    let admin = p.admin_token();
    let (status, body, _) = refused(connect(
        &p,
        "/v1/control",
        &[("Authorization", &format!("Bearer {admin}"))],
    ));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "wrong_type", "{body}");
    let (status, body, _) = refused(connect(&p, &format!("/v1/control?token={admin}"), &[]));
    assert_eq!(status, 403, "{body}");
}

#[test]
fn query_token_opens_a_session() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let (mut a, _) = connect(&p, &format!("/v1/control?token={ta}"), &[]).expect("upgrade");
    let w = a.recv();
    assert_eq!(w["method"], "federation/welcome", "{w}");
    assert_eq!(w["params"]["serverId"], "alice", "{w}");
    a.send(&json!({"jsonrpc": "2.0", "id": w["id"], "result": {}}));
    assert_quiet(&mut a, "sync");
    assert_eq!(entry(&p, "alice")["state"], "online");
}

#[test]
fn subprotocol_is_selected_when_offered_and_absent_otherwise() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let auth = format!("Bearer {ta}");
    let (mut a, resp) = connect(
        &p,
        "/v1/control",
        &[
            ("Authorization", &auth),
            ("Sec-WebSocket-Protocol", "fedmcp.v1"),
        ],
    )
    .expect("upgrade offering fedmcp.v1");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|h| h.to_str().unwrap()),
        Some("fedmcp.v1")
    );
    assert_eq!(a.recv()["method"], "federation/welcome");

    // Offered among others: still selected.
    let (_b, resp) = connect(
        &p,
        "/v1/control",
        &[
            ("Authorization", &auth),
            ("Sec-WebSocket-Protocol", "mcp, fedmcp.v1"),
        ],
    )
    .expect("upgrade offering two subprotocols");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|h| h.to_str().unwrap()),
        Some("fedmcp.v1")
    );

    let (mut c, resp) =
        connect(&p, "/v1/control", &[("Authorization", &auth)]).expect("upgrade, no offer");
    assert!(
        resp.headers().get("sec-websocket-protocol").is_none(),
        "{:?}",
        resp.headers()
    );
    assert_eq!(c.recv()["method"], "federation/welcome");
}

// ---------------------------------------------------------------------------------------------
// Welcome
// ---------------------------------------------------------------------------------------------

#[test]
fn welcome_carries_the_session_facts_and_limits() {
    let p = Proxy::start(&[
        ("FEDMCP_MAX_MESSAGE_BYTES", "65536"),
        ("FEDMCP_RATE_LIMIT", "70/s,burst=90"),
        ("FEDMCP_HEARTBEAT_MS", "20000"),
    ]);
    p.register("alice");
    let now = now_secs();
    let exp = now + 3600;
    let ta = p.token_with("alice", TokenType::Federation, now, exp);
    let mut a = p.ws_raw(&ta).expect("upgrade");
    let w = a.recv();
    assert_eq!(w["jsonrpc"], "2.0", "{w}");
    assert_eq!(w["method"], "federation/welcome", "{w}");
    assert!(w["id"].is_i64() || w["id"].is_u64(), "welcome id: {w}");
    let params = &w["params"];
    assert_eq!(params["serverId"], "alice", "{w}");
    assert!(
        params["sessionId"].as_str().is_some_and(|s| !s.is_empty()),
        "{w}"
    );
    assert_eq!(params["expiresAt"], json!(exp * 1000), "{w}");
    assert_eq!(params["heartbeatMs"], json!(20000), "{w}");
    assert_eq!(
        params["limits"],
        json!({"maxMessageBytes": 65536, "ratePerSec": 70, "burst": 90}),
        "{w}"
    );

    // A second session has another sessionId.
    let tb = p.register("bob");
    let (_b, wb) = p.online(&tb, json!({}));
    assert_ne!(wb["params"]["sessionId"], params["sessionId"]);
}

#[test]
fn connecting_until_the_welcome_is_answered_then_online_with_capabilities() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut b, _) = p.online(&tb, json!({}));
    let mut a = p.ws_raw(&ta).expect("upgrade");
    let w = a.recv();
    assert_eq!(w["method"], "federation/welcome", "{w}");
    assert_eq!(entry(&p, "alice")["state"], "connecting");

    // Not yet a recipient.
    let r = call(
        &mut b,
        "to-connecting",
        "federation/send",
        json!({"to": "alice", "message": {"x": 1}}),
    );
    assert_error(&r, -32002, "server_offline");
    let r = call(&mut b, "list1", "federation/servers", json!({}));
    let ids: Vec<&str> = r["result"]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["serverId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["bob"], "{r}");

    // But it may send.
    a.send(&send_req("a1", "bob", json!({"from": "connecting"})));
    let d = b.recv_method("federation/deliver");
    check_deliver(&d, "bob", "alice");
    assert_eq!(d["params"]["message"], json!({"from": "connecting"}));
    b.answer(&d, json!({"seen": true}));
    let r = a.recv_id(&json!("a1"));
    assert_eq!(r["result"]["status"], "delivered", "{r}");
    assert_eq!(r["result"]["reply"], json!({"seen": true}), "{r}");

    // Answering the welcome makes it online, with its capabilities stored.
    let caps = json!({"tools": [{"name": "echo", "inputSchema": {"type": "object"}}], "v": 2});
    a.send(&json!({"jsonrpc": "2.0", "id": w["id"], "result": {"capabilities": caps}}));
    assert_quiet(&mut a, "sync");
    let e = entry(&p, "alice");
    assert_eq!(e["state"], "online", "{e}");
    assert_eq!(e["capabilities"], caps, "{e}");
    let r = call(&mut b, "list2", "federation/servers", json!({}));
    let servers = r["result"]["servers"].as_array().unwrap();
    let alice = servers
        .iter()
        .find(|s| s["serverId"] == "alice")
        .unwrap_or_else(|| panic!("alice not listed: {r}"));
    assert_eq!(alice["capabilities"], caps, "{r}");

    // And now a recipient.
    b.send(&send_req("b2", "alice", json!({"now": "online"})));
    let d = a.recv_method("federation/deliver");
    check_deliver(&d, "alice", "bob");
    a.answer(&d, json!("ok"));
    let r = b.recv_id(&json!("b2"));
    assert_eq!(r["result"]["status"], "delivered", "{r}");
}

#[test]
fn an_unregistered_server_with_a_valid_token_becomes_known() {
    let p = Proxy::start(&[]);
    let tb = p.register("bob");
    let r = p.http("GET", "/v1/servers/ghost", Some(&p.admin_token()), None);
    assert_eq!(r.status, 404, "{}", r.text());
    let (mut g, _) = p.online(&p.federation_token("ghost"), json!({"k": "v"}));
    let e = entry(&p, "ghost");
    assert_eq!(e["state"], "online", "{e}");
    assert_eq!(e["capabilities"], json!({"k": "v"}), "{e}");
    let (mut b, _) = p.online(&tb, json!({}));
    b.send(&send_req("g", "ghost", json!(1)));
    let d = g.recv_method("federation/deliver");
    check_deliver(&d, "ghost", "bob");
    g.answer(&d, json!(2));
    let r = b.recv_id(&json!("g"));
    assert_eq!(r["result"]["reply"], json!(2), "{r}");
}

#[test]
fn an_unanswered_welcome_is_closed_1008_after_the_handshake_timeout() {
    let p = Proxy::start(&[("FEDMCP_HANDSHAKE_TIMEOUT_MS", "300")]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let t0 = Instant::now();
    let mut a = p.ws_raw(&ta).expect("upgrade");
    assert_eq!(a.recv()["method"], "federation/welcome");
    // A session that answered is not affected by the handshake timeout.
    let (mut b, _) = p.online(&tb, json!({}));
    assert_eq!(a.recv_close(), Some(1008));
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    wait_state(&p, "alice", "offline", WAIT);
    sleep_ms(400);
    assert_quiet(&mut b, "still-here");
    assert_eq!(entry(&p, "bob")["state"], "online");
}

#[test]
fn the_handshake_timeout_bounds_upgrade_and_welcome_together() {
    // FEDMCP_HANDSHAKE_TIMEOUT_MS covers "TLS + HTTP head + WebSocket upgrade + welcome
    // answer" (§1): a client that spends most of it on the head has only the rest for the
    // welcome.
    let p = Proxy::start(&[("FEDMCP_HANDSHAKE_TIMEOUT_MS", "1000")]);
    let ta = p.register("alice");
    let t0 = Instant::now();
    let mut r = RawWs::upgrade_after(&p, &ta, Duration::from_millis(700));
    let w = r.read_json();
    assert_eq!(w["method"], "federation/welcome", "{w}");
    let code = loop {
        let (op, payload) = r.read_frame();
        if op == 8 {
            assert!(payload.len() >= 2, "close without a code");
            break u16::from_be_bytes([payload[0], payload[1]]);
        }
    };
    let took = t0.elapsed();
    assert_eq!(code, 1008);
    assert!(
        took < Duration::from_millis(1450),
        "closed {took:?} after the connection opened; the handshake budget is 1000 ms"
    );
}

// ---------------------------------------------------------------------------------------------
// Send and deliver
// ---------------------------------------------------------------------------------------------

#[test]
fn a_send_is_delivered_and_the_reply_comes_back() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    let before = now_ms();
    a.send(&send_req("s1", "bob", json!({"q": [1, 2, 3]})));
    let d = b.recv_method("federation/deliver");
    check_deliver(&d, "bob", "alice");
    assert!(d["id"].is_i64() || d["id"].is_u64(), "deliver id: {d}");
    assert_eq!(d["params"]["message"], json!({"q": [1, 2, 3]}), "{d}");
    let sent_at = d["params"]["sentAt"].as_i64().unwrap();
    assert!(
        sent_at >= before - 1000 && sent_at <= now_ms() + 1000,
        "sentAt {sent_at} not in [{before}, now]"
    );
    b.answer(&d, json!({"a": "answer", "n": [null]}));
    let r = a.recv_id(&json!("s1"));
    assert_eq!(
        r["result"],
        json!({"msgId": d["params"]["msgId"], "status": "delivered", "reply": {"a": "answer", "n": [null]}}),
        "{r}"
    );
}

#[test]
fn an_error_answer_is_returned_as_rejected_with_the_recipients_error() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    a.send(&send_req("s1", "bob", json!({"please": "fail"})));
    let d = b.recv_method("federation/deliver");
    let err = json!({"code": -32050, "message": "no thanks", "data": {"why": [1, "two"]}});
    b.send(&json!({"jsonrpc": "2.0", "id": d["id"], "error": err}));
    let r = a.recv_id(&json!("s1"));
    assert!(r.get("error").is_none(), "a rejection is a result: {r}");
    assert_eq!(
        r["result"],
        json!({"msgId": d["params"]["msgId"], "status": "rejected", "error": err}),
        "{r}"
    );
}

#[test]
fn the_message_is_forwarded_byte_for_byte_and_signed_for_the_recipient() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    // Register bob by hand to see the signing key the contract defines.
    let r = p.http(
        "POST",
        "/v1/servers",
        Some(&p.admin_token()),
        Some(r#"{"serverId":"bob"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let reg = r.json();
    assert_eq!(
        reg["signingKey"],
        json!(URL_SAFE_NO_PAD.encode(signing_key("bob"))),
        "{reg}"
    );
    let tb = reg["token"].as_str().unwrap().to_string();
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    let messages = [
        r#"{"a" : 1.50e3, "b":"\u00e9"}"#,
        r#"[ 1 , 2.000 , -0 , 1E+2 , 0.1e-7 ]"#,
        r#""caf\u00e9 \/ \ud83d\ude00 \t""#,
        "123456789012345678901234567890",
        r#"{"dup":1,"dup":2,"nested":{ "x" :[ true,false , null ]}}"#,
        "null",
        "\"é naïve ✓\"",
    ];
    for (i, m) in messages.iter().enumerate() {
        a.send_text(&format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"federation/send\",\"params\":{{\"to\":\"bob\",\"message\":  {m}  }}}}"
        ));
        let text = b.recv_text();
        assert!(text.contains(m), "{m} not in {text}");
        assert_eq!(raw_message_of(&text), *m, "{text}");
        let d: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(d["method"], "federation/deliver", "{d}");
        let msg_id = d["params"]["msgId"].as_str().unwrap();
        assert_eq!(
            d["params"]["sig"],
            json!(delivery_sig("bob", msg_id, "alice", m)),
            "signature over {m}: {d}"
        );
        b.answer(&d, json!(i));
        let r = a.recv_id(&json!(i));
        assert_eq!(r["result"]["status"], "delivered", "{r}");
        assert_eq!(r["result"]["msgId"], json!(msg_id), "{r}");
    }
}

#[test]
fn unknown_and_offline_recipients() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let r = call(
        &mut a,
        "u",
        "federation/send",
        json!({"to": "nobody", "message": {}}),
    );
    assert_error(&r, -32001, "unknown_server");
    let r = call(
        &mut a,
        "uq",
        "federation/send",
        json!({"to": "nobody", "message": {}, "queue": true}),
    );
    assert_error(&r, -32001, "unknown_server");
    let r = call(
        &mut a,
        "o",
        "federation/send",
        json!({"to": "bob", "message": {}}),
    );
    assert_error(&r, -32002, "server_offline");
    let r = call(
        &mut a,
        "of",
        "federation/send",
        json!({"to": "bob", "message": {}, "queue": false}),
    );
    assert_error(&r, -32002, "server_offline");
}

#[test]
fn a_recipient_that_never_answers_gives_delivery_timeout() {
    let p = Proxy::start(&[("FEDMCP_DELIVERY_TIMEOUT_MS", "300")]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    let t0 = Instant::now();
    a.send(&send_req("t", "bob", json!({"slow": true})));
    let d = b.recv_method("federation/deliver");
    let r = a.recv_id(&json!("t"));
    let took = t0.elapsed();
    assert_error(&r, -32003, "delivery_timeout");
    assert!(
        took >= Duration::from_millis(250),
        "timed out after {took:?}"
    );
    // A late answer is harmless: nothing more reaches the sender, both sessions go on.
    b.answer(&d, json!("late"));
    assert_quiet(&mut b, "b-ok");
    assert_quiet(&mut a, "a-ok");
}

#[test]
fn a_send_notification_is_forwarded_as_a_notification_and_nothing_comes_back() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    a.send(&send_note("bob", json!({"fire": "forget"})));
    let d = b.recv_method("federation/deliver");
    assert!(
        d.get("id").is_none(),
        "deliver of a notification has an id: {d}"
    );
    check_deliver(&d, "bob", "alice");
    assert_eq!(d["params"]["message"], json!({"fire": "forget"}));
    // Notifications that fail are silent too.
    a.send(&send_note("nobody", json!(1)));
    a.send(&json!({"jsonrpc": "2.0", "method": "federation/send", "params": {"message": 1}}));
    assert_quiet(&mut a, "after-notes");
    assert_quiet(&mut b, "b-after");
}

#[test]
fn broadcast_reaches_every_other_online_server_as_a_notification() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let tc = p.register("carol");
    let td = p.register("dave");
    p.register("erin"); // registered, offline
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    let (mut c, _) = p.online(&tc, json!({}));
    let mut d = p.ws_raw(&td).expect("upgrade"); // connecting: not a recipient
    assert_eq!(d.recv()["method"], "federation/welcome");

    let r = call(
        &mut a,
        "bc",
        "federation/send",
        json!({"to": "*", "message": {"hello": "all"}}),
    );
    let res = &r["result"];
    assert_eq!(res["status"], "broadcast", "{r}");
    assert_eq!(res["recipients"], json!(2), "{r}");
    let msg_id = res["msgId"].as_str().unwrap_or_else(|| panic!("{r}"));
    for (ws, id) in [(&mut b, "bob"), (&mut c, "carol")] {
        let m = ws.recv();
        assert_eq!(m["method"], "federation/deliver", "{m}");
        assert!(m.get("id").is_none(), "broadcast deliver has an id: {m}");
        check_deliver(&m, id, "alice");
        assert_eq!(m["params"]["msgId"], json!(msg_id), "{m}");
        assert_eq!(m["params"]["message"], json!({"hello": "all"}), "{m}");
        assert_quiet(ws, "after-bc");
    }
    assert_quiet(&mut a, "sender-quiet");
    assert_quiet(&mut d, "connecting-quiet");

    // As a notification: delivered all the same, nothing back.
    a.send(&send_note("*", json!("psst")));
    for ws in [&mut b, &mut c] {
        let m = ws.recv();
        assert_eq!(m["method"], "federation/deliver", "{m}");
        assert!(m.get("id").is_none(), "{m}");
        assert_eq!(m["params"]["message"], "psst", "{m}");
    }
    assert_quiet(&mut a, "sender-quiet-2");
}

#[test]
fn sends_from_one_sender_to_one_recipient_arrive_in_order() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    const N: usize = 200;
    let sends: Vec<Value> = (0..N)
        .map(|i| send_req(&format!("o{i}"), "bob", json!({"n": i})))
        .collect();
    send_burst(&mut a, &sends);
    let mut msg_ids = Vec::new();
    for i in 0..N {
        let d = b.recv_method("federation/deliver");
        assert_eq!(d["params"]["message"], json!({"n": i}), "out of order: {d}");
        msg_ids.push(d["params"]["msgId"].clone());
        b.answer(&d, json!({"got": i}));
    }
    let mut answers = HashMap::new();
    while answers.len() < N {
        let r = a.recv();
        let id = r["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{r}"))
            .to_string();
        answers.insert(id, r);
    }
    for (i, msg_id) in msg_ids.iter().enumerate() {
        let r = &answers[&format!("o{i}")];
        assert_eq!(r["result"]["status"], "delivered", "{r}");
        assert_eq!(r["result"]["reply"], json!({"got": i}), "{r}");
        assert_eq!(&r["result"]["msgId"], msg_id, "{r}");
    }
}

#[test]
fn sender_signatures_are_checked_when_present_and_required_when_configured() {
    // Not required: a present but wrong sig is refused, a right one accepted.
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    let r = call(
        &mut a,
        "bad",
        "federation/send",
        json!({"to": "bob", "message": {"m": 1}, "sig": "AAAA"}),
    );
    assert_error(&r, -32006, "bad_signature");
    let m = r#"{"m" : 2}"#;
    a.send_text(&format!(
        r#"{{"jsonrpc":"2.0","id":"good","method":"federation/send","params":{{"to":"bob","message":{m},"sig":"{}"}}}}"#,
        sender_sig("alice", m)
    ));
    let d = b.recv_method("federation/deliver");
    b.answer(&d, json!(true));
    let r = a.recv_id(&json!("good"));
    assert_eq!(r["result"]["status"], "delivered", "{r}");
    drop((a, b, p));

    // Required: unsigned is refused too.
    let p = Proxy::start(&[("FEDMCP_REQUIRE_SIGNED", "1")]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    let r = call(
        &mut a,
        "unsigned",
        "federation/send",
        json!({"to": "bob", "message": {"m": 1}}),
    );
    assert_error(&r, -32006, "bad_signature");
    // Signed with bob's key instead of alice's.
    let r = call(
        &mut a,
        "wrong-key",
        "federation/send",
        json!({"to": "bob", "message": 5, "sig": sender_sig("bob", "5")}),
    );
    assert_error(&r, -32006, "bad_signature");
    a.send(&rpc(
        json!("signed"),
        "federation/send",
        json!({"to": "bob", "message": 5, "sig": sender_sig("alice", "5")}),
    ));
    let d = b.recv_method("federation/deliver");
    assert_eq!(d["params"]["message"], json!(5), "{d}");
    b.answer(&d, json!("signed ok"));
    let r = a.recv_id(&json!("signed"));
    assert_eq!(r["result"]["reply"], "signed ok", "{r}");
}

#[test]
fn a_recipient_that_does_not_read_makes_sends_recipient_overloaded() {
    let p = Proxy::start(&[
        ("FEDMCP_MAX_MESSAGE_BYTES", "65536"),
        ("FEDMCP_DELIVERY_TIMEOUT_MS", "60000"),
    ]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (_b, _) = p.online(&tb, json!({})); // never reads again
    let pad = "x".repeat(60_000);
    for round in 0..40 {
        let mut burst: Vec<Value> = (0..20)
            .map(|_| send_note("bob", json!({ "pad": pad })))
            .collect();
        let probe = format!("p{round}");
        let sync = format!("s{round}");
        burst.push(send_req(&probe, "bob", json!({"probe": round})));
        burst.push(rpc(json!(sync), "federation/servers", json!({})));
        send_burst(&mut a, &burst);
        loop {
            let m = a.recv();
            if m["id"] == json!(probe) {
                assert_error(&m, -32004, "recipient_overloaded");
                return;
            }
            if m["id"] == json!(sync) {
                break;
            }
        }
    }
    panic!("40 rounds of 1.2 MB to a peer that never reads and no recipient_overloaded");
}

// ---------------------------------------------------------------------------------------------
// Queue
// ---------------------------------------------------------------------------------------------

#[test]
fn queued_messages_are_delivered_in_order_when_the_recipient_comes_online() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let queue = |id: &str, n: Value| {
        rpc(
            json!(id),
            "federation/send",
            json!({"to": "bob", "message": {"n": n}, "queue": true}),
        )
    };
    let mut ids = Vec::new();
    for i in 0..2 {
        let t0 = Instant::now();
        a.send(&queue(&format!("q{i}"), json!(i)));
        let r = a.recv_id(&json!(format!("q{i}")));
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert_eq!(r["result"]["status"], "queued", "{r}");
        ids.push(r["result"]["msgId"].as_str().unwrap().to_string());
    }
    // A queued notification: nothing comes back for it.
    a.send(&json!({"jsonrpc": "2.0", "method": "federation/send",
        "params": {"to": "bob", "message": {"n": "note"}, "queue": true}}));
    a.send(&queue("q2", json!(2)));
    let r = a.recv();
    assert_eq!(r["id"], "q2", "nothing but q2's answer expected: {r}");
    assert_eq!(r["result"]["status"], "queued", "{r}");
    ids.push(r["result"]["msgId"].as_str().unwrap().to_string());
    assert_eq!(entry(&p, "bob")["queued"], json!(4));

    // Connecting: still not a recipient.
    let mut b = p.ws_raw(&tb).expect("upgrade");
    let w = b.recv();
    assert_eq!(w["method"], "federation/welcome", "{w}");
    assert_quiet(&mut b, "connecting");
    b.send(&json!({"jsonrpc": "2.0", "id": w["id"], "result": {}}));

    let expected = [json!(0), json!(1), json!("note"), json!(2)];
    let mut k = 0;
    for n in expected.iter() {
        let d = b.recv();
        assert_eq!(d["method"], "federation/deliver", "{d}");
        check_deliver(&d, "bob", "alice");
        assert_eq!(d["params"]["message"], json!({"n": n}), "out of order: {d}");
        if *n == json!("note") {
            assert!(d.get("id").is_none(), "queued notification has an id: {d}");
        } else {
            assert_eq!(d["params"]["msgId"], json!(ids[k]), "{d}");
            k += 1;
            if *n == json!(1) {
                b.send(&json!({"jsonrpc": "2.0", "id": d["id"], "error": {"code": 7, "message": "no"}}));
            } else {
                b.answer(&d, json!({"got": n}));
            }
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let m = a.recv_method("federation/delivered");
        assert!(m.get("id").is_none(), "delivered is a notification: {m}");
        let want = if i == 1 {
            json!({"msgId": id, "status": "rejected", "error": {"code": 7, "message": "no"}})
        } else {
            json!({"msgId": id, "status": "delivered", "reply": {"got": i}})
        };
        assert_eq!(m["params"], want, "{m}");
    }
    assert_eq!(entry(&p, "bob")["queued"], json!(0));
    assert_quiet(&mut a, "a-done");
}

#[test]
fn a_queued_message_past_its_ttl_expires() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let t0 = Instant::now();
    let r = call(
        &mut a,
        "ttl",
        "federation/send",
        json!({"to": "bob", "message": {"short": "lived"}, "queue": true, "ttlMs": 200}),
    );
    assert_eq!(r["result"]["status"], "queued", "{r}");
    let msg_id = r["result"]["msgId"].clone();
    let m = a.recv_method("federation/delivered");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(195),
        "expired after {took:?}, before its ttlMs"
    );
    assert_eq!(m["params"]["msgId"], msg_id, "{m}");
    assert_eq!(m["params"]["status"], "expired", "{m}");
    assert_eq!(entry(&p, "bob")["queued"], json!(0));
    let (mut b, _) = connect_answer(&p, &tb, json!({}));
    assert_quiet(&mut b, "nothing-delivered");
}

#[test]
fn a_direct_send_with_queue_and_ttl_that_goes_back_to_the_queue_still_expires() {
    // queue:true with ttlMs to an online recipient that drops before answering: the message
    // goes back to the queue ("queued"), and its ttlMs still holds there.
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    let t0 = Instant::now();
    a.send(&rpc(
        json!("d"),
        "federation/send",
        json!({"to": "bob", "message": {"ttl": 300}, "queue": true, "ttlMs": 300}),
    ));
    let d = b.recv_method("federation/deliver");
    let msg_id = d["params"]["msgId"].clone();
    drop(b);
    let r = a.recv_id(&json!("d"));
    assert_eq!(
        r["result"],
        json!({"msgId": msg_id, "status": "queued"}),
        "{r}"
    );
    let m = a.recv_method("federation/delivered");
    assert!(t0.elapsed() >= Duration::from_millis(295), "{m}");
    assert_eq!(
        m["params"]["status"], "expired",
        "a requeued message must keep its ttlMs: {m}"
    );
    assert_eq!(m["params"]["msgId"], msg_id, "{m}");
    assert_eq!(entry(&p, "bob")["queued"], json!(0));
    let (mut b, _) = connect_answer(&p, &tb, json!({}));
    assert_quiet(&mut b, "nothing-after-expiry");
}

#[test]
fn a_queued_message_that_outlives_its_ttl_in_flight_expires_when_it_comes_back() {
    // Delivered from the queue but not answered when its ttlMs passes, then the recipient
    // drops: the message is back in the queue and older than its ttlMs, so it is dropped as
    // expired rather than delivered again.
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let r = call(
        &mut a,
        "q",
        "federation/send",
        json!({"to": "bob", "message": {"ttl": 300}, "queue": true, "ttlMs": 300}),
    );
    assert_eq!(r["result"]["status"], "queued", "{r}");
    let msg_id = r["result"]["msgId"].clone();
    let (mut b, _) = connect_answer(&p, &tb, json!({}));
    let d = b.recv_method("federation/deliver");
    assert_eq!(d["params"]["msgId"], msg_id, "{d}");
    sleep_ms(450); // past its ttlMs, unanswered
    drop(b);
    wait_state(&p, "bob", "offline", WAIT);
    let (mut b, _) = connect_answer(&p, &tb, json!({}));
    assert_quiet(&mut b, "expired-not-redelivered");
    let m = a.recv_method("federation/delivered");
    assert_eq!(m["params"]["msgId"], msg_id, "{m}");
    assert_eq!(m["params"]["status"], "expired", "{m}");
}

#[test]
fn a_queued_message_is_forwarded_byte_for_byte_with_its_original_sent_at() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let m = r#"{ "z":0.10 ,"a":[1e2, "\u00e9"] }"#;
    a.send_text(&format!(
        r#"{{"jsonrpc":"2.0","id":"q","method":"federation/send","params":{{"message":{m},"queue":true,"to":"bob"}}}}"#
    ));
    let r = a.recv_id(&json!("q"));
    assert_eq!(r["result"]["status"], "queued", "{r}");
    let queued_by = now_ms();
    sleep_ms(50);
    let (mut b, _) = connect_answer(&p, &tb, json!({}));
    let text = b.recv_text();
    assert_eq!(raw_message_of(&text), m, "{text}");
    let d: Value = serde_json::from_str(&text).unwrap();
    let msg_id = d["params"]["msgId"].as_str().unwrap();
    assert_eq!(msg_id, r["result"]["msgId"].as_str().unwrap(), "{d}");
    assert_eq!(
        d["params"]["sig"],
        json!(delivery_sig("bob", msg_id, "alice", m)),
        "{d}"
    );
    let sent_at = d["params"]["sentAt"].as_i64().unwrap();
    assert!(
        sent_at <= queued_by && sent_at > queued_by - 10_000,
        "sentAt {sent_at} is not the time of the send ({queued_by}): {d}"
    );
}

#[test]
fn the_queue_is_bounded_by_queue_max_messages() {
    let p = Proxy::start(&[("FEDMCP_QUEUE_MAX_MESSAGES", "2")]);
    let ta = p.register("alice");
    p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    for i in 0..2 {
        let r = call(
            &mut a,
            &format!("q{i}"),
            "federation/send",
            json!({"to": "bob", "message": i, "queue": true}),
        );
        assert_eq!(r["result"]["status"], "queued", "{r}");
    }
    let r = call(
        &mut a,
        "q2",
        "federation/send",
        json!({"to": "bob", "message": 2, "queue": true}),
    );
    assert_error(&r, -32005, "queue_full");
    assert_eq!(entry(&p, "bob")["queued"], json!(2));
}

#[test]
fn a_recipient_lost_with_an_unanswered_send() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));

    // Without queue: server_offline.
    let (mut b, _) = p.online(&tb, json!({}));
    a.send(&send_req("d1", "bob", json!({"k": 1})));
    let d = b.recv_method("federation/deliver");
    assert_eq!(d["params"]["message"], json!({"k": 1}));
    drop(b);
    let r = a.recv_id(&json!("d1"));
    assert_error(&r, -32002, "server_offline");
    wait_state(&p, "bob", "offline", WAIT);

    // With queue: queued, then delivered again (same msgId) when bob is back.
    let (mut b, _) = p.online(&tb, json!({}));
    a.send(&rpc(
        json!("d2"),
        "federation/send",
        json!({"to": "bob", "message": {"k": 2}, "queue": true}),
    ));
    let d = b.recv_method("federation/deliver");
    let msg_id = d["params"]["msgId"].clone();
    drop(b);
    let r = a.recv_id(&json!("d2"));
    assert_eq!(
        r["result"],
        json!({"msgId": msg_id, "status": "queued"}),
        "{r}"
    );
    wait_state(&p, "bob", "offline", WAIT);
    let (mut b, _) = connect_answer(&p, &tb, json!({}));
    let d = b.recv_method("federation/deliver");
    assert_eq!(d["params"]["msgId"], msg_id, "{d}");
    assert_eq!(d["params"]["message"], json!({"k": 2}), "{d}");
    b.answer(&d, json!({"late": true}));
    let m = a.recv_method("federation/delivered");
    assert_eq!(
        m["params"],
        json!({"msgId": msg_id, "status": "delivered", "reply": {"late": true}}),
        "{m}"
    );
}

// ---------------------------------------------------------------------------------------------
// JSON-RPC framing
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_json_invalid_requests_unknown_methods_and_bad_params() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));

    for bad in ["{\"jsonrpc\":", "not json at all", "{\"a\":1,}", "\u{1}"] {
        a.send_text(bad);
        let m = a.recv();
        assert_error(&m, -32700, "parse_error");
        assert!(
            m.as_object().unwrap().contains_key("id") && m["id"].is_null(),
            "id must be null: {m}"
        );
        assert_quiet(&mut a, "after-parse-error");
    }

    a.send_text(r#"{"jsonrpc":"2.0","id":1}"#);
    let m = a.recv();
    assert_eq!(m["id"], json!(1), "{m}");
    assert_error(&m, -32600, "invalid_request");

    a.send_text(r#"{"jsonrpc":"2.0","id":2,"method":"federation/nope","params":{}}"#);
    let m = a.recv();
    assert_eq!(m["id"], json!(2), "{m}");
    assert_error(&m, -32601, "method_not_found");

    let bad_params = [
        json!({"message": {"x": 1}}),
        json!({"to": 5, "message": {}}),
        json!({"to": ["bob"], "message": {}}),
        json!({"to": null, "message": {}}),
    ];
    for (i, params) in bad_params.into_iter().enumerate() {
        let id = format!("bp{i}");
        let m = call(&mut a, &id, "federation/send", params.clone());
        assert_error(&m, -32602, "invalid_params");
    }
    a.send_text(r#"{"jsonrpc":"2.0","id":"noparams","method":"federation/send"}"#);
    let m = a.recv();
    assert_eq!(m["id"], "noparams", "{m}");
    assert_error(&m, -32602, "invalid_params");
    assert_quiet(&mut a, "end");
}

#[test]
fn batches_are_answered_with_one_array() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let (mut a, _) = p.online(&ta, json!({"c": 1}));

    a.send(&json!([
        {"jsonrpc": "2.0", "id": 1, "method": "federation/servers"},
        {"jsonrpc": "2.0", "id": 2, "method": "federation/unknown"},
        {"jsonrpc": "2.0", "method": "federation/servers"},
    ]));
    let m = a.recv();
    let arr = m.as_array().unwrap_or_else(|| panic!("not an array: {m}"));
    assert_eq!(arr.len(), 2, "{m}");
    let one = arr.iter().find(|x| x["id"] == 1).expect("answer to 1");
    assert_eq!(one["result"]["servers"][0]["serverId"], "alice", "{m}");
    let two = arr.iter().find(|x| x["id"] == 2).expect("answer to 2");
    assert_error(two, -32601, "method_not_found");
    assert_quiet(&mut a, "after-batch");

    // Only notifications: nothing at all comes back.
    a.send(&json!([{"jsonrpc": "2.0", "method": "federation/servers"}]));
    assert_quiet(&mut a, "after-notes");

    // Invalid entries are answered each with -32600.
    a.send_text("[1,2]");
    let m = a.recv();
    let arr = m.as_array().unwrap_or_else(|| panic!("not an array: {m}"));
    assert_eq!(arr.len(), 2, "{m}");
    for x in arr {
        assert_error(x, -32600, "invalid_request");
        assert!(x["id"].is_null(), "{x}");
    }

    // Empty batch: one error, not an array.
    a.send_text("[]");
    let m = a.recv();
    assert!(m.is_object(), "empty batch must get one error object: {m}");
    assert!(m["id"].is_null(), "{m}");
    assert_error(&m, -32600, "invalid_request");
    assert_quiet(&mut a, "after-empty");
}

#[test]
fn batch_size_limit_is_1000_entries() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let (mut a, _) = p.online(&ta, json!({}));
    let batch = |n: usize| {
        Value::Array(
            (0..n)
                .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "federation/servers"}))
                .collect(),
        )
    };
    a.send(&batch(1000));
    let m = a.recv();
    let arr = m.as_array().unwrap_or_else(|| panic!("not an array"));
    assert_eq!(arr.len(), 1000);
    let mut seen: Vec<u64> = arr.iter().map(|x| x["id"].as_u64().unwrap()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..1000).collect::<Vec<u64>>());

    a.send(&batch(1001));
    let m = a.recv();
    assert!(m.is_object(), "over the limit: one error object expected");
    assert!(m["id"].is_null(), "{m}");
    assert_error(&m, -32600, "invalid_request");
    assert_quiet(&mut a, "after-big");
}

#[test]
fn a_batch_with_a_send_is_answered_after_the_recipient_answers() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    a.send(&json!([
        send_req("s", "bob", json!({"in": "batch"})),
        {"jsonrpc": "2.0", "id": "v", "method": "federation/servers"},
    ]));
    let d = b.recv_method("federation/deliver");
    assert_eq!(d["params"]["message"], json!({"in": "batch"}));
    // The batch waits for bob: a later single request is answered first.
    a.send(&rpc(json!("probe"), "federation/servers", json!({})));
    let m = a.recv();
    assert_eq!(
        m["id"], "probe",
        "the batch was answered before bob answered: {m}"
    );
    b.answer(&d, json!({"from": "bob"}));
    let m = a.recv();
    let arr = m.as_array().unwrap_or_else(|| panic!("not an array: {m}"));
    assert_eq!(arr.len(), 2, "{m}");
    let s = arr.iter().find(|x| x["id"] == "s").expect("answer to s");
    assert_eq!(s["result"]["status"], "delivered", "{m}");
    assert_eq!(s["result"]["reply"], json!({"from": "bob"}), "{m}");
    let v = arr.iter().find(|x| x["id"] == "v").expect("answer to v");
    assert!(v["result"]["servers"].is_array(), "{m}");
    assert_quiet(&mut a, "after");
}

#[test]
fn nesting_too_deep_is_a_parse_error_and_the_session_survives() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    a.send_text(&deep);
    let m = a.recv();
    assert!(m["id"].is_null(), "{m}");
    assert_error(&m, -32700, "parse_error");
    assert_quiet(&mut a, "alive");

    // Also inside a send's message: refused, not forwarded.
    a.send_text(&format!(
        r#"{{"jsonrpc":"2.0","id":"deep","method":"federation/send","params":{{"to":"bob","message":{deep}}}}}"#
    ));
    let m = a.recv();
    assert!(m["id"].is_null(), "{m}");
    assert_error(&m, -32700, "parse_error");
    assert_quiet(&mut a, "alive2");
    assert_quiet(&mut b, "nothing-forwarded");

    // A modest depth is fine.
    let ok = format!("{}{}", "[".repeat(50), "]".repeat(50));
    a.send_text(&format!(
        r#"{{"jsonrpc":"2.0","id":"ok","method":"federation/send","params":{{"to":"bob","message":{ok}}}}}"#
    ));
    let d = b.recv_method("federation/deliver");
    b.answer(&d, json!(0));
    let r = a.recv_id(&json!("ok"));
    assert_eq!(r["result"]["status"], "delivered", "{r}");
}

// ---------------------------------------------------------------------------------------------
// Close codes
// ---------------------------------------------------------------------------------------------

#[test]
fn a_binary_frame_closes_1003() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let (mut a, _) = p.online(&ta, json!({}));
    a.ws.send(Message::Binary(b"{\"jsonrpc\":\"2.0\"}".to_vec().into()))
        .unwrap();
    assert_eq!(a.recv_close(), Some(1003));
    wait_state(&p, "alice", "offline", WAIT);
}

#[test]
fn a_message_over_max_message_bytes_closes_1009() {
    let p = Proxy::start(&[("FEDMCP_MAX_MESSAGE_BYTES", "2048")]);
    let ta = p.register("alice");
    let (mut a, w) = p.online(&ta, json!({}));
    assert_eq!(w["params"]["limits"]["maxMessageBytes"], json!(2048));
    // Exactly at the limit: fine.
    let sized = |id: &str, len: usize| {
        let base = rpc(json!(id), "federation/servers", json!({"pad": ""})).to_string();
        let m = rpc(
            json!(id),
            "federation/servers",
            json!({"pad": "x".repeat(len - base.len())}),
        )
        .to_string();
        assert_eq!(m.len(), len);
        m
    };
    a.send_text(&sized("at", 2048));
    assert!(a.recv_id(&json!("at"))["result"].is_object());
    // One byte over: closed.
    a.send_text(&sized("over", 2049));
    assert_eq!(a.recv_close(), Some(1009));
    wait_state(&p, "alice", "offline", WAIT);

    // The bound is on the message, not the frame: fragments that are each small but add up
    // to more than the limit close 1009 as well (and a fragmented message under it is fine).
    let mut r = RawWs::upgrade(&p, &ta);
    let welcome = r.read_json();
    r.write_text(&json!({"jsonrpc": "2.0", "id": welcome["id"], "result": {}}).to_string());
    let msg = rpc(
        json!("frag"),
        "federation/servers",
        json!({"pad": "y".repeat(1500)}),
    )
    .to_string();
    let (head, tail) = msg.as_bytes().split_at(700);
    r.write_frame(false, 1, head);
    r.write_frame(true, 0, tail);
    let m = r.read_json();
    assert_eq!(m["id"], "frag", "{m}");
    let chunk = vec![b' '; 900];
    r.write_frame(
        false,
        1,
        b"{\"jsonrpc\":\"2.0\",\"id\":\"big\",\"method\":\"federation/servers\"",
    );
    for _ in 0..3 {
        r.write_frame(false, 0, &chunk);
    }
    r.write_frame(true, 0, b"}");
    let code = loop {
        let (op, payload) = r.read_frame();
        if op == 8 {
            assert!(payload.len() >= 2, "close without a code");
            break u16::from_be_bytes([payload[0], payload[1]]);
        }
    };
    assert_eq!(code, 1009);
}

#[test]
fn a_newer_session_replaces_the_older_with_4003() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut b, _) = p.online(&tb, json!({}));
    let (mut a1, w1) = p.online(&ta, json!({"gen": 1}));
    let (mut a2, w2) = p.online(&ta, json!({"gen": 2}));
    assert_ne!(w1["params"]["sessionId"], w2["params"]["sessionId"]);
    assert_eq!(a1.recv_close(), Some(4003));
    let e = entry(&p, "alice");
    assert_eq!(e["state"], "online", "{e}");
    assert_eq!(e["capabilities"], json!({"gen": 2}), "{e}");
    b.send(&send_req("to-new", "alice", json!("hi")));
    let d = a2.recv_method("federation/deliver");
    a2.answer(&d, json!("from a2"));
    let r = b.recv_id(&json!("to-new"));
    assert_eq!(r["result"]["reply"], "from a2", "{r}");
}

#[test]
fn deleting_the_server_closes_its_session_4001() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let (mut a, _) = p.online(&ta, json!({}));
    let r = p.http("DELETE", "/v1/servers/alice", Some(&p.admin_token()), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(a.recv_close(), Some(4001));
    // Its tokens are revoked.
    assert_unauthorized(
        connect(
            &p,
            "/v1/control",
            &[("Authorization", &format!("Bearer {ta}"))],
        ),
        "revoked",
    );
}

#[test]
fn token_expiry_sends_token_expiring_then_closes_4002() {
    let p = Proxy::start(&[]);
    p.register("alice");
    let now = now_secs();
    let exp = now + 2;
    let ta = p.token_with("alice", TokenType::Federation, now, exp);
    let (mut a, w) = p.online(&ta, json!({}));
    assert_eq!(w["params"]["expiresAt"], json!(exp * 1000));
    let mut expiring = Vec::new();
    let code = loop {
        match a.ws.read() {
            Ok(Message::Text(t)) => {
                let m: Value = serde_json::from_str(t.as_str()).unwrap();
                if m["method"] == "federation/tokenExpiring" {
                    expiring.push((now_ms(), m));
                }
            }
            Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("read failed before a close frame: {e}"),
        }
    };
    let closed_at = now_ms();
    assert_eq!(code, Some(4002));
    assert!(
        closed_at >= exp * 1000 - 100,
        "closed {} ms before the token's expiry",
        exp * 1000 - closed_at
    );
    assert!(
        closed_at <= exp * 1000 + 2500,
        "closed {} ms after the token's expiry",
        closed_at - exp * 1000
    );
    assert_eq!(
        expiring.len(),
        1,
        "federation/tokenExpiring must come once before the 4002 close, got {expiring:?}"
    );
    let (at, m) = &expiring[0];
    assert_eq!(m["params"]["expiresAt"], json!(exp * 1000), "{m}");
    // Due when a tenth of the 2 s lifetime (200 ms) remains.
    assert!(*at >= exp * 1000 - 1000, "tokenExpiring far too early: {m}");
}

#[test]
fn refresh_returns_a_new_token_and_extends_the_session() {
    let p = Proxy::start(&[]);
    p.register("alice");
    let now = now_secs();
    let exp = now + 2;
    let ta = p.token_with("alice", TokenType::Federation, now, exp);
    let (mut a, _) = p.online(&ta, json!({}));
    let r = call(&mut a, "refresh", "federation/refresh", json!({}));
    let token = r["result"]["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"));
    let expires_at = r["result"]["expiresAt"]
        .as_i64()
        .unwrap_or_else(|| panic!("{r}"));
    let claims = jwt::verify(token, &[SECRET.as_bytes()], now_secs(), 0)
        .unwrap_or_else(|e| panic!("new token does not verify: {e:?}"));
    assert_eq!(claims.server_id, "alice");
    assert_eq!(claims.token_type, TokenType::Federation);
    assert_eq!(expires_at, claims.exp * 1000, "{r}");
    assert!(claims.exp > exp + 60, "{r}");
    // Past the old expiry (plus slack), the session is still there.
    let until = exp * 1000 + 1500;
    let wait = (until - now_ms()).max(0) as u64;
    sleep_ms(wait);
    let r = call(&mut a, "still", "federation/servers", json!({}));
    assert!(r["result"]["servers"].is_array(), "{r}");
    // And the new token opens sessions.
    let (_a2, w) = p.online(token, json!({}));
    assert_eq!(w["params"]["expiresAt"], json!(expires_at));
}

#[test]
fn a_client_close_is_answered_1000_and_the_server_goes_offline() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let (mut a, _) = p.online(&ta, json!({}));
    a.ws.close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    assert_eq!(a.recv_close(), Some(1000));
    wait_state(&p, "alice", "offline", WAIT);
}

#[test]
fn sigterm_closes_sessions_1001() {
    let mut p = Proxy::start(&[]);
    let ta = p.register("alice");
    let (mut a, _) = p.online(&ta, json!({}));
    unsafe_kill(p.pid(), "TERM");
    assert_eq!(a.recv_close(), Some(1001));
    assert_eq!(p.terminate(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// Heartbeat
// ---------------------------------------------------------------------------------------------

#[test]
fn heartbeat_pings_and_a_silent_session_is_dropped() {
    let p = Proxy::start(&[("FEDMCP_HEARTBEAT_MS", "200")]);
    let tb = p.register("bob");
    let tc = p.register("carol");

    // bob keeps reading (tungstenite answers each ping with a pong as it reads) until told
    // to stop; then it proves it is still there with a round trip.
    let (mut b, w) = p.online(&tb, json!({}));
    assert_eq!(w["params"]["heartbeatMs"], json!(200));
    let bob_since = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut pings = 0;
        while !stop2.load(Ordering::SeqCst) {
            assert!(t0.elapsed() < WAIT, "bob's reader was never stopped");
            match b.ws.read() {
                Ok(Message::Ping(_)) => pings += 1,
                Ok(Message::Close(c)) => panic!("bob closed: {c:?}"),
                Ok(_) => {}
                Err(e) => panic!("bob read failed: {e}"),
            }
        }
        assert_quiet(&mut b, "alive");
        (b, pings)
    });

    // carol answers the welcome, then neither reads nor writes again.
    let mut c = RawWs::upgrade(&p, &tc);
    let welcome = c.read_json();
    assert_eq!(welcome["method"], "federation/welcome", "{welcome}");
    c.write_text(&json!({"jsonrpc": "2.0", "id": welcome["id"], "result": {}}).to_string());
    let answered = Instant::now();
    wait_state(&p, "carol", "offline", Duration::from_secs(4));
    let took = answered.elapsed();
    assert!(
        took >= Duration::from_millis(350),
        "dropped after {took:?}, before two silent intervals"
    );
    assert!(took < Duration::from_secs(3), "dropped only after {took:?}");

    // bob, who answers pings, has outlived several intervals.
    if let Some(rest) = Duration::from_millis(1200).checked_sub(bob_since.elapsed()) {
        std::thread::sleep(rest);
    }
    assert_eq!(entry(&p, "bob")["state"], "online");
    stop.store(true, Ordering::SeqCst);
    let (_b, pings) = reader.join().unwrap();
    assert!(pings >= 3, "only {pings} pings in over 1.2 s at 200 ms");
    drop(c);
}

// ---------------------------------------------------------------------------------------------
// Rate limit
// ---------------------------------------------------------------------------------------------

#[test]
fn rate_limit_refuses_requests_drops_notifications_and_closes_abusers() {
    let p = Proxy::start(&[("FEDMCP_RATE_LIMIT", "5/s,burst=5")]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut b, _) = p.online(&tb, json!({}));
    let (mut a, w) = connect_answer(&p, &ta, json!({}));
    assert_eq!(w["params"]["limits"]["ratePerSec"], json!(5), "{w}");
    assert_eq!(w["params"]["limits"]["burst"], json!(5), "{w}");
    sleep_ms(300); // a full bucket whatever the welcome answer cost

    let mut burst: Vec<Value> = (0..6)
        .map(|i| rpc(json!(i), "federation/servers", json!({})))
        .collect();
    // Over the limit as well: a notification, which must be dropped silently.
    burst.push(send_note("bob", json!({"dropped": true})));
    send_burst(&mut a, &burst);
    for i in 0..5 {
        let m = a.recv();
        assert_eq!(m["id"], json!(i), "{m}");
        assert!(m["result"]["servers"].is_array(), "request {i}: {m}");
    }
    let m = a.recv();
    assert_eq!(m["id"], json!(5), "{m}");
    assert_error(&m, -32029, "rate_limited");
    let retry = m["error"]["data"]["retryAfterMs"]
        .as_u64()
        .unwrap_or_else(|| panic!("retryAfterMs: {m}"));
    assert!(retry > 0, "{m}");

    sleep_ms(retry + 150);
    assert_quiet(&mut a, "after-wait"); // no answer to the dropped notification
    assert_quiet(&mut b, "bob-quiet"); // and it was not forwarded

    // A pipelined burst three times the burst size is answered entry by entry (5 results,
    // 10 refusals) and the session stays (contract v1.1 §4).
    sleep_ms(1100);
    let triple: Vec<Value> = (0..15)
        .map(|i| rpc(json!(format!("t{i}")), "federation/servers", json!({})))
        .collect();
    send_burst(&mut a, &triple);
    let (mut ok, mut refused) = (0, 0);
    for i in 0..15 {
        let m = a.recv();
        assert_eq!(m["id"], json!(format!("t{i}")), "answered in order: {m}");
        if m["error"]["code"] == -32029 {
            refused += 1;
        } else {
            ok += 1;
        }
    }
    assert_eq!((ok, refused), (5, 10));
    sleep_ms(1100);
    a.send(&rpc(json!("still"), "federation/servers", json!({})));
    assert!(a.recv_id(&json!("still"))["result"]["servers"].is_array());

    // A flood: more than 10 × burst (50) refusals with no accepted message between them
    // closes the session 1008; the 51st refusal is the close, not an answer.
    let flood: Vec<Value> = (0..90)
        .map(|i| rpc(json!(format!("f{i}")), "federation/servers", json!({})))
        .collect();
    send_burst(&mut a, &flood);
    let mut run = 0;
    let code = loop {
        match a.ws.read() {
            Ok(Message::Text(t)) => {
                let m: Value = serde_json::from_str(t.as_str()).unwrap();
                if m["error"]["code"] == -32029 {
                    assert_eq!(m["error"]["data"]["reason"], "rate_limited", "{m}");
                    run += 1;
                } else {
                    assert!(m["result"].is_object(), "{m}");
                    run = 0;
                }
            }
            Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("read failed before a close frame: {e}"),
        }
    };
    assert_eq!(code, Some(1008));
    assert_eq!(
        run, 50,
        "the session closes at the 51st refusal in a row (more than 10 × burst)"
    );
    wait_state(&p, "alice", "offline", WAIT);
}
