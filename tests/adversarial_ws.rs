//! Hostile control-channel peers against the real binary (docs/PROTOCOL.md §4, §7): frames that
//! break RFC 6455, messages over the limit, floods, and JSON built to hurt a parser. The
//! attacker is a plain TCP socket after a manual upgrade, writing frames built by hand (masked
//! unless the test is about masking), so anything can be sent. Each test asserts the
//! contract's answer, that the proxy still serves others afterwards (`GET /healthz` on a fresh
//! connection, and a round trip on a bystander session), and where a flood is involved that
//! its resident memory stays under a stated bound.
//!
//! Close codes (CONTRACT-NOTES.md): 1002 for a protocol violation, 1007 for invalid UTF-8,
//! 1008 for policy (rate abuse), 1009 for a message over `FEDMCP_MAX_MESSAGE_BYTES`.
//!
//! Every wait is bounded: socket reads time out, every loop carries a deadline, and writer
//! threads carry write timeouts.
mod common;

use common::*;
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers: frames, a raw session, memory
// ---------------------------------------------------------------------------------------------

const MASK: [u8; 4] = [0x5a, 0x13, 0xc7, 0x2e];
const FIN: u8 = 0x80;
const TEXT: u8 = 0x1;
const CONT: u8 = 0x0;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;
const CLOSE: u8 = 0x8;

/// A frame with first byte `b0` (FIN, RSV and opcode as given), masked or not.
fn frame(b0: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let m = if masked { 0x80 } else { 0 };
    let mut f = vec![b0];
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n < 65536 => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        f.extend_from_slice(&MASK);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// A masked client frame: `fin`, `opcode`, payload.
fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(if fin { FIN } else { 0 } | opcode, true, payload)
}

/// A masked final text frame.
fn text(payload: &[u8]) -> Vec<u8> {
    masked(true, TEXT, payload)
}

/// A masked frame header announcing `len` payload bytes (64-bit length form), mask included,
/// with no payload.
fn header_only(b0: u8, len: u64) -> Vec<u8> {
    let mut f = vec![b0, 0x80 | 127];
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&MASK);
    f
}

fn servers_req(id: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "federation/servers"}).to_string()
}

/// The proxy's resident set size in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// Samples the proxy's RSS every 10 ms on a thread until stopped; `stop` gives the peak.
struct RssWatch {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = rss_kib(pid);
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                peak = peak.max(rss_kib(pid));
            }
            peak
        });
        RssWatch { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("RSS sampler")
    }
}

/// What the raw client saw next.
#[derive(Debug)]
enum Frame {
    Text(String),
    Ping,
    Pong(Vec<u8>),
    Close(Option<u16>),
    Eof,
}

/// A control session over a plain socket: a manual upgrade, then frames by hand.
struct RawWs {
    s: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrades `GET /v1/control` with `token`; panics unless the answer is 101.
    fn upgrade(p: &Proxy, token: &str) -> RawWs {
        let (s, buf) = raw_upgrade(p, token, Duration::from_millis(100));
        RawWs { s, buf }
    }

    /// Upgrades, answers the welcome, and proves with a round trip that the session is online.
    fn online(p: &Proxy, token: &str) -> RawWs {
        let mut ws = RawWs::upgrade(p, token);
        let welcome: Value = serde_json::from_str(&ws.recv_text()).expect("welcome is JSON");
        assert_eq!(welcome["method"], "federation/welcome", "{welcome}");
        let answer = json!({"jsonrpc": "2.0", "id": welcome["id"], "result": {}});
        ws.write(&text(answer.to_string().as_bytes()));
        ws.round_trip("online");
        ws
    }

    fn write(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write to the proxy");
    }

    /// Writes, ignoring errors (for writes the proxy may already have refused).
    fn write_lenient(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    /// One read into the buffer; false on EOF or a reset (a timeout is "nothing yet").
    fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 1 << 16];
        match self.s.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                true
            }
            Err(_) => false,
        }
    }

    /// A complete server frame at the front of the buffer, if there is one.
    fn take(&mut self) -> Option<Frame> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        assert_eq!(b[1] & 0x80, 0, "server frames are not masked");
        let (len, off) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if b.len() < off + len {
            return None;
        }
        assert_eq!(b[0] & 0x80, 0x80, "the proxy sends unfragmented frames");
        let op = b[0] & 0x0f;
        let payload = b[off..off + len].to_vec();
        self.buf.drain(..off + len);
        Some(match op {
            1 => Frame::Text(String::from_utf8(payload).expect("text frames are UTF-8")),
            9 => Frame::Ping,
            10 => Frame::Pong(payload),
            8 => Frame::Close(
                (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
            ),
            op => panic!("the proxy sent opcode {op}"),
        })
    }

    /// The next frame of any kind, or EOF; panics after `within`.
    fn next_within(&mut self, within: Duration) -> Option<Frame> {
        let t0 = Instant::now();
        loop {
            if let Some(f) = self.take() {
                return Some(f);
            }
            if t0.elapsed() >= within {
                return None;
            }
            if !self.fill() {
                return Some(self.take().unwrap_or(Frame::Eof));
            }
        }
    }

    fn next(&mut self) -> Frame {
        self.next_within(WAIT)
            .unwrap_or_else(|| panic!("no frame within {WAIT:?}"))
    }

    /// The next text message (pings and pongs skipped); panics on a close or EOF.
    fn recv_text(&mut self) -> String {
        loop {
            match self.next() {
                Frame::Text(t) => return t,
                Frame::Ping | Frame::Pong(_) => continue,
                f => panic!("wanted a text message, got {f:?}"),
            }
        }
    }

    /// The next text message as JSON.
    fn recv_json(&mut self) -> Value {
        let t = self.recv_text();
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
    }

    /// Sends `federation/servers` with id `tag` and waits for its answer (anything else that
    /// arrives first is a failure: the session owes nothing else).
    fn round_trip(&mut self, tag: &str) {
        self.write(&text(servers_req(tag).as_bytes()));
        let m = self.recv_json();
        assert_eq!(m["id"], tag, "wanted the answer to {tag}, got {m}");
        assert!(m["result"]["servers"].is_array(), "{m}");
    }

    /// Reads to the close frame and returns its code; then the proxy must end the connection
    /// (FIN, within its 2 s linger). Text and control frames before the close are skipped.
    fn expect_close(&mut self, what: &str) -> Option<u16> {
        let t0 = Instant::now();
        let code = loop {
            assert!(t0.elapsed() < WAIT, "{what}: no close within {WAIT:?}");
            match self.next() {
                Frame::Close(c) => break c,
                Frame::Eof => panic!("{what}: EOF without a close frame"),
                _ => continue,
            }
        };
        let t1 = Instant::now();
        loop {
            match self.next_within(Duration::from_secs(5)) {
                Some(Frame::Eof) => break,
                Some(_) => continue,
                None => panic!(
                    "{what}: the connection stayed open {:?} after the close",
                    t1.elapsed()
                ),
            }
        }
        code
    }
}

/// The proxy still serves: `GET /healthz` on a fresh connection within 5 s, and a bystander
/// session answers a request.
#[track_caller]
fn assert_serving(p: &Proxy, bystander: &mut Ws, tag: &str) {
    let t0 = Instant::now();
    let r = p.http("GET", "/healthz", None, None);
    assert_eq!(r.status, 200, "{tag}: healthz {}", r.text());
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "{tag}: healthz took {:?}",
        t0.elapsed()
    );
    bystander.send(&json!({"jsonrpc": "2.0", "id": tag, "method": "federation/servers"}));
    let m = bystander.recv_id(&json!(tag));
    assert!(m["result"]["servers"].is_array(), "{tag}: {m}");
}

/// A proxy with a bystander session online.
fn start_with_bystander(env: &[(&str, &str)]) -> (Proxy, Ws) {
    let p = Proxy::start(env);
    let t = p.federation_token("bystander");
    let (ws, _) = p.online(&t, json!({}));
    (p, ws)
}

/// For each case, a fresh online session (its own serverId) is sent `bytes` and must be
/// closed with one of `codes`; the proxy must still serve afterwards.
fn violations(p: &Proxy, bystander: &mut Ws, tag: &str, cases: &[(&str, Vec<u8>)], codes: &[u16]) {
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let mut a = RawWs::online(p, &p.federation_token(&format!("{tag}-{i}")));
        a.write_lenient(bytes);
        let code = a.expect_close(what);
        assert!(
            code.is_some_and(|c| codes.contains(&c)),
            "{what}: closed with {code:?}, wanted one of {codes:?}"
        );
        if codes.len() > 1 {
            eprintln!("{what}: closed {code:?}");
        }
        assert_serving(p, bystander, &format!("{tag}-{i}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_utf8_in_text_frames_closes_1007() {
    let (p, mut by) = start_with_bystander(&[]);
    let cases = vec![
        ("a 0xFF byte", text(b"{\"a\":\"\xff\"}")),
        ("an overlong '/' (C0 AF)", text(b"{\"a\":\"\xc0\xaf\"}")),
        (
            "a UTF-8-encoded surrogate (ED A0 80)",
            text(b"{\"a\":\"\xed\xa0\x80\"}"),
        ),
        (
            "a code point above U+10FFFF (F4 90 80 80)",
            text(b"{\"a\":\"\xf4\x90\x80\x80\"}"),
        ),
        (
            "a sequence cut short at the end (E2 82)",
            text(b"{\"a\":\"\xe2\x82"),
        ),
        ("a lone continuation byte (80)", text(b"\x80")),
        ("invalid only once the fragments are joined (E2 82 | 28)", {
            let mut b = masked(false, TEXT, b"{\"a\":\"\xe2\x82");
            b.extend(masked(true, CONT, b"(\"}"));
            b
        }),
    ];
    violations(&p, &mut by, "utf8", &cases, &[1007]);

    // A valid character split across fragments is fine: the check is on the whole message.
    let mut a = RawWs::online(&p, &p.federation_token("utf8-ok"));
    let msg = r#"{"jsonrpc":"2.0","id":"eur","method":"federation/servers","params":{"s":"€"}}"#;
    let cut = msg.find('€').unwrap() + 1; // inside the three bytes of '€'
    let mut b = masked(false, TEXT, &msg.as_bytes()[..cut]);
    b.extend(masked(true, CONT, &msg.as_bytes()[cut..]));
    a.write(&b);
    let m = a.recv_json();
    assert_eq!(m["id"], "eur", "{m}");
}

#[test]
fn fragments_over_the_message_limit_close_1009_without_buffering() {
    let (p, mut by) = start_with_bystander(&[("FEDMCP_MAX_MESSAGE_BYTES", "4096")]);
    let before = rss_kib(p.pid());
    let watch = RssWatch::start(p.pid());

    // A message that never ends: 1000-byte fragments offered by a writer thread for up to
    // 10 s. The proxy must close 1009 once the fragments pass 4096 bytes without collecting
    // them, and then stop taking bytes once its close linger (2 s) is over.
    let mut a = RawWs::online(&p, &p.federation_token("frag"));
    let mut w = a.s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let writer = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut sent = 0usize;
        let chunk = [b' '; 1000];
        let first = masked(
            false,
            TEXT,
            b"{\"jsonrpc\":\"2.0\",\"id\":\"big\",\"pad\":\"",
        );
        if w.write_all(&first).is_err() {
            return (sent, t0.elapsed(), true);
        }
        let burst: Vec<u8> = (0..64).flat_map(|_| masked(false, CONT, &chunk)).collect();
        while t0.elapsed() < Duration::from_secs(10) {
            if w.write_all(&burst).is_err() {
                return (sent, t0.elapsed(), true);
            }
            sent += burst.len();
        }
        (sent, t0.elapsed(), false)
    });
    let t0 = Instant::now();
    let code = a.expect_close("an endless fragmented message");
    assert_eq!(code, Some(1009), "an endless fragmented message");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the close took {:?}",
        t0.elapsed()
    );
    let (written, took, refused) = writer.join().expect("writer thread");
    let peak = watch.stop();
    eprintln!("endless fragments: {written} bytes taken in {took:?} before the proxy let go");
    assert!(
        refused && took < Duration::from_secs(8),
        "the proxy kept the connection open for {took:?} after closing it ({written} bytes)"
    );
    assert!(
        peak.saturating_sub(before) < 8 * 1024,
        "RSS went from {before} KiB to a peak of {peak} KiB (limit: +8 MiB)"
    );
    assert_serving(&p, &mut by, "after-endless");

    // Frame headers that announce more than the limit are refused on the header, without
    // waiting for (or reserving room for) the payload.
    let cases = vec![
        (
            "a single frame announcing 1 GiB",
            header_only(FIN | TEXT, 1 << 30),
        ),
        (
            "a continuation announcing 1 TiB after a small first fragment",
            {
                let mut b = masked(false, TEXT, b"{\"a\":");
                b.extend(header_only(FIN | CONT, 1 << 40));
                b
            },
        ),
        (
            "a frame announcing 4097 bytes",
            header_only(FIN | TEXT, 4097),
        ),
    ];
    violations(&p, &mut by, "hdr", &cases, &[1009]);
    // A 64-bit length with its top bit set is itself a protocol violation (RFC 6455 §5.2);
    // either answer is a refusal, and nothing may overflow.
    let cases = vec![(
        "a length with the top bit set",
        header_only(FIN | TEXT, 1 << 63),
    )];
    violations(&p, &mut by, "msb", &cases, &[1002, 1009]);
}

#[test]
fn oversize_and_fragmented_control_frames_close_1002() {
    let (p, mut by) = start_with_bystander(&[]);
    // A 125-byte ping is the largest allowed: answered with a pong of the same payload.
    let mut a = RawWs::online(&p, &p.federation_token("ctl-ok"));
    let payload: Vec<u8> = (0..125u8).collect();
    a.write(&masked(true, PING, &payload));
    loop {
        match a.next() {
            Frame::Pong(got) => {
                assert_eq!(got, payload, "pong payload");
                break;
            }
            Frame::Ping => continue,
            f => panic!("wanted a pong, got {f:?}"),
        }
    }
    a.round_trip("after-ping");

    let big = vec![b'p'; 126];
    let cases = vec![
        ("a ping with a 126-byte payload", masked(true, PING, &big)),
        ("a pong with a 126-byte payload", masked(true, PONG, &big)),
        ("a close with a 126-byte payload", {
            let mut c = 1000u16.to_be_bytes().to_vec();
            c.extend_from_slice(&big[..124]);
            masked(true, CLOSE, &c)
        }),
        ("a fragmented ping (FIN clear)", masked(false, PING, b"x")),
    ];
    violations(&p, &mut by, "ctl", &cases, &[1002]);
    // A control frame announcing more than the message limit is both an oversize control
    // frame and a frame over the limit: tungstenite checks the size on the header (1009)
    // before the kind (1002). Either is a refusal made before any payload is read.
    let cases = vec![(
        "a ping announcing 2^40 bytes",
        header_only(FIN | PING, 1 << 40),
    )];
    violations(&p, &mut by, "ctl-huge", &cases, &[1002, 1009]);
}

#[test]
fn close_frames_with_bad_codes_or_payloads_are_answered_1002() {
    let (p, mut by) = start_with_bystander(&[]);
    let close = |code: u16, reason: &[u8]| {
        let mut c = code.to_be_bytes().to_vec();
        c.extend_from_slice(reason);
        masked(true, CLOSE, &c)
    };
    // RFC 6455 §7.4: 1005, 1006 and 1015 must never be sent; codes under 1000, 1004 and
    // 1016-2999 are not assigned; 5000 and up do not exist. A one-byte payload has no code.
    let cases = vec![
        ("a one-byte close payload", masked(true, CLOSE, b"\x03")),
        ("close code 999", close(999, b"")),
        ("close code 1004", close(1004, b"")),
        ("close code 1005", close(1005, b"")),
        ("close code 1006", close(1006, b"")),
        ("close code 1015", close(1015, b"")),
        ("close code 2000", close(2000, b"")),
        ("close code 5000", close(5000, b"")),
    ];
    violations(&p, &mut by, "close", &cases, &[1002]);
    let cases = vec![("a close reason that is not UTF-8", close(1000, b"\xff\xfe"))];
    violations(&p, &mut by, "close-utf8", &cases, &[1002, 1007]);
    // A normal close is answered in kind.
    let mut a = RawWs::online(&p, &p.federation_token("close-ok"));
    a.write(&close(1000, b"bye"));
    assert_eq!(a.expect_close("a normal close"), Some(1000));
    assert_serving(&p, &mut by, "after-close");
}

#[test]
fn unmasked_client_frames_close_1002() {
    let (p, mut by) = start_with_bystander(&[]);
    let cases = vec![
        (
            "an unmasked text frame",
            frame(FIN | TEXT, false, servers_req("u").as_bytes()),
        ),
        ("an unmasked ping", frame(FIN | PING, false, b"hi")),
        ("an unmasked continuation of a masked start", {
            let mut b = masked(false, TEXT, b"{\"jsonrpc\":");
            b.extend(frame(FIN | CONT, false, b"\"2.0\"}"));
            b
        }),
    ];
    violations(&p, &mut by, "unmasked", &cases, &[1002]);
}

#[test]
fn reserved_opcodes_close_1002() {
    let (p, mut by) = start_with_bystander(&[]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("opcode 0x3", masked(true, 0x3, b"{}")),
        ("opcode 0x7", masked(true, 0x7, b"{}")),
        ("opcode 0xB", masked(true, 0xB, b"x")),
        ("opcode 0xF", masked(true, 0xF, b"x")),
    ];
    violations(&p, &mut by, "opcode", &cases, &[1002]);
}

#[test]
fn reserved_bits_close_1002() {
    let (p, mut by) = start_with_bystander(&[]);
    let req = servers_req("rsv");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "RSV1 on a text frame",
            frame(FIN | 0x40 | TEXT, true, req.as_bytes()),
        ),
        (
            "RSV2 on a text frame",
            frame(FIN | 0x20 | TEXT, true, req.as_bytes()),
        ),
        (
            "RSV3 on a text frame",
            frame(FIN | 0x10 | TEXT, true, req.as_bytes()),
        ),
        ("RSV1 on a ping", frame(FIN | 0x40 | PING, true, b"x")),
        ("RSV1 on a continuation", {
            let mut b = masked(false, TEXT, b"{\"jsonrpc\":");
            b.extend(frame(FIN | 0x40 | CONT, true, b"\"2.0\"}"));
            b
        }),
    ];
    violations(&p, &mut by, "rsv", &cases, &[1002]);
}

#[test]
fn stray_or_interleaved_continuation_frames_close_1002() {
    let (p, mut by) = start_with_bystander(&[]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a continuation with no message started",
            masked(true, CONT, b"{}"),
        ),
        ("a new text frame inside a fragmented message", {
            let mut b = masked(false, TEXT, b"{\"a\":");
            b.extend(text(servers_req("x").as_bytes()));
            b
        }),
        ("a binary continuation of a text start", {
            let mut b = masked(false, TEXT, b"{\"a\":");
            b.extend(masked(true, 0x2, b"1}"));
            b
        }),
    ];
    violations(&p, &mut by, "cont", &cases, &[1002]);
    // A ping between fragments is allowed (RFC 6455 §5.4) and the message still arrives.
    let mut a = RawWs::online(&p, &p.federation_token("cont-ok"));
    let req = servers_req("between");
    let (x, y) = req.as_bytes().split_at(10);
    let mut b = masked(false, TEXT, x);
    b.extend(masked(true, PING, b"mid"));
    b.extend(masked(true, CONT, y));
    a.write(&b);
    let m = a.recv_json();
    assert_eq!(m["id"], "between", "{m}");
}

#[test]
fn a_ping_flood_is_answered_or_closed_and_memory_stays_bounded() {
    let (p, mut by) = start_with_bystander(&[]);
    let mut a = RawWs::online(&p, &p.federation_token("pinger"));
    const N: usize = 10_000;
    // 10,000 pings of 125 bytes, numbered, in one write (1.3 MB).
    let payload = |i: usize| {
        let mut v = format!("{i:08}").into_bytes();
        v.resize(125, b'.');
        v
    };
    let flood: Vec<u8> = (0..N)
        .flat_map(|i| masked(true, PING, &payload(i)))
        .collect();
    let before = rss_kib(p.pid());
    let watch = RssWatch::start(p.pid());
    let mut w = a.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&flood).is_ok());

    let t0 = Instant::now();
    let mut pongs = 0usize;
    let mut last: Option<usize> = None;
    let mut closed = None;
    while pongs < N {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "flood not drained: {pongs} pongs"
        );
        match a.next_within(Duration::from_secs(3)) {
            Some(Frame::Pong(pl)) => {
                assert_eq!(pl.len(), 125, "pong payload length");
                let i: usize = std::str::from_utf8(&pl[..8]).unwrap().parse().unwrap();
                assert_eq!(pl, payload(i), "a pong carries its ping's payload");
                assert!(
                    last.is_none_or(|l| i > l),
                    "pongs out of order: {i} after {last:?}"
                );
                last = Some(i);
                pongs += 1;
            }
            Some(Frame::Ping) => {}
            Some(Frame::Close(c)) => {
                closed = Some(c);
                break;
            }
            Some(f) => panic!("unexpected during the flood: {f:?}"),
            None => break, // quiet for 3 s: the proxy answered what it will answer
        }
    }
    let wrote = writer.join().expect("writer");
    let peak = watch.stop();
    match closed {
        // A close is allowed only as policy.
        Some(c) => assert_eq!(c, Some(1008), "a ping flood may be closed only 1008"),
        None => {
            assert!(wrote, "the flood could not be written");
            assert!(pongs > 0, "no pong at all");
            // The session is still usable.
            a.round_trip("after-flood");
        }
    }
    eprintln!(
        "ping flood: {pongs} pongs for {N} pings, closed {closed:?}, RSS {before} -> peak {peak} KiB"
    );
    assert!(
        peak.saturating_sub(before) < 16 * 1024,
        "RSS went from {before} KiB to a peak of {peak} KiB (limit: +16 MiB)"
    );
    assert_serving(&p, &mut by, "after-ping-flood");

    // A flooder that never reads its pongs: the pongs it is owed are bounded (the proxy
    // stops reading it), so 13 MB of pings cannot grow the proxy.
    let deaf = RawWs::online(&p, &p.federation_token("deaf"));
    let flood: Vec<u8> = (0..100_000)
        .flat_map(|i| masked(true, PING, &payload(i % N)))
        .collect();
    let before = rss_kib(p.pid());
    let watch = RssWatch::start(p.pid());
    let mut w = deaf.s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let writer = std::thread::spawn(move || {
        let mut n = 0usize;
        for c in flood.chunks(1 << 16) {
            if w.write_all(c).is_err() {
                break;
            }
            n += c.len();
        }
        n
    });
    let taken = writer.join().expect("writer");
    assert_serving(&p, &mut by, "during-deaf-flood");
    let peak = watch.stop();
    eprintln!("deaf ping flood: {taken} of 13.1 MB taken, RSS {before} -> peak {peak} KiB");
    assert!(
        peak.saturating_sub(before) < 16 * 1024,
        "RSS went from {before} KiB to a peak of {peak} KiB (limit: +16 MiB)"
    );
    drop(deaf);
    assert_serving(&p, &mut by, "after-deaf-flood");
}

/// A session that once sent a message of the maximum size keeps no read buffer once idle:
/// the reactor replaces its WebSocket context between messages (`ws::release_if_idle`), and
/// its output buffer goes back to the pool once written. Before that, each such session kept
/// ~1 MiB (measured 1034 KiB a session; now ~130 KiB, allocator slack spread over sessions).
/// The bar is a quarter of the message, far under what one kept buffer would cost.
#[test]
fn memory_after_max_size_messages_stays_within_the_per_session_bound() {
    const MSG: usize = 1 << 20;
    const SESSIONS: usize = 16;
    let (p, mut by) = start_with_bystander(&[("FEDMCP_MAX_MESSAGE_BYTES", "1048576")]);
    let before = rss_kib(p.pid());
    let mut held = Vec::new();
    for i in 0..SESSIONS {
        let mut a = RawWs::online(&p, &p.federation_token(&format!("big-{i}")));
        let base =
            r#"{"jsonrpc":"2.0","id":"big","method":"federation/servers","params":{"p":""}}"#;
        let msg = base.replace(
            r#""p":"""#,
            &format!(r#""p":"{}""#, "x".repeat(MSG - base.len())),
        );
        assert_eq!(msg.len(), MSG);
        a.write(&text(msg.as_bytes()));
        let m = a.recv_json();
        assert_eq!(m["id"], "big", "{m}");
        held.push(a);
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(p.pid());
    let per_session = after.saturating_sub(before) / SESSIONS as u64;
    eprintln!(
        "{SESSIONS} idle sessions after one {MSG}-byte message each: RSS {before} -> {after} KiB \
         ({per_session} KiB a session)"
    );
    let bound_kib = MSG as u64 / 1024 / 4;
    assert!(
        per_session <= bound_kib,
        "{per_session} KiB held per idle session, a read buffer kept (bar {bound_kib} KiB)"
    );
    assert_serving(&p, &mut by, "after-big-messages");
}

// ---------------------------------------------------------------------------------------------
// JSON abuse
// ---------------------------------------------------------------------------------------------

/// A raw answer is a JSON-RPC error with `code`, `id: null` (checked on the text, for answers
/// that serde_json's `Value` cannot hold).
#[track_caller]
fn assert_error_json(m: &Value, code: i64, what: &str) {
    assert_eq!(m["error"]["code"], code, "{what}: {m}");
    assert!(
        m.as_object().is_some_and(|o| o.contains_key("id")) && m["id"].is_null(),
        "{what}: id must be null: {m}"
    );
}

fn send_req(id: &str, to: &str, message_json: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":"{id}","method":"federation/send","params":{{"to":"{to}","message":{message_json}}}}}"#
    )
}

#[test]
fn nesting_ten_thousand_deep_is_a_parse_error_and_the_session_stays() {
    let (p, mut bob) = start_with_bystander(&[]);
    let mut a = RawWs::online(&p, &p.federation_token("nester"));
    let deep_obj = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    let deep_arr = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let refused: Vec<(&str, String)> = vec![
        (
            "10,000 nested objects in params",
            format!(
                r#"{{"jsonrpc":"2.0","id":"d1","method":"federation/servers","params":{deep_obj}}}"#
            ),
        ),
        (
            "10,000 nested arrays in a send's message",
            send_req("d2", "bystander", &deep_arr),
        ),
        ("10,000 nested arrays as the whole frame", deep_arr.clone()),
        ("100,000 open brackets", "[".repeat(100_000)),
        ("10,000 closing brackets", "]".repeat(10_000)),
        (
            "an escaped backslash ends the string, then real nesting",
            send_req("d3", "bystander", &format!(r#"["\\",{deep_arr}]"#)),
        ),
        (
            "depth 129 (one past the limit)",
            format!(
                r#"{{"jsonrpc":"2.0","id":"d4","method":"federation/servers","params":{{"x":{}{}}}}}"#,
                "[".repeat(127),
                "]".repeat(127)
            ),
        ),
    ];
    for (what, msg) in &refused {
        a.write(&text(msg.as_bytes()));
        let m = a.recv_json();
        assert_error_json(&m, -32700, what);
        a.round_trip(what);
    }
    // Depth 128 exactly is accepted.
    a.write(&text(
        format!(
            r#"{{"jsonrpc":"2.0","id":"d128","method":"federation/servers","params":{{"x":{}{}}}}}"#,
            "[".repeat(126),
            "]".repeat(126)
        )
        .as_bytes(),
    ));
    let m = a.recv_json();
    assert_eq!(m["id"], "d128", "depth 128: {m}");
    assert!(m["result"].is_object(), "depth 128: {m}");

    // Brackets inside a string are not nesting, escaped quote or not: forwarded to bob.
    let in_string = format!(r#"{{"s":"\"{}"}}"#, "[".repeat(10_000));
    a.write(&text(send_req("str", "bystander", &in_string).as_bytes()));
    let d = bob.recv_method("federation/deliver");
    assert_eq!(
        d["params"]["message"]["s"].as_str().map(str::len),
        Some(10_001)
    );
    bob.answer(&d, json!("ok"));
    let m = a.recv_json();
    assert_eq!(m["id"], "str", "{m}");
    assert_eq!(m["result"]["status"], "delivered", "{m}");
    assert_serving(&p, &mut bob, "after-nesting");
}

#[test]
fn a_batch_of_100000_entries_is_one_invalid_request() {
    let (p, mut by) = start_with_bystander(&[("FEDMCP_MAX_MESSAGE_BYTES", "4194304")]);
    let mut a = RawWs::online(&p, &p.federation_token("batcher"));
    let before = rss_kib(p.pid());
    let watch = RssWatch::start(p.pid());
    for (what, entry) in [
        ("100,000 notifications", r#"{"jsonrpc":"2.0","method":"x"}"#),
        ("100,000 numbers", "1"),
    ] {
        let batch = format!("[{}]", vec![entry; 100_000].join(","));
        assert!(batch.len() <= 4_194_304, "{what}: {} bytes", batch.len());
        a.write(&text(batch.as_bytes()));
        let m = a.recv_json();
        assert!(m.is_object(), "{what}: one error object, not an array");
        assert_error_json(&m, -32600, what);
        assert_eq!(
            m["error"]["data"]["reason"], "invalid_request",
            "{what}: {m}"
        );
        // Nothing else was owed: the next answer is the round trip's.
        a.round_trip(what);
    }
    let peak = watch.stop();
    assert!(
        peak.saturating_sub(before) < 48 * 1024,
        "RSS went from {before} KiB to a peak of {peak} KiB (limit: +48 MiB for 4 MiB messages)"
    );
    assert_serving(&p, &mut by, "after-batch");
}

/// The first integer value of `"key":` in a raw JSON text.
fn raw_int(text: &str, key: &str) -> i64 {
    let pat = format!("\"{key}\":");
    let at = text
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        + pat.len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not an integer in {text}"))
}

#[test]
fn huge_numbers_in_id_and_message_do_not_crash() {
    let (p, mut bob) = start_with_bystander(&[]);
    p.register("carol"); // registered, offline
    let mut a = RawWs::online(&p, &p.federation_token("numbers"));
    let digits = format!("9{}", "8".repeat(9_999));
    let huge: Vec<(&str, String)> = vec![
        ("1e999999", "1e999999".into()),
        ("-1e999999", "-1e999999".into()),
        ("1e-999999", "1e-999999".into()),
        ("a 10,000-digit integer", digits.clone()),
        ("a 10,000-digit negative integer", format!("-{digits}")),
        ("a 10,000-digit fraction", format!("0.{digits}")),
    ];
    // As the id: echoed as it came, or refused; never a crash, and the session stays.
    for (what, n) in &huge {
        a.write(&text(
            format!(r#"{{"jsonrpc":"2.0","id":{n},"method":"federation/servers"}}"#).as_bytes(),
        ));
        let t = a.recv_text();
        let echoed = t.contains(&format!(r#""id":{n}"#)) && t.contains(r#""result":{"servers""#);
        let refused = t.contains(r#""code":-32600"#) || t.contains(r#""code":-32700"#);
        assert!(echoed || refused, "id {what}: {}", &t[..t.len().min(300)]);
        a.round_trip(what);
    }
    // Inside a send's message: forwarded byte for byte.
    let message = format!(r#"{{"a":1e999999,"b":{digits},"c":-1e-999999,"d":[0.{digits}]}}"#);
    a.write(&text(send_req("hm", "bystander", &message).as_bytes()));
    let d = bob.recv_text();
    assert!(
        d.contains(&message),
        "not forwarded byte for byte: {}",
        &d[..d.len().min(300)]
    );
    let id = raw_int(&d, "id");
    bob.send(&json!({"jsonrpc": "2.0", "id": id, "result": {"ok": 1}}));
    let m = a.recv_json();
    assert_eq!(m["id"], "hm", "{m}");
    assert_eq!(m["result"]["status"], "delivered", "{m}");
    // Where the proxy itself reads a number or a string, a huge one is invalid params.
    for (what, params) in [
        (
            "ttlMs 1e999999",
            r#"{"to":"carol","message":1,"queue":true,"ttlMs":1e999999}"#.to_string(),
        ),
        (
            "ttlMs of 10,000 digits",
            format!(r#"{{"to":"carol","message":1,"queue":true,"ttlMs":{digits}}}"#),
        ),
        (
            "ttlMs negative",
            r#"{"to":"carol","message":1,"queue":true,"ttlMs":-1}"#.to_string(),
        ),
        (
            "to a huge number",
            r#"{"to":1e999999,"message":1}"#.to_string(),
        ),
    ] {
        a.write(&text(
            format!(r#"{{"jsonrpc":"2.0","id":"p","method":"federation/send","params":{params}}}"#)
                .as_bytes(),
        ));
        let m = a.recv_json();
        assert_eq!(m["id"], "p", "{what}: {m}");
        assert_eq!(m["error"]["code"], -32602, "{what}: {m}");
        a.round_trip(what);
    }
    assert_serving(&p, &mut bob, "after-numbers");
}

#[test]
fn lone_surrogates_in_method_and_message() {
    let (p, mut bob) = start_with_bystander(&[]);
    let mut a = RawWs::online(&p, &p.federation_token("surrogates"));
    // In the method name (a string the proxy must decode): parse error or invalid request.
    for (what, method) in [
        ("a lone high surrogate", r"\ud800"),
        ("a lone low surrogate", r"\udfff"),
        ("a reversed pair", r"\udc00\ud800"),
        (
            "a method ending in a high surrogate",
            r"federation/servers\ud800",
        ),
    ] {
        a.write(&text(
            format!(r#"{{"jsonrpc":"2.0","id":"s","method":"{method}"}}"#).as_bytes(),
        ));
        let m = a.recv_json();
        let code = m["error"]["code"].as_i64();
        assert!(
            matches!(code, Some(-32700 | -32600)),
            "method with {what}: {m}"
        );
        a.round_trip(what);
    }
    // In `to` (a serverId the proxy decodes): refused.
    a.write(&text(send_req("t", r"\ud800", "1").as_bytes()));
    let m = a.recv_json();
    assert!(
        matches!(m["error"]["code"].as_i64(), Some(-32700 | -32600 | -32602)),
        "to with a lone surrogate: {m}"
    );
    a.round_trip("after-to");

    // In `message`, a value the proxy forwards without decoding: either refused (parse error
    // or invalid request) or forwarded byte for byte, as §4 says of `message`. Never a crash,
    // and the session stays.
    let message = r#"{"s":"\ud800","t":"x\udc00y"}"#;
    a.write(&text(send_req("m", "bystander", message).as_bytes()));
    let first = a.next_within(Duration::from_secs(2));
    match first {
        Some(Frame::Text(t)) => {
            let m: Value = serde_json::from_str(&t).unwrap();
            assert!(
                matches!(m["error"]["code"].as_i64(), Some(-32700 | -32600)),
                "message with lone surrogates: {m}"
            );
        }
        None => {
            // Not answered at once: it went to bob, byte for byte.
            let d = bob.recv_text();
            assert!(d.contains(message), "not forwarded byte for byte: {d}");
            bob.send(&json!({"jsonrpc": "2.0", "id": raw_int(&d, "id"), "result": 0}));
            let m = a.recv_json();
            assert_eq!(m["id"], "m", "{m}");
            assert_eq!(m["result"]["status"], "delivered", "{m}");
            eprintln!("lone surrogates in `message` are forwarded byte for byte");
        }
        Some(f) => panic!("unexpected: {f:?}"),
    }
    a.round_trip("after-message");
    assert_serving(&p, &mut bob, "after-surrogates");
}

#[test]
fn a_message_exactly_at_the_limit_is_accepted_and_one_byte_over_closes_1009() {
    let (p, mut by) = start_with_bystander(&[("FEDMCP_MAX_MESSAGE_BYTES", "4096")]);
    // A request of exactly `len` bytes, padded with `pad` (one- or two-byte characters).
    let sized = |id: &str, len: usize, pad: char| {
        let base = format!(
            r#"{{"jsonrpc":"2.0","id":"{id}","method":"federation/servers","params":{{"p":""}}}}"#
        );
        let room = len - base.len();
        let mut fill = String::new();
        while fill.len() + pad.len_utf8() <= room {
            fill.push(pad);
        }
        while fill.len() < room {
            fill.push('x');
        }
        let m = base.replace(r#""p":"""#, &format!(r#""p":"{fill}""#));
        assert_eq!(m.len(), len);
        m
    };
    let mut a = RawWs::online(&p, &p.federation_token("limit"));
    for (what, pad) in [("ASCII", 'x'), ("two-byte characters", 'é')] {
        // One frame of exactly 4096 bytes.
        a.write(&text(sized("at", 4096, pad).as_bytes()));
        let m = a.recv_json();
        assert_eq!(m["id"], "at", "{what}, 4096 bytes in one frame: {m}");
        // Four fragments adding up to exactly 4096 bytes.
        let msg = sized("frag", 4096, 'x');
        let parts: Vec<&[u8]> = msg.as_bytes().chunks(1024).collect();
        let mut b = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let op = if i == 0 { TEXT } else { CONT };
            b.extend(masked(i + 1 == parts.len(), op, part));
        }
        a.write(&b);
        let m = a.recv_json();
        assert_eq!(m["id"], "frag", "{what}, 4096 bytes in fragments: {m}");
    }
    // One byte over, in one frame and in fragments (the bound is on bytes, not characters).
    let one_frame = text(sized("over", 4097, 'é').as_bytes());
    let fragments = {
        let msg = sized("over", 4097, 'x');
        let (x, y) = msg.as_bytes().split_at(4000);
        let mut b = masked(false, TEXT, x);
        b.extend(masked(true, CONT, y));
        b
    };
    let cases = vec![
        ("4097 bytes in one frame", one_frame),
        ("4097 bytes in two fragments", fragments),
    ];
    violations(&p, &mut by, "over", &cases, &[1009]);
}

// ---------------------------------------------------------------------------------------------
// Connection flood
// ---------------------------------------------------------------------------------------------

/// The sum of `fedmcp_connections{state=...}` in `/metrics` (the request's own included).
fn connections_held(p: &Proxy) -> u64 {
    let r = p.http("GET", "/metrics", None, None);
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .filter(|l| l.starts_with("fedmcp_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn a_connection_flood_past_max_connections_displaces_unauthenticated_sockets() {
    // Contract v1.1 §1: at FEDMCP_MAX_CONNECTIONS a new connection displaces the oldest held
    // connection that has not presented a valid token; sessions are never displaced.
    const MAX: usize = 64;
    const EXTRA: usize = 50;
    let (p, mut by) = start_with_bystander(&[("FEDMCP_MAX_CONNECTIONS", "64")]);
    // Wait until only the bystander (and the metrics request itself) holds a slot.
    let t0 = Instant::now();
    while connections_held(&p) > 2 {
        assert!(
            t0.elapsed() < WAIT,
            "connections from the setup never closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = rss_kib(p.pid());
    // 64 + 50 new sockets that never send a byte: 63 fit beside the bystander; each of the
    // rest displaces the oldest of them, so the first 51 are dropped (no answer, just EOF).
    let t_open = Instant::now();
    let mut socks: Vec<TcpStream> = Vec::new();
    for _ in 0..MAX + EXTRA {
        let s = TcpStream::connect(p.addr).expect("connect");
        s.set_nonblocking(true).unwrap();
        socks.push(s);
        // One at a time, so "oldest" is well defined for the check below.
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut eof = vec![false; socks.len()];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
    let expect_dropped = MAX + EXTRA - (MAX - 1);
    loop {
        for (i, s) in socks.iter_mut().enumerate() {
            if eof[i] {
                continue;
            }
            let mut chunk = [0u8; 512];
            match s.read(&mut chunk) {
                Ok(0) => eof[i] = true,
                Ok(n) => got[i].extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => eof[i] = true,
            }
        }
        let dropped = eof.iter().filter(|e| **e).count();
        if dropped >= expect_dropped || t_open.elapsed() > Duration::from_secs(8) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let dropped: Vec<usize> = (0..socks.len()).filter(|&i| eof[i]).collect();
    assert!(
        dropped.len() >= expect_dropped && dropped.len() <= expect_dropped + 1,
        "{} sockets dropped, wanted {expect_dropped}: at most {MAX} may be held",
        dropped.len()
    );
    // The oldest were displaced, not the newest; none was answered.
    assert!(
        dropped.iter().all(|&i| i <= expect_dropped),
        "the displaced sockets are the oldest: {dropped:?}"
    );
    assert!(dropped.iter().all(|&i| got[i].is_empty()));
    // The bystander session, opened before the flood, is unaffected while the table is full.
    by.send(&json!({"jsonrpc": "2.0", "id": "full", "method": "federation/servers"}));
    let m = by.recv_id(&json!("full"));
    assert!(m["result"]["servers"].is_array(), "{m}");
    let during = rss_kib(p.pid());
    assert!(
        during.saturating_sub(before) < 8 * 1024,
        "RSS went from {before} KiB to {during} KiB with the table full (limit: +8 MiB)"
    );
    // A member with a valid token gets in while the table is full of idle sockets.
    let (mut late, _) = p.online(&p.federation_token("latecomer"), json!({}));
    late.send(&json!({"jsonrpc": "2.0", "id": "in", "method": "federation/servers"}));
    assert!(late.recv_id(&json!("in"))["result"]["servers"].is_array());
    assert!(
        metric(&p, "fedmcp_connections_displaced_total") >= expect_dropped as f64,
        "displacements are counted"
    );
    drop(socks);
    assert_serving(&p, &mut by, "after-flood");
}

/// A counter's value in `/metrics`.
fn metric(p: &Proxy, name: &str) -> f64 {
    let r = p.http("GET", "/metrics", None, None);
    r.text()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

// ---------------------------------------------------------------------------------------------
// One session against another
// ---------------------------------------------------------------------------------------------

#[test]
fn a_session_cannot_answer_forge_or_redirect_another_sessions_deliveries() {
    let (p, mut bob) = start_with_bystander(&[]);
    let (mut alice, _) = p.online(&p.federation_token("alice"), json!({}));
    let (mut carol, _) = p.online(&p.federation_token("carol"), json!({}));
    let send = |id: &str, params: Value| json!({"jsonrpc": "2.0", "id": id, "method": "federation/send", "params": params});

    // Carol learns how delivery ids look from a delivery of her own.
    alice.send(&send("c1", json!({"to": "carol", "message": 1})));
    let dc = carol.recv_method("federation/deliver");
    let carol_id = dc["id"].as_i64().expect("integer delivery ids");
    carol.answer(&dc, json!("from carol"));
    assert_eq!(alice.recv_id(&json!("c1"))["result"]["status"], "delivered");

    // Alice sends to bob, with a forged `from` in her params: the delivery names alice.
    alice.send(&send(
        "b1",
        json!({"to": "bystander", "message": {"q": 1}, "from": "mallory"}),
    ));
    let d = bob.recv_method("federation/deliver");
    assert_eq!(d["params"]["from"], "alice", "{d}");
    let bob_id = d["id"].as_i64().expect("integer delivery ids");

    // Carol answers every id near bob's (and her own old one), as results and as errors.
    for id in (bob_id - 3..=bob_id + 3).chain([carol_id]) {
        carol.send(&json!({"jsonrpc": "2.0", "id": id, "result": "forged"}));
        carol.send(&json!({"jsonrpc": "2.0", "id": id, "error": {"code": 1, "message": "forged"}}));
    }
    // Stray answers get no reply: carol's next message is the answer to her own request.
    carol.send(&json!({"jsonrpc": "2.0", "id": "cs", "method": "federation/servers"}));
    let m = carol.recv();
    assert_eq!(
        m["id"], "cs",
        "carol was answered something else first: {m}"
    );
    // Alice has not been answered: her next message is the answer to a probe.
    alice.send(&json!({"jsonrpc": "2.0", "id": "probe", "method": "federation/servers"}));
    let m = alice.recv();
    assert_eq!(
        m["id"], "probe",
        "a forged answer settled alice's send: {m}"
    );
    // Bob's real answer settles it.
    bob.answer(&d, json!("real"));
    let m = alice.recv_id(&json!("b1"));
    assert_eq!(m["result"]["status"], "delivered", "{m}");
    assert_eq!(m["result"]["reply"], "real", "{m}");

    // The methods the proxy calls on servers are not callable by a server.
    for method in [
        "federation/deliver",
        "federation/welcome",
        "federation/delivered",
        "federation/tokenExpiring",
    ] {
        carol.send(&json!({"jsonrpc": "2.0", "id": method, "method": method,
                           "params": {"msgId": "x", "from": "alice", "message": 1, "sig": "x"}}));
        let m = carol.recv_id(&json!(method));
        assert_eq!(m["error"]["code"], -32601, "{method}: {m}");
    }
    // Repeated keys are refused, not resolved one way or the other.
    for (what, raw, codes) in [
        (
            "two methods",
            r#"{"jsonrpc":"2.0","id":"k1","method":"federation/servers","method":"federation/send","params":{"to":"bystander","message":1}}"#,
            &[-32600, -32700][..],
        ),
        (
            "two ids",
            r#"{"jsonrpc":"2.0","id":"k2","id":"k3","method":"federation/servers"}"#,
            &[-32600, -32700][..],
        ),
        (
            "two recipients",
            r#"{"jsonrpc":"2.0","id":"k4","method":"federation/send","params":{"to":"carol","to":"bystander","message":1}}"#,
            &[-32602, -32600, -32700][..],
        ),
    ] {
        carol.send_text(raw);
        let m = carol.recv();
        let code = m["error"]["code"].as_i64().unwrap_or(0);
        assert!(codes.contains(&code), "{what}: {m}");
    }
    // Nothing of that reached bob.
    bob.send(&json!({"jsonrpc": "2.0", "id": "quiet", "method": "federation/servers"}));
    let m = bob.recv();
    assert_eq!(m["id"], "quiet", "bob was sent something: {m}");
    assert_serving(&p, &mut bob, "after-forgery");
}

/// Tiny frames in one write: tungstenite reads ahead of the message it returns, so a
/// context in use may hold a whole frame not yet returned. Nothing of it may be lost or
/// overtaken when the session answers in between (its answers are written without the
/// context) or when the context is given back, nor by the proxy's own read of plain text
/// frames: every ping is answered, every request answered, in order.
#[test]
fn frames_read_ahead_are_neither_lost_nor_overtaken() {
    let (p, mut by) = start_with_bystander(&[]);
    let mut a = RawWs::online(&p, &p.federation_token("ahead"));
    for round in 0..20 {
        let mut burst = Vec::new();
        for i in 0..3 {
            burst.extend(masked(true, PING, b""));
            burst.extend(text(servers_req(&format!("r{round}-{i}")).as_bytes()));
            burst.extend(masked(true, PING, b"p"));
        }
        a.write(&burst);
        let (mut pongs, mut answers) = (0, Vec::new());
        while answers.len() < 3 || pongs < 6 {
            match a.next() {
                Frame::Pong(_) => pongs += 1,
                Frame::Text(t) => {
                    let m: Value = serde_json::from_str(&t).expect("JSON");
                    answers.push(m["id"].as_str().unwrap_or_default().to_string());
                }
                Frame::Ping => {}
                f => panic!("round {round}: {f:?}"),
            }
        }
        let want: Vec<String> = (0..3).map(|i| format!("r{round}-{i}")).collect();
        assert_eq!(answers, want, "round {round}: answers in request order");
        assert_eq!(pongs, 6, "round {round}: every ping answered once");
    }
    a.round_trip("after");
    assert_serving(&p, &mut by, "after-read-ahead");
}
