//! Durability (docs/PROTOCOL.md §4 queue, `federation/delivered`, `ttlMs`; §7 durability and order)
//! against the real binary with a state dir that outlives one process: what was acknowledged
//! (`queued`, `201`/`200`, `204`) survives `kill -9`; a torn or corrupt log tail costs only
//! the records from the damage on; a failed write acknowledges nothing; group commit keeps
//! queued sends fast.
//!
//! Every wait is bounded: harness reads time out after `WAIT`, polling loops carry their own
//! deadline. A crash is `SIGKILL` (`Child::kill`) followed by `wait`, so the old process is
//! gone before a new one opens the same state dir.
mod common;

use common::*;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A state dir shared by the processes of one test; removed when the test ends.
struct StateDir(PathBuf);

impl StateDir {
    fn new(tag: &str) -> StateDir {
        StateDir(scratch_dir(&format!("state-{tag}")))
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("state dir path is UTF-8")
    }

    fn log(&self) -> PathBuf {
        self.0.join("state.log")
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// No rate limit in the way of pipelined sends.
const FAST: (&str, &str) = ("FEDMCP_RATE_LIMIT", "1000000/s,burst=1000000");

/// Starts the proxy on `dir` (plus `extra` environment).
fn start_on(dir: &StateDir, extra: &[(&str, &str)]) -> Proxy {
    let mut env = vec![("FEDMCP_STATE_DIR", dir.arg()), FAST];
    env.extend_from_slice(extra);
    Proxy::start(&env)
}

/// `kill -9` and reap: the process is gone when this returns.
fn crash(p: &mut Proxy) {
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();
}

fn tail(s: &str) -> &str {
    let n = s.len().saturating_sub(4000);
    let n = (n..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(n);
    &s[n..]
}

fn rpc(id: Value, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// A `federation/send` request with `queue: true`.
fn queue_req(id: &str, to: &str, message: Value) -> Value {
    rpc(
        json!(id),
        "federation/send",
        json!({"to": to, "message": message, "queue": true}),
    )
}

/// Opens a session and answers the welcome with no round trip afterwards, so that queued
/// deliveries arriving right after the answer are not skipped.
fn connect_answer(p: &Proxy, token: &str) -> Ws {
    let mut ws = p.ws_raw(token).expect("upgrade");
    let w = ws.recv();
    assert_eq!(w["method"], "federation/welcome", "{w}");
    ws.send(&json!({"jsonrpc": "2.0", "id": w["id"], "result": {}}));
    ws
}

/// Sends a fresh request and asserts that the very next message is its answer: nothing else
/// was on its way to this session (one session's messages are handled in order).
fn assert_quiet(ws: &mut Ws, tag: &str) {
    ws.send(&rpc(json!(tag), "federation/servers", json!({})));
    let m = ws.recv();
    assert_eq!(
        m["id"],
        json!(tag),
        "expected nothing but the answer to {tag}, got {m}"
    );
    assert!(m["result"]["servers"].is_array(), "{m}");
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

/// Pipelines `n` `queue: true` sends from `ws` to `to`, at most `window` unanswered; every
/// answer must be `queued`. Returns the msgIds in send order.
fn queue_many(
    ws: &mut Ws,
    to: &str,
    n: usize,
    window: usize,
    message: impl Fn(usize) -> Value,
) -> Vec<String> {
    let mut ids: Vec<Option<String>> = vec![None; n];
    let (mut sent, mut answered) = (0, 0);
    let t0 = Instant::now();
    while answered < n {
        let mut wrote = false;
        while sent < n && sent - answered < window {
            let req = queue_req(&format!("q{sent}"), to, message(sent));
            ws.ws
                .write(Message::text(req.to_string()))
                .expect("ws write");
            sent += 1;
            wrote = true;
        }
        if wrote {
            ws.ws.flush().expect("ws flush");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "queue_many: {answered} of {n} answered in 60 s"
        );
        let m = ws.recv();
        if m.get("method").is_some() {
            continue; // a notification (federation/delivered)
        }
        let i: usize = m["id"]
            .as_str()
            .and_then(|s| s.strip_prefix('q'))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unexpected message {m}"));
        assert_eq!(m["result"]["status"], "queued", "send {i}: {m}");
        let id = m["result"]["msgId"].as_str().expect("msgId").to_string();
        assert!(ids[i].replace(id).is_none(), "send {i} answered twice");
        answered += 1;
    }
    ids.into_iter().map(Option::unwrap).collect()
}

/// Reads `n` `federation/deliver` requests (nothing else may come in between); answers each
/// with `{"ok": msgId}` when `answer` is set.
fn take_deliveries(ws: &mut Ws, n: usize, answer: bool) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = ws.recv();
        assert_eq!(
            d["method"],
            "federation/deliver",
            "after {} deliveries: {d}",
            out.len()
        );
        assert!(
            d.get("id").is_some(),
            "a queued request came as a notification: {d}"
        );
        if answer {
            ws.answer(&d, json!({"ok": d["params"]["msgId"]}));
        }
        out.push(d);
    }
    out
}

fn msg_ids(ds: &[Value]) -> Vec<String> {
    ds.iter()
        .map(|d| d["params"]["msgId"].as_str().expect("msgId").to_string())
        .collect()
}

/// Reads `n` `federation/delivered` notifications (other messages skipped).
fn take_delivered(ws: &mut Ws, n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| {
            let m = ws.recv_method("federation/delivered");
            assert!(m.get("id").is_none(), "delivered is a notification: {m}");
            m["params"].clone()
        })
        .collect()
}

/// A metric's value (the first sample whose name, labels included, starts with `name`).
fn metric(p: &Proxy, name: &str) -> f64 {
    let r = p.http("GET", "/metrics", None, None);
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// The byte ranges `(start, end)` of the records of a state log (framing only).
fn record_spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let end = at + 8 + len;
        assert!(end <= bytes.len(), "state.log has a cut record at {at}");
        spans.push((at, end));
        at = end;
    }
    assert_eq!(at, bytes.len(), "state.log has trailing bytes");
    spans
}

/// The payload of the record at `span`, as JSON.
fn record_json(bytes: &[u8], (start, end): (usize, usize)) -> Value {
    serde_json::from_slice(&bytes[start + 8..end]).expect("record payload is JSON")
}

const TORN_WARNING: &str = "keeping the records before it and dropping the rest";

// ---------------------------------------------------------------------------------------------
// 1. Crash with queued messages
// ---------------------------------------------------------------------------------------------

#[test]
fn queued_messages_survive_kill_9_and_are_delivered_in_order_with_their_msg_ids() {
    const N: usize = 200;
    let dir = StateDir::new("crash");
    let mut p = start_on(&dir, &[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let ids = queue_many(
        &mut a,
        "bob",
        N,
        32,
        |i| json!({"n": i, "text": format!("m{i}")}),
    );
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), N, "msgIds are not unique");
    crash(&mut p);
    drop(a);

    let p = start_on(&dir, &[]);
    assert_eq!(
        entry(&p, "bob")["queued"],
        json!(N),
        "queue length after restart"
    );
    let (mut a, _) = p.online(&ta, json!({}));
    let mut b = connect_answer(&p, &tb);
    let ds = take_deliveries(&mut b, N, true);
    for (i, d) in ds.iter().enumerate() {
        assert_eq!(
            d["params"]["msgId"],
            json!(ids[i]),
            "delivery {i} out of order: {d}"
        );
        assert_eq!(d["params"]["from"], "alice", "{d}");
        assert_eq!(
            d["params"]["message"],
            json!({"n": i, "text": format!("m{i}")}),
            "{d}"
        );
    }
    let notes = take_delivered(&mut a, N);
    for (i, n) in notes.iter().enumerate() {
        assert_eq!(
            n,
            &json!({"msgId": ids[i], "status": "delivered", "reply": {"ok": ids[i]}}),
            "delivered notification {i}"
        );
    }
    assert_quiet(&mut b, "b-done");
    assert_eq!(entry(&p, "bob")["queued"], json!(0));
}

// ---------------------------------------------------------------------------------------------
// 2. Delivered but not answered before the crash
// ---------------------------------------------------------------------------------------------

#[test]
fn a_delivered_but_unanswered_message_is_delivered_again_after_a_crash_and_an_answered_one_is_not()
{
    const N: usize = 10;
    const ANSWERED: usize = 4;
    let dir = StateDir::new("redeliver");
    let mut p = start_on(&dir, &[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let ids = queue_many(&mut a, "bob", N, N, |i| json!({"n": i}));

    let mut b = connect_answer(&p, &tb);
    let first = take_deliveries(&mut b, N, false);
    assert_eq!(msg_ids(&first), ids, "first delivery order");
    for d in &first[..ANSWERED] {
        b.answer(d, json!({"ok": d["params"]["msgId"]}));
    }
    // The sender's notification goes out after the turn's fsync, so once it is here the
    // answer is on disk.
    let notes = take_delivered(&mut a, ANSWERED);
    for (i, n) in notes.iter().enumerate() {
        assert_eq!(n["msgId"], json!(ids[i]), "{n}");
        assert_eq!(n["status"], "delivered", "{n}");
    }
    crash(&mut p);
    drop((a, b));

    let p = start_on(&dir, &[]);
    assert_eq!(entry(&p, "bob")["queued"], json!(N - ANSWERED));
    let (mut a, _) = p.online(&ta, json!({}));
    let mut b = connect_answer(&p, &tb);
    let again = take_deliveries(&mut b, N - ANSWERED, true);
    assert_eq!(
        msg_ids(&again),
        ids[ANSWERED..],
        "after the crash: exactly the unanswered ones, same msgIds, in order"
    );
    for (d, orig) in again.iter().zip(&first[ANSWERED..]) {
        assert_eq!(d["params"]["message"], orig["params"]["message"], "{d}");
        assert_eq!(
            d["params"]["sentAt"], orig["params"]["sentAt"],
            "sentAt kept: {d}"
        );
        assert_eq!(d["params"]["sig"], orig["params"]["sig"], "{d}");
    }
    assert_quiet(&mut b, "no-more");
    let notes = take_delivered(&mut a, N - ANSWERED);
    for (i, n) in notes.iter().enumerate() {
        assert_eq!(n["msgId"], json!(ids[ANSWERED + i]), "{n}");
        assert_eq!(n["status"], "delivered", "{n}");
    }
    assert_eq!(entry(&p, "bob")["queued"], json!(0));
}

// ---------------------------------------------------------------------------------------------
// 3. Registrations and removals
// ---------------------------------------------------------------------------------------------

fn register_with(p: &Proxy, body: &Value) -> (u16, Value) {
    let r = p.http(
        "POST",
        "/v1/servers",
        Some(&p.admin_token()),
        Some(&body.to_string()),
    );
    (r.status, r.json())
}

#[test]
fn registrations_and_removals_survive_kill_9() {
    let dir = StateDir::new("registry");
    let mut p = start_on(&dir, &[]);
    let v1 = json!({"serverId": "svc", "endpoints": {"data": "https://svc.example.net/v1"},
                    "capabilities": {"tools": [{"name": "old"}]}});
    let v2 = json!({"serverId": "svc", "endpoints": {"data": "https://svc.example.net/v2"},
                    "capabilities": {"tools": [{"name": "search", "inputSchema": {"type": "object"}}],
                                     "region": "eu", "n": 1.5}});
    let (st, body) = register_with(&p, &v1);
    assert_eq!(st, 201, "{body}");
    let (st, body) = register_with(&p, &v2);
    assert_eq!(st, 200, "an update is 200: {body}");
    let old_gone = p.register("gone");
    let r = p.http("POST", "/v1/token", Some(&old_gone), None);
    assert_eq!(
        r.status,
        200,
        "the token works before the removal: {}",
        r.text()
    );
    let r = p.http("DELETE", "/v1/servers/gone", Some(&p.admin_token()), None);
    assert_eq!(r.status, 204, "{}", r.text());
    crash(&mut p);

    let mut p = start_on(&dir, &[]);
    let e = entry(&p, "svc");
    assert_eq!(e["endpoints"], v2["endpoints"], "{e}");
    assert_eq!(e["capabilities"], v2["capabilities"], "{e}");
    let r = p.http("GET", "/v1/servers/gone", Some(&p.admin_token()), None);
    assert_eq!(r.status, 404, "the removed server is back: {}", r.text());
    assert_eq!(r.code(), "unknown_server");
    let r = p.http("POST", "/v1/token", Some(&old_gone), None);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.code(), "revoked");
    match p.ws_raw(&old_gone) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
        Err(e) => panic!("expected a 401 refusal, got {e}"),
        Ok(_) => panic!("a revoked token opened a control session after the restart"),
    }

    // Re-registration after the restart: a fresh token that works, also after another crash.
    let new_gone = p.register("gone");
    let r = p.http("POST", "/v1/token", Some(&new_gone), None);
    assert_eq!(r.status, 200, "the new token is refused: {}", r.text());
    let (ws, _) = p.online(&new_gone, json!({}));
    drop(ws);
    crash(&mut p);

    let p = start_on(&dir, &[]);
    let r = p.http("POST", "/v1/token", Some(&new_gone), None);
    assert_eq!(r.status, 200, "second restart, new token: {}", r.text());
    let r = p.http("POST", "/v1/token", Some(&old_gone), None);
    assert_eq!(r.status, 401, "second restart, old token: {}", r.text());
    assert_eq!(r.code(), "revoked");
    let (mut g, _) = p.online(&new_gone, json!({}));
    assert_quiet(&mut g, "gone-online");
    assert_eq!(entry(&p, "svc")["capabilities"], v2["capabilities"]);
}

// ---------------------------------------------------------------------------------------------
// 4. Torn and corrupt log tails
// ---------------------------------------------------------------------------------------------

/// Queues `n` messages to bob on a fresh state dir and crashes; returns the tokens and msgIds.
fn queue_then_crash(dir: &StateDir, n: usize) -> (String, String, Vec<String>) {
    let mut p = start_on(dir, &[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let ids = queue_many(&mut a, "bob", n, 4, |i| json!({"n": i}));
    crash(&mut p);
    (ta, tb, ids)
}

/// The spans of the log's `enqueue` records, checked against `ids` (in order).
fn enqueue_spans(bytes: &[u8], ids: &[String]) -> Vec<(usize, usize)> {
    let spans: Vec<(usize, usize)> = record_spans(bytes)
        .into_iter()
        .filter(|&s| record_json(bytes, s).get("enqueue").is_some())
        .collect();
    let logged: Vec<String> = spans
        .iter()
        .map(|&s| {
            record_json(bytes, s)["enqueue"]["msgId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(logged, ids, "the log's enqueue records");
    spans
}

#[test]
fn a_torn_tail_is_cut_off_and_every_record_before_it_is_kept() {
    const N: usize = 12;
    let dir = StateDir::new("torn");
    let (ta, tb, ids) = queue_then_crash(&dir, N);
    let bytes = std::fs::read(dir.log()).unwrap();
    let spans = enqueue_spans(&bytes, &ids);
    assert_eq!(
        spans.last().unwrap().1,
        bytes.len(),
        "the last record is the last enqueue"
    );
    // Cut the last record mid-way.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.log())
        .unwrap();
    f.set_len(bytes.len() as u64 - 5).unwrap();
    drop(f);

    let mut p = start_on(&dir, &[]);
    let log = p.stderr_text();
    assert!(
        log.contains(TORN_WARNING),
        "no torn-tail warning:\n{}",
        tail(&log)
    );
    assert_eq!(
        std::fs::metadata(dir.log()).unwrap().len() as usize,
        spans[N - 1].0,
        "the log is cut back to the intact prefix"
    );
    // A new message after the cut: its record must follow the intact prefix.
    let (mut a, _) = p.online(&ta, json!({}));
    let extra = queue_many(&mut a, "bob", 1, 1, |_| json!({"n": "after"}));
    crash(&mut p);
    drop(a);

    let p = start_on(&dir, &[]);
    let log = p.stderr_text();
    assert!(
        !log.contains(TORN_WARNING),
        "the log is torn again after the repair:\n{}",
        tail(&log)
    );
    let mut b = connect_answer(&p, &tb);
    let ds = take_deliveries(&mut b, N, true);
    let mut want = ids[..N - 1].to_vec();
    want.extend(extra);
    assert_eq!(msg_ids(&ds), want, "N-1 before the cut, then the new one");
    for (i, d) in ds[..N - 1].iter().enumerate() {
        assert_eq!(d["params"]["message"], json!({"n": i}), "{d}");
    }
    assert_quiet(&mut b, "no-more");
}

#[test]
fn a_flipped_byte_in_a_record_keeps_the_records_before_it() {
    const N: usize = 12;
    const CORRUPT: usize = 7; // the eighth enqueue record
    let dir = StateDir::new("flip");
    let (_, tb, ids) = queue_then_crash(&dir, N);
    let mut bytes = std::fs::read(dir.log()).unwrap();
    let spans = enqueue_spans(&bytes, &ids);
    let (start, end) = spans[CORRUPT];
    let mid = start + 8 + (end - start - 8) / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(dir.log(), &bytes).unwrap();

    let p = start_on(&dir, &[]);
    let log = p.stderr_text();
    assert!(
        log.contains(TORN_WARNING),
        "no corruption warning:\n{}",
        tail(&log)
    );
    assert!(
        log.contains("checksum"),
        "the warning does not name the checksum:\n{}",
        tail(&log)
    );
    assert_eq!(entry(&p, "bob")["queued"], json!(CORRUPT));
    let mut b = connect_answer(&p, &tb);
    let ds = take_deliveries(&mut b, CORRUPT, true);
    assert_eq!(
        msg_ids(&ds),
        ids[..CORRUPT],
        "the records before the damage"
    );
    assert_quiet(&mut b, "no-more");
}

// ---------------------------------------------------------------------------------------------
// 5. TTL across a restart
// ---------------------------------------------------------------------------------------------

#[test]
fn a_ttl_that_runs_out_while_the_proxy_is_down_is_not_delivered_after_the_restart() {
    let dir = StateDir::new("ttl-down");
    let mut p = start_on(&dir, &[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));

    // A: expires while the proxy runs and the sender is online.
    let t0 = Instant::now();
    a.send(&rpc(
        json!("A"),
        "federation/send",
        json!({"to": "bob", "message": {"m": "A"}, "queue": true, "ttlMs": 300}),
    ));
    let r = a.recv_id(&json!("A"));
    assert_eq!(r["result"]["status"], "queued", "{r}");
    let id_a = r["result"]["msgId"].clone();
    let m = a.recv_method("federation/delivered");
    assert!(
        t0.elapsed() >= Duration::from_millis(295),
        "expired before its ttlMs"
    );
    assert_eq!(
        m["params"],
        json!({"msgId": id_a, "status": "expired"}),
        "{m}"
    );

    // B: expires while the proxy is down; C: no TTL (proves the recipient gets deliveries).
    let t1 = Instant::now();
    a.send(&rpc(
        json!("B"),
        "federation/send",
        json!({"to": "bob", "message": {"m": "B"}, "queue": true, "ttlMs": 300}),
    ));
    let r = a.recv_id(&json!("B"));
    assert_eq!(r["result"]["status"], "queued", "{r}");
    let id_b = r["result"]["msgId"].clone();
    let id_c = queue_many(&mut a, "bob", 1, 1, |_| json!({"m": "C"})).remove(0);
    crash(&mut p);
    drop(a);
    let wait = Duration::from_millis(500).saturating_sub(t1.elapsed());
    std::thread::sleep(wait);

    let p = start_on(&dir, &[]);
    let (mut a, _) = p.online(&ta, json!({}));
    let mut b = connect_answer(&p, &tb);
    let ds = take_deliveries(&mut b, 1, true);
    assert_eq!(
        msg_ids(&ds),
        vec![id_c.clone()],
        "only C is delivered (A expired before, B while down; neither is {id_a} / {id_b})"
    );
    assert_quiet(&mut b, "no-more");
    let m = a.recv_method("federation/delivered");
    assert_eq!(m["params"]["msgId"], json!(id_c), "{m}");
    assert_eq!(m["params"]["status"], "delivered", "{m}");
    assert_eq!(entry(&p, "bob")["queued"], json!(0));
}

#[test]
fn a_ttl_counts_from_the_original_send_across_a_restart_and_the_online_sender_hears_expired() {
    // ttlMs 1200; crash at once; restart 600 ms after the send. The copy must expire at about
    // send + 1200 ms (not restart + 1200, not never), and the sender, online again by then,
    // gets `expired`.
    const TTL: u64 = 1200;
    let dir = StateDir::new("ttl-up");
    let mut p = start_on(&dir, &[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let t0 = Instant::now();
    a.send(&rpc(
        json!("T"),
        "federation/send",
        json!({"to": "bob", "message": {"m": "T"}, "queue": true, "ttlMs": TTL}),
    ));
    let r = a.recv_id(&json!("T"));
    assert_eq!(r["result"]["status"], "queued", "{r}");
    let id = r["result"]["msgId"].clone();
    crash(&mut p);
    drop(a);
    std::thread::sleep(Duration::from_millis(600).saturating_sub(t0.elapsed()));

    let p = start_on(&dir, &[]);
    let restarted = t0.elapsed();
    let (mut a, _) = p.online(&ta, json!({}));
    let m = a.recv_method("federation/delivered");
    let at = t0.elapsed();
    assert_eq!(
        m["params"],
        json!({"msgId": id, "status": "expired"}),
        "{m}"
    );
    assert!(
        at >= Duration::from_millis(TTL - 20),
        "expired {at:?} after the send, before its ttlMs"
    );
    assert!(
        at < restarted + Duration::from_millis(TTL),
        "expired {at:?} after the send: the TTL restarted with the process (restart at {restarted:?})"
    );
    let mut b = connect_answer(&p, &tb);
    assert_quiet(&mut b, "nothing-delivered");
    assert_eq!(entry(&p, "bob")["queued"], json!(0));
}

// ---------------------------------------------------------------------------------------------
// 6. Disk full (a file-size limit)
// ---------------------------------------------------------------------------------------------

/// Starts the binary under `ulimit -f 64` (64 KiB files) on `dir`. Its stderr goes through a
/// pipe (the limit would apply to a file it wrote itself) into the harness's stderr file.
fn start_limited(dir: &StateDir) -> Proxy {
    let scratch = scratch_dir("limited");
    let stderr = scratch.join("stderr.log");
    let mut cmd = Command::new("bash");
    cmd.args([
        "-c",
        "ulimit -f 64; exec \"$0\"",
        env!("CARGO_BIN_EXE_fedmcp"),
    ])
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .env("FEDMCP_LISTEN", "127.0.0.1:0")
    .env("FEDMCP_JWT_SECRET", SECRET)
    .env("FEDMCP_STATE_DIR", dir.arg())
    .env(FAST.0, FAST.1)
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn bash");
    let mut err = child.stderr.take().unwrap();
    let mut file = std::fs::File::create(&stderr).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 || file.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(WAIT) {
        Ok(l) if !l.is_empty() => l,
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the limited proxy did not start; stderr: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
    };
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("bad ready line {line:?}"))
        .parse()
        .unwrap();
    Proxy {
        child,
        addr,
        secret: SECRET.to_string(),
        stderr,
        dir: scratch,
    }
}

#[test]
fn a_full_disk_acknowledges_nothing_it_could_not_write_and_loses_nothing_it_acknowledged() {
    let dir = StateDir::new("full");
    let mut p = start_limited(&dir);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let tc = p.register("carol");
    let (mut a, _) = p.online(&ta, json!({}));
    let pad = "x".repeat(4096);
    let big = |i: usize| json!({"i": i, "pad": pad});

    // Fill: each answer is `queued` or storage_failed, never anything else.
    let mut acked: Vec<String> = Vec::new();
    let mut failures = 0;
    for i in 0..64 {
        let id = format!("f{i}");
        a.send(&queue_req(&id, "bob", big(i)));
        let r = a.recv_id(&json!(id));
        if r["result"]["status"] == "queued" {
            acked.push(r["result"]["msgId"].as_str().unwrap().to_string());
            continue;
        }
        assert_eq!(r["error"]["code"], json!(-32603), "send {i}: {r}");
        assert_eq!(
            r["error"]["data"]["reason"], "storage_failed",
            "send {i}: {r}"
        );
        failures += 1;
        break;
    }
    assert_eq!(failures, 1, "64 sends of 4 KiB fit into a 64 KiB file?");
    assert!(
        (5..16).contains(&acked.len()),
        "{} sends of ~4 KiB queued before a 64 KiB limit",
        acked.len()
    );

    let r = p.http("GET", "/readyz", None, None);
    assert_eq!(r.status, 503, "readyz while the disk is full: {}", r.text());
    assert_eq!(r.code(), "degraded", "{}", r.text());

    // More of the same: still nothing acknowledged that is not written.
    for i in 0..3 {
        let id = format!("g{i}");
        a.send(&queue_req(&id, "bob", big(100 + i)));
        let r = a.recv_id(&json!(id));
        if r["result"]["status"] == "queued" {
            acked.push(r["result"]["msgId"].as_str().unwrap().to_string());
        } else {
            assert_eq!(r["error"]["code"], json!(-32603), "{r}");
            assert_eq!(r["error"]["data"]["reason"], "storage_failed", "{r}");
            failures += 1;
        }
    }
    // The HTTP face of the same failure.
    let body = json!({"to": "bob", "message": big(200), "queue": true}).to_string();
    let r = p.http("POST", "/v1/messages", Some(&ta), Some(&body));
    if r.status == 200 {
        assert_eq!(r.json()["status"], "queued", "{}", r.text());
        acked.push(r.json()["msgId"].as_str().unwrap().to_string());
    } else {
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.code(), "storage_failed", "{}", r.text());
        failures += 1;
    }
    let counted = metric(&p, "fedmcp_storage_failures_total");
    assert!(counted > 0.0, "fedmcp_storage_failures_total = {counted}");
    assert!(
        counted >= failures as f64,
        "fedmcp_storage_failures_total = {counted}, {failures} failed answers"
    );
    let r = p.http("GET", "/readyz", None, None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), "degraded", "{}", r.text());

    // What needs no disk still works: health, and direct sends between online members.
    let r = p.http("GET", "/healthz", None, None);
    assert_eq!(r.status, 200, "{}", r.text());
    let (mut c, _) = p.online(&tc, json!({}));
    for (k, queue) in [(0, false), (1, true)] {
        let id = format!("direct{k}");
        a.send(&rpc(
            json!(id),
            "federation/send",
            json!({"to": "carol", "message": {"direct": k}, "queue": queue}),
        ));
        let d = c.recv_method("federation/deliver");
        assert_eq!(d["params"]["message"], json!({"direct": k}), "{d}");
        c.answer(&d, json!({"seen": k}));
        let r = a.recv_id(&json!(id));
        assert_eq!(r["result"]["status"], "delivered", "{r}");
        assert_eq!(r["result"]["reply"], json!({"seen": k}), "{r}");
    }
    let r = p.http("GET", "/readyz", None, None);
    assert_eq!(r.status, 503, "nothing was written since: {}", r.text());

    // A small send: there is room for its record under the limit, but the proxy may also
    // keep refusing promises until its pending batch is written. Either way the answer is
    // `queued` or `storage_failed`, and a `queued` one means a write succeeded again.
    a.send(&queue_req("tiny", "bob", json!({"tiny": true})));
    let r = a.recv_id(&json!("tiny"));
    let tiny_queued = r["result"]["status"] == "queued";
    println!(
        "disk full: {} queued, {failures} storage_failed, then a small send {}",
        acked.len(),
        if tiny_queued {
            "queued (readyz recovers)"
        } else {
            "refused storage_failed"
        }
    );
    if tiny_queued {
        acked.push(r["result"]["msgId"].as_str().unwrap().to_string());
        let r = p.http("GET", "/readyz", None, None);
        assert_eq!(
            r.status,
            200,
            "readyz after a write succeeded again: {}",
            r.text()
        );
    } else {
        assert_eq!(r["error"]["code"], json!(-32603), "{r}");
        assert_eq!(r["error"]["data"]["reason"], "storage_failed", "{r}");
    }

    match p.child.try_wait() {
        Ok(None) => {}
        other => panic!("the proxy exited: {other:?}\n{}", tail(&p.stderr_text())),
    }
    crash(&mut p);
    let limited_log = p.stderr_text();
    drop((a, c, p));

    // Restart without the limit: exactly the acknowledged ones come out.
    let p = start_on(&dir, &[]);
    let log = p.stderr_text();
    if log.contains(TORN_WARNING) {
        eprintln!(
            "note: the log had a torn tail after the failed writes:\n{}",
            tail(&log)
        );
    }
    let r = p.http("GET", "/readyz", None, None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        entry(&p, "bob")["queued"],
        json!(acked.len()),
        "queued after the restart; limited run's log:\n{}",
        tail(&limited_log)
    );
    let mut b = connect_answer(&p, &tb);
    let ds = take_deliveries(&mut b, acked.len(), true);
    assert_eq!(
        msg_ids(&ds),
        acked,
        "exactly the acknowledged messages, in order"
    );
    assert_quiet(&mut b, "no-more");
}

// ---------------------------------------------------------------------------------------------
// 7. Group commit
// ---------------------------------------------------------------------------------------------

#[test]
fn group_commit_keeps_pipelined_queued_sends_fast() {
    const N: usize = 2000;
    const WINDOW: usize = 64;
    let dir = StateDir::new("group");
    let p = start_on(&dir, &[]);
    let ta = p.register("alice");
    p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let t0 = Instant::now();
    let ids = queue_many(
        &mut a,
        "bob",
        N,
        WINDOW,
        |i| json!({"n": i, "body": "0123456789abcdef"}),
    );
    let took = t0.elapsed();
    assert_eq!(ids.len(), N);
    let rate = N as f64 / took.as_secs_f64();
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "group commit: {rate:.0} queued answers/s ({N} sends, window {WINDOW}, {took:?}, {build} test build, log {} bytes)",
        std::fs::metadata(dir.log()).map(|m| m.len()).unwrap_or(0)
    );
    assert!(rate > 200.0, "only {rate:.0} queued answers/s");
    assert_eq!(entry(&p, "bob")["queued"], json!(N));
}
