//! Cluster mode (docs/PROTOCOL.md §10) end to end: several real `fedmcp` processes joined through a
//! real `nats-server` with JetStream (one node, or a three-node JetStream cluster), with
//! servers on different proxies sending to each other (§4 answers and errors, §6 signatures),
//! order per sender and recipient, broadcast once to every online server of the cluster, one
//! presence and one registry (removals and revocations close sessions wherever they are, a
//! newer session on any proxy replaces the older with 4003), store-and-forward through
//! JetStream that survives `kill -9` of a proxy and the loss of one NATS node, the MCP facade's
//! `tools/call` to a member on another proxy, a proxy cut off from NATS and back, two
//! clusters on one NATS that never see each other; and, from the rest of §10, resources that
//! stay on their proxy (`on_other_node`), the servers of a killed proxy going offline, NATS
//! credentials that never reach a log, and the cluster variables' startup errors.
//!
//! Each test starts its own NATS and its own proxies, under a cluster name of its own. Every
//! wait is bounded; "within a second" in the contract is checked as within
//! [`WITHIN_A_SECOND`] (the second, plus what polling a loaded two-core machine over fresh
//! HTTP connections costs).
mod common;
#[path = "common/nats.rs"]
mod nats;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use nats::{Nats, free_port};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// "Within a second" (§10: presence, registry changes, removals and revocations on every
/// proxy), plus measurement slack: polls every 25 ms over a fresh connection each.
const WITHIN_A_SECOND: Duration = Duration::from_millis(1500);
/// How long a proxy may take to join NATS and catch up (`readyz` 200) after it starts.
const READY: Duration = Duration::from_secs(15);
/// A quiet window: long enough for a duplicate or a stray message to show up.
const QUIET: Duration = Duration::from_millis(700);

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// A cluster name of this test's own (§10: every subject, stream and bucket starts with it).
fn cluster_name() -> String {
    format!(
        "t{}",
        fedmcp::random::hex(&fedmcp::random::random_bytes::<6>())
    )
}

/// A state dir for one proxy; removed when the test ends.
struct StateDir(PathBuf);

impl StateDir {
    fn new(tag: &str) -> StateDir {
        StateDir(scratch_dir(&format!("state-{tag}")))
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("UTF-8 path")
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts a cluster proxy (`urls`, `cluster`, `node`, one replica unless `extra` says
/// otherwise; memory only unless `extra` names a state dir) and waits until `readyz` is 200.
fn start_proxy(urls: &str, cluster: &str, node: &str, extra: &[(&str, &str)]) -> Proxy {
    let mut env: Vec<(&str, &str)> = vec![
        ("FEDMCP_NATS_URL", urls),
        ("FEDMCP_CLUSTER", cluster),
        ("FEDMCP_NODE_ID", node),
        ("FEDMCP_NATS_REPLICAS", "1"),
    ];
    env.extend_from_slice(extra);
    let p = Proxy::start(&env);
    wait_ready(&p, READY);
    p
}

fn readyz(p: &Proxy) -> Resp {
    p.http("GET", "/readyz", None, None)
}

/// Waits until `GET /readyz` is 200; returns how long that took.
fn wait_ready(p: &Proxy, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let r = readyz(p);
        if r.status == 200 {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "readyz still {} {} after {within:?}; proxy stderr:\n{}",
            r.status,
            r.text(),
            tail(&p.stderr_text())
        );
        sleep_ms(50);
    }
}

/// The last lines of a log, for failure messages.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Waits until `GET /readyz` is `503 {"status":"degraded"}` (§10, cut off from NATS).
fn wait_degraded(p: &Proxy, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let r = readyz(p);
        if r.status == 503 {
            assert_eq!(r.json()["status"], "degraded", "{}", r.text());
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "readyz still {} {} after {within:?} without NATS",
            r.status,
            r.text()
        );
        sleep_ms(25);
    }
}

/// On a failing test, prints the end of every watched proxy's stderr and NATS node's log
/// (they are deleted with their owners, which are dropped after this guard).
struct LogsOnPanic(Vec<(String, PathBuf)>);

impl LogsOnPanic {
    fn nats(mut self, nats: &Nats) -> LogsOnPanic {
        for n in &nats.nodes {
            self.0
                .push((format!("NATS {}", n.name), n.log_path().to_path_buf()));
        }
        self
    }
}

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (who, path) in &self.0 {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                eprintln!(
                    "---- {who}, last lines of {}:\n{}",
                    path.display(),
                    tail(&text)
                );
            }
        }
    }
}

fn logs_on_panic(ps: &[&Proxy]) -> LogsOnPanic {
    LogsOnPanic(
        ps.iter()
            .map(|p| (format!("proxy {}", p.addr), p.stderr.clone()))
            .collect(),
    )
}

/// The sum of every sample of metric `name` (any labels) in `GET /metrics`, or None.
fn metric(p: &Proxy, name: &str) -> Option<f64> {
    let r = p.http("GET", "/metrics", None, None);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut found = None;
    for line in r.text().lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if key.split('{').next() == Some(name) {
            let v: f64 = value.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"));
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Polls metric `name` until it equals `want`.
fn wait_metric(p: &Proxy, name: &str, want: f64, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let got = metric(p, name);
        if got == Some(want) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{name} is {got:?}, not {want}, after {within:?}"
        );
        sleep_ms(50);
    }
}

/// Registers `id` through `p`: (its federation token, its raw signing key).
fn register(p: &Proxy, id: &str) -> (String, Vec<u8>) {
    let r = p.http(
        "POST",
        "/v1/servers",
        Some(&p.admin_token()),
        Some(&json!({"serverId": id}).to_string()),
    );
    assert!(
        r.status == 201 || r.status == 200,
        "register {id}: {} {}",
        r.status,
        r.text()
    );
    let v = r.json();
    let key = URL_SAFE_NO_PAD
        .decode(v["signingKey"].as_str().expect("signingKey"))
        .expect("signingKey is base64url");
    (v["token"].as_str().unwrap().to_string(), key)
}

/// `GET /v1/servers/{id}` with an admin token.
fn get_entry(p: &Proxy, id: &str) -> Resp {
    p.http(
        "GET",
        &format!("/v1/servers/{id}"),
        Some(&p.admin_token()),
        None,
    )
}

/// `GET /v1/servers` with an admin token: serverId -> entry.
fn list_servers(p: &Proxy) -> BTreeMap<String, Value> {
    let r = p.http("GET", "/v1/servers", Some(&p.admin_token()), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|e| (e["serverId"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

/// Polls `GET /v1/servers/{id}` on `p` until `pred` holds for its entry; returns the entry and
/// how long that took.
fn wait_entry(
    p: &Proxy,
    id: &str,
    what: &str,
    within: Duration,
    pred: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let t0 = Instant::now();
    loop {
        let r = get_entry(p, id);
        if r.status == 200 {
            let e = r.json();
            if pred(&e) {
                return (e, t0.elapsed());
            }
        }
        assert!(
            t0.elapsed() < within,
            "{id} is not {what} on {} within {within:?}: {} {}",
            p.addr,
            r.status,
            r.text()
        );
        sleep_ms(25);
    }
}

/// Waits until `p` shows `id` online with its session on `node`.
fn wait_online(p: &Proxy, id: &str, node: &str) -> Duration {
    wait_entry(p, id, &format!("online on {node}"), WITHIN_A_SECOND, |e| {
        e["state"] == "online" && e["node"] == node
    })
    .1
}

/// Opens a control session and answers the welcome (with `capabilities`); reads nothing else,
/// so deliveries that follow the welcome stay for the caller.
fn join(p: &Proxy, token: &str, capabilities: Value) -> Ws {
    let mut ws = p.ws_raw(token).expect("upgrade");
    let welcome = ws.recv();
    assert_eq!(welcome["method"], "federation/welcome", "{welcome}");
    ws.send(&json!({"jsonrpc": "2.0", "id": welcome["id"],
                    "result": {"capabilities": capabilities}}));
    ws
}

/// The next text message's raw text within `within`, or None (pings skipped). Panics on a
/// close or a broken socket.
fn next_text(ws: &mut Ws, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    let out = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break None;
        }
        ws.ws
            .get_mut()
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match ws.ws.read() {
            Ok(Message::Text(t)) => break Some(t.as_str().to_string()),
            Ok(Message::Close(c)) => panic!("closed while waiting for a message: {c:?}"),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => panic!("ws read failed: {e}"),
        }
    };
    ws.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    out
}

/// The next message as JSON within `within`, or None.
fn next_msg(ws: &mut Ws, within: Duration) -> Option<Value> {
    next_text(ws, within).map(|t| serde_json::from_str(&t).expect("text frame is JSON"))
}

/// Asserts that nothing arrives for `within`.
fn assert_quiet(ws: &mut Ws, within: Duration, who: &str) {
    if let Some(m) = next_msg(ws, within) {
        panic!("{who} expected nothing, got {m}");
    }
}

/// Reads until the close frame (bounded); returns its code and how long it took.
fn close_code_within(ws: &mut Ws, within: Duration) -> (Option<u16>, Duration) {
    let t0 = Instant::now();
    loop {
        let left = within.saturating_sub(t0.elapsed());
        assert!(!left.is_zero(), "no close within {within:?}");
        ws.ws.get_mut().set_read_timeout(Some(left)).unwrap();
        match ws.ws.read() {
            Ok(Message::Close(Some(f))) => return (Some(f.code.into()), t0.elapsed()),
            Ok(Message::Close(None)) => return (None, t0.elapsed()),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return (None, t0.elapsed()),
        }
    }
}

/// A JSON-RPC request.
fn rpc(id: Value, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// Sends a request and waits for its answer (other messages dropped).
fn call(ws: &mut Ws, id: &str, method: &str, params: Value) -> Value {
    ws.send(&rpc(json!(id), method, params));
    ws.recv_id(&json!(id))
}

/// `federation/send` as a request, answered.
fn send(ws: &mut Ws, id: &str, to: &str, message: Value) -> Value {
    call(
        ws,
        id,
        "federation/send",
        json!({"to": to, "message": message}),
    )
}

/// The ids in `federation/servers` as seen by the session `ws`.
fn fed_servers(ws: &mut Ws, tag: &str) -> BTreeSet<String> {
    let r = call(ws, tag, "federation/servers", json!({}));
    r["result"]["servers"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .map(|s| s["serverId"].as_str().unwrap().to_string())
        .collect()
}

/// A proxy error: `code`, a message, and `data.reason` (§4).
fn assert_error(m: &Value, code: i64, reason: &str) {
    assert!(m.get("result").is_none(), "expected an error, got {m}");
    assert_eq!(m["error"]["code"], json!(code), "{m}");
    assert_eq!(m["error"]["data"]["reason"], json!(reason), "{m}");
    assert!(m["error"]["message"].is_string(), "{m}");
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

/// The next `federation/deliver` (other messages are a failure) as JSON, checked against the
/// contract: `from`, a msgId, `sentAt` in ms, and `sig` = HMAC-SHA256(`key`, msgId \n from \n
/// the delivered message bytes) (§4, §6).
fn recv_deliver(ws: &mut Ws, within: Duration, key: &[u8], from: &str) -> Value {
    let text =
        next_text(ws, within).unwrap_or_else(|| panic!("no federation/deliver within {within:?}"));
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["method"], "federation/deliver", "{d}");
    let p = &d["params"];
    let msg_id = p["msgId"].as_str().unwrap_or_else(|| panic!("msgId: {d}"));
    assert!(!msg_id.is_empty(), "{d}");
    assert_eq!(p["from"], from, "{d}");
    let sent_at = p["sentAt"]
        .as_i64()
        .unwrap_or_else(|| panic!("sentAt: {d}"));
    assert!(
        (sent_at - now_secs() * 1000).abs() < 60_000,
        "sentAt is not ms since the epoch: {d}"
    );
    let raw = raw_message_of(&text);
    let want = jwt::hmac_b64(
        key,
        &[
            msg_id.as_bytes(),
            b"\n",
            from.as_bytes(),
            b"\n",
            raw.as_bytes(),
        ],
    );
    assert_eq!(p["sig"], json!(want), "sig of {text}");
    d
}

/// A token for `id` with a `jti`, signed with the cluster's shared secret.
fn token_with_jti(id: &str, token_type: TokenType, jti: &str) -> String {
    let now = now_secs();
    jwt::sign(
        SECRET.as_bytes(),
        &Claims {
            server_id: id.into(),
            token_type,
            iat: now,
            exp: now + 3600,
            nbf: None,
            jti: Some(jti.into()),
        },
    )
}

/// One request to `/mcp` at `addr` on a fresh connection (usable from another thread).
fn mcp_post(addr: SocketAddr, token: &str, session: Option<&str>, body: &Value) -> Resp {
    let body = body.to_string();
    let mut req = format!(
        "POST /mcp HTTP/1.1\r\nHost: test\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    if let Some(s) = session {
        req.push_str(&format!(
            "Mcp-Session-Id: {s}\r\nMCP-Protocol-Version: 2025-06-18\r\n"
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Resp::parse(&out).unwrap_or_else(|| panic!("unparseable: {:?}", String::from_utf8_lossy(&out)))
}

/// `tools/list` names (every page) over an MCP session at `addr`.
fn mcp_tool_names(addr: SocketAddr, token: &str, sid: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut cursor: Option<String> = None;
    for page in 0..100 {
        let mut params = json!({});
        if let Some(c) = &cursor {
            params["cursor"] = json!(c);
        }
        let r = mcp_post(
            addr,
            token,
            Some(sid),
            &rpc(json!(page), "tools/list", params),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        for t in v["result"]["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
        {
            names.insert(t["name"].as_str().unwrap().to_string());
        }
        match v["result"]["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return names,
        }
    }
    panic!("the cursors never end");
}

// ---------------------------------------------------------------------------------------------
// 1. Sends across two proxies: answers, errors, signatures
// ---------------------------------------------------------------------------------------------

#[test]
fn a_send_to_a_server_on_another_proxy_is_delivered_signed_and_answered() {
    let nats = Nats::single();
    let cluster = cluster_name();
    let state2 = StateDir::new("send-p2");
    // Different delivery timeouts: the sender's proxy's is the one that counts (§10).
    let p1 = start_proxy(
        &nats.url(0),
        &cluster,
        "n1",
        &[("FEDMCP_DELIVERY_TIMEOUT_MS", "1500")],
    );
    let p2 = start_proxy(
        &nats.url(0),
        &cluster,
        "n2",
        &[
            ("FEDMCP_DELIVERY_TIMEOUT_MS", "3000"),
            ("FEDMCP_STATE_DIR", state2.arg()),
        ],
    );
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);

    let (ta, _) = register(&p1, "alice");
    let (tb, kb) = register(&p1, "bob");
    register(&p2, "carol"); // registered, never online
    let mut a = join(&p1, &ta, json!({}));
    let mut b = join(&p2, &tb, json!({}));
    wait_online(&p1, "bob", "n2");
    wait_online(&p2, "alice", "n1");

    // A result: delivered, with the reply; the message arrives byte for byte, signed for bob.
    let message = r#"{"hello": [1, 2,3] ,"é":"\u00e9", "n":1.50}"#;
    a.send_text(&format!(
        r#"{{"jsonrpc":"2.0","id":"s1","method":"federation/send","params":{{"to":"bob","message":{message}}}}}"#
    ));
    let text = next_text(&mut b, WAIT).expect("a deliver on bob's session");
    assert_eq!(
        raw_message_of(&text),
        message,
        "not forwarded byte for byte"
    );
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["method"], "federation/deliver", "{d}");
    assert!(
        d.get("id").is_some(),
        "a request send is delivered as a request: {d}"
    );
    let msg_id = d["params"]["msgId"].as_str().unwrap().to_string();
    assert_eq!(d["params"]["from"], "alice", "{d}");
    let sig = jwt::hmac_b64(
        &kb,
        &[
            msg_id.as_bytes(),
            b"\n",
            b"alice",
            b"\n",
            message.as_bytes(),
        ],
    );
    assert_eq!(d["params"]["sig"], json!(sig), "{d}");
    b.answer(&d, json!({"ok": true, "list": [1, 2]}));
    let r = a.recv_id(&json!("s1"));
    assert_eq!(
        r["result"],
        json!({"msgId": msg_id, "status": "delivered", "reply": {"ok": true, "list": [1, 2]}}),
        "{r}"
    );

    // An error answer: rejected, with the recipient's error object.
    a.send(&rpc(
        json!("s2"),
        "federation/send",
        json!({"to": "bob", "message": {"n": 2}}),
    ));
    let d = recv_deliver(&mut b, WAIT, &kb, "alice");
    let err = json!({"code": 4711, "message": "not today", "data": {"why": "busy"}});
    b.send(&json!({"jsonrpc": "2.0", "id": d["id"], "error": err}));
    let r = a.recv_id(&json!("s2"));
    assert_eq!(r["result"]["status"], "rejected", "{r}");
    assert_eq!(r["result"]["error"], err, "{r}");
    assert_eq!(r["result"]["msgId"], d["params"]["msgId"], "{r}");

    // No answer: -32003 after the sender's proxy's delivery timeout (1.5 s, not p2's 3 s).
    let t0 = Instant::now();
    a.send(&rpc(
        json!("s3"),
        "federation/send",
        json!({"to": "bob", "message": {"n": 3}}),
    ));
    let late = recv_deliver(&mut b, WAIT, &kb, "alice");
    let r = a.recv_id(&json!("s3"));
    let took = t0.elapsed();
    assert_error(&r, -32003, "delivery_timeout");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(2800),
        "timeout after {took:?}; the sender's proxy has 1500 ms, the recipient's 3000 ms"
    );
    // A late answer is dropped; the next send is answered normally and nothing stray arrives.
    b.answer(&late, json!({"late": true}));
    a.send(&rpc(
        json!("s4"),
        "federation/send",
        json!({"to": "bob", "message": {"n": 4}}),
    ));
    let d = recv_deliver(&mut b, WAIT, &kb, "alice");
    b.answer(&d, json!({"n": 4}));
    let r = next_msg(&mut a, WAIT).expect("the answer to s4");
    assert_eq!(r["id"], "s4", "expected the answer to s4 first, got {r}");
    assert_eq!(r["result"]["status"], "delivered", "{r}");
    assert_eq!(r["result"]["reply"], json!({"n": 4}), "{r}");

    // A null result is a reply like any other.
    a.send(&rpc(
        json!("s4n"),
        "federation/send",
        json!({"to": "bob", "message": {"n": "null"}}),
    ));
    let d = recv_deliver(&mut b, WAIT, &kb, "alice");
    b.answer(&d, Value::Null);
    let r = a.recv_id(&json!("s4n"));
    assert_eq!(r["result"]["status"], "delivered", "a null result: {r}");
    assert_eq!(r["result"].get("reply"), Some(&Value::Null), "{r}");

    // A notification send is delivered as a notification; nothing comes back.
    a.send(&json!({"jsonrpc": "2.0", "method": "federation/send",
                   "params": {"to": "bob", "message": {"note": 1}}}));
    let d = recv_deliver(&mut b, WAIT, &kb, "alice");
    assert!(
        d.get("id").is_none(),
        "a notification send arrives as a notification: {d}"
    );
    assert_eq!(d["params"]["message"], json!({"note": 1}));

    // Registered but offline, no queue: -32002. Unknown: -32001.
    let r = send(&mut a, "s5", "carol", json!({"n": 5}));
    assert_error(&r, -32002, "server_offline");
    let r = send(&mut a, "s6", "nobody", json!({"n": 6}));
    assert_error(&r, -32001, "unknown_server");

    // The other direction works as well.
    b.send(&rpc(
        json!("r1"),
        "federation/send",
        json!({"to": "alice", "message": {"back": true}}),
    ));
    let d = next_msg(&mut a, WAIT).expect("a deliver on alice's session");
    assert_eq!(d["method"], "federation/deliver", "{d}");
    assert_eq!(d["params"]["from"], "bob", "{d}");
    a.answer(&d, json!("fine"));
    let r = b.recv_id(&json!("r1"));
    assert_eq!(r["result"]["status"], "delivered", "{r}");
    assert_eq!(r["result"]["reply"], "fine", "{r}");

    // And its timeout is p2's (3 s) for a sender on p2.
    let t0 = Instant::now();
    b.send(&rpc(
        json!("r2"),
        "federation/send",
        json!({"to": "alice", "message": {"unanswered": true}}),
    ));
    let late = next_msg(&mut a, WAIT).expect("a deliver on alice's session");
    assert_eq!(late["method"], "federation/deliver", "{late}");
    let r = b.recv_id(&json!("r2"));
    let took = t0.elapsed();
    assert_error(&r, -32003, "delivery_timeout");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
        "timeout after {took:?}; the sender's proxy has 3000 ms"
    );
    a.answer(&late, json!("too late"));

    assert_quiet(&mut b, Duration::from_millis(300), "bob");
    assert!(
        metric(&p1, "fedmcp_remote_messages_total").is_some(),
        "fedmcp_remote_messages_total missing from /metrics"
    );
    assert_eq!(metric(&p1, "fedmcp_nats_connected"), Some(1.0));
    wait_metric(&p1, "fedmcp_cluster_nodes", 2.0, Duration::from_secs(5));
    wait_metric(&p2, "fedmcp_cluster_nodes", 2.0, Duration::from_secs(5));
}

/// The HTTP data channel's `POST /v1/messages` routes across proxies too.
#[test]
fn post_v1_messages_reaches_a_server_on_another_proxy() {
    let nats = Nats::single();
    let cluster = cluster_name();
    let p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (ta, _) = register(&p1, "alice");
    let (tb, kb) = register(&p1, "bob");
    let mut b = join(&p2, &tb, json!({}));
    wait_online(&p1, "bob", "n2");

    let addr = p1.addr;
    let body = json!({"to": "bob", "message": {"via": "http"}}).to_string();
    let req = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {ta}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let h = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        Resp::parse(&out).expect("an HTTP answer")
    });
    let d = recv_deliver(&mut b, WAIT, &kb, "alice");
    assert_eq!(d["params"]["message"], json!({"via": "http"}));
    b.answer(&d, json!({"seen": true}));
    let r = h.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "delivered", "{v}");
    assert_eq!(v["reply"], json!({"seen": true}), "{v}");
}

// ---------------------------------------------------------------------------------------------
// 2. Order across proxies
// ---------------------------------------------------------------------------------------------

#[test]
fn a_thousand_pipelined_sends_arrive_in_order_on_another_proxy_and_are_all_answered() {
    const N: usize = 1000;
    let nats = Nats::single();
    let cluster = cluster_name();
    let p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (ta, _) = register(&p1, "alice");
    let (tb, _) = register(&p2, "bob");
    let mut a = join(&p1, &ta, json!({}));
    let mut b = join(&p2, &tb, json!({}));
    wait_online(&p1, "bob", "n2");
    // A round trip on alice's session: her welcome answer has been processed.
    fed_servers(&mut a, "sync");

    let receiver = std::thread::spawn(move || {
        let mut seen = Vec::with_capacity(N);
        for _ in 0..N {
            let d = b.recv();
            assert_eq!(d["method"], "federation/deliver", "{d}");
            assert_eq!(d["params"]["from"], "alice", "{d}");
            let n = d["params"]["message"]["n"].as_u64().expect("n");
            seen.push(n);
            b.answer(&d, json!({"n": n}));
        }
        (seen, b)
    });

    let t0 = Instant::now();
    for i in 1..=N {
        a.send_text(&format!(
            r#"{{"jsonrpc":"2.0","id":{i},"method":"federation/send","params":{{"to":"bob","message":{{"n":{i}}}}}}}"#
        ));
    }
    let mut answered = BTreeSet::new();
    while answered.len() < N {
        let r = a.recv();
        let id = r["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("unexpected message {r}")) as usize;
        assert_eq!(r["result"]["status"], "delivered", "{r}");
        assert_eq!(r["result"]["reply"], json!({"n": id}), "{r}");
        assert!(answered.insert(id), "answered twice: {r}");
    }
    let (seen, mut b) = receiver.join().expect("bob's thread");
    let want: Vec<u64> = (1..=N as u64).collect();
    if seen != want {
        let first = seen
            .iter()
            .zip(&want)
            .position(|(s, w)| s != w)
            .unwrap_or(seen.len());
        panic!(
            "out of order from position {first}: {:?}",
            &seen[first..(first + 10).min(seen.len())]
        );
    }
    eprintln!("{N} cross-proxy round trips in {:?}", t0.elapsed());
    assert_quiet(&mut b, Duration::from_millis(300), "bob");
}

// ---------------------------------------------------------------------------------------------
// 3. Broadcast once to every online server of the cluster
// ---------------------------------------------------------------------------------------------

#[test]
fn a_broadcast_reaches_every_other_online_server_of_the_cluster_exactly_once() {
    let nats = Nats::single();
    let cluster = cluster_name();
    let ps: Vec<Proxy> = (1..=3)
        .map(|i| start_proxy(&nats.url(0), &cluster, &format!("n{i}"), &[]))
        .collect();
    let _logs = logs_on_panic(&ps.iter().collect::<Vec<_>>()).nats(&nats);
    let mut sessions: Vec<(String, Vec<u8>, Ws, usize)> = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        for s in ["a", "b"] {
            let id = format!("s{}{s}", i + 1);
            let (t, k) = register(p, &id);
            let ws = join(p, &t, json!({}));
            sessions.push((id, k, ws, i));
        }
    }
    // Everyone is online everywhere.
    for p in &ps {
        for (id, _, _, at) in &sessions {
            wait_online(p, id, &format!("n{}", at + 1));
        }
    }

    for sender in [0usize, 5] {
        let (sid, _, ws, _) = &mut sessions[sender];
        let sid = sid.clone();
        let r = send(ws, "b1", "*", json!({"hello": "all", "from": sid}));
        assert_eq!(r["result"]["status"], "broadcast", "{r}");
        assert_eq!(r["result"]["recipients"], json!(5), "{r}");
        assert!(r["result"]["msgId"].is_string(), "{r}");
        for (i, (id, key, ws, _)) in sessions.iter_mut().enumerate() {
            if i == sender {
                continue;
            }
            let d = recv_deliver(ws, WAIT, key, &sid);
            assert!(
                d.get("id").is_none(),
                "{id}: a broadcast is a notification: {d}"
            );
            assert_eq!(d["params"]["message"], json!({"hello": "all", "from": sid}));
        }
        // Nobody, the sender included, gets a second copy.
        for (id, _, ws, _) in sessions.iter_mut() {
            assert_quiet(
                ws,
                if id == "s1a" {
                    QUIET
                } else {
                    Duration::from_millis(100)
                },
                id,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. One presence
// ---------------------------------------------------------------------------------------------

#[test]
fn presence_on_one_proxy_shows_on_the_other_within_a_second_and_goes_when_the_session_ends() {
    let nats = Nats::single();
    let cluster = cluster_name();
    let p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (ta, _) = register(&p1, "alice");
    let (tc, _) = register(&p2, "carol");
    let mut c = join(&p2, &tc, json!({}));
    wait_online(&p2, "carol", "n2");
    wait_metric(&p1, "fedmcp_cluster_nodes", 2.0, Duration::from_secs(5));
    wait_metric(&p2, "fedmcp_cluster_nodes", 2.0, Duration::from_secs(5));

    for round in 0..2 {
        let t0 = Instant::now();
        let caps = json!({"round": round});
        let mut a = join(&p1, &ta, caps.clone());
        // federation/servers on a session of the other proxy, and GET /v1/servers there.
        loop {
            if fed_servers(&mut c, "fs").contains("alice") {
                break;
            }
            assert!(
                t0.elapsed() < WITHIN_A_SECOND,
                "alice not in federation/servers on the other proxy within {WITHIN_A_SECOND:?}"
            );
            sleep_ms(25);
        }
        let r = call(&mut c, "fs2", "federation/servers", json!({}));
        let entry = r["result"]["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["serverId"] == "alice")
            .cloned()
            .unwrap();
        assert_eq!(entry["capabilities"], caps, "{r}");
        let took = wait_online(&p2, "alice", "n1");
        let all = list_servers(&p2);
        assert_eq!(all["alice"]["state"], "online", "{:?}", all["alice"]);
        assert_eq!(all["alice"]["node"], "n1", "{:?}", all["alice"]);
        assert_eq!(all["carol"]["node"], "n2", "{:?}", all["carol"]);
        eprintln!(
            "round {round}: alice online on the other proxy after {:?}",
            t0.elapsed().max(took)
        );

        // Round 0 closes cleanly; round 1 cuts the TCP connection.
        if round == 0 {
            a.ws.close(None).unwrap();
            let _ = close_code_within(&mut a, WAIT);
        } else {
            a.ws.get_mut().shutdown(std::net::Shutdown::Both).unwrap();
        }
        drop(a);
        let (e, took) = wait_entry(&p2, "alice", "offline", Duration::from_secs(3), |e| {
            e["state"] == "offline"
        });
        assert!(e["node"].is_null(), "an offline server's node is null: {e}");
        assert!(
            !fed_servers(&mut c, "fs3").contains("alice"),
            "alice still in federation/servers"
        );
        eprintln!("round {round}: alice offline on the other proxy after {took:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. One registry: registration, removal, revocation, signing keys
// ---------------------------------------------------------------------------------------------

#[test]
fn registrations_removals_and_revocations_hold_on_every_proxy_within_a_second() {
    let nats = Nats::single();
    let cluster = cluster_name();
    let p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);

    // Registration through p1 shows on p2.
    register(&p1, "newcomer");
    let (e, took) = wait_entry(&p2, "newcomer", "registered", WITHIN_A_SECOND, |_| true);
    assert_eq!(e["serverId"], "newcomer");
    assert_eq!(e["state"], "offline", "{e}");
    eprintln!("registration visible on the other proxy after {took:?}");

    // Removal through p1 closes the session on p2 with 4001.
    let (tv, _) = register(&p1, "victim");
    let mut v = join(&p2, &tv, json!({}));
    wait_online(&p1, "victim", "n2");
    let r = p1.http(
        "DELETE",
        "/v1/servers/victim",
        Some(&p1.admin_token()),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let (code, took) = close_code_within(&mut v, WAIT);
    assert_eq!(
        code,
        Some(4001),
        "the removed server's session on the other proxy"
    );
    assert!(took < WITHIN_A_SECOND, "closed after {took:?}");
    let t0 = Instant::now();
    loop {
        let r = get_entry(&p2, "victim");
        if r.status == 404 {
            assert_eq!(r.code(), "unknown_server", "{}", r.text());
            break;
        }
        assert!(
            t0.elapsed() < WITHIN_A_SECOND,
            "victim still on p2: {}",
            r.text()
        );
        sleep_ms(25);
    }
    // Its old token is refused on the other proxy too.
    let r = p2.http("POST", "/v1/token", Some(&tv), None);
    assert_eq!(
        r.status,
        401,
        "a removed server's token on p2: {}",
        r.text()
    );

    // Revocation through p1: the session on p2 opened with that jti closes 4001, the token is
    // refused there as `revoked`; another token of the same server still works.
    let (holder_token, _) = register(&p1, "holder");
    let jti = format!(
        "j-{}",
        fedmcp::random::hex(&fedmcp::random::random_bytes::<8>())
    );
    let tok = token_with_jti("holder", TokenType::Federation, &jti);
    let mut h = join(&p2, &tok, json!({}));
    wait_online(&p1, "holder", "n2");
    let r = p1.http(
        "DELETE",
        &format!("/v1/tokens/{jti}"),
        Some(&p1.admin_token()),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let (code, took) = close_code_within(&mut h, WAIT);
    assert_eq!(
        code,
        Some(4001),
        "the revoked token's session on the other proxy"
    );
    assert!(took < WITHIN_A_SECOND, "closed after {took:?}");
    let r = p2.http("POST", "/v1/token", Some(&tok), None);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.code(), "revoked", "{}", r.text());
    assert!(
        r.header("www-authenticate")
            .is_some_and(|h| h.contains("invalid_token")),
        "{:?}",
        r.headers
    );
    match p2.ws_raw(&tok) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a revoked token opened a session on the other proxy"),
    }
    let mut h2 = join(&p2, &holder_token, json!({}));
    fed_servers(&mut h2, "still-fine");

    // An admin token revoked on p1 is refused on p2.
    let ajti = format!(
        "a-{}",
        fedmcp::random::hex(&fedmcp::random::random_bytes::<8>())
    );
    let admin = token_with_jti("ops", TokenType::Admin, &ajti);
    assert_eq!(
        p2.http("GET", "/v1/servers", Some(&admin), None).status,
        200
    );
    let r = p1.http(
        "DELETE",
        &format!("/v1/tokens/{ajti}"),
        Some(&p1.admin_token()),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let t0 = Instant::now();
    loop {
        let r = p2.http("GET", "/v1/servers", Some(&admin), None);
        if r.status == 401 {
            assert_eq!(r.code(), "revoked", "{}", r.text());
            break;
        }
        assert!(
            t0.elapsed() < WITHIN_A_SECOND,
            "revoked admin token still works on p2"
        );
        sleep_ms(25);
    }
}

#[test]
fn a_signing_key_rotated_on_one_proxy_signs_deliveries_on_every_proxy() {
    let nats = Nats::single();
    let cluster = cluster_name();
    let p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (tr, k1) = register(&p1, "rcpt");
    let (ts1, _) = register(&p1, "near");
    let (ts2, _) = register(&p2, "far");
    let mut r = join(&p2, &tr, json!({}));
    let mut near = join(&p2, &ts1, json!({}));
    let mut far = join(&p1, &ts2, json!({}));
    wait_online(&p1, "rcpt", "n2");
    wait_online(&p2, "far", "n1");
    wait_online(&p2, "near", "n2");

    let rot = p1.http(
        "POST",
        "/v1/servers/rcpt/signing-key",
        Some(&p1.admin_token()),
        None,
    );
    assert_eq!(rot.status, 200, "{}", rot.text());
    let v = rot.json();
    assert_eq!(v["signingKeyEpoch"], json!(2), "{v}");
    let k2 = URL_SAFE_NO_PAD
        .decode(v["signingKey"].as_str().unwrap())
        .unwrap();
    assert_ne!(k1, k2);
    std::thread::sleep(WITHIN_A_SECOND);
    assert_eq!(
        get_entry(&p2, "rcpt").status,
        200,
        "the rotated server is still registered on p2"
    );

    // From the same proxy as the recipient, and from the other one: both signed with K2.
    for (ws, from) in [(&mut near, "near"), (&mut far, "far")] {
        ws.send(&rpc(
            json!("k"),
            "federation/send",
            json!({"to": "rcpt", "message": {"from": from}}),
        ));
        let d = recv_deliver(&mut r, WAIT, &k2, from);
        r.answer(&d, json!({"ok": 1}));
        let a = ws.recv_id(&json!("k"));
        assert_eq!(
            a["result"]["status"],
            "delivered",
            "{from} -> rcpt: {a}\np1:\n{}\np2:\n{}",
            tail(&p1.stderr_text()),
            tail(&p2.stderr_text())
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. A newer session on another proxy
// ---------------------------------------------------------------------------------------------

#[test]
fn a_newer_session_on_another_proxy_replaces_the_older_with_4003() {
    let nats = Nats::single();
    let cluster = cluster_name();
    let p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (ta, _) = register(&p1, "alice");
    let (tb, kb) = register(&p1, "bob");
    let mut a = join(&p1, &ta, json!({}));
    let mut b1 = join(&p1, &tb, json!({}));
    wait_online(&p1, "bob", "n1");
    wait_online(&p2, "bob", "n1");

    // bob connects to p2: his session on p1 is closed 4003.
    let mut b2 = join(&p2, &tb, json!({"session": 2}));
    let (code, took) = close_code_within(&mut b1, WAIT);
    assert_eq!(code, Some(4003), "the older session on p1");
    assert!(took < WITHIN_A_SECOND, "replaced after {took:?}");
    wait_online(&p1, "bob", "n2");
    // Sends from p1 now reach the session on p2.
    a.send(&rpc(
        json!("x1"),
        "federation/send",
        json!({"to": "bob", "message": {"n": 1}}),
    ));
    let d = recv_deliver(&mut b2, WAIT, &kb, "alice");
    b2.answer(&d, json!("from p2"));
    let r = a.recv_id(&json!("x1"));
    assert_eq!(r["result"]["reply"], "from p2", "{r}");

    // And back: a newer session on p1 replaces the one on p2.
    let mut b3 = join(&p1, &tb, json!({"session": 3}));
    let (code, took) = close_code_within(&mut b2, WAIT);
    assert_eq!(code, Some(4003), "the older session on p2");
    assert!(took < WITHIN_A_SECOND, "replaced after {took:?}");
    wait_online(&p2, "bob", "n1");
    a.send(&rpc(
        json!("x2"),
        "federation/send",
        json!({"to": "bob", "message": {"n": 2}}),
    ));
    let d = recv_deliver(&mut b3, WAIT, &kb, "alice");
    b3.answer(&d, json!("from p1"));
    let r = a.recv_id(&json!("x2"));
    assert_eq!(r["result"]["reply"], "from p1", "{r}");
    // The newest session stays.
    assert_quiet(&mut b3, QUIET, "bob's newest session");
}

// ---------------------------------------------------------------------------------------------
// 7. Store-and-forward across proxies
// ---------------------------------------------------------------------------------------------

/// Queues `n` messages `{"n": i}` (ids `q1..qn`) from `ws` to `to`; returns their msgIds.
fn queue_many(ws: &mut Ws, to: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 1..=n {
        let r = call(
            ws,
            &format!("q{i}"),
            "federation/send",
            json!({"to": to, "message": {"n": i}, "queue": true}),
        );
        assert_eq!(r["result"]["status"], "queued", "{r}");
        ids.push(r["result"]["msgId"].as_str().expect("msgId").to_string());
    }
    ids
}

/// Takes `n` queued deliveries on `ws` in order, checks them, answers each (the message with
/// `reject_n` with an error); returns their msgIds. The first may take `first_within`.
fn take_queued(
    ws: &mut Ws,
    n: usize,
    key: &[u8],
    from: &str,
    first_within: Duration,
    reject_n: Option<usize>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 1..=n {
        let d = recv_deliver(ws, if i == 1 { first_within } else { WAIT }, key, from);
        assert!(
            d.get("id").is_some(),
            "a queued request is delivered as a request: {d}"
        );
        assert_eq!(
            d["params"]["message"],
            json!({"n": i}),
            "delivery {i} out of order: {d}"
        );
        ids.push(d["params"]["msgId"].as_str().unwrap().to_string());
        if reject_n == Some(i) {
            ws.send(&json!({"jsonrpc": "2.0", "id": d["id"],
                            "error": {"code": 1, "message": "no thanks"}}));
        } else {
            ws.answer(&d, json!({"got": i}));
        }
    }
    ids
}

#[test]
fn queued_messages_are_delivered_in_order_by_the_proxy_the_recipient_joins_and_the_sender_hears() {
    const N: usize = 5;
    let nats = Nats::single();
    let cluster = cluster_name();
    let p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (ta, _) = register(&p1, "alice");
    let (tb, kb) = register(&p1, "bob");
    let mut a = join(&p1, &ta, json!({}));
    wait_entry(&p2, "bob", "registered", WITHIN_A_SECOND, |_| true);

    let sent = queue_many(&mut a, "bob", N);
    let mut b = join(&p2, &tb, json!({}));
    let got = take_queued(&mut b, N, &kb, "alice", WAIT, Some(3));
    assert_eq!(
        got, sent,
        "the msgIds delivered are those answered `queued`, in order"
    );

    // alice hears of each answer with federation/delivered.
    let mut heard = BTreeMap::new();
    while heard.len() < N {
        let m = next_msg(&mut a, WAIT).expect("a federation/delivered for alice");
        assert_eq!(m["method"], "federation/delivered", "{m}");
        assert!(m.get("id").is_none(), "a notification: {m}");
        let id = m["params"]["msgId"].as_str().unwrap().to_string();
        assert!(
            heard.insert(id, m["params"].clone()).is_none(),
            "twice: {m}"
        );
    }
    for (i, id) in sent.iter().enumerate() {
        let p = heard
            .get(id)
            .unwrap_or_else(|| panic!("no federation/delivered for {id}"));
        if i + 1 == 3 {
            assert_eq!(p["status"], "rejected", "{p}");
            assert_eq!(
                p["error"],
                json!({"code": 1, "message": "no thanks"}),
                "{p}"
            );
        } else {
            assert_eq!(p["status"], "delivered", "{p}");
            assert_eq!(p["reply"], json!({"got": i + 1}), "{p}");
        }
    }
    assert_quiet(&mut b, QUIET, "bob");
    assert_quiet(&mut a, Duration::from_millis(100), "alice");
}

#[test]
fn kill_9_of_the_proxy_that_queued_loses_no_message() {
    const N: usize = 10;
    let nats = Nats::single();
    let cluster = cluster_name();
    let state1 = StateDir::new("queue-p1");
    let mut p1 = start_proxy(
        &nats.url(0),
        &cluster,
        "n1",
        &[("FEDMCP_STATE_DIR", state1.arg())],
    );
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (ta, _) = register(&p1, "alice");
    let (tb, kb) = register(&p1, "bob");
    let mut a = join(&p1, &ta, json!({}));
    wait_entry(&p2, "bob", "registered", WITHIN_A_SECOND, |_| true);

    let sent = queue_many(&mut a, "bob", N);
    p1.child.kill().expect("SIGKILL");
    p1.child.wait().unwrap();
    drop(a);

    let mut b = join(&p2, &tb, json!({}));
    let got = take_queued(&mut b, N, &kb, "alice", WAIT, None);
    assert_eq!(got, sent);
    assert_quiet(&mut b, QUIET, "bob");

    // Answered messages are gone from the queue: a new session gets nothing again.
    b.ws.close(None).unwrap();
    let _ = close_code_within(&mut b, WAIT);
    drop(b);
    let mut b = join(&p2, &tb, json!({}));
    assert_quiet(&mut b, Duration::from_secs(1), "bob, reconnected");
}

// ---------------------------------------------------------------------------------------------
// 8. MCP tools/call across proxies
// ---------------------------------------------------------------------------------------------

#[test]
fn an_mcp_tools_call_on_one_proxy_reaches_the_member_on_another() {
    let nats = Nats::single();
    let cluster = cluster_name();
    let p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (tb, kb) = register(&p1, "bob");
    let (tm, _) = register(&p1, "mcpuser");
    let tool = json!({"name": "echo", "description": "echoes", "inputSchema": {"type": "object"}});
    let mut b = join(&p2, &tb, json!({"tools": [tool]}));
    wait_online(&p1, "bob", "n2");

    let init = mcp_post(
        p1.addr,
        &tm,
        None,
        &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}}),
    );
    assert_eq!(init.status, 200, "{}", init.text());
    let sid = init
        .header("mcp-session-id")
        .expect("Mcp-Session-Id")
        .to_string();
    let n = mcp_post(
        p1.addr,
        &tm,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    );
    assert_eq!(n.status, 202);

    let t0 = Instant::now();
    while !mcp_tool_names(p1.addr, &tm, &sid).contains("bob__echo") {
        assert!(
            t0.elapsed() < WITHIN_A_SECOND,
            "bob__echo not in tools/list on the other proxy"
        );
        sleep_ms(25);
    }

    // A result comes back unchanged.
    let (addr, tm2, sid2) = (p1.addr, tm.clone(), sid.clone());
    let h = std::thread::spawn(move || {
        mcp_post(
            addr,
            &tm2,
            Some(&sid2),
            &rpc(
                json!(7),
                "tools/call",
                json!({"name": "bob__echo", "arguments": {"text": "hi"}}),
            ),
        )
    });
    let d = recv_deliver(&mut b, WAIT, &kb, "mcpuser");
    assert!(d.get("id").is_some(), "{d}");
    assert_eq!(
        d["params"]["message"],
        json!({"method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}})
    );
    let result = json!({"content": [{"type": "text", "text": "hi"}], "isError": false});
    b.answer(&d, result.clone());
    let r = h.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["id"], 7, "{v}");
    assert_eq!(v["result"], result, "{v}");

    // An error becomes a JSON-RPC error with its code and message.
    let (addr, tm2, sid2) = (p1.addr, tm.clone(), sid.clone());
    let h = std::thread::spawn(move || {
        mcp_post(
            addr,
            &tm2,
            Some(&sid2),
            &rpc(json!(8), "tools/call", json!({"name": "bob__echo"})),
        )
    });
    let d = recv_deliver(&mut b, WAIT, &kb, "mcpuser");
    assert_eq!(
        d["params"]["message"],
        json!({"method": "tools/call", "params": {"name": "echo", "arguments": {}}})
    );
    b.send(&json!({"jsonrpc": "2.0", "id": d["id"],
                   "error": {"code": -32050, "message": "echo broke"}}));
    let v = h.join().unwrap().json();
    assert_eq!(v["error"]["code"], -32050, "{v}");
    assert_eq!(v["error"]["message"], "echo broke", "{v}");

    // bob leaves: his tool leaves the list on p1.
    b.ws.close(None).unwrap();
    let _ = close_code_within(&mut b, WAIT);
    let t0 = Instant::now();
    while mcp_tool_names(p1.addr, &tm, &sid).contains("bob__echo") {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "bob__echo still listed after bob left"
        );
        sleep_ms(25);
    }
}

// ---------------------------------------------------------------------------------------------
// 9. A three-node JetStream cluster with three replicas
// ---------------------------------------------------------------------------------------------

#[test]
fn with_three_nats_nodes_and_three_replicas_losing_one_node_loses_no_queued_message() {
    const N: usize = 20;
    let mut nats = Nats::cluster3();
    let cluster = cluster_name();
    let replicas = ("FEDMCP_NATS_REPLICAS", "3");
    let ps: Vec<Proxy> = (0..3)
        .map(|i| {
            start_proxy(
                &nats.urls_from(i),
                &cluster,
                &format!("n{}", i + 1),
                &[replicas],
            )
        })
        .collect();
    let _logs = logs_on_panic(&ps.iter().collect::<Vec<_>>()).nats(&nats);
    let (ta, _) = register(&ps[0], "alice");
    let (tb, kb) = register(&ps[0], "bob");
    let (tc, kc) = register(&ps[0], "carol");
    let mut a = join(&ps[0], &ta, json!({}));
    let mut b = join(&ps[2], &tb, json!({}));
    wait_online(&ps[0], "bob", "n3");

    // Cross-proxy send.
    a.send(&rpc(
        json!("x"),
        "federation/send",
        json!({"to": "bob", "message": {"x": 1}}),
    ));
    let d = recv_deliver(&mut b, WAIT, &kb, "alice");
    b.answer(&d, json!("ok"));
    let r = a.recv_id(&json!("x"));
    assert_eq!(r["result"]["status"], "delivered", "{r}");

    // N queued for carol, then one NATS node dies.
    wait_entry(&ps[1], "carol", "registered", WITHIN_A_SECOND, |_| true);
    let sent = queue_many(&mut a, "carol", N);
    nats.kill(0);
    let t0 = Instant::now();
    let took = wait_ready(&ps[1], Duration::from_secs(20));
    eprintln!("p2 ready {took:?} after NATS node 0 died");
    let mut c = join(&ps[1], &tc, json!({}));
    // Generous: after a NATS node dies, JetStream may take a while to elect the leaders the
    // recipient's consumer needs (seen: over 15 s under load); what is asserted is that
    // nothing acknowledged is lost, not how fast it comes back.
    let got = take_queued(&mut c, N, &kc, "alice", Duration::from_secs(60), None);
    assert_eq!(got, sent);
    eprintln!(
        "all {N} queued messages delivered {:?} after the node died",
        t0.elapsed()
    );
    assert_quiet(&mut c, QUIET, "carol");

    // The proxy whose first URL was the dead node reconnects to another; sends work again.
    let took = wait_ready(&ps[0], Duration::from_secs(20));
    eprintln!("p1 ready again {took:?} later");
    wait_online(&ps[0], "bob", "n3");
    a.send(&rpc(
        json!("again"),
        "federation/send",
        json!({"to": "bob", "message": {"again": true}}),
    ));
    let d = recv_deliver(&mut b, WAIT, &kb, "alice");
    b.answer(&d, json!("ok again"));
    let r = a.recv_id(&json!("again"));
    assert_eq!(r["result"]["reply"], "ok again", "{r}");
}

// ---------------------------------------------------------------------------------------------
// 10. NATS stopped and restarted under traffic
// ---------------------------------------------------------------------------------------------

#[test]
fn a_proxy_cut_off_from_nats_serves_its_own_sessions_and_rejoins_when_nats_returns() {
    let mut nats = Nats::single();
    let cluster = cluster_name();
    let p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (t1, _) = register(&p1, "local1");
    let (t2, _) = register(&p1, "local2");
    let (t3, _) = register(&p1, "local3");
    let (tb, kb) = register(&p1, "remote");
    let mut l1 = join(&p1, &t1, json!({}));
    let mut l2 = join(&p1, &t2, json!({}));
    let mut l3 = join(&p1, &t3, json!({}));
    let mut b = join(&p2, &tb, json!({}));
    wait_online(&p1, "local2", "n1");
    wait_online(&p1, "remote", "n2");
    fed_servers(&mut l1, "sync");

    // Local traffic between local1 and local2 on p1 all along, round trip after round trip.
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let traffic = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop2.load(Ordering::SeqCst) {
            n += 1;
            l1.send(&rpc(
                json!(n),
                "federation/send",
                json!({"to": "local2", "message": {"n": n}}),
            ));
            let d = l2.recv_method("federation/deliver");
            assert_eq!(d["params"]["message"], json!({"n": n}), "{d}");
            l2.answer(&d, json!({"n": n}));
            let r = l1.recv_id(&json!(n));
            assert_eq!(
                r["result"]["status"], "delivered",
                "local send {n} failed: {r}"
            );
            sleep_ms(10);
        }
        n
    });

    let cross = |l3: &mut Ws, b: &mut Ws, tag: &str| {
        l3.send(&rpc(
            json!(tag),
            "federation/send",
            json!({"to": "remote", "message": {"tag": tag}}),
        ));
        let d = recv_deliver(b, WAIT, &kb, "local3");
        b.answer(&d, json!(tag));
        let r = l3.recv_id(&json!(tag));
        assert_eq!(r["result"]["status"], "delivered", "{r}");
        assert_eq!(r["result"]["reply"], json!(tag), "{r}");
    };
    cross(&mut l3, &mut b, "before");

    nats.kill(0);
    let took1 = wait_degraded(&p1, Duration::from_secs(5));
    let took2 = wait_degraded(&p2, Duration::from_secs(5));
    eprintln!("degraded {took1:?} (p1) and {took2:?} (p2) after NATS died");
    assert_eq!(metric(&p1, "fedmcp_nats_connected"), Some(0.0));
    assert_eq!(metric(&p2, "fedmcp_nats_connected"), Some(0.0));
    // Registry changes cannot be acknowledged by JetStream: 503 cluster_unavailable.
    let r = p1.http(
        "POST",
        "/v1/servers",
        Some(&p1.admin_token()),
        Some(&json!({"serverId": "latecomer"}).to_string()),
    );
    assert_eq!(r.status, 503, "register without NATS: {}", r.text());
    assert_eq!(r.code(), "cluster_unavailable", "{}", r.text());
    let r = p2.http(
        "DELETE",
        "/v1/tokens/some-jti",
        Some(&p2.admin_token()),
        None,
    );
    assert_eq!(r.status, 503, "revoke without NATS: {}", r.text());
    assert_eq!(r.code(), "cluster_unavailable", "{}", r.text());
    // From either side, a server on the other proxy is out of reach: -32002 at once.
    let r = send(&mut b, "during", "local3", json!({"during": true}));
    assert_error(&r, -32002, "server_offline");
    // A server on the other proxy is out of reach: -32002 at once.
    let t1 = Instant::now();
    let r = send(&mut l3, "during", "remote", json!({"during": true}));
    assert_error(&r, -32002, "server_offline");
    assert!(
        t1.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        t1.elapsed()
    );
    // Local traffic goes on for a while with NATS gone.
    sleep_ms(1000);
    assert!(
        !traffic.is_finished(),
        "local traffic stopped while NATS was down"
    );

    nats.restart(0);
    let t0 = Instant::now();
    let took1 = wait_ready(&p1, Duration::from_secs(10));
    let took2 = wait_ready(&p2, Duration::from_secs(10).saturating_sub(t0.elapsed()));
    eprintln!(
        "ready again after NATS returned: p1 {took1:?}, p2 {:?}",
        t0.elapsed().max(took2)
    );
    assert_eq!(metric(&p1, "fedmcp_nats_connected"), Some(1.0));
    wait_online(&p1, "remote", "n2");
    cross(&mut l3, &mut b, "after");

    stop.store(true, Ordering::SeqCst);
    let n = traffic
        .join()
        .expect("local traffic failed while NATS was down");
    eprintln!("{n} local round trips through the outage");
}

// ---------------------------------------------------------------------------------------------
// 11. Two clusters on one NATS
// ---------------------------------------------------------------------------------------------

#[test]
fn two_clusters_on_one_nats_never_see_each_other() {
    let nats = Nats::single();
    let (cx, cy) = (cluster_name(), cluster_name());
    let px = start_proxy(&nats.url(0), &cx, "n1", &[]);
    let py = start_proxy(&nats.url(0), &cy, "n1", &[]);
    let _logs = logs_on_panic(&[&px, &py]).nats(&nats);
    let (tx, _) = register(&px, "xonly");
    let (ty, _) = register(&py, "yonly");
    let (tsx, ksx) = register(&px, "same");
    let (tsy, _) = register(&py, "same");
    let mut x = join(&px, &tx, json!({}));
    let mut y = join(&py, &ty, json!({}));
    let mut sx = join(&px, &tsx, json!({}));
    let mut sy = join(&py, &tsy, json!({}));
    wait_online(&px, "same", "n1");
    wait_online(&py, "same", "n1");
    // Time for anything that leaks to show.
    std::thread::sleep(WITHIN_A_SECOND);

    let xs = list_servers(&px);
    let ys = list_servers(&py);
    assert!(
        !xs.contains_key("yonly"),
        "cluster X lists Y's server: {xs:?}"
    );
    assert!(
        !ys.contains_key("xonly"),
        "cluster Y lists X's server: {ys:?}"
    );
    assert_eq!(get_entry(&px, "yonly").status, 404);
    assert_eq!(get_entry(&py, "xonly").status, 404);
    let fx = fed_servers(&mut x, "f");
    assert!(!fx.contains("yonly") && fx.contains("same"), "{fx:?}");
    let fy = fed_servers(&mut y, "f");
    assert!(!fy.contains("xonly") && fy.contains("same"), "{fy:?}");
    assert_eq!(metric(&px, "fedmcp_cluster_nodes"), Some(1.0));
    assert_eq!(metric(&py, "fedmcp_cluster_nodes"), Some(1.0));

    // "same" has a session in each cluster: neither replaced the other.
    fed_servers(&mut sx, "alive");
    fed_servers(&mut sy, "alive");
    // A send in X reaches X's "same" only; Y's server is unknown in X.
    let r = send(&mut x, "u", "yonly", json!({}));
    assert_error(&r, -32001, "unknown_server");
    x.send(&rpc(
        json!("s"),
        "federation/send",
        json!({"to": "same", "message": {"in": "x"}}),
    ));
    let d = recv_deliver(&mut sx, WAIT, &ksx, "xonly");
    sx.answer(&d, json!("x"));
    assert_eq!(x.recv_id(&json!("s"))["result"]["reply"], "x");
    // A broadcast in Y reaches Y's servers only.
    let r = send(&mut y, "b", "*", json!({"in": "y"}));
    assert_eq!(r["result"]["recipients"], json!(1), "{r}");
    let d = sy.recv_method("federation/deliver");
    assert_eq!(d["params"]["from"], "yonly");
    assert_quiet(&mut sx, QUIET, "X's same");
    assert_quiet(&mut x, Duration::from_millis(100), "xonly");
}

// ---------------------------------------------------------------------------------------------
// Beyond the list: resources, a killed proxy's servers, configuration
// ---------------------------------------------------------------------------------------------

/// §10 Resources: stored on one proxy, listed there with `"node"`, `404 on_other_node` on
/// another for a reader.
#[test]
fn a_resource_stays_on_its_proxy_and_another_proxy_names_the_node() {
    let nats = Nats::single();
    let cluster = cluster_name();
    let p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (ta, _) = register(&p1, "alice");
    let r = p1.http("PUT", "/v1/resources/notes.txt", Some(&ta), Some("hello"));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = p1.http("GET", "/v1/resources/alice/notes.txt", Some(&ta), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello");
    let r = p1.http("GET", "/v1/resources", Some(&ta), None);
    let listed = r.json()["resources"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["node"], "n1", "{listed:?}");

    let r = p2.http("GET", "/v1/resources/alice/notes.txt", Some(&ta), None);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.code(), "on_other_node", "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("n1"), "the message names the node: {msg}");
    let r = p2.http("GET", "/v1/resources", Some(&ta), None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["resources"],
        json!([]),
        "only local resources are listed"
    );
}

/// A proxy that dies without a word takes its sessions with it: its servers go offline in the
/// cluster (one presence: online while a session exists on some proxy) and it leaves the count
/// of live proxies. The contract gives no bound for noticing a dead proxy; 15 s is taken here.
#[test]
fn the_servers_of_a_killed_proxy_go_offline_in_the_cluster() {
    let nats = Nats::single();
    let cluster = cluster_name();
    let mut p1 = start_proxy(&nats.url(0), &cluster, "n1", &[]);
    let p2 = start_proxy(&nats.url(0), &cluster, "n2", &[]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    let (ta, _) = register(&p1, "alice");
    let (tb, _) = register(&p2, "bob");
    let _a = join(&p1, &ta, json!({}));
    let mut b = join(&p2, &tb, json!({}));
    wait_online(&p2, "alice", "n1");
    wait_metric(&p2, "fedmcp_cluster_nodes", 2.0, Duration::from_secs(5));

    p1.child.kill().expect("SIGKILL");
    p1.child.wait().unwrap();
    let (_, took) = wait_entry(&p2, "alice", "offline", Duration::from_secs(15), |e| {
        e["state"] == "offline"
    });
    eprintln!("alice offline {took:?} after her proxy died");
    wait_metric(&p2, "fedmcp_cluster_nodes", 1.0, Duration::from_secs(15));
    let r = send(&mut b, "x", "alice", json!({}));
    assert_error(&r, -32002, "server_offline");
}

/// §10: `user:password@` in a NATS URL works, and no NATS credential is ever logged, neither
/// the right one nor a wrong one.
#[test]
fn nats_credentials_in_the_url_work_and_never_reach_the_log() {
    let nats = Nats::single_with("authorization {\n  user: fedproxy\n  password: pw-Zq8sVx31\n}");
    let port = nats.nodes[0].port;
    let cluster = cluster_name();
    let good = format!("nats://fedproxy:pw-Zq8sVx31@127.0.0.1:{port}");
    let p1 = start_proxy(&good, &cluster, "n1", &[("RUST_LOG", "debug")]);
    let (ta, _) = register(&p1, "alice");
    let _a = join(&p1, &ta, json!({}));
    wait_online(&p1, "alice", "n1");

    let bad = format!("nats://fedproxy:wrong-Kx93@127.0.0.1:{port}");
    let p2 = Proxy::start(&[
        ("FEDMCP_NATS_URL", &bad),
        ("FEDMCP_CLUSTER", &cluster),
        ("FEDMCP_NODE_ID", "n2"),
        ("RUST_LOG", "debug"),
    ]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);
    for _ in 0..10 {
        assert_eq!(readyz(&p2).status, 503, "joined with a wrong password");
        sleep_ms(100);
    }
    for (p, secret) in [(&p1, "pw-Zq8sVx31"), (&p2, "wrong-Kx93")] {
        let log = p.stderr_text();
        assert!(!log.is_empty());
        assert!(
            !log.contains(secret),
            "a NATS password in the log:\n{}",
            log.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Runs the binary with `env` and expects exit code 2 before it listens, with the variable
/// named on stderr.
fn expect_config_error(env: &[(&str, &str)], var: &str) {
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FEDMCP_LISTEN", "127.0.0.1:0")
        .env("FEDMCP_JWT_SECRET", SECRET)
        .env("FEDMCP_STATE_DIR", "")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{env:?}: still running after {WAIT:?} (a bad value must end the process)");
        }
        sleep_ms(20);
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(2), "{env:?}: {status:?}, stderr: {err}");
    assert!(!out.contains("listening"), "{env:?}: listened: {out}");
    assert!(
        err.contains(var),
        "{env:?}: stderr does not name {var}: {err}"
    );
}

#[test]
fn bad_cluster_settings_end_the_process_and_an_unreachable_nats_does_not() {
    let url = "nats://127.0.0.1:4222";
    expect_config_error(
        &[("FEDMCP_NATS_URL", "http://127.0.0.1:4222")],
        "FEDMCP_NATS_URL",
    );
    expect_config_error(&[("FEDMCP_NATS_URL", "nats://")], "FEDMCP_NATS_URL");
    for bad in ["has space", "a.b", "x>"] {
        expect_config_error(
            &[("FEDMCP_NATS_URL", url), ("FEDMCP_NODE_ID", bad)],
            "FEDMCP_NODE_ID",
        );
    }
    for bad in ["0", "three", "-1"] {
        expect_config_error(
            &[("FEDMCP_NATS_URL", url), ("FEDMCP_NATS_REPLICAS", bad)],
            "FEDMCP_NATS_REPLICAS",
        );
    }
    for bad in ["has space", "a.b", "x*"] {
        expect_config_error(
            &[("FEDMCP_NATS_URL", url), ("FEDMCP_CLUSTER", bad)],
            "FEDMCP_CLUSTER",
        );
    }

    // Nothing listens on the port yet: the proxy listens anyway and is not ready.
    let port = free_port();
    let nats_url = format!("nats://127.0.0.1:{port}");
    let p = Proxy::start(&[
        ("FEDMCP_NATS_URL", &nats_url),
        ("FEDMCP_CLUSTER", &cluster_name()),
        ("FEDMCP_NODE_ID", "n1"),
    ]);
    assert_eq!(p.http("GET", "/healthz", None, None).status, 200);
    for _ in 0..5 {
        assert_eq!(readyz(&p).status, 503);
        sleep_ms(200);
    }
    assert_eq!(metric(&p, "fedmcp_nats_connected"), Some(0.0));
    // NATS comes up on that port: the proxy joins and reports ready.
    let _nats = Nats::single_on(port);
    let took = wait_ready(&p, Duration::from_secs(10));
    eprintln!("ready {took:?} after NATS came up");
    assert_eq!(metric(&p, "fedmcp_nats_connected"), Some(1.0));
}

// ---------------------------------------------------------------------------------------------
// NATS over TLS (§10: `tls://` is verified against FEDMCP_TRUSTED_CA_FILE or the bundled roots)
// ---------------------------------------------------------------------------------------------

/// A CA and a certificate it signed for 127.0.0.1, made with the `openssl` CLI: (CA, leaf
/// certificate, leaf key).
fn ca_and_leaf(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |n: &str| dir.join(n);
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("this test needs the openssl CLI: {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-days",
        "2",
        "-subj",
        "/CN=fedmcp test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
    ]);
    run(&ca);
    let mut req = vec!["req"];
    req.extend_from_slice(&ec);
    req.extend_from_slice(&[
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "leaf-key.pem",
        "-out",
        "leaf.csr",
    ]);
    run(&req);
    std::fs::write(
        p("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
        "-out",
        "leaf.pem",
    ]);
    (p("ca.pem"), p("leaf.pem"), p("leaf-key.pem"))
}

#[test]
fn a_tls_nats_url_is_verified_and_carries_the_cluster() {
    let dir = scratch_dir("nats-tls");
    let (ca_file, cert, key) = ca_and_leaf(&dir);
    let nats = Nats::single_with(&format!(
        "tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n}}\n"
    ));
    let url = nats.url(0).replacen("nats://", "tls://", 1);
    let cluster = cluster_name();
    let ca = ca_file.to_string_lossy().to_string();
    let p1 = start_proxy(&url, &cluster, "n1", &[("FEDMCP_TRUSTED_CA_FILE", &ca)]);
    let p2 = start_proxy(&url, &cluster, "n2", &[("FEDMCP_TRUSTED_CA_FILE", &ca)]);
    let _logs = logs_on_panic(&[&p1, &p2]).nats(&nats);

    let (ta, _) = register(&p1, "alice");
    let (tb, kb) = register(&p1, "bob");
    let mut a = join(&p1, &ta, json!({}));
    let mut b = join(&p2, &tb, json!({}));
    wait_online(&p1, "bob", "n2");
    a.send(&rpc(
        json!("t1"),
        "federation/send",
        json!({"to": "bob", "message": {"over": "tls"}}),
    ));
    let d = recv_deliver(&mut b, WAIT, &kb, "alice");
    b.answer(&d, json!({"ok": true}));
    let r = a.recv_id(&json!("t1"));
    assert_eq!(r["result"]["status"], "delivered", "{r}");

    // A proxy that does not trust the server's certificate never joins, and says why.
    let p3 = Proxy::start(&[
        ("FEDMCP_NATS_URL", url.as_str()),
        ("FEDMCP_CLUSTER", cluster.as_str()),
        ("FEDMCP_NODE_ID", "n3"),
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let r = readyz(&p3);
    assert_eq!(r.status, 503, "{}", r.text());
    let log = p3.stderr_text();
    assert!(
        log.contains("certificate") || log.contains("TLS"),
        "no TLS error logged:\n{}",
        tail(&log)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
