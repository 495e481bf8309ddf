//! Load generator: request/reply round trips per second through the proxy, and through the
//! systems it is compared with, driven by the same client and measured the same way.
//!
//! Modes (`--mode`):
//! - `fedmcp` (the default): N pairs of control sessions on the proxy (sender `a_i`, receiver
//!   `b_i`). Each sender sends `federation/send` requests to its receiver; each receiver
//!   answers every `federation/deliver` at once with `{"ok":true}`; a forward counts when the
//!   sender holds `{"status":"delivered"}`. The WebSocket framing is a hand-rolled RFC 6455
//!   client (masked frames built from templates, no per-message allocation). The common
//!   answers are recognised by their fixed prefix (the proxy writes
//!   `{"jsonrpc":"2.0","id":N,...` first); anything else is parsed with serde_json, and one
//!   message in `VERIFY_EVERY` is fully parsed and checked.
//! - `nats`: the same workload against nats-server, which this program starts itself
//!   (`-a 127.0.0.1 -p <free port>`, no JetStream), waits for, and kills at the end. Per pair
//!   a requester and a responder connection, written with the project's NATS codec
//!   (`fedmcp::proto::nats`): the responder subscribes to `req.<pair>`, the requester to
//!   `_INBOX.<pair>.*` and sends `PUB req.<pair> _INBOX.<pair>.<id>` with the payload a
//!   fedmcp message has (`{"seq":<id>,"pad":"xxx…"}`, `msg-bytes`); the responder answers
//!   each on its reply subject with `{"ok":true}`; a round trip counts when the requester
//!   reads that answer. `CONNECT` is written here, with `verbose`, `pedantic` and `headers`
//!   false (the codec's `connect` always announces headers); `PING` is answered with `PONG`.
//! - `relay`: the floor. A raw TCP relay in a separate process: this binary re-executed with
//!   `--serve-relay`, a single-threaded mio loop on 127.0.0.1:0 that prints its port, pairs
//!   connections in accept order (1st = requester and 2nd = responder of pair 0, and so on)
//!   and copies bytes each way (non-blocking reads until WouldBlock, buffered writes flushed
//!   on writability, nothing parsed). The requester writes `msg-bytes` records (an 8-byte
//!   request id, then padding); the responder reads whole records and answers each with a
//!   16-byte record (the id, then `{"ok":1}`).
//!
//! In every mode the clients are non-blocking `mio` sockets spread over `threads` event loops;
//! every connection is proven live before the run (fedmcp: a request the proxy answers, after
//! the welcome; nats: `PING`/`PONG` after its `SUB`; relay: one record each way through the
//! pair); request ids increase per sender and the receiving side checks that they arrive in
//! order; error answers, closed connections and answers to unknown ids are errors; a request
//! unanswered for over `STUCK_AFTER` at the end of a run is reported as lost.
//!
//! Closed loop (the default): each sender keeps `window` requests in flight; latency is from
//! writing a request to reading its answer. Open loop (`open-loop RATE`): requests are sent on
//! a fixed schedule, request k at start + k/RATE (over all pairs, dealt round-robin),
//! whether or not earlier ones were answered; `window` only caps the requests outstanding per
//! pair (a request that falls due while the cap is reached waits for a free slot and is
//! counted as `backlogged`); latency is from the request's *scheduled* time, so a stall of the
//! system under test shows in the tail instead of slowing the load (no coordinated omission).
//! The loop polls with a timeout to the next scheduled send and writes every request that is
//! due; as mio's poll timeout has 1 ms resolution, a ticker thread per loop (1 ns timer slack)
//! also wakes it through a `mio::Waker` `wake-early-us` before each scheduled time (at most
//! every `MIN_TICK`), and the loop polls without blocking (spins) from then until the request
//! is written (at most a quarter of the time: a spinning client takes CPU from the system
//! under test).
//! `send_lag_*` is how long after its scheduled time each request was written (it is part of
//! the latency).
//!
//! Per-request latency goes into a fixed-size log-linear histogram (~3 % resolution). During
//! each measured window the CPU of the process under test (the proxy, nats-server or the
//! relay: `/proc/<pid>/stat` utime+stime, and stime alone: the kernel's share), its RSS
//! (`VmRSS`, `VmHWM`) and the load generator's own CPU are sampled; the summary keeps the
//! `proxy_*` key names in every mode (`mode=` says what they measured;
//! `proxy_delivered_per_sec`, the proxy's own count, is -1 in the other modes). One
//! machine-readable `loadgen` line is printed per run (`run=N` when `runs` > 1; open loop adds
//! `open_loop_rate`, `achieved_rate`, `backlogged`, `unsent_at_end` and `send_lag_*`; nats mode
//! `nats_version`; fedmcp mode the extra settings, `idle_sessions`, `queued`,
//! `recipient_queued` and `state`, and what goes with them, below); with `runs` > 1 a final
//! `loadgen-runs` line (one per `background` item) gives the min/median/max over the runs of
//! forwards/s, p99, p99.9, p50 and the maximum.
//!
//! Costs that grow (fedmcp mode; set up once, before the first run, and kept through every
//! run; the measured pairs are set up first, as without them):
//! - `idle-sessions N`: N more servers registered, each with a control session opened, its
//!   welcome answered and a round trip done (so online). A thread of their own then holds them:
//!   it answers the proxy's pings (the default heartbeat, 15 s; a member that does not answer
//!   is dropped after two) and sends nothing else. After each run the proxy must still count
//!   them online: `servers_online` (its gauge), `idle_pongs` (pings answered so far),
//!   `idle_lost` (sessions the proxy closed).
//! - `queued N`: one more server registered that stays offline, and N `queue: true` sends to it
//!   (requests from a setup session, `FILL_BATCH` in flight, each answered `queued`; the
//!   session is closed afterwards): they stay queued through every run (`queue_messages`, the
//!   proxy's gauge, must be N after each run).
//! - `recipient-queued N`: before b_0 first connects, N `queue: true` sends to it from a setup
//!   session; b_0 then answers each queued delivery, before the runs: the runs' sends go to a
//!   recipient whose queue has just been drained (`queue_messages` after each run must count
//!   only the `queued` ones: b_0's queue stays empty).
//!
//! The spawned proxy gets room for them: `FEDMCP_MAX_CONNECTIONS` (at least 4096),
//! `FEDMCP_MAX_SERVERS` (raised only past its default of 1024), `FEDMCP_QUEUE_MAX_MESSAGES` and
//! `FEDMCP_QUEUE_MAX_BYTES` (raised only past their defaults). Every session is a file
//! descriptor here and in the proxy (which inherits the limit): the program stops at once when
//! the soft `ulimit -n` is below about N + 64.
//!
//! Disk work (fedmcp mode, a spawned proxy):
//! - `state-dir DIR`: the proxy keeps its state in a new directory made inside DIR (removed at
//!   the end) instead of memory only. `state=` in the summary is that file system's type
//!   (`memory` without it; on tmpfs an fsync costs nothing: use a directory on a disk). The
//!   proxy then logs at `warn,fedmcp::io::proxy=info`, and the compactions it logs during each
//!   run are counted (`compactions`); `state_log_bytes` is the log's size after the run.
//! - `background LIST`: comma-separated work done during the measured window, each item a run
//!   of its own (with `runs` > 1 the whole list is repeated, so the items interleave):
//!   `none` (the baseline, with the same state dir); `upload:BYTES`: one HTTP client `PUT`s a
//!   resource of BYTES generated bytes (streamed, never held in memory) on one connection; it
//!   must be answered `201` (`upload_status`, `upload_at_s` its start, `upload_secs` until the
//!   answer, `upload_mib_per_sec`); the resource is deleted after the run, outside the
//!   window; the resource limits are raised when BYTES is over their 1 GiB default.
//!   `compaction`: before the run, the state log is grown to within two steps of the
//!   compaction threshold (over `COMPACT_AT` = 8 MiB and over twice the snapshot,
//!   src/store/state.rs `wants_compaction`) by steps of registering a server with
//!   `CHURN_BYTES` (256 KiB) of capabilities and removing it again over HTTP (`prefill_steps`;
//!   `prefill_request_ms_median` and `_max`: registrations answered without a compaction);
//!   in the window the same steps go on until the log shrinks (`churn_steps`,
//!   `log_before_bytes`, `compaction_at_s` when the request whose turn compacted was sent,
//!   `compaction_request_ms` how long it took to answer). The background work must end inside
//!   the window (`bg_done_at_s`), `upload` with a `201` and `compaction` with a compaction the
//!   proxy logged, or the run is an error. `max_at_s` is when, in seconds into the window, the
//!   slowest request was written (open loop: scheduled): set it against the work's times.
//!   With `state-dir` or `background`, each line says `background=` (`none` by default) and
//!   `max_at_s`.
//!
//! Options (`--name=value`, `--name value`, or the environment variable `LOADGEN_NAME`):
//!   mode      fedmcp | nats | relay: what carries the round trips (fedmcp)
//!   addr      proxy address (fedmcp mode); unset: spawn the release binary (FEDMCP_BENCH_BIN
//!             overrides it)
//!   pid       the proxy's pid for `addr` runs (else found through /proc/net/tcp)
//!   secret    the proxy's JWT secret for `addr` runs (else FEDMCP_JWT_SECRET)
//!   nats-bin  the nats-server binary for `nats` mode (/usr/sbin/nats-server, the Debian
//!             package's, when it exists, else `nats-server` on PATH)
//!   duration  measured seconds (10)          warmup    seconds before measuring (1)
//!   window    requests in flight per pair (64); in open loop, the cap on them
//!   pairs     sender/receiver pairs (1)
//!   msg-bytes size of the forwarded `message` JSON, the NATS payload, the relay record (100)
//!   open-loop requests per second over all pairs, sent on a fixed schedule; 0: closed loop (0)
//!   wake-early-us  open loop: how many µs before a scheduled request the loop stops blocking
//!             in poll and spins (50, and at most a quarter of 1/RATE); 0: no spinning,
//!             requests go out as late as the machine wakes threads (~45 µs on the reference VM)
//!   runs      measured windows, one after the other (each after its own warm-up; an open
//!             loop's schedule restarts with each), against the same spawned process and the
//!             same connections (1); with `background`, the whole list `runs` times
//!   threads   client event loops (1); connections are spread round-robin over them. One loop
//!             is the default: on a 2-core machine the proxy needs one core, one client loop
//!             drives it to saturation with ~1/4 of the other, and a second client thread only
//!             adds cross-core wake-ups (measured: 1 pair, 64 in flight, 2 threads ~25 % slower)
//!   min-rate  exit 1 when forwards/s (with `runs` > 1: its median; with `background`, each
//!             item's) is below this (0)
//!   label     a free-form tag echoed in the summary lines
//!   idle-sessions  fedmcp: extra idle online control sessions (0)
//!   queued    fedmcp: messages queued for an extra offline server through every run (0)
//!   recipient-queued  fedmcp: messages queued for b_0 and drained before the runs (0)
//!   state-dir fedmcp, spawned proxy: make its state dir inside this directory (unset: memory
//!             only)
//!   background  fedmcp, needs `state-dir` for anything but `none`: none | upload:BYTES |
//!             compaction, comma-separated, one run each (none)
//!   bg-delay  seconds into the measured window before the background work starts
//!             (duration / 10)

mod common;

use common::*;
use fedmcp::proto::nats::{self, Limits, ServerOp};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// The NATS responder's answer (the fedmcp receiver's `result`).
const NATS_ANSWER: &[u8] = b"{\"ok\":true}";
/// What a NATS request's payload starts with (then the id, then the pad).
const NATS_SEQ: &[u8] = b"{\"seq\":";
/// The relay responder's answer record: the request id (8 bytes, little-endian), then this.
const RELAY_TAG: &[u8; 8] = b"{\"ok\":1}";
const RELAY_ANSWER: usize = 8 + RELAY_TAG.len();
/// The argument that turns this binary into the relay (`relay` mode's separate process).
const SERVE_RELAY: &str = "--serve-relay";
/// Bytes the relay holds for one side before it stops reading the other.
const RELAY_CAP: usize = 1 << 20;
/// Open loop: the ticker wakes a client loop at most this often.
const MIN_TICK: Duration = Duration::from_micros(20);
/// Open loop, `wake-early-us` default: the ticker wakes a client loop this long (at most a
/// quarter of the interval between two requests) before a scheduled request, and the loop
/// polls without blocking from then on until the request is written. A thread's sleep ends
/// ~30 µs late on the 2-core VM the figures come from (with 1 ns of timer slack), and waking
/// the loop from the ticker costs about half as much again.
const WAKE_EARLY_US: u64 = 50;
/// The client loop's wake-up token for the ticker (sockets are 0..n).
const WAKE: Token = Token(usize::MAX - 1);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fedmcp,
    Nats,
    Relay,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Fedmcp => "fedmcp",
            Mode::Nats => "nats",
            Mode::Relay => "relay",
        }
    }
}

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
    /// Open loop: requests that fell due while `window` were outstanding.
    backlogged: u64,
    /// Open loop: requests due by the end of the run but never written.
    unsent: u64,
    /// Open loop: how late each request was written after its scheduled time.
    lag: Hist,
    /// When the slowest request (`hist.max`) was written (open loop: scheduled).
    max_at: Option<Instant>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            completed: 0,
            sent: 0,
            hist: Hist::new(),
            errors: BTreeMap::new(),
            verified: 0,
            backlogged: 0,
            unsent: 0,
            lag: Hist::new(),
            max_at: None,
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

    fn merge(&mut self, o: Stats) {
        self.completed += o.completed;
        self.sent += o.sent;
        self.verified += o.verified;
        self.backlogged += o.backlogged;
        self.unsent += o.unsent;
        if o.hist.max > self.hist.max {
            self.max_at = o.max_at;
        }
        self.hist.merge(&o.hist);
        self.lag.merge(&o.lag);
        for (k, v) in o.errors {
            *self.errors.entry(k).or_insert(0) += v;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A sender's requests in flight and, in open loop, its schedule.
// ---------------------------------------------------------------------------------------------

/// Open loop: request `k` of this sender is due at `t0 + (k * stride + offset) / rate` (the
/// whole run's `rate`, dealt round-robin over `stride` senders).
struct Schedule {
    rate: f64,
    stride: u64,
    offset: u64,
    t0: Instant,
    /// The next request to write.
    next: u64,
    /// Requests below this one were already counted as backlogged.
    counted: u64,
}

impl Schedule {
    fn at(&self, k: u64) -> Instant {
        self.t0 + Duration::from_secs_f64((k * self.stride + self.offset) as f64 / self.rate)
    }

    /// How many of this sender's requests are due by `t`.
    fn due_by(&self, t: Instant) -> u64 {
        let slots = t.saturating_duration_since(self.t0).as_secs_f64() * self.rate;
        if slots < self.offset as f64 {
            return 0;
        }
        ((slots - self.offset as f64) / self.stride as f64).floor() as u64 + 1
    }
}

struct Window {
    slot_id: Vec<u64>,
    /// Closed loop: when each slot's request was written; open loop: when it was scheduled.
    /// Latency is measured from here.
    sent_at: Vec<Instant>,
    free: Vec<u32>,
    counter: u64,
    answers: u64,
    sched: Option<Schedule>,
}

impl Window {
    /// `open_loop`: (requests per second over all `pairs`, this sender's pair index).
    fn new(window: usize, open_loop: Option<(f64, usize, usize)>) -> Window {
        Window {
            slot_id: vec![0; window],
            sent_at: vec![Instant::now(); window],
            free: (0..window as u32).rev().collect(),
            counter: 0,
            answers: 0,
            sched: open_loop.map(|(rate, pairs, i)| Schedule {
                rate,
                stride: pairs as u64,
                offset: i as u64,
                t0: Instant::now(),
                next: 0,
                counted: 0,
            }),
        }
    }

    /// A run starts: the schedule restarts at `t0` (requests still outstanding stay so).
    fn begin(&mut self, t0: Instant) {
        if let Some(s) = &mut self.sched {
            s.t0 = t0;
            s.next = 0;
            s.counted = 0;
        }
    }

    /// Takes a slot for the next request to write now and returns its id; `None` when the
    /// window is full or (open loop) no request is due.
    fn take(&mut self, now: Instant, measuring: bool, st: &mut Stats) -> Option<u64> {
        let at = match &mut self.sched {
            None => now,
            Some(s) => {
                let at = s.at(s.next);
                if at > now {
                    return None;
                }
                if self.free.is_empty() {
                    // Every request due by now waits for a slot: count each once.
                    let due = s.due_by(now).max(s.next + 1);
                    if due > s.counted {
                        if measuring {
                            st.backlogged += due - s.counted.max(s.next);
                        }
                        s.counted = due;
                    }
                    return None;
                }
                s.next += 1;
                if measuring {
                    st.lag
                        .record(now.saturating_duration_since(at).as_nanos() as u64);
                }
                at
            }
        };
        let slot = self.free.pop()?;
        self.counter += 1;
        let id = (self.counter << SLOT_BITS) | slot as u64;
        self.slot_id[slot as usize] = id;
        self.sent_at[slot as usize] = at;
        if measuring {
            st.sent += 1;
        }
        Some(id)
    }

    /// Open loop: when the next request is due.
    fn next_due(&self) -> Option<Instant> {
        self.sched.as_ref().map(|s| s.at(s.next))
    }

    /// Open loop: requests due by `end` that were not written.
    fn unsent(&self, end: Instant) -> u64 {
        let Some(s) = &self.sched else {
            return 0;
        };
        s.due_by(end).saturating_sub(s.next)
    }

    /// The answer to request `id` was read at `now`.
    fn complete(&mut self, id: u64, now: Instant, measuring: bool, st: &mut Stats, name: &str) {
        let slot = (id & ((1 << SLOT_BITS) - 1)) as usize;
        if self.slot_id.get(slot) != Some(&id) {
            st.error(format!("{name}: answer to an unknown request id {id}"));
            return;
        }
        self.slot_id[slot] = 0;
        self.free.push(slot as u32);
        if measuring {
            st.completed += 1;
            let ns = now.saturating_duration_since(self.sent_at[slot]).as_nanos() as u64;
            if ns > st.hist.max || st.max_at.is_none() {
                st.max_at = Some(self.sent_at[slot]);
            }
            st.hist.record(ns);
        }
    }

    /// Request `id` is over without an answer that counts: its slot is free again.
    fn release(&mut self, id: u64) {
        let slot = (id & ((1 << SLOT_BITS) - 1)) as usize;
        if self.slot_id.get(slot) == Some(&id) {
            self.slot_id[slot] = 0;
            self.free.push(slot as u32);
        }
    }

    /// Requests outstanding for more than `STUCK_AFTER` at `now`.
    fn stuck(&self, now: Instant) -> usize {
        self.slot_id
            .iter()
            .zip(&self.sent_at)
            .filter(|(id, at)| **id != 0 && now.saturating_duration_since(**at) > STUCK_AFTER)
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// Client connections.
// ---------------------------------------------------------------------------------------------

/// fedmcp: a member sending `federation/send` requests.
struct Sender {
    win: Window,
    /// `,"method":"federation/send","params":{"to":"b_i","message":{"seq":`
    mid: Vec<u8>,
    /// `,"pad":"xxx"}}}`: the message carries the request id as `seq`, so the receiver
    /// can check the order of deliveries.
    tail: Vec<u8>,
}

/// fedmcp: a member answering `federation/deliver`.
struct Receiver {
    from: String,
    /// The `pad` every message carries.
    pad: String,
    delivers: u64,
    /// The last `seq` delivered: sends from one sender must arrive in order.
    last_seq: u64,
}

/// nats: publishes requests to `subject` with a reply subject under `inbox`.
struct NatsRequester {
    win: Window,
    subject: String,
    /// `_INBOX.<pair>.`: the reply subject is this and the request id.
    inbox: String,
    /// Scratch: the reply subject and the payload of the request being written.
    reply: String,
    payload: Vec<u8>,
    /// `,"pad":"xxx"}`: the payload is `{"seq":<id>` and this.
    tail: Vec<u8>,
}

/// nats: answers each request on its reply subject.
struct NatsResponder {
    pad: String,
    requests: u64,
    last_seq: u64,
}

/// relay: writes fixed-size records (id, padding).
struct RelayRequester {
    win: Window,
    /// The record after its 8-byte id.
    pad: Vec<u8>,
}

/// relay: answers each whole record with a `RELAY_ANSWER`-byte record.
struct RelayResponder {
    record_len: usize,
    requests: u64,
    last_id: u64,
}

enum Role {
    Sender(Sender),
    Receiver(Receiver),
    NatsRequester(NatsRequester),
    NatsResponder(NatsResponder),
    RelayRequester(RelayRequester),
    RelayResponder(RelayResponder),
}

impl Role {
    fn window(&self) -> Option<&Window> {
        match self {
            Role::Sender(s) => Some(&s.win),
            Role::NatsRequester(q) => Some(&q.win),
            Role::RelayRequester(q) => Some(&q.win),
            _ => None,
        }
    }

    fn window_mut(&mut self) -> Option<&mut Window> {
        match self {
            Role::Sender(s) => Some(&mut s.win),
            Role::NatsRequester(q) => Some(&mut q.win),
            Role::RelayRequester(q) => Some(&mut q.win),
            _ => None,
        }
    }
}

struct Client {
    name: String,
    /// What is at the other end, for messages: "the proxy", "nats-server", "the relay".
    peer: &'static str,
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

fn u64_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl Client {
    /// Reads until `WouldBlock`, handling every complete frame, NATS op or record.
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
                    st.error(format!("{}: connection closed by {}", self.name, self.peer));
                    self.closed = true;
                }
                Ok(n) => {
                    self.rend += n;
                    match self.role {
                        Role::Sender(_) | Role::Receiver(_) => self.frames(now, measuring, st),
                        Role::NatsRequester(_) | Role::NatsResponder(_) => {
                            self.nats_ops(now, measuring, st)
                        }
                        Role::RelayRequester(_) | Role::RelayResponder(_) => {
                            self.records(now, measuring, st)
                        }
                    }
                    if self.rstart == self.rend {
                        self.rstart = 0;
                        self.rend = 0;
                    }
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

    /// fedmcp: every complete WebSocket frame.
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
                    s.win.answers += 1;
                    if s.win.answers.is_multiple_of(VERIFY_EVERY) {
                        verify_answer(text, st);
                    }
                    s.win.complete(id, now, measuring, st, &self.name);
                    return;
                }
                slow_sender(&mut s.win, text, now, measuring, st, &self.name);
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
            _ => {}
        }
    }

    /// nats: every complete server op.
    fn nats_ops(&mut self, now: Instant, measuring: bool, st: &mut Stats) {
        let limits = Limits::default();
        while !self.closed {
            let (op, n) = match nats::parse(&self.rbuf[self.rstart..self.rend], &limits) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    st.error(format!("{}: {e}", self.name));
                    self.closed = true;
                    return;
                }
            };
            self.rstart += n;
            let m = match op {
                ServerOp::Msg(m) => m,
                ServerOp::Ping => {
                    nats::pong(&mut self.wbuf);
                    continue;
                }
                ServerOp::Pong | ServerOp::Ok | ServerOp::Info(_) => continue,
                ServerOp::Err(e) => {
                    st.error(format!("{}: -ERR {e}", self.name));
                    continue;
                }
            };
            match &mut self.role {
                Role::NatsRequester(q) => {
                    let id = m
                        .subject
                        .strip_prefix(q.inbox.as_str())
                        .and_then(|s| s.parse::<u64>().ok());
                    let Some(id) = id else {
                        st.error(format!("{}: message on {}", self.name, m.subject));
                        continue;
                    };
                    if m.payload != NATS_ANSWER {
                        st.error(format!(
                            "{}: unexpected answer {:?}",
                            self.name,
                            String::from_utf8_lossy(&m.payload)
                        ));
                        q.win.release(id);
                        continue;
                    }
                    q.win.answers += 1;
                    if q.win.answers.is_multiple_of(VERIFY_EVERY) {
                        if m.sid == 1 && m.reply.is_none() && m.status.is_none() {
                            st.verified += 1;
                        } else {
                            st.error(format!("verify: unexpected answer {m:?}"));
                        }
                    }
                    q.win.complete(id, now, measuring, st, &self.name);
                }
                Role::NatsResponder(r) => {
                    let Some(reply) = m.reply else {
                        st.error(format!("{}: request without a reply subject", self.name));
                        continue;
                    };
                    r.requests += 1;
                    match m.payload.strip_prefix(NATS_SEQ).and_then(parse_u64) {
                        Some((seq, _)) if seq > r.last_seq => r.last_seq = seq,
                        Some((seq, _)) => st.error(format!(
                            "{}: request out of order: seq {seq} after {}",
                            self.name, r.last_seq
                        )),
                        None => st.error(format!("{}: request without a seq", self.name)),
                    }
                    if r.requests.is_multiple_of(VERIFY_EVERY) {
                        verify_nats_request(&m.payload, &r.pad, st);
                    }
                    nats::publish(&mut self.wbuf, &reply, None, NATS_ANSWER);
                }
                _ => {}
            }
        }
    }

    /// relay: every complete record.
    fn records(&mut self, now: Instant, measuring: bool, st: &mut Stats) {
        while !self.closed {
            let buf = &self.rbuf[self.rstart..self.rend];
            match &mut self.role {
                Role::RelayRequester(q) => {
                    if buf.len() < RELAY_ANSWER {
                        return;
                    }
                    let id = u64_le(buf);
                    if &buf[8..RELAY_ANSWER] != RELAY_TAG {
                        st.error(format!("{}: answer record without its tag", self.name));
                        self.closed = true;
                        return;
                    }
                    self.rstart += RELAY_ANSWER;
                    q.win.answers += 1;
                    if q.win.answers.is_multiple_of(VERIFY_EVERY) {
                        st.verified += 1;
                    }
                    q.win.complete(id, now, measuring, st, &self.name);
                }
                Role::RelayResponder(r) => {
                    if buf.len() < r.record_len {
                        return;
                    }
                    let rec = &buf[..r.record_len];
                    let id = u64_le(rec);
                    if id > r.last_id {
                        r.last_id = id;
                    } else {
                        st.error(format!(
                            "{}: request out of order: id {id} after {}",
                            self.name, r.last_id
                        ));
                    }
                    r.requests += 1;
                    if r.requests.is_multiple_of(VERIFY_EVERY) {
                        if rec[8..].iter().all(|&b| b == b'x') {
                            st.verified += 1;
                        } else {
                            st.error(format!("verify: request record {id} is not its padding"));
                        }
                    }
                    self.wbuf.extend_from_slice(&id.to_le_bytes());
                    self.wbuf.extend_from_slice(RELAY_TAG);
                    self.rstart += r.record_len;
                }
                _ => return,
            }
        }
    }

    /// Writes the requests the sender may write now: closed loop, as many as the window has
    /// free slots; open loop, every request that is due (up to the window's cap).
    fn top_up(&mut self, now: Instant, measuring: bool, st: &mut Stats) {
        let mut digits = [0u8; 20];
        match &mut self.role {
            Role::Sender(s) => {
                while let Some(id) = s.win.take(now, measuring, st) {
                    let d = fmt_u64(id, &mut digits);
                    let mask = self.rng.next_u32();
                    encode_frame_parts(
                        &mut self.wbuf,
                        OP_TEXT,
                        &[ID_PREFIX, d, &s.mid, d, &s.tail],
                        mask,
                    );
                }
            }
            Role::NatsRequester(q) => {
                while let Some(id) = q.win.take(now, measuring, st) {
                    let d = fmt_u64(id, &mut digits);
                    q.reply.truncate(q.inbox.len());
                    q.reply.extend(d.iter().map(|&b| char::from(b)));
                    q.payload.clear();
                    q.payload.extend_from_slice(NATS_SEQ);
                    q.payload.extend_from_slice(d);
                    q.payload.extend_from_slice(&q.tail);
                    nats::publish(&mut self.wbuf, &q.subject, Some(&q.reply), &q.payload);
                }
            }
            Role::RelayRequester(q) => {
                while let Some(id) = q.win.take(now, measuring, st) {
                    self.wbuf.extend_from_slice(&id.to_le_bytes());
                    self.wbuf.extend_from_slice(&q.pad);
                }
            }
            _ => {}
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

/// Answers the fast path did not recognise: errors (freeing the slot), notifications.
fn slow_sender(
    win: &mut Window,
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
            win.complete(id, now, measuring, st, name);
            return;
        }
        st.error(format!("send status {status}"));
    }
    // The request is over either way: give its slot back (not counted as a forward).
    win.release(id);
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

#[derive(serde::Deserialize)]
struct Message<'a> {
    seq: u64,
    pad: &'a str,
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

/// nats: a request's payload is the fedmcp message, `{"seq":<id>,"pad":"xxx…"}`.
fn verify_nats_request(payload: &[u8], pad: &str, st: &mut Stats) {
    match serde_json::from_slice::<Message>(payload) {
        Ok(m) if m.seq > 0 && m.pad == pad => st.verified += 1,
        Ok(_) => st.error(format!(
            "verify: unexpected request payload {}",
            String::from_utf8_lossy(payload)
        )),
        Err(e) => st.error(format!("verify: request payload does not parse: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// One client event loop.
// ---------------------------------------------------------------------------------------------

struct Plan {
    start: Instant,
    measure_at: Instant,
    end_at: Instant,
    /// Open loop: requests per second over all pairs.
    open_loop: Option<f64>,
    /// Open loop: how long before a scheduled request the loop stops blocking in poll.
    wake_early: Duration,
}

/// Open loop: wakes the client loop `plan.wake_early` before each scheduled time of the whole
/// run (`start + j/rate`), at most every `MIN_TICK`, until `plan.end_at` or `stop`.
fn ticker(waker: Arc<Waker>, plan: Arc<Plan>, rate: f64, stop: Arc<AtomicBool>) {
    precise_sleeps();
    let (t0, end_at, early) = (plan.start, plan.end_at, plan.wake_early);
    let mut target = t0;
    loop {
        let now = Instant::now();
        if now >= end_at || stop.load(Ordering::Relaxed) {
            return;
        }
        if target > now {
            std::thread::sleep(target.min(end_at) - now);
        }
        if waker.wake().is_err() {
            return;
        }
        // The next scheduled time at least `MIN_TICK` after this wake-up's.
        let next = Instant::now().saturating_duration_since(t0) + early + MIN_TICK;
        let at = t0 + Duration::from_secs_f64((next.as_secs_f64() * rate).ceil() / rate);
        target = at.checked_sub(early).unwrap_or(at);
    }
}

/// Makes this thread's sleeps end on time: Linux lets a normal thread's timers fire up to its
/// timer slack late (50 µs by default), which at 10,000 requests/s is half the interval
/// between two of them. One `prctl(PR_SET_TIMERSLACK, 1)` (1 ns) for the calling thread; if
/// it fails the sleeps are only less precise (`send_lag_*` shows it).
fn precise_sleeps() {
    const PR_SET_TIMERSLACK: i32 = 29;
    unsafe extern "C" {
        fn prctl(option: i32, ...) -> i32;
    }
    // SAFETY: PR_SET_TIMERSLACK takes one unsigned long and touches no memory of ours.
    let rc = unsafe { prctl(PR_SET_TIMERSLACK, 1 as std::ffi::c_ulong) };
    if rc != 0 {
        eprintln!(
            "loadgen: prctl(PR_SET_TIMERSLACK) failed: {}",
            io::Error::last_os_error()
        );
    }
}

/// Drives `clients` from `plan.start` to `plan.end_at` (or `stop`); statistics are reset at
/// `plan.measure_at`. Returns the clients (for the next run) and what was measured.
fn run_loop(
    mut clients: Vec<Client>,
    plan: Arc<Plan>,
    stop: Arc<AtomicBool>,
) -> (Vec<Client>, Stats) {
    let mut st = Stats::new();
    let mut poll = Poll::new().unwrap_or_else(|e| panic!("mio poll: {e}"));
    for (i, c) in clients.iter_mut().enumerate() {
        poll.registry()
            .register(
                &mut c.sock,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .unwrap_or_else(|e| panic!("register {}: {e}", c.name));
        c.readable = true;
        c.writable = true;
        if let Some(w) = c.role.window_mut() {
            w.begin(plan.start);
        }
    }
    let tick_stop = Arc::new(AtomicBool::new(false));
    let ticker = plan.open_loop.map(|rate| {
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKE).unwrap_or_else(|e| panic!("mio waker: {e}")),
        );
        let (plan, stop) = (plan.clone(), tick_stop.clone());
        std::thread::spawn(move || ticker(waker, plan, rate, stop))
    });
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
        // Open loop: wake for the next scheduled request. Poll's timeout has 1 ms resolution:
        // the ticker wakes us `plan.wake_early` before the request is due, and from then on we
        // poll without blocking. A request already due waits for a free slot, that is for an
        // answer: no timer for it.
        let now = Instant::now();
        let mut timeout = plan
            .end_at
            .saturating_duration_since(now)
            .min(Duration::from_millis(10));
        if let Some(due) = clients
            .iter()
            .filter(|c| !c.closed)
            .filter_map(|c| c.role.window()?.next_due())
            .filter(|&t| t > now)
            .min()
        {
            let left = due - now;
            timeout = if left <= plan.wake_early {
                Duration::ZERO
            } else {
                timeout.min(left)
            };
        }
        if let Err(e) = poll.poll(&mut events, Some(timeout))
            && e.kind() != io::ErrorKind::Interrupted
        {
            panic!("poll: {e}");
        }
        for ev in events.iter() {
            if ev.token() == WAKE {
                continue;
            }
            let c = &mut clients[ev.token().0];
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                c.readable = true;
            }
            if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                c.writable = true;
            }
        }
    }
    tick_stop.store(true, Ordering::Relaxed);
    if let Some(t) = ticker
        && t.join().is_err()
    {
        st.error("the open-loop ticker thread panicked");
    }
    // Requests still unanswered long after they were sent: an answer was lost (or stalled).
    let now = Instant::now();
    for c in clients.iter_mut() {
        if let Some(w) = c.role.window() {
            let stuck = w.stuck(now);
            if stuck > 0 {
                st.error(format!(
                    "{}: {stuck} requests unanswered for over {STUCK_AFTER:?} at the end",
                    c.name
                ));
            }
            st.unsent += w.unsent(now.min(plan.end_at));
        }
        // The next run registers the sockets with its own poll.
        let _ = poll.registry().deregister(&mut c.sock);
    }
    (clients, st)
}

// ---------------------------------------------------------------------------------------------
// The processes under test.
// ---------------------------------------------------------------------------------------------

/// nats-server or the relay: a child process killed when dropped.
struct Spawned {
    child: Child,
    /// The relay exits when this pipe closes, so it never outlives the load generator.
    _stdin: Option<ChildStdin>,
    addr: SocketAddr,
    /// Where its output goes (removed when dropped).
    log: Option<PathBuf>,
    /// nats-server's version from its INFO.
    version: String,
}

impl Spawned {
    fn log_tail(&self, lines: usize) -> String {
        let Some(p) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.log {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Peer {
    Proxy(ProxyProc),
    Spawned(Spawned),
}

impl Peer {
    fn pid(&self) -> u32 {
        match self {
            Peer::Proxy(p) => p.pid,
            Peer::Spawned(s) => s.child.id(),
        }
    }

    fn is_running(&mut self) -> bool {
        match self {
            Peer::Proxy(p) => p.is_running(),
            Peer::Spawned(s) => matches!(s.child.try_wait(), Ok(None)),
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        match self {
            Peer::Proxy(p) => p.stderr_tail(lines),
            Peer::Spawned(s) => s.log_tail(lines),
        }
    }
}

fn temp_path(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "fedmcp-loadgen-{}-{nanos}.{what}",
        std::process::id()
    ))
}

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
        .port()
}

// ---------------------------------------------------------------------------------------------
// Setup, per mode: the process under test and the (sender, receiver) client pairs.
// ---------------------------------------------------------------------------------------------

/// The `pad` of a message of about `bytes` bytes: `{"seq":ID,"pad":"xxx..."}` is 19 bytes
/// of structure and an id of about 8 digits.
fn pad_of(bytes: usize) -> String {
    "x".repeat(bytes.saturating_sub(27))
}

fn to_client(
    name: String,
    peer: &'static str,
    sock: TcpStream,
    pending: &[u8],
    rng: Rng,
    role: Role,
) -> Client {
    sock.set_read_timeout(None)
        .unwrap_or_else(|e| panic!("{name}: clear the read timeout: {e}"));
    sock.set_nonblocking(true)
        .unwrap_or_else(|e| panic!("{name}: non-blocking: {e}"));
    let mut rbuf = vec![0u8; READ_BUF.max(pending.len() * 2)];
    rbuf[..pending.len()].copy_from_slice(pending);
    Client {
        name,
        peer,
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
        role,
    }
}

/// What every mode's setup needs.
struct Setup {
    pairs: usize,
    window: usize,
    msg_bytes: usize,
    /// Open loop: requests per second over all pairs.
    open_loop: Option<f64>,
}

impl Setup {
    fn window(&self, pair: usize) -> Window {
        Window::new(self.window, self.open_loop.map(|r| (r, self.pairs, pair)))
    }
}

fn setup_fedmcp(o: &Opts, s: &Setup, x: &Extras) -> (Peer, Vec<(Client, Client)>, FedExtra) {
    let mut extra = FedExtra::default();
    let proxy = match o.get("addr") {
        Some(a) => {
            let addr: SocketAddr = a
                .parse()
                .unwrap_or_else(|e| panic!("--addr {a:?}: not HOST:PORT: {e}"));
            let pid = o
                .get("pid")
                .and_then(|p| p.parse().ok())
                .or_else(|| pid_listening_on(addr))
                .unwrap_or(0);
            let secret = o
                .get("secret")
                .or_else(|| std::env::var("FEDMCP_JWT_SECRET").ok())
                .unwrap_or_else(|| panic!("--secret or FEDMCP_JWT_SECRET is needed with --addr"));
            if pid == 0 {
                eprintln!("loadgen: proxy pid unknown: no proxy CPU/RSS figures");
            }
            ProxyProc::external(addr, pid, secret)
        }
        None => {
            extra.state = x.state_parent.as_deref().map(StateDir::create);
            ProxyProc::spawn(&proxy_env(s, x, extra.state.as_ref()))
        }
    };
    let addr = proxy.addr;
    let admin = proxy.admin_token();
    let tag = std::process::id();
    let pad = pad_of(s.msg_bytes);

    // Receivers first, so that every receiver is online before any sender starts.
    let mut rng = Rng::seeded();
    let mut clients = Vec::new();
    for i in 0..s.pairs {
        let a = format!("lg{tag}-a{i}");
        let b = format!("lg{tag}-b{i}");
        let tb = proxy.register(&admin, &b);
        let ta = proxy.register(&admin, &a);
        if i == 0 && x.recipient_queued > 0 {
            // b_0 is offline: queue its messages, then let it drain them below.
            let from = format!("lg{tag}-rqs");
            let tok = proxy.register(&admin, &from);
            fill_queue(addr, &tok, &b, x.recipient_queued, &pad, &mut rng)
                .unwrap_or_else(|e| panic!("queueing for {b} (--recipient-queued): {e}"));
        }
        let mut sb = Session::open(addr, &tb, rng.next_u32() as u64)
            .unwrap_or_else(|e| panic!("session {b}: {e}"));
        if i == 0 && x.recipient_queued > 0 {
            drain_queue(&mut sb, x.recipient_queued)
                .unwrap_or_else(|e| panic!("{b} draining its queue (--recipient-queued): {e}"));
        }
        sb.sync().unwrap_or_else(|e| panic!("session {b}: {e}"));
        let mut sa = Session::open(addr, &ta, rng.next_u32() as u64)
            .unwrap_or_else(|e| panic!("session {a}: {e}"));
        sa.sync().unwrap_or_else(|e| panic!("session {a}: {e}"));
        let receiver = to_client(
            b.clone(),
            "the proxy",
            sb.sock,
            &sb.rbuf,
            sb.rng,
            Role::Receiver(Receiver {
                from: a.clone(),
                pad: pad.clone(),
                delivers: 0,
                last_seq: 0,
            }),
        );
        let mid = format!(
            ",\"method\":\"federation/send\",\"params\":{{\"to\":\"{b}\",\"message\":{{\"seq\":"
        );
        let tail = format!(",\"pad\":\"{pad}\"}}}}}}");
        let sender = to_client(
            a,
            "the proxy",
            sa.sock,
            &sa.rbuf,
            sa.rng,
            Role::Sender(Sender {
                win: s.window(i),
                mid: mid.into_bytes(),
                tail: tail.into_bytes(),
            }),
        );
        clients.push((sender, receiver));
    }

    if x.queued > 0 {
        // A registered server that stays offline, with `queued` messages waiting for it.
        let to = format!("lg{tag}-q");
        proxy.register(&admin, &to);
        let from = format!("lg{tag}-qs");
        let tok = proxy.register(&admin, &from);
        fill_queue(addr, &tok, &to, x.queued, &pad, &mut rng)
            .unwrap_or_else(|e| panic!("queueing for {to} (--queued): {e}"));
    }
    if x.idle_sessions > 0 {
        let t = Instant::now();
        let mut socks = Vec::with_capacity(x.idle_sessions);
        for k in 0..x.idle_sessions {
            let id = format!("lg{tag}-i{k}");
            let tok = proxy.register(&admin, &id);
            let mut ss = Session::open(addr, &tok, rng.next_u32() as u64).unwrap_or_else(|e| {
                panic!(
                    "idle session {k}: {e}; proxy stderr: {}",
                    proxy.stderr_tail(5)
                )
            });
            ss.sync()
                .unwrap_or_else(|e| panic!("idle session {k}: {e}"));
            socks.push(ss);
        }
        eprintln!(
            "loadgen: {} idle sessions registered and online in {:.1} s",
            x.idle_sessions,
            t.elapsed().as_secs_f64()
        );
        extra.keeper = Some(IdleKeeper::start(socks));
    }
    if let Some(dir) = &extra.state {
        let uploader = x
            .phases
            .iter()
            .any(|b| matches!(b, Background::Upload(_)))
            .then(|| {
                let id = format!("lg{tag}-up");
                let tok = proxy.register(&admin, &id);
                (id, tok)
            });
        extra.bg = Some(Arc::new(BgCtx {
            addr,
            admin: admin.clone(),
            uploader,
            churn_id: format!("lg{tag}-churn"),
            dir: dir.path.clone(),
            proxy_stderr: proxy.stderr.clone(),
        }));
    }
    (Peer::Proxy(proxy), clients, extra)
}

/// The spawned proxy's environment: the rate limit out of the way, and room for the extra
/// sessions, queued messages, state dir and uploads the options ask for.
fn proxy_env(s: &Setup, x: &Extras, state: Option<&StateDir>) -> Vec<(&'static str, String)> {
    // The default limit (1000/s per session) would be the benchmark's ceiling.
    let mut env = vec![("FEDMCP_RATE_LIMIT", "1000000/s,burst=10000000".to_string())];
    // Sessions: the pairs, the idle ones, the setup senders; plus HTTP connections.
    let sessions = 2 * s.pairs + x.idle_sessions + 8;
    env.push((
        "FEDMCP_MAX_CONNECTIONS",
        (sessions + 512).max(4096).to_string(),
    ));
    // The registry is allocated at start: raised only when needed (as benches/memory.rs).
    if sessions + 64 > 1024 {
        env.push(("FEDMCP_MAX_SERVERS", (sessions + 64).to_string()));
    }
    let q = x.queued.max(x.recipient_queued);
    if q > 10_000 {
        env.push(("FEDMCP_QUEUE_MAX_MESSAGES", q.to_string()));
    }
    // A queued copy holds its message, its ids and 64 bytes of bookkeeping.
    let q_bytes = q as u64 * (s.msg_bytes as u64 + 256);
    if q_bytes > 64 << 20 {
        env.push(("FEDMCP_QUEUE_MAX_BYTES", q_bytes.to_string()));
    }
    if let Some(dir) = state {
        env.push(("FEDMCP_STATE_DIR", dir.path.display().to_string()));
        // The proxy logs each compaction at info.
        env.push(("RUST_LOG", "warn,fedmcp::io::proxy=info".to_string()));
    }
    let upload = x
        .phases
        .iter()
        .filter_map(|b| match b {
            Background::Upload(n) => Some(*n),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    if upload > 1 << 30 {
        env.push(("FEDMCP_RESOURCE_MAX_BYTES", upload.to_string()));
        env.push(("FEDMCP_RESOURCE_QUOTA_PER_SERVER_BYTES", upload.to_string()));
        env.push((
            "FEDMCP_RESOURCE_QUOTA_BYTES",
            upload.max(10 << 30).to_string(),
        ));
    }
    env
}

/// `CONNECT` for a plain request/reply client: `verbose`, `pedantic` and `headers` false.
/// Written here because the codec's `nats::connect` always announces headers and
/// no-responders.
fn nats_connect_line(name: &str) -> Vec<u8> {
    let json = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "tls_required": false,
        "name": name,
        "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "headers": false,
        "no_responders": false,
    });
    let mut out = b"CONNECT ".to_vec();
    out.extend_from_slice(json.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// A NATS client connection: `INFO` read, `CONNECT`, the subscriptions (sids 1, 2, ...) and a
/// `PING` written, its `PONG` read (so the subscriptions are in place). Returns the socket,
/// bytes read past the `PONG`, and the server's `INFO`.
fn nats_open(
    addr: SocketAddr,
    name: &str,
    subs: &[&str],
) -> io::Result<(TcpStream, Vec<u8>, nats::Info)> {
    let mut sock = TcpStream::connect(addr)?;
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
                        let mut out = nats_connect_line(name);
                        for (i, s) in subs.iter().enumerate() {
                            let before = out.len();
                            nats::subscribe(&mut out, s, None, i as u64 + 1);
                            if out.len() == before {
                                return Err(io::Error::other(format!("bad subject {s:?}")));
                            }
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

/// The nats-server binary: `--nats-bin`, else Debian's `/usr/sbin/nats-server`, else the one
/// on PATH.
fn nats_bin(o: &Opts) -> String {
    o.get("nats-bin").unwrap_or_else(|| {
        if Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server".into()
        } else {
            "nats-server".into()
        }
    })
}

/// Starts nats-server on a free loopback port (no JetStream) and waits until it answers.
fn spawn_nats(bin: &str) -> Spawned {
    let port = free_port();
    let log = temp_path("nats-server.log");
    let logf =
        std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let errf = logf
        .try_clone()
        .unwrap_or_else(|e| panic!("dup {}: {e}", log.display()));
    let child = Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::from(logf))
        .stderr(Stdio::from(errf))
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {bin}: {e} (install it with `make test-tools`, or pass --nats-bin)")
        });
    let mut s = Spawned {
        child,
        _stdin: None,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        log: Some(log),
        version: String::new(),
    };
    let t0 = Instant::now();
    loop {
        if let Ok(Some(status)) = s.child.try_wait() {
            panic!("nats-server exited ({status}):\n{}", s.log_tail(20));
        }
        match nats_open(s.addr, "loadgen-probe", &[]) {
            Ok((_, _, info)) => {
                s.version = info.version;
                return s;
            }
            Err(e) if t0.elapsed() > SETUP_WAIT => panic!(
                "nats-server not ready on {} within {SETUP_WAIT:?}: {e}\n{}",
                s.addr,
                s.log_tail(20)
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn setup_nats(o: &Opts, s: &Setup) -> (Peer, Vec<(Client, Client)>) {
    let server = spawn_nats(&nats_bin(o));
    let pad = pad_of(s.msg_bytes);
    let mut rng = Rng::seeded();
    let mut clients = Vec::new();
    for i in 0..s.pairs {
        let subject = format!("req.{i}");
        let inbox = format!("_INBOX.{i}.");
        // The responder first: its subscription is in place before any request.
        let (rs, rbuf, _) = nats_open(server.addr, &format!("loadgen-resp{i}"), &[&subject])
            .unwrap_or_else(|e| panic!("NATS responder {i}: {e}"));
        let (qs, qbuf, _) = nats_open(
            server.addr,
            &format!("loadgen-req{i}"),
            &[&format!("{inbox}*")],
        )
        .unwrap_or_else(|e| panic!("NATS requester {i}: {e}"));
        let mut q = NatsRequester {
            win: s.window(i),
            subject,
            reply: inbox.clone(),
            inbox,
            payload: Vec::new(),
            tail: format!(",\"pad\":\"{pad}\"}}").into_bytes(),
        };
        // The encoder writes nothing for a subject it refuses: check the templates once.
        let mut probe = Vec::new();
        q.reply.push('1');
        nats::publish(&mut probe, &q.subject, Some(&q.reply), b"x");
        assert!(!probe.is_empty(), "NATS subjects {:?} refused", q.subject);
        let requester = to_client(
            format!("nats-req{i}"),
            "nats-server",
            qs,
            &qbuf,
            Rng::new(rng.next_u32() as u64),
            Role::NatsRequester(q),
        );
        let responder = to_client(
            format!("nats-resp{i}"),
            "nats-server",
            rs,
            &rbuf,
            Rng::new(rng.next_u32() as u64),
            Role::NatsResponder(NatsResponder {
                pad: pad.clone(),
                requests: 0,
                last_seq: 0,
            }),
        );
        clients.push((requester, responder));
    }
    (Peer::Spawned(server), clients)
}

/// Starts this binary as the relay (`--serve-relay`) and reads the address it prints.
fn spawn_relay() -> Spawned {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot find the load generator's own binary: {e}"));
    let mut child = Command::new(&exe)
        .arg(SERVE_RELAY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the relay ({}): {e}", exe.display()));
    let stdin = child.stdin.take();
    let Some(stdout) = child.stdout.take() else {
        panic!("the relay's stdout is not piped");
    };
    let line = first_line(stdout, SETUP_WAIT);
    let addr = line
        .trim()
        .strip_prefix("relay listening on ")
        .and_then(|a| a.parse().ok());
    let Some(addr) = addr else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the relay did not start (line {line:?})");
    };
    Spawned {
        child,
        _stdin: stdin,
        addr,
        log: None,
        version: String::new(),
    }
}

/// Connects pair `i`'s requester and responder (in that order: the relay pairs them in accept
/// order) and does one round trip through them, which proves they were paired together.
fn relay_pair(addr: SocketAddr, i: usize, record_len: usize) -> io::Result<(TcpStream, TcpStream)> {
    let open = || -> io::Result<TcpStream> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(SETUP_WAIT))?;
        Ok(s)
    };
    let mut q = open()?;
    let mut r = open()?;
    let mut rec = vec![b'x'; record_len];
    rec[..8].copy_from_slice(&(i as u64).to_le_bytes());
    q.write_all(&rec)?;
    let mut got = vec![0u8; record_len];
    r.read_exact(&mut got)?;
    if got != rec {
        return Err(io::Error::other("the responder got another pair's record"));
    }
    let mut answer = [0u8; RELAY_ANSWER];
    answer[..8].copy_from_slice(&(i as u64).to_le_bytes());
    answer[8..].copy_from_slice(RELAY_TAG);
    r.write_all(&answer)?;
    let mut got = [0u8; RELAY_ANSWER];
    q.read_exact(&mut got)?;
    if got != answer {
        return Err(io::Error::other("the requester got another pair's answer"));
    }
    Ok((q, r))
}

fn setup_relay(s: &Setup) -> (Peer, Vec<(Client, Client)>) {
    assert!(
        s.msg_bytes >= 8,
        "--msg-bytes must be at least 8 in relay mode (the record holds an 8-byte id)"
    );
    let relay = spawn_relay();
    let mut rng = Rng::seeded();
    let mut clients = Vec::new();
    for i in 0..s.pairs {
        let (q, r) = relay_pair(relay.addr, i, s.msg_bytes)
            .unwrap_or_else(|e| panic!("relay pair {i}: {e}"));
        let requester = to_client(
            format!("relay-req{i}"),
            "the relay",
            q,
            &[],
            Rng::new(rng.next_u32() as u64),
            Role::RelayRequester(RelayRequester {
                win: s.window(i),
                pad: vec![b'x'; s.msg_bytes - 8],
            }),
        );
        let responder = to_client(
            format!("relay-resp{i}"),
            "the relay",
            r,
            &[],
            Rng::new(rng.next_u32() as u64),
            Role::RelayResponder(RelayResponder {
                record_len: s.msg_bytes,
                requests: 0,
                last_id: 0,
            }),
        );
        clients.push((requester, responder));
    }
    (Peer::Spawned(relay), clients)
}

// ---------------------------------------------------------------------------------------------
// fedmcp mode: costs that grow (idle sessions, queued messages) and disk work in the
// background (a state dir, an upload, a compaction).
// ---------------------------------------------------------------------------------------------

/// The state log is compacted once it is over this size (and over twice the snapshot):
/// `COMPACT_MIN_BYTES` in src/store/state.rs.
const COMPACT_AT: u64 = 8 << 20;
/// Size of the `capabilities` of one churn registration: the log grows by about this much per
/// step (a registration, then its removal).
const CHURN_BYTES: usize = 256 << 10;
/// The resource the `upload` background work stores (then deletes, after the run).
const UPLOAD_NAME: &str = "loadgen-upload";
/// Queued messages written per batch before their answers are read (setup).
const FILL_BATCH: usize = 256;

/// What fedmcp mode sets up besides the measured pairs, and the background work of the runs.
struct Extras {
    idle_sessions: usize,
    queued: usize,
    recipient_queued: usize,
    /// The directory in which the proxy's state dir is made; `None`: memory only.
    state_parent: Option<PathBuf>,
    phases: Vec<Background>,
}

/// What setup made for the extras.
#[derive(Default)]
struct FedExtra {
    keeper: Option<IdleKeeper>,
    bg: Option<Arc<BgCtx>>,
    state: Option<StateDir>,
}

/// Opens a session for `token` and sends `n` `queue: true` requests to `to` (which is
/// offline), `FILL_BATCH` at a time; every one must be answered `queued`. The message is the
/// run's (`{"seq":k,"pad":...}`, k from 1). The session is closed at the end.
fn fill_queue(
    addr: SocketAddr,
    token: &str,
    to: &str,
    n: usize,
    pad: &str,
    rng: &mut Rng,
) -> io::Result<()> {
    let mut s = Session::open(addr, token, rng.next_u32() as u64)?;
    s.sync()?;
    let mut done = 0;
    while done < n {
        let k = FILL_BATCH.min(n - done);
        let mut out = Vec::new();
        for id in done + 1..=done + k {
            let text = format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"federation/send\",\"params\":{{\"to\":\"{to}\",\"message\":{{\"seq\":{id},\"pad\":\"{pad}\"}},\"queue\":true}}}}"
            );
            let mask = s.rng.next_u32();
            encode_frame(&mut out, OP_TEXT, text.as_bytes(), mask);
        }
        s.sock.write_all(&out)?;
        let mut answered = 0;
        while answered < k {
            let m = s.recv_text()?;
            if m.contains("\"method\"") {
                continue; // a notification
            }
            if !m.contains("\"status\":\"queued\"") {
                return Err(io::Error::other(format!("a send was not queued: {m}")));
            }
            answered += 1;
        }
        done += k;
    }
    Ok(())
}

/// Answers the `n` deliveries of a queue being drained to `s` (`{"ok":true}` each).
fn drain_queue(s: &mut Session, n: usize) -> io::Result<()> {
    let mut answered = 0;
    while answered < n {
        let m = s.recv_text()?;
        if !m.contains("\"federation/deliver\"") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&m).map_err(io::Error::other)?;
        let Some(id) = v.get("id") else {
            return Err(io::Error::other(format!(
                "a queued delivery without an id: {m}"
            )));
        };
        s.send_text(&format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"ok\":true}}}}"
        ))?;
        answered += 1;
    }
    Ok(())
}

/// Idle control sessions held open by a thread of their own: they answer the proxy's pings
/// (a member that does not is dropped after two heartbeats) and send nothing else.
struct IdleKeeper {
    shared: Arc<IdleShared>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct IdleShared {
    pongs: AtomicU64,
    /// Sessions closed by the proxy, or failed.
    lost: AtomicU64,
    /// Text messages received (none is expected).
    texts: AtomicU64,
}

struct IdleConn {
    sock: mio::net::TcpStream,
    rbuf: Vec<u8>,
    out: Vec<u8>,
    rng: Rng,
    closed: bool,
}

impl IdleConn {
    /// Reads what is there, answers every ping; false when the session is gone.
    fn service(&mut self, shared: &IdleShared) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match self.sock.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        let mut at = 0;
        while let Ok(Some(f)) = decode_frame(&self.rbuf[at..]) {
            let (a, b) = (at + f.start, at + f.end);
            match f.opcode {
                OP_PING => {
                    let mask = self.rng.next_u32();
                    let payload = self.rbuf[a..b].to_vec();
                    encode_frame(&mut self.out, OP_PONG, &payload, mask);
                    shared.pongs.fetch_add(1, Ordering::Relaxed);
                }
                OP_CLOSE => return false,
                OP_PONG => {}
                _ => {
                    shared.texts.fetch_add(1, Ordering::Relaxed);
                }
            }
            at = b;
        }
        if decode_frame(&self.rbuf[at..]).is_err() {
            return false;
        }
        self.rbuf.drain(..at);
        while !self.out.is_empty() {
            match self.sock.write(&self.out) {
                Ok(0) => return false,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

impl IdleKeeper {
    fn start(sessions: Vec<Session>) -> IdleKeeper {
        let shared = Arc::new(IdleShared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut conns: Vec<IdleConn> = sessions
            .into_iter()
            .map(|s| {
                s.sock
                    .set_nonblocking(true)
                    .unwrap_or_else(|e| panic!("idle session: non-blocking: {e}"));
                IdleConn {
                    sock: mio::net::TcpStream::from_std(s.sock),
                    rbuf: s.rbuf,
                    out: Vec::new(),
                    rng: s.rng,
                    closed: false,
                }
            })
            .collect();
        let (sh, st) = (shared.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut poll = Poll::new().unwrap_or_else(|e| panic!("mio poll: {e}"));
            for (i, c) in conns.iter_mut().enumerate() {
                poll.registry()
                    .register(
                        &mut c.sock,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .unwrap_or_else(|e| panic!("register idle session {i}: {e}"));
            }
            let mut events = Events::with_capacity(1024);
            while !st.load(Ordering::Relaxed) {
                if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(100)))
                    && e.kind() != io::ErrorKind::Interrupted
                {
                    panic!("poll: {e}");
                }
                for ev in events.iter() {
                    let c = &mut conns[ev.token().0];
                    if !c.closed && !c.service(&sh) {
                        c.closed = true;
                        sh.lost.fetch_add(1, Ordering::Relaxed);
                        let _ = poll.registry().deregister(&mut c.sock);
                    }
                }
            }
        });
        IdleKeeper {
            shared,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for IdleKeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Disk work done while a run is measured (`--background`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Background {
    None,
    /// One `PUT` of this many bytes.
    Upload(u64),
    /// The state log grown past the compaction threshold.
    Compaction,
}

impl Background {
    fn parse(s: &str) -> Option<Background> {
        match s {
            "none" => Some(Background::None),
            "compaction" => Some(Background::Compaction),
            _ => s
                .strip_prefix("upload:")?
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .map(Background::Upload),
        }
    }

    fn name(self) -> String {
        match self {
            Background::None => "none".into(),
            Background::Upload(n) => format!("upload:{n}"),
            Background::Compaction => "compaction".into(),
        }
    }
}

/// The spawned proxy's state dir, made fresh under `--state-dir` and removed when dropped.
struct StateDir {
    path: PathBuf,
    /// The file system it is on (from /proc/self/mounts), for the summary line.
    fs: String,
}

impl StateDir {
    fn create(parent: &Path) -> StateDir {
        let parent = parent
            .canonicalize()
            .unwrap_or_else(|e| panic!("--state-dir {}: {e}", parent.display()));
        let name = temp_path("state");
        let path = parent.join(name.file_name().expect("a file name"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let fs = fs_type(&path);
        StateDir { path, fs }
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The type of the file system holding `path`: the longest mount point that is a prefix of
/// it in /proc/self/mounts ("?" if not found). A tmpfs state dir makes fsync free.
fn fs_type(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Mount points escape spaces as \040; ours have none.
            (f.len() > 2 && path.starts_with(f[1])).then(|| (f[1].len(), f[2].to_string()))
        })
        .max_by_key(|(n, _)| *n)
        .map_or_else(|| "?".to_string(), |(_, t)| t)
}

/// What the background work needs to reach the proxy and to watch its state dir.
struct BgCtx {
    addr: SocketAddr,
    admin: String,
    /// The uploading server's id and federation token (when a run uploads).
    uploader: Option<(String, String)>,
    /// The server registered and removed to grow the state log.
    churn_id: String,
    dir: PathBuf,
    proxy_stderr: Option<PathBuf>,
}

impl BgCtx {
    fn log_len(&self) -> u64 {
        std::fs::metadata(self.dir.join("state.log")).map_or(0, |m| m.len())
    }

    fn snap_len(&self) -> u64 {
        std::fs::metadata(self.dir.join("state.snap")).map_or(0, |m| m.len())
    }

    /// The log size past which the proxy compacts (src/store/state.rs `wants_compaction`).
    fn compact_at(&self) -> u64 {
        COMPACT_AT.max(2 * self.snap_len())
    }

    /// Compactions the proxy has logged so far.
    fn compactions(&self) -> usize {
        self.proxy_stderr
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map_or(0, |t| t.matches("state log compacted").count())
    }

    /// Registers the churn server with `CHURN_BYTES` of capabilities (the record is fsynced
    /// before the answer). Returns how long the request took.
    fn churn_register(&self) -> Result<Duration, String> {
        let body = format!(
            "{{\"serverId\":\"{}\",\"capabilities\":{{\"pad\":\"{}\"}}}}",
            self.churn_id,
            "x".repeat(CHURN_BYTES)
        );
        let t = Instant::now();
        match http(
            self.addr,
            "POST",
            "/v1/servers",
            Some(&self.admin),
            Some(&body),
        ) {
            Ok((200 | 201, _)) => Ok(t.elapsed()),
            Ok((status, b)) => Err(format!("churn registration: {status} {b}")),
            Err(e) => Err(format!("churn registration: {e}")),
        }
    }

    /// Removes the churn server (its record is small).
    fn churn_remove(&self) -> Result<Duration, String> {
        let t = Instant::now();
        let path = format!("/v1/servers/{}", self.churn_id);
        match http(self.addr, "DELETE", &path, Some(&self.admin), None) {
            Ok((204, _)) => Ok(t.elapsed()),
            Ok((status, b)) => Err(format!("churn removal: {status} {b}")),
            Err(e) => Err(format!("churn removal: {e}")),
        }
    }

    /// Before a `compaction` run: grows the log to within two churn steps of the threshold,
    /// so that the measured window's first steps cross it. Returns the summary keys: the
    /// steps taken, and the median and slowest registration (a churn record written and
    /// fsynced without a compaction: what `compaction_request_ms` is to be set against).
    fn prefill(&self) -> Result<String, String> {
        let step = CHURN_BYTES as u64 + 256;
        let mut steps = 0;
        let mut took = Vec::new();
        while self.log_len() + 2 * step < self.compact_at() {
            took.push(self.churn_register()?.as_secs_f64() * 1e3);
            self.churn_remove()?;
            steps += 1;
            if steps > 4 * (self.compact_at() / step) as u32 + 16 {
                return Err(format!(
                    "the state log does not grow: {} bytes after {steps} churn steps",
                    self.log_len()
                ));
            }
        }
        let (_, median, max) = min_median_max(took);
        Ok(format!(
            " prefill_steps={steps} prefill_request_ms_median={median:.1} prefill_request_ms_max={max:.1}"
        ))
    }

    /// In the window: churn steps until the log is compacted (it shrinks). Returns the
    /// summary keys; times are from `t0`, the window's start.
    fn compact_now(&self, t0: Instant) -> Result<String, String> {
        let limit = 2 * (self.compact_at() / CHURN_BYTES as u64) as u32 + 8;
        let mut last = self.log_len();
        for step in 1..=limit {
            for register in [true, false] {
                let at = t0.elapsed();
                let took = if register {
                    self.churn_register()?
                } else {
                    self.churn_remove()?
                };
                // The log emptied since the last look: this request's turn compacted it.
                let now = self.log_len();
                if now < last {
                    return Ok(format!(
                        " churn_steps={step} log_before_bytes={last} compaction_at_s={:.3} compaction_request_ms={:.1}",
                        at.as_secs_f64(),
                        took.as_secs_f64() * 1e3,
                    ));
                }
                last = now;
            }
        }
        Err(format!(
            "no compaction after {limit} churn steps (log {} bytes, snapshot {} bytes)",
            self.log_len(),
            self.snap_len()
        ))
    }

    /// Streams one `PUT` of `bytes` generated bytes (never held in memory) and reads the
    /// answer, which must be `201`. Returns the summary keys.
    fn upload(&self, bytes: u64, t0: Instant) -> Result<String, String> {
        let Some((owner, token)) = &self.uploader else {
            return Err("no uploader registered".into());
        };
        let at = t0.elapsed();
        let t = Instant::now();
        let mut s = TcpStream::connect(self.addr).map_err(|e| format!("upload: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(|e| format!("upload: {e}"))?;
        let head = format!(
            "PUT /v1/resources/{UPLOAD_NAME} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nContent-Length: {bytes}\r\nConnection: close\r\n\r\n"
        );
        let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut left = bytes;
        let mut sent = s.write_all(head.as_bytes());
        while sent.is_ok() && left > 0 {
            let n = left.min(block.len() as u64) as usize;
            sent = s.write_all(&block[..n]);
            left -= n as u64;
        }
        // Refused early, the proxy answers and closes: read its answer either way.
        let mut raw = Vec::new();
        let read = s.read_to_end(&mut raw);
        let secs = t.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&raw);
        let status: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if status != 201 {
            return Err(format!(
                "upload of {owner}/{UPLOAD_NAME} answered {status} (write: {sent:?}, read: {read:?}): {}",
                text.chars().take(300).collect::<String>()
            ));
        }
        Ok(format!(
            " upload_status={status} upload_bytes={bytes} upload_at_s={:.3} upload_secs={secs:.3} upload_mib_per_sec={:.1}",
            at.as_secs_f64(),
            bytes as f64 / (1 << 20) as f64 / secs,
        ))
    }

    /// After an `upload` run, outside the window: the resource is deleted again.
    fn delete_upload(&self) -> Result<(), String> {
        let Some((owner, token)) = &self.uploader else {
            return Ok(());
        };
        let path = format!("/v1/resources/{owner}/{UPLOAD_NAME}");
        match http(self.addr, "DELETE", &path, Some(token), None) {
            Ok((204 | 404, _)) => Ok(()),
            Ok((status, b)) => Err(format!("deleting the upload: {status} {b}")),
            Err(e) => Err(format!("deleting the upload: {e}")),
        }
    }
}

/// The background work of one run, in a thread: starts `delay` into the measured window
/// (`t0`). Returns the summary keys and when it was done.
fn start_background(
    bg: Background,
    ctx: Arc<BgCtx>,
    t0: Instant,
    delay: Duration,
) -> Option<std::thread::JoinHandle<(Result<String, String>, Instant)>> {
    if bg == Background::None {
        return None;
    }
    Some(std::thread::spawn(move || {
        std::thread::sleep((t0 + delay).saturating_duration_since(Instant::now()));
        let r = match bg {
            Background::Upload(n) => ctx.upload(n, t0),
            Background::Compaction => ctx.compact_now(t0),
            Background::None => Ok(String::new()),
        };
        (r, Instant::now())
    }))
}

/// The soft limit on open files of this process (`/proc/self/limits`).
fn open_files_limit() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let l = s.lines().find(|l| l.starts_with("Max open files"))?;
    l["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// The relay (`--serve-relay`): a raw TCP relay, the floor of any request/reply forwarder.
// ---------------------------------------------------------------------------------------------

struct RelayConn {
    sock: mio::net::TcpStream,
    /// Bytes from the peer, to be written to this connection.
    out: Vec<u8>,
    opos: usize,
    readable: bool,
    writable: bool,
    closed: bool,
    peer: Option<usize>,
}

impl RelayConn {
    fn pending(&self) -> usize {
        self.out.len() - self.opos
    }

    /// Writes what it can of `out`; the rest waits for writability.
    fn flush(&mut self) -> io::Result<()> {
        while self.opos < self.out.len() && self.writable {
            match self.sock.write(&self.out[self.opos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.opos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.opos == self.out.len() {
            self.out.clear();
            self.opos = 0;
        }
        Ok(())
    }
}

/// Copies from `conns[from]` (reads until WouldBlock, or until `RELAY_CAP` bytes wait for the
/// other side) to `conns[to]`'s buffer, then flushes it. Returns the bytes read; `Err` when
/// either side is closed or failed.
fn relay_copy(
    conns: &mut [RelayConn],
    from: usize,
    to: usize,
    scratch: &mut [u8],
) -> io::Result<usize> {
    conns[to].flush()?;
    let mut moved = 0;
    while conns[from].readable && conns[to].pending() < RELAY_CAP {
        match conns[from].sock.read(scratch) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                conns[to].out.extend_from_slice(&scratch[..n]);
                moved += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => conns[from].readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    conns[to].flush()?;
    Ok(moved)
}

/// Moves bytes both ways between connection `i` and its peer until neither can move more.
fn relay_service(conns: &mut [RelayConn], i: usize, scratch: &mut [u8]) {
    let Some(j) = conns[i].peer else {
        return;
    };
    if conns[i].closed || conns[j].closed {
        return;
    }
    loop {
        let moved = relay_copy(conns, i, j, scratch)
            .and_then(|a| Ok(a + relay_copy(conns, j, i, scratch)?));
        match moved {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    eprintln!("relay: connections {i} and {j}: {e}");
                }
                for k in [i, j] {
                    conns[k].closed = true;
                    let _ = conns[k].sock.shutdown(std::net::Shutdown::Both);
                }
                return;
            }
        }
    }
}

/// The relay process: listens on 127.0.0.1:0, prints `relay listening on ADDR`, pairs
/// connections in accept order and copies bytes between the two of a pair. Exits when its
/// stdin closes (the load generator is gone).
fn serve_relay() {
    let mut poll = Poll::new().unwrap_or_else(|e| panic!("relay: mio poll: {e}"));
    let mut listener = mio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap_or_else(|e| panic!("relay: bind 127.0.0.1:0: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("relay: local address: {e}"));
    const LISTENER: Token = Token(usize::MAX - 1);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .unwrap_or_else(|e| panic!("relay: register the listener: {e}"));
    std::thread::spawn(|| {
        let _ = io::copy(&mut io::stdin(), &mut io::sink());
        std::process::exit(0);
    });
    println!("relay listening on {addr}");
    let _ = io::stdout().flush();

    let mut conns: Vec<RelayConn> = Vec::new();
    let mut scratch = vec![0u8; 64 * 1024];
    let mut events = Events::with_capacity(1024);
    let mut touched = Vec::new();
    loop {
        if let Err(e) = poll.poll(&mut events, None)
            && e.kind() != io::ErrorKind::Interrupted
        {
            panic!("relay: poll: {e}");
        }
        touched.clear();
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut sock, _)) => {
                            let i = conns.len();
                            let _ = sock.set_nodelay(true);
                            if let Err(e) = poll.registry().register(
                                &mut sock,
                                Token(i),
                                Interest::READABLE | Interest::WRITABLE,
                            ) {
                                panic!("relay: register connection {i}: {e}");
                            }
                            // Accept order: 2k is pair k's requester, 2k + 1 its responder.
                            let peer = (i % 2 == 1).then(|| i - 1);
                            conns.push(RelayConn {
                                sock,
                                out: Vec::with_capacity(64 * 1024),
                                opos: 0,
                                readable: true,
                                writable: true,
                                closed: false,
                                peer,
                            });
                            if let Some(p) = peer {
                                conns[p].peer = Some(i);
                                touched.push(i);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            eprintln!("relay: accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let i = ev.token().0;
            let Some(c) = conns.get_mut(i) else {
                continue;
            };
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                c.readable = true;
            }
            if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                c.writable = true;
            }
            touched.push(i);
        }
        for &i in &touched {
            relay_service(&mut conns, i, &mut scratch);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The runs.
// ---------------------------------------------------------------------------------------------

/// What one run printed, for the summary over runs.
struct RunFigures {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

fn min_median_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], median, v[n - 1])
}

fn main() {
    if std::env::args().any(|a| a == SERVE_RELAY) {
        serve_relay();
        return;
    }
    let o = Opts::new("LOADGEN");
    let mode = match o.get("mode").as_deref() {
        None | Some("fedmcp") => Mode::Fedmcp,
        Some("nats") => Mode::Nats,
        Some("relay") => Mode::Relay,
        Some(m) => {
            eprintln!("bad value {m:?} for --mode (fedmcp, nats or relay)");
            std::process::exit(2)
        }
    };
    let duration: f64 = o.parse("duration", 10.0);
    let warmup: f64 = o.parse("warmup", 1.0);
    let window: usize = o.parse("window", 64);
    let pairs: usize = o.parse("pairs", 1);
    let msg_bytes: usize = o.parse("msg-bytes", 100);
    let threads: usize = o.parse("threads", 1).max(1);
    let min_rate: f64 = o.parse("min-rate", 0.0);
    let open_loop: f64 = o.parse("open-loop", 0.0);
    let runs: usize = o.parse("runs", 1);
    // Spinning at most a quarter of the time between two requests: a client that spins all
    // the time takes a core from the system under test (measured on 2 cores: nats-server at
    // 20,000/s had a p50 of 700 µs against 125 µs without spinning).
    let wake_early = Duration::from_micros(o.parse("wake-early-us", WAKE_EARLY_US))
        .min(Duration::from_secs_f64(0.25 / open_loop.max(1.0)));
    let label = o.get("label").unwrap_or_default();
    let extras = Extras {
        idle_sessions: o.parse("idle-sessions", 0),
        queued: o.parse("queued", 0),
        recipient_queued: o.parse("recipient-queued", 0),
        state_parent: o.get("state-dir").map(PathBuf::from),
        phases: match o.get("background") {
            None => vec![Background::None],
            Some(list) => list
                .split(',')
                .map(|b| {
                    Background::parse(b.trim()).unwrap_or_else(|| {
                        eprintln!(
                            "bad value {b:?} in --background (none, upload:BYTES, compaction)"
                        );
                        std::process::exit(2)
                    })
                })
                .collect(),
        },
    };
    // The `background=` key is printed when the runs are about the disk.
    let show_bg = o.get("background").is_some() || extras.state_parent.is_some();
    let bg_delay = Duration::from_secs_f64(o.parse("bg-delay", duration / 10.0).max(0.0));
    assert!(
        (1..1 << SLOT_BITS).contains(&window),
        "window must be 1..65535"
    );
    assert!(pairs >= 1, "pairs must be at least 1");
    assert!(runs >= 1, "runs must be at least 1");
    assert!(
        open_loop >= 0.0 && open_loop.is_finite(),
        "open-loop must be a rate >= 0 (0: closed loop)"
    );
    if mode != Mode::Fedmcp && o.get("addr").is_some() {
        eprintln!("--addr drives a running proxy: it is for --mode fedmcp only");
        std::process::exit(2);
    }
    let fedmcp_only =
        extras.idle_sessions > 0 || extras.queued > 0 || extras.recipient_queued > 0 || show_bg;
    if mode != Mode::Fedmcp && fedmcp_only {
        eprintln!(
            "--idle-sessions, --queued, --recipient-queued, --state-dir and --background are for --mode fedmcp only"
        );
        std::process::exit(2);
    }
    if o.get("addr").is_some() && show_bg {
        eprintln!("--state-dir and --background need a proxy this program starts (not --addr)");
        std::process::exit(2);
    }
    if extras.state_parent.is_none() && extras.phases.iter().any(|b| *b != Background::None) {
        eprintln!("--background upload:BYTES and compaction need --state-dir");
        std::process::exit(2);
    }
    // Every session is a socket here (and one in the proxy, which inherits the limit).
    let fds = (extras.idle_sessions + 2 * pairs + 64) as u64;
    if let Some(limit) = open_files_limit()
        && limit < fds
    {
        eprintln!(
            "loadgen: about {fds} file descriptors are needed, the limit is {limit}: raise it with `ulimit -n` (hard limit: `ulimit -Hn`)"
        );
        std::process::exit(2);
    }
    let setup = Setup {
        pairs,
        window,
        msg_bytes,
        open_loop: (open_loop > 0.0).then_some(open_loop),
    };

    let (mut peer, pairs_clients, extra) = match mode {
        Mode::Fedmcp => setup_fedmcp(&o, &setup, &extras),
        Mode::Nats => {
            let (p, c) = setup_nats(&o, &setup);
            (p, c, FedExtra::default())
        }
        Mode::Relay => {
            let (p, c) = setup_relay(&setup);
            (p, c, FedExtra::default())
        }
    };

    // Spread connections over the loops: a_0, b_0, a_1, b_1, ... round-robin.
    let mut per_thread: Vec<Vec<Client>> = (0..threads).map(|_| Vec::new()).collect();
    let mut k = 0;
    for (a, b) in pairs_clients {
        per_thread[k % threads].push(a);
        k += 1;
        per_thread[k % threads].push(b);
        k += 1;
    }
    per_thread.retain(|v| !v.is_empty());
    let used_threads = per_thread.len();

    let tck = clk_tck();
    let pid = peer.pid();
    let proxy_addr = match &peer {
        Peer::Proxy(p) => Some(p.addr),
        Peer::Spawned(_) => None,
    };
    let nats_version = match &peer {
        Peer::Spawned(s) if mode == Mode::Nats => format!(" nats_version={}", s.version),
        _ => String::new(),
    };
    // The extra settings, on every fedmcp line.
    let settings = if mode == Mode::Fedmcp {
        format!(
            " idle_sessions={} queued={} recipient_queued={} state={}",
            extras.idle_sessions,
            extras.queued,
            extras.recipient_queued,
            extra.state.as_ref().map_or("memory", |d| d.fs.as_str()),
        )
    } else {
        String::new()
    };
    let labelled = |bg: Background| {
        let mut l = String::new();
        if !label.is_empty() {
            l.push_str(&format!(" label={label}"));
        }
        if show_bg {
            l.push_str(&format!(" background={}", bg.name()));
        }
        l
    };
    let mut figures: Vec<Vec<RunFigures>> = extras.phases.iter().map(|_| Vec::new()).collect();
    let mut fail = false;
    'runs: for run in 1..=runs {
        for (phase, &bg) in extras.phases.iter().enumerate() {
            let mut bg_errors = Vec::new();
            let mut bg_keys = String::new();
            // Before the run: the state log grown to just under the compaction threshold.
            if bg == Background::Compaction
                && let Some(ctx) = &extra.bg
            {
                match ctx.prefill() {
                    Ok(keys) => bg_keys.push_str(&keys),
                    Err(e) => bg_errors.push(e),
                }
            }
            let compactions_before = extra.bg.as_ref().map_or(0, |c| c.compactions());

            let load_before = loadavg1();
            let start = Instant::now();
            let plan = Arc::new(Plan {
                start,
                measure_at: start + Duration::from_secs_f64(warmup),
                end_at: start + Duration::from_secs_f64(warmup + duration),
                open_loop: setup.open_loop,
                wake_early,
            });
            let stop = Arc::new(AtomicBool::new(false));
            let handles: Vec<_> = std::mem::take(&mut per_thread)
                .into_iter()
                .map(|clients| {
                    let plan = plan.clone();
                    let stop = stop.clone();
                    std::thread::spawn(move || run_loop(clients, plan, stop))
                })
                .collect();
            let bg_job = extra
                .bg
                .as_ref()
                .and_then(|c| start_background(bg, c.clone(), plan.measure_at, bg_delay));

            // Sample CPU at the edges of the measured window, RSS through it.
            std::thread::sleep(plan.measure_at.saturating_duration_since(Instant::now()));
            let t0 = Instant::now();
            let p0 = if pid > 0 { cpu_ticks_split(pid) } else { None };
            let s0 = cpu_ticks(0);
            let m0 = proxy_addr.and_then(|a| metric(a, DELIVERED));
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
            let m1 = proxy_addr.and_then(|a| metric(a, DELIVERED));
            let hwm = if pid > 0 {
                status_kib(pid, "VmHWM").unwrap_or(0)
            } else {
                0
            };
            stop.store(true, Ordering::Relaxed);

            let mut total = Stats::new();
            for h in handles {
                match h.join() {
                    Ok((clients, st)) => {
                        per_thread.push(clients);
                        total.merge(st);
                    }
                    Err(_) => total.error("a client thread panicked"),
                }
            }
            let alive = peer.is_running();
            if !alive {
                total.error(format!("the {} process exited during the run", mode.name()));
            }

            // The background work: done, and within the window?
            if let Some(job) = bg_job {
                match job.join() {
                    Ok((r, done)) => {
                        match r {
                            Ok(keys) => bg_keys.push_str(&keys),
                            Err(e) => bg_errors.push(e),
                        }
                        let done_at = done.saturating_duration_since(plan.measure_at);
                        bg_keys.push_str(&format!(" bg_done_at_s={:.3}", done_at.as_secs_f64()));
                        if done > plan.end_at {
                            bg_errors.push(format!(
                                "the background work ended {:.1} s after the measured window: raise --duration",
                                (done - plan.end_at).as_secs_f64()
                            ));
                        }
                    }
                    Err(_) => bg_errors.push("the background thread panicked".into()),
                }
            }
            if let Some(ctx) = &extra.bg {
                let n = ctx.compactions() - compactions_before;
                bg_keys.push_str(&format!(
                    " compactions={n} state_log_bytes={}",
                    ctx.log_len()
                ));
                if bg == Background::Compaction && n == 0 {
                    bg_errors.push("the proxy logged no compaction during the run".into());
                }
                if let Background::Upload(_) = bg
                    && let Err(e) = ctx.delete_upload()
                {
                    bg_errors.push(e);
                }
            }
            for e in bg_errors {
                total.error(format!("background {}: {e}", bg.name()));
            }
            if show_bg {
                let at = total
                    .max_at
                    .map_or(-1.0, |t| t.saturating_duration_since(t0).as_secs_f64());
                bg_keys.push_str(&format!(" max_at_s={at:.3}"));
            }

            // What the extras look like after the run: still all online, still queued.
            let mut seen = String::new();
            if let Some(k) = &extra.keeper {
                let online = proxy_addr
                    .and_then(|a| metric(a, "fedmcp_servers_online"))
                    .unwrap_or(-1.0);
                let lost = k.shared.lost.load(Ordering::Relaxed);
                seen.push_str(&format!(
                    " servers_online={online:.0} idle_pongs={} idle_lost={lost}",
                    k.shared.pongs.load(Ordering::Relaxed),
                ));
                if lost > 0 || online < (extras.idle_sessions + 2 * pairs) as f64 {
                    total.error(format!(
                        "idle sessions lost: {lost} closed, {online:.0} servers online"
                    ));
                }
            }
            if extras.queued > 0 || extras.recipient_queued > 0 {
                let queued = proxy_addr
                    .and_then(|a| metric(a, "fedmcp_queue_messages"))
                    .unwrap_or(-1.0);
                seen.push_str(&format!(" queue_messages={queued:.0}"));
                if queued != extras.queued as f64 {
                    total.error(format!(
                        "{queued:.0} messages queued, expected {}",
                        extras.queued
                    ));
                }
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
            let open = match setup.open_loop {
                None => String::new(),
                Some(r) => format!(
                    " open_loop_rate={r:.0} achieved_rate={rate:.0} backlogged={} unsent_at_end={} send_lag_p50_us={:.1} send_lag_p99_us={:.1} send_lag_max_us={:.1}",
                    total.backlogged,
                    total.unsent,
                    us(total.lag.quantile(0.50)),
                    us(total.lag.quantile(0.99)),
                    us(total.lag.max),
                ),
            };
            println!(
                "loadgen{} mode={}{}{nats_version} pairs={pairs} window={window} msg_bytes={msg_bytes} threads={used_threads} duration_s={elapsed:.2} forwards={} forwards_per_sec={rate:.0} proxy_cpu_pct={:.1} proxy_sys_pct={:.1} loadgen_cpu_pct={:.1} proxy_rss_kib={rss_max} proxy_hwm_kib={hwm} p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} proxy_delivered_per_sec={:.0}{open}{settings}{seen}{bg_keys} verified={} errors={errors} load1_before={:.2}",
                labelled(bg),
                mode.name(),
                if runs > 1 {
                    format!(" run={run}")
                } else {
                    String::new()
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
            figures[phase].push(RunFigures {
                rate,
                p50_us: us(total.hist.quantile(0.50)),
                p99_us: us(total.hist.quantile(0.99)),
                p999_us: us(total.hist.quantile(0.999)),
                max_us: us(total.hist.max),
            });
            if errors > 0 {
                for (k, v) in &total.errors {
                    eprintln!("loadgen: error x{v}: {k}");
                }
                let tail = peer.log_tail(20);
                if !tail.is_empty() {
                    eprintln!("loadgen: {} output (tail):\n{tail}", mode.name());
                }
                fail = true;
            }
            if !alive {
                break 'runs;
            }
        }
    }

    for (phase, &bg) in extras.phases.iter().enumerate() {
        let f = &figures[phase];
        let (r_min, r_med, r_max) = min_median_max(f.iter().map(|f| f.rate).collect());
        if runs > 1 {
            let mmm = |key: &str, v: Vec<f64>| {
                let (a, b, c) = min_median_max(v);
                format!(" {key}_min={a:.1} {key}_median={b:.1} {key}_max={c:.1}")
            };
            println!(
                "loadgen-runs{} mode={} runs={} forwards_per_sec_min={r_min:.0} forwards_per_sec_median={r_med:.0} forwards_per_sec_max={r_max:.0}{}{}{}{}",
                labelled(bg),
                mode.name(),
                f.len(),
                mmm("p99_us", f.iter().map(|f| f.p99_us).collect()),
                mmm("p999_us", f.iter().map(|f| f.p999_us).collect()),
                mmm("p50_us", f.iter().map(|f| f.p50_us).collect()),
                mmm("max_us", f.iter().map(|f| f.max_us).collect()),
            );
        }
        if r_med < min_rate {
            eprintln!(
                "loadgen: {r_med:.0} forwards/s{} is below the bar of {min_rate:.0}",
                if show_bg {
                    format!(" (background {})", bg.name())
                } else {
                    String::new()
                }
            );
            fail = true;
        }
    }
    // The idle sessions close first, then the proxy stops, then its state dir goes.
    let FedExtra { keeper, bg, state } = extra;
    drop(keeper);
    drop(bg);
    drop(peer);
    drop(state);
    if fail {
        std::process::exit(1);
    }
}
