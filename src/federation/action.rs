//! What the core names and asks for: the ids of the things it does not own, its actions, and
//! its timers' keys.
//!
//! Owns [`SessionId`] (a session in the core's table), [`RequestId`] (an HTTP request a front
//! end answers later), [`LinkId`] (a dialling attempt's connection), [`Action`] (what the
//! reactor is to do, in order), [`Answer`], [`CoreTimer`], and the dialling requests
//! ([`DialRequest`], [`DialPlan`]). Plain data: it imports nothing of the core's behaviour,
//! so every core module can name these without a cycle.

use crate::proto::upgrade::ControlUrl;
use std::net::SocketAddr;
use std::time::Instant;

/// A registry position that stays valid only while the same entry occupies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    pub idx: u32,
    pub generation: u32,
}

/// A control session as the core knows it: an index in its session table and a generation,
/// so a handle kept by a pending delivery or a timer never reaches a newer session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId {
    pub idx: u32,
    pub generation: u32,
}

/// An HTTP request awaiting an answer, as the core knows it: an opaque number the front end
/// chose (the reactor uses its connection id) and gets back in [`Action::Respond`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

/// A dialling attempt's connection, as the core knows it: an opaque number the reactor chose
/// when it opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkId(pub u64);

/// What the core asks the reactor to do, in the order it is asked.
#[derive(Debug)]
pub enum Action {
    /// Write a text frame on a session.
    Send { session: SessionId, text: String },
    /// Write a ping on a session.
    Ping { session: SessionId },
    /// The session is over (the core has forgotten it): write a close frame with this code,
    /// then close the connection once the frame is out.
    Close {
        session: SessionId,
        code: u16,
        reason: String,
    },
    /// The session is over and its peer is gone silent: drop the connection now, no frame.
    Drop { session: SessionId, why: String },
    /// The answer to an HTTP request that was told it would come later.
    Respond { req: RequestId, resp: Answer },
    /// Resolve a name or open a connection for dialling (`dial`).
    Dial(crate::federation::action::DialRequest),
    /// Stop a dialling attempt's connection.
    StopDial { link: LinkId, why: String },
    /// Write a text frame to an MCP client's WebSocket session (§9).
    McpSend { link: LinkId, text: String },
    /// Publish or subscribe on the cluster's NATS connection (§10).
    Nats(NatsOut),
    /// Delete the files of these resources of `owner` (a removed server's; the core has
    /// already forgotten them).
    RemoveResources { owner: String, names: Vec<String> },
}

/// What the core asks of the NATS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsOut {
    Subscribe {
        sid: u64,
        subject: String,
    },
    Unsubscribe {
        sid: u64,
    },
    Publish {
        subject: String,
        reply: Option<String>,
        payload: Vec<u8>,
    },
}

/// An answer for an HTTP request.
#[derive(Debug)]
pub enum Answer {
    /// The outcome of a `POST /v1/messages`.
    Rpc(Result<String, crate::proto::jsonrpc::RpcError>),
    /// A finished HTTP answer (a registration or a removal after its fsync).
    Http(crate::proto::http::response::Resp),
    /// The JSON-RPC answer to an MCP request (§9), as its text.
    Mcp(String),
}

/// What a timer in the core's deadline structure stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreTimer {
    /// A session's nearest deadline (welcome, heartbeat, token notice and expiry).
    Session(SessionId),
    /// A delivery's answer timeout.
    Delivery(u64),
    /// A queued message's TTL.
    Ttl(Slot, u64),
    /// The next attempt to dial a server (§5).
    Dial(Slot),
    /// A cluster request's deadline (its reply id).
    Cluster(u64),
    /// The cluster's heartbeat and liveness check.
    ClusterTick,
    /// Joining the cluster again after a failed step.
    ClusterRetry,
}

/// What an attempt needs to become a session: decided by the core, carried by the
/// reactor's dialling connection.
#[derive(Debug, Clone)]
pub struct DialPlan {
    pub slot: Slot,
    pub url: ControlUrl,
    /// Our `Sec-WebSocket-Key`.
    pub key: String,
    /// The token presented (its claims bound the session like an inbound one's).
    pub claims: crate::proto::jwt::Claims,
    pub token: String,
    /// Connect + TLS + upgrade + welcome answer, like an inbound handshake.
    pub deadline: Instant,
}

/// What dialling asks the reactor to do (carried out by the `dial` module).
#[derive(Debug)]
pub enum DialRequest {
    /// Resolve `host` (every address, in the resolver's order); the answer comes back through
    /// `Federation::on_resolved(lookup, ...)`.
    Resolve {
        lookup: u64,
        host: String,
        port: u16,
    },
    /// Open a non-blocking connection to `addr` for this attempt and register it; then
    /// `Federation::dial_opened(slot, link)`, or `dial_failed(slot, OutPhase::Opening, why)`.
    Connect {
        addr: SocketAddr,
        plan: Box<DialPlan>,
    },
}
