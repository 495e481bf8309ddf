//! Cluster benchmark (contract §4, §10): what carrying a send over NATS costs, in one run on
//! loopback, against the same workload on one proxy and against nats-server's own
//! request/reply.
//!
//! Three workloads, one after the other, each with the same window of outstanding requests,
//! warm-up and measured duration:
//!
//! 1. **cross-proxy**: one `nats-server -js`, two proxies of one cluster on it (shared JWT
//!    secret, memory-only state). Member A on proxy 1 keeps `window` `federation/send`
//!    requests to member B on proxy 2 in flight; B answers every `federation/deliver` at once
//!    with `{"ok":true}`; a send is *confirmed* when A holds `"status":"delivered"`.
//! 2. **one proxy**: the same two members on one proxy alone (no NATS).
//! 3. **nats-server req/reply**: two NATS client connections written here with the project's
//!    codec (`fedmcp::proto::nats`): a requester keeps `window` requests (`PUB` with a reply
//!    subject under a wildcard inbox, as the proxy's own requests are) in flight, a responder
//!    answers each; the payloads are the size of the proxy's own remote delivery (`C.msg.N`)
//!    and of its answer, built from the same templates as in `src/federation/cluster.rs`.
//!
//! The clients are non-blocking `mio` sockets in one event loop (as in `loadgen.rs`: on a
//! 2-core machine one client loop with few wake-ups disturbs the servers least), the
//! WebSocket framing and process statistics are `benches/common`'s. Latency is from the
//! request's encoding to its answer's read, in a log-linear histogram (~3 % resolution). CPU
//! seconds are `utime + stime` from `/proc/<pid>/stat` over the measured window, for the
//! proxies, the nats-server and this client process. Messages are checked as they come: the
//! receiver sees sends in order (per sender and recipient, §10), and one message in
//! `VERIFY_EVERY` is fully parsed and checked.
//!
//! Prints a Markdown report: command, machine, a table (confirmed/s, p50, p99, CPU seconds)
//! and per-workload details (counts, longest pause with no confirmation, errors, the tail of
//! a proxy's stderr when it logged anything).
//!
//! Options (`--name=value`, `--name value`, or `CLUSTER_BENCH_NAME`):
//!   duration   measured seconds per workload (10)   warmup  seconds before measuring (1)
//!   window     requests in flight (64)              msg-bytes  size of the `message` (100)
//!   label      a free-form tag for the report
//!   min-rate   exit 1 when the cross-proxy rate is below this (0)
//!   nats-server  the binary (default /usr/sbin/nats-server)
//! `FEDMCP_BENCH_BIN` picks the proxy binary (default: the one cargo built). Exit 1 also when
//! any workload saw an error (a refused send, a lost answer, a closed connection, a proxy
//! exit), with what was seen.

mod common;

use common::*;
use fedmcp::proto::nats::{self, ConnectOpts, Limits, ServerOp};
use mio::{Events, Interest, Poll, Token};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One message in this many is fully parsed and checked.
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
/// How long a proxy may take to answer `readyz` 200, and a member to show online.
const READY_WAIT: Duration = Duration::from_secs(30);
/// The NATS subjects of workload 3.
const NATS_REQ_SUBJECT: &str = "bench.req";
const NATS_INBOX: &str = "bench.in.";
/// The proxy's answer to a remote delivery (`reply_outcome_remote`/`reply_remote` shapes).
const NATS_REPLY_PAYLOAD: &[u8] = b"{\"answer\":{\"ok\":true}}";

// ---------------------------------------------------------------------------------------------
// Latency histogram: fixed size, log-linear (64 exact buckets, then 32 per octave).
// ---------------------------------------------------------------------------------------------

const HIST_BUCKETS: usize = 64 + 58 * 32;

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
// Statistics of one workload's client loop.
// ---------------------------------------------------------------------------------------------

struct Stats {
    completed: u64,
    hist: Hist,
    errors: BTreeMap<String, u64>,
    verified: u64,
    /// The last confirmation (or the start of the measured window), and the longest time
    /// between two confirmations in the measured window: a stall shows here.
    last_done: Option<Instant>,
    max_gap: Duration,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            completed: 0,
            hist: Hist::new(),
            errors: BTreeMap::new(),
            verified: 0,
            last_done: None,
            max_gap: Duration::ZERO,
        }
    }

    fn error(&mut self, what: impl Into<String>) {
        let what = what.into();
        let n = self.errors.entry(what.clone()).or_insert(0);
        *n += 1;
        if *n <= 3 {
            eprintln!("cluster bench: {what}");
        }
    }

    fn done(&mut self, sent_at: Instant, now: Instant, measuring: bool) {
        if !measuring {
            return;
        }
        self.completed += 1;
        self.hist
            .record(now.saturating_duration_since(sent_at).as_nanos() as u64);
        if let Some(l) = self.last_done {
            self.max_gap = self.max_gap.max(now.saturating_duration_since(l));
        }
        self.last_done = Some(now);
    }
}

// ---------------------------------------------------------------------------------------------
// The window of outstanding requests.
// ---------------------------------------------------------------------------------------------

struct Window {
    slot_id: Vec<u64>,
    sent_at: Vec<Instant>,
    free: Vec<u32>,
    counter: u64,
}

impl Window {
    fn new(n: usize) -> Window {
        Window {
            slot_id: vec![0; n],
            sent_at: vec![Instant::now(); n],
            free: (0..n as u32).rev().collect(),
            counter: 0,
        }
    }

    /// A fresh request id for a free slot, if any.
    fn take(&mut self, now: Instant) -> Option<u64> {
        let slot = self.free.pop()?;
        self.counter += 1;
        let id = (self.counter << SLOT_BITS) | slot as u64;
        self.slot_id[slot as usize] = id;
        self.sent_at[slot as usize] = now;
        Some(id)
    }

    /// Frees the slot of request `id`: when it was sent, or `None` for an unknown id.
    fn finish(&mut self, id: u64) -> Option<Instant> {
        let slot = (id & ((1 << SLOT_BITS) - 1)) as usize;
        if self.slot_id.get(slot) != Some(&id) {
            return None;
        }
        self.slot_id[slot] = 0;
        self.free.push(slot as u32);
        Some(self.sent_at[slot])
    }

    fn stuck(&self, now: Instant) -> usize {
        self.slot_id
            .iter()
            .zip(&self.sent_at)
            .filter(|(id, at)| **id != 0 && now.duration_since(**at) > STUCK_AFTER)
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// Client connections: socket buffers, and what the connection does.
// ---------------------------------------------------------------------------------------------

struct Io {
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
}

enum Role {
    /// A WebSocket member sending `federation/send` requests.
    WsSender {
        win: Window,
        /// `,"method":"federation/send","params":{"to":"B","message":{"seq":`
        mid: Vec<u8>,
        /// `,"pad":"xxx"}}}`
        tail: Vec<u8>,
        answers: u64,
    },
    /// A WebSocket member answering `federation/deliver` requests.
    WsReceiver {
        from: String,
        pad: String,
        delivers: u64,
        last_seq: u64,
        /// The first delivery's `msgId` (sizes the NATS payload of workload 3).
        sample_msg_id: Option<String>,
    },
    /// A NATS client publishing requests with a reply subject `bench.in.<id>`.
    NatsRequester {
        win: Window,
        payload: Vec<u8>,
        reply_subject: String,
        replies: u64,
    },
    /// A NATS client answering each request on its reply subject.
    NatsResponder {
        request_len: usize,
        requests: u64,
        last_id: u64,
    },
}

struct Conn {
    io: Io,
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

impl Conn {
    /// Reads until `WouldBlock`, handling every complete frame or op.
    fn on_readable(&mut self, now: Instant, measuring: bool, st: &mut Stats) {
        while self.io.readable && !self.io.closed {
            let io = &mut self.io;
            if io.rend == io.rbuf.len() {
                if io.rstart > 0 {
                    io.rbuf.copy_within(io.rstart..io.rend, 0);
                    io.rend -= io.rstart;
                    io.rstart = 0;
                } else {
                    let n = io.rbuf.len();
                    io.rbuf.resize(n * 2, 0);
                }
            }
            match io.sock.read(&mut io.rbuf[io.rend..]) {
                Ok(0) => {
                    st.error(format!("{}: connection closed by the peer", io.name));
                    io.closed = true;
                }
                Ok(n) => {
                    io.rend += n;
                    match self.role {
                        Role::WsSender { .. } | Role::WsReceiver { .. } => {
                            ws_frames(&mut self.io, &mut self.role, now, measuring, st)
                        }
                        _ => nats_ops(&mut self.io, &mut self.role, now, measuring, st),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    st.error(format!("{}: read failed: {e}", io.name));
                    io.closed = true;
                }
            }
        }
    }

    /// Fills a requester's window.
    fn top_up(&mut self, now: Instant) {
        let io = &mut self.io;
        let mut digits = [0u8; 20];
        match &mut self.role {
            Role::WsSender { win, mid, tail, .. } => {
                while let Some(id) = win.take(now) {
                    let d = fmt_u64(id, &mut digits);
                    let mask = io.rng.next_u32();
                    encode_frame_parts(&mut io.wbuf, OP_TEXT, &[ID_PREFIX, d, mid, d, tail], mask);
                }
            }
            Role::NatsRequester {
                win,
                payload,
                reply_subject,
                ..
            } => {
                while let Some(id) = win.take(now) {
                    reply_subject.truncate(NATS_INBOX.len());
                    let d = fmt_u64(id, &mut digits);
                    // Digits only: always UTF-8.
                    reply_subject.push_str(std::str::from_utf8(d).unwrap_or("0"));
                    nats::publish(&mut io.wbuf, NATS_REQ_SUBJECT, Some(reply_subject), payload);
                }
            }
            _ => {}
        }
    }

    fn flush(&mut self, st: &mut Stats) {
        let io = &mut self.io;
        while io.wpos < io.wbuf.len() && io.writable && !io.closed {
            match io.sock.write(&io.wbuf[io.wpos..]) {
                Ok(0) => {
                    st.error(format!("{}: write returned 0", io.name));
                    io.closed = true;
                }
                Ok(n) => io.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    st.error(format!("{}: write failed: {e}", io.name));
                    io.closed = true;
                }
            }
        }
        if io.wpos == io.wbuf.len() {
            io.wbuf.clear();
            io.wpos = 0;
        }
    }

    fn stuck(&self, now: Instant) -> usize {
        match &self.role {
            Role::WsSender { win, .. } | Role::NatsRequester { win, .. } => win.stuck(now),
            _ => 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket members.
// ---------------------------------------------------------------------------------------------

fn ws_frames(io: &mut Io, role: &mut Role, now: Instant, measuring: bool, st: &mut Stats) {
    loop {
        let f = match decode_frame(&io.rbuf[io.rstart..io.rend]) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                st.error(format!("{}: {e}", io.name));
                io.closed = true;
                return;
            }
        };
        let (a, b) = (io.rstart + f.start, io.rstart + f.end);
        io.rstart += f.end;
        match f.opcode {
            OP_TEXT if f.fin => {
                let text = &io.rbuf[a..b];
                match role {
                    Role::WsSender { .. } => sender_text(role, text, &io.name, now, measuring, st),
                    _ => receiver_text(role, text, &mut io.wbuf, &mut io.rng, &io.name, st),
                }
            }
            OP_PING => {
                let mask = io.rng.next_u32();
                encode_frame(&mut io.wbuf, OP_PONG, &io.rbuf[a..b], mask);
            }
            OP_PONG => {}
            OP_CLOSE => {
                let p = &io.rbuf[a..b];
                let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                st.error(format!(
                    "{}: closed by the proxy, code {code:?} {:?}",
                    io.name,
                    String::from_utf8_lossy(p.get(2..).unwrap_or_default())
                ));
                io.closed = true;
                return;
            }
            op => st.error(format!(
                "{}: unexpected frame opcode {op} fin {}",
                io.name, f.fin
            )),
        }
    }
    if io.rstart == io.rend {
        io.rstart = 0;
        io.rend = 0;
    }
}

fn sender_text(
    role: &mut Role,
    text: &[u8],
    name: &str,
    now: Instant,
    measuring: bool,
    st: &mut Stats,
) {
    let Role::WsSender { win, answers, .. } = role else {
        return;
    };
    // Fast path: {"jsonrpc":"2.0","id":N,"result":{"msgId":"..","status":"delivered"
    if let Some(rest) = text.strip_prefix(ID_PREFIX)
        && let Some((id, n)) = parse_u64(rest)
        && let Some(rest) = rest[n..].strip_prefix(b",\"result\":{\"msgId\":\"")
        && let Some(q) = rest.iter().position(|&c| c == b'"')
        && rest[q..].starts_with(b"\",\"status\":\"delivered\"")
    {
        *answers += 1;
        if answers.is_multiple_of(VERIFY_EVERY) {
            verify_answer(text, st);
        }
        match win.finish(id) {
            Some(at) => st.done(at, now, measuring),
            None => st.error(format!("{name}: answer to an unknown request id {id}")),
        }
        return;
    }
    let v: serde_json::Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return st.error(format!("{name}: unparseable message: {e}")),
    };
    if v.get("method").is_some() {
        if v.get("id").is_some() {
            st.error(format!("{name}: unexpected request {v}"));
        }
        return; // notifications (tokenExpiring, ...)
    }
    let Some(id) = v["id"].as_u64() else {
        return st.error(format!("{name}: answer without a numeric id: {v}"));
    };
    let at = win.finish(id);
    if let Some(e) = v.get("error") {
        let reason = e["data"]["reason"].as_str().unwrap_or("?");
        st.error(format!("{name}: send error {} {reason}", e["code"]));
    } else if v["result"]["status"] == "delivered" {
        // Delivered, just not in the byte layout the fast path expects.
        match at {
            Some(at) => st.done(at, now, measuring),
            None => st.error(format!("{name}: answer to an unknown request id {id}")),
        }
    } else {
        st.error(format!("{name}: send status {}", v["result"]["status"]));
    }
}

fn receiver_text(
    role: &mut Role,
    text: &[u8],
    wbuf: &mut Vec<u8>,
    rng: &mut Rng,
    name: &str,
    st: &mut Stats,
) {
    let Role::WsReceiver {
        from,
        pad,
        delivers,
        last_seq,
        sample_msg_id,
    } = role
    else {
        return;
    };
    if let Some(rest) = text.strip_prefix(ID_PREFIX)
        && let Some((_, n)) = parse_u64(rest)
        && rest[n..].starts_with(b",\"method\":\"federation/deliver\"")
    {
        *delivers += 1;
        match find(&rest[n..], SEQ_NEEDLE)
            .and_then(|i| parse_u64(&rest[n + i + SEQ_NEEDLE.len()..]))
        {
            Some((seq, _)) if seq > *last_seq => *last_seq = seq,
            Some((seq, _)) => st.error(format!(
                "{name}: delivery out of order: seq {seq} after {last_seq}"
            )),
            None => st.error(format!("{name}: delivery without a seq")),
        }
        if (*delivers == 1 || delivers.is_multiple_of(VERIFY_EVERY))
            && let Some(id) = verify_deliver(text, from, pad, st)
            && sample_msg_id.is_none()
        {
            *sample_msg_id = Some(id);
        }
        let mask = rng.next_u32();
        encode_frame_parts(
            wbuf,
            OP_TEXT,
            &[ID_PREFIX, &rest[..n], RECEIVER_REPLY],
            mask,
        );
        return;
    }
    // Anything else: parse it; answer any deliver request, ignore notifications.
    let v: serde_json::Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return st.error(format!("{name}: unparseable message: {e}")),
    };
    match (v.get("id"), v["method"].as_str()) {
        (Some(id), Some("federation/deliver")) => {
            let id = id.to_string();
            let mask = rng.next_u32();
            encode_frame_parts(
                wbuf,
                OP_TEXT,
                &[ID_PREFIX, id.as_bytes(), RECEIVER_REPLY],
                mask,
            );
        }
        (None, Some(_)) => {}
        _ => st.error(format!("{name}: unexpected message {v}")),
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

/// Checks a delivery in full; its `msgId` when it is as expected.
fn verify_deliver(text: &[u8], from: &str, pad: &str, st: &mut Stats) -> Option<String> {
    let v: serde_json::Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => {
            st.error(format!("verify: deliver is not JSON: {e}"));
            return None;
        }
    };
    let p = &v["params"];
    let ok = v["jsonrpc"] == "2.0"
        && p["msgId"].as_str().is_some_and(|s| !s.is_empty())
        && p["from"] == from
        && p["message"]["seq"].as_u64().is_some_and(|s| s > 0)
        && p["message"]["pad"] == pad
        && p["sentAt"].as_i64().is_some_and(|t| t > 0)
        && p["sig"].as_str().is_some_and(|s| !s.is_empty());
    if !ok {
        st.error(format!("verify: unexpected deliver {v}"));
        return None;
    }
    st.verified += 1;
    p["msgId"].as_str().map(str::to_string)
}

// ---------------------------------------------------------------------------------------------
// NATS clients.
// ---------------------------------------------------------------------------------------------

fn nats_ops(io: &mut Io, role: &mut Role, now: Instant, measuring: bool, st: &mut Stats) {
    let limits = Limits::default();
    loop {
        let (op, n) = match nats::parse(&io.rbuf[io.rstart..io.rend], &limits) {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => {
                st.error(format!("{}: {e}", io.name));
                io.closed = true;
                return;
            }
        };
        io.rstart += n;
        let m = match op {
            ServerOp::Msg(m) => m,
            ServerOp::Ping => {
                nats::pong(&mut io.wbuf);
                continue;
            }
            ServerOp::Pong | ServerOp::Ok | ServerOp::Info(_) => continue,
            ServerOp::Err(e) => {
                st.error(format!("{}: -ERR {e}", io.name));
                continue;
            }
        };
        match role {
            Role::NatsRequester { win, replies, .. } => {
                let id = m
                    .subject
                    .strip_prefix(NATS_INBOX)
                    .and_then(|s| s.parse::<u64>().ok());
                let Some(id) = id else {
                    st.error(format!("{}: message on {}", io.name, m.subject));
                    continue;
                };
                let at = win.finish(id);
                if m.status.is_some() {
                    // 503: no responders.
                    st.error(format!("{}: status {:?} reply", io.name, m.status));
                    continue;
                }
                *replies += 1;
                if m.payload != NATS_REPLY_PAYLOAD {
                    st.error(format!("{}: unexpected reply payload", io.name));
                } else if replies.is_multiple_of(VERIFY_EVERY) {
                    st.verified += 1;
                }
                match at {
                    Some(at) => st.done(at, now, measuring),
                    None => st.error(format!("{}: reply to an unknown request {id}", io.name)),
                }
            }
            Role::NatsResponder {
                request_len,
                requests,
                last_id,
            } => {
                let Some(reply) = m.reply else {
                    st.error(format!("{}: request without a reply subject", io.name));
                    continue;
                };
                *requests += 1;
                let id = reply
                    .strip_prefix(NATS_INBOX)
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                if id >> SLOT_BITS <= *last_id >> SLOT_BITS {
                    st.error(format!("{}: request {id} after {last_id}", io.name));
                }
                *last_id = id;
                if m.payload.len() != *request_len {
                    st.error(format!(
                        "{}: request of {} bytes, not {request_len}",
                        io.name,
                        m.payload.len()
                    ));
                } else if requests.is_multiple_of(VERIFY_EVERY) {
                    st.verified += 1;
                }
                nats::publish(&mut io.wbuf, &reply, None, NATS_REPLY_PAYLOAD);
            }
            _ => {}
        }
    }
    if io.rstart == io.rend {
        io.rstart = 0;
        io.rend = 0;
    }
}

/// A NATS client connection: `INFO` read, `CONNECT`, the subscriptions (sids 1, 2, ...) and a
/// `PING` written, its `PONG` read (so the subscriptions are in place). Returns the socket,
/// bytes read past the `PONG`, and the server's `INFO`.
fn nats_open(port: u16, name: &str, subs: &[&str]) -> io::Result<(TcpStream, Vec<u8>, nats::Info)> {
    let mut sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(SETUP_WAIT))?;
    let limits = Limits::default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut info = None;
    loop {
        match nats::parse(&buf, &limits).map_err(io::Error::other)? {
            Some((op, n)) => {
                buf.drain(..n);
                match op {
                    ServerOp::Info(i) if info.is_none() => {
                        info = Some(i);
                        let mut out = Vec::new();
                        nats::connect(
                            &mut out,
                            &ConnectOpts {
                                name,
                                user: None,
                                pass: None,
                                auth_token: None,
                                tls_required: false,
                            },
                        );
                        for (i, s) in subs.iter().enumerate() {
                            nats::subscribe(&mut out, s, None, i as u64 + 1);
                        }
                        nats::ping(&mut out);
                        sock.write_all(&out)?;
                    }
                    ServerOp::Pong if info.is_some() => break,
                    ServerOp::Ping => {
                        let mut out = Vec::new();
                        nats::pong(&mut out);
                        sock.write_all(&out)?;
                    }
                    ServerOp::Info(_) | ServerOp::Ok => {}
                    ServerOp::Err(e) => return Err(io::Error::other(format!("-ERR {e}"))),
                    op => return Err(io::Error::other(format!("unexpected {op:?}"))),
                }
            }
            None => {
                let n = sock.read(&mut chunk)?;
                if n == 0 {
                    return Err(io::Error::other("closed by nats-server"));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
    let info = info.ok_or_else(|| io::Error::other("no INFO"))?;
    Ok((sock, buf, info))
}

// ---------------------------------------------------------------------------------------------
// One measured run: the client loop on its own thread, CPU sampled around the window.
// ---------------------------------------------------------------------------------------------

fn to_conn(name: &str, sock: TcpStream, pending: &[u8], rng: Rng, role: Role) -> Conn {
    sock.set_read_timeout(None).expect("clear timeout");
    sock.set_nonblocking(true).expect("non-blocking");
    let mut rbuf = vec![0u8; READ_BUF.max(pending.len() * 2)];
    rbuf[..pending.len()].copy_from_slice(pending);
    Conn {
        io: Io {
            name: name.to_string(),
            sock: mio::net::TcpStream::from_std(sock),
            rbuf,
            rstart: 0,
            rend: pending.len(),
            wbuf: Vec::with_capacity(64 * 1024),
            wpos: 0,
            readable: true,
            writable: true,
            closed: false,
            rng,
        },
        role,
    }
}

fn ws_conn(name: &str, s: Session, role: Role) -> Conn {
    to_conn(name, s.sock, &s.rbuf, s.rng, role)
}

fn run_loop(mut conns: Vec<Conn>, measure_at: Instant, end_at: Instant) -> (Stats, Vec<Conn>) {
    let mut st = Stats::new();
    let mut poll = Poll::new().expect("poll");
    for (i, c) in conns.iter_mut().enumerate() {
        poll.registry()
            .register(
                &mut c.io.sock,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .expect("register");
    }
    let mut events = Events::with_capacity(1024);
    let mut measuring = false;
    loop {
        let now = Instant::now();
        if now >= end_at {
            break;
        }
        if !measuring && now >= measure_at {
            measuring = true;
            let errors = std::mem::take(&mut st.errors);
            st = Stats::new();
            st.errors = errors;
            st.last_done = Some(now);
        }
        for c in conns.iter_mut().filter(|c| !c.io.closed) {
            c.on_readable(now, measuring, &mut st);
        }
        let now = Instant::now();
        for c in conns.iter_mut().filter(|c| !c.io.closed) {
            c.top_up(now);
            c.flush(&mut st);
        }
        if conns.iter().any(|c| c.io.closed) {
            // A member or client gone: the workload cannot go on (already counted).
            break;
        }
        let timeout = end_at
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(10));
        if let Err(e) = poll.poll(&mut events, Some(timeout))
            && e.kind() != io::ErrorKind::Interrupted
        {
            st.error(format!("poll: {e}"));
            break;
        }
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                c.io.readable = true;
            }
            if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                c.io.writable = true;
            }
        }
    }
    let now = Instant::now();
    if measuring && let Some(l) = st.last_done {
        st.max_gap = st.max_gap.max(now.saturating_duration_since(l));
    }
    for c in &conns {
        let stuck = c.stuck(now);
        if stuck > 0 {
            st.error(format!(
                "{}: {stuck} requests unanswered for over {STUCK_AFTER:?} at the end",
                c.io.name
            ));
        }
    }
    (st, conns)
}

struct Timing {
    warmup: f64,
    duration: f64,
}

/// What one workload measured.
struct Outcome {
    name: &'static str,
    completed: u64,
    secs: f64,
    p50_ns: u64,
    p99_ns: u64,
    max_ns: u64,
    verified: u64,
    max_gap: Duration,
    errors: BTreeMap<String, u64>,
    proxy_cpu: Option<f64>,
    nats_cpu: Option<f64>,
    client_cpu: Option<f64>,
    wall: Duration,
    notes: Vec<String>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.completed as f64 / self.secs
        } else {
            0.0
        }
    }

    fn failed(name: &'static str, wall: Duration, why: String) -> Outcome {
        let mut errors = BTreeMap::new();
        errors.insert(format!("setup failed: {why}"), 1);
        Outcome {
            name,
            completed: 0,
            secs: 0.0,
            p50_ns: 0,
            p99_ns: 0,
            max_ns: 0,
            verified: 0,
            max_gap: Duration::ZERO,
            errors,
            proxy_cpu: None,
            nats_cpu: None,
            client_cpu: None,
            wall,
            notes: Vec::new(),
        }
    }
}

/// CPU seconds of a set of processes between two samples (`None` if any could not be read).
fn cpu_secs(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&p| cpu_ticks(p)).sum()
}

/// Runs `conns` for warm-up plus duration; samples the CPU of `proxies`, `nats` and this
/// process over the measured window.
fn measure(
    name: &'static str,
    conns: Vec<Conn>,
    t: &Timing,
    proxies: &[u32],
    nats_pid: Option<u32>,
    started: Instant,
) -> (Outcome, Vec<Conn>) {
    let start = Instant::now();
    let measure_at = start + Duration::from_secs_f64(t.warmup);
    let end_at = measure_at + Duration::from_secs_f64(t.duration);
    let handle = std::thread::spawn(move || run_loop(conns, measure_at, end_at));
    std::thread::sleep(measure_at.saturating_duration_since(Instant::now()));
    let t0 = Instant::now();
    let p0 = (!proxies.is_empty()).then(|| cpu_secs(proxies)).flatten();
    let n0 = nats_pid.and_then(cpu_ticks);
    let c0 = cpu_ticks(0);
    std::thread::sleep(end_at.saturating_duration_since(Instant::now()));
    let p1 = (!proxies.is_empty()).then(|| cpu_secs(proxies)).flatten();
    let n1 = nats_pid.and_then(cpu_ticks);
    let c1 = cpu_ticks(0);
    let secs = t0.elapsed().as_secs_f64();
    let (st, conns) = handle.join().expect("client loop");
    let tck = clk_tck();
    let d = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 / tck);
    (
        Outcome {
            name,
            completed: st.completed,
            secs,
            p50_ns: st.hist.quantile(0.50),
            p99_ns: st.hist.quantile(0.99),
            max_ns: st.hist.max,
            verified: st.verified,
            max_gap: st.max_gap,
            errors: st.errors,
            proxy_cpu: d(p0, p1),
            nats_cpu: d(n0, n1),
            client_cpu: d(c0, c1),
            wall: started.elapsed(),
            notes: Vec::new(),
        },
        conns,
    )
}

// ---------------------------------------------------------------------------------------------
// Processes: nats-server, proxies.
// ---------------------------------------------------------------------------------------------

struct NatsServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    version: String,
}

impl NatsServer {
    fn start(bin: &str) -> Result<NatsServer, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "fedmcp-cluster-bench-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = dir.join("nats-server.log");
        let logf = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let errf = logf.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("store"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(logf))
            .stderr(Stdio::from(errf))
            .spawn()
            .map_err(|e| format!("cannot run {bin}: {e}"))?;
        let mut s = NatsServer {
            child,
            port,
            dir,
            log,
            version: String::new(),
        };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                return Err(format!("nats-server exited ({status}): {}", s.log_tail(10)));
            }
            match nats_open(port, "bench-probe", &[]) {
                Ok((_, _, info)) if info.jetstream => {
                    s.version = info.version;
                    return Ok(s);
                }
                Ok(_) | Err(_) if t0.elapsed() > READY_WAIT => {
                    return Err(format!(
                        "nats-server not ready with JetStream within {READY_WAIT:?}: {}",
                        s.log_tail(10)
                    ));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `GET /readyz` until 200.
fn wait_ready(p: &ProxyProc, what: &str) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let r = http(p.addr, "GET", "/readyz", None, None);
        if let Ok((200, _)) = r {
            return Ok(());
        }
        if t0.elapsed() > READY_WAIT {
            return Err(format!(
                "{what}: readyz still {r:?} after {READY_WAIT:?}; stderr:\n{}",
                p.stderr_tail(20)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `GET /v1/servers/{id}` on `p` until it is online with its session on `node`.
fn wait_online(p: &ProxyProc, admin: &str, id: &str, node: &str) -> Result<Duration, String> {
    let t0 = Instant::now();
    loop {
        let r = http(
            p.addr,
            "GET",
            &format!("/v1/servers/{id}"),
            Some(admin),
            None,
        );
        if let Ok((200, body)) = &r
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(body)
            && v["state"] == "online"
            && v["node"] == node
        {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > READY_WAIT {
            return Err(format!(
                "{id} not online on {node} as seen by {} after {READY_WAIT:?}: {r:?}",
                p.addr
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Proxy settings of every workload; the default rate limit would be the ceiling.
fn proxy_env() -> Vec<(&'static str, String)> {
    vec![("FEDMCP_RATE_LIMIT", "1000000/s,burst=1000000".into())]
}

fn stderr_note(p: &ProxyProc, who: &str) -> Option<String> {
    let tail = p.stderr_tail(15);
    (!tail.trim().is_empty()).then(|| format!("{who} stderr (tail):\n```\n{tail}\n```"))
}

// ---------------------------------------------------------------------------------------------
// The workloads.
// ---------------------------------------------------------------------------------------------

struct Members {
    a: String,
    b: String,
    pad: String,
    window: usize,
}

impl Members {
    fn sender(&self, s: Session) -> Conn {
        let mid = format!(
            ",\"method\":\"federation/send\",\"params\":{{\"to\":\"{}\",\"message\":{{\"seq\":",
            self.b
        );
        let tail = format!(",\"pad\":\"{}\"}}}}}}", self.pad);
        ws_conn(
            &self.a,
            s,
            Role::WsSender {
                win: Window::new(self.window),
                mid: mid.into_bytes(),
                tail: tail.into_bytes(),
                answers: 0,
            },
        )
    }

    fn receiver(&self, s: Session) -> Conn {
        ws_conn(
            &self.b,
            s,
            Role::WsReceiver {
                from: self.a.clone(),
                pad: self.pad.clone(),
                delivers: 0,
                last_seq: 0,
                sample_msg_id: None,
            },
        )
    }
}

fn open_member(addr: SocketAddr, token: &str, who: &str, rng: &mut Rng) -> Result<Session, String> {
    let mut s = Session::open(addr, token, rng.next_u32() as u64)
        .map_err(|e| format!("session {who}: {e}"))?;
    s.sync().map_err(|e| format!("session {who}: {e}"))?;
    Ok(s)
}

/// Workload 1: A on proxy 1, B on proxy 2, through NATS. Also returns a `msgId` the proxy
/// made (for the size of workload 3's payload).
fn cross_proxy(
    nats: &NatsServer,
    m: &Members,
    t: &Timing,
    tag: &str,
) -> Result<(Outcome, Option<String>), String> {
    let started = Instant::now();
    let cluster = format!("bench{tag}");
    let (n1, n2) = (format!("b{tag}n1"), format!("b{tag}n2"));
    let node_env = |node: &str| {
        let mut env = proxy_env();
        env.push(("FEDMCP_NATS_URL", nats.url()));
        env.push(("FEDMCP_CLUSTER", cluster.clone()));
        env.push(("FEDMCP_NODE_ID", node.to_string()));
        env
    };
    let mut p1 = ProxyProc::spawn(&node_env(&n1));
    let mut p2 = ProxyProc::spawn(&node_env(&n2));
    wait_ready(&p1, "proxy 1")?;
    wait_ready(&p2, "proxy 2")?;
    let ready = started.elapsed();
    let (admin1, admin2) = (p1.admin_token(), p2.admin_token());
    let ta = p1.register(&admin1, &m.a);
    let tb = p2.register(&admin2, &m.b);
    let mut rng = Rng::seeded();
    let sb = open_member(p2.addr, &tb, &m.b, &mut rng)?;
    let sa = open_member(p1.addr, &ta, &m.a, &mut rng)?;
    let seen_b = wait_online(&p1, &admin1, &m.b, &n2)?;
    let seen_a = wait_online(&p2, &admin2, &m.a, &n1)?;
    let conns = vec![m.sender(sa), m.receiver(sb)];
    let pids = [p1.pid, p2.pid];
    let (mut o, conns) = measure("cross-proxy", conns, t, &pids, Some(nats.pid()), started);
    o.notes.push(format!(
        "setup: both proxies ready {:.2} s after start; B online on proxy 1 after {:.0} ms, A on proxy 2 after {:.0} ms",
        ready.as_secs_f64(),
        seen_b.as_secs_f64() * 1e3,
        seen_a.as_secs_f64() * 1e3
    ));
    let remote = |p: &ProxyProc, r: &str| {
        metric(
            p.addr,
            &format!("fedmcp_remote_messages_total{{result=\"{r}\"}}"),
        )
    };
    o.notes.push(format!(
        "proxy counters at the end: proxy 1 remote forwarded {:?}, proxy 2 remote received {:?}",
        remote(&p1, "forwarded"),
        remote(&p2, "received"),
    ));
    let sample = conns.iter().find_map(|c| match &c.role {
        Role::WsReceiver { sample_msg_id, .. } => sample_msg_id.clone(),
        _ => None,
    });
    drop(conns);
    for (p, who) in [(&mut p1, "proxy 1"), (&mut p2, "proxy 2")] {
        if !p.is_running() {
            o.errors.insert(format!("{who} exited during the run"), 1);
        }
        o.notes.extend(stderr_note(p, who));
    }
    o.wall = started.elapsed();
    Ok((o, sample))
}

/// Workload 2: both members on one proxy alone.
fn one_proxy(m: &Members, t: &Timing) -> Result<Outcome, String> {
    let started = Instant::now();
    let mut p = ProxyProc::spawn(&proxy_env());
    wait_ready(&p, "proxy")?;
    let admin = p.admin_token();
    let ta = p.register(&admin, &m.a);
    let tb = p.register(&admin, &m.b);
    let mut rng = Rng::seeded();
    let sb = open_member(p.addr, &tb, &m.b, &mut rng)?;
    let sa = open_member(p.addr, &ta, &m.a, &mut rng)?;
    let conns = vec![m.sender(sa), m.receiver(sb)];
    let (mut o, conns) = measure("one proxy", conns, t, &[p.pid], None, started);
    drop(conns);
    if !p.is_running() {
        o.errors.insert("the proxy exited during the run".into(), 1);
    }
    o.notes.extend(stderr_note(&p, "proxy"));
    o.wall = started.elapsed();
    Ok(o)
}

/// Workload 3: a NATS requester and responder on the same nats-server.
fn nats_req_reply(
    nats: &NatsServer,
    window: usize,
    request: Vec<u8>,
    t: &Timing,
) -> Result<Outcome, String> {
    let started = Instant::now();
    let request_len = request.len();
    let (rs, rbuf, _) = nats_open(nats.port, "bench-responder", &[NATS_REQ_SUBJECT])
        .map_err(|e| format!("NATS responder: {e}"))?;
    let inbox = format!("{NATS_INBOX}>");
    let (qs, qbuf, _) = nats_open(nats.port, "bench-requester", &[&inbox])
        .map_err(|e| format!("NATS requester: {e}"))?;
    let mut rng = Rng::seeded();
    let conns = vec![
        to_conn(
            "nats-requester",
            qs,
            &qbuf,
            Rng::new(rng.next_u32() as u64),
            Role::NatsRequester {
                win: Window::new(window),
                payload: request,
                reply_subject: NATS_INBOX.to_string(),
                replies: 0,
            },
        ),
        to_conn(
            "nats-responder",
            rs,
            &rbuf,
            Rng::new(rng.next_u32() as u64),
            Role::NatsResponder {
                request_len,
                requests: 0,
                last_id: 0,
            },
        ),
    ];
    let (mut o, conns) = measure(
        "nats-server req/reply",
        conns,
        t,
        &[],
        Some(nats.pid()),
        started,
    );
    drop(conns);
    o.notes.push(format!(
        "payloads: request {request_len} B (the proxy's `C.msg.N` delivery of the same message), reply {} B",
        NATS_REPLY_PAYLOAD.len()
    ));
    o.wall = started.elapsed();
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Report.
// ---------------------------------------------------------------------------------------------

fn machine() -> String {
    let nproc = Command::new("nproc")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into())
        });
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("`nproc` {nproc}; CPU: {model}; kernel {kernel}")
}

fn fmt_secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.2}")).unwrap_or_else(|| "–".into())
}

fn group(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn main() {
    let code = run();
    std::process::exit(code);
}

fn run() -> i32 {
    let wall0 = Instant::now();
    let o = Opts::new("CLUSTER_BENCH");
    let t = Timing {
        duration: o.parse("duration", 10.0),
        warmup: o.parse("warmup", 1.0),
    };
    let window: usize = o.parse("window", 64);
    let msg_bytes: usize = o.parse("msg-bytes", 100);
    let min_rate: f64 = o.parse("min-rate", 0.0);
    let label = o.get("label").unwrap_or_default();
    let nats_bin = o
        .get("nats-server")
        .unwrap_or_else(|| "/usr/sbin/nats-server".into());
    if !(1..1 << SLOT_BITS).contains(&window) {
        eprintln!("--window must be 1..65535");
        return 2;
    }
    let load_before = loadavg1();
    let tag = format!("{}", std::process::id());
    let m = Members {
        a: format!("cb{tag}-a"),
        b: format!("cb{tag}-b"),
        // `{"seq":ID,"pad":"xxx..."}`: 19 bytes of structure and an id of about 8 digits.
        pad: "x".repeat(msg_bytes.saturating_sub(27)),
        window,
    };

    let nats = match NatsServer::start(&nats_bin) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("cluster bench: {e}");
            return 1;
        }
    };
    let mut outcomes = Vec::new();
    let t1 = Instant::now();
    let sample = match cross_proxy(&nats, &m, &t, &tag) {
        Ok((o, s)) => {
            outcomes.push(o);
            s
        }
        Err(e) => {
            outcomes.push(Outcome::failed("cross-proxy", t1.elapsed(), e));
            None
        }
    };
    let t2 = Instant::now();
    outcomes
        .push(one_proxy(&m, &t).unwrap_or_else(|e| Outcome::failed("one proxy", t2.elapsed(), e)));
    // The proxy's remote delivery of this message (`remote_send` in cluster.rs), with a
    // `msgId` it made (or one of the same form) and an 8-digit seq.
    let msg_id = sample.unwrap_or_else(|| "0123456789abcdef-1234567".into());
    let request = format!(
        "{{\"t\":\"deliver\",\"msgId\":\"{msg_id}\",\"from\":\"{}\",\"to\":\"{}\",\"message\":{{\"seq\":12345678,\"pad\":\"{}\"}},\"sentAt\":{},\"queue\":false}}",
        m.a,
        m.b,
        m.pad,
        fedmcp::clock::now_secs() * 1000
    );
    let t3 = Instant::now();
    outcomes.push(
        nats_req_reply(&nats, window, request.into_bytes(), &t)
            .unwrap_or_else(|e| Outcome::failed("nats-server req/reply", t3.elapsed(), e)),
    );
    let nats_version = nats.version.clone();
    drop(nats);

    // The report.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    println!();
    println!(
        "## fedmcp cluster benchmark{}",
        if label.is_empty() {
            String::new()
        } else {
            format!(" ({label})")
        }
    );
    println!();
    println!(
        "- command: `cargo bench --bench cluster -- {}`",
        args.join(" ")
    );
    println!(
        "- machine: {}; load average (1 min) before: {load_before:.2}",
        machine()
    );
    println!(
        "- nats-server v{nats_version}; window {window} requests in flight; ~{msg_bytes}-byte messages; warm-up {} s and {} s measured per workload",
        t.warmup, t.duration
    );
    println!();
    println!(
        "| workload | confirmed/s | p50 µs | p99 µs | proxies CPU s | nats-server CPU s | client CPU s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for o in &outcomes {
        println!(
            "| {} | {} | {:.0} | {:.0} | {} | {} | {} |",
            o.name,
            group(o.rate()),
            o.p50_ns as f64 / 1e3,
            o.p99_ns as f64 / 1e3,
            fmt_secs(o.proxy_cpu),
            fmt_secs(o.nats_cpu),
            fmt_secs(o.client_cpu),
        );
    }
    println!();
    println!(
        "A nats-server request is confirmed when its reply reaches the requester. CPU seconds are over the measured window; \"client\" is this benchmark's process (all its members or NATS clients, one event loop)."
    );
    println!();
    let mut errors = 0;
    for o in &outcomes {
        let n: u64 = o.errors.values().sum();
        errors += n;
        let servers_cpu = match (o.proxy_cpu, o.nats_cpu) {
            (None, None) => None,
            (p, n) => Some(p.unwrap_or(0.0) + n.unwrap_or(0.0)),
        };
        println!(
            "- **{}**: {} confirmed in {:.2} s; max {:.0} µs; proxies + nats-server CPU per confirmed {}; longest pause without a confirmation {:.1} ms; {} fully checked; {} errors; wall {:.2} s (setup, warm-up, run, teardown)",
            o.name,
            o.completed,
            o.secs,
            o.max_ns as f64 / 1e3,
            match servers_cpu {
                Some(c) if o.completed > 0 => format!("{:.1} µs", c / o.completed as f64 * 1e6),
                _ => "–".into(),
            },
            o.max_gap.as_secs_f64() * 1e3,
            o.verified,
            n,
            o.wall.as_secs_f64()
        );
        for (k, v) in &o.errors {
            println!("  - error x{v}: {k}");
        }
        for note in &o.notes {
            for (i, line) in note.lines().enumerate() {
                if i == 0 {
                    println!("  - {line}");
                } else {
                    println!("    {line}");
                }
            }
        }
    }
    let cross = outcomes[0].rate();
    println!();
    println!("- total wall time: {:.2} s", wall0.elapsed().as_secs_f64());
    let mut code = 0;
    if errors > 0 {
        eprintln!("cluster bench: {errors} errors (listed above)");
        code = 1;
    }
    if cross < min_rate {
        eprintln!("cluster bench: cross-proxy {cross:.0}/s is below the bar of {min_rate:.0}/s");
        code = 1;
    }
    code
}
