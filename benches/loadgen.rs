//! Load generator: confirmed request/reply forwards per second through the proxy.
//!
//! N pairs of control sessions (sender `a_i`, receiver `b_i`). Each sender keeps `window`
//! `federation/send` requests to its receiver in flight; each receiver answers every
//! `federation/deliver` at once with `{"ok":true}`; a forward counts when the sender holds
//! `{"status":"delivered"}`. The clients are non-blocking `mio` sockets with a hand-rolled
//! RFC 6455 client framing (masked frames built from templates, no per-message allocation),
//! spread over `threads` event loops. The common answers are recognised by their fixed
//! prefix (the proxy writes `{"jsonrpc":"2.0","id":N,...` first); anything else is parsed
//! with serde_json, and one message in `VERIFY_EVERY` is fully parsed and checked.
//!
//! Per-request latency (send written → delivered answer read) goes into a fixed-size
//! log-linear histogram (~3 % resolution). During the measured window the proxy's CPU
//! (`/proc/<pid>/stat` utime+stime, and stime alone: the kernel's share), its RSS (`VmRSS`, `VmHWM`) and the load generator's own
//! CPU are sampled. One machine-readable summary line is printed per run.
//!
//! Options (`--name=value` or the environment variable `LOADGEN_NAME`):
//!   addr      proxy address; unset: spawn the release binary (FEDMCP_BENCH_BIN overrides it)
//!   pid       the proxy's pid for `addr` runs (else found through /proc/net/tcp)
//!   secret    the proxy's JWT secret for `addr` runs (else FEDMCP_JWT_SECRET)
//!   duration  measured seconds (10)          warmup    seconds before measuring (1)
//!   window    requests in flight per pair (64)  pairs  sender/receiver pairs (1)
//!   msg-bytes size of the forwarded `message` JSON (100)
//!   threads   client event loops (1); sessions are spread round-robin over them. One loop
//!             is the default: on a 2-core machine the proxy needs one core, one client loop
//!             drives it to saturation with ~1/4 of the other, and a second client thread only
//!             adds cross-core wake-ups (measured: 1 pair, 64 in flight, 2 threads ~25 % slower)
//!   min-rate  exit 1 when forwards/s is below this (0)
//!   label     a free-form tag echoed in the summary line

mod common;

use common::*;
use mio::{Events, Interest, Poll, Token};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One message in this many is fully parsed and checked (sender answers and deliveries).
const VERIFY_EVERY: u64 = 4096;
/// Slot bits in a request id: `id = counter << SLOT_BITS | slot`.
const SLOT_BITS: u32 = 16;
const READ_BUF: usize = 256 * 1024;
const ID_PREFIX: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":";
const RECEIVER_REPLY: &[u8] = b",\"result\":{\"ok\":true}}";
/// Where the receiver finds the sender's sequence number in a delivery.
const SEQ_NEEDLE: &[u8] = b"\"message\":{\"seq\":";
/// A request unanswered for this long at the end of a run is reported as lost.
const STUCK_AFTER: Duration = Duration::from_secs(1);
/// The proxy's own count of answered deliveries (a cross-check of the client's count).
const DELIVERED: &str = "fedmcp_messages_total{result=\"delivered\"}";

// ---------------------------------------------------------------------------------------------
// Latency histogram: fixed size, log-linear (64 exact buckets, then 32 per octave).
// ---------------------------------------------------------------------------------------------

const HIST_BUCKETS: usize = 64 + 58 * 32;

#[derive(Clone)]
struct Hist {
    counts: Box<[u64; HIST_BUCKETS]>,
    n: u64,
    max: u64,
}

impl Hist {
    fn new() -> Hist {
        Hist {
            counts: Box::new([0; HIST_BUCKETS]),
            n: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 64 {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - 5;
        let mant = (v >> shift) as usize;
        64 + (shift as usize - 1) * 32 + (mant - 32)
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < 64 {
            return i as u64;
        }
        let shift = (i - 64) / 32 + 1;
        let mant = ((i - 64) % 32 + 32) as u64;
        ((mant + 1) << shift) - 1
    }

    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.n += 1;
        self.max = self.max.max(v);
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
        self.n += o.n;
        self.max = self.max.max(o.max);
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }
}

// ---------------------------------------------------------------------------------------------
// Per-thread statistics.
// ---------------------------------------------------------------------------------------------

struct Stats {
    completed: u64,
    sent: u64,
    hist: Hist,
    errors: BTreeMap<String, u64>,
    verified: u64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            completed: 0,
            sent: 0,
            hist: Hist::new(),
            errors: BTreeMap::new(),
            verified: 0,
        }
    }

    fn error(&mut self, what: impl Into<String>) {
        let what = what.into();
        let n = self.errors.entry(what.clone()).or_insert(0);
        *n += 1;
        if *n <= 3 {
            eprintln!("loadgen: {what}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client connections.
// ---------------------------------------------------------------------------------------------

struct Sender {
    /// `,"method":"federation/send","params":{"to":"b_i","message":{"seq":`
    mid: Vec<u8>,
    /// `,"pad":"xxx"}}}`: the message carries the request id as `seq`, so the receiver
    /// can check the order of deliveries.
    tail: Vec<u8>,
    slot_id: Vec<u64>,
    sent_at: Vec<Instant>,
    free: Vec<u32>,
    counter: u64,
    answers: u64,
}

struct Receiver {
    from: String,
    /// The `pad` every message carries.
    pad: String,
    delivers: u64,
    /// The last `seq` delivered: sends from one sender must arrive in order.
    last_seq: u64,
}

enum Role {
    Sender(Sender),
    Receiver(Receiver),
}

struct Client {
    name: String,
    sock: mio::net::TcpStream,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    readable: bool,
    writable: bool,
    closed: bool,
    rng: Rng,
    role: Role,
}

fn parse_u64(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut i = 0;
    while i < b.len() && b[i].is_ascii_digit() {
        v = v.checked_mul(10)?.checked_add((b[i] - b'0') as u64)?;
        i += 1;
    }
    (i > 0).then_some((v, i))
}

impl Client {
    /// Reads until `WouldBlock`, handling every complete frame.
    fn on_readable(&mut self, now: Instant, measuring: bool, st: &mut Stats) {
        while self.readable && !self.closed {
            if self.rend == self.rbuf.len() {
                if self.rstart > 0 {
                    self.rbuf.copy_within(self.rstart..self.rend, 0);
                    self.rend -= self.rstart;
                    self.rstart = 0;
                } else {
                    let n = self.rbuf.len();
                    self.rbuf.resize(n * 2, 0);
                }
            }
            match self.sock.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => {
                    st.error(format!("{}: connection closed by the proxy", self.name));
                    self.closed = true;
                }
                Ok(n) => {
                    self.rend += n;
                    self.frames(now, measuring, st);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    st.error(format!("{}: read failed: {e}", self.name));
                    self.closed = true;
                }
            }
        }
    }

    fn frames(&mut self, now: Instant, measuring: bool, st: &mut Stats) {
        loop {
            let f = match decode_frame(&self.rbuf[self.rstart..self.rend]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    st.error(format!("{}: {e}", self.name));
                    self.closed = true;
                    return;
                }
            };
            let (a, b) = (self.rstart + f.start, self.rstart + f.end);
            self.rstart += f.end;
            // Split borrows: the payload lives in rbuf; output goes to wbuf.
            let payload = std::mem::take(&mut self.rbuf);
            match f.opcode {
                OP_TEXT if f.fin => self.on_text(&payload[a..b], now, measuring, st),
                OP_PING => {
                    let mask = self.rng.next_u32();
                    encode_frame(&mut self.wbuf, OP_PONG, &payload[a..b], mask);
                }
                OP_PONG => {}
                OP_CLOSE => {
                    let p = &payload[a..b];
                    let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                    st.error(format!(
                        "{}: closed by the proxy, code {code:?} {:?}",
                        self.name,
                        String::from_utf8_lossy(p.get(2..).unwrap_or_default())
                    ));
                    self.closed = true;
                }
                op => st.error(format!(
                    "{}: unexpected frame opcode {op} fin {}",
                    self.name, f.fin
                )),
            }
            self.rbuf = payload;
            if self.closed {
                return;
            }
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
    }

    fn on_text(&mut self, text: &[u8], now: Instant, measuring: bool, st: &mut Stats) {
        match &mut self.role {
            Role::Sender(s) => {
                // Fast path: {"jsonrpc":"2.0","id":N,"result":{"msgId":"..","status":"delivered"
                if let Some(rest) = text.strip_prefix(ID_PREFIX)
                    && let Some((id, n)) = parse_u64(rest)
                    && let Some(rest) = rest[n..].strip_prefix(b",\"result\":{\"msgId\":\"")
                    && let Some(q) = rest.iter().position(|&c| c == b'"')
                    && rest[q..].starts_with(b"\",\"status\":\"delivered\"")
                {
                    s.answers += 1;
                    if s.answers.is_multiple_of(VERIFY_EVERY) {
                        verify_answer(text, st);
                    }
                    complete(s, id, now, measuring, st, &self.name);
                    return;
                }
                slow_sender(s, text, now, measuring, st, &self.name);
            }
            Role::Receiver(r) => {
                if let Some(rest) = text.strip_prefix(ID_PREFIX)
                    && let Some((_, n)) = parse_u64(rest)
                    && rest[n..].starts_with(b",\"method\":\"federation/deliver\"")
                {
                    r.delivers += 1;
                    match find(&rest[n..], SEQ_NEEDLE)
                        .and_then(|i| parse_u64(&rest[n + i + SEQ_NEEDLE.len()..]))
                    {
                        Some((seq, _)) if seq > r.last_seq => r.last_seq = seq,
                        Some((seq, _)) => st.error(format!(
                            "{}: delivery out of order: seq {seq} after {}",
                            self.name, r.last_seq
                        )),
                        None => st.error(format!("{}: delivery without a seq", self.name)),
                    }
                    if r.delivers.is_multiple_of(VERIFY_EVERY) {
                        verify_deliver(text, &r.from, &r.pad, st);
                    }
                    let mask = self.rng.next_u32();
                    encode_frame_parts(
                        &mut self.wbuf,
                        OP_TEXT,
                        &[ID_PREFIX, &rest[..n], RECEIVER_REPLY],
                        mask,
                    );
                    return;
                }
                // Anything else: parse it; answer any deliver request, ignore notifications.
                let v: serde_json::Value = match serde_json::from_slice(text) {
                    Ok(v) => v,
                    Err(e) => {
                        st.error(format!("{}: unparseable message: {e}", self.name));
                        return;
                    }
                };
                match (v.get("id"), v["method"].as_str()) {
                    (Some(id), Some("federation/deliver")) => {
                        let id = id.to_string();
                        let mask = self.rng.next_u32();
                        encode_frame_parts(
                            &mut self.wbuf,
                            OP_TEXT,
                            &[ID_PREFIX, id.as_bytes(), RECEIVER_REPLY],
                            mask,
                        );
                    }
                    (None, Some(_)) => {} // notifications (tokenExpiring, ...)
                    _ => st.error(format!("{}: unexpected message {v}", self.name)),
                }
            }
        }
    }

    /// Fills the sender's window with `federation/send` requests.
    fn top_up(&mut self, now: Instant, measuring: bool, st: &mut Stats) {
        let Role::Sender(s) = &mut self.role else {
            return;
        };
        let mut digits = [0u8; 20];
        while let Some(slot) = s.free.pop() {
            s.counter += 1;
            let id = (s.counter << SLOT_BITS) | slot as u64;
            s.slot_id[slot as usize] = id;
            s.sent_at[slot as usize] = now;
            let d = fmt_u64(id, &mut digits);
            let mask = self.rng.next_u32();
            encode_frame_parts(
                &mut self.wbuf,
                OP_TEXT,
                &[ID_PREFIX, d, &s.mid, d, &s.tail],
                mask,
            );
            if measuring {
                st.sent += 1;
            }
        }
    }

    fn flush(&mut self, st: &mut Stats) {
        while self.wpos < self.wbuf.len() && self.writable && !self.closed {
            match self.sock.write(&self.wbuf[self.wpos..]) {
                Ok(0) => {
                    st.error(format!("{}: write returned 0", self.name));
                    self.closed = true;
                }
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    st.error(format!("{}: write failed: {e}", self.name));
                    self.closed = true;
                }
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn fmt_u64(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

fn complete(s: &mut Sender, id: u64, now: Instant, measuring: bool, st: &mut Stats, name: &str) {
    let slot = (id & ((1 << SLOT_BITS) - 1)) as usize;
    if s.slot_id.get(slot) != Some(&id) {
        st.error(format!("{name}: answer to an unknown request id {id}"));
        return;
    }
    s.slot_id[slot] = 0;
    s.free.push(slot as u32);
    if measuring {
        st.completed += 1;
        st.hist
            .record(now.saturating_duration_since(s.sent_at[slot]).as_nanos() as u64);
    }
}

/// Answers the fast path did not recognise: errors (freeing the slot), notifications.
fn slow_sender(
    s: &mut Sender,
    text: &[u8],
    now: Instant,
    measuring: bool,
    st: &mut Stats,
    name: &str,
) {
    let v: serde_json::Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => {
            st.error(format!("{name}: unparseable message: {e}"));
            return;
        }
    };
    if v.get("method").is_some() {
        if v.get("id").is_some() {
            st.error(format!("{name}: unexpected request {v}"));
        }
        return;
    }
    let Some(id) = v["id"].as_u64() else {
        st.error(format!("{name}: answer without a numeric id: {v}"));
        return;
    };
    if let Some(e) = v.get("error") {
        let reason = e["data"]["reason"].as_str().unwrap_or("?").to_string();
        st.error(format!("send error {reason}"));
    } else {
        let status = v["result"]["status"].as_str().unwrap_or("?");
        if status == "delivered" {
            // Delivered, just not in the byte layout the fast path expects.
            complete(s, id, now, measuring, st, name);
            return;
        }
        st.error(format!("send status {status}"));
    }
    // The request is over either way: give its slot back (not counted as a forward).
    let slot = (id & ((1 << SLOT_BITS) - 1)) as usize;
    if s.slot_id.get(slot) == Some(&id) {
        s.slot_id[slot] = 0;
        s.free.push(slot as u32);
    }
}

fn verify_answer(text: &[u8], st: &mut Stats) {
    let v: serde_json::Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return st.error(format!("verify: answer is not JSON: {e}")),
    };
    let r = &v["result"];
    if v["jsonrpc"] != "2.0"
        || !r["msgId"].is_string()
        || r["status"] != "delivered"
        || r["reply"] != serde_json::json!({"ok": true})
    {
        st.error(format!("verify: unexpected answer {v}"));
    } else {
        st.verified += 1;
    }
}

fn verify_deliver(text: &[u8], from: &str, pad: &str, st: &mut Stats) {
    #[derive(serde::Deserialize)]
    struct Deliver<'a> {
        jsonrpc: &'a str,
        #[serde(borrow)]
        params: Params<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Params<'a> {
        #[serde(rename = "msgId")]
        msg_id: &'a str,
        from: &'a str,
        #[serde(borrow)]
        message: Message<'a>,
        #[serde(rename = "sentAt")]
        sent_at: i64,
        sig: &'a str,
    }
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        seq: u64,
        pad: &'a str,
    }
    match serde_json::from_slice::<Deliver>(text) {
        Ok(d)
            if d.jsonrpc == "2.0"
                && !d.params.msg_id.is_empty()
                && d.params.from == from
                && d.params.message.seq > 0
                && d.params.message.pad == pad
                && d.params.sent_at > 0
                && !d.params.sig.is_empty() =>
        {
            st.verified += 1
        }
        Ok(_) => st.error(format!(
            "verify: unexpected deliver {}",
            String::from_utf8_lossy(text)
        )),
        Err(e) => st.error(format!("verify: deliver does not parse: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// One client event loop.
// ---------------------------------------------------------------------------------------------

struct Plan {
    measure_at: Instant,
    end_at: Instant,
}

fn run_loop(mut clients: Vec<Client>, plan: Arc<Plan>, stop: Arc<AtomicBool>) -> Stats {
    let mut st = Stats::new();
    let mut poll = Poll::new().expect("poll");
    for (i, c) in clients.iter_mut().enumerate() {
        poll.registry()
            .register(
                &mut c.sock,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .expect("register");
        c.readable = true;
        c.writable = true;
    }
    let mut events = Events::with_capacity(1024);
    let mut measuring = false;
    loop {
        let now = Instant::now();
        if now >= plan.end_at || stop.load(Ordering::Relaxed) {
            break;
        }
        if !measuring && now >= plan.measure_at {
            measuring = true;
            let errors = std::mem::take(&mut st.errors);
            st = Stats::new();
            st.errors = errors;
        }
        for c in clients.iter_mut().filter(|c| !c.closed) {
            if c.readable {
                c.on_readable(now, measuring, &mut st);
            }
        }
        let now = Instant::now();
        for c in clients.iter_mut().filter(|c| !c.closed) {
            c.top_up(now, measuring, &mut st);
            c.flush(&mut st);
        }
        if clients.iter().all(|c| c.closed) {
            break;
        }
        let timeout = plan
            .end_at
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(10));
        if let Err(e) = poll.poll(&mut events, Some(timeout))
            && e.kind() != io::ErrorKind::Interrupted
        {
            panic!("poll: {e}");
        }
        for ev in events.iter() {
            let c = &mut clients[ev.token().0];
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                c.readable = true;
            }
            if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                c.writable = true;
            }
        }
    }
    // Requests still unanswered long after they were sent: an answer was lost (or stalled).
    let now = Instant::now();
    for c in &clients {
        if let Role::Sender(s) = &c.role {
            let stuck = s
                .slot_id
                .iter()
                .zip(&s.sent_at)
                .filter(|(id, at)| **id != 0 && now.duration_since(**at) > STUCK_AFTER)
                .count();
            if stuck > 0 {
                st.error(format!(
                    "{}: {stuck} requests unanswered for over {STUCK_AFTER:?} at the end",
                    c.name
                ));
            }
        }
    }
    st
}

// ---------------------------------------------------------------------------------------------
// Setup and the run.
// ---------------------------------------------------------------------------------------------

/// The `pad` of a message of about `bytes` bytes: `{"seq":ID,"pad":"xxx..."}` is 19 bytes
/// of structure and an id of about 8 digits.
fn pad_of(bytes: usize) -> String {
    "x".repeat(bytes.saturating_sub(27))
}

fn to_client(name: String, s: Session, role: Role) -> Client {
    s.sock.set_read_timeout(None).expect("clear timeout");
    s.sock.set_nonblocking(true).expect("non-blocking");
    let mut rbuf = vec![0u8; READ_BUF.max(s.rbuf.len() * 2)];
    let pending = s.rbuf.len();
    rbuf[..pending].copy_from_slice(&s.rbuf);
    Client {
        name,
        sock: mio::net::TcpStream::from_std(s.sock),
        rbuf,
        rstart: 0,
        rend: pending,
        wbuf: Vec::with_capacity(64 * 1024),
        wpos: 0,
        readable: true,
        writable: true,
        closed: false,
        rng: s.rng,
        role,
    }
}

fn main() {
    let o = Opts::new("LOADGEN");
    let duration: f64 = o.parse("duration", 10.0);
    let warmup: f64 = o.parse("warmup", 1.0);
    let window: usize = o.parse("window", 64);
    let pairs: usize = o.parse("pairs", 1);
    let msg_bytes: usize = o.parse("msg-bytes", 100);
    let threads: usize = o.parse("threads", 1).max(1);
    let min_rate: f64 = o.parse("min-rate", 0.0);
    let label = o.get("label").unwrap_or_default();
    let load_before = loadavg1();
    assert!(
        (1..1 << SLOT_BITS).contains(&window),
        "window must be 1..65535"
    );
    assert!(pairs >= 1, "pairs must be at least 1");

    let mut proxy = match o.get("addr") {
        Some(a) => {
            let addr: SocketAddr = a.parse().expect("--addr HOST:PORT");
            let pid = o
                .get("pid")
                .and_then(|p| p.parse().ok())
                .or_else(|| pid_listening_on(addr))
                .unwrap_or(0);
            let secret = o
                .get("secret")
                .or_else(|| std::env::var("FEDMCP_JWT_SECRET").ok())
                .expect("--secret or FEDMCP_JWT_SECRET is needed with --addr");
            if pid == 0 {
                eprintln!("loadgen: proxy pid unknown: no proxy CPU/RSS figures");
            }
            ProxyProc::external(addr, pid, secret)
        }
        None => ProxyProc::spawn(&[
            // The default limit (1000/s per session) would be the benchmark's ceiling.
            ("FEDMCP_RATE_LIMIT", "1000000/s,burst=10000000".into()),
            ("FEDMCP_MAX_CONNECTIONS", "4096".into()),
        ]),
    };
    let addr = proxy.addr;
    let admin = proxy.admin_token();
    let tag = std::process::id();
    let pad = pad_of(msg_bytes);

    // Receivers first, so that every receiver is online before any sender starts.
    let mut rng = Rng::seeded();
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for i in 0..pairs {
        let a = format!("lg{tag}-a{i}");
        let b = format!("lg{tag}-b{i}");
        let tb = proxy.register(&admin, &b);
        let ta = proxy.register(&admin, &a);
        let mut sb = Session::open(addr, &tb, rng.next_u32() as u64)
            .unwrap_or_else(|e| panic!("session {b}: {e}"));
        sb.sync().unwrap_or_else(|e| panic!("session {b}: {e}"));
        let mut sa = Session::open(addr, &ta, rng.next_u32() as u64)
            .unwrap_or_else(|e| panic!("session {a}: {e}"));
        sa.sync().unwrap_or_else(|e| panic!("session {a}: {e}"));
        receivers.push(to_client(
            b.clone(),
            sb,
            Role::Receiver(Receiver {
                from: a.clone(),
                pad: pad.clone(),
                delivers: 0,
                last_seq: 0,
            }),
        ));
        let mid = format!(
            ",\"method\":\"federation/send\",\"params\":{{\"to\":\"{b}\",\"message\":{{\"seq\":"
        );
        let tail = format!(",\"pad\":\"{pad}\"}}}}}}");
        senders.push(to_client(
            a,
            sa,
            Role::Sender(Sender {
                mid: mid.into_bytes(),
                tail: tail.into_bytes(),
                slot_id: vec![0; window],
                sent_at: vec![Instant::now(); window],
                free: (0..window as u32).rev().collect(),
                counter: 0,
                answers: 0,
            }),
        ));
    }

    // Spread sessions over the loops: a_0, b_0, a_1, b_1, ... round-robin.
    let mut per_thread: Vec<Vec<Client>> = (0..threads).map(|_| Vec::new()).collect();
    let mut k = 0;
    for (a, b) in senders.into_iter().zip(receivers) {
        per_thread[k % threads].push(a);
        k += 1;
        per_thread[k % threads].push(b);
        k += 1;
    }
    per_thread.retain(|v| !v.is_empty());
    let used_threads = per_thread.len();

    let start = Instant::now();
    let plan = Arc::new(Plan {
        measure_at: start + Duration::from_secs_f64(warmup),
        end_at: start + Duration::from_secs_f64(warmup + duration),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = per_thread
        .into_iter()
        .map(|clients| {
            let plan = plan.clone();
            let stop = stop.clone();
            std::thread::spawn(move || run_loop(clients, plan, stop))
        })
        .collect();

    // Sample CPU at the edges of the measured window, RSS through it.
    let tck = clk_tck();
    let pid = proxy.pid;
    std::thread::sleep(plan.measure_at.saturating_duration_since(Instant::now()));
    let t0 = Instant::now();
    let p0 = if pid > 0 { cpu_ticks_split(pid) } else { None };
    let s0 = cpu_ticks(0);
    let m0 = metric(addr, DELIVERED);
    let mut rss_max = 0u64;
    while Instant::now() < plan.end_at {
        if pid > 0 {
            rss_max = rss_max.max(status_kib(pid, "VmRSS").unwrap_or(0));
        }
        let left = plan.end_at.saturating_duration_since(Instant::now());
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
    let p1 = if pid > 0 { cpu_ticks_split(pid) } else { None };
    let s1 = cpu_ticks(0);
    let elapsed = t0.elapsed().as_secs_f64();
    let m1 = metric(addr, DELIVERED);
    let hwm = if pid > 0 {
        status_kib(pid, "VmHWM").unwrap_or(0)
    } else {
        0
    };
    stop.store(true, Ordering::Relaxed);

    let mut total = Stats::new();
    for h in handles {
        let st = h.join().expect("client thread");
        total.completed += st.completed;
        total.sent += st.sent;
        total.verified += st.verified;
        total.hist.merge(&st.hist);
        for (k, v) in st.errors {
            *total.errors.entry(k).or_insert(0) += v;
        }
    }
    let alive = proxy.is_running();
    if !alive {
        total.error("the proxy exited during the run");
    }

    let pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => (b.saturating_sub(a)) as f64 / tck / elapsed * 100.0,
        _ => -1.0,
    };
    let proxy_total = pct(p0.map(|(u, s)| u + s), p1.map(|(u, s)| u + s));
    let proxy_sys = pct(p0.map(|(_, s)| s), p1.map(|(_, s)| s));
    let rate = total.completed as f64 / elapsed;
    let us = |ns: u64| ns as f64 / 1000.0;
    let errors: u64 = total.errors.values().sum();
    println!(
        "loadgen{} pairs={pairs} window={window} msg_bytes={msg_bytes} threads={used_threads} duration_s={elapsed:.2} forwards={} forwards_per_sec={rate:.0} proxy_cpu_pct={:.1} proxy_sys_pct={:.1} loadgen_cpu_pct={:.1} proxy_rss_kib={rss_max} proxy_hwm_kib={hwm} p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} proxy_delivered_per_sec={:.0} verified={} errors={errors} load1_before={:.2}",
        if label.is_empty() {
            String::new()
        } else {
            format!(" label={label}")
        },
        total.completed,
        proxy_total,
        proxy_sys,
        pct(s0, s1),
        us(total.hist.quantile(0.50)),
        us(total.hist.quantile(0.90)),
        us(total.hist.quantile(0.99)),
        us(total.hist.quantile(0.999)),
        us(total.hist.max),
        match (m0, m1) {
            (Some(a), Some(b)) => (b - a) / elapsed,
            _ => -1.0,
        },
        total.verified,
        load_before,
    );
    let mut fail = false;
    if errors > 0 {
        for (k, v) in &total.errors {
            eprintln!("loadgen: error x{v}: {k}");
        }
        let tail = proxy.stderr_tail(20);
        if !tail.is_empty() {
            eprintln!("loadgen: proxy stderr (tail):\n{tail}");
        }
        fail = true;
    }
    if rate < min_rate {
        eprintln!("loadgen: {rate:.0} forwards/s is below the bar of {min_rate:.0}");
        fail = true;
    }
    drop(proxy);
    if fail {
        std::process::exit(1);
    }
}
