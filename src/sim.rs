//! Deterministic simulation of a federation: members, sends, answers, failures, time and
//! crashes, played from a seed against the federation core, checking the contract's promises
//! after every step (`tests/sim.rs`, `make sim`).
//!
//! Owns nothing the proxy uses in production. A run builds the real [`Federation`] core on a
//! virtual clock (it moves only when the script jumps it) with no socket at all: it plays the
//! reactor's part for a handful of members — a session is opened with the token a member
//! presents, its text frames go in with `on_text`, and the core's actions are carried out by
//! hand (a `Send` lands in the member's inbox of frames, a `Close` ends its session, an
//! answer to an HTTP request is checked). A member that does not read holds its frames, so
//! the session's unsent bytes grow as they would behind a socket. Each step is chosen by a
//! seeded generator: a direct, queued, notified or broadcast send, a batch, answers and
//! rejections, a member that stops reading, leaves, comes back or opens a second session,
//! time jumps (heartbeats, delivery timeouts, TTLs, token expiry), a server removed over HTTP,
//! and, with a state dir, a crash: the proxy is dropped and a new one restores from what was
//! persisted. The end of every run drains: every member reconnects, reads and answers until
//! nothing moves.
//!
//! Invariants checked after every step (a violation is a [`Failure`] naming the seed, the
//! step and what broke, replayable with `SIM_SEED=<seed>`):
//! - every message answered `queued` (without a TTL, to a recipient not removed) is delivered
//!   by the end;
//! - a message whose delivery the recipient answered is never delivered again (the same
//!   `msgId` comes again only after the recipient went away without answering, or a crash);
//! - messages from one sender to one recipient arrive in the order sent (first deliveries);
//! - an answer reaches the sender that asked, carrying the reply its recipient gave, and no
//!   request is answered twice or without having been asked;
//! - every bound holds: output owed per session, queue length and bytes held per recipient.
//!
//! The generator and every map here are deterministic, and the core's random ids (message
//! and session ids, `jti`s) come from the seed too (`Federation::seed_ids`): a replay is the
//! same run byte for byte.

use crate::audit::Audit;
use crate::clock::Now;
use crate::config::Config;
use crate::federation::action::{Action, Answer, RequestId, SessionId};
use crate::federation::{Federation, Want};
use crate::proto::jwt::{self, Claims, TokenType};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What broke, where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub seed: u64,
    pub step: usize,
    pub what: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} step {}: {}\n  replay: SIM_SEED={} cargo test --test sim replay -- --nocapture",
            self.seed, self.step, self.what, self.seed
        )
    }
}

/// What a run did (for the summary of many seeds).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub steps: usize,
    pub sends: usize,
    pub deliveries: usize,
    pub queued: usize,
    pub crashes: usize,
    pub removals: usize,
    /// Commits the disk refused.
    pub failed_commits: usize,
    /// Sends answered `storage_failed` (a refused commit they waited on).
    pub storage_failed: usize,
    /// FNV-1a of every byte the proxy wrote to the members, in order: two runs of a seed
    /// are the same run exactly when their digests are equal.
    pub digest: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.steps += o.steps;
        self.sends += o.sends;
        self.deliveries += o.deliveries;
        self.queued += o.queued;
        self.crashes += o.crashes;
        self.removals += o.removals;
        self.failed_commits += o.failed_commits;
        self.storage_failed += o.storage_failed;
        self.digest ^= o.digest;
    }
}

/// xorshift64*: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const MEMBERS: usize = 5;
const SECRET: &[u8] = b"simulation-secret-0123456789-abcdefgh";
/// The address every member seems to come from (audit lines only).
const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

/// What the core sent a member's session.
#[derive(Debug, Clone)]
enum Frame {
    Text(String),
    Close(u16),
}

/// One send the model knows of, by `(sender, n)`.
#[derive(Debug, Clone)]
struct Sent {
    to: String,
    ttl: bool,
    /// Answered `queued` (by the `queued` answer, or found out by a later delivery).
    queued: bool,
    /// The recipient's server was removed after the send.
    dropped: bool,
    msg_id: Option<String>,
}

/// A request a member sent and awaits the answer to.
#[derive(Debug, Clone)]
enum Asked {
    Send { n: u64 },
    Broadcast,
    Servers,
}

/// A delivery a member received and has not answered yet.
#[derive(Debug, Clone)]
struct Inbox {
    rid: Value,
    msg_id: String,
}

struct Member {
    id: String,
    session: Option<SessionId>,
    /// Frames the core sent and the member has not read yet.
    rx: Vec<Frame>,
    /// Frames the member wrote while its session's output was over its bound: held back,
    /// as the reactor holds back a socket's input, until the output drains.
    stash: Vec<String>,
    /// Whether the member drains its output each step (a slow consumer when false).
    reads: bool,
    next_rid: u64,
    asked: BTreeMap<String, Asked>,
    inbox: Vec<Inbox>,
    /// The next message number this member sends (unique per sender over the whole run).
    n: u64,
    /// Its signing key when its session opened.
    key: [u8; 32],
}

impl Member {
    fn new(id: String) -> Member {
        Member {
            id,
            session: None,
            rx: Vec::new(),
            stash: Vec::new(),
            reads: true,
            next_rid: 0,
            asked: BTreeMap::new(),
            inbox: Vec::new(),
            n: 0,
            key: [0; 32],
        }
    }

    /// Forgets the session: what it awaited will not come on another connection.
    fn gone(&mut self) {
        self.session = None;
        self.rx.clear();
        self.stash.clear();
        self.asked.clear();
        self.inbox.clear();
    }
}

/// A core and its state log, as a boot leaves them.
type Booted = (Federation, Option<crate::store::state::Store>);

/// One whole simulation.
pub struct Sim {
    seed: u64,
    rng: Rng,
    p: Federation,
    /// The state log the core's batches go to (the reactor's part; `None`: memory only).
    store: Option<crate::store::state::Store>,
    /// The next turn's commit fails (a full disk).
    disk_full: bool,
    /// A slow disk (half the seeds with a state dir): a commit begun by one `commit` call
    /// lands at the next, and members read, answer and send in between (the reactor's disk
    /// thread). `in_flight` is the commit being written.
    slow_disk: bool,
    in_flight: Option<Vec<u8>>,
    cfg: Config,
    dir: Option<PathBuf>,
    members: Vec<Member>,
    step: usize,
    stats: Stats,
    /// Model: every send by `(sender, n)`.
    sent: BTreeMap<(String, u64), Sent>,
    /// msgIds whose delivery the recipient answered.
    answered: BTreeSet<String>,
    /// msgIds delivered at least once.
    delivered: BTreeSet<String>,
    /// The highest `n` first-delivered per `(sender, recipient)`.
    last_n: BTreeMap<(String, String), u64>,
    /// Servers removed (their queues were dropped).
    removed: BTreeSet<String>,
    /// In the final drain: every member behaves (answers its welcome, reads, answers).
    draining: bool,
    trace: bool,
}

fn cfg_for_sim() -> Config {
    let mut cfg = Config::default_for_tests();
    cfg.max_connections = 64;
    cfg.max_servers = 16;
    cfg.max_message_bytes = 4096;
    cfg.queue_max_messages = 6;
    cfg.queue_max_bytes = 2048;
    cfg.delivery_timeout = Duration::from_millis(3000);
    cfg.heartbeat = Duration::from_millis(5000);
    cfg.handshake_timeout = Duration::from_millis(2000);
    cfg.rate_per_sec = 100_000;
    cfg.rate_burst = 100_000;
    cfg
}

impl Sim {
    /// A run for `seed`; `durable` puts the state in a fresh directory (crashes restore).
    pub fn new(seed: u64, durable: bool) -> Result<Sim, String> {
        let cfg = cfg_for_sim();
        let dir = durable.then(|| {
            let base = if std::path::Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            // One directory per run, also for two runs of one seed at once (the replay test).
            static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            base.join(format!("fedmcp-sim-{}-{seed}-{run}", std::process::id()))
        });
        if let Some(d) = &dir {
            let _ = std::fs::remove_dir_all(d);
        }
        let start = Now {
            at: std::time::Instant::now(),
            wall_ms: 1_767_225_600_000,
        };
        let (p, store) = Self::boot(&cfg, dir.as_ref(), start, seed)?;
        Ok(Sim {
            seed,
            rng: Rng::new(seed),
            p,
            store,
            disk_full: false,
            slow_disk: durable && (seed / 4) % 2 == 1,
            in_flight: None,
            cfg,
            dir,
            members: (0..MEMBERS).map(|i| Member::new(format!("m{i}"))).collect(),
            step: 0,
            stats: Stats::default(),
            sent: BTreeMap::new(),
            answered: BTreeSet::new(),
            delivered: BTreeSet::new(),
            last_n: BTreeMap::new(),
            removed: BTreeSet::new(),
            draining: false,
            trace: false,
        })
    }

    /// Prints every step (for a replay).
    pub fn traced(mut self) -> Sim {
        self.trace = true;
        self
    }

    /// A core on the state dir (if any); `ids` seeds its random ids (a new one per boot, as
    /// a real restart gets new ones).
    fn boot(cfg: &Config, dir: Option<&PathBuf>, now: Now, ids: u64) -> Result<Booted, String> {
        let audit = Audit::discard();
        let mut p = Federation::new(cfg.clone(), SECRET.to_vec(), audit, now);
        // Ids from the seed too: a replay is the same run byte for byte.
        p.seed_ids(ids);
        if let Some(d) = dir {
            let (store, replay) =
                crate::store::state::Store::open(d).map_err(|e| format!("store: {e}"))?;
            p.batch = Some(crate::store::state::Batch::default());
            p.restore(replay);
            return Ok((p, Some(store)));
        }
        Ok((p, None))
    }

    fn fail(&self, what: impl Into<String>) -> Failure {
        Failure {
            seed: self.seed,
            step: self.step,
            what: what.into(),
        }
    }

    /// Plays `steps` random steps, then drains; returns what happened.
    pub fn run(mut self, steps: usize) -> Result<Stats, Failure> {
        for _ in 0..steps {
            self.step += 1;
            self.random_step()?;
            self.end_turn()?;
        }
        self.drain()?;
        self.check_all_queued_delivered()?;
        self.stats.steps = self.step;
        Ok(self.stats)
    }

    fn random_step(&mut self) -> Result<(), Failure> {
        let m = self.rng.below(MEMBERS as u64) as usize;
        let roll = self.rng.below(100);
        if self.trace {
            eprintln!("step {}: roll {roll} member m{m}", self.step);
        }
        match roll {
            0..=27 => {
                let to = self.target();
                let queue = self.rng.chance(50);
                let ttl = self.rng.chance(10);
                self.send(m, &to, queue, ttl, true);
            }
            28..=32 => {
                let to = self.target();
                let queue = self.rng.chance(50);
                self.send(m, &to, queue, false, false);
            }
            33..=35 => self.broadcast(m),
            36..=38 => self.batch(m),
            39..=58 => self.answer_some(m),
            59..=64 => {
                let reads = !self.members[m].reads;
                self.members[m].reads = reads || self.rng.chance(50);
            }
            65..=69 => self.leave(m),
            70..=77 => self.connect(m, false)?,
            78 => self.connect(m, true)?,
            79..=88 => {
                let ms = match self.rng.below(10) {
                    0 => 12_000,
                    1..=2 => 3_500,
                    _ => 50 + self.rng.below(800),
                };
                self.advance(ms);
            }
            89 => self.remove(m)?,
            90 if self.dir.is_some() => self.crash()?,
            91 if self.dir.is_some() => {
                // The disk refuses this turn's commit: nothing waiting on it is acknowledged
                // (`storage_failed`, the copy taken back out), the rest is written next turn.
                self.disk_full = true;
            }
            _ => {
                // Keep-alive: a member asks for the server list (any frame counts as activity).
                self.request(m, "federation/servers", json!({}), Asked::Servers);
            }
        }
        Ok(())
    }

    /// A recipient: mostly a member, sometimes an id nobody uses.
    fn target(&mut self) -> String {
        if self.rng.chance(3) {
            "nobody".to_string()
        } else {
            format!("m{}", self.rng.below(MEMBERS as u64))
        }
    }

    fn connected(&self, m: usize) -> Option<SessionId> {
        let s = self.members[m].session?;
        self.p.session(s).map(|_| s)
    }

    /// Carries out what the core asked for, as the reactor would: frames land with the
    /// member whose session they are for (a session nobody holds any more: nobody reads
    /// them); answers to HTTP requests are returned.
    fn carry_out(&mut self) -> Vec<(RequestId, Answer)> {
        let mut answers = Vec::new();
        for a in self.p.take_actions() {
            let (session, frame) = match a {
                Action::Send { session, text } => (session, Frame::Text(text)),
                Action::Close { session, code, .. } => (session, Frame::Close(code)),
                // The connection just ends: like a close nobody reads.
                Action::Drop { session, .. } => (session, Frame::Close(1006)),
                Action::Ping { .. }
                | Action::Dial(_)
                | Action::StopDial { .. }
                | Action::RemoveResources { .. }
                | Action::McpSend { .. }
                | Action::Nats(_) => continue,
                Action::Respond { req, resp } => {
                    answers.push((req, resp));
                    continue;
                }
            };
            if let Some(mem) = self.members.iter_mut().find(|m| m.session == Some(session)) {
                mem.rx.push(frame);
            }
        }
        answers
    }

    fn write(&mut self, m: usize, text: &str) {
        if self.trace {
            let on = if self.connected(m).is_some() {
                ""
            } else {
                " (not connected)"
            };
            eprintln!("  m{m} -> {text}{on}");
        }
        let Some(s) = self.connected(m) else {
            return;
        };
        if !self.p.session_wants_input(s) || !self.members[m].stash.is_empty() {
            // The member's output is over its bound: its input waits (the reactor's
            // backpressure), and is handed in when the output drains.
            self.members[m].stash.push(text.to_string());
            return;
        }
        self.p.session_heard(s);
        self.p.on_text(s, text);
        self.carry_out();
    }

    fn request(&mut self, m: usize, method: &str, params: Value, asked: Asked) {
        if self.connected(m).is_none() {
            return;
        }
        let mem = &mut self.members[m];
        mem.next_rid += 1;
        let rid = format!("r{}", mem.next_rid);
        mem.asked.insert(rid.clone(), asked);
        let text = json!({"jsonrpc": "2.0", "id": rid, "method": method, "params": params});
        self.write(m, &text.to_string());
    }

    fn send_params(&mut self, m: usize, to: &str, queue: bool, ttl: bool) -> (u64, Value) {
        let from = self.members[m].id.clone();
        let n = self.members[m].n;
        self.members[m].n += 1;
        self.sent.insert(
            (from.clone(), n),
            Sent {
                to: to.to_string(),
                ttl,
                queued: false,
                dropped: false,
                msg_id: None,
            },
        );
        self.stats.sends += 1;
        let mut params = json!({"to": to, "message": {"s": from, "n": n}, "queue": queue});
        if ttl {
            params["ttlMs"] = json!(1500);
        }
        (n, params)
    }

    fn send(&mut self, m: usize, to: &str, queue: bool, ttl: bool, request: bool) {
        if self.connected(m).is_none() {
            return;
        }
        let (n, params) = self.send_params(m, to, queue, ttl);
        if request {
            self.request(m, "federation/send", params, Asked::Send { n });
        } else {
            let text = json!({"jsonrpc": "2.0", "method": "federation/send", "params": params});
            self.write(m, &text.to_string());
        }
    }

    fn broadcast(&mut self, m: usize) {
        if self.connected(m).is_none() {
            return;
        }
        let from = self.members[m].id.clone();
        let n = self.members[m].n;
        self.members[m].n += 1;
        let params = json!({"to": "*", "message": {"s": from, "n": n}});
        self.request(m, "federation/send", params, Asked::Broadcast);
    }

    fn batch(&mut self, m: usize) {
        if self.connected(m).is_none() {
            return;
        }
        let k = 2 + self.rng.below(3);
        let mut items = Vec::new();
        for _ in 0..k {
            let to = self.target();
            let queue = self.rng.chance(50);
            let (n, params) = self.send_params(m, &to, queue, false);
            let mem = &mut self.members[m];
            mem.next_rid += 1;
            let rid = format!("r{}", mem.next_rid);
            mem.asked.insert(rid.clone(), Asked::Send { n });
            items.push(
                json!({"jsonrpc": "2.0", "id": rid, "method": "federation/send", "params": params}),
            );
        }
        self.write(m, &Value::Array(items).to_string());
    }

    /// Answers some of the deliveries a member holds (results, sometimes errors).
    fn answer_some(&mut self, m: usize) {
        if self.connected(m).is_none() || self.members[m].inbox.is_empty() {
            return;
        }
        let k = 1 + self.rng.below(self.members[m].inbox.len() as u64) as usize;
        for _ in 0..k {
            if self.members[m].inbox.is_empty() {
                break;
            }
            let i = self.rng.below(self.members[m].inbox.len() as u64) as usize;
            let d = self.members[m].inbox.remove(i);
            let text = if self.rng.chance(20) {
                json!({"jsonrpc": "2.0", "id": d.rid, "error": {"code": 7, "message": d.msg_id}})
            } else {
                json!({"jsonrpc": "2.0", "id": d.rid, "result": {"ok": d.msg_id}})
            };
            self.answer(m, d.msg_id, &text);
        }
    }

    /// Writes a member's answer to a delivery; only an answer the proxy received counts.
    fn answer(&mut self, m: usize, msg_id: String, text: &Value) {
        if self.connected(m).is_some() {
            self.answered.insert(msg_id);
            self.write(m, &text.to_string());
        }
    }

    /// The member goes away: a close frame, or the connection just ends.
    fn leave(&mut self, m: usize) {
        let Some(s) = self.connected(m) else {
            return;
        };
        if self.rng.chance(50) {
            // A close frame: the reactor answers it and the session ends.
            self.p.close_session(s, 1000, "closed by peer");
        } else {
            self.p.session_lost(s, "connection lost");
        }
        self.members[m].gone();
        self.carry_out();
    }

    /// A new session for the member (a second one while connected: the older gets 4003).
    fn connect(&mut self, m: usize, second: bool) -> Result<(), Failure> {
        let old = self.connected(m);
        if old.is_some() && !second {
            return Ok(());
        }
        let id = self.members[m].id.clone();
        let token = if !self.draining && self.rng.chance(10) {
            // A short-lived token: the session ends 4002 when it expires.
            let now = self.p.now.secs();
            let removed_at = self.p.registry.removed_at(&id).unwrap_or(i64::MIN);
            let iat = now.max(removed_at.saturating_add(1));
            jwt::sign(
                SECRET,
                &Claims {
                    server_id: id.clone(),
                    token_type: TokenType::Federation,
                    iat,
                    exp: iat + 4,
                    nbf: None,
                    jti: Some(crate::random::hex(&self.p.entropy.bytes::<16>())),
                },
            )
        } else {
            self.p.mint(&id, TokenType::Federation).0
        };
        if old.is_some() {
            // What the old session was sent so far is read first.
            self.read_member(m)?;
        }
        self.members[m].gone();
        // The upgrade's checks, as `GET /v1/control` makes them: the token, then room in
        // the registry (refused: not a failure of the contract).
        let Ok(claims) = self.p.authenticate(Some(&token), Want::Federation, PEER) else {
            return Ok(());
        };
        if self.p.registry.find(&id).is_none()
            && self.p.registry.len() >= self.p.registry.capacity()
        {
            return Ok(());
        }
        let opening = crate::federation::control::Opening {
            claims: &claims,
            welcome_by: self.p.now.at + self.cfg.handshake_timeout,
            outbound: false,
            peer: Some(PEER),
        };
        let Ok(session) = self.p.open_session(opening) else {
            return Ok(());
        };
        if self.trace {
            eprintln!("  m{m} connects as {session:?} at {:?}", self.p.now.at);
        }
        self.members[m].session = Some(session);
        self.members[m].key = self.p.signing_key(&id);
        self.carry_out();
        Ok(())
    }

    /// An operator removes a server over HTTP (its queue is dropped, its session closed 4001).
    fn remove(&mut self, m: usize) -> Result<(), Failure> {
        let id = self.members[m].id.clone();
        if self.p.registry.find(&id).is_none() {
            return Ok(());
        }
        // What its session was sent so far is read first: signed with the key the removal
        // retires. Its last output (the 4001 close) is read afterwards.
        self.read_member(m)?;
        let req = RequestId(self.step as u64);
        let r = self.p.remove_server(&id, PEER);
        let mut status = self.p.durable_answer(req, r).map(|r| r.status);
        // Its answer waits for the commit that writes the removal (on a slow disk, the one
        // after the commit being written).
        for _ in 0..2 {
            if status.is_some() {
                break;
            }
            self.commit();
            status = self
                .carry_out()
                .into_iter()
                .find(|(r, _)| *r == req)
                .and_then(|(_, a)| match a {
                    Answer::Http(r) => Some(r.status),
                    Answer::Rpc(_) | Answer::Mcp(_) => None,
                });
        }
        if status != Some(204) {
            return Err(self.fail(format!("DELETE /v1/servers/{id}: {status:?}")));
        }
        self.removed.insert(id.clone());
        for s in self.sent.values_mut().filter(|s| s.to == id) {
            s.dropped = true;
        }
        self.stats.removals += 1;
        Ok(())
    }

    /// The proxy dies (after its last commit) and a new one restores the state dir.
    fn crash(&mut self) -> Result<(), Failure> {
        let now = self.p.now;
        for m in 0..MEMBERS {
            self.members[m].gone();
        }
        let cfg = self.cfg.clone();
        let dir = self.dir.clone();
        self.stats.crashes += 1;
        let ids = self.seed ^ ((self.stats.crashes as u64) << 40);
        // The old log is closed before the new core opens it, as after a real crash; a
        // commit being written is lost with it.
        self.store = None;
        self.in_flight = None;
        let (p, store) = Self::boot(&cfg, dir.as_ref(), now, ids).map_err(|e| self.fail(e))?;
        self.p = p;
        self.store = store;
        Ok(())
    }

    /// The turn's group commit, as the reactor makes it: the core's batch to the log, then
    /// the core releases what waited on it.
    fn commit(&mut self) {
        if self.slow_disk {
            // The commit begun at the last call lands now; the next one is begun.
            if let Some(bytes) = self.in_flight.take() {
                let r = self.write_log(&bytes);
                self.p.committed(r);
            }
            self.in_flight = self.p.begin_commit();
            return;
        }
        let Some(bytes) = self.p.begin_commit() else {
            return;
        };
        let r = self.write_log(&bytes);
        self.p.committed(r);
    }

    fn write_log(&mut self, bytes: &[u8]) -> Result<(), String> {
        match self.store.as_mut() {
            Some(s) => s.write(bytes).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Virtual time moves on; due timers fire.
    fn advance(&mut self, ms: u64) {
        if self.trace {
            eprintln!("  time +{ms} ms");
        }
        self.p.now = self.p.now.after(Duration::from_millis(ms));
        let at = self.p.now.at;
        self.p.fire_due(at);
        self.carry_out();
    }

    /// The end of a loop turn: the commit, then every reading member takes its output.
    fn end_turn(&mut self) -> Result<(), Failure> {
        // The disk refuses the next commit: the one being written, else this turn's.
        if self.disk_full && (self.in_flight.take().is_some() || self.p.begin_commit().is_some()) {
            self.disk_full = false;
            if self.trace {
                eprintln!("  the commit fails");
            }
            self.p.committed(Err("sim: the disk is full".into()));
            self.stats.failed_commits += 1;
        }
        self.commit();
        self.carry_out();
        for m in 0..MEMBERS {
            if self.members[m].reads {
                self.read_member(m)?;
            }
            if self.members[m].session.is_some() && self.connected(m).is_none() {
                // Ended by the proxy (heartbeat, a close it sent): its last frames are read.
                self.read_member(m)?;
                self.members[m].gone();
            }
        }
        self.commit();
        self.carry_out();
        self.check_bounds()
    }

    /// The member reads every frame the core sent it, then its output is empty again: held
    /// input goes in and queued messages move on.
    fn read_member(&mut self, m: usize) -> Result<(), Failure> {
        if self.members[m].session.is_none() {
            return Ok(());
        }
        let frames = std::mem::take(&mut self.members[m].rx);
        for f in frames {
            match f {
                Frame::Text(text) => {
                    for b in text.bytes() {
                        self.stats.digest =
                            (self.stats.digest ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
                    }
                    let v: Value = serde_json::from_str(&text)
                        .map_err(|e| self.fail(format!("not JSON: {e}: {text}")))?;
                    match v {
                        Value::Array(items) => {
                            for item in items {
                                self.on_message(m, item)?;
                            }
                        }
                        one => self.on_message(m, one)?,
                    }
                }
                Frame::Close(code) => {
                    self.stats.digest =
                        (self.stats.digest ^ u64::from(code)).wrapping_mul(0x100_0000_01b3);
                    if self.trace {
                        eprintln!("  m{m} <- close {code}");
                    }
                    // The proxy closed the session: what it awaited will not come here.
                    self.members[m].asked.clear();
                    self.members[m].inbox.clear();
                }
            }
        }
        // Room in the output again: held-back input and waiting queues move on.
        if let Some(s) = self.connected(m) {
            self.p.set_unsent(s, 0);
            for text in std::mem::take(&mut self.members[m].stash) {
                self.write(m, &text);
            }
            self.p.session_drained(s, 0);
            self.carry_out();
        }
        Ok(())
    }

    fn on_message(&mut self, m: usize, v: Value) -> Result<(), Failure> {
        let me = self.members[m].id.clone();
        if self.trace {
            eprintln!("  {me} <- {v}");
        }
        match v.get("method").and_then(Value::as_str) {
            Some("federation/welcome") => {
                let rid = v["id"].clone();
                // Now and then a member never answers its welcome (closed 1008 after the
                // handshake timeout); never in the drain, which must bring everyone online.
                if self.draining || self.rng.chance(95) {
                    let text = json!({"jsonrpc": "2.0", "id": rid, "result": {}});
                    self.write(m, &text.to_string());
                }
                Ok(())
            }
            Some("federation/deliver") => self.on_deliver(m, &me, &v),
            Some("federation/delivered") => {
                let p = &v["params"];
                let status = p["status"].as_str().unwrap_or("");
                let msg_id = p["msgId"].as_str().unwrap_or("").to_string();
                match status {
                    "delivered" if p["reply"]["ok"] != json!(msg_id) => Err(self.fail(format!(
                        "{me}: federation/delivered carries another recipient's reply: {v}"
                    ))),
                    "rejected" if p["error"]["message"] != json!(msg_id) => Err(self.fail(
                        format!("{me}: federation/delivered carries another rejection: {v}"),
                    )),
                    "delivered" | "rejected" | "expired" => Ok(()),
                    _ => Err(self.fail(format!("{me}: unknown federation/delivered: {v}"))),
                }
            }
            Some(_) => Ok(()),
            None => self.on_answer(m, &me, &v),
        }
    }

    fn on_deliver(&mut self, m: usize, me: &str, v: &Value) -> Result<(), Failure> {
        let p = &v["params"];
        let msg_id = p["msgId"].as_str().unwrap_or("").to_string();
        let from = p["from"].as_str().unwrap_or("").to_string();
        let n = p["message"]["n"].as_u64().unwrap_or(u64::MAX);
        if p["message"]["s"] != json!(from) {
            return Err(self.fail(format!("{me}: `from` is not the sender: {v}")));
        }
        // The proxy signs each delivery for its recipient (§6), with the key the recipient
        // had when its session opened (a removal retires it only after this session).
        let key = self.members[m].key;
        let message = serde_json::to_string(&p["message"]).unwrap_or_default();
        let want = jwt::hmac_b64(
            &key,
            &[
                msg_id.as_bytes(),
                b"\n",
                from.as_bytes(),
                b"\n",
                message.as_bytes(),
            ],
        );
        if p["sig"] != json!(want) {
            return Err(self.fail(format!("{me}: bad sig on {v}")));
        }
        if self.answered.contains(&msg_id) {
            return Err(self.fail(format!(
                "{me}: {msg_id} delivered again after its recipient answered it"
            )));
        }
        self.stats.deliveries += 1;
        if self.delivered.insert(msg_id.clone()) {
            // A first delivery: in order per sender and recipient.
            let key = (from.clone(), me.to_string());
            if let Some(last) = self.last_n.get(&key)
                && n <= *last
            {
                return Err(self.fail(format!(
                    "{me}: from {from}, #{n} after #{last}: out of order ({msg_id})"
                )));
            }
            self.last_n.insert(key, n);
        }
        let meant_for = self.sent.get(&(from.clone(), n)).map(|s| s.to.clone());
        if let Some(to) = meant_for {
            if to != me {
                return Err(self.fail(format!("{me}: got a message meant for {to}")));
            }
            if let Some(s) = self.sent.get_mut(&(from, n)) {
                s.msg_id.get_or_insert(msg_id.clone());
            }
        }
        if v.get("id").is_some() {
            self.members[m].inbox.push(Inbox {
                rid: v["id"].clone(),
                msg_id,
            });
        }
        Ok(())
    }

    fn on_answer(&mut self, m: usize, me: &str, v: &Value) -> Result<(), Failure> {
        let rid = match &v["id"] {
            Value::String(s) => s.clone(),
            // Our own answers to the proxy are never echoed; a null id is a parse error.
            other => return Err(self.fail(format!("{me}: an answer with id {other}: {v}"))),
        };
        let Some(asked) = self.members[m].asked.remove(&rid) else {
            return Err(self.fail(format!("{me}: an answer to {rid} it never asked: {v}")));
        };
        let Asked::Send { n } = asked else {
            return Ok(());
        };
        let key = (me.to_string(), n);
        if let Some(err) = v.get("error") {
            let code = err["code"].as_i64().unwrap_or(0);
            // -32603 storage_failed: the disk refused the commit its `queued` waited for.
            if ![-32001, -32002, -32003, -32004, -32005, -32602, -32603].contains(&code) {
                return Err(self.fail(format!("{me}: unexpected error for #{n}: {v}")));
            }
            if code == -32603 {
                self.stats.storage_failed += 1;
            }
            return Ok(());
        }
        let r = &v["result"];
        let msg_id = r["msgId"].as_str().unwrap_or("").to_string();
        match r["status"].as_str() {
            Some("queued") => {
                self.stats.queued += 1;
                if let Some(s) = self.sent.get_mut(&key) {
                    s.queued = true;
                    if let Some(known) = &s.msg_id
                        && known != &msg_id
                    {
                        return Err(self.fail(format!("{me}: #{n} has two msgIds")));
                    }
                    s.msg_id = Some(msg_id);
                }
                Ok(())
            }
            Some("delivered") if r["reply"]["ok"] == json!(msg_id) => Ok(()),
            Some("rejected") if r["error"]["message"] == json!(msg_id) => Ok(()),
            _ => Err(self.fail(format!(
                "{me}: #{n} answered with another message's outcome: {v}"
            ))),
        }
    }

    /// Every bound of §7 that a peer could push on.
    fn check_bounds(&self) -> Result<(), Failure> {
        let hard = self.p.hard_output_bound() + 64 * 1024;
        for m in &self.members {
            if let Some(s) = m.session.and_then(|s| self.p.session(s))
                && s.unsent > hard
            {
                return Err(self.fail(format!("{}: {} bytes owed", m.id, s.unsent)));
            }
        }
        for e in self.p.registry.entries() {
            if e.queue.len() > self.cfg.queue_max_messages {
                return Err(self.fail(format!("{}: {} queued", e.server_id, e.queue.len())));
            }
            if e.queue_bytes + e.inflight_bytes > self.cfg.queue_max_bytes {
                return Err(self.fail(format!(
                    "{}: {} bytes held ({} queued, {} in flight)",
                    e.server_id,
                    e.queue_bytes + e.inflight_bytes,
                    e.queue_bytes,
                    e.inflight_bytes
                )));
            }
        }
        Ok(())
    }

    /// Every member comes back, reads and answers everything until nothing moves.
    fn drain(&mut self) -> Result<(), Failure> {
        self.draining = true;
        for m in 0..MEMBERS {
            self.members[m].reads = true;
        }
        for _ in 0..40 {
            self.step += 1;
            for m in 0..MEMBERS {
                if self.connected(m).is_none() {
                    self.connect(m, false)?;
                }
            }
            self.end_turn()?;
            for m in 0..MEMBERS {
                while !self.members[m].inbox.is_empty() {
                    let d = self.members[m].inbox.remove(0);
                    let text = json!({"jsonrpc": "2.0", "id": d.rid, "result": {"ok": d.msg_id}});
                    self.answer(m, d.msg_id, &text);
                }
                // Activity, so heartbeats keep the session.
                self.request(m, "federation/servers", json!({}), Asked::Servers);
            }
            self.end_turn()?;
            self.advance(200);
            self.end_turn()?;
        }
        Ok(())
    }

    fn check_all_queued_delivered(&self) -> Result<(), Failure> {
        for ((from, n), s) in &self.sent {
            if !s.queued || s.ttl || s.dropped {
                continue;
            }
            let delivered = s
                .msg_id
                .as_ref()
                .is_some_and(|id| self.delivered.contains(id));
            if !delivered {
                return Err(self.fail(format!(
                    "{from} #{n} to {} was answered queued ({:?}) and never delivered",
                    s.to, s.msg_id
                )));
            }
        }
        Ok(())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        // The state dir goes with the run, failed or not.
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Runs one seed: a memory-only run, or (every fourth seed) one with a state dir and crashes.
pub fn run_seed(seed: u64, steps: usize) -> Result<Stats, Failure> {
    let sim = Sim::new(seed, seed % 4 == 3).map_err(|e| Failure {
        seed,
        step: 0,
        what: format!("setup: {e}"),
    })?;
    sim.run(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_the_same_everywhere() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..5).map(|_| a.next()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next()).collect();
        assert_eq!(xs, ys);
        assert_ne!(Rng::new(8).next(), xs[0]);
    }
}
