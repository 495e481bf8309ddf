//! Regression tests for the review findings fixed in `0b53522` (output bounds for answers,
//! absurd token times, pipelining past the HTTP output bound, DELETE with a pending
//! `queue: true` delivery, batches answered only when complete, half-close on a control
//! session, the drain), each against the real binary and each failing on the code before the
//! fix. Scenarios follow the reviewer's reproductions; the contract is docs/PROTOCOL.md.
//!
//! Every wait is bounded: socket reads time out and every loop carries a deadline.
mod common;

use common::*;
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The proxy's resident set size in bytes (`VmRSS` of `/proc/<pid>/status`).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

const RSS_LIMIT: u64 = 64 * 1024 * 1024;

/// Samples the proxy's RSS for `during`; returns the largest value seen.
fn max_rss_over(pid: u32, during: Duration) -> u64 {
    let t0 = Instant::now();
    let mut max = rss_bytes(pid);
    while t0.elapsed() < during {
        std::thread::sleep(Duration::from_millis(50));
        max = max.max(rss_bytes(pid));
    }
    max
}

/// `GET /healthz` on a fresh connection: 200, and answered within `within`.
fn assert_healthy(p: &Proxy, within: Duration) {
    let t0 = Instant::now();
    let r = p.http("GET", "/healthz", None, None);
    assert_eq!(r.status, 200, "healthz: {}", r.text());
    assert!(
        t0.elapsed() < within,
        "healthz took {:?} (wanted under {within:?})",
        t0.elapsed()
    );
}

/// The proxy process is still running.
fn assert_alive(p: &mut Proxy) {
    match p.child.try_wait() {
        Ok(None) => {}
        other => panic!(
            "the proxy exited: {other:?}; stderr:\n{}",
            tail(&p.stderr_text())
        ),
    }
}

fn tail(s: &str) -> &str {
    let n = s.len().saturating_sub(4000);
    let n = (n..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(n);
    &s[n..]
}

/// Sends SIGTERM straight from this process (no `kill` child to fork), so that the time from
/// the signal to the proxy's exit can be measured without the spawn in it.
fn sigterm(pid: u32) {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    const SIGTERM: i32 = 15;
    // SAFETY: kill(2) with the pid of our own child process and a plain signal number.
    let rc = unsafe { kill(pid as i32, SIGTERM) };
    assert_eq!(rc, 0, "kill({pid}, SIGTERM) failed");
}

/// Polls (every 2 ms) until the proxy exits; returns its exit code and the time since `t0`.
fn wait_exit(p: &mut Proxy, t0: Instant, within: Duration) -> (Option<i32>, Duration) {
    loop {
        if let Ok(Some(st)) = p.child.try_wait() {
            return (st.code(), t0.elapsed());
        }
        assert!(
            t0.elapsed() < within,
            "the proxy did not exit within {within:?}; stderr:\n{}",
            tail(&p.stderr_text())
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A masked client frame (RFC 6455 §5.2) with FIN set.
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else if n < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(&MASK);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    f
}

fn text_frame(v: &Value) -> Vec<u8> {
    masked_frame(1, v.to_string().as_bytes())
}

fn servers_req(id: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "federation/servers"})
}

/// A control session over a plain socket (manual upgrade, hand-made frames), so that a test
/// can write without reading, half-close, and see exactly what arrives before EOF.
struct RawWs {
    s: TcpStream,
    buf: Vec<u8>,
}

enum Frame {
    Text(Value),
    Close(Option<u16>),
    Eof,
}

impl RawWs {
    /// Upgrades `GET /v1/control` with `token`; panics unless the answer is 101.
    fn upgrade(p: &Proxy, token: &str) -> RawWs {
        let (s, buf) = raw_upgrade(p, token, Duration::from_millis(200));
        RawWs { s, buf }
    }

    /// Upgrades and answers the welcome with `capabilities`; returns the welcome.
    fn online(p: &Proxy, token: &str, capabilities: Value) -> (RawWs, Value) {
        let mut ws = RawWs::upgrade(p, token);
        let welcome = ws.recv();
        assert_eq!(welcome["method"], "federation/welcome", "{welcome}");
        ws.send(&json!({"jsonrpc": "2.0", "id": welcome["id"],
                        "result": {"capabilities": capabilities}}));
        (ws, welcome)
    }

    /// One read into the buffer; false on EOF (a timeout or reset counts as "nothing yet"
    /// and "EOF" respectively).
    fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 1 << 16];
        match self.s.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => true,
            Err(e) if e.kind() == ErrorKind::Interrupted => true,
            Err(_) => false,
        }
    }

    /// A complete unmasked server frame at the front of the buffer, if there is one.
    fn take_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let (len, off) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        assert_eq!(b[1] & 0x80, 0, "server frames are not masked");
        if b.len() < off + len {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let payload = b[off..off + len].to_vec();
        self.buf.drain(..off + len);
        Some((opcode, payload))
    }

    /// The next text frame, close frame, or EOF (pings and pongs skipped); panics after `WAIT`.
    fn next(&mut self) -> Frame {
        let t0 = Instant::now();
        loop {
            while let Some((op, payload)) = self.take_frame() {
                match op {
                    1 => {
                        let v = serde_json::from_slice(&payload).unwrap_or_else(|e| {
                            panic!("text frame is not JSON ({e}): {payload:?}")
                        });
                        return Frame::Text(v);
                    }
                    8 => {
                        let code = (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                        return Frame::Close(code);
                    }
                    9 | 10 => continue,
                    op => panic!("unexpected opcode {op}"),
                }
            }
            assert!(t0.elapsed() < WAIT, "no frame within {WAIT:?}");
            if !self.fill() {
                return Frame::Eof;
            }
        }
    }

    /// The next text message; panics on a close or EOF.
    fn recv(&mut self) -> Value {
        match self.next() {
            Frame::Text(v) => v,
            Frame::Close(c) => panic!("closed ({c:?}) while waiting for a message"),
            Frame::Eof => panic!("EOF while waiting for a message"),
        }
    }

    /// Reads until the close frame; returns its code (panics on EOF without one).
    fn recv_close(&mut self) -> Option<u16> {
        loop {
            match self.next() {
                Frame::Text(_) => continue,
                Frame::Close(c) => return c,
                Frame::Eof => panic!("EOF without a close frame"),
            }
        }
    }

    fn send(&mut self, v: &Value) {
        self.s.write_all(&text_frame(v)).unwrap();
    }
}

/// Reads one complete HTTP response (head and `Content-Length` body) from a kept-alive
/// connection; `None` on EOF before a complete one.
fn read_response(s: &mut TcpStream) -> Option<Resp> {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = Vec::new();
    let t0 = Instant::now();
    loop {
        if let Some((r, used)) = Resp::parse_one(&buf) {
            let want = r
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if r.body.len() == want {
                assert_eq!(used, buf.len(), "more than one response arrived");
                return Some(r);
            }
        }
        assert!(t0.elapsed() < WAIT, "no complete response within {WAIT:?}");
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
}

/// Reads until EOF (bounded by `WAIT`); true when EOF came.
fn reaches_eof(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t0 = Instant::now();
    let mut chunk = [0u8; 4096];
    while t0.elapsed() < WAIT {
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Capabilities whose `federation/servers` answer is about 900 kB.
fn big_caps() -> Value {
    json!({"blob": "x".repeat(900_000)})
}

// ---------------------------------------------------------------------------------------------
// 1. A session's output is bounded for answers too
// ---------------------------------------------------------------------------------------------

/// 400 `federation/servers` requests, each answered with ~900 kB, written in one go by a peer
/// that never reads: the proxy must not buffer the answers (360 MB); it stops reading the
/// peer instead. Other clients are still served.
#[test]
fn pipelined_requests_from_a_peer_that_does_not_read_do_not_grow_memory() {
    let mut p = Proxy::start(&[]);
    let (mut a, _) = RawWs::online(&p, &p.federation_token("alice"), big_caps());
    // One round trip: the welcome answer (and its capabilities) is in.
    a.send(&servers_req(json!("sync")));
    let sync = a.recv();
    assert_eq!(sync["id"], "sync", "{sync}");
    assert_eq!(
        sync["result"]["servers"][0]["capabilities"]["blob"]
            .as_str()
            .map(str::len),
        Some(900_000),
        "the answers are big"
    );

    let frames: Vec<u8> = (0..400)
        .flat_map(|i| text_frame(&servers_req(json!(i))))
        .collect();
    a.s.write_all(&frames).unwrap();

    let max = max_rss_over(p.pid(), Duration::from_millis(1200));
    assert!(
        max < RSS_LIMIT,
        "RSS went to {} MiB with a peer that does not read (limit {} MiB)",
        max >> 20,
        RSS_LIMIT >> 20
    );
    assert_healthy(&p, Duration::from_secs(3));
    let m = p.http("GET", "/metrics", None, None);
    assert_eq!(m.status, 200, "metrics: {}", m.text());
    assert!(
        m.text().contains("fedmcp_resident_memory_bytes"),
        "{}",
        m.text()
    );
    assert_alive(&mut p);
    assert!(
        rss_bytes(p.pid()) < RSS_LIMIT,
        "RSS after the checks: {} MiB",
        rss_bytes(p.pid()) >> 20
    );
}

/// One batch of 300 `federation/servers` requests whose answer array would be ~270 MB: the
/// proxy closes the session 1008 instead of building it.
#[test]
fn a_batch_whose_answer_outgrows_the_output_bound_is_closed_1008() {
    let mut p = Proxy::start(&[]);
    let (mut a, _) = RawWs::online(&p, &p.federation_token("alice"), big_caps());
    a.send(&servers_req(json!("sync")));
    assert_eq!(a.recv()["id"], "sync");

    let batch: Vec<Value> = (0..300).map(|i| servers_req(json!(i))).collect();
    a.send(&Value::Array(batch));
    let max = max_rss_over(p.pid(), Duration::from_millis(1000));
    assert!(
        max < RSS_LIMIT,
        "RSS went to {} MiB for one batch (limit {} MiB)",
        max >> 20,
        RSS_LIMIT >> 20
    );
    assert_eq!(
        a.recv_close(),
        Some(1008),
        "a batch answer over the output bound closes the session 1008"
    );
    assert_healthy(&p, Duration::from_secs(3));
    assert_eq!(p.http("GET", "/metrics", None, None).status, 200);
    assert_alive(&mut p);
}

// ---------------------------------------------------------------------------------------------
// 2. Absurd token times
// ---------------------------------------------------------------------------------------------

/// Opens a session with `token`, checks the welcome, answers it, and makes one round trip.
fn session_with(p: &Proxy, token: &str) -> Value {
    let mut ws = p
        .ws_raw(token)
        .expect("upgrade with a validly signed token");
    let w = ws.recv();
    assert_eq!(w["method"], "federation/welcome", "{w}");
    assert!(w["params"]["expiresAt"].is_number(), "expiresAt: {w}");
    ws.send(&json!({"jsonrpc": "2.0", "id": w["id"], "result": {}}));
    ws.send(&servers_req(json!("after")));
    let r = ws.recv_id(&json!("after"));
    assert!(r["result"]["servers"].is_array(), "{r}");
    w
}

#[test]
fn absurd_token_times_do_not_crash_the_proxy() {
    let mut p = Proxy::start(&[]);
    let now = now_secs();
    let cases: [(&str, i64, i64); 4] = [
        ("far-exp", now, 10_i64.pow(16)),
        ("far-iat", -(10_i64.pow(16)), now + 3600),
        ("far-both", -(10_i64.pow(16)), 10_i64.pow(16)),
        ("extremes", i64::MIN, i64::MAX),
    ];
    for (id, iat, exp) in cases {
        let t = p.token_with(id, TokenType::Federation, iat, exp);
        let w = session_with(&p, &t);
        assert_eq!(w["params"]["serverId"], id, "{w}");
        assert_alive(&mut p);
        assert_healthy(&p, Duration::from_secs(3));

        // The same token on the federation HTTP endpoints.
        let r = p.http("POST", "/v1/token", Some(&t), None);
        assert_eq!(r.status, 200, "POST /v1/token ({id}): {}", r.text());
        assert!(r.json()["expiresAt"].is_number(), "{}", r.text());
        assert_alive(&mut p);
    }
    assert_healthy(&p, Duration::from_secs(3));
    assert_alive(&mut p);
}

// ---------------------------------------------------------------------------------------------
// 3. Pipelining past the HTTP output bound
// ---------------------------------------------------------------------------------------------

#[test]
fn three_thousand_pipelined_requests_are_all_answered() {
    const N: usize = 3000;
    let p = Proxy::start(&[("FEDMCP_HANDSHAKE_TIMEOUT_MS", "3000")]);
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    let mut w = s.try_clone().unwrap();
    // The write runs beside the reads, so neither side can wait on the other.
    let writer = std::thread::spawn(move || {
        let reqs = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n".repeat(N);
        w.write_all(&reqs)
    });

    let t0 = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let count = |buf: &[u8], pat: &[u8]| buf.windows(pat.len()).filter(|w| *w == pat).count();
    let mut ok = 0;
    let mut eof = false;
    while t0.elapsed() < Duration::from_secs(20) {
        match s.read(&mut chunk) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                ok = count(&buf, b"HTTP/1.1 200 ");
                if ok >= N {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read failed after {ok} answers: {e}"),
        }
    }
    writer.join().unwrap().expect("the requests were written");
    let timeouts = count(&buf, b"HTTP/1.1 408");
    assert_eq!(timeouts, 0, "a 408 came after {ok} answers");
    assert_eq!(
        ok,
        N,
        "{ok} of {N} pipelined requests answered in {:?} (eof: {eof})",
        t0.elapsed()
    );
    // Nothing but the 3000 answers.
    assert_eq!(count(&buf, b"HTTP/1.1 "), N);
}

// ---------------------------------------------------------------------------------------------
// 4. DELETE with a pending queue:true delivery
// ---------------------------------------------------------------------------------------------

#[test]
fn delete_of_a_recipient_with_a_pending_queued_send_answers_unknown_server() {
    let p = Proxy::start(&[]);
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut alice, _) = p.online(&ta, json!({}));
    let (mut bob, _) = p.online(&tb, json!({}));

    alice.send(
        &json!({"jsonrpc": "2.0", "id": 1, "method": "federation/send",
                       "params": {"to": "bob", "message": 1, "queue": true}}),
    );
    let d = bob.recv_method("federation/deliver");
    assert_eq!(d["params"]["from"], "alice", "{d}");
    assert!(!d["id"].is_null(), "a request awaiting bob's answer: {d}");
    // Bob does not answer; the operator removes him.

    let r = p.http("DELETE", "/v1/servers/bob", Some(&p.admin_token()), None);
    assert_eq!(r.status, 204, "DELETE: {}", r.text());
    assert_eq!(bob.recv_close(), Some(4001), "bob's session is closed 4001");

    let a = alice.recv_id(&json!(1));
    assert!(
        a.get("result").is_none(),
        "a removed recipient's pending send must not be answered {a} (its queue is dropped)"
    );
    assert_eq!(a["error"]["code"], -32001, "{a}");
    assert_eq!(a["error"]["data"]["reason"], "unknown_server", "{a}");

    // Nothing else comes for alice (no late `federation/delivered`), and bob is gone.
    alice.send(&servers_req(json!("q")));
    let m = alice.recv();
    assert_eq!(m["id"], "q", "expected only the answer to q, got {m}");
    let ids: Vec<&str> = m["result"]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["serverId"].as_str())
        .collect();
    assert_eq!(ids, ["alice"], "{m}");
    let r = p.http("GET", "/v1/servers/bob", Some(&p.admin_token()), None);
    assert_eq!(r.status, 404, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// 5. A batch is answered only when complete
// ---------------------------------------------------------------------------------------------

#[test]
fn a_batch_settled_while_it_is_read_is_answered_once_with_every_entry() {
    let p = Proxy::start(&[]);
    let (mut alice, _) = p.online(&p.federation_token("alice"), json!({}));

    // Learn the delivery id numbering with one send to self: the next delivery's id is the
    // next number (delivery and message ids share one sequence; nothing else runs here).
    alice.send(
        &json!({"jsonrpc": "2.0", "id": "warm", "method": "federation/send",
                       "params": {"to": "alice", "message": 0}}),
    );
    let d = alice.recv_method("federation/deliver");
    let first = d["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("numeric delivery id: {d}"));
    assert!(
        d["params"]["msgId"]
            .as_str()
            .is_some_and(|m| m.ends_with(&format!("-{first}"))),
        "msgId and delivery id share the sequence: {d}"
    );
    alice.answer(&d, json!({"warm": true}));
    let w = alice.recv_id(&json!("warm"));
    assert_eq!(w["result"]["status"], "delivered", "{w}");
    let next = first + 1;

    // The batch: a servers request, a send to self (its delivery goes out while the batch is
    // read), the answer to that delivery (settling "a" while the batch is still being read),
    // and an unknown method after it.
    alice.send(&json!([
        {"jsonrpc": "2.0", "id": "b", "method": "federation/servers"},
        {"jsonrpc": "2.0", "id": "a", "method": "federation/send",
         "params": {"to": "alice", "message": 1}},
        {"jsonrpc": "2.0", "id": next, "result": {"ok": true}},
        {"jsonrpc": "2.0", "id": "c", "method": "nope"},
    ]));

    let t0 = Instant::now();
    let answer = loop {
        assert!(t0.elapsed() < WAIT, "no batch answer within {WAIT:?}");
        let m = alice.recv();
        if m.is_array() {
            break m;
        }
        assert_eq!(m["method"], "federation/deliver", "unexpected message: {m}");
        assert_eq!(m["id"], json!(next), "the delivery id is predictable: {m}");
    };
    let items = answer.as_array().unwrap();
    let mut ids: Vec<&str> = items.iter().filter_map(|m| m["id"].as_str()).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        ["a", "b", "c"],
        "one array with all three answers: {answer}"
    );
    let by = |id: &str| items.iter().find(|m| m["id"] == id).unwrap();
    assert_eq!(by("a")["result"]["status"], "delivered", "{answer}");
    assert_eq!(by("a")["result"]["reply"], json!({"ok": true}), "{answer}");
    assert!(by("b")["result"]["servers"].is_array(), "{answer}");
    assert_eq!(by("c")["error"]["code"], -32601, "{answer}");

    // No second, partial array or stray answer afterwards.
    alice.send(&servers_req(json!("q")));
    let m = alice.recv();
    assert_eq!(m["id"], "q", "expected only the answer to q, got {m}");
}

// ---------------------------------------------------------------------------------------------
// 6. Half-close on a control session
// ---------------------------------------------------------------------------------------------

#[test]
fn answers_owed_to_a_half_closed_session_are_sent_before_eof() {
    let p = Proxy::start(&[]);

    // A request, then FIN.
    let (mut a, _) = RawWs::online(&p, &p.federation_token("alice"), json!({}));
    a.s.write_all(&text_frame(&servers_req(json!(1)))).unwrap();
    a.s.shutdown(Shutdown::Write).unwrap();
    let m = a.recv();
    assert_eq!(m["id"], 1, "{m}");
    assert!(m["result"]["servers"].is_array(), "{m}");
    // Then the connection ends (EOF, or a close frame first).
    if let Frame::Text(t) = a.next() {
        panic!("unexpected message after the answer: {t}");
    }

    // A request, a close frame and FIN in one write: the answer, then the close reply.
    let (mut b, _) = RawWs::online(&p, &p.federation_token("bob"), json!({}));
    let mut bytes = text_frame(&servers_req(json!(2)));
    bytes.extend(masked_frame(8, &1000u16.to_be_bytes()));
    b.s.write_all(&bytes).unwrap();
    b.s.shutdown(Shutdown::Write).unwrap();
    let m = b.recv();
    assert_eq!(m["id"], 2, "{m}");
    assert!(m["result"]["servers"].is_array(), "{m}");
    match b.next() {
        Frame::Close(c) => assert_eq!(c, Some(1000), "close reply"),
        Frame::Eof => {}
        Frame::Text(t) => panic!("unexpected message after the answer: {t}"),
    }
    assert_healthy(&p, Duration::from_secs(3));
}

// ---------------------------------------------------------------------------------------------
// 7. The drain
// ---------------------------------------------------------------------------------------------

/// An open session, an idle keep-alive connection and one with half a request head: SIGTERM
/// ends the process with 0 within the grace time (the partial head does not hold it past it).
#[test]
fn drain_with_a_partial_head_exits_0_within_the_grace_time() {
    let mut p = Proxy::start(&[("FEDMCP_SHUTDOWN_GRACE_MS", "2000")]);
    let (mut alice, _) = p.online(&p.federation_token("alice"), json!({}));
    let mut keep = TcpStream::connect(p.addr).unwrap();
    keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let r = read_response(&mut keep).expect("healthz on the keep-alive connection");
    assert_eq!(r.status, 200);
    let mut partial = TcpStream::connect(p.addr).unwrap();
    partial.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    // The partial head is read before the signal (a round trip on another connection).
    assert_healthy(&p, Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(100));

    let t0 = Instant::now();
    sigterm(p.pid());
    assert_eq!(alice.recv_close(), Some(1001), "sessions close 1001");
    let (code, took) = wait_exit(&mut p, t0, Duration::from_secs(10));
    assert_eq!(
        code,
        Some(0),
        "exit code; stderr:\n{}",
        tail(&p.stderr_text())
    );
    assert!(
        took < Duration::from_millis(2000),
        "exited {took:?} after SIGTERM, over FEDMCP_SHUTDOWN_GRACE_MS=2000"
    );
    drop(partial);
}

/// A keep-alive connection that was idle when SIGTERM came is not cut: a request on it once
/// the drain has begun is answered (`readyz` 503 with `Connection: close`) and then closed.
#[test]
fn an_idle_keep_alive_connection_gets_readyz_503_during_the_drain() {
    let mut p = Proxy::start(&[("FEDMCP_SHUTDOWN_GRACE_MS", "3000")]);
    let (mut alice, _) = p.online(&p.federation_token("alice"), json!({}));
    let mut keep = TcpStream::connect(p.addr).unwrap();
    keep.write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let r = read_response(&mut keep).expect("readyz before the drain");
    assert_eq!(r.status, 200, "readyz while serving: {}", r.text());
    // Holds the drain open (a request in progress) so the keep-alive request has time.
    let mut partial = TcpStream::connect(p.addr).unwrap();
    partial.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    assert_healthy(&p, Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(100));

    let t0 = Instant::now();
    sigterm(p.pid());
    // The 1001 close shows the drain has begun.
    assert_eq!(alice.recv_close(), Some(1001), "sessions close 1001");
    drop(alice);
    keep.write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let r = read_response(&mut keep)
        .expect("a request on an idle keep-alive connection during the drain is answered");
    assert_eq!(r.status, 503, "readyz while draining: {}", r.text());
    assert_eq!(
        r.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close"),
        "{:?}",
        r.headers
    );
    assert!(
        reaches_eof(&mut keep),
        "the connection closes after the answer"
    );
    drop(keep);

    // With the partial request gone, nothing holds the drain: exit 0 within the grace time.
    partial.shutdown(Shutdown::Both).unwrap();
    drop(partial);
    let (code, took) = wait_exit(&mut p, t0, Duration::from_secs(10));
    assert_eq!(
        code,
        Some(0),
        "exit code; stderr:\n{}",
        tail(&p.stderr_text())
    );
    assert!(
        took < Duration::from_millis(3000),
        "exited {took:?} after SIGTERM, over FEDMCP_SHUTDOWN_GRACE_MS=3000"
    );
}

/// A flood far past the rate limit is closed 1008 even though the bucket refills between
/// messages (a count of refusals "in a row" reset at every refill and never fired: a
/// client at ~280x the limit got 829,256 `rate_limited` answers in 3 s and stayed open).
#[test]
fn a_sender_just_over_its_limit_is_throttled_not_closed() {
    // Contract v1.1 §4: a session is closed 1008 only after more than 10 × burst refusals
    // with no accepted message between them. A sender that keeps going just past its limit
    // (chunks of 50 with a read in between, so the bucket refills between chunks) gets
    // -32029 for what is over, accepted messages in between, and keeps its session.
    let p = Proxy::start(&[("FEDMCP_RATE_LIMIT", "1000/s,burst=100")]);
    let t = p.register("flooder");
    let (mut ws, _) = p.online(&t, json!({}));
    let req = |i: usize| {
        tungstenite::Message::text(
            json!({"jsonrpc": "2.0", "id": i, "method": "federation/servers"}).to_string(),
        )
    };
    let start = Instant::now();
    let (mut sent, mut ok, mut refused) = (0usize, 0usize, 0usize);
    while start.elapsed() < Duration::from_secs(2) {
        for _ in 0..50 {
            ws.ws.write(req(sent)).expect("the session stays open");
            sent += 1;
        }
        ws.ws.flush().expect("the session stays open");
        ws.ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
        loop {
            match ws.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    let m: Value = serde_json::from_str(t.as_str()).unwrap();
                    if m["error"]["code"] == -32029 {
                        refused += 1;
                    } else {
                        ok += 1;
                    }
                }
                Ok(tungstenite::Message::Close(f)) => panic!("closed after {sent}: {f:?}"),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    break;
                }
                Err(e) => panic!("read failed after {sent} messages: {e}"),
            }
        }
    }
    assert!(
        refused > 0,
        "the sender went past its limit: {ok} ok, {refused} refused"
    );
    assert!(ok > 100, "messages within the rate were accepted: {ok}");
    ws.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    ws.send(&json!({"jsonrpc": "2.0", "id": "after", "method": "federation/servers"}));
    assert!(ws.recv_id(&json!("after"))["result"]["servers"].is_array());
}

// ---------------------------------------------------------------------------------------------
// Found while writing docs/PROTOCOL.md: a revoked token is `401 revoked` on every endpoint
// (only a valid token can be of the wrong type, §2), and a `304` is a proper HTTP answer.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_revoked_token_is_revoked_even_where_its_type_is_wrong() {
    let p = Proxy::start(&[]);
    let now = now_secs();
    let token = fedmcp::proto::jwt::sign(
        SECRET.as_bytes(),
        &fedmcp::proto::jwt::Claims {
            server_id: "alice".into(),
            token_type: fedmcp::proto::jwt::TokenType::Federation,
            iat: now,
            exp: now + 600,
            nbf: None,
            jti: Some("regress-jti-1".into()),
        },
    );
    let r = p.http(
        "DELETE",
        "/v1/tokens/regress-jti-1",
        Some(&p.admin_token()),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    // An admin endpoint, a federation token: revoked comes first.
    let r = p.http("GET", "/v1/servers", Some(&token), None);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.code(), "revoked");
    // A valid federation token there is still 403 wrong_type.
    let r = p.http("GET", "/v1/servers", Some(&p.federation_token("bob")), None);
    assert_eq!(r.status, 403);
    assert_eq!(r.code(), "wrong_type");
}

#[test]
fn a_not_modified_answer_has_its_reason_and_no_length() {
    let p = Proxy::start(&[]);
    let alice = p.federation_token("alice");
    let r = p.http("PUT", "/v1/resources/r304", Some(&alice), Some("hello"));
    assert_eq!(r.status, 201, "{}", r.text());
    let etag = format!("\"{}\"", r.json()["sha256"].as_str().unwrap());
    let req = format!(
        "GET /v1/resources/alice/r304 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n"
    );
    let raw = String::from_utf8_lossy(&p.raw(req.as_bytes())).to_string();
    assert!(raw.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{raw}");
    let head = raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(!head.contains("content-length"), "{raw}");
    assert!(head.contains("etag:"), "{raw}");
}
