//! Crash chaos for cluster mode (docs/PROTOCOL.md §4, §10): a three-node JetStream NATS cluster and
//! three proxies (`FEDMCP_NATS_REPLICAS=3`, each with its own state dir). A sender `src`
//! pushes numbered `federation/send` requests `{"to": "sink", "message": {"n": i}, "queue":
//! true}` through some live proxy while `sink` is offline; every answer `queued` is an
//! acknowledgement of `n`. Meanwhile, at random moments, one proxy is killed with `kill -9` and
//! started again (same environment, same state dir) after a short random pause, or one NATS
//! node is killed and started again (never two NATS nodes down at a time: a node is back and
//! healthy, its replicas current, before the next kill). Errors during the chaos (`-32002`
//! while a proxy is cut off, a connection closed by a kill, ...) are not acknowledgements and
//! nothing is resent: the sender just goes on with the next `n`, on another live proxy if its
//! connection died.
//!
//! After the cycles every proxy and every NATS node is up and ready, and `sink` connects to a
//! random proxy and drains, answering every `federation/deliver`, until nothing new came for
//! the delivery timeout plus 4 s (the queue consumer's ack wait is the delivery timeout plus
//! 2 s, so a message a crashed proxy held unanswered has come back by then). The test prints
//!
//! `chaos-cluster: cycles=C acknowledged=A delivered=D lost=L duplicated=U seed=S`
//!
//! (`delivered` counts distinct `n`, `duplicated` the deliveries of an `n` beyond the first)
//! and fails when an acknowledged `n` never came out (`lost`): §10 promises that `kill -9` of a
//! proxy, and with three NATS nodes and three replicas the loss of one node, loses no queued
//! message. Duplicates are allowed (a message delivered but not answered before a crash may be
//! delivered again with the same `msgId`) and only printed.
//!
//! Each cycle ends with every NATS node healthy and every proxy answering `readyz` 200 again
//! (§10: a proxy rejoins and catches up with the registry); one that is not within [`READY`]
//! fails the test too. On any failure the test prints the proxies' warnings, what their
//! `readyz` and `/metrics` and every NATS node's `/jsz` (streams and consumers) say at that
//! moment, and keeps every proxy's full stderr and every NATS log in a directory it names.
//!
//! `CHAOS_CLUSTER_CYCLES` sets the number of cycles (default 3; `make chaos-cluster` runs 30 on
//! a release build). `CHAOS_SEED` replays a run's choices (which process, which pauses, how
//! long to send before a kill); without it a seed is drawn and printed. Every wait is bounded,
//! and every process is killed when the test ends, also on a panic.
mod common;
#[path = "common/nats.rs"]
mod nats;

use common::*;
use nats::Nats;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, http::HeaderValue};

/// `FEDMCP_DELIVERY_TIMEOUT_MS` of every proxy: the queue consumer's ack wait is this plus 2 s,
/// so a message a killed proxy held unanswered comes back quickly.
const DELIVERY_TIMEOUT_MS: u64 = 2000;
/// The drain ends when no delivery came for this long (ack wait plus 2 s of slack).
const DRAIN_QUIET: Duration = Duration::from_millis(DELIVERY_TIMEOUT_MS + 4000);
/// How long the drain waits for its first delivery.
const FIRST_DELIVERY: Duration = Duration::from_secs(30);
/// Upper bound of the drain (raised for large runs by [`DRAIN_PER_MESSAGE`] per message).
const DRAIN_MAX: Duration = Duration::from_secs(120);
/// Drain allowance per acknowledged message on top of [`DRAIN_MAX`].
const DRAIN_PER_MESSAGE: Duration = Duration::from_millis(10);
/// How long a proxy may take to join NATS and catch up (`readyz` 200).
const READY: Duration = Duration::from_secs(30);
/// Sends the sender keeps unanswered at once.
const WINDOW: usize = 8;
/// The sender's pace (sends per second): traffic, not a flood.
const RATE_PER_SEC: f64 = 200.0;
/// A sender connection whose oldest send has had no answer for this long is given up.
const STALL: Duration = Duration::from_secs(15);
/// Time to send before the kill of each cycle, in ms.
const SEND_MS: (u64, u64) = (300, 1500);
/// Pause between a proxy's kill and its restart, in ms.
const PROXY_PAUSE_MS: (u64, u64) = (100, 1000);
/// Pause between a NATS node's kill and its restart, in ms.
const NATS_PAUSE_MS: (u64, u64) = (200, 2000);

/// Deterministic xorshift64* PRNG.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // Spread small seeds; never zero.
        XorShift(seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-enough in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() as u64 - 1) as usize]
    }
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// The last lines of a log.
fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A state dir for one proxy; removed when the test ends.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One proxy of the cluster: its environment and state dir (the same at every start), the
/// running process if any, and the stderr of its earlier, killed runs.
struct Member {
    name: String,
    env: Vec<(String, String)>,
    _state: StateDir,
    proxy: Option<Proxy>,
    past_stderr: String,
    starts: u32,
}

impl Member {
    fn start(&mut self) {
        assert!(self.proxy.is_none(), "{} is already running", self.name);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.proxy = Some(Proxy::start(&env));
        self.starts += 1;
    }

    /// `kill -9`, reap, and keep its stderr.
    fn kill(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
            self.past_stderr.push_str(&p.stderr_text());
            self.past_stderr
                .push_str(&format!("---- {} killed with kill -9 ----\n", self.name));
        }
    }

    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("the proxy is running")
    }

    /// The stderr of every run so far.
    fn stderr_all(&self) -> String {
        let mut s = self.past_stderr.clone();
        if let Some(p) = &self.proxy {
            s.push_str(&p.stderr_text());
        }
        s
    }

    /// Waits until `GET /readyz` is 200; panics with the stderr tail after `READY`.
    fn wait_ready(&mut self) -> Duration {
        let t0 = Instant::now();
        loop {
            let p = self.proxy.as_mut().expect("the proxy is running");
            // A proxy that exited by itself is a finding, not something to wait out.
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!(
                    "{} exited by itself ({st}); stderr:\n{}",
                    self.name,
                    tail(&p.stderr_text(), 40)
                );
            }
            let r = p.http("GET", "/readyz", None, None);
            if r.status == 200 {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < READY,
                "{}: readyz still {} {} after {READY:?}; stderr:\n{}",
                self.name,
                r.status,
                r.text(),
                tail(&p.stderr_text(), 40)
            );
            sleep_ms(50);
        }
    }
}

/// Opens a control session to `addr` with `token` and answers the welcome; every step bounded.
fn connect(addr: SocketAddr, token: &str) -> Result<Ws, String> {
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut req = format!("ws://{addr}/v1/control")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let (mut ws, _) = tungstenite::client::client(req, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => format!("upgrade: {e}"),
        tungstenite::HandshakeError::Interrupted(_) => "upgrade: timed out".to_string(),
    })?;
    let t0 = Instant::now();
    let welcome: Value = loop {
        if t0.elapsed() > Duration::from_secs(5) {
            return Err("no welcome within 5 s".into());
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                break serde_json::from_str(t.as_str()).map_err(|e| format!("welcome: {e}"))?;
            }
            Ok(Message::Close(c)) => return Err(format!("closed before the welcome: {c:?}")),
            Ok(_) => continue,
            Err(e) => return Err(format!("welcome: {e}")),
        }
    };
    if welcome["method"] != "federation/welcome" {
        return Err(format!("not a welcome: {welcome}"));
    }
    ws.send(Message::text(
        json!({"jsonrpc": "2.0", "id": welcome["id"], "result": {}}).to_string(),
    ))
    .map_err(|e| format!("welcome answer: {e}"))?;
    Ok(Ws { ws })
}

fn is_timeout(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(e) if matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ))
}

/// The sender's proxies: the address of each running proxy (None while it is down).
type Live = Arc<Mutex<Vec<Option<SocketAddr>>>>;

fn live_addrs(live: &Live) -> Vec<SocketAddr> {
    live.lock().unwrap().iter().flatten().copied().collect()
}

/// What the sender saw.
#[derive(Default)]
struct Sent {
    /// `(n, msgId)` answered `queued`.
    acked: Vec<(u64, String)>,
    /// Sends written (acknowledged or not).
    sent: u64,
    /// Sends that got no answer before their connection ended (in doubt).
    unanswered: u64,
    /// Answers other than `queued`, by reason.
    refused: BTreeMap<String, u64>,
    /// Why connections ended or could not be made, by reason.
    breaks: BTreeMap<String, u64>,
    connects: u64,
}

/// Sends numbered queued messages to `sink` until `stop`, through a random live proxy,
/// reconnecting to another when its connection dies. Nothing is ever resent.
fn sender(
    live: Live,
    token: String,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    seed: u64,
) -> Sent {
    let mut rng = XorShift::new(seed);
    let mut out = Sent::default();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let addrs = live_addrs(&live);
        if addrs.is_empty() {
            sleep_ms(20);
            continue;
        }
        let addr = rng.pick(&addrs);
        let mut ws = match connect(addr, &token) {
            Ok(ws) => ws,
            Err(e) => {
                *out.breaks.entry(format!("connect: {e}")).or_default() += 1;
                sleep_ms(100);
                continue;
            }
        };
        out.connects += 1;
        let why = pump(&mut ws, &mut n, &mut out, &stop, &acked);
        *out.breaks.entry(why).or_default() += 1;
    }
    out
}

/// One sender connection: paced sends with up to [`WINDOW`] unanswered; returns why it ended.
fn pump(ws: &mut Ws, n: &mut u64, out: &mut Sent, stop: &AtomicBool, acked: &AtomicU64) -> String {
    let _ = ws
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(20)));
    let mut pending: BTreeMap<u64, Instant> = BTreeMap::new();
    let step = Duration::from_secs_f64(1.0 / RATE_PER_SEC);
    let mut next_at = Instant::now();
    let mut stopping: Option<Instant> = None;
    let why = loop {
        if stopping.is_none() && stop.load(Ordering::SeqCst) {
            stopping = Some(Instant::now());
        }
        if let Some(t) = stopping {
            if pending.is_empty() {
                break "stopped".to_string();
            }
            if t.elapsed() > STALL {
                break "stopped with sends unanswered".to_string();
            }
        }
        let mut wrote = false;
        while stopping.is_none() && pending.len() < WINDOW && Instant::now() >= next_at {
            let req = json!({"jsonrpc": "2.0", "id": *n, "method": "federation/send",
                             "params": {"to": "sink", "message": {"n": *n}, "queue": true}});
            if let Err(e) = ws.ws.write(Message::text(req.to_string())) {
                out.unanswered += pending.len() as u64;
                return format!("write: {e}");
            }
            pending.insert(*n, Instant::now());
            *n += 1;
            out.sent += 1;
            wrote = true;
            next_at += step;
            // No burst to catch up after a stall.
            next_at = next_at.max(Instant::now() - Duration::from_millis(100));
        }
        if wrote && let Err(e) = ws.ws.flush() {
            out.unanswered += pending.len() as u64;
            return format!("flush: {e}");
        }
        if pending.values().next().is_some_and(|t| t.elapsed() > STALL) {
            break format!("no answer within {STALL:?}");
        }
        let m: Value = match ws.ws.read() {
            Ok(Message::Text(t)) => match serde_json::from_str(t.as_str()) {
                Ok(v) => v,
                Err(e) => break format!("not JSON ({e})"),
            },
            Ok(Message::Close(c)) => {
                break format!("closed {}", c.map(|f| u16::from(f.code)).unwrap_or(0));
            }
            Ok(_) => continue,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => break format!("read: {e}"),
        };
        if m.get("method").is_some() {
            // A notification (federation/delivered, tokenExpiring): not an answer.
            continue;
        }
        let Some(k) = m["id"].as_u64().filter(|id| pending.remove(id).is_some()) else {
            *out.refused
                .entry(format!("answer to nothing: {m}"))
                .or_default() += 1;
            continue;
        };
        match (
            m["result"]["status"].as_str(),
            m["result"]["msgId"].as_str(),
        ) {
            (Some("queued"), Some(id)) => {
                out.acked.push((k, id.to_string()));
                acked.fetch_add(1, Ordering::SeqCst);
            }
            _ => {
                let reason = m["error"]["data"]["reason"]
                    .as_str()
                    .map(|r| format!("{} {r}", m["error"]["code"]))
                    .unwrap_or_else(|| format!("unexpected: {m}"));
                *out.refused.entry(reason).or_default() += 1;
            }
        }
    };
    out.unanswered += pending.len() as u64;
    let _ = ws.ws.close(None);
    let _ = ws.ws.flush();
    why
}

/// What the sink received: `(n, msgId)` per delivery, in arrival order.
#[derive(Default)]
struct Drained {
    deliveries: Vec<(u64, String)>,
    connects: u64,
    breaks: BTreeMap<String, u64>,
    malformed: Vec<String>,
    /// The drain stopped at its bound, not because it went quiet.
    bounded_out: bool,
}

/// Connects `sink` to a random proxy and answers every delivery until nothing came for
/// [`DRAIN_QUIET`] (bounded by `max`); reconnects to a random proxy when its session ends.
fn drain(addrs: &[SocketAddr], token: &str, rng: &mut XorShift, max: Duration) -> Drained {
    let mut out = Drained::default();
    let t0 = Instant::now();
    // Quiet is counted from the last delivery, or from the start until a first one came
    // (bounded by FIRST_DELIVERY: the feed's consumer is made when sink connects).
    let mut last: Option<Instant> = None;
    let mut ws: Option<Ws> = None;
    loop {
        match last {
            Some(t) if t.elapsed() > DRAIN_QUIET => break,
            None if t0.elapsed() > FIRST_DELIVERY => break,
            _ => {}
        }
        if t0.elapsed() > max {
            out.bounded_out = true;
            break;
        }
        let Some(s) = ws.as_mut() else {
            let addr = rng.pick(addrs);
            match connect(addr, token) {
                Ok(mut s) => {
                    let _ =
                        s.ws.get_mut()
                            .set_read_timeout(Some(Duration::from_millis(200)));
                    out.connects += 1;
                    println!("chaos-cluster: sink connected to {addr}");
                    ws = Some(s);
                }
                Err(e) => {
                    *out.breaks.entry(format!("connect: {e}")).or_default() += 1;
                    sleep_ms(200);
                }
            }
            continue;
        };
        let m: Value = match s.ws.read() {
            Ok(Message::Text(t)) => match serde_json::from_str(t.as_str()) {
                Ok(v) => v,
                Err(e) => {
                    out.malformed.push(format!("not JSON ({e}): {t}"));
                    continue;
                }
            },
            Ok(Message::Close(c)) => {
                *out.breaks
                    .entry(format!(
                        "closed {}",
                        c.map(|f| u16::from(f.code)).unwrap_or(0)
                    ))
                    .or_default() += 1;
                ws = None;
                continue;
            }
            Ok(_) => continue,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => {
                *out.breaks.entry(format!("read: {e}")).or_default() += 1;
                ws = None;
                continue;
            }
        };
        if m["method"] != "federation/deliver" {
            if m.get("method").is_some() {
                continue;
            }
            out.malformed.push(format!("not a delivery: {m}"));
            continue;
        }
        last = Some(Instant::now());
        let p = &m["params"];
        match (p["message"]["n"].as_u64(), p["msgId"].as_str()) {
            (Some(n), Some(id)) => out.deliveries.push((n, id.to_string())),
            _ => out.malformed.push(m.to_string()),
        }
        if m.get("id").is_some() {
            let answer = json!({"jsonrpc": "2.0", "id": m["id"], "result": {"ok": true}});
            if let Err(e) = s.ws.send(Message::text(answer.to_string())) {
                *out.breaks.entry(format!("answer: {e}")).or_default() += 1;
                ws = None;
            }
        }
    }
    if let Some(mut s) = ws {
        let _ = s.ws.close(None);
        let _ = s.ws.flush();
    }
    out
}

/// Prints the proxies' warnings and errors and the NATS logs' tails (on a failure).
fn dump(members: &[Member], nats: &Nats) {
    for m in members {
        let log = m.stderr_all();
        let notable: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("WARN") || l.contains("ERROR") || l.contains("killed with kill -9")
            })
            .collect();
        println!(
            "chaos-cluster: ---- {} stderr: warnings, errors, kills ({} of {} lines) ----\n{}",
            m.name,
            notable.len(),
            log.lines().count(),
            tail(&notable.join("\n"), 60)
        );
        println!(
            "chaos-cluster: ---- {} stderr, last lines ----\n{}",
            m.name,
            tail(&log, 30)
        );
    }
    for n in &nats.nodes {
        println!(
            "chaos-cluster: ---- NATS {} log, last lines ----\n{}",
            n.name,
            n.log_tail()
        );
    }
    // The processes are still up: what the proxies and JetStream say now.
    for m in members {
        let Some(p) = &m.proxy else { continue };
        let (Some(ready), Some(metrics)) = (get(p.addr, "/readyz"), get(p.addr, "/metrics")) else {
            println!("chaos-cluster: {} now: does not answer", m.name);
            continue;
        };
        let cluster: Vec<&str> = metrics
            .1
            .lines()
            .filter(|l| !l.starts_with('#') && (l.contains("cluster") || l.contains("nats")))
            .collect();
        println!(
            "chaos-cluster: {} now: readyz {} {}; {}",
            m.name,
            ready.0,
            ready.1,
            cluster.join("; ")
        );
    }
    for n in &nats.nodes {
        println!(
            "chaos-cluster: NATS {} JetStream now: {}",
            n.name,
            jetstream_summary(n)
        );
    }
}

/// `GET path` on `addr` (HTTP/1.0: a large answer comes whole, not chunked): (status, body),
/// or None when nothing answers within 2 s. Never panics (it serves the failure report).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: t\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = Resp::parse(&raw)?;
    Some((r.status, r.text()))
}

/// A NATS node's `/jsz` with its streams and consumers (and their configs).
fn jsz(n: &nats::NatsNode) -> Option<Value> {
    let addr = SocketAddr::from(([127, 0, 0, 1], n.monitor_port));
    match get(
        addr,
        "/jsz?accounts=true&streams=true&consumers=true&config=true",
    )? {
        (200, body) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// The messages left in the cluster's queue stream, as its leader reports them.
fn queue_left(nats: &Nats, cluster: &str) -> String {
    let stream = format!("{cluster}_QUEUE");
    for n in &nats.nodes {
        let Some(v) = jsz(n) else { continue };
        for acc in v["account_details"].as_array().into_iter().flatten() {
            for st in acc["stream_detail"].as_array().into_iter().flatten() {
                if st["name"] == stream.as_str() && st["cluster"]["leader"] == n.name.as_str() {
                    return st["state"]["messages"].to_string();
                }
            }
        }
    }
    "unknown".into()
}

/// A node's streams and consumers as its `/jsz` reports them, one line.
fn jetstream_summary(n: &nats::NatsNode) -> String {
    let Some(v) = jsz(n) else {
        return "no readable /jsz answer".into();
    };
    let mut out = vec![format!("meta leader {}", v["meta_cluster"]["leader"])];
    for acc in v["account_details"].as_array().into_iter().flatten() {
        for st in acc["stream_detail"].as_array().into_iter().flatten() {
            out.push(format!(
                "stream {} msgs {} seq {}..{} leader {}",
                st["name"],
                st["state"]["messages"],
                st["state"]["first_seq"],
                st["state"]["last_seq"],
                st["cluster"]["leader"]
            ));
            for c in st["consumer_detail"].as_array().into_iter().flatten() {
                out.push(format!(
                    "  consumer {} deliver {} delivered c{}/s{} ack floor s{} pending {} ack pending {} redelivered {} push bound {} leader {}",
                    c["name"],
                    c["config"]["deliver_subject"],
                    c["delivered"]["consumer_seq"],
                    c["delivered"]["stream_seq"],
                    c["ack_floor"]["stream_seq"],
                    c["num_pending"],
                    c["num_ack_pending"],
                    c["num_redelivered"],
                    c["push_bound"],
                    c["cluster"]["leader"]
                ));
            }
        }
    }
    out.join(" | ")
}

fn ready_all(members: &mut [Member], nats: &Nats) {
    for i in 0..nats.nodes.len() {
        assert!(
            nats.nodes[i].is_running(),
            "NATS {} is down",
            nats.nodes[i].name
        );
        nats.wait_ready(i);
    }
    for m in members {
        m.wait_ready();
    }
}

#[test]
fn acknowledged_queued_messages_survive_kill_9_of_proxies_and_nats_nodes() {
    let t_start = Instant::now();
    let cycles: u64 = std::env::var("CHAOS_CLUSTER_CYCLES")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().expect("CHAOS_CLUSTER_CYCLES is a number"))
        .unwrap_or(3);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().expect("CHAOS_SEED is a number"))
        .unwrap_or_else(|| u64::from_le_bytes(fedmcp::random::random_bytes::<8>()));
    println!("chaos-cluster: seed={seed} cycles={cycles} (replay: CHAOS_SEED={seed})");
    let mut rng = XorShift::new(seed);

    let mut nats = Nats::cluster3();
    let cluster = format!(
        "chaos{}",
        fedmcp::random::hex(&fedmcp::random::random_bytes::<6>())
    );
    let secret = format!(
        "chaos-secret-{}",
        fedmcp::random::hex(&fedmcp::random::random_bytes::<16>())
    );
    let mut members: Vec<Member> = (0..3)
        .map(|i| {
            let name = format!("p{}", i + 1);
            let state = StateDir(scratch_dir(&format!("chaos-cluster-{name}")));
            let env = vec![
                ("FEDMCP_NATS_URL".to_string(), nats.urls_from(i)),
                ("FEDMCP_NATS_REPLICAS".to_string(), "3".to_string()),
                ("FEDMCP_CLUSTER".to_string(), cluster.clone()),
                ("FEDMCP_NODE_ID".to_string(), name.clone()),
                ("FEDMCP_JWT_SECRET".to_string(), secret.clone()),
                (
                    "FEDMCP_STATE_DIR".to_string(),
                    state.0.to_str().expect("UTF-8 path").to_string(),
                ),
                (
                    "FEDMCP_DELIVERY_TIMEOUT_MS".to_string(),
                    DELIVERY_TIMEOUT_MS.to_string(),
                ),
                // A long run queues more than the default 10 000 for sink.
                (
                    "FEDMCP_QUEUE_MAX_MESSAGES".to_string(),
                    "1000000".to_string(),
                ),
            ];
            Member {
                name,
                env,
                _state: state,
                proxy: None,
                past_stderr: String::new(),
                starts: 0,
            }
        })
        .collect();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(
            cycles,
            seed,
            &mut rng,
            &mut nats,
            &mut members,
            &cluster,
            t_start,
        )
    }));
    let failed = !matches!(outcome, Ok(true));
    if failed || std::env::var_os("CHAOS_DUMP").is_some() {
        dump(&members, &nats);
        let dir = save_logs(&members, &nats, seed);
        println!(
            "chaos-cluster: full proxy stderr and NATS logs kept in {}",
            dir.display()
        );
    }
    match outcome {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(ok) => assert!(ok, "chaos-cluster failed (seed {seed}); see above"),
    }
}

/// The test after its processes are set up; returns whether every check held (a panic is a
/// failure too). The caller prints the logs on a failure.
fn run(
    cycles: u64,
    seed: u64,
    rng: &mut XorShift,
    nats: &mut Nats,
    members: &mut [Member],
    cluster: &str,
    t_start: Instant,
) -> bool {
    for m in members.iter_mut() {
        m.start();
    }
    ready_all(members, nats);

    // Register src and sink on one proxy; wait until every proxy knows sink.
    let p0 = members[rng.range(0, 2) as usize].proxy();
    let src_token = p0.register("src");
    let sink_token = p0.register("sink");
    for m in members.iter() {
        let p = m.proxy();
        let t0 = Instant::now();
        loop {
            let r = p.http("GET", "/v1/servers/sink", Some(&p.admin_token()), None);
            if r.status == 200 {
                break;
            }
            assert!(
                t0.elapsed() < READY,
                "{} does not know sink after {READY:?}: {} {}",
                m.name,
                r.status,
                r.text()
            );
            sleep_ms(50);
        }
    }

    // The sender runs through the cycles.
    let live: Live = Arc::new(Mutex::new(
        members.iter().map(|m| Some(m.proxy().addr)).collect(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicU64::new(0));
    let sender_thread = {
        let (live, stop, acked_count) = (live.clone(), stop.clone(), acked_count.clone());
        let sender_seed = rng.next();
        std::thread::spawn(move || sender(live, src_token, stop, acked_count, sender_seed))
    };
    // A panic below must still stop the sender (it holds no process; the members and NATS
    // are killed by their drops).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _stop_guard = StopOnDrop(stop.clone());

    let (mut proxy_kills, mut nats_kills) = (0u64, 0u64);
    for cycle in 1..=cycles {
        let send_ms = rng.range(SEND_MS.0, SEND_MS.1);
        sleep_ms(send_ms);
        let before = acked_count.load(Ordering::SeqCst);
        if rng.next().is_multiple_of(2) {
            let i = rng.range(0, 2) as usize;
            let pause = rng.range(PROXY_PAUSE_MS.0, PROXY_PAUSE_MS.1);
            live.lock().unwrap()[i] = None;
            members[i].kill();
            sleep_ms(pause);
            members[i].start();
            let took = members[i].wait_ready();
            live.lock().unwrap()[i] = Some(members[i].proxy().addr);
            proxy_kills += 1;
            println!(
                "chaos-cluster: cycle {cycle}: sent {send_ms} ms, kill -9 proxy {} (acknowledged so far {before}), restarted after {pause} ms, ready {took:?} later",
                members[i].name
            );
        } else {
            let j = rng.range(0, 2) as usize;
            let pause = rng.range(NATS_PAUSE_MS.0, NATS_PAUSE_MS.1);
            nats.kill(j);
            sleep_ms(pause);
            let t0 = Instant::now();
            nats.restart(j);
            nats_kills += 1;
            println!(
                "chaos-cluster: cycle {cycle}: sent {send_ms} ms, kill -9 NATS {} (acknowledged so far {before}), restarted after {pause} ms, healthy {:?} later",
                nats.nodes[j].name,
                t0.elapsed()
            );
        }
        // Every NATS node healthy (the restarted one with its replicas current: its
        // /healthz checks that) and every proxy ready before the next kill.
        ready_all(members, nats);
    }

    stop.store(true, Ordering::SeqCst);
    let sent = sender_thread.join().expect("the sender thread");

    // Everything up and ready; sink drains through a random proxy.
    ready_all(members, nats);
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.proxy().addr).collect();
    let max = DRAIN_MAX + DRAIN_PER_MESSAGE * sent.acked.len() as u32;
    let t_drain = Instant::now();
    let drained = drain(&addrs, &sink_token, rng, max);
    let drain_took = t_drain.elapsed();
    let queue_left = queue_left(nats, cluster);

    // Lost: acknowledged and never delivered. Duplicated: deliveries of an n beyond the first.
    let mut times: HashMap<u64, u64> = HashMap::new();
    let mut ids: HashMap<u64, Vec<&str>> = HashMap::new();
    for (n, id) in &drained.deliveries {
        *times.entry(*n).or_default() += 1;
        let v = ids.entry(*n).or_default();
        if !v.contains(&id.as_str()) {
            v.push(id);
        }
    }
    let lost: Vec<u64> = sent
        .acked
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !times.contains_key(n))
        .collect();
    let duplicated: u64 = times.values().map(|c| c - 1).sum();
    let delivered = times.len() as u64;
    let acked_ids: HashMap<u64, &str> =
        sent.acked.iter().map(|(n, id)| (*n, id.as_str())).collect();
    // An acknowledged n delivered under another msgId than its acknowledgement's, or an n
    // delivered under several msgIds: one message stored twice.
    let id_mismatch: Vec<u64> = ids
        .iter()
        .filter(|(n, v)| v.len() > 1 || acked_ids.get(n).is_some_and(|a| v[0] != *a))
        .map(|(n, _)| *n)
        .collect();
    let in_doubt_delivered = times.keys().filter(|n| !acked_ids.contains_key(n)).count();
    // Order of first deliveries (one sender, one recipient): n increasing.
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<u64> = drained
        .deliveries
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| seen.insert(*n))
        .collect();
    let out_of_order = firsts.windows(2).filter(|w| w[0] > w[1]).count();

    println!(
        "chaos-cluster: cycles={cycles} acknowledged={} delivered={delivered} lost={} duplicated={duplicated} seed={seed}",
        sent.acked.len(),
        lost.len()
    );
    println!(
        "chaos-cluster: sent={} unanswered={} refused={:?} in-doubt-delivered={in_doubt_delivered} out-of-order={out_of_order} msgid-mismatch={} proxy-kills={proxy_kills} nats-kills={nats_kills}",
        sent.sent,
        sent.unanswered,
        sent.refused,
        id_mismatch.len()
    );
    println!(
        "chaos-cluster: sender connects={} breaks={:?}",
        sent.connects, sent.breaks
    );
    println!(
        "chaos-cluster: drain {drain_took:?} (quiet {DRAIN_QUIET:?}), sink connects={} breaks={:?} malformed={} bounded-out={} queue-stream-left={queue_left}; proxy starts={:?}; total {:?}",
        drained.connects,
        drained.breaks,
        drained.malformed.len(),
        drained.bounded_out,
        members.iter().map(|m| m.starts).collect::<Vec<_>>(),
        t_start.elapsed()
    );
    if !drained.malformed.is_empty() {
        println!(
            "chaos-cluster: FAILED: malformed messages to sink: {:?}",
            &drained.malformed[..drained.malformed.len().min(5)]
        );
    }
    if !lost.is_empty() {
        println!(
            "chaos-cluster: FAILED: {} acknowledged messages lost (seed {seed}), e.g. n = {:?}",
            lost.len(),
            &lost[..lost.len().min(20)]
        );
    }
    if drained.bounded_out {
        println!("chaos-cluster: FAILED: the drain was still receiving after {max:?}");
    }
    if sent.acked.is_empty() {
        println!(
            "chaos-cluster: FAILED: no send was acknowledged in {cycles} cycles: refused {:?}, breaks {:?}",
            sent.refused, sent.breaks
        );
    }
    lost.is_empty()
        && drained.malformed.is_empty()
        && !drained.bounded_out
        && !sent.acked.is_empty()
}

/// Copies every proxy's stderr (all its runs) and every NATS node's log into a directory that
/// outlives the test; returns it.
fn save_logs(members: &[Member], nats: &Nats, seed: u64) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("chaos-cluster-logs-{}-{seed}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    for m in members {
        let _ = std::fs::write(dir.join(format!("{}.stderr.log", m.name)), m.stderr_all());
    }
    for n in &nats.nodes {
        let name = format!("{}.log", n.name);
        let _ = std::fs::copy(nats.dir().join(&name), dir.join(format!("nats-{name}")));
    }
    dir
}
