//! Cluster mode's core (docs/PROTOCOL.md §10, `src/federation/cluster.rs`) without NATS, sockets or
//! a clock: several `Federation` cores joined by an in-memory NATS bus.
//!
//! The bus plays the reactor's part for each core: it takes the core's actions, keeps its
//! subscriptions, and routes every publish to every subscription it matches (NATS wildcards:
//! `*` one token, `>` the rest), one message at a time in publish order, until no core has
//! anything left to do. What the cores write to their sessions is kept per session. JetStream
//! is absent unless a bus is made with `js`: its API requests then get a plain success answer
//! (pulls stay open), so the cores become `Ready`; else they stay `Joining`, which is enough
//! for presence and routing. Time moves only when a test says, per core, in steps of 100 ms;
//! every session's peer is taken as alive (it answers pings) while time moves. Ids come from
//! fixed seeds: every test plays the same way every time.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fedmcp::audit::Audit;
use fedmcp::clock::Now;
use fedmcp::config::Config;
use fedmcp::federation::Federation;
use fedmcp::federation::action::{Action, NatsOut, SessionId};
use fedmcp::federation::cluster::{
    Cluster, Link, SID_BCAST, SID_FOLLOW_BASE, SID_HELLO, SID_INBOX, SID_MSG, SID_NODE,
    SID_PRESENCE,
};
use fedmcp::federation::control::Opening;
use fedmcp::federation::registry::Presence;
use fedmcp::proto::jwt::{Claims, TokenType};
use fedmcp::proto::nats::valid_subject;
use hmac::{KeyInit, Mac};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

/// The JWT secret every core of a cluster shares.
const SECRET: &[u8] = b"cluster-core-test-secret-0123456789abcdef";
/// 2026-01-01T00:00:00Z: where every core's wall clock starts.
const T0_MS: i64 = 1_767_225_600_000;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn node_name(i: usize) -> String {
    format!("node{}", char::from(b'A' + i as u8))
}

/// A message on the bus.
#[derive(Debug, Clone)]
struct Msg {
    /// The core that published it (`usize::MAX`: the bus's JetStream).
    from: usize,
    subject: String,
    reply: Option<String>,
    payload: Vec<u8>,
}

struct Core {
    fed: Federation,
    subs: Vec<(u64, String)>,
    /// Not pumped: its actions stay in its outbox, and nothing on the bus reaches it.
    frozen: bool,
    /// Text frames written to each session, in order, not yet read by the test.
    frames: HashMap<SessionId, Vec<String>>,
    /// Sessions closed (close code; a drop is 1006).
    closed: Vec<(SessionId, u16)>,
    /// Other actions taken (answers to HTTP requests, dials, ...).
    other: Vec<String>,
}

type Loss = Box<dyn FnMut(&Msg) -> bool>;

struct Bus {
    cores: Vec<Core>,
    queue: VecDeque<Msg>,
    /// Answer JetStream's API (and acknowledge stream publishes).
    js: bool,
    /// Every message published by a core, in order.
    log: Vec<Msg>,
    /// Publishes the reactor's codec would not write (an invalid subject or reply).
    bad_subjects: Vec<String>,
    /// A message for which this returns true is lost.
    lose: Option<Loss>,
}

/// Whether `subject` matches the subscription `pattern`.
fn matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn claims(fed: &Federation, server: &str) -> Claims {
    Claims {
        server_id: server.to_string(),
        token_type: TokenType::Federation,
        iat: fed.now.secs(),
        exp: fed.now.secs() + 3600,
        nbf: None,
        jti: None,
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow)]
    params: &'a RawValue,
}

#[derive(Deserialize)]
struct DeliverParams<'a> {
    #[serde(rename = "msgId")]
    msg_id: String,
    from: String,
    #[serde(borrow)]
    message: &'a RawValue,
    #[serde(rename = "sentAt")]
    sent_at: i64,
    sig: String,
}

/// base64url (no padding) of HMAC-SHA256(key, msgId \n from \n message), computed here
/// independently of the proxy's own helper.
fn sig_of(key: &[u8], msg_id: &str, from: &str, message: &str) -> String {
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).expect("any key");
    m.update(msg_id.as_bytes());
    m.update(b"\n");
    m.update(from.as_bytes());
    m.update(b"\n");
    m.update(message.as_bytes());
    URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
}

impl Bus {
    fn new(n: usize) -> Bus {
        Bus::with(n, false, Config::default_for_tests)
    }

    /// `n` cores (`nodeA`, `nodeB`, ...), each made with `cfg()`, connected to the bus one
    /// after the other.
    fn with(n: usize, js: bool, cfg: impl Fn() -> Config) -> Bus {
        let mut bus = Bus {
            cores: Vec::new(),
            queue: VecDeque::new(),
            js,
            log: Vec::new(),
            bad_subjects: Vec::new(),
            lose: None,
        };
        let start = Now {
            at: std::time::Instant::now(),
            wall_ms: T0_MS,
        };
        for i in 0..n {
            bus.add_core(cfg(), start, i);
        }
        bus
    }

    fn add_core(&mut self, cfg: Config, now: Now, i: usize) {
        let audit = Audit::discard();
        let mut fed = Federation::new(cfg, SECRET.to_vec(), audit, now);
        fed.seed_ids(1000 + i as u64);
        fed.cluster = Some(Cluster::new("c".into(), node_name(i), 1));
        fed.metrics.cluster = true;
        self.cores.push(Core {
            fed,
            subs: Vec::new(),
            frozen: false,
            frames: HashMap::new(),
            closed: Vec::new(),
            other: Vec::new(),
        });
        self.cores[i].fed.nats_connected();
        self.pump();
    }

    /// Core `i`'s NATS connection is made again (a new connection: new subscriptions).
    fn reconnect(&mut self, i: usize) {
        self.cores[i].subs.clear();
        self.cores[i].fed.nats_connected();
        self.pump();
    }

    /// Carries out every core's actions and routes every message until all is quiet.
    fn pump(&mut self) {
        for _ in 0..2_000_000 {
            for i in 0..self.cores.len() {
                self.take(i);
            }
            let Some(m) = self.queue.pop_front() else {
                return;
            };
            self.route(m);
        }
        panic!("the bus never settled");
    }

    fn take(&mut self, i: usize) {
        if self.cores[i].frozen {
            return;
        }
        let actions = self.cores[i].fed.take_actions();
        for a in actions {
            let core = &mut self.cores[i];
            match a {
                Action::Nats(NatsOut::Subscribe { sid, subject }) => core.subs.push((sid, subject)),
                Action::Nats(NatsOut::Unsubscribe { sid }) => core.subs.retain(|(s, _)| *s != sid),
                Action::Nats(NatsOut::Publish {
                    subject,
                    reply,
                    payload,
                }) => {
                    if !valid_subject(&subject, false)
                        || reply.as_deref().is_some_and(|r| !valid_subject(r, false))
                    {
                        // The reactor's codec writes nothing for these.
                        self.bad_subjects
                            .push(format!("{subject} (reply {reply:?})"));
                        continue;
                    }
                    let m = Msg {
                        from: i,
                        subject,
                        reply,
                        payload,
                    };
                    self.log.push(m.clone());
                    if self.lose.as_mut().is_some_and(|f| f(&m)) {
                        continue;
                    }
                    self.queue.push_back(m);
                }
                Action::Send { session, text } => {
                    core.frames.entry(session).or_default().push(text);
                    // The reactor wrote it out.
                    core.fed.set_unsent(session, 0);
                }
                Action::Close { session, code, .. } => core.closed.push((session, code)),
                Action::Drop { session, .. } => core.closed.push((session, 1006)),
                Action::Ping { .. } => {}
                other => core.other.push(format!("{other:?}")),
            }
        }
    }

    fn route(&mut self, m: Msg) {
        let js_answer = if m.subject.starts_with("$JS.API.") {
            // A pull stays open (the server would answer 408 when it expires).
            (!m.subject.contains(".MSG.NEXT.")).then(|| {
                format!(
                    "{{\"type\":\"io.nats.jetstream.api.v1.answer\",\"num_pending\":0,\"name\":\"f{}\"}}",
                    m.from
                )
            })
        } else if m.subject.starts_with("c.q.") || m.subject.starts_with("c.reg.") {
            Some("{\"stream\":\"c_STREAM\",\"seq\":1}".to_string())
        } else {
            None
        };
        if let (true, Some(answer), Some(reply)) = (self.js, js_answer, m.reply.as_ref()) {
            self.queue.push_back(Msg {
                from: usize::MAX,
                subject: reply.clone(),
                reply: None,
                payload: answer.into_bytes(),
            });
        }
        for core in self.cores.iter_mut().filter(|c| !c.frozen) {
            let sids: Vec<u64> = core
                .subs
                .iter()
                .filter(|(_, p)| matches(p, &m.subject))
                .map(|(sid, _)| *sid)
                .collect();
            for sid in sids {
                core.fed
                    .nats_message(sid, &m.subject, m.reply.as_deref(), None, &m.payload);
            }
        }
    }

    fn fed(&self, i: usize) -> &Federation {
        &self.cores[i].fed
    }

    /// Time moves `d` on the cores `which` (in steps of 100 ms, each core's due timers fired
    /// and the bus pumped after every step). Every session's peer is alive meanwhile.
    fn advance(&mut self, which: &[usize], d: Duration) {
        let step = Duration::from_millis(100);
        let mut left = d;
        while !left.is_zero() {
            let s = step.min(left);
            left -= s;
            for &i in which {
                let fed = &mut self.cores[i].fed;
                fed.now = fed.now.after(s);
                let ids: Vec<SessionId> = fed.sessions().map(|x| x.id).collect();
                for id in ids {
                    fed.session_heard(id);
                }
                let at = fed.now.at;
                fed.fire_due(at);
            }
            self.pump();
        }
    }

    fn all(&self) -> Vec<usize> {
        (0..self.cores.len()).collect()
    }

    /// Opens a session of `server` on core `i` and answers its welcome, without checking
    /// that it stays (an older one elsewhere may win, and this one be closed `4003`).
    fn open_contested(&mut self, i: usize, server: &str) -> SessionId {
        let (s, welcome) = self.open_unwelcomed(i, server);
        self.text(
            i,
            s,
            &format!("{{\"jsonrpc\":\"2.0\",\"id\":{welcome},\"result\":{{}}}}"),
        );
        s
    }

    /// Opens a session of `server` on core `i` and answers its welcome.
    fn open(&mut self, i: usize, server: &str) -> SessionId {
        let (s, welcome) = self.open_unwelcomed(i, server);
        self.text(
            i,
            s,
            &format!("{{\"jsonrpc\":\"2.0\",\"id\":{welcome},\"result\":{{}}}}"),
        );
        assert!(
            matches!(
                self.presence(i, server),
                Some(Presence::Online(x)) if x == s
            ),
            "{server} online on core {i}"
        );
        s
    }

    /// Opens a session of `server` on core `i`; returns it and its welcome's id.
    fn open_unwelcomed(&mut self, i: usize, server: &str) -> (SessionId, String) {
        let fed = &mut self.cores[i].fed;
        let c = claims(fed, server);
        let o = Opening {
            claims: &c,
            welcome_by: fed.now.at + Duration::from_secs(10),
            outbound: false,
            peer: None,
        };
        let s = fed.open_session(o).expect("room in the registry");
        self.pump();
        let frames = self.frames(i, s);
        assert_eq!(frames.len(), 1, "one welcome: {frames:?}");
        assert_eq!(frames[0]["method"], "federation/welcome");
        (s, frames[0]["id"].to_string())
    }

    /// A text frame from session `s`'s peer on core `i`.
    fn text(&mut self, i: usize, s: SessionId, text: &str) {
        let fed = &mut self.cores[i].fed;
        fed.session_heard(s);
        fed.on_text(s, text);
        self.pump();
    }

    /// `federation/send` from session `s` on core `i` (`id` `None`: a notification), not
    /// pumped.
    fn send_unpumped(&mut self, i: usize, s: SessionId, id: Option<u64>, to: &str, message: &str) {
        let id = id.map_or(String::new(), |id| format!("\"id\":{id},"));
        let text = format!(
            "{{\"jsonrpc\":\"2.0\",{id}\"method\":\"federation/send\",\"params\":{{\"to\":\"{to}\",\"message\":{message}}}}}"
        );
        let fed = &mut self.cores[i].fed;
        fed.session_heard(s);
        fed.on_text(s, &text);
    }

    fn send(&mut self, i: usize, s: SessionId, id: Option<u64>, to: &str, message: &str) {
        self.send_unpumped(i, s, id, to, message);
        self.pump();
    }

    /// The frames written to session `s` on core `i` since last read, as text.
    fn raw_frames(&mut self, i: usize, s: SessionId) -> Vec<String> {
        self.cores[i].frames.remove(&s).unwrap_or_default()
    }

    fn frames(&mut self, i: usize, s: SessionId) -> Vec<Value> {
        self.raw_frames(i, s).iter().map(|t| json(t)).collect()
    }

    fn presence(&self, i: usize, server: &str) -> Option<Presence> {
        self.fed(i).registry.by_id(server).map(|e| e.presence)
    }

    /// `GET /v1/servers/{server}`'s entry on core `i`.
    fn entry(&self, i: usize, server: &str) -> Value {
        let fed = self.fed(i);
        let e = fed
            .registry
            .by_id(server)
            .unwrap_or_else(|| panic!("{server} known on core {i}"));
        json(&fed.entry_json(e))
    }

    fn closed(&mut self, i: usize) -> Vec<(SessionId, u16)> {
        std::mem::take(&mut self.cores[i].closed)
    }

    fn live_nodes(&self, i: usize) -> usize {
        self.fed(i).cluster.as_ref().map_or(0, |c| c.live_nodes())
    }

    /// What an operator or a server can see of every core: its link, its live nodes, its
    /// sessions, its registry entries as `GET /v1/servers` shows them.
    fn visible(&self) -> BTreeMap<String, String> {
        let mut v = BTreeMap::new();
        for (i, c) in self.cores.iter().enumerate() {
            let f = &c.fed;
            let cl = f.cluster.as_ref();
            v.insert(format!("{i} link"), format!("{:?}", cl.map(|c| c.link)));
            v.insert(
                format!("{i} live nodes"),
                cl.map_or(0, |c| c.live_nodes()).to_string(),
            );
            v.insert(format!("{i} sessions"), f.sessions().count().to_string());
            for e in f.registry.entries() {
                v.insert(format!("{i} entry {}", e.server_id), f.entry_json(e));
            }
        }
        v
    }
}

/// What changed between two [`Bus::visible`] views, one line per change.
fn changes(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, b) in before {
        match after.get(k) {
            None => out.push(format!("core {k} gone (was {b})")),
            Some(a) if a != b => out.push(format!("core {k}: {b} -> {a}")),
            Some(_) => {}
        }
    }
    for (k, a) in after {
        if !before.contains_key(k) {
            out.push(format!("core {k} new: {a}"));
        }
    }
    out
}

fn is_remote(p: Option<Presence>) -> bool {
    matches!(p, Some(Presence::Remote(_)))
}

fn is_offline(p: Option<Presence>) -> bool {
    matches!(p, None | Some(Presence::Offline))
}

/// The `federation/deliver` requests among `frames`.
fn delivers(frames: &[Value]) -> Vec<&Value> {
    frames
        .iter()
        .filter(|f| f["method"] == "federation/deliver")
        .collect()
}

fn answer(id: &Value, result: &str) -> String {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{result}}}")
}

fn reject(id: &Value, error: &str) -> String {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{error}}}")
}

// ---- 1. presence ------------------------------------------------------------------------

#[test]
fn a_session_on_one_node_is_online_on_every_node_until_it_closes() {
    let mut bus = Bus::new(3);
    for i in bus.all() {
        assert_eq!(bus.live_nodes(i), 3, "core {i} hears every node");
        assert!(matches!(
            bus.fed(i).cluster.as_ref().map(|c| c.link),
            Some(Link::Joining(_))
        ));
    }
    // Connecting (welcome not answered): not announced.
    let (alice, welcome) = bus.open_unwelcomed(A, "alice");
    assert!(is_offline(bus.presence(B, "alice")));
    assert!(is_offline(bus.presence(C, "alice")));
    bus.text(
        A,
        alice,
        &format!("{{\"jsonrpc\":\"2.0\",\"id\":{welcome},\"result\":{{\"capabilities\":{{\"tools\":[]}}}}}}"),
    );
    for i in [B, C] {
        assert!(
            is_remote(bus.presence(i, "alice")),
            "alice online on core {i}"
        );
        let e = bus.entry(i, "alice");
        assert_eq!(e["node"], "nodeA", "{e}");
        assert_eq!(e["state"], "online", "{e}");
        assert_eq!(e["capabilities"], json(r#"{"tools":[]}"#), "{e}");
        assert_eq!(e["connectedAt"], T0_MS, "{e}");
    }
    assert_eq!(bus.entry(A, "alice")["node"], "nodeA");
    // `federation/servers` on another node lists it.
    let bob = bus.open(B, "bob");
    bus.text(
        B,
        bob,
        r#"{"jsonrpc":"2.0","id":5,"method":"federation/servers"}"#,
    );
    let f = bus.frames(B, bob);
    let ids: Vec<&str> = f[0]["result"]["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .filter_map(|s| s["serverId"].as_str())
        .collect();
    assert!(ids.contains(&"alice") && ids.contains(&"bob"), "{f:?}");

    bus.cores[A].fed.close_session(alice, 1000, "bye");
    bus.pump();
    for i in [B, C] {
        assert!(
            is_offline(bus.presence(i, "alice")),
            "alice offline on core {i}"
        );
        let e = bus.entry(i, "alice");
        assert_eq!(e["node"], Value::Null, "{e}");
        assert_eq!(e["state"], "offline", "{e}");
    }
    assert_eq!(bus.entry(A, "alice")["node"], Value::Null);
    assert!(bus.bad_subjects.is_empty(), "{:?}", bus.bad_subjects);
}

#[test]
fn a_node_that_joins_late_learns_every_session_from_the_snapshots() {
    let mut bus = Bus::new(2);
    bus.open(A, "alice");
    bus.open(A, "a2");
    bus.open(B, "bob");
    let now = bus.fed(A).now;
    bus.add_core(Config::default_for_tests(), now, C);
    for s in ["alice", "a2"] {
        assert!(is_remote(bus.presence(C, s)), "{s} online on C");
        assert_eq!(bus.entry(C, s)["node"], "nodeA");
    }
    assert!(is_remote(bus.presence(C, "bob")));
    assert_eq!(bus.entry(C, "bob")["node"], "nodeB");
    for i in bus.all() {
        assert_eq!(bus.live_nodes(i), 3, "core {i}");
    }
}

#[test]
fn a_lost_presence_message_is_made_good_through_the_heartbeat() {
    let mut bus = Bus::new(2);
    // The first `up` of node A is lost on the way.
    let mut lost = false;
    bus.lose = Some(Box::new(move |m: &Msg| {
        let up = m.subject == "c.presence.nodeA"
            && String::from_utf8_lossy(&m.payload).contains("\"op\":\"up\"");
        if up && !lost {
            lost = true;
            return true;
        }
        false
    }));
    bus.open(A, "alice");
    assert!(is_offline(bus.presence(B, "alice")), "the up was lost");
    // A's next heartbeat carries a sequence number B has not applied: B asks again.
    bus.advance(&[A, B], Duration::from_millis(600));
    assert!(is_remote(bus.presence(B, "alice")));
    assert_eq!(bus.entry(B, "alice")["node"], "nodeA");
}

#[test]
fn a_goodbye_makes_a_nodes_sessions_offline_at_once() {
    let mut bus = Bus::new(2);
    bus.open(B, "bob");
    assert!(is_remote(bus.presence(A, "bob")));
    bus.cores[B].fed.cluster_bye();
    bus.pump();
    assert!(is_offline(bus.presence(A, "bob")));
    assert_eq!(bus.live_nodes(A), 1);
}

#[test]
fn a_node_cut_off_from_nats_sees_remote_servers_offline_until_it_is_back() {
    let mut bus = Bus::new(2);
    let alice = bus.open(A, "alice");
    bus.open(B, "bob");
    bus.cores[A].fed.nats_lost("test: connection reset");
    bus.pump();
    assert!(bus.fed(A).cluster_degraded());
    assert!(is_offline(bus.presence(A, "bob")));
    bus.send(A, alice, Some(1), "bob", "1");
    let f = bus.frames(A, alice);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["error"]["code"], -32002, "{f:?}");
    // Back: B's snapshot (asked for by A's hello) brings bob back.
    bus.reconnect(A);
    assert!(!bus.fed(A).cluster_degraded());
    assert!(is_remote(bus.presence(A, "bob")));
    assert!(is_remote(bus.presence(B, "alice")));
}

// ---- 2. routing -------------------------------------------------------------------------

#[test]
fn a_request_to_a_server_on_another_node_is_delivered_signed_and_answered() {
    let mut bus = Bus::new(2);
    let alice = bus.open(A, "alice");
    let bob = bus.open(B, "bob");
    // Odd spacing, a long decimal, an escape and a non-ASCII character: forwarded as is.
    let message =
        r#"{ "x" : 1.50 , "big":123456789012345678901234567890, "s":"\u00e9 é" ,"n":[1 ,2] }"#;
    bus.send(A, alice, Some(1), "bob", message);
    assert!(bus.frames(A, alice).is_empty(), "no answer before bob's");

    let raw = bus.raw_frames(B, bob);
    assert_eq!(raw.len(), 1, "{raw:?}");
    let v = json(&raw[0]);
    assert_eq!(v["method"], "federation/deliver");
    let id = v["id"].clone();
    assert!(id.is_u64(), "a request: {v}");
    let req: Request = serde_json::from_str(&raw[0]).expect("a request");
    let p: DeliverParams = serde_json::from_str(req.params.get()).expect("deliver params");
    assert_eq!(p.from, "alice");
    assert_eq!(p.message.get(), message, "the message bytes are unchanged");
    assert_eq!(p.sent_at, T0_MS);
    let key_b = bus.fed(B).signing_key("bob");
    assert_eq!(key_b, bus.fed(A).signing_key("bob"), "one key per server");
    assert_eq!(
        p.sig,
        sig_of(&key_b, &p.msg_id, &p.from, p.message.get()),
        "signed for bob"
    );
    let key_alice = bus.fed(B).signing_key("alice");
    assert_ne!(
        p.sig,
        sig_of(&key_alice, &p.msg_id, &p.from, p.message.get())
    );

    // bob's result comes back to alice unchanged.
    let reply = r#"{"ok" : [1, 2 ,3]}"#;
    bus.text(B, bob, &answer(&id, reply));
    let raw = bus.raw_frames(A, alice);
    assert_eq!(raw.len(), 1, "{raw:?}");
    let r = json(&raw[0]);
    assert_eq!(r["id"], 1);
    assert_eq!(r["result"]["status"], "delivered", "{r}");
    assert_eq!(r["result"]["msgId"], p.msg_id.as_str());
    assert_eq!(r["result"]["reply"], json(reply));
    assert!(raw[0].contains(reply), "reply bytes kept: {}", raw[0]);

    // An error answer: `rejected` with the error object.
    bus.send(A, alice, Some(2), "bob", "\"second\"");
    let f = bus.frames(B, bob);
    let d = delivers(&f);
    assert_eq!(d.len(), 1, "{f:?}");
    let err = r#"{"code":-5,"message":"nope","data":{"k":[1]}}"#;
    bus.text(B, bob, &reject(&d[0]["id"], err));
    let f = bus.frames(A, alice);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["id"], 2);
    assert_eq!(f[0]["result"]["status"], "rejected", "{f:?}");
    assert_eq!(f[0]["result"]["error"], json(err));
    assert_eq!(f[0]["result"]["msgId"], d[0]["params"]["msgId"]);
    assert!(bus.frames(B, bob).is_empty());
    assert!(bus.bad_subjects.is_empty(), "{:?}", bus.bad_subjects);
}

#[test]
fn a_remote_request_unanswered_times_out_on_the_senders_node_once() {
    let mut bus = Bus::with(2, false, || {
        let mut c = Config::default_for_tests();
        c.delivery_timeout = Duration::from_secs(2);
        c
    });
    let alice = bus.open(A, "alice");
    let bob = bus.open(B, "bob");
    bus.send(A, alice, Some(9), "bob", "{}");
    let f = bus.frames(B, bob);
    let d = delivers(&f);
    assert_eq!(d.len(), 1);
    let id = d[0]["id"].clone();
    // Time moves on A only: A's deadline is the one that answers.
    bus.advance(&[A], Duration::from_millis(1900));
    assert!(bus.frames(A, alice).is_empty(), "not yet");
    bus.advance(&[A], Duration::from_millis(100));
    let f = bus.frames(A, alice);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["id"], 9);
    assert_eq!(f[0]["error"]["code"], -32003, "{f:?}");
    assert_eq!(f[0]["error"]["data"]["reason"], "delivery_timeout");
    // bob answers late: nobody waits any more.
    bus.text(B, bob, &answer(&id, "1"));
    assert!(bus.frames(A, alice).is_empty(), "answered once");
    bus.advance(&[A, B], Duration::from_secs(5));
    assert!(bus.frames(A, alice).is_empty(), "answered once");
}

#[test]
fn both_nodes_deadlines_racing_answer_the_sender_once() {
    let mut bus = Bus::new(2);
    let alice = bus.open(A, "alice");
    let bob = bus.open(B, "bob");
    bus.send(A, alice, Some(3), "bob", "[]");
    assert_eq!(delivers(&bus.frames(B, bob)).len(), 1);
    let timeout = bus.fed(A).cfg.delivery_timeout;
    bus.advance(&[A, B], timeout + Duration::from_secs(6));
    let f = bus.frames(A, alice);
    assert_eq!(f.len(), 1, "exactly one answer: {f:?}");
    assert_eq!(f[0]["error"]["code"], -32003, "{f:?}");
}

#[test]
fn a_recipient_gone_before_answering_fails_the_remote_send_once() {
    let mut bus = Bus::new(2);
    let alice = bus.open(A, "alice");
    let bob = bus.open(B, "bob");
    bus.send(A, alice, Some(4), "bob", "1");
    assert_eq!(delivers(&bus.frames(B, bob)).len(), 1);
    bus.cores[B].fed.close_session(bob, 1000, "bye");
    bus.pump();
    let f = bus.frames(A, alice);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["error"]["code"], -32002, "{f:?}");
    assert!(is_offline(bus.presence(A, "bob")));
    bus.advance(
        &[A, B],
        bus.fed(A).cfg.delivery_timeout + Duration::from_secs(1),
    );
    assert!(bus.frames(A, alice).is_empty(), "answered once");
}

#[test]
fn a_send_to_a_server_that_just_left_its_node_is_offline() {
    let mut bus = Bus::new(2);
    let alice = bus.open(A, "alice");
    let bob = bus.open(B, "bob");
    // B's `down` for bob is lost: A still routes to B, which knows better.
    bus.lose = Some(Box::new(|m: &Msg| {
        m.subject == "c.presence.nodeB"
            && String::from_utf8_lossy(&m.payload).contains("\"op\":\"down\"")
    }));
    bus.cores[B].fed.close_session(bob, 1000, "bye");
    bus.pump();
    assert!(is_remote(bus.presence(A, "bob")), "A was not told");
    bus.send(A, alice, Some(6), "bob", "1");
    let f = bus.frames(A, alice);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["error"]["code"], -32002, "{f:?}");
}

// ---- 3. order ---------------------------------------------------------------------------

#[test]
fn sends_between_two_nodes_arrive_in_order() {
    let mut bus = Bus::new(3);
    let alice = bus.open(A, "alice");
    let carol = bus.open(C, "carol");
    let bob = bus.open(B, "bob");
    // 200 sends from alice (and 100 from carol, interleaved), pumped at irregular moments.
    let mut seed = 12345u64;
    let mut carol_sent = 0;
    for k in 0..200u64 {
        bus.send_unpumped(A, alice, Some(k + 1), "bob", &format!("{{\"k\":{k}}}"));
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if seed >> 62 == 0 {
            bus.send_unpumped(
                C,
                carol,
                Some(carol_sent + 1),
                "bob",
                &format!("{{\"c\":{carol_sent}}}"),
            );
            carol_sent += 1;
        }
        if (seed >> 33).is_multiple_of(3) {
            bus.pump();
        }
    }
    bus.pump();
    let f = bus.frames(B, bob);
    let d = delivers(&f);
    let from_alice: Vec<u64> = d
        .iter()
        .filter(|v| v["params"]["from"] == "alice")
        .map(|v| v["params"]["message"]["k"].as_u64().expect("k"))
        .collect();
    assert_eq!(from_alice, (0..200).collect::<Vec<u64>>(), "alice's order");
    let from_carol: Vec<u64> = d
        .iter()
        .filter(|v| v["params"]["from"] == "carol")
        .map(|v| v["params"]["message"]["c"].as_u64().expect("c"))
        .collect();
    assert_eq!(
        from_carol,
        (0..carol_sent).collect::<Vec<u64>>(),
        "carol's order"
    );
    // bob answers in reverse order, echoing each message: each answer reaches its request.
    for v in d.iter().rev() {
        let echo = v["params"]["message"].to_string();
        bus.cores[B].fed.on_text(bob, &answer(&v["id"], &echo));
    }
    bus.pump();
    let answers = bus.frames(A, alice);
    assert_eq!(answers.len(), 200);
    let mut seen = [false; 200];
    for a in &answers {
        let id = a["id"].as_u64().expect("id") as usize;
        assert_eq!(a["result"]["status"], "delivered", "{a}");
        assert_eq!(
            a["result"]["reply"]["k"].as_u64(),
            Some(id as u64 - 1),
            "{a}"
        );
        assert!(!seen[id - 1], "answered twice: {a}");
        seen[id - 1] = true;
    }
    assert_eq!(bus.frames(C, carol).len() as u64, carol_sent);
}

// ---- 4. broadcast -----------------------------------------------------------------------

#[test]
fn a_broadcast_reaches_every_other_server_of_the_cluster_once() {
    let mut bus = Bus::new(3);
    let mut sessions: Vec<(usize, &str, SessionId)> = Vec::new();
    for (i, s) in [(A, "alice"), (A, "a2"), (B, "bob"), (B, "b2"), (C, "carol")] {
        let id = bus.open(i, s);
        sessions.push((i, s, id));
    }
    for &(from_core, from, from_session) in &[sessions[0], sessions[4]] {
        let message = r#"{"hello" : "all"}"#;
        bus.send(from_core, from_session, Some(77), "*", message);
        for &(i, s, id) in &sessions {
            let raw = bus.raw_frames(i, id);
            if s == from {
                assert_eq!(raw.len(), 1, "only the sender's answer: {raw:?}");
                let r = json(&raw[0]);
                assert_eq!(r["id"], 77);
                assert_eq!(r["result"]["status"], "broadcast", "{r}");
                assert_eq!(r["result"]["recipients"], 4, "{r}");
                continue;
            }
            assert_eq!(raw.len(), 1, "{s} gets it once: {raw:?}");
            let v = json(&raw[0]);
            assert_eq!(v["method"], "federation/deliver");
            assert!(v.get("id").is_none(), "a notification: {v}");
            let req: Request = serde_json::from_str(&raw[0]).expect("a request");
            let p: DeliverParams = serde_json::from_str(req.params.get()).expect("params");
            assert_eq!(p.from, from);
            assert_eq!(p.message.get(), message);
            let key = bus.fed(i).signing_key(s);
            assert_eq!(p.sig, sig_of(&key, &p.msg_id, &p.from, p.message.get()));
        }
    }
}

// ---- 5. node timeout --------------------------------------------------------------------

#[test]
fn a_silent_node_is_gone_after_the_node_timeout_and_its_servers_offline() {
    let mut bus = Bus::new(2);
    let alice = bus.open(A, "alice");
    bus.open(B, "bob");
    assert!(is_remote(bus.presence(A, "bob")));
    bus.cores[B].frozen = true;
    bus.advance(&[A], Duration::from_millis(2900));
    assert!(is_remote(bus.presence(A, "bob")), "not yet");
    bus.advance(&[A], Duration::from_millis(1100));
    assert!(is_offline(bus.presence(A, "bob")), "gone after 3 s");
    assert_eq!(bus.entry(A, "bob")["node"], Value::Null);
    assert_eq!(bus.live_nodes(A), 1);
    assert_eq!(bus.fed(A).metrics.cluster_nodes, 1);
    bus.send(A, alice, Some(8), "bob", "1");
    let f = bus.frames(A, alice);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["error"]["code"], -32002, "{f:?}");
    assert_eq!(f[0]["error"]["data"]["reason"], "server_offline");

    // B heard again (its clock moved with A's, its timers not fired while frozen).
    bus.cores[B].frozen = false;
    bus.cores[B].fed.now = bus.fed(A).now;
    bus.advance(&[A, B], Duration::from_millis(1000));
    assert!(is_remote(bus.presence(A, "bob")), "bob back on A");
    assert!(is_remote(bus.presence(B, "alice")), "alice back on B");
    assert_eq!(bus.live_nodes(A), 2);
}

// ---- 6. newer session -------------------------------------------------------------------

#[test]
fn a_newer_session_on_another_node_replaces_the_older() {
    let mut bus = Bus::new(3);
    let old = bus.open(B, "bob");
    assert_eq!(bus.entry(A, "bob")["connectedAt"], T0_MS);
    let all = bus.all();
    bus.advance(&all, Duration::from_millis(1000));
    let new = bus.open(A, "bob");
    assert_eq!(bus.closed(B), vec![(old, 4003)], "the older closed 4003");
    assert!(bus.fed(B).session(old).is_none());
    assert!(bus.closed(A).is_empty(), "the newer stays");
    assert!(bus.fed(A).session(new).is_some());
    assert_eq!(bus.presence(A, "bob"), Some(Presence::Online(new)));
    for i in [B, C] {
        assert!(is_remote(bus.presence(i, "bob")), "core {i}");
        let e = bus.entry(i, "bob");
        assert_eq!(e["node"], "nodeA", "core {i}: {e}");
        assert_eq!(e["connectedAt"], T0_MS + 1000, "core {i}: {e}");
    }
    // And it is reachable from everywhere.
    let carol = bus.open(C, "carol");
    bus.send(C, carol, Some(1), "bob", "1");
    assert_eq!(delivers(&bus.frames(A, new)).len(), 1);
}

/// Open sessions of `server` on every core, and where each core thinks it is.
fn sessions_of(bus: &Bus, server: &str) -> (Vec<(usize, SessionId)>, Vec<Option<String>>) {
    let open = bus
        .all()
        .into_iter()
        .flat_map(|i| {
            bus.fed(i)
                .sessions()
                .filter(|s| s.server_id == server)
                .map(move |s| (i, s.id))
                .collect::<Vec<_>>()
        })
        .collect();
    let views = bus
        .all()
        .into_iter()
        .map(|i| bus.entry(i, server)["node"].as_str().map(str::to_string))
        .collect();
    (open, views)
}

#[test]
fn two_sessions_of_one_server_never_both_stay_with_equal_connected_at() {
    // Same `connectedAt` on two nodes: the larger node id stays (docs/CLUSTER.md).
    let mut bus = Bus::new(3);
    let on_b = bus.open(B, "bob");
    let on_a = bus.open_contested(A, "bob");
    // Heartbeats go on for a while: nothing else will settle it.
    let all = bus.all();
    bus.advance(&all, Duration::from_secs(5));
    let (open, views) = sessions_of(&bus, "bob");
    assert_eq!(
        open,
        vec![(B, on_b)],
        "one session stays, nodeB's (views {views:?}; closed on A {:?})",
        bus.closed(A)
    );
    let _ = on_a;
    assert!(
        views.iter().all(|v| v.as_deref() == Some("nodeB")),
        "{views:?}"
    );
}

#[test]
fn two_sessions_of_one_server_never_both_stay_with_skewed_clocks() {
    // A's clock is 2 s behind B's: bob's later session on A has the earlier `connectedAt`, so
    // B's stays and A's is closed (presence follows the nodes' clocks) — but one must go.
    let mut bus = Bus::new(3);
    let on_b = bus.open(B, "bob");
    let all = bus.all();
    bus.advance(&all, Duration::from_millis(500));
    let behind = bus.fed(A).now.wall_ms - 2000;
    bus.cores[A].fed.now.wall_ms = behind;
    let _on_a = bus.open_contested(A, "bob");
    bus.advance(&all, Duration::from_secs(5));
    let (open, views) = sessions_of(&bus, "bob");
    assert_eq!(
        open.len(),
        1,
        "one session of bob in the cluster, not {open:?} (views {views:?})"
    );
    assert_eq!(open, vec![(B, on_b)], "B's is the newer by the clocks");
    assert!(
        views.iter().all(|v| v.as_deref() == Some("nodeB")),
        "{views:?}"
    );
}

// ---- 7. notifications -------------------------------------------------------------------

#[test]
fn a_notification_is_forwarded_and_nothing_comes_back() {
    let mut bus = Bus::new(2);
    let alice = bus.open(A, "alice");
    let bob = bus.open(B, "bob");
    let from = bus.log.len();
    bus.send(A, alice, None, "bob", r#"{"note" : true}"#);
    let raw = bus.raw_frames(B, bob);
    assert_eq!(raw.len(), 1, "{raw:?}");
    let v = json(&raw[0]);
    assert_eq!(v["method"], "federation/deliver");
    assert!(v.get("id").is_none(), "a notification: {v}");
    let req: Request = serde_json::from_str(&raw[0]).expect("a request");
    let p: DeliverParams = serde_json::from_str(req.params.get()).expect("params");
    assert_eq!(p.message.get(), r#"{"note" : true}"#);
    assert_eq!(p.from, "alice");
    let to_b: Vec<&Msg> = bus.log[from..]
        .iter()
        .filter(|m| m.subject == "c.msg.nodeB")
        .collect();
    assert_eq!(to_b.len(), 1);
    assert_eq!(to_b[0].reply, None, "nothing is waited for");
    assert!(
        !bus.log[from..]
            .iter()
            .any(|m| m.subject.starts_with("c.in.nodeA.")),
        "nothing comes back"
    );
    assert!(bus.frames(A, alice).is_empty());
    bus.advance(
        &[A, B],
        bus.fed(A).cfg.delivery_timeout + Duration::from_secs(1),
    );
    assert!(bus.frames(A, alice).is_empty(), "still nothing");
    assert!(bus.frames(B, bob).is_empty());
}

// ---- 8. garbage -------------------------------------------------------------------------

/// Payloads that are not messages of the cluster: random bytes, bytes that are not UTF-8,
/// JSON that is not an object of the right shape, numbers out of range, and ids (server ids,
/// node ids, message ids) that are not valid.
fn garbage() -> Vec<Vec<u8>> {
    let mut g: Vec<Vec<u8>> = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for n in 0..200usize {
        let mut b = Vec::new();
        for _ in 0..(n * 7) % 257 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            b.push((seed >> 56) as u8);
        }
        g.push(b);
    }
    for b in [&[0xffu8, 0xfe][..], &[0xc3], &[b'{', 0x80, b'}'], &[0]] {
        g.push(b.to_vec());
    }
    let texts: Vec<String> = vec![
        "".into(),
        " ".into(),
        "null".into(),
        "true".into(),
        "0".into(),
        "-1".into(),
        "1e999".into(),
        "18446744073709551616".into(),
        "\"x\"".into(),
        "[]".into(),
        "{}".into(),
        "[{}]".into(),
        "{".into(),
        "{\"".into(),
        "}{".into(),
        "{\"op\":}".into(),
        "[".repeat(100_000),
        "{\"a\":".repeat(50_000),
        format!("\"{}\"", "x".repeat(1 << 20)),
        // Presence, of the wrong shape or with numbers out of range.
        r#"{"op":5,"node":"nodeA","seq":1}"#.into(),
        r#"{"op":"up","node":5,"seq":1}"#.into(),
        r#"{"op":"up","node":"nodeA","seq":-1,"serverId":"zed","since":0,"capabilities":{}}"#.into(),
        r#"{"op":"up","node":"nodeA","seq":1e400,"serverId":"zed","since":0,"capabilities":{}}"#.into(),
        r#"{"op":"up","node":"nodeA","seq":1.5,"serverId":"zed","since":0,"capabilities":{}}"#.into(),
        r#"{"op":"up","node":"nodeA","seq":"1","serverId":"zed","since":0,"capabilities":{}}"#.into(),
        r#"{"op":"up","node":"nodeA","seq":18446744073709551616,"serverId":"zed","since":0,"capabilities":{}}"#.into(),
        r#"{"op":"up","node":"nodeA","seq":1,"serverId":"zed","since":9223372036854775808,"capabilities":{}}"#.into(),
        r#"{"op":"up","node":"nodeA","seq":1,"serverId":"zed","since":1e400,"capabilities":{}}"#.into(),
        r#"{"op":"up","node":"nodeA","seq":1,"serverId":5,"since":0,"capabilities":{}}"#.into(),
        r#"{"op":"snap","node":"nodeA","seq":1,"part":-1,"last":true,"servers":[]}"#.into(),
        r#"{"op":"snap","node":"nodeA","seq":1,"part":4294967296,"last":true,"servers":[]}"#.into(),
        r#"{"op":"snap","node":"nodeA","seq":1,"part":0,"last":true,"servers":5}"#.into(),
        r#"{"op":"snap","node":"nodeA","seq":1,"part":0,"last":true,"servers":[{"serverId":5}]}"#.into(),
        r#"{"op":"snap","node":"nodeA","seq":1,"part":0,"last":"yes","servers":[]}"#.into(),
        r#"{"op":"explode","node":"nodeA","seq":1}"#.into(),
        // Heartbeats and hellos of the wrong shape; a goodbye from a node never heard.
        r#"{"node":"nodeA","seq":"x"}"#.into(),
        r#"{"node":["nodeA"],"seq":1}"#.into(),
        r#"{"seq":1}"#.into(),
        r#"{"node":"nodeA","seq":1,"bye":"yes"}"#.into(),
        r#"{"node":5}"#.into(),
        r#"{"want":"nodeA"}"#.into(),
        // Node messages of the wrong shape, or with bad ids.
        r#"{"t":5}"#.into(),
        r#"{"t":"explode","msgId":"m1","from":"alice","to":"bob","message":1}"#.into(),
        r#"{"t":"deliver","msgId":"m1","from":"alice","to":"bob"}"#.into(),
        r#"{"t":"deliver","msgId":"m1","from":"alice","to":"bob","message":1,"sentAt":1e400}"#.into(),
        r#"{"t":"deliver","msgId":"m1","from":"alice","to":"bob","message":1,"queue":"yes"}"#.into(),
        r#"{"t":"delivered","to":"bob"}"#.into(),
        r#"{"t":"delivered","to":"a b","params":{}}"#.into(),
        r#"{"t":"delivered","to":"nobody","params":{}}"#.into(),
        // Broadcasts of the wrong shape.
        r#"{"origin":"nodeQ","msgId":"m1","from":"alice","sentAt":0}"#.into(),
        r#"{"origin":"nodeQ","msgId":"m1","from":"alice","message":1,"sentAt":"0"}"#.into(),
        r#"{"origin":5,"msgId":"m1","from":"alice","message":1,"sentAt":0}"#.into(),
    ];
    g.extend(texts.into_iter().map(String::into_bytes));
    let long = "x".repeat(65);
    let bad_ids = [
        "a b",
        "../x",
        "",
        "a__b",
        "x\ny",
        "*",
        ">",
        "é",
        long.as_str(),
    ];
    let bad_nodes = [
        "a b",
        "../x",
        "",
        "*",
        ">",
        "nodeQ.x",
        "nodeQ\r\nPUB x 1",
        "x".repeat(100).leak(),
    ];
    for id in bad_ids {
        let id = serde_json::to_string(id).expect("a string");
        for t in [
            format!(
                r#"{{"op":"up","node":"nodeA","seq":1,"serverId":{id},"since":0,"capabilities":{{}}}}"#
            ),
            format!(
                r#"{{"op":"snap","node":"nodeA","seq":1,"part":1,"last":false,"servers":[{{"serverId":{id},"since":0,"capabilities":{{}}}}]}}"#
            ),
            format!(r#"{{"op":"down","node":"nodeA","seq":1,"serverId":{id}}}"#),
            format!(r#"{{"t":"deliver","msgId":"m1","from":{id},"to":"bob","message":1}}"#),
            format!(r#"{{"t":"deliver","msgId":"m1","from":"alice","to":{id},"message":1}}"#),
            format!(r#"{{"origin":"nodeQ","msgId":"m1","from":{id},"message":1,"sentAt":0}}"#),
        ] {
            g.push(t.into_bytes());
        }
    }
    // Message ids are of `A-Z a-z 0-9 - _ . :`, at most 64 (the proxy makes `<boot>-<seq>`).
    for id in bad_ids.iter().filter(|i| **i != "a__b") {
        let id = serde_json::to_string(id).expect("a string");
        for t in [
            format!(r#"{{"t":"deliver","msgId":{id},"from":"alice","to":"bob","message":1}}"#),
            format!(r#"{{"origin":"nodeQ","msgId":{id},"from":"alice","message":1,"sentAt":0}}"#),
        ] {
            g.push(t.into_bytes());
        }
    }
    for caps in ["[1]", "\"x\"", "5", "\"{}\""] {
        g.push(
            format!(
                r#"{{"op":"up","node":"nodeA","seq":1,"serverId":"zed","since":0,"capabilities":{caps}}}"#
            )
            .into_bytes(),
        );
    }
    for node in bad_nodes {
        let node = serde_json::to_string(node).expect("a string");
        for t in [
            format!(
                r#"{{"op":"up","node":{node},"seq":1,"serverId":"mallory","since":0,"capabilities":{{}}}}"#
            ),
            format!(
                r#"{{"op":"snap","node":{node},"seq":1,"part":0,"last":true,"servers":[{{"serverId":"mallory","since":0,"capabilities":{{}}}}]}}"#
            ),
            format!(r#"{{"node":{node},"seq":0}}"#),
            format!(r#"{{"node":{node}}}"#),
            format!(r#"{{"node":{node},"want":"nodeA"}}"#),
        ] {
            g.push(t.into_bytes());
        }
    }
    g
}

/// The subjects a message on `sid` may come with on core `i` (some of them odd).
fn subjects_for(sid: u64, i: usize) -> Vec<String> {
    let n = node_name(i);
    match sid {
        SID_PRESENCE => vec!["c.presence.nodeA".into(), "c.presence.x".into()],
        SID_NODE => vec!["c.node.nodeB".into()],
        SID_HELLO => vec!["c.hello".into()],
        SID_MSG => vec![format!("c.msg.{n}")],
        SID_BCAST => vec!["c.bcast".into()],
        SID_INBOX => [
            "0",
            "999999",
            "18446744073709551615",
            "18446744073709551616",
            "abc",
            "-1",
            "",
            "1.x",
        ]
        .iter()
        .map(|r| format!("c.in.{n}.{r}"))
        .collect(),
        s if s == SID_FOLLOW_BASE + 1 => vec![format!("c.follow.{n}.{s}")],
        _ => vec!["c.whatever".into()],
    }
}

#[test]
fn garbage_on_every_subscription_never_panics_and_changes_nothing_visible() {
    let mut bus = Bus::new(3);
    let alice = bus.open(A, "alice");
    let bob = bus.open(B, "bob");
    let carol = bus.open(C, "carol");
    let replies: [Option<&str>; 5] = [
        None,
        Some("c.in.nodeB.424242"),
        Some("$JS.ACK.c_QUEUE.qzz.1.2.3.4.5"),
        Some("$JS.ACK.c_QUEUE.q616c696365.1.1.1.1.0"),
        Some("$JS.ACK.c_REGISTRY.f0.1.1.1.1.0"),
    ];
    let statuses = [None, Some(503), Some(408), Some(0)];
    let sids = [
        0,
        SID_PRESENCE,
        SID_NODE,
        SID_HELLO,
        SID_MSG,
        SID_BCAST,
        SID_INBOX,
        SID_FOLLOW_BASE + 1,
        8,
        u64::MAX,
    ];
    let garbage = garbage();
    let mut problems: Vec<String> = Vec::new();
    let mut k = 0usize;
    'all: for payload in &garbage {
        for &sid in &sids {
            k += 1;
            let reply = replies[k % replies.len()];
            let status = statuses[k % statuses.len()];
            let before = bus.visible();
            let bad_before = bus.bad_subjects.len();
            let shown = String::from_utf8_lossy(&payload[..payload.len().min(160)]).into_owned();
            for i in bus.all() {
                for subject in subjects_for(sid, i) {
                    let fed = &mut bus.cores[i].fed;
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        fed.nats_message(sid, &subject, reply, status, payload)
                    }));
                    if r.is_err() {
                        problems.push(format!(
                            "PANIC on core {i}, sid {sid}, subject {subject}, payload {shown:?}"
                        ));
                        break 'all;
                    }
                }
            }
            bus.pump();
            let diff = changes(&before, &bus.visible());
            if !diff.is_empty() {
                problems.push(format!(
                    "sid {sid}, payload {shown:?} changed:\n    {}",
                    diff.join("\n    ")
                ));
            }
            for i in bus.all() {
                let c = &mut bus.cores[i];
                if !c.frames.is_empty() || !c.closed.is_empty() || !c.other.is_empty() {
                    problems.push(format!(
                        "sid {sid}, payload {shown:?}: core {i} wrote {:?} closed {:?} other {:?}",
                        c.frames, c.closed, c.other
                    ));
                    c.frames.clear();
                    c.closed.clear();
                    c.other.clear();
                }
            }
            if bus.bad_subjects.len() > bad_before {
                problems.push(format!(
                    "sid {sid}, payload {shown:?}: published to invalid subjects {:?}",
                    &bus.bad_subjects[bad_before..]
                ));
            }
        }
    }
    // The cluster still works.
    if problems.is_empty() {
        bus.send(A, alice, Some(1), "bob", "1");
        let f = bus.frames(B, bob);
        let d = delivers(&f);
        assert_eq!(d.len(), 1, "{f:?}");
        bus.text(B, bob, &answer(&d[0]["id"], "2"));
        let f = bus.frames(A, alice);
        assert_eq!(f[0]["result"]["status"], "delivered", "{f:?}");
        bus.send(C, carol, Some(2), "alice", "1");
        assert_eq!(delivers(&bus.frames(A, alice)).len(), 1);
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn a_server_announced_by_a_node_id_that_is_not_valid_is_not_believed() {
    // Node ids are 1 to 32 of `A-Z a-z 0-9 - _` (FEDMCP_NODE_ID); "a b" can be no node's, and
    // `c.msg.a b` is no subject.
    let mut bus = Bus::new(2);
    let alice = bus.open(A, "alice");
    let up = r#"{"op":"up","node":"a b","seq":1,"serverId":"mallory","since":0,"capabilities":{}}"#;
    bus.cores[A]
        .fed
        .nats_message(SID_PRESENCE, "c.presence.x", None, None, up.as_bytes());
    bus.pump();
    let believed = is_remote(bus.presence(A, "mallory"));
    bus.send(A, alice, Some(1), "mallory", "1");
    let answered = bus.frames(A, alice);
    let timeout = bus.fed(A).cfg.delivery_timeout;
    bus.advance(&[A], timeout);
    let later = bus.frames(A, alice);
    assert!(
        !believed && answered.len() == 1 && bus.bad_subjects.is_empty(),
        "mallory online at node \"a b\": {believed}; alice's answer at once {answered:?}, \
         after the delivery timeout {later:?}; published to invalid subjects {:?}",
        bus.bad_subjects
    );
}

#[test]
fn extreme_sequence_numbers_from_the_bus_never_panic() {
    let mut bus = Bus::new(2);
    bus.open(A, "alice");
    // A presence snapshot part that claims node A's sequence is at its largest.
    let forged = r#"{"op":"snap","node":"nodeA","seq":18446744073709551615,"part":1,"last":true,"servers":[]}"#;
    bus.cores[B].fed.nats_message(
        SID_PRESENCE,
        "c.presence.nodeA",
        None,
        None,
        forged.as_bytes(),
    );
    bus.pump();
    // Node A's next presence change: B must not overflow computing the next sequence.
    let r = catch_unwind(AssertUnwindSafe(|| {
        bus.open(A, "dave");
    }));
    assert!(
        r.is_ok(),
        "B panicked on A's presence after a sequence number of u64::MAX"
    );
    bus.advance(&[A, B], Duration::from_millis(600));
    assert!(is_remote(bus.presence(B, "dave")));
    assert!(is_remote(bus.presence(B, "alice")));
}

// ---- with JetStream answering ----------------------------------------------------------

#[test]
fn with_jetstream_answering_the_cores_become_ready_and_still_route() {
    let mut bus = Bus::with(2, true, Config::default_for_tests);
    for i in bus.all() {
        assert_eq!(
            bus.fed(i).cluster.as_ref().map(|c| c.link),
            Some(Link::Ready),
            "core {i}"
        );
        assert!(bus.fed(i).cluster_ready());
    }
    let alice = bus.open(A, "alice");
    let bob = bus.open(B, "bob");
    // Each online server's queue feed: its consumer made, one pull open.
    let pulls = bus
        .log
        .iter()
        .filter(|m| m.subject.contains(".MSG.NEXT."))
        .count();
    assert_eq!(pulls, 2, "one pull per online server");
    bus.send(A, alice, Some(1), "bob", "{\"q\":1}");
    let f = bus.frames(B, bob);
    let d = delivers(&f);
    assert_eq!(d.len(), 1, "{f:?}");
    bus.text(B, bob, &answer(&d[0]["id"], "true"));
    let f = bus.frames(A, alice);
    assert_eq!(f[0]["result"]["status"], "delivered", "{f:?}");
    // A queued send to a server online nowhere goes to the queue stream; `queued` once
    // JetStream acknowledged it.
    bus.cores[A].fed.find_or_insert("zoe").expect("room");
    bus.send_unpumped(A, alice, Some(2), "zoe", "1");
    let text = r#"{"jsonrpc":"2.0","id":3,"method":"federation/send","params":{"to":"zoe","message":1,"queue":true}}"#;
    bus.cores[A].fed.on_text(alice, text);
    bus.pump();
    let f = bus.frames(A, alice);
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(f[0]["error"]["code"], -32002, "{f:?}");
    assert_eq!(f[1]["result"]["status"], "queued", "{f:?}");
    assert!(
        bus.log
            .iter()
            .any(|m| m.subject == format!("c.q.{}", fedmcp::proto::nats::token_hex("zoe")))
    );
}
