//! Hostile-load memory bench: the proxy's resident memory under two kinds of abuse that must
//! stay within configured bounds (contract §3 "Authentication comes before the body", §4
//! "Bytes held for a recipient", §7 "Memory is bounded by configuration").
//!
//! Each mode starts its own release proxy (memory-only state, `FEDMCP_JWT_SECRET` set by
//! `common::ProxyProc`), measures `VmRSS` after `settle` seconds (`rss_before`), samples
//! `VmRSS` every `sample-ms` during the load (`peak`) and reads `VmHWM` at the end. The
//! figure held against the bound is `growth = max(peak, hwm) - rss_before`: `VmHWM` catches a
//! spike between two samples (it also includes the start-up peak, so the figure errs high).
//! One line per mode on stdout; exit 1 when a mode is over its bound or misbehaves.
//!
//! **unauth-bodies.** `sockets` connections each send the head
//! `POST /v1/servers HTTP/1.1 / Host: b / Content-Type: application/json /
//! Content-Length: <announce-bytes>` with no token, then as much of the announced body as the
//! socket takes (non-blocking writes, retried every `sample-ms` for `window-secs` seconds,
//! never more than announced). The proxy must answer `401` from the head and close without
//! buffering the body, so it holds at most a request head per socket. The line:
//! `unauth-bodies: sockets=.. announced=..KiB rss_before=.. KiB peak=.. KiB hwm=.. KiB
//! growth=.. KiB bound=.. KiB answered_401=.. other_status=.. no_answer=.. body_sent=.. KiB`.
//! Bound `--unauth-max-growth-kib` (default 16384 = 16 MiB): a head is at most 16 KiB (§3,
//! `431` above it) and a connection's own state a few KiB (benches/memory.rs: ~4 KiB per idle
//! session), so 400 sockets cost at most ~400 × 20 KiB ≈ 7.8 MiB; the default is twice that
//! for allocator slack, and 25× below the 400 MiB the announced bodies would take if buffered.
//! `--min-401` (default: every socket) fails the run when fewer sockets got their `401`.
//!
//! **self-flood.** One member (registered over HTTP, a control session upgraded with its
//! federation token, the welcome answered `{}`) sends itself `sends` requests
//! `federation/send {"to":<itself>,"message":"<message-bytes chars>","queue":true}` (message
//! default 1 MiB - 1 KiB, so each frame is just under `FEDMCP_MAX_MESSAGE_BYTES`), from a
//! writer thread, while a reader thread reads everything the proxy sends and never answers a
//! `federation/deliver`. The proxy runs with the default `FEDMCP_QUEUE_MAX_BYTES` (64 MiB) and
//! `FEDMCP_MAX_MESSAGE_BYTES` (1 MiB), `FEDMCP_DELIVERY_TIMEOUT_MS=600000` (held copies are
//! never released by a timeout during the run: the worst case) and `FEDMCP_HEARTBEAT_MS=600000`.
//! After the last send the run waits until every send is accounted for (an answer, or a
//! delivery to itself) or nothing arrives for `quiet-secs`. A send with no answer is
//! `accepted`: its delivery awaits the never-given answer and its copy is held (§4). The line:
//! `self-flood: sends=.. accepted=.. refused_overloaded=.. refused_queue_full=.. queued=..
//! other_answers=.. deliveries=.. rss_before=.. KiB rss_peak=.. KiB hwm=.. KiB growth=.. KiB
//! bound=.. KiB`.
//! Bound `--flood-max-growth-kib`, default 78976 KiB (77.1 MiB) =
//!   65536 KiB held copies (`FEDMCP_QUEUE_MAX_BYTES`, §4)
//! + 4224 KiB the session's output at its hard bound, 2 × (2 × max_message + 64 KiB)
//! + 4096 KiB for four message-sized transients (the incoming frame, its parsed params, the
//!   `federation/deliver` text being built, the copy being made for the hold)
//! + 5120 KiB allocator slack (freed message buffers the allocator keeps; measured growth
//!   was 69–70 MiB, so the three terms above alone left only ~3 MiB of room).
//!
//! Without the §4 bound the proxy held all 1,024 copies: ~1 GiB.
//!
//! Options (`--name=value`, `--name value`, or `HOSTILE_NAME`): mode (`all`, `unauth-bodies`,
//! `self-flood`; default all), settle (1 s), sample-ms (50); unauth-bodies: sockets (400),
//! announce-bytes (1048576), window-secs (2), unauth-max-growth-kib (16384), min-401
//! (= sockets); self-flood: sends (1024), message-bytes (1047552), quiet-secs (3),
//! flood-max-growth-kib (78976). A bound of 0 disables it.
//!
//! Smoke-sized run (well under 20 s once built):
//! `cargo bench --bench hostile -- --sockets 100 --window-secs 0.5 --sends 160 --settle 0.2`

mod common;

use common::*;
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const KIB: u64 = 1024;

fn rss(pid: u32) -> u64 {
    status_kib(pid, "VmRSS").expect("VmRSS of the proxy")
}

/// Samples the proxy's `VmRSS` every `every` until stopped; yields (peak KiB, samples).
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(u64, u64)>,
}

impl Sampler {
    fn start(pid: u32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut peak, mut n) = (0u64, 0u64);
            loop {
                if let Some(v) = status_kib(pid, "VmRSS") {
                    peak = peak.max(v);
                    n += 1;
                }
                if flag.load(Ordering::Relaxed) {
                    return (peak, n);
                }
                std::thread::sleep(every);
            }
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("sampler thread")
    }
}

fn over(what: &str, growth: u64, bound: u64) -> bool {
    if bound > 0 && growth > bound {
        eprintln!("{what}: RSS growth {growth} KiB is above the bound of {bound} KiB");
        return true;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// unauth-bodies
// ---------------------------------------------------------------------------------------------

struct Hostile {
    sock: TcpStream,
    sent: usize,
    writing: bool,
    resp: Vec<u8>,
    eof: bool,
}

impl Hostile {
    /// Writes more of the announced body until the socket would block, fails, or it is all out.
    fn push_body(&mut self, body: &[u8]) {
        while self.writing && self.sent < body.len() {
            match self.sock.write(&body[self.sent..]) {
                Ok(0) => self.writing = false,
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // EPIPE / ECONNRESET: the proxy closed (SIGPIPE is ignored by Rust programs).
                Err(_) => self.writing = false,
            }
        }
        if self.sent >= body.len() {
            self.writing = false;
        }
    }

    /// Reads what the proxy answered so far (the status line is all that matters).
    fn pull(&mut self) {
        let mut buf = [0u8; 4096];
        while !self.eof {
            match self.sock.read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    if self.resp.len() < 4096 {
                        self.resp.extend_from_slice(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.eof = true,
            }
        }
    }

    fn status(&self) -> Option<u16> {
        let line = self.resp.split(|&b| b == b'\r').next()?;
        std::str::from_utf8(line)
            .ok()?
            .split(' ')
            .nth(1)?
            .parse()
            .ok()
    }
}

fn unauth_bodies(o: &Opts, settle: Duration, every: Duration) -> bool {
    let sockets: usize = o.parse("sockets", 400);
    let announce: usize = o.parse("announce-bytes", 1 << 20);
    let window: f64 = o.parse("window-secs", 2.0);
    let bound: u64 = o.parse("unauth-max-growth-kib", 16384);
    let min_401: usize = o.parse("min-401", sockets);

    let mut env = Vec::new();
    if sockets + 64 > 4096 {
        env.push(("FEDMCP_MAX_CONNECTIONS", (sockets + 64).to_string()));
    }
    let mut proxy = ProxyProc::spawn(&env);
    let pid = proxy.pid;
    std::thread::sleep(settle);
    let rss_before = rss(pid);

    let head = format!(
        "POST /v1/servers HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: {announce}\r\n\r\n"
    );
    let body = vec![b'x'; announce];
    let sampler = Sampler::start(pid, every);
    let t = Instant::now();
    let mut socks: Vec<Hostile> = Vec::with_capacity(sockets);
    for i in 0..sockets {
        let mut sock = TcpStream::connect(proxy.addr).unwrap_or_else(|e| {
            panic!("socket {i}: {e} (file descriptors: run under `ulimit -n 4096`)")
        });
        let _ = sock.set_nodelay(true);
        sock.write_all(head.as_bytes())
            .unwrap_or_else(|e| panic!("socket {i}: head: {e}"));
        sock.set_nonblocking(true).expect("non-blocking");
        let mut h = Hostile {
            sock,
            sent: 0,
            writing: true,
            resp: Vec::new(),
            eof: false,
        };
        h.push_body(&body);
        socks.push(h);
    }
    let open_secs = t.elapsed().as_secs_f64();
    // The window: every socket stays open; each takes more body when it can, answers are read.
    let end = Instant::now() + Duration::from_secs_f64(window);
    loop {
        for h in socks.iter_mut() {
            h.push_body(&body);
            h.pull();
        }
        if Instant::now() >= end {
            break;
        }
        std::thread::sleep(every);
    }
    let (peak, samples) = sampler.finish();
    let hwm = status_kib(pid, "VmHWM").unwrap_or(0);
    let rss_after = rss(pid);
    for h in socks.iter_mut() {
        h.pull();
    }
    let answered_401 = socks.iter().filter(|h| h.status() == Some(401)).count();
    let other_status = socks
        .iter()
        .filter(|h| h.status().is_some_and(|s| s != 401))
        .count();
    let no_answer = sockets - answered_401 - other_status;
    let body_sent: usize = socks.iter().map(|h| h.sent).sum();
    let full_bodies = socks.iter().filter(|h| h.sent >= announce).count();
    let healthy = matches!(
        http(proxy.addr, "GET", "/healthz", None, None),
        Ok((200, _))
    );
    let running = proxy.is_running();
    drop(socks);

    let growth = peak.max(hwm).saturating_sub(rss_before);
    println!(
        "unauth-bodies: sockets={sockets} announced={}KiB rss_before={rss_before} KiB peak={peak} KiB hwm={hwm} KiB rss_after={rss_after} KiB growth={growth} KiB bound={bound} KiB answered_401={answered_401} other_status={other_status} no_answer={no_answer} body_sent={} KiB full_bodies={full_bodies} samples={samples} open_secs={open_secs:.2} window_secs={window}",
        announce as u64 / KIB,
        body_sent as u64 / KIB,
    );
    let mut fail = over("unauth-bodies", growth, bound);
    if answered_401 < min_401 {
        eprintln!(
            "unauth-bodies: {answered_401} sockets answered 401, expected at least {min_401}"
        );
        fail = true;
    }
    if !running || !healthy {
        eprintln!(
            "unauth-bodies: the proxy is not healthy after the run (running={running}); stderr: {}",
            proxy.stderr_tail(5)
        );
        fail = true;
    }
    fail
}

// ---------------------------------------------------------------------------------------------
// self-flood
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct FloodCounts {
    answers: AtomicU64,
    overloaded: AtomicU64,
    queue_full: AtomicU64,
    queued: AtomicU64,
    other: AtomicU64,
    deliveries: AtomicU64,
    delivery_bytes: AtomicU64,
    notifications: AtomicU64,
    closed: AtomicBool,
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Classifies one message from the proxy (ids of sends are numbers; the reader never answers).
fn classify(text: &str, c: &FloodCounts, other_seen: &mut Vec<String>) {
    let head = &text.as_bytes()[..text.len().min(256)];
    if find(head, b"\"method\":\"federation/deliver\"") {
        c.deliveries.fetch_add(1, Ordering::Relaxed);
        c.delivery_bytes
            .fetch_add(text.len() as u64, Ordering::Relaxed);
        return;
    }
    if find(head, b"\"method\":") {
        c.notifications.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => {
            c.other.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    c.answers.fetch_add(1, Ordering::Relaxed);
    let code = v["error"]["code"].as_i64();
    match code {
        Some(-32004) => c.overloaded.fetch_add(1, Ordering::Relaxed),
        Some(-32005) => c.queue_full.fetch_add(1, Ordering::Relaxed),
        None if v["result"]["status"] == "queued" => c.queued.fetch_add(1, Ordering::Relaxed),
        _ => {
            if other_seen.len() < 3 {
                other_seen.push(text.chars().take(300).collect());
            }
            c.other.fetch_add(1, Ordering::Relaxed)
        }
    };
}

fn self_flood(o: &Opts, settle: Duration, every: Duration) -> bool {
    let sends: usize = o.parse("sends", 1024);
    let msg_bytes: usize = o.parse("message-bytes", (1 << 20) - 1024);
    let quiet: f64 = o.parse("quiet-secs", 3.0);
    let bound: u64 = o.parse("flood-max-growth-kib", 78976);

    let env = [
        ("FEDMCP_HEARTBEAT_MS", "600000".to_string()),
        ("FEDMCP_DELIVERY_TIMEOUT_MS", "600000".to_string()),
    ];
    let mut proxy = ProxyProc::spawn(&env);
    let pid = proxy.pid;
    let admin = proxy.admin_token();
    let me = "flood-self";
    let token = proxy.register(&admin, me);
    let mut sess = Session::open(proxy.addr, &token, Rng::seeded().next_u32() as u64)
        .unwrap_or_else(|e| panic!("control session: {e}"));
    sess.sync().expect("welcome processed");
    std::thread::sleep(settle);
    let rss_before = rss(pid);

    let counts = Arc::new(FloodCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = sess.sock.try_clone().expect("clone the session socket");
    writer
        .set_write_timeout(Some(Duration::from_secs(60)))
        .expect("write timeout");
    sess.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let reader = {
        let (c, stop) = (counts.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut other_seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match sess.recv_text() {
                    Ok(m) => classify(&m, &c, &mut other_seen),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => {
                        eprintln!("self-flood: session ended: {e}");
                        c.closed.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
            other_seen
        })
    };

    let sampler = Sampler::start(pid, every);
    let t = Instant::now();
    let pad = vec![b'x'; msg_bytes];
    let suffix = "\",\"queue\":true}}";
    let mut rng = Rng::seeded();
    let mut frame = Vec::with_capacity(msg_bytes + 256);
    let mut written = 0usize;
    let mut write_err: Option<io::Error> = None;
    for i in 0..sends {
        let prefix = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"federation/send\",\"params\":{{\"to\":\"{me}\",\"message\":\""
        );
        frame.clear();
        encode_frame_parts(
            &mut frame,
            OP_TEXT,
            &[prefix.as_bytes(), &pad, suffix.as_bytes()],
            rng.next_u32(),
        );
        if let Err(e) = writer.write_all(&frame) {
            write_err = Some(e);
            break;
        }
        written += 1;
    }
    let send_secs = t.elapsed().as_secs_f64();
    // Until every send is accounted for (an answer or a delivery), or nothing moves for `quiet`.
    let mut last = (u64::MAX, u64::MAX);
    let mut last_change = Instant::now();
    loop {
        let now = (
            counts.answers.load(Ordering::Relaxed),
            counts.deliveries.load(Ordering::Relaxed),
        );
        // (A send answered `queued` may also be delivered later: then only quiet ends the wait.)
        let queued = counts.queued.load(Ordering::Relaxed);
        if (queued == 0 && now.0 + now.1 >= written as u64) || counts.closed.load(Ordering::Relaxed)
        {
            break;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed().as_secs_f64() >= quiet {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A last look at the held state before stopping the sampler.
    std::thread::sleep(every * 2);
    let (peak, samples) = sampler.finish();
    let hwm = status_kib(pid, "VmHWM").unwrap_or(0);
    let total_secs = t.elapsed().as_secs_f64();
    let healthy = matches!(
        http(proxy.addr, "GET", "/healthz", None, None),
        Ok((200, _))
    );
    let running = proxy.is_running();
    stop.store(true, Ordering::Relaxed);
    let other_seen = reader.join().expect("reader thread");
    drop(writer);

    let c = &counts;
    let answers = c.answers.load(Ordering::Relaxed);
    let overloaded = c.overloaded.load(Ordering::Relaxed);
    let queue_full = c.queue_full.load(Ordering::Relaxed);
    let queued = c.queued.load(Ordering::Relaxed);
    let other = c.other.load(Ordering::Relaxed);
    let deliveries = c.deliveries.load(Ordering::Relaxed);
    let delivery_kib = c.delivery_bytes.load(Ordering::Relaxed) / KIB;
    let closed = c.closed.load(Ordering::Relaxed);
    // Not refused: delivered and awaiting the never-given answer, or answered `queued`.
    let accepted = (written as u64).saturating_sub(answers - queued);
    let growth = peak.max(hwm).saturating_sub(rss_before);
    println!(
        "self-flood: sends={written} message={}KiB accepted={accepted} refused_overloaded={overloaded} refused_queue_full={queue_full} queued={queued} other_answers={other} deliveries={deliveries} delivery_bytes={delivery_kib} KiB rss_before={rss_before} KiB rss_peak={peak} KiB hwm={hwm} KiB growth={growth} KiB bound={bound} KiB samples={samples} send_secs={send_secs:.2} total_secs={total_secs:.2}",
        msg_bytes as u64 / KIB,
    );
    let mut fail = over("self-flood", growth, bound);
    if let Some(e) = write_err {
        eprintln!("self-flood: writing send {written} failed: {e}");
        fail = true;
    }
    if closed {
        eprintln!("self-flood: the proxy closed the session");
        fail = true;
    }
    if other > 0 {
        eprintln!("self-flood: {other} unexpected answers, e.g. {other_seen:?}");
        fail = true;
    }
    if !running || !healthy {
        eprintln!(
            "self-flood: the proxy is not healthy after the run (running={running}); stderr: {}",
            proxy.stderr_tail(5)
        );
        fail = true;
    }
    fail
}

fn main() {
    let o = Opts::new("HOSTILE");
    let mode = o.get("mode").unwrap_or_else(|| "all".into());
    let settle = Duration::from_secs_f64(o.parse("settle", 1.0));
    let every = Duration::from_millis(o.parse("sample-ms", 50));
    let (unauth, flood) = match mode.as_str() {
        "all" => (true, true),
        "unauth-bodies" => (true, false),
        "self-flood" => (false, true),
        m => {
            eprintln!("bad value {m:?} for --mode (all, unauth-bodies, self-flood)");
            std::process::exit(2)
        }
    };
    let mut fail = false;
    if unauth {
        fail |= unauth_bodies(&o, settle, every);
    }
    if flood {
        fail |= self_flood(&o, settle, every);
    }
    if fail {
        std::process::exit(1);
    }
}
