//! Cluster mode (contract §10): several proxies, one federation, over NATS and JetStream.
//!
//! Owns what this proxy knows of the cluster and says to it: the other nodes (heard within
//! [`NODE_TIMEOUT`]), where remote servers' sessions are ([`Presence::Remote`]), the joining
//! steps (streams, the registry's follower, catching up), the replies it waits for (JetStream
//! acknowledgements, API answers, remote deliveries' answers) each under a deadline, and the
//! queue feeds of its own online servers (one pull at a time from the queue stream, acked
//! only once the recipient answered). It speaks NATS only through [`NatsOut`] actions and
//! hears it through [`Federation::nats_message`]; the connection is the reactor's.
//!
//! Subjects (`C` the cluster name, `N` a node id; ids and jtis hex-encoded into one token):
//! `C.presence.N` session up/down/snapshot · `C.node.N` heartbeat · `C.hello` "send me your
//! snapshot" · `C.msg.N` deliveries and notices to node N · `C.bcast` broadcasts ·
//! `C.in.N.<rid>` replies to N · `C.follow.N` the registry follower's pushes (an exact subject:
//! JetStream sees no interest in a wildcard subscription) ·
//! `C.reg.s|d|r.<hex>` registry records (stream `C_REGISTRY`) · `C.q.<hex>` queued messages
//! (stream `C_QUEUE`, consumer `q<hex>` per recipient).
//!
//! Invariants: every wait has a deadline; a remote delivery is answered exactly once (reply,
//! timeout, or the link lost at its deadline); a queued message is acknowledged to
//! JetStream only after its recipient answered it. Part of the core: no socket, no clock,
//! and never a credential in a log (the core never sees one).

use crate::federation::Federation;
use crate::federation::action::{Action, Answer, CoreTimer, NatsOut, RequestId, SessionId, Slot};
use crate::federation::pending::{PendingKind, ReplyTo};
use crate::federation::registry::Presence;
use crate::metrics::MsgResult;
use crate::proto::http::response::Resp;
use crate::proto::jsonrpc::RpcError;
use crate::proto::nats::token_hex;
use crate::store::state::Op;
use crate::timer::TimerId;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Subscription ids: fixed, so a message is dispatched by the subscription it came on.
pub const SID_PRESENCE: u64 = 1;
pub const SID_NODE: u64 = 2;
pub const SID_HELLO: u64 = 3;
pub const SID_MSG: u64 = 4;
pub const SID_BCAST: u64 = 5;
pub const SID_INBOX: u64 = 6;
/// The registry follower's subscriptions: one per follower made, from here up (each follower
/// has its own deliver subject, so a stale one's pushes and heartbeats are never mistaken for
/// the current one's).
pub const SID_FOLLOW_BASE: u64 = 100;

/// How often a node says it is alive (and checks the others).
pub const TICK: Duration = Duration::from_millis(500);
/// A node not heard for this long is gone: its sessions are offline here.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(3000);
/// How long a JetStream API request or publish may wait for its answer.
pub const JS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one pull request for a queue feed stays open at the server. Short, because a pull
/// sent while its consumer has no leader (a NATS node just died) is lost without an answer,
/// and the next one is only sent after this (and 2 s) has passed.
pub const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Bytes unsent on the NATS link over which remote sends are refused `recipient_overloaded`
/// (the reactor reports the figure in `Federation::nats_unsent` after each flush).
pub const NATS_SOFT_LIMIT: usize = 8 * 1024 * 1024;
/// The registry follower's idle heartbeat (JetStream sends one when it has nothing to push);
/// silent three times as long, the follower is made again (its consumer may be gone with a
/// NATS node).
pub const FOLLOW_HEARTBEAT: Duration = Duration::from_secs(5);
/// The longest delivery timeout another node may ask for (a day, `FEDMCP_DELIVERY_TIMEOUT_MS`'s
/// maximum).
const MAX_REMOTE_TIMEOUT_MS: u64 = 86_400_000;
/// Replies awaited from NATS at once (remote deliveries, acknowledgements, API answers):
/// past it, remote sends are refused `-32004`.
pub const MAX_WAITS: usize = 65_536;
/// Resources of other nodes remembered (beyond, a `GET` of one more is a plain `404`).
pub const MAX_REMOTE_RESOURCES: usize = 65_536;
/// How long catching up with the registry may take before the follower is made again.
pub const CATCH_UP_LIMIT: Duration = Duration::from_secs(10);
/// The most nodes remembered (a bound on a table peers fill).
pub const MAX_NODES: usize = 256;
/// Servers per presence snapshot message (a snapshot is sent in parts).
pub const SNAPSHOT_PART: usize = 64;

/// Where the proxy is with the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// No NATS connection: local sessions only, `readyz` degraded.
    Down,
    /// Connected; making the streams, starting the follower, catching up.
    Joining(Step),
    /// Caught up with the registry: ready.
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    RegistryStream,
    QueueStream,
    Follow,
    CatchUp,
}

/// A node of the cluster, as heard.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub last_heard: Instant,
    /// Its presence sequence number as applied here (`None`: a snapshot is needed).
    pub seq: Option<u64>,
    pub alive: bool,
}

/// What waits for a reply on `C.in.N.<rid>`.
#[derive(Debug)]
enum Wait {
    Setup(Step),
    /// A registry change's acknowledgement, and the HTTP answer released by it.
    Registry {
        req: Option<(RequestId, Resp)>,
    },
    /// A queued message's acknowledgement, and the `queued` answer released by it.
    Queue {
        to: Option<ReplyTo>,
        body: String,
    },
    /// A delivery on another node.
    Delivery {
        to: ReplyTo,
        msg_id: String,
        started: Instant,
    },
    /// The durable consumer of a recipient's queue was made: pull from it.
    FeedCreate {
        server: String,
    },
    /// A pull for a recipient's queue (its status answers come here).
    Pull {
        server: String,
    },
    /// An answer nobody needs (a purge, a consumer deletion).
    Ignore,
}

#[derive(Debug)]
struct Waiting {
    what: Wait,
    timer: TimerId,
}

/// The registry follower's consumer: its name, the last consumer sequence applied, and
/// whether a push said nothing was left (caught up).
#[derive(Debug)]
struct Follower {
    name: String,
    last: u64,
    caught_up: bool,
}

/// A local recipient's queue feed.
#[derive(Debug, Default)]
struct Feed {
    /// The pull request open at the server, if any.
    pull: Option<u64>,
    /// A queued message delivered and awaiting the recipient's answer.
    busy: bool,
}

/// The cluster's state in the core.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub node: String,
    pub replicas: u32,
    pub link: Link,
    pub nodes: Vec<Node>,
    waits: HashMap<u64, Waiting>,
    next_rid: u64,
    presence_seq: u64,
    /// The registry follower (its consumer), once known.
    follower: Option<Follower>,
    feeds: HashMap<String, Feed>,
    /// A registry record published by the handler now running (its answer waits on it).
    published: Option<u64>,
    tick: Option<TimerId>,
    /// When the follower's subject last carried anything (a record or an idle heartbeat).
    follow_heard: Option<Instant>,
    /// The current follower's subscription id (0: none yet).
    follow_sid: u64,
    /// When catching up with the registry began (a catch-up that does not end is begun again).
    catchup_since: Option<Instant>,
    /// Resources stored on other nodes (§10: a `GET` here is `404 on_other_node`): (owner,
    /// name) → the node and who may read it. At most [`MAX_REMOTE_RESOURCES`].
    remote_resources: HashMap<(String, String), (String, crate::federation::resources::Readers)>,
}

impl Cluster {
    pub fn new(name: String, node: String, replicas: u32) -> Cluster {
        Cluster {
            name,
            node,
            replicas,
            link: Link::Down,
            nodes: Vec::new(),
            waits: HashMap::new(),
            next_rid: 1,
            presence_seq: 0,
            follower: None,
            feeds: HashMap::new(),
            published: None,
            tick: None,
            follow_heard: None,
            follow_sid: 0,
            catchup_since: None,
            remote_resources: HashMap::new(),
        }
    }

    fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.name)
    }

    pub fn registry_stream(&self) -> String {
        format!("{}_REGISTRY", self.name)
    }

    pub fn queue_stream(&self) -> String {
        format!("{}_QUEUE", self.name)
    }

    fn inbox(&self, rid: u64) -> String {
        format!("{}.in.{}.{rid}", self.name, self.node)
    }

    fn queue_subject(&self, server: &str) -> String {
        format!("{}.q.{}", self.name, token_hex(server))
    }

    /// Live nodes, this one included.
    pub fn live_nodes(&self) -> usize {
        1 + self.nodes.iter().filter(|n| n.alive).count()
    }

    pub fn node_name(&self, n: u16) -> Option<&str> {
        self.nodes.get(n as usize).map(|n| n.name.as_str())
    }

    fn node_ref(&self, name: &str) -> Option<u16> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .map(|i| i as u16)
    }

    /// Whether this node dials `server` (§5 in a cluster): the live node with the highest
    /// rendezvous hash of (node, server), so one node dials and another takes over when it
    /// goes.
    pub fn dials_here(&self, server: &str) -> bool {
        let score = |node: &str| {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(node.as_bytes());
            h.update(b"/");
            h.update(server.as_bytes());
            let d = h.finalize();
            u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
        };
        let mine = score(&self.node);
        self.nodes
            .iter()
            .filter(|n| n.alive)
            .all(|n| (score(&n.name), n.name.as_str()) < (mine, self.node.as_str()))
    }
}

#[derive(Deserialize)]
struct PresenceMsg<'a> {
    op: &'a str,
    node: String,
    seq: u64,
    #[serde(default, rename = "serverId")]
    server_id: Option<String>,
    #[serde(default)]
    since: i64,
    #[serde(default, borrow)]
    capabilities: Option<&'a RawValue>,
    #[serde(default)]
    last: bool,
    #[serde(default)]
    part: u32,
    #[serde(default, borrow)]
    servers: Vec<SnapEntry<'a>>,
}

#[derive(Deserialize)]
struct SnapEntry<'a> {
    #[serde(rename = "serverId")]
    server_id: String,
    since: i64,
    #[serde(borrow)]
    capabilities: &'a RawValue,
}

#[derive(Deserialize)]
struct Heartbeat {
    node: String,
    seq: u64,
    #[serde(default)]
    bye: bool,
}

#[derive(Deserialize)]
struct Hello {
    node: String,
    #[serde(default)]
    want: Option<String>,
}

#[derive(Deserialize)]
struct NodeMsg<'a> {
    t: &'a str,
    #[serde(default, rename = "msgId")]
    msg_id: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
    #[serde(default, rename = "sentAt")]
    sent_at: i64,
    #[serde(default)]
    queue: bool,
    #[serde(default, borrow)]
    params: Option<&'a RawValue>,
    /// The sender's proxy's delivery timeout (§10: it is the one that applies).
    #[serde(default, rename = "timeoutMs")]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
struct BcastMsg<'a> {
    origin: String,
    #[serde(rename = "msgId")]
    msg_id: String,
    from: String,
    #[serde(borrow)]
    message: &'a RawValue,
    #[serde(rename = "sentAt")]
    sent_at: i64,
}

#[derive(Deserialize)]
struct RemoteReply<'a> {
    /// `ok` (the recipient's result), `err` (its error), `answer` (a finished answer, e.g.
    /// `queued`) or `fail` (the proxy's error, `reason` in `v`).
    t: &'a str,
    /// The value; `None` when it was JSON `null` (a recipient may answer `"result": null`).
    #[serde(default, borrow)]
    v: Option<&'a RawValue>,
}

/// Where a resource is stored (`node` `None`: it is gone), a record of the registry stream.
#[derive(Deserialize)]
struct ResourceRecord {
    resource: ResourceWhere,
}

#[derive(Deserialize)]
struct ResourceWhere {
    owner: String,
    name: String,
    node: Option<String>,
    #[serde(default)]
    readers: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct JsError {
    #[serde(default)]
    err_code: u32,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct JsReply {
    #[serde(default)]
    error: Option<JsError>,
    #[serde(default)]
    num_pending: Option<u64>,
    #[serde(default)]
    name: Option<String>,
}

/// JetStream's "stream name already in use" (the stream exists, with another config).
const JS_STREAM_EXISTS: u32 = 10058;
/// JetStream's "maximum messages per subject exceeded" (a recipient's queue is full).
const JS_SUBJECT_FULL: u32 = 10077;

/// The metadata of a JetStream delivery, from its `$JS.ACK.…` reply subject.
#[derive(Debug, PartialEq, Eq)]
pub struct AckMeta<'a> {
    pub stream: &'a str,
    pub consumer: &'a str,
    pub cseq: u64,
    pub pending: u64,
}

/// Reads `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (and the
/// longer form with a domain and an account hash).
pub fn ack_meta(reply: &str) -> Option<AckMeta<'_>> {
    let t: Vec<&str> = reply.split('.').collect();
    if t.len() < 9 || t[0] != "$JS" || t[1] != "ACK" {
        return None;
    }
    let o = if t.len() >= 11 { 2 } else { 0 };
    Some(AckMeta {
        stream: t.get(2 + o)?,
        consumer: t.get(3 + o)?,
        cseq: t.get(6 + o)?.parse().ok()?,
        pending: t.get(8 + o)?.parse().ok()?,
    })
}

/// A node id as `FEDMCP_NODE_ID` allows it (a subject token): anything else from the bus is
/// not believed.
fn valid_node_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn hex_decode(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    crate::audit::push_json_str(&mut o, s);
    o
}

impl Federation {
    fn nats(&mut self, out: NatsOut) {
        self.act(Action::Nats(out));
    }

    fn publish(&mut self, subject: String, reply: Option<String>, payload: Vec<u8>) {
        self.metrics.nats_published_total += 1;
        self.nats(NatsOut::Publish {
            subject,
            reply,
            payload,
        });
    }

    /// Sends a request whose answer comes to `C.in.N.<rid>`, waiting at most `within`.
    fn request(&mut self, subject: String, payload: Vec<u8>, what: Wait, within: Duration) -> u64 {
        let Some(c) = self.cluster.as_mut() else {
            return 0;
        };
        let rid = c.next_rid;
        c.next_rid += 1;
        let inbox = c.inbox(rid);
        let timer = self
            .timers
            .insert(self.now.at + within, CoreTimer::Cluster(rid));
        if let Some(c) = self.cluster.as_mut() {
            c.waits.insert(rid, Waiting { what, timer });
        }
        self.publish(subject, Some(inbox), payload);
        rid
    }

    fn js_api(&mut self, api: &str, body: String, what: Wait) -> u64 {
        self.request(
            format!("$JS.API.{api}"),
            body.into_bytes(),
            what,
            JS_TIMEOUT,
        )
    }

    /// True when the cluster is joined and caught up (or there is no cluster).
    pub fn cluster_ready(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.link == Link::Ready)
    }

    /// True while a cluster proxy has no working NATS link (`readyz` says `degraded`).
    pub fn cluster_degraded(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.link == Link::Down)
    }

    /// The NATS connection is up (after `CONNECT`): subscribe, announce, and join.
    pub fn nats_connected(&mut self) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        c.link = Link::Joining(Step::RegistryStream);
        c.follower = None;
        let (name, node) = (c.name.clone(), c.node.clone());
        let subs = [
            (SID_PRESENCE, format!("{name}.presence.*")),
            (SID_NODE, format!("{name}.node.*")),
            (SID_HELLO, format!("{name}.hello")),
            (SID_MSG, format!("{name}.msg.{node}")),
            (SID_BCAST, format!("{name}.bcast")),
            (SID_INBOX, format!("{name}.in.{node}.>")),
        ];
        for (sid, subject) in subs {
            self.nats(NatsOut::Subscribe { sid, subject });
        }
        log::info!("cluster {name}: connected to NATS as node {node}; joining");
        self.metrics.nats_connected = true;
        self.publish_snapshot();
        let hello = format!("{{\"node\":{}}}", json_str(&node));
        self.publish(format!("{name}.hello"), None, hello.into_bytes());
        self.heartbeat();
        self.join_step(Step::RegistryStream);
        if self.cluster.as_ref().is_some_and(|c| c.tick.is_none()) {
            let t = self
                .timers
                .insert(self.now.at + TICK, CoreTimer::ClusterTick);
            if let Some(c) = self.cluster.as_mut() {
                c.tick = Some(t);
            }
        }
    }

    /// The NATS connection is gone: local sessions go on among themselves; remote servers
    /// are offline here until the link is back; waits end at their deadlines.
    pub fn nats_lost(&mut self, why: &str) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if c.link == Link::Down {
            return;
        }
        log::warn!(
            "cluster {}: NATS link lost ({why}); serving local sessions only",
            c.name
        );
        c.link = Link::Down;
        c.follower = None;
        for n in c.nodes.iter_mut() {
            n.alive = false;
            n.seq = None;
        }
        for f in c.feeds.values_mut() {
            f.pull = None;
        }
        self.metrics.nats_connected = false;
        self.forget_remote(None);
        self.reconsider_dialling();
    }

    /// Every remote session (of `node`, or of every node) is offline here now.
    fn forget_remote(&mut self, node: Option<u16>) {
        let slots: Vec<Slot> = self
            .registry
            .slots()
            .filter(|s| {
                self.registry.get(*s).is_some_and(|e| match e.presence {
                    Presence::Remote(n) => node.is_none_or(|x| x == n),
                    _ => false,
                })
            })
            .collect();
        for s in slots {
            self.set_remote_offline(s);
        }
    }

    fn set_remote_offline(&mut self, slot: Slot) {
        if let Some(e) = self.registry.get_mut(slot) {
            e.presence = Presence::Offline;
            e.capabilities = e.reg_capabilities.clone();
        }
        self.mcp_tools_may_change();
    }

    fn join_step(&mut self, step: Step) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        c.link = Link::Joining(step);
        let (name, replicas) = (c.name.clone(), c.replicas);
        let max_msg = self.cfg.max_message_bytes * 2 + 65_536;
        match step {
            Step::RegistryStream => {
                let stream = format!("{name}_REGISTRY");
                let body = format!(
                    "{{\"name\":\"{stream}\",\"subjects\":[\"{name}.reg.>\"],\"retention\":\"limits\",\"max_msgs_per_subject\":1,\"discard\":\"old\",\"storage\":\"file\",\"num_replicas\":{replicas},\"max_msg_size\":{max_msg}}}"
                );
                self.js_api(&format!("STREAM.CREATE.{stream}"), body, Wait::Setup(step));
            }
            Step::QueueStream => {
                let stream = format!("{name}_QUEUE");
                let body = format!(
                    "{{\"name\":\"{stream}\",\"subjects\":[\"{name}.q.>\"],\"retention\":\"workqueue\",\"max_msgs_per_subject\":{},\"discard\":\"new\",\"discard_new_per_subject\":true,\"storage\":\"file\",\"num_replicas\":{replicas},\"max_msg_size\":{max_msg}}}",
                    self.cfg.queue_max_messages
                );
                self.js_api(&format!("STREAM.CREATE.{stream}"), body, Wait::Setup(step));
            }
            Step::Follow => {
                let (api, body) = self.follower_request();
                self.js_api(&api, body, Wait::Setup(step));
            }
            Step::CatchUp => {}
        }
    }

    /// The JetStream API request that makes this node's registry follower: an ephemeral push
    /// consumer of every record, without acks, with idle heartbeats, delivering to a subject of
    /// its own (subscribed here; the previous follower's subscription is dropped).
    fn follower_request(&mut self) -> (String, String) {
        let Some(c) = self.cluster.as_mut() else {
            return (String::new(), String::new());
        };
        let old = c.follow_sid;
        c.follow_sid = old.max(SID_FOLLOW_BASE - 1) + 1;
        let sid = c.follow_sid;
        let (name, node) = (c.name.clone(), c.node.clone());
        if old >= SID_FOLLOW_BASE {
            self.nats(NatsOut::Unsubscribe { sid: old });
        }
        self.nats(NatsOut::Subscribe {
            sid,
            subject: format!("{name}.follow.{node}.{sid}"),
        });
        let stream = format!("{name}_REGISTRY");
        let body = format!(
            "{{\"stream_name\":\"{stream}\",\"config\":{{\"deliver_subject\":\"{name}.follow.{node}.{sid}\",\"deliver_policy\":\"all\",\"ack_policy\":\"none\",\"replay_policy\":\"instant\",\"inactive_threshold\":30000000000,\"idle_heartbeat\":{}}}}}",
            FOLLOW_HEARTBEAT.as_nanos()
        );
        (format!("CONSUMER.CREATE.{stream}"), body)
    }

    /// Makes the registry follower again (from the start of the stream), staying ready when
    /// ready: what it brings again is idempotent.
    fn refollow(&mut self) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if let Some(f) = c.follower.take() {
            // The old consumer goes (it would go by itself once nothing listens).
            let api = format!("CONSUMER.DELETE.{}.{}", c.registry_stream(), f.name);
            self.js_api(&api, String::new(), Wait::Ignore);
        }
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        c.follow_heard = Some(self.now.at);
        if c.link == Link::Ready {
            let (api, body) = self.follower_request();
            self.js_api(&api, body, Wait::Setup(Step::Follow));
        } else {
            self.join_step(Step::Follow);
        }
    }

    fn joined(&mut self) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        c.link = Link::Ready;
        log::info!(
            "cluster {}: caught up with the registry; ready ({} nodes live)",
            c.name,
            c.live_nodes()
        );
        // Queue feeds for the servers online here.
        let online: Vec<String> = self
            .registry
            .entries()
            .filter(|e| e.presence.online().is_some())
            .map(|e| e.server_id.clone())
            .collect();
        for s in online {
            self.feed_start(&s);
        }
        self.reconsider_dialling();
    }

    /// A message from NATS, on subscription `sid`.
    pub fn nats_message(
        &mut self,
        sid: u64,
        subject: &str,
        reply: Option<&str>,
        status: Option<u16>,
        payload: &[u8],
    ) {
        if self.cluster.is_none() {
            return;
        }
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        match sid {
            SID_PRESENCE => self.on_presence(text),
            SID_NODE => self.on_heartbeat(text),
            SID_HELLO => self.on_hello(text),
            SID_MSG => self.on_node_msg(text, reply),
            SID_BCAST => self.on_bcast(text),
            sid if self.cluster.as_ref().is_some_and(|c| c.follow_sid == sid) => {
                let now = self.now.at;
                if let Some(c) = self.cluster.as_mut() {
                    c.follow_heard = Some(now);
                }
                self.on_follow(reply, text)
            }
            SID_INBOX => match reply.filter(|r| r.starts_with("$JS.ACK.")) {
                Some(ack) => self.on_queued_msg(ack, text),
                None => self.on_inbox(subject, status, text),
            },
            _ => {}
        }
    }

    // ---- nodes and presence -------------------------------------------------------------

    fn heard(&mut self, name: &str) -> Option<u16> {
        let now = self.now.at;
        let c = self.cluster.as_mut()?;
        if name == c.node || !valid_node_name(name) {
            return None;
        }
        let n = match c.node_ref(name) {
            Some(n) => n,
            None => {
                if c.nodes.len() >= MAX_NODES {
                    // Reuse the slot of a dead node, if any.
                    let i = c.nodes.iter().position(|n| !n.alive)?;
                    c.nodes[i] = Node {
                        name: name.to_string(),
                        last_heard: now,
                        seq: None,
                        alive: false,
                    };
                    i as u16
                } else {
                    c.nodes.push(Node {
                        name: name.to_string(),
                        last_heard: now,
                        seq: None,
                        alive: false,
                    });
                    (c.nodes.len() - 1) as u16
                }
            }
        };
        let node = &mut c.nodes[n as usize];
        node.last_heard = now;
        if !node.alive {
            node.alive = true;
            log::info!("cluster: node {name} is live");
            self.reconsider_dialling();
        }
        Some(n)
    }

    fn on_heartbeat(&mut self, text: &str) {
        let Ok(h) = serde_json::from_str::<Heartbeat>(text) else {
            return;
        };
        if h.bye {
            if let Some(c) = self.cluster.as_ref()
                && let Some(n) = c.node_ref(&h.node)
            {
                self.node_gone(n);
            }
            return;
        }
        let Some(n) = self.heard(&h.node) else {
            return;
        };
        let known = self
            .cluster
            .as_ref()
            .and_then(|c| c.nodes.get(n as usize))
            .and_then(|x| x.seq);
        if known != Some(h.seq) {
            self.ask_snapshot(&h.node);
        }
    }

    fn ask_snapshot(&mut self, of: &str) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let body = format!(
            "{{\"node\":{},\"want\":{}}}",
            json_str(&c.node),
            json_str(of)
        );
        let subject = c.subject("hello");
        self.publish(subject, None, body.into_bytes());
    }

    fn on_hello(&mut self, text: &str) {
        let Ok(h) = serde_json::from_str::<Hello>(text) else {
            return;
        };
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        if h.node == c.node {
            return;
        }
        if h.want.as_deref().is_none_or(|w| w == c.node) {
            self.publish_snapshot();
        }
        self.heard(&h.node);
    }

    fn node_gone(&mut self, n: u16) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let Some(node) = c.nodes.get_mut(n as usize) else {
            return;
        };
        if !node.alive {
            return;
        }
        node.alive = false;
        node.seq = None;
        log::warn!(
            "cluster: node {} is gone; its sessions are offline",
            node.name
        );
        self.forget_remote(Some(n));
        self.reconsider_dialling();
    }

    /// Every local online session, announced in parts.
    fn publish_snapshot(&mut self) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let (subject, node, seq) = (
            c.subject(&format!("presence.{}", c.node)),
            c.node.clone(),
            c.presence_seq,
        );
        let entries: Vec<String> = self
            .registry
            .entries()
            .filter(|e| e.presence.online().is_some())
            .map(|e| {
                format!(
                    "{{\"serverId\":\"{}\",\"since\":{},\"capabilities\":{}}}",
                    e.server_id,
                    e.connected_at_ms.unwrap_or(0),
                    e.capabilities
                )
            })
            .collect();
        let parts: Vec<&[String]> = if entries.is_empty() {
            vec![&[]]
        } else {
            entries.chunks(SNAPSHOT_PART).collect()
        };
        let last = parts.len() - 1;
        for (i, p) in parts.iter().enumerate() {
            let body = format!(
                "{{\"op\":\"snap\",\"node\":{},\"seq\":{seq},\"part\":{i},\"last\":{},\"servers\":[{}]}}",
                json_str(&node),
                i == last,
                p.join(",")
            );
            self.publish(subject.clone(), None, body.into_bytes());
        }
    }

    /// Announces a local session up (welcome answered) or down.
    pub(crate) fn announce(&mut self, slot: Slot, up: bool) {
        let Some(server) = self.publish_presence(slot, up) else {
            return;
        };
        if up {
            self.feed_start(&server);
        } else if let Some(c) = self.cluster.as_mut() {
            c.feeds.remove(&server);
        }
    }

    /// Publishes a local session's `up` or `down`; the server's id when it was published.
    fn publish_presence(&mut self, slot: Slot, up: bool) -> Option<String> {
        let c = self.cluster.as_mut()?;
        if c.link == Link::Down {
            return None;
        }
        c.presence_seq += 1;
        let (seq, node) = (c.presence_seq, c.node.clone());
        let subject = c.subject(&format!("presence.{node}"));
        let e = self.registry.get(slot)?;
        let body = if up {
            format!(
                "{{\"op\":\"up\",\"node\":{},\"seq\":{seq},\"serverId\":\"{}\",\"since\":{},\"capabilities\":{}}}",
                json_str(&node),
                e.server_id,
                e.connected_at_ms.unwrap_or(0),
                e.capabilities
            )
        } else {
            format!(
                "{{\"op\":\"down\",\"node\":{},\"seq\":{seq},\"serverId\":\"{}\"}}",
                json_str(&node),
                e.server_id
            )
        };
        let server = e.server_id.clone();
        self.publish(subject, None, body.into_bytes());
        Some(server)
    }

    fn on_presence(&mut self, text: &str) {
        let Ok(p) = serde_json::from_str::<PresenceMsg>(text) else {
            return;
        };
        let Some(n) = self.heard(&p.node) else {
            return;
        };
        let expected = self
            .cluster
            .as_ref()
            .and_then(|c| c.nodes.get(n as usize))
            .and_then(|x| x.seq)
            .and_then(|s| s.checked_add(1));
        match p.op {
            "snap" => {
                if p.part == 0 {
                    self.forget_remote(Some(n));
                }
                for s in &p.servers {
                    self.remote_up(n, &s.server_id, s.since, s.capabilities.get());
                }
                if p.last
                    && let Some(node) = self
                        .cluster
                        .as_mut()
                        .and_then(|c| c.nodes.get_mut(n as usize))
                {
                    node.seq = Some(p.seq);
                }
            }
            "up" | "down" => {
                let Some(id) = p.server_id.as_deref() else {
                    return;
                };
                if p.op == "up" {
                    let caps = p.capabilities.map_or("{}", |c| c.get());
                    self.remote_up(n, id, p.since, caps);
                } else {
                    self.remote_down(n, id);
                }
                if let Some(node) = self
                    .cluster
                    .as_mut()
                    .and_then(|c| c.nodes.get_mut(n as usize))
                {
                    if expected == Some(p.seq) {
                        node.seq = Some(p.seq);
                    } else {
                        let name = node.name.clone();
                        node.seq = None;
                        self.ask_snapshot(&name);
                    }
                }
            }
            _ => {}
        }
    }

    fn remote_up(&mut self, n: u16, id: &str, since: i64, caps: &str) {
        if !crate::proto::jwt::valid_server_id(id) || !caps.starts_with('{') {
            return;
        }
        let Ok(slot) = self.find_or_insert(id) else {
            return;
        };
        let Some(e) = self.registry.get(slot) else {
            return;
        };
        let me = self
            .cluster
            .as_ref()
            .map(|c| c.node.clone())
            .unwrap_or_default();
        let them = self
            .cluster
            .as_ref()
            .and_then(|c| c.node_name(n))
            .unwrap_or("")
            .to_string();
        let held = (e.connected_at_ms.unwrap_or(0), e.presence);
        match held.1 {
            Presence::Online(local) | Presence::Connecting(local) => {
                if (since, them.as_str()) > (held.0, me.as_str()) {
                    // A newer session elsewhere replaces this one (§10).
                    self.close_session(local, 4003, "replaced by a newer session");
                } else {
                    // This one is newer: said again, so the other node closes its own (a
                    // connecting one is announced when its welcome is answered).
                    if matches!(held.1, Presence::Online(_)) {
                        self.publish_presence(slot, true);
                    }
                    return;
                }
            }
            Presence::Remote(m) if m != n => {
                let other = self
                    .cluster
                    .as_ref()
                    .and_then(|c| c.node_name(m))
                    .unwrap_or("")
                    .to_string();
                if (since, them.as_str()) < (held.0, other.as_str()) {
                    return; // An older session than the one known: its node will close it.
                }
            }
            _ => {}
        }
        if let Some(e) = self.registry.get_mut(slot) {
            e.presence = Presence::Remote(n);
            e.connected_at_ms = Some(since);
            e.capabilities = caps.to_string();
        }
        self.mcp_tools_may_change();
    }

    fn remote_down(&mut self, n: u16, id: &str) {
        if let Some(slot) = self.registry.find(id)
            && self
                .registry
                .get(slot)
                .is_some_and(|e| e.presence == Presence::Remote(n))
        {
            self.set_remote_offline(slot);
        }
    }

    fn heartbeat(&mut self) {
        self.say_alive(false);
    }

    /// Says goodbye (shutdown): the others forget this node's sessions at once.
    pub fn cluster_bye(&mut self) {
        self.say_alive(true);
    }

    /// `C.node.N`: this node's presence sequence number, or (`bye`) that it is leaving.
    fn say_alive(&mut self, bye: bool) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        if c.link == Link::Down {
            return;
        }
        let body = format!(
            "{{\"node\":{},\"seq\":{}{}}}",
            json_str(&c.node),
            c.presence_seq,
            if bye { ",\"bye\":true" } else { "" }
        );
        let subject = c.subject(&format!("node.{}", c.node));
        self.publish(subject, None, body.into_bytes());
    }

    /// The cluster's periodic timer: heartbeat, and nodes not heard from are gone.
    pub fn cluster_tick(&mut self) {
        let now = self.now.at;
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        c.tick = Some(self.timers.insert(now + TICK, CoreTimer::ClusterTick));
        let silent = c.follower.is_some()
            && c.follow_heard
                .is_some_and(|t| now.saturating_duration_since(t) > FOLLOW_HEARTBEAT * 3);
        let stuck = c.link == Link::Joining(Step::CatchUp)
            && c.catchup_since
                .is_some_and(|t| now.saturating_duration_since(t) > CATCH_UP_LIMIT);
        if silent || stuck {
            log::warn!(
                "cluster: the registry follower {}; following again",
                if silent {
                    "went silent"
                } else {
                    "did not catch up"
                }
            );
            self.refollow();
        }
        // A joining step with nothing in flight (its retry lost) is taken again.
        self.cluster_retry();
        // Queue feeds with no pull open and nothing delivered (their consumer could not be
        // made, or a pull failed) are started again.
        let idle: Vec<String> = self
            .cluster
            .as_ref()
            .filter(|c| c.link == Link::Ready)
            .map(|c| {
                c.feeds
                    .iter()
                    .filter(|(_, f)| f.pull.is_none() && !f.busy)
                    .map(|(s, _)| s.clone())
                    .collect()
            })
            .unwrap_or_default();
        for server in idle {
            self.feed_start(&server);
        }
        self.heartbeat();
        let dead: Vec<u16> = self
            .cluster
            .as_ref()
            .map(|c| {
                c.nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| {
                        n.alive && now.saturating_duration_since(n.last_heard) > NODE_TIMEOUT
                    })
                    .map(|(i, _)| i as u16)
                    .collect()
            })
            .unwrap_or_default();
        for n in dead {
            self.node_gone(n);
        }
        self.metrics.cluster_nodes = self.cluster.as_ref().map_or(1, |c| c.live_nodes());
    }

    /// The set of live nodes changed: who dials which server may have.
    fn reconsider_dialling(&mut self) {
        let slots: Vec<Slot> = self.registry.slots().collect();
        for s in slots {
            self.outbound_update(s);
        }
    }

    // ---- routing ------------------------------------------------------------------------

    /// Carries a send (or an MCP call) to `to` on node `n`. `reply_to` is `None` for a
    /// notification.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn remote_send(
        &mut self,
        n: u16,
        to: &str,
        msg_id: &str,
        from: &str,
        message: &str,
        sent_at: i64,
        queue: bool,
        reply_to: Option<ReplyTo>,
    ) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let Some(node) = c.node_name(n) else {
            return;
        };
        if self.nats_unsent > NATS_SOFT_LIMIT || c.waits.len() >= MAX_WAITS {
            // The NATS link is not keeping up, or too many answers are awaited from other
            // nodes: refused like a slow recipient (§4).
            self.metrics.remote_message("failed");
            if let Some(r) = reply_to {
                self.reply(r, Err(RpcError::RecipientOverloaded));
            }
            return;
        }
        let subject = c.subject(&format!("msg.{node}"));
        let body = format!(
            "{{\"t\":\"deliver\",\"msgId\":\"{msg_id}\",\"from\":\"{from}\",\"to\":\"{to}\",\"message\":{message},\"sentAt\":{sent_at},\"queue\":{queue},\"timeoutMs\":{}}}",
            self.cfg.delivery_timeout.as_millis()
        );
        self.metrics.remote_message("forwarded");
        match reply_to {
            None => self.publish(subject, None, body.into_bytes()),
            Some(r) => {
                let wait = Wait::Delivery {
                    to: r,
                    msg_id: msg_id.to_string(),
                    started: self.now.at,
                };
                let within = self.cfg.delivery_timeout;
                self.request(subject, body.into_bytes(), wait, within);
            }
        }
    }

    /// A delivery (or a `federation/delivered` notice) from another node for a server here.
    fn on_node_msg(&mut self, text: &str, reply: Option<&str>) {
        let Ok(m) = serde_json::from_str::<NodeMsg>(text) else {
            return;
        };
        let reply_to = reply.map(|r| ReplyTo::Remote {
            subject: r.to_string(),
        });
        match m.t {
            "delivered" => {
                if let Some(p) = m.params {
                    let p = p.get().to_string();
                    self.notify_sender(&m.to, p);
                }
            }
            "deliver" => {
                let Some(message) = m.message else { return };
                let ok = crate::proto::jwt::valid_server_id(&m.to)
                    && crate::proto::jwt::valid_server_id(&m.from)
                    && crate::federation::durable::safe_msg_id(&m.msg_id);
                if !ok {
                    return;
                }
                self.metrics.remote_message("received");
                // Past the sender's own deadline (which answers it), this node lets go too.
                let within = Duration::from_millis(
                    m.timeout_ms
                        .unwrap_or(self.cfg.delivery_timeout.as_millis() as u64)
                        .min(MAX_REMOTE_TIMEOUT_MS),
                ) + Duration::from_secs(1);
                let r = self.deliver_here(
                    &m.to,
                    &m.msg_id,
                    &m.from,
                    message.get(),
                    m.sent_at,
                    m.queue,
                    reply_to.clone(),
                    within,
                );
                if let (Err(e), Some(to)) = (r, reply_to) {
                    self.reply(to, Err(e));
                }
            }
            _ => {}
        }
    }

    /// Delivers a message from another node to a server whose session is here.
    #[allow(clippy::too_many_arguments)]
    fn deliver_here(
        &mut self,
        to: &str,
        msg_id: &str,
        from: &str,
        message: &str,
        sent_at: i64,
        queue: bool,
        reply_to: Option<ReplyTo>,
        within: Duration,
    ) -> Result<(), RpcError> {
        let slot = self.registry.find(to).ok_or(RpcError::ServerOffline)?;
        let session = self.recipient_ready(slot, reply_to.is_some());
        let session = match session {
            Ok(s) => s,
            Err(online) => {
                if queue && let Some(rt) = reply_to {
                    let body = format!("{{\"msgId\":\"{msg_id}\",\"status\":\"queued\"}}");
                    let q = self.queued_copy(msg_id, from, message, sent_at, None, true);
                    return self.cluster_enqueue(to, &q, Some(rt), body);
                }
                return Err(if online {
                    RpcError::RecipientOverloaded
                } else {
                    RpcError::ServerOffline
                });
            }
        };
        let params = self.deliver_params_for(slot, msg_id, from, message, sent_at);
        match reply_to {
            None => {
                self.ws_send(
                    session,
                    crate::proto::jsonrpc::request(None, "federation/deliver", &params),
                );
                self.count_received(slot);
            }
            Some(rt) => {
                let seq = self.next_seq();
                let requeue = queue.then(|| {
                    Box::new(self.queued_copy(msg_id, from, message, sent_at, None, true))
                });
                let kind = PendingKind::Direct {
                    reply_to: rt,
                    msg_id: msg_id.to_string(),
                    requeue,
                };
                self.deliver(session, slot, seq, &params, kind);
                // The sender's deadline, not this proxy's, bounds the wait.
                let at = self.now.at + within;
                if let Some(p) = self.pending.get_mut(&seq)
                    && let Some(t) = p.timer.take()
                {
                    self.timers.cancel(t);
                    p.timer = Some(self.timers.insert(at, CoreTimer::Delivery(seq)));
                }
            }
        }
        Ok(())
    }

    fn queued_copy(
        &self,
        msg_id: &str,
        from: &str,
        message: &str,
        sent_at: i64,
        expires: Option<Instant>,
        notify: bool,
    ) -> crate::federation::registry::Queued {
        crate::federation::registry::Queued {
            seq: 0,
            msg_id: msg_id.to_string(),
            from: from.to_string(),
            message: message.to_string(),
            sent_at_ms: sent_at,
            expires,
            ttl_timer: None,
            inflight: None,
            commit_gen: 0,
            notify_sender: notify,
        }
    }

    /// Broadcast to the servers of the other nodes; returns how many there are.
    pub(crate) fn remote_broadcast(
        &mut self,
        from: &str,
        msg_id: &str,
        message: &str,
        sent_at: i64,
    ) -> usize {
        let Some(c) = self.cluster.as_ref() else {
            return 0;
        };
        if c.link == Link::Down {
            return 0;
        }
        let n = self
            .registry
            .entries()
            .filter(|e| matches!(e.presence, Presence::Remote(_)) && e.server_id != from)
            .count();
        let body = format!(
            "{{\"origin\":{},\"msgId\":\"{msg_id}\",\"from\":\"{from}\",\"message\":{message},\"sentAt\":{sent_at}}}",
            json_str(&c.node)
        );
        let subject = c.subject("bcast");
        self.publish(subject, None, body.into_bytes());
        n
    }

    fn on_bcast(&mut self, text: &str) {
        let Ok(b) = serde_json::from_str::<BcastMsg>(text) else {
            return;
        };
        if self.cluster.as_ref().is_some_and(|c| c.node == b.origin)
            || !crate::proto::jwt::valid_server_id(&b.from)
            || !crate::federation::durable::safe_msg_id(&b.msg_id)
        {
            return;
        }
        self.local_broadcast(&b.from, &b.msg_id, b.message.get(), b.sent_at);
    }

    /// A reply to one of this node's requests, or a status (no responders, timeout).
    fn on_inbox(&mut self, subject: &str, status: Option<u16>, text: &str) {
        let Some(rid) = subject
            .rsplit('.')
            .next()
            .and_then(|r| r.parse::<u64>().ok())
        else {
            return;
        };
        let Some(w) = self.cluster.as_mut().and_then(|c| c.waits.remove(&rid)) else {
            return;
        };
        self.timers.cancel(w.timer);
        // A status without a body: 503 no responders, 408 / 404 / 409 for pulls.
        let reply: Result<&str, String> = match status {
            Some(s) if s >= 300 => Err(format!("NATS status {s}")),
            _ => Ok(text),
        };
        self.answered(rid, w.what, reply);
    }

    /// What waited on `rid` is answered (`Err`: a status or the deadline).
    fn answered(&mut self, rid: u64, what: Wait, reply: Result<&str, String>) {
        let js = |r: &str| serde_json::from_str::<JsReply>(r).ok();
        match what {
            Wait::Ignore => {}
            Wait::Setup(step) => {
                let outcome = match &reply {
                    Ok(r) => match js(r) {
                        Some(JsReply {
                            error: None,
                            num_pending,
                            name,
                        }) => Ok((num_pending, name)),
                        Some(JsReply { error: Some(e), .. })
                            if e.err_code == JS_STREAM_EXISTS && step != Step::Follow =>
                        {
                            Ok((None, None))
                        }
                        Some(JsReply { error: Some(e), .. }) => {
                            Err(format!("{} ({})", e.description, e.err_code))
                        }
                        None => Err("an unreadable JetStream answer".to_string()),
                    },
                    Err(e) => Err(e.clone()),
                };
                match outcome {
                    Ok((pending, name)) => match step {
                        Step::RegistryStream => self.join_step(Step::QueueStream),
                        Step::QueueStream => self.join_step(Step::Follow),
                        Step::Follow => {
                            let now = self.now.at;
                            let ready =
                                self.cluster.as_ref().is_some_and(|c| c.link == Link::Ready);
                            let mut caught_up = pending.unwrap_or(0) == 0;
                            if let Some(c) = self.cluster.as_mut() {
                                c.follow_heard = Some(now);
                                // Pushes may come before this answer: the follower adopted
                                // from them is this consumer, or the pushes were another's.
                                match (&c.follower, name) {
                                    (Some(f), Some(n)) if f.name == n => caught_up |= f.caught_up,
                                    (Some(_), _) => {
                                        log::warn!(
                                            "cluster: pushes from an unknown follower; following again"
                                        );
                                        self.refollow();
                                        return;
                                    }
                                    (None, n) => {
                                        c.follower = n.map(|name| Follower {
                                            name,
                                            last: 0,
                                            caught_up: false,
                                        })
                                    }
                                }
                                if ready {
                                    return;
                                }
                                c.link = Link::Joining(Step::CatchUp);
                                c.catchup_since = Some(now);
                            }
                            if caught_up {
                                self.joined();
                            }
                        }
                        Step::CatchUp => {}
                    },
                    Err(e) => {
                        log::warn!("cluster: joining failed at {step:?}: {e}; trying again");
                        // Again after a pause, through the tick.
                        if let Some(c) = self.cluster.as_mut()
                            && c.link != Link::Down
                        {
                            c.link = Link::Joining(step);
                            let t = self.timers.insert(
                                self.now.at + Duration::from_secs(1),
                                CoreTimer::ClusterRetry,
                            );
                            let _ = t;
                        }
                    }
                }
            }
            Wait::Registry { req } => {
                let ok = matches!(&reply, Ok(r) if js(r).is_some_and(|j| j.error.is_none()));
                if !ok {
                    log::warn!(
                        "cluster: a registry change was not acknowledged by JetStream ({})",
                        match &reply {
                            Ok(r) => js(r)
                                .and_then(|j| j.error)
                                .map_or("unreadable answer".to_string(), |e| e.description),
                            Err(e) => e.clone(),
                        }
                    );
                }
                if let Some((req, resp)) = req {
                    let resp = if ok {
                        resp
                    } else {
                        Resp::error(
                            503,
                            "cluster_unavailable",
                            "JetStream did not acknowledge the change; try again",
                        )
                    };
                    self.act(Action::Respond {
                        req,
                        resp: Answer::Http(resp),
                    });
                }
            }
            Wait::Queue { to, body } => {
                let r = match &reply {
                    Ok(r) => match js(r) {
                        Some(JsReply { error: None, .. }) => Ok(body),
                        Some(JsReply { error: Some(e), .. }) if e.err_code == JS_SUBJECT_FULL => {
                            Err(RpcError::QueueFull)
                        }
                        _ => Err(RpcError::StorageFailed),
                    },
                    Err(_) => Err(RpcError::StorageFailed),
                };
                if r.is_ok() {
                    self.metrics.message(MsgResult::Queued);
                }
                if let Some(to) = to {
                    self.reply(to, r);
                }
            }
            Wait::Delivery {
                to,
                msg_id,
                started,
            } => {
                let r = match &reply {
                    Ok(text) => serde_json::from_str::<RemoteReply>(text).ok(),
                    Err(_) => None,
                };
                self.metrics
                    .observe_delivery(self.now.at.saturating_duration_since(started).as_secs_f64());
                match (r, &reply) {
                    (Some(r), _) if r.t == "ok" || r.t == "err" => {
                        let v = r.v.map_or("null", |v| v.get());
                        let outcome = if r.t == "ok" { Ok(v) } else { Err(v) };
                        self.metrics.remote_message(if outcome.is_ok() {
                            "delivered"
                        } else {
                            "rejected"
                        });
                        self.answer_outcome(to, &msg_id, outcome);
                    }
                    (Some(r), _) if r.t == "answer" => {
                        let a = r.v.map_or("null", |v| v.get()).to_string();
                        self.reply(to, Ok(a));
                    }
                    (Some(r), _) => {
                        let reason = r.v.map_or("", |v| v.get().trim_matches('"'));
                        let e = match reason {
                            "unknown_server" => RpcError::UnknownServer,
                            "recipient_overloaded" => RpcError::RecipientOverloaded,
                            "queue_full" => RpcError::QueueFull,
                            "delivery_timeout" => RpcError::DeliveryTimeout,
                            "storage_failed" => RpcError::StorageFailed,
                            _ => RpcError::ServerOffline,
                        };
                        self.metrics.remote_message("failed");
                        self.reply(to, Err(e));
                    }
                    (None, Err(why)) if why == "deadline" => {
                        self.metrics.remote_message("timeout");
                        self.metrics.message(MsgResult::Timeout);
                        self.reply(to, Err(RpcError::DeliveryTimeout));
                    }
                    (None, _) => {
                        // No node took it (503 no responders): its session is gone.
                        self.metrics.remote_message("failed");
                        self.reply(to, Err(RpcError::ServerOffline));
                    }
                }
            }
            Wait::FeedCreate { server } => {
                let ok = matches!(&reply, Ok(r) if js(r).is_some_and(|j| j.error.is_none()));
                if ok {
                    self.pull(&server);
                } else {
                    log::warn!(
                        "cluster: the queue consumer of {server} could not be made; retrying at the next tick"
                    );
                    if let Some(f) = self.cluster.as_mut().and_then(|c| c.feeds.get_mut(&server)) {
                        f.pull = None;
                    }
                }
            }
            Wait::Pull { server } => {
                // The pull ended without a message (expired, or an error): pull again while
                // the recipient is here and idle.
                let again = self
                    .cluster
                    .as_mut()
                    .and_then(|c| c.feeds.get_mut(&server))
                    .map(|f| {
                        if f.pull == Some(rid) {
                            f.pull = None;
                        }
                        !f.busy && f.pull.is_none()
                    })
                    .unwrap_or(false);
                if again
                    && reply
                        .as_ref()
                        .is_err_and(|e| e != "NATS status 408" && e != "deadline")
                {
                    // An error (consumer gone): make it again.
                    self.feed_start(&server);
                } else if again {
                    self.pull(&server);
                }
            }
        }
    }

    /// A delivery's outcome to another node's wait.
    pub(crate) fn reply_outcome_remote(&mut self, subject: String, outcome: Result<&str, &str>) {
        let body = match outcome {
            Ok(r) => format!("{{\"t\":\"ok\",\"v\":{r}}}"),
            Err(e) => format!("{{\"t\":\"err\",\"v\":{e}}}"),
        };
        self.publish(subject, None, body.into_bytes());
    }

    /// `federation/delivered` for a sender on node `n`.
    pub(crate) fn remote_notify(&mut self, n: u16, sender: &str, params: String) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let Some(node) = c.node_name(n) else {
            return;
        };
        let subject = c.subject(&format!("msg.{node}"));
        let body = format!("{{\"t\":\"delivered\",\"to\":\"{sender}\",\"params\":{params}}}");
        self.publish(subject, None, body.into_bytes());
    }

    /// Answers a remote sender's wait (`reply` for `ReplyTo::Remote`).
    pub(crate) fn reply_remote(&mut self, subject: String, r: Result<String, RpcError>) {
        let body = match r {
            Ok(a) => format!("{{\"t\":\"answer\",\"v\":{a}}}"),
            Err(e) => format!("{{\"t\":\"fail\",\"v\":\"{}\"}}", e.reason()),
        };
        self.publish(subject, None, body.into_bytes());
    }

    /// A wait's deadline.
    pub fn cluster_deadline(&mut self, rid: u64) {
        let Some(w) = self.cluster.as_mut().and_then(|c| c.waits.remove(&rid)) else {
            return;
        };
        self.answered(rid, w.what, Err("deadline".to_string()));
    }

    /// Joining failed at a step: try that step again (if still connected).
    pub fn cluster_retry(&mut self) {
        if let Some(Link::Joining(step)) = self.cluster.as_ref().map(|c| c.link)
            && step != Step::CatchUp
            && !self
                .cluster
                .as_ref()
                .is_some_and(|c| c.waits.values().any(|w| matches!(w.what, Wait::Setup(_))))
        {
            self.join_step(step);
        }
    }

    // ---- the registry -------------------------------------------------------------------

    /// Publishes a registry change to JetStream (cluster mode); the answer of the request
    /// being handled waits for its acknowledgement ([`Federation::cluster_answer`]).
    pub(crate) fn cluster_record(&mut self, op: &Op) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let subject = match op {
            Op::Register { id, .. } | Op::Rekey { id, .. } => {
                c.subject(&format!("reg.s.{}", token_hex(id)))
            }
            Op::Remove { id, .. } => c.subject(&format!("reg.d.{}", token_hex(id))),
            Op::Revoke { jti, .. } => c.subject(&format!("reg.r.{}", token_hex(jti))),
            Op::Enqueue { .. } | Op::Dequeue { .. } => return,
        };
        let Ok(body) = serde_json::to_vec(op) else {
            return;
        };
        let rid = self.request(subject, body, Wait::Registry { req: None }, JS_TIMEOUT);
        if let Some(c) = self.cluster.as_mut() {
            c.published = Some(rid);
        }
    }

    /// In cluster mode, an answer that changed the registry waits for JetStream: `None`
    /// then (it comes with [`Action::Respond`]); else the answer is given back.
    pub fn cluster_answer(&mut self, req: RequestId, resp: Resp) -> Option<Resp> {
        let Some(rid) = self.cluster.as_mut().and_then(|c| c.published.take()) else {
            return Some(resp);
        };
        match self.cluster.as_mut().and_then(|c| c.waits.get_mut(&rid)) {
            Some(w) if resp.status < 300 => {
                w.what = Wait::Registry {
                    req: Some((req, resp)),
                };
                None
            }
            _ => Some(resp),
        }
    }

    /// A registry record pushed by the follower (the same for every node, in stream order).
    fn on_follow(&mut self, reply: Option<&str>, text: &str) {
        let Some(meta) = reply.and_then(ack_meta) else {
            return;
        };
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let asked = c
            .waits
            .values()
            .any(|w| matches!(w.what, Wait::Setup(Step::Follow)));
        if c.follower.is_none() && asked && meta.cseq == 1 {
            // The consumer pushes before its creation is answered: adopt it (the answer
            // checks the name).
            c.follower = Some(Follower {
                name: meta.consumer.to_string(),
                last: 0,
                caught_up: false,
            });
        }
        let Some(f) = c.follower.as_mut() else {
            return;
        };
        if meta.consumer != f.name {
            return; // An earlier follower's push.
        }
        if meta.cseq != f.last + 1 {
            // A push was lost: follow again from the start (every record is idempotent).
            log::warn!("cluster: the registry follower missed records; following again");
            self.refollow();
            return;
        }
        f.last = meta.cseq;
        if meta.pending == 0 {
            f.caught_up = true;
        }
        match serde_json::from_str::<Op>(text) {
            Ok(op) => self.apply_followed(op),
            Err(e) => match serde_json::from_str::<ResourceRecord>(text) {
                Ok(r) => self.apply_resource(r.resource),
                Err(_) => log::warn!("cluster: an unreadable registry record skipped: {e}"),
            },
        }
        if meta.pending == 0
            && matches!(
                self.cluster.as_ref().map(|c| c.link),
                Some(Link::Joining(Step::CatchUp))
            )
        {
            self.joined();
        }
    }

    /// Applies a registry record from the stream (idempotent: this node's own records come
    /// back too).
    fn apply_followed(&mut self, op: Op) {
        if !crate::federation::durable::sane(&op) {
            return;
        }
        match op {
            Op::Register {
                id,
                endpoints,
                capabilities,
                epoch,
            } => {
                let Ok(slot) = self.find_or_insert(&id) else {
                    log::error!("cluster: the registry is full; {id} from the cluster not kept");
                    return;
                };
                self.set_epoch(Some(slot), epoch.max(1));
                let mut changed = false;
                if let Some(e) = self.registry.get_mut(slot) {
                    changed = !e.registered
                        || e.endpoints != endpoints.get()
                        || e.reg_capabilities != capabilities.get();
                    e.registered = true;
                    e.endpoints = endpoints.get().to_string();
                    if e.reg_capabilities != capabilities.get() && !e.presence.is_online() {
                        e.capabilities = capabilities.get().to_string();
                    }
                    e.reg_capabilities = capabilities.get().to_string();
                }
                if changed {
                    self.mcp_tools_may_change();
                }
                self.outbound_update(slot);
            }
            Op::Rekey { id, epoch } => {
                if let Ok(slot) = self.find_or_insert(&id) {
                    self.set_epoch(Some(slot), epoch);
                }
            }
            Op::Remove { id, at, epoch } => {
                let slot = self.registry.find(&id);
                let applies = slot
                    .and_then(|s| self.registry.get(s))
                    .is_some_and(|e| e.key_epoch <= epoch.max(1));
                match slot {
                    Some(slot) if applies => {
                        let _ = self.remove_entry(slot, at, None);
                    }
                    _ => {
                        let epoch = self
                            .registry
                            .by_id(&id)
                            .map_or(epoch, |e| e.key_epoch.max(epoch));
                        if self.registry.find(&id).is_none() {
                            self.registry.record_removal(&id, at, epoch);
                        }
                    }
                }
            }
            Op::Revoke { jti, until } => {
                let (now, skew) = (self.now.secs(), self.cfg.clock_skew_secs as i64);
                if until.saturating_add(skew) > now {
                    let _ = self.revocations.revoke(&jti, until, now, skew);
                    let sessions: Vec<SessionId> = self
                        .sessions()
                        .filter(|s| s.uses_jti(&jti))
                        .map(|s| s.id)
                        .collect();
                    for s in sessions {
                        self.close_session(s, 4001, "token revoked");
                    }
                }
            }
            Op::Enqueue { .. } | Op::Dequeue { .. } => {}
        }
    }

    // ---- store-and-forward ----------------------------------------------------------------

    /// Queues a message in the cluster's queue stream; `body` (`queued`) goes to `to` once
    /// JetStream acknowledged it.
    pub(crate) fn cluster_enqueue(
        &mut self,
        recipient: &str,
        q: &crate::federation::registry::Queued,
        to: Option<ReplyTo>,
        body: String,
    ) -> Result<(), RpcError> {
        let Some(c) = self.cluster.as_ref() else {
            return Err(RpcError::ServerOffline);
        };
        if c.link != Link::Ready {
            // Cut off from the cluster's store: not promised (§10).
            return Err(RpcError::ServerOffline);
        }
        let subject = c.queue_subject(recipient);
        let op = Op::Enqueue {
            to: recipient.to_string(),
            seq: 0,
            msg_id: q.msg_id.clone(),
            from: q.from.clone(),
            message: RawValue::from_string(q.message.clone())
                .map_err(|_| RpcError::InvalidParams("message".into()))?,
            sent_at: q.sent_at_ms,
            expires_at: q.expires.map(|at| self.now.wall_of(at)),
            notify: q.notify_sender,
        };
        let payload = serde_json::to_vec(&op).map_err(|_| RpcError::StorageFailed)?;
        self.request(subject, payload, Wait::Queue { to, body }, JS_TIMEOUT);
        Ok(())
    }

    /// A local server came online: make (or bind) its queue consumer and pull.
    fn feed_start(&mut self, server: &str) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if c.link != Link::Ready {
            return;
        }
        let f = c.feeds.entry(server.to_string()).or_default();
        f.busy = false;
        let hex = token_hex(server);
        let stream = c.queue_stream();
        let subject = c.queue_subject(server);
        let ack_wait = (self.cfg.delivery_timeout + Duration::from_secs(2)).as_nanos();
        let body = format!(
            "{{\"stream_name\":\"{stream}\",\"config\":{{\"durable_name\":\"q{hex}\",\"filter_subject\":\"{subject}\",\"ack_policy\":\"explicit\",\"ack_wait\":{ack_wait},\"max_ack_pending\":1,\"deliver_policy\":\"all\",\"max_deliver\":-1}}}}"
        );
        let rid = self.js_api(
            &format!("CONSUMER.DURABLE.CREATE.{stream}.q{hex}"),
            body,
            Wait::FeedCreate {
                server: server.to_string(),
            },
        );
        if let Some(f) = self.cluster.as_mut().and_then(|c| c.feeds.get_mut(server)) {
            f.pull = Some(rid);
        }
    }

    fn pull(&mut self, server: &str) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        if c.link != Link::Ready || !c.feeds.contains_key(server) {
            return;
        }
        let api = format!(
            "CONSUMER.MSG.NEXT.{}.q{}",
            c.queue_stream(),
            token_hex(server)
        );
        let body = format!("{{\"batch\":1,\"expires\":{}}}", PULL_EXPIRES.as_nanos());
        let rid = self.request(
            format!("$JS.API.{api}"),
            body.into_bytes(),
            Wait::Pull {
                server: server.to_string(),
            },
            PULL_EXPIRES + Duration::from_secs(2),
        );
        if let Some(f) = self.cluster.as_mut().and_then(|c| c.feeds.get_mut(server)) {
            f.pull = Some(rid);
        }
    }

    /// A queued message pulled from the stream for a recipient here.
    fn on_queued_msg(&mut self, ack: &str, text: &str) {
        let Some(meta) = ack_meta(ack) else { return };
        let Some(server) = meta.consumer.strip_prefix('q').and_then(hex_decode) else {
            return;
        };
        let ack = ack.to_string();
        // The pull that brought it is used up.
        let pull = self
            .cluster
            .as_mut()
            .and_then(|c| c.feeds.get_mut(&server))
            .and_then(|f| {
                f.busy = true;
                f.pull.take()
            });
        if let Some(rid) = pull
            && let Some(w) = self.cluster.as_mut().and_then(|c| c.waits.remove(&rid))
        {
            self.timers.cancel(w.timer);
        }
        let slot = self.registry.find(&server);
        let session = slot
            .and_then(|s| self.registry.get(s))
            .and_then(|e| e.presence.online());
        let (Some(slot), Some(session)) = (slot, session) else {
            // Its recipient left: back to the stream for whoever has it next.
            self.publish(ack, None, b"-NAK".to_vec());
            if let Some(c) = self.cluster.as_mut() {
                c.feeds.remove(&server);
            }
            return;
        };
        let Ok(Op::Enqueue {
            msg_id,
            from,
            message,
            sent_at,
            expires_at,
            notify,
            ..
        }) = serde_json::from_str::<Op>(text)
        else {
            log::warn!("cluster: an unreadable queued message for {server} dropped");
            self.publish(ack, None, b"+TERM".to_vec());
            self.feed_next(&server);
            return;
        };
        if expires_at.is_some_and(|e| e <= self.now.wall_ms) {
            self.publish(ack, None, b"+TERM".to_vec());
            self.metrics.message(MsgResult::Expired);
            if notify {
                let body = format!("{{\"msgId\":\"{msg_id}\",\"status\":\"expired\"}}");
                self.notify_sender(&from, body);
            }
            self.feed_next(&server);
            return;
        }
        let seq = self.next_seq();
        let params = self.deliver_params_for(slot, &msg_id, &from, message.get(), sent_at);
        let kind = PendingKind::FromStream {
            ack,
            msg_id,
            from,
            notify,
        };
        self.deliver(session, slot, seq, &params, kind);
    }

    /// The recipient answered a queued message (`Some(outcome)`), or its session ended
    /// before it did (`None`: the message goes back to the stream).
    pub(crate) fn stream_answered(
        &mut self,
        slot: Slot,
        ack: String,
        msg_id: &str,
        from: &str,
        notify: bool,
        outcome: Option<Result<&str, &str>>,
    ) {
        let server = self
            .registry
            .get(slot)
            .map(|e| e.server_id.clone())
            .unwrap_or_default();
        match outcome {
            Some(o) => {
                self.publish(ack, None, b"+ACK".to_vec());
                if notify {
                    let body = crate::federation::router::outcome_json(msg_id, o);
                    self.notify_sender(from, body);
                }
                self.feed_next(&server);
            }
            None => {
                self.publish(ack, None, b"-NAK".to_vec());
                if let Some(c) = self.cluster.as_mut() {
                    c.feeds.remove(&server);
                }
            }
        }
    }

    fn feed_next(&mut self, server: &str) {
        if let Some(f) = self.cluster.as_mut().and_then(|c| c.feeds.get_mut(server)) {
            f.busy = false;
            if f.pull.is_none() {
                self.pull(server);
            }
        }
    }

    /// A removed server's queue and consumer go too.
    pub(crate) fn cluster_drop_queue(&mut self, server: &str) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if c.link != Link::Ready {
            return;
        }
        c.feeds.remove(server);
        let stream = c.queue_stream();
        let subject = c.queue_subject(server);
        let hex = token_hex(server);
        self.js_api(
            &format!("STREAM.PURGE.{stream}"),
            format!("{{\"filter\":\"{subject}\"}}"),
            Wait::Ignore,
        );
        self.js_api(
            &format!("CONSUMER.DELETE.{stream}.q{hex}"),
            String::new(),
            Wait::Ignore,
        );
    }

    /// A resource was stored here (`Some`) or is gone (`None`): the other nodes are told
    /// (through the registry stream, so a node that joins later knows too).
    pub fn cluster_resource(
        &mut self,
        owner: &str,
        name: &str,
        readers: Option<&crate::federation::resources::Readers>,
    ) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        if c.link != Link::Ready {
            return;
        }
        let subject = c.subject(&format!("reg.x.{}.{}", token_hex(owner), token_hex(name)));
        let node = match readers {
            Some(_) => json_str(&c.node),
            None => "null".to_string(),
        };
        let readers = readers.map_or(
            "null".to_string(),
            crate::federation::resources::readers_json,
        );
        let body = format!(
            "{{\"resource\":{{\"owner\":\"{owner}\",\"name\":\"{name}\",\"node\":{node},\"readers\":{readers}}}}}"
        );
        self.request(subject, body.into_bytes(), Wait::Ignore, JS_TIMEOUT);
    }

    fn apply_resource(&mut self, r: ResourceWhere) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if !crate::proto::jwt::valid_server_id(&r.owner)
            || !crate::federation::resources::valid_name(&r.name)
        {
            return;
        }
        let key = (r.owner, r.name);
        match r.node {
            Some(n) if n != c.node => {
                if c.remote_resources.len() < MAX_REMOTE_RESOURCES
                    || c.remote_resources.contains_key(&key)
                {
                    c.remote_resources.insert(key, (n, r.readers));
                }
            }
            _ => {
                c.remote_resources.remove(&key);
            }
        }
    }

    /// The node holding a resource that is not here, when `server_id` may read it.
    pub fn resource_elsewhere(
        &self,
        owner: &str,
        name: &str,
        server_id: &str,
        admin: bool,
    ) -> Option<&str> {
        let c = self.cluster.as_ref()?;
        let (node, readers) = c
            .remote_resources
            .get(&(owner.to_string(), name.to_string()))?;
        let meta = crate::federation::resources::Meta {
            size: 0,
            sha256: String::new(),
            readers: readers.clone(),
        };
        meta.readable_by(owner, server_id, admin)
            .then_some(node.as_str())
    }

    /// Where a server's session is, for its registry entry's `"node"`.
    pub fn node_of(&self, presence: Presence) -> Option<&str> {
        let c = self.cluster.as_ref()?;
        match presence {
            Presence::Offline => None,
            Presence::Connecting(_) | Presence::Online(_) => Some(c.node.as_str()),
            Presence::Remote(n) => c.node_name(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_are_read() {
        let m = ack_meta("$JS.ACK.T_R.1Evq6R9v.1.2.1.1796152481875348416.1").unwrap();
        assert_eq!(
            m,
            AckMeta {
                stream: "T_R",
                consumer: "1Evq6R9v",
                cseq: 1,
                pending: 1
            }
        );
        let m = ack_meta("$JS.ACK.dom.acchash.S.qab.3.10.7.1796152481875348416.0.rand").unwrap();
        assert_eq!(
            m,
            AckMeta {
                stream: "S",
                consumer: "qab",
                cseq: 7,
                pending: 0
            }
        );
        assert!(ack_meta("$JS.ACK.S.c.1.2").is_none());
        assert!(ack_meta("x.y").is_none());
        assert!(ack_meta("$JS.ACK.S.c.1.2.x.4.5").is_none());
    }

    #[test]
    fn hex_round_trips() {
        for s in ["alice", "a.b:c-d_e", "ü"] {
            assert_eq!(hex_decode(&token_hex(s)).as_deref(), Some(s));
        }
        assert!(hex_decode("abc").is_none());
        assert!(hex_decode("zz").is_none());
    }

    #[test]
    fn one_live_node_dials_each_server() {
        let mut a = Cluster::new("c".into(), "a".into(), 1);
        let mut b = Cluster::new("c".into(), "b".into(), 1);
        let t = Instant::now();
        a.nodes.push(Node {
            name: "b".into(),
            last_heard: t,
            seq: None,
            alive: true,
        });
        b.nodes.push(Node {
            name: "a".into(),
            last_heard: t,
            seq: None,
            alive: true,
        });
        for s in ["s1", "s2", "s3", "s4", "s5", "s6"] {
            assert!(a.dials_here(s) != b.dials_here(s), "{s}");
        }
        b.nodes[0].alive = false;
        assert!(["s1", "s2", "s3"].iter().all(|s| b.dials_here(s)));
    }
}
