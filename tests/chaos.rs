//! Crash chaos (docs/PROTOCOL.md §7): cycles of "start the proxy on one state dir, a sender pushes
//! `queue: true` messages continuously, `kill -9` at a random moment". After the last cycle
//! the proxy is started once more and the recipient drains everything. Every message that was
//! answered `queued` must come out (none lost), and the messages of the one sender must come
//! out in the order they were sent. Messages sent but not answered before a kill are in doubt
//! and may or may not come out.
//!
//! `CHAOS_CYCLES` sets the number of cycles (default 5, the `cargo test` form; `make chaos`
//! runs 50 on a release build). The kill moments come from an xorshift PRNG seeded from the
//! cycle number, so a run is repeatable as far as timing allows. Every wait is bounded.
mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tungstenite::Message;

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
}

/// The state dir of the run; removed at the end.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_on(dir: &StateDir) -> Proxy {
    Proxy::start(&[
        ("FEDMCP_STATE_DIR", dir.0.to_str().unwrap()),
        ("FEDMCP_RATE_LIMIT", "1000000/s,burst=1000000"),
        ("FEDMCP_QUEUE_MAX_MESSAGES", "10000000"),
    ])
}

fn tail(s: &str) -> &str {
    let n = s.len().saturating_sub(4000);
    let n = (n..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(n);
    &s[n..]
}

/// Prints the proxy's torn-tail warnings (a kill during a write may leave one: the records
/// from the tear on were never acknowledged); returns 1 when there were any.
fn torn_warnings(p: &Proxy) -> usize {
    let log = p.stderr_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("dropping the rest") || l.contains("torn tail"))
        .collect();
    for l in &lines {
        println!("chaos: start after a torn write: {l}");
    }
    usize::from(!lines.is_empty())
}

/// What one cycle's sender saw.
#[derive(Default)]
struct Pushed {
    /// `(msgId, k)` answered `queued`, in send order.
    acked: Vec<(String, u64)>,
    /// Sends written to the socket (acknowledged or not).
    sent: u64,
    /// `queue_full` answers (a bounded queue saying no is not a broken promise).
    full: u64,
    /// Answers other than `queued` and `queue_full` (each one a test failure).
    unexpected: Vec<String>,
}

/// Pushes `queue: true` sends to bob with up to `WINDOW` unanswered, numbering the messages
/// `k = first_k, first_k + 1, ...`, until the connection breaks (the proxy was killed).
fn push_until_killed(mut ws: Ws, first_k: u64, seed: u64) -> Pushed {
    const WINDOW: u64 = 16;
    let mut rng = XorShift::new(seed);
    let mut out = Pushed::default();
    let mut pending: HashSet<u64> = HashSet::new(); // request ids (= k) unanswered
    let mut k = first_k;
    let t0 = Instant::now();
    // The socket reads time out after WAIT; the loop ends at the first error (EOF or reset
    // once the proxy is gone), and in any case after 60 s.
    while t0.elapsed() < Duration::from_secs(60) {
        let mut wrote = false;
        while (pending.len() as u64) < WINDOW {
            let pad = "p".repeat(rng.range(0, 64) as usize);
            let req = json!({"jsonrpc": "2.0", "id": k, "method": "federation/send",
                             "params": {"to": "bob", "queue": true,
                                        "message": {"k": k, "pad": pad}}});
            if ws.ws.write(Message::text(req.to_string())).is_err() {
                return out;
            }
            pending.insert(k);
            k += 1;
            out.sent += 1;
            wrote = true;
        }
        if wrote && ws.ws.flush().is_err() {
            return out;
        }
        let m: Value = match ws.ws.read() {
            Ok(Message::Text(t)) => match serde_json::from_str(t.as_str()) {
                Ok(v) => v,
                Err(e) => {
                    out.unexpected.push(format!("not JSON ({e}): {t}"));
                    return out;
                }
            },
            Ok(Message::Close(_)) => return out,
            Ok(_) => continue,
            Err(_) => return out,
        };
        if m.get("method").is_some() {
            continue;
        }
        let Some(k_sent) = m["id"].as_u64().filter(|id| pending.remove(id)) else {
            out.unexpected.push(format!("answer to nothing: {m}"));
            continue;
        };
        match (
            m["result"]["status"].as_str(),
            m["result"]["msgId"].as_str(),
        ) {
            (Some("queued"), Some(id)) => out.acked.push((id.to_string(), k_sent)),
            _ if m["error"]["data"]["reason"] == "queue_full" => out.full += 1,
            _ => out.unexpected.push(m.to_string()),
        }
    }
    out
}

#[test]
fn acknowledged_queued_messages_survive_repeated_kill_9() {
    let cycles: u64 = std::env::var("CHAOS_CYCLES")
        .ok()
        .map(|v| v.parse().expect("CHAOS_CYCLES is a number"))
        .unwrap_or(5);
    assert!(cycles >= 1, "CHAOS_CYCLES must be at least 1");
    let dir = StateDir(scratch_dir("chaos-state"));
    let mut tokens: Option<(String, String)> = None;
    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut next_k = 0u64;
    let mut sent = 0u64;
    let mut torn_starts = 0;
    let mut compactions = 0;
    let mut full = 0;

    for cycle in 0..cycles {
        let mut p = start_on(&dir);
        torn_starts += torn_warnings(&p);
        let (ta, _) = tokens
            .get_or_insert_with(|| (p.register("alice"), p.register("bob")))
            .clone();
        let (ws, _) = p.online(&ta, json!({}));
        let first_k = next_k;
        let sender = std::thread::spawn(move || push_until_killed(ws, first_k, 1_000 + cycle));
        let mut rng = XorShift::new(cycle);
        std::thread::sleep(Duration::from_millis(rng.range(50, 300)));
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!(
                "cycle {cycle}: the proxy exited by itself ({st}); stderr:\n{}",
                tail(&p.stderr_text())
            );
        }
        p.child.kill().expect("SIGKILL");
        let _ = p.child.wait();
        compactions += p.stderr_text().matches("state log compacted").count();
        let pushed = sender.join().expect("sender thread");
        assert!(
            pushed.unexpected.is_empty(),
            "cycle {cycle}: answers other than queued: {:?}",
            &pushed.unexpected[..pushed.unexpected.len().min(5)]
        );
        full += pushed.full;
        next_k += pushed.sent;
        sent += pushed.sent;
        acked.extend(pushed.acked);
    }

    // Restart once more and drain.
    let p = start_on(&dir);
    torn_starts += torn_warnings(&p);
    let (_, tb) = tokens.expect("registered in the first cycle");
    let r = p.http("GET", "/v1/servers/bob", Some(&p.admin_token()), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let queued = r.json()["queued"]
        .as_u64()
        .unwrap_or_else(|| panic!("queued: {}", r.text()));
    let mut b = p.ws_raw(&tb).expect("upgrade");
    let w = b.recv();
    assert_eq!(w["method"], "federation/welcome", "{w}");
    b.send(&json!({"jsonrpc": "2.0", "id": w["id"], "result": {}}));
    let mut delivered: Vec<(String, u64)> = Vec::with_capacity(queued as usize);
    let t0 = Instant::now();
    while (delivered.len() as u64) < queued {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "drain: {} of {queued} in 120 s",
            delivered.len()
        );
        let d = b.recv();
        assert_eq!(d["method"], "federation/deliver", "{d}");
        b.answer(&d, json!({}));
        let id = d["params"]["msgId"].as_str().expect("msgId").to_string();
        let k = d["params"]["message"]["k"]
            .as_u64()
            .unwrap_or_else(|| panic!("no k: {d}"));
        delivered.push((id, k));
    }
    // Nothing after the count the registry gave.
    b.send(&json!({"jsonrpc": "2.0", "id": "end", "method": "federation/servers"}));
    let m = b.recv();
    assert_eq!(m["id"], "end", "a delivery past the queue length: {m}");

    let mut seen: HashSet<&str> = HashSet::new();
    let mut duplicates = 0;
    let mut first: Vec<&(String, u64)> = Vec::new();
    for d in &delivered {
        if seen.insert(d.0.as_str()) {
            first.push(d);
        } else {
            duplicates += 1;
        }
    }
    let lost: Vec<&(String, u64)> = acked
        .iter()
        .filter(|(id, _)| !seen.contains(id.as_str()))
        .collect();
    // Order: one sender, one recipient: increasing k (acknowledged or in doubt alike).
    let disorder: Vec<(u64, u64)> = first
        .windows(2)
        .filter(|w| w[0].1 >= w[1].1)
        .map(|w| (w[0].1, w[1].1))
        .collect();
    // Each msgId stands for one message: the same k under every id that was acknowledged.
    let by_id: HashMap<&str, u64> = delivered.iter().map(|(id, k)| (id.as_str(), *k)).collect();
    let mismatched: Vec<&(String, u64)> = acked
        .iter()
        .filter(|(id, k)| by_id.get(id.as_str()).is_some_and(|dk| dk != k))
        .collect();
    let in_doubt = first.len() - (acked.len() - lost.len());
    println!(
        "chaos: cycles={cycles} acknowledged={} lost={} duplicates={duplicates}",
        acked.len(),
        lost.len()
    );
    println!(
        "chaos: sent={sent} queue_full={full} delivered={} in-doubt-delivered={in_doubt} compactions={compactions} torn-tail-starts={torn_starts}",
        delivered.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        disorder.is_empty(),
        "out of order (k then k'): {:?}",
        &disorder[..disorder.len().min(10)]
    );
    assert!(
        mismatched.is_empty(),
        "msgIds delivered with another message: {:?}",
        &mismatched[..mismatched.len().min(10)]
    );
    assert!(
        !acked.is_empty(),
        "no send was acknowledged in {cycles} cycles"
    );
}
