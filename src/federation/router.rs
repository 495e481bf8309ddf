//! Federation semantics: send, deliver, answer, broadcast (contract §4, §6).
//!
//! Owns the life of a message from the moment a sender's `federation/send` (or `POST
//! /v1/messages`) is understood until its answer reaches the sender: routing to the online
//! recipient with `federation/deliver` (signed for it), matching the recipient's answer to the
//! delivery, delivery timeouts, `federation/delivered` for queued copies, broadcast, sender
//! signatures, and settling a recipient's deliveries when it goes away. A recipient's queue
//! (store-and-forward, TTLs, the bytes held for it) is `queue`'s.
//!
//! Invariants: every `Pending` entry has exactly one owner of its answer (`ReplyTo`: a
//! session's request, or an HTTP request answered with `Action::Respond`); a recipient's
//! deliveries are asked for on its one session in the order sent, so order per
//! sender→recipient pair holds; the `message` bytes are forwarded exactly as they arrived.
//! Part of the core: no socket, no clock.
//! Bounds: unsent bytes per session ([`Federation::unsent_bound`]), deliveries awaiting one
//! recipient ([`MAX_INFLIGHT_PER_RECIPIENT`]), and (through `queue`) the bytes held for one
//! recipient, so no copy is ever outside a bound.
use crate::federation::Federation;
use crate::federation::action::Slot;
use crate::federation::action::{Action, Answer, CoreTimer, SessionId};
use crate::federation::pending::Deferred;
use crate::federation::pending::{Gone, Pending, PendingKind, Reply, ReplyTo};
use crate::federation::registry::{Presence, Queued};
use crate::metrics::MsgResult;
use crate::proto::jsonrpc::{self, RpcError};
use crate::proto::jwt;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::time::Duration;

/// Deliveries one recipient may hold unanswered before new sends to it are refused
/// `recipient_overloaded`.
pub const MAX_INFLIGHT_PER_RECIPIENT: usize = 1024;

/// The longest `ttlMs` honoured (a century); longer is treated as this.
pub const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

#[derive(Deserialize)]
struct SendParams<'a> {
    #[serde(borrow)]
    to: Cow<'a, str>,
    #[serde(borrow)]
    message: &'a RawValue,
    #[serde(default)]
    queue: Option<bool>,
    #[serde(default, rename = "ttlMs")]
    ttl_ms: Option<u64>,
    #[serde(default, borrow)]
    sig: Option<Cow<'a, str>>,
}

/// The `federation/deliver` params; `msg_id` and `from` are of safe characters only.
fn deliver_params(msg_id: &str, from: &str, message: &str, sent_at: i64, sig: &str) -> String {
    let mut p = String::with_capacity(96 + msg_id.len() + from.len() + message.len() + sig.len());
    p.push_str("{\"msgId\":\"");
    p.push_str(msg_id);
    p.push_str("\",\"from\":\"");
    p.push_str(from);
    p.push_str("\",\"message\":");
    p.push_str(message);
    p.push_str(",\"sentAt\":");
    p.push_str(&sent_at.to_string());
    p.push_str(",\"sig\":\"");
    p.push_str(sig);
    p.push_str("\"}");
    p
}

/// `{"msgId", "status", "reply"|"error"}` from the recipient's answer.
pub(crate) fn outcome_json(msg_id: &str, outcome: Result<&str, &str>) -> String {
    let (status, key, v) = match outcome {
        Ok(r) => ("delivered", "reply", r),
        Err(e) => ("rejected", "error", e),
    };
    format!("{{\"msgId\":\"{msg_id}\",\"status\":\"{status}\",\"{key}\":{v}}}")
}

impl Federation {
    /// Handles `federation/send` (or `POST /v1/messages`) from `from`.
    /// `reply_to` is `None` for a notification.
    pub fn send(
        &mut self,
        from: &str,
        params: Option<&RawValue>,
        reply_to: Option<ReplyTo>,
    ) -> Reply {
        let is_request = reply_to.is_some();
        let r = self.route_send(from, params, reply_to);
        match r {
            Reply::Now(Err(ref e)) => {
                self.metrics.message(match e {
                    RpcError::UnknownServer => MsgResult::UnknownServer,
                    RpcError::ServerOffline => MsgResult::Offline,
                    RpcError::RecipientOverloaded => MsgResult::Overloaded,
                    RpcError::QueueFull => MsgResult::QueueFull,
                    RpcError::BadSignature => MsgResult::BadSignature,
                    _ => MsgResult::Invalid,
                });
                if !is_request {
                    return Reply::None;
                }
                r
            }
            r if !is_request => {
                drop(r);
                Reply::None
            }
            r => r,
        }
    }

    fn route_send(
        &mut self,
        from: &str,
        params: Option<&RawValue>,
        reply_to: Option<ReplyTo>,
    ) -> Reply {
        let Some(params) = params else {
            return Reply::Now(Err(RpcError::InvalidParams("params are required".into())));
        };
        let p: SendParams = match serde_json::from_str(params.get()) {
            Ok(p) => p,
            Err(e) => return Reply::Now(Err(RpcError::InvalidParams(e.to_string()))),
        };
        if p.to != "*" && !jwt::valid_server_id(&p.to) {
            return Reply::Now(Err(RpcError::InvalidParams(
                "`to` is not a valid serverId or \"*\"".into(),
            )));
        }
        let message = p.message.get();
        // Signature of the sender: msgId and from are empty strings (contract §6).
        match &p.sig {
            Some(sig) => {
                let key = self.signing_key(from);
                if !jwt::hmac_verify_b64(&key, &[b"\n\n", message.as_bytes()], sig) {
                    return Reply::Now(Err(RpcError::BadSignature));
                }
            }
            None if self.cfg.require_signed => return Reply::Now(Err(RpcError::BadSignature)),
            None => {}
        }
        if let Some(e) = self.registry.by_id_mut(from) {
            e.sent += 1;
        }
        let seq = self.next_seq();
        let msg_id = self.msg_id(seq);
        let sent_at = self.now.wall_ms;
        if p.to == "*" {
            let n = self.broadcast(from, &msg_id, message, sent_at);
            self.metrics.message(MsgResult::Broadcast);
            return Reply::Now(Ok(format!(
                "{{\"msgId\":\"{msg_id}\",\"status\":\"broadcast\",\"recipients\":{n}}}"
            )));
        }
        let Some(slot) = self.registry.find(&p.to) else {
            return Reply::Now(Err(RpcError::UnknownServer));
        };
        let queue = p.queue.unwrap_or(false);
        let is_request = reply_to.is_some();
        if let Some(Presence::Remote(n)) = self.registry.get(slot).map(|e| e.presence) {
            // Online on another node of the cluster: carried there (§10).
            self.count_received(slot);
            self.remote_send(n, &p.to, &msg_id, from, message, sent_at, queue, reply_to);
            return if is_request {
                Reply::Later
            } else {
                Reply::None
            };
        }
        // A TTL past a century means "no expiry" in effect; capping keeps every clock
        // conversion (Instant, ms on disk) in range.
        let expires = p
            .ttl_ms
            .map(|t| self.now.at + Duration::from_millis(t.min(MAX_TTL_MS)));
        let make_queued = |qseq: u64| Queued {
            seq: qseq,
            msg_id: msg_id.clone(),
            from: from.to_string(),
            message: message.to_string(),
            sent_at_ms: sent_at,
            expires,
            ttl_timer: None,
            inflight: None,
            commit_gen: 0,
            notify_sender: is_request,
        };
        match self.recipient_ready(slot, is_request) {
            Ok(conn) => {
                let Some(reply_to) = reply_to else {
                    let params = self.deliver_params_for(slot, &msg_id, from, message, sent_at);
                    self.ws_send(conn, jsonrpc::request(None, "federation/deliver", &params));
                    self.count_received(slot);
                    self.metrics.message(MsgResult::Forwarded);
                    return Reply::None;
                };
                let requeue = queue.then(|| Box::new(make_queued(seq)));
                if let Some(q) = &requeue
                    && !self.hold(slot, q.bytes())
                {
                    // The copy kept until the answer would go over what may be held for
                    // this recipient (§4).
                    return Reply::Now(Err(RpcError::RecipientOverloaded));
                }
                let params = self.deliver_params_for(slot, &msg_id, from, message, sent_at);
                let kind = PendingKind::Direct {
                    reply_to,
                    msg_id: msg_id.clone(),
                    requeue,
                };
                self.deliver(conn, slot, seq, &params, kind);
                Reply::Later
            }
            Err(online) => {
                if !queue {
                    return Reply::Now(Err(if online {
                        RpcError::RecipientOverloaded
                    } else {
                        RpcError::ServerOffline
                    }));
                }
                if self.cluster.is_some() {
                    // The cluster's queue stream holds it (§10).
                    let body = format!("{{\"msgId\":\"{msg_id}\",\"status\":\"queued\"}}");
                    let q = make_queued(seq);
                    return match self.cluster_enqueue(&p.to, &q, reply_to, body) {
                        Ok(()) if is_request => Reply::Later,
                        Ok(()) => Reply::None,
                        Err(e) => Reply::Now(Err(e)),
                    };
                }
                let record = match self.enqueue(slot, make_queued(seq)) {
                    Ok(record) => record,
                    Err(e) => return Reply::Now(Err(e)),
                };
                self.metrics.message(MsgResult::Queued);
                let body = format!("{{\"msgId\":\"{msg_id}\",\"status\":\"queued\"}}");
                // An online recipient with room may take it at once.
                self.pump(slot);
                match reply_to {
                    // `queued` is a promise: it goes out after the turn's fsync.
                    Some(to) if self.durable() => {
                        self.deferred.push(Deferred::Queued {
                            to,
                            body,
                            slot,
                            qseq: seq,
                            record,
                        });
                        Reply::Later
                    }
                    _ => Reply::Now(Ok(body)),
                }
            }
        }
    }

    /// The session of the member in `slot` when it can take an MCP call now (§9: offline
    /// `-32002`, over its bounds `-32004`).
    pub(crate) fn mcp_recipient(&self, slot: Slot) -> Result<SessionId, RpcError> {
        self.recipient_ready(slot, true).map_err(|online| {
            if online {
                RpcError::RecipientOverloaded
            } else {
                RpcError::ServerOffline
            }
        })
    }

    /// The recipient's session when it can take a delivery now; else whether it is online
    /// (overloaded) or not.
    pub(crate) fn recipient_ready(
        &self,
        slot: Slot,
        awaits_answer: bool,
    ) -> Result<SessionId, bool> {
        let Some(entry) = self.registry.get(slot) else {
            return Err(false);
        };
        let Some(session) = entry.presence.online() else {
            return Err(false);
        };
        let Some(sess) = self.session(session) else {
            return Err(false);
        };
        // Queued messages not yet written go first: a direct send must not overtake them.
        let backlog = entry.queue.has_waiting();
        let full = sess.unsent > self.unsent_bound()
            || (awaits_answer && sess.inflight >= MAX_INFLIGHT_PER_RECIPIENT);
        if backlog || full {
            Err(true)
        } else {
            Ok(session)
        }
    }

    pub(crate) fn deliver_params_for(
        &self,
        slot: Slot,
        msg_id: &str,
        from: &str,
        message: &str,
        sent_at: i64,
    ) -> String {
        let key = self
            .registry
            .get(slot)
            .map(|e| e.signing_key)
            .unwrap_or([0; 32]);
        let sig = jwt::hmac_b64(
            &key,
            &[
                msg_id.as_bytes(),
                b"\n",
                from.as_bytes(),
                b"\n",
                message.as_bytes(),
            ],
        );
        deliver_params(msg_id, from, message, sent_at, &sig)
    }

    pub(crate) fn count_received(&mut self, slot: Slot) {
        if let Some(e) = self.registry.get_mut(slot) {
            e.received += 1;
        }
    }

    /// Writes a `federation/deliver` request with id `seq` and records it as pending.
    pub(crate) fn deliver(
        &mut self,
        conn: SessionId,
        slot: Slot,
        seq: u64,
        params: &str,
        kind: PendingKind,
    ) {
        let timer = match kind {
            PendingKind::Direct { .. } => Some(self.timers.insert(
                self.now.at + self.cfg.delivery_timeout,
                CoreTimer::Delivery(seq),
            )),
            PendingKind::FromQueue { .. } | PendingKind::FromStream { .. } => None,
        };
        self.ws_send(
            conn,
            jsonrpc::request(Some(&seq.to_string()), "federation/deliver", params),
        );
        self.count_received(slot);
        if let Some(sess) = self.session_mut(conn) {
            sess.inflight += 1;
        }
        self.pending.insert(
            seq,
            Pending {
                recipient: conn,
                slot,
                started: self.now.at,
                timer,
                kind,
            },
        );
    }

    fn broadcast(&mut self, from: &str, msg_id: &str, message: &str, sent_at: i64) -> usize {
        let here = self.local_broadcast(from, msg_id, message, sent_at);
        here + self.remote_broadcast(from, msg_id, message, sent_at)
    }

    /// A broadcast to the servers online on this node, but `from`.
    pub(crate) fn local_broadcast(
        &mut self,
        from: &str,
        msg_id: &str,
        message: &str,
        sent_at: i64,
    ) -> usize {
        let bound = self.unsent_bound();
        let targets: Vec<(Slot, SessionId)> = self
            .registry
            .slots()
            .filter_map(|s| {
                let e = self.registry.get(s)?;
                if e.server_id == from {
                    return None;
                }
                let c = e.presence.online()?;
                (self.session(c)?.unsent <= bound).then_some((s, c))
            })
            .collect();
        let mut n = 0;
        for (slot, conn) in targets {
            let params = self.deliver_params_for(slot, msg_id, from, message, sent_at);
            if self.ws_send(conn, jsonrpc::request(None, "federation/deliver", &params)) {
                self.count_received(slot);
                n += 1;
            }
        }
        n
    }

    /// The recipient on session `conn` answered delivery `seq`.
    pub fn on_delivery_answer(
        &mut self,
        conn: SessionId,
        seq: u64,
        outcome: Result<&RawValue, &RawValue>,
    ) {
        match self.pending.get(&seq) {
            Some(p) if p.recipient == conn => {}
            _ => {
                log::debug!("session {}: answer to unknown delivery {seq}", conn.idx);
                return;
            }
        }
        let Some(p) = self.pending.remove(&seq) else {
            return;
        };
        self.unhold(&p);
        if let Some(t) = p.timer {
            self.timers.cancel(t);
        }
        if let Some(sess) = self.session_mut(conn) {
            sess.inflight = sess.inflight.saturating_sub(1);
        }
        self.metrics.observe_delivery(
            self.now
                .at
                .saturating_duration_since(p.started)
                .as_secs_f64(),
        );
        self.metrics.message(if outcome.is_ok() {
            MsgResult::Delivered
        } else {
            MsgResult::Rejected
        });
        let outcome = outcome.map(|r| r.get()).map_err(|e| e.get());
        match p.kind {
            PendingKind::Direct {
                reply_to, msg_id, ..
            } => self.answer_outcome(reply_to, &msg_id, outcome),
            PendingKind::FromStream {
                ack,
                msg_id,
                from,
                notify,
            } => self.stream_answered(p.slot, ack, &msg_id, &from, notify, Some(outcome)),
            PendingKind::FromQueue { qseq } => {
                if let Some(i) = self.find_queued(p.slot, qseq)
                    && let Some(q) = self.remove_queued(p.slot, i)
                {
                    let body = outcome_json(&q.msg_id, outcome);
                    self.notify_after_commit(q.from, body);
                }
                self.pump(p.slot);
            }
        }
    }

    /// A delivery's outcome to whoever waits: the sender's `{"msgId","status",...}`, an
    /// MCP call's answer (the member's, unchanged, §9), or another node's wait (§10).
    pub(crate) fn answer_outcome(
        &mut self,
        to: ReplyTo,
        msg_id: &str,
        outcome: Result<&str, &str>,
    ) {
        match to {
            ReplyTo::Mcp { req, id } => {
                self.metrics.mcp_request("tools/call", outcome.is_ok());
                let text = crate::federation::mcp::call_answer(&id, outcome);
                self.act(Action::Respond {
                    req,
                    resp: Answer::Mcp(text),
                });
            }
            ReplyTo::McpWs { link, id } => {
                self.metrics.mcp_request("tools/call", outcome.is_ok());
                let text = crate::federation::mcp::call_answer(&id, outcome);
                self.act(Action::McpSend { link, text });
            }
            ReplyTo::Remote { subject } => self.reply_outcome_remote(subject, outcome),
            to => {
                let body = outcome_json(msg_id, outcome);
                self.reply(to, Ok(body));
            }
        }
    }

    /// `federation/delivered` to a sender, if it is online (here or on another node).
    /// `federation/delivered` about a queued copy just taken out of its queue: with a state
    /// dir, once its removal is on disk (a sender told `delivered` or `expired` is never
    /// given the same message again after a crash).
    pub(crate) fn notify_after_commit(&mut self, sender: String, params: String) {
        if self.durable() {
            self.deferred.push(Deferred::Notify { sender, params });
        } else {
            self.notify_sender(&sender, params);
        }
    }

    pub(crate) fn notify_sender(&mut self, sender: &str, params: String) {
        let Some(e) = self.registry.by_id(sender) else {
            return;
        };
        if let Presence::Remote(n) = e.presence {
            return self.remote_notify(n, sender, params);
        }
        let Some(conn) = e.presence.session() else {
            return;
        };
        self.ws_send(
            conn,
            jsonrpc::request(None, "federation/delivered", &params),
        );
    }

    /// A direct delivery's answer did not come in time.
    pub fn on_delivery_timeout(&mut self, seq: u64) {
        let Some(p) = self.pending.remove(&seq) else {
            return;
        };
        self.unhold(&p);
        if let Some(sess) = self.session_mut(p.recipient) {
            sess.inflight = sess.inflight.saturating_sub(1);
        }
        self.metrics.message(MsgResult::Timeout);
        if let PendingKind::Direct { reply_to, .. } = p.kind {
            self.reply(reply_to, Err(RpcError::DeliveryTimeout));
        }
    }

    /// The session `conn` ended (`Gone::Offline`) or its server is being removed
    /// (`Gone::Removed`): its unanswered deliveries are settled. When it went offline, direct
    /// sends with `queue: true` go back to the queue (the sender is told `queued`), other
    /// direct sends fail `server_offline`, and queued deliveries become undelivered again.
    /// When it is removed, direct sends fail `unknown_server` (its queue is dropped next).
    pub fn settle_deliveries(&mut self, conn: SessionId, gone: Gone) {
        let seqs: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.recipient == conn)
            .map(|(s, _)| *s)
            .collect();
        let mut seqs = seqs;
        seqs.sort_unstable();
        for seq in seqs {
            let Some(p) = self.pending.remove(&seq) else {
                continue;
            };
            self.unhold(&p);
            if let Some(t) = p.timer {
                self.timers.cancel(t);
            }
            match p.kind {
                PendingKind::Direct { reply_to, .. } if gone == Gone::Removed => {
                    self.metrics.message(MsgResult::UnknownServer);
                    self.reply(reply_to, Err(RpcError::UnknownServer));
                }
                PendingKind::Direct {
                    reply_to,
                    msg_id,
                    requeue: Some(q),
                } if self.cluster.is_some() => {
                    let body = format!("{{\"msgId\":\"{msg_id}\",\"status\":\"queued\"}}");
                    let to = self.registry.get(p.slot).map(|e| e.server_id.clone());
                    let r = match to {
                        Some(to) => self.cluster_enqueue(&to, &q, Some(reply_to.clone()), body),
                        None => Err(RpcError::ServerOffline),
                    };
                    if let Err(e) = r {
                        self.reply(reply_to, Err(e));
                    }
                }
                PendingKind::Direct {
                    reply_to,
                    msg_id,
                    requeue: Some(q),
                } => {
                    let qseq = q.seq;
                    match self.enqueue(p.slot, *q) {
                        Ok(record) => {
                            self.metrics.message(MsgResult::Queued);
                            let body = format!("{{\"msgId\":\"{msg_id}\",\"status\":\"queued\"}}");
                            if self.durable() {
                                let slot = p.slot;
                                self.deferred.push(Deferred::Queued {
                                    to: reply_to,
                                    body,
                                    slot,
                                    qseq,
                                    record,
                                });
                            } else {
                                self.reply(reply_to, Ok(body));
                            }
                        }
                        Err(e) => self.reply(reply_to, Err(e)),
                    }
                }
                PendingKind::Direct { reply_to, .. } => {
                    self.metrics.message(MsgResult::Offline);
                    self.reply(reply_to, Err(RpcError::ServerOffline));
                }
                PendingKind::FromStream {
                    ack,
                    msg_id,
                    from,
                    notify,
                } => self.stream_answered(p.slot, ack, &msg_id, &from, notify, None),
                PendingKind::FromQueue { qseq } => {
                    // Undelivered again: its TTL applies again (already past: expires on
                    // the next turn instead of being delivered twice).
                    if let Some(i) = self.find_queued(p.slot, qseq)
                        && let Some(e) = self.registry.get_mut(p.slot)
                    {
                        e.queue.set_inflight(i, None);
                        if let (Some(at), None) = (e.queue[i].expires, e.queue[i].ttl_timer)
                            && let Some(timer) = e.queue.ttl_timer_mut(i)
                        {
                            *timer = Some(self.timers.insert(at, CoreTimer::Ttl(p.slot, qseq)));
                        }
                    }
                }
            }
        }
    }

    /// Sends an answer to whoever awaits it.
    pub fn reply(&mut self, to: ReplyTo, r: Result<String, RpcError>) {
        match to {
            ReplyTo::Ws {
                session: conn,
                id,
                batch: None,
            } => {
                let text = match r {
                    Ok(res) => jsonrpc::result(&id, &res),
                    Err(e) => jsonrpc::error(&id, &e),
                };
                self.ws_send(conn, text);
            }
            ReplyTo::Ws {
                session: conn,
                id,
                batch: Some(b),
            } => {
                let text = match r {
                    Ok(res) => jsonrpc::result(&id, &res),
                    Err(e) => jsonrpc::error(&id, &e),
                };
                let Some(sess) = self.session_mut(conn) else {
                    return;
                };
                let Some(batch) = sess.batch_mut(b) else {
                    return;
                };
                batch.push(text);
                batch.pending -= 1;
                if self.batch_within_bound(conn, b) {
                    self.finish_batch(conn, b);
                }
            }
            ReplyTo::Remote { subject } => self.reply_remote(subject, r),
            ReplyTo::Http { req } => self.act(Action::Respond {
                req,
                resp: Answer::Rpc(r),
            }),
            ReplyTo::McpWs { link, id } => {
                self.metrics.mcp_request("tools/call", r.is_ok());
                let text = match r {
                    Ok(res) => jsonrpc::result(&id, &res),
                    Err(e) => jsonrpc::error(&id, &e),
                };
                self.act(Action::McpSend { link, text });
            }
            ReplyTo::Mcp { req, id } => {
                self.metrics.mcp_request("tools/call", r.is_ok());
                let text = match r {
                    Ok(res) => jsonrpc::result(&id, &res),
                    Err(e) => jsonrpc::error(&id, &e),
                };
                self.act(Action::Respond {
                    req,
                    resp: Answer::Mcp(text),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliver_params_keep_message_bytes() {
        let p = deliver_params("b-1", "alice", "{ \"x\" : 1.50 }", 7, "sig");
        assert_eq!(
            p,
            r#"{"msgId":"b-1","from":"alice","message":{ "x" : 1.50 },"sentAt":7,"sig":"sig"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["sentAt"], 7);
    }

    #[test]
    fn outcome_json_is_valid() {
        let v: serde_json::Value = serde_json::from_str(&outcome_json("m", Ok("[1]"))).unwrap();
        assert_eq!(v["status"], "delivered");
        assert_eq!(v["reply"][0], 1);
        let v: serde_json::Value =
            serde_json::from_str(&outcome_json("m", Err("{\"code\":1}"))).unwrap();
        assert_eq!(v["status"], "rejected");
        assert_eq!(v["error"]["code"], 1);
    }
}
