//! What waits: deliveries awaiting their recipient's answer, and answers awaiting the turn's
//! fsync.
//!
//! Owns the types of the core's two waiting tables: [`Pending`] (a delivery and who gets its
//! answer, [`ReplyTo`]), and [`Deferred`] (an answer that is a durability promise, released
//! by the commit). [`Reply`] is what a sender gets at once. Plain data, so `router`,
//! `queue`, `durable` and `control` share them without importing one another.

use crate::federation::action::Slot;
use crate::federation::action::{LinkId, RequestId, SessionId};
use crate::federation::registry::Queued;
use crate::proto::http::response::Resp;
use crate::proto::jsonrpc::RpcError;
use crate::timer::TimerId;
use std::ops::Range;
use std::time::Instant;

/// Why a recipient's unanswered deliveries are being settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Its session ended: it may come back.
    Offline,
    /// Its server is being removed.
    Removed,
}

/// Where the answer to a send goes.
#[derive(Debug, Clone)]
pub enum ReplyTo {
    /// A JSON-RPC request on a control session; `id` is its JSON text; `batch` when it was
    /// part of a batch whose array answer waits on it.
    Ws {
        session: SessionId,
        id: String,
        batch: Option<u64>,
    },
    /// `POST /v1/messages`, answered with `Action::Respond`.
    Http { req: RequestId },
    /// An MCP `tools/call` (§9) over Streamable HTTP: the JSON-RPC answer with request id
    /// `id` (its JSON text), answered with `Action::Respond`.
    Mcp { req: RequestId, id: String },
    /// An MCP `tools/call` over an MCP client's WebSocket (§9): answered with
    /// `Action::McpSend` on its connection.
    McpWs { link: LinkId, id: String },
    /// A send from another node of the cluster (§10): the outcome is published to
    /// `subject` (that node's reply subject).
    Remote { subject: String },
}

/// What the sender gets now.
#[derive(Debug)]
pub enum Reply {
    /// Nothing (a notification, or a response).
    None,
    /// An answer available at once: a result's JSON text, or an error.
    Now(Result<String, RpcError>),
    /// The answer comes later through the `ReplyTo`.
    Later,
}

#[derive(Debug)]
pub enum PendingKind {
    /// A direct send; `requeue` holds the message when the sender set `queue: true`, so a
    /// recipient lost before answering gets it from its queue later.
    Direct {
        reply_to: ReplyTo,
        msg_id: String,
        requeue: Option<Box<Queued>>,
    },
    /// A delivery out of the recipient's queue (identified by its queue sequence number).
    FromQueue { qseq: u64 },
    /// A delivery out of the cluster's queue stream (§10): acknowledged to JetStream with
    /// `ack` once answered; the sender gets `federation/delivered` when `notify`.
    FromStream {
        ack: String,
        msg_id: String,
        from: String,
        notify: bool,
    },
}

#[derive(Debug)]
pub struct Pending {
    pub recipient: SessionId,
    pub slot: Slot,
    pub started: Instant,
    pub timer: Option<TimerId>,
    pub kind: PendingKind,
}

/// Where a change's record sits in this turn's batch (`None`: nothing was written, e.g. a
/// memory-only proxy): an answer deferred on it can take it back out if the commit fails.
pub type Record = Option<Range<usize>>;

/// What is being written now: the first `len` bytes of the batch, and the answers that
/// wait on them (the answers deferred since wait on the commit after it).
#[derive(Debug, Default)]
pub struct Committing {
    pub len: usize,
    pub deferred: Vec<Deferred>,
    /// Its generation (`Federation::commit_gen` when it began).
    pub generation: u64,
    /// Recipients whose queued copies it makes durable (pumped once it is on disk).
    pub slots: Vec<crate::federation::action::Slot>,
}

/// An answer that waits for the turn's fsync.
#[derive(Debug)]
pub enum Deferred {
    /// `{"msgId","status":"queued"}` for the copy `qseq` in `slot`'s queue; `record` is its
    /// enqueue record in the batch.
    Queued {
        to: ReplyTo,
        body: String,
        slot: Slot,
        qseq: u64,
        record: Option<Range<usize>>,
    },
    /// An HTTP answer (registration, removal) to a request waiting for it; `record` is the
    /// change's record in the batch.
    Http {
        req: RequestId,
        resp: Resp,
        record: Option<Range<usize>>,
    },
    /// `federation/delivered` to `sender` about a queued copy whose removal is in the batch
    /// (not undone when a commit fails: the removal is retried, and this waits for it).
    Notify { sender: String, params: String },
}

impl Deferred {
    /// Its record's place in the batch moved `n` bytes towards the front (the bytes before
    /// it were written or taken out).
    pub fn shift_record(&mut self, n: usize) {
        if let Deferred::Queued {
            record: Some(r), ..
        }
        | Deferred::Http {
            record: Some(r), ..
        } = self
        {
            *r = r.start.saturating_sub(n)..r.end.saturating_sub(n);
        }
    }

    pub fn record(&self) -> Option<Range<usize>> {
        match self {
            Deferred::Queued { record, .. } | Deferred::Http { record, .. } => record.clone(),
            Deferred::Notify { .. } => None,
        }
    }
}
