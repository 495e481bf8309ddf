//! Control sessions (contract §4): from the accepted upgrade to the close code.
//!
//! Owns what a session does with its text frames: JSON-RPC messages or batches (answered
//! with one array). It runs the welcome handshake (`connecting` until the server answers),
//! the rate limit (`-32029` with `retryAfterMs`, notifications dropped, abuse closed 1008),
//! the methods a server calls (`federation/send`, `servers`, `refresh`), and the session's
//! deadlines: welcome timeout (1008), heartbeat pings and the two-interval silence drop,
//! `tokenExpiring`, and token expiry (4002). The WebSocket framing (binary frames 1003,
//! oversize 1009, bad UTF-8 1007, protocol errors 1002) is the reactor's (`link`).
//!
//! Part of the core: it never touches a socket or a clock. Frames arrive as text with the
//! session's id; output is asked for with [`Federation::ws_send`] (an [`Action`]).

use crate::audit::Event;
use crate::clock::secs_to_ms;
use crate::federation::Federation;
use crate::federation::action::{Action, SessionId};
use crate::federation::pending::{Reply, ReplyTo};
use crate::federation::rate::Bucket;
use crate::federation::registry::Presence;
use crate::federation::session::{Batch, Session};
use crate::metrics::MsgResult;
use crate::proto::jsonrpc::{self, Frame, Msg, RpcError};
use crate::proto::jwt::{Claims, TokenType};
use serde_json::value::RawValue;
use std::net::SocketAddr;
use std::time::Instant;

/// "Far past its limit" (§4): a session is closed 1008 once more than this many × burst
/// messages were refused with no accepted message between them. A pipelined burst a few
/// times the burst size is answered `-32029` entry by entry and the session stays.
pub const ABUSE_REFUSALS_PER_BURST: u64 = 10;

/// A session the reactor (or another front end) opens for an authenticated peer.
#[derive(Debug)]
pub struct Opening<'a> {
    pub claims: &'a Claims,
    /// The connection's handshake deadline: the contract's handshake timeout covers the HTTP
    /// head, the upgrade and the welcome answer together.
    pub welcome_by: Instant,
    /// Whether the proxy dialled the server (§5).
    pub outbound: bool,
    pub peer: Option<SocketAddr>,
}

impl Federation {
    /// Turns an authenticated upgrade into a session: registry entry (created if the server
    /// is only known by its token), replacement of an older session (4003), the welcome.
    /// `Err` when the registry is full (no session exists then).
    pub fn open_session(
        &mut self,
        o: Opening,
    ) -> Result<SessionId, crate::federation::registry::RegistryError> {
        let claims = o.claims;
        let slot = self.find_or_insert(&claims.server_id)?;
        if let Some(old) = self.registry.get(slot).and_then(|e| e.presence.session()) {
            self.close_session(old, 4003, "replaced by a newer session");
        }
        let (now, now_ms) = (self.now.at, self.now.wall_ms);
        let welcome_id = self.next_seq();
        let hb = self.cfg.heartbeat;
        let session_name = self.session_name();
        let turn = self.now;
        let handshake = self.cfg.handshake_timeout;
        let id = self.insert_session(|id| Session {
            id,
            peer: o.peer,
            outbound: o.outbound,
            unsent: 0,
            timer: None,
            server_id: claims.server_id.clone(),
            slot,
            welcome: Some((welcome_id, o.welcome_by.min(now + handshake))),
            expires_at: turn.instant_of(claims.exp.saturating_mul(1000)),
            expires_at_secs: claims.exp,
            expiring_at: Some(Session::expiring_notice(turn, claims.iat, claims.exp)),
            last_rx: now,
            next_ping: now + hb,
            jti: claims.jti.clone(),
            refreshed_jti: None,
            refused_in_row: 0,
            inflight: 0,
            batches: Vec::new(),
            next_batch: 0,
        });
        let welcome = match self.session(id) {
            Some(sess) => format!(
                "{{\"serverId\":\"{}\",\"sessionId\":\"{}\",\"expiresAt\":{},\"heartbeatMs\":{},\"limits\":{{\"maxMessageBytes\":{},\"ratePerSec\":{},\"burst\":{}}}}}",
                sess.server_id,
                session_name,
                secs_to_ms(claims.exp),
                hb.as_millis(),
                self.cfg.max_message_bytes,
                self.cfg.rate_per_sec,
                self.cfg.rate_burst
            ),
            None => return Ok(id),
        };
        if let Some(e) = self.registry.get_mut(slot) {
            e.presence = Presence::Connecting(id);
            e.connected_at_ms = Some(now_ms);
            e.last_seen_at_ms = Some(self.now.wall_ms);
        }
        self.metrics.sessions_opened_total += 1;
        self.audit(Event::SessionOpened, Some(&claims.server_id), o.peer, None);
        self.ws_send(
            id,
            jsonrpc::request(
                Some(&welcome_id.to_string()),
                "federation/welcome",
                &welcome,
            ),
        );
        self.rearm_session(id);
        Ok(id)
    }

    /// Bookkeeping when a session ends for any reason (called once per session, with the
    /// state already out of the session table).
    pub(crate) fn end_session(&mut self, id: SessionId, sess: Session, reason: &str) {
        if let Some(e) = self.registry.get_mut(sess.slot)
            && e.presence.session() == Some(id)
        {
            e.presence = Presence::Offline;
            e.capabilities = e.reg_capabilities.clone();
            self.mcp_tools_may_change();
            self.announce(sess.slot, false);
        }
        self.settle_deliveries(id, crate::federation::pending::Gone::Offline);
        if sess.outbound {
            // A dialled session that ended is dialled again (§5).
            let phase = crate::federation::registry::OutPhase::Session;
            self.dial_failed(sess.slot, phase, format!("session ended: {reason}"));
        }
        self.audit(
            Event::SessionClosed,
            Some(&sess.server_id),
            sess.peer,
            Some(reason),
        );
    }

    /// Takes one message from `server`'s rate limit (contract §4, `FEDMCP_RATE_LIMIT`): the
    /// bucket lives in the server's registry entry, so its control session and its HTTP
    /// sends (`POST /v1/messages`) draw on the same one. A sender the registry has no room
    /// for shares one overflow bucket. `Err` says in how many ms a token will be there; a
    /// refusal is counted, and the first of a run is audited.
    pub fn take_rate(&mut self, server: &str, peer: Option<SocketAddr>) -> Result<(), u64> {
        let slot = self.find_or_insert(server).ok();
        self.take_rate_at(slot, server, peer)
    }

    /// [`Federation::take_rate`] for a server whose slot is known (its session's).
    fn take_rate_at(
        &mut self,
        slot: Option<crate::federation::action::Slot>,
        server: &str,
        peer: Option<SocketAddr>,
    ) -> Result<(), u64> {
        let now = self.now.at;
        let (rate, burst) = (self.cfg.rate_per_sec, self.cfg.rate_burst);
        let (r, first) = match slot.and_then(|s| self.registry.get_mut(s)) {
            Some(e) => {
                let r = e
                    .bucket
                    .get_or_insert_with(|| Bucket::new(rate, burst, now))
                    .take(now);
                let first = r.is_err() && !e.rate_limited;
                e.rate_limited = r.is_err();
                (r, first)
            }
            None => {
                let r = self
                    .overflow_bucket
                    .get_or_insert_with(|| Bucket::new(rate, burst, now))
                    .take(now);
                (r, false)
            }
        };
        if r.is_err() {
            self.metrics.rate_limited_total += 1;
            self.metrics.message(MsgResult::RateLimited);
            if first {
                self.audit(Event::RateLimited, Some(server), peer, Some("rate_limited"));
            }
        }
        r
    }

    /// Something arrived on the session (any frame): it is alive.
    pub fn session_heard(&mut self, id: SessionId) {
        let now = self.now.at;
        let Some(sess) = self.session_mut(id) else {
            return;
        };
        sess.last_rx = now;
        let slot = sess.slot;
        if let Some(e) = self.registry.get_mut(slot) {
            e.last_seen_at_ms = Some(self.now.wall_ms);
        }
    }

    /// Whether the session may be given more input now: its output is within its bound (a
    /// peer that does not read its answers is not served more).
    pub fn session_wants_input(&self, id: SessionId) -> bool {
        self.session(id)
            .is_some_and(|s| s.unsent <= self.unsent_bound())
    }

    /// A session's output was written out (`unsent` bytes are left): queued messages
    /// waiting for room are delivered.
    pub fn session_drained(&mut self, id: SessionId, unsent: usize) {
        let bound = self.unsent_bound();
        let Some(sess) = self.session_mut(id) else {
            return;
        };
        sess.unsent = unsent;
        let (slot, online) = (sess.slot, sess.is_online());
        let backlog = online
            && unsent <= bound
            && self
                .registry
                .get(slot)
                .is_some_and(|e| e.presence.online().is_some() && e.queue.has_waiting());
        if backlog {
            self.pump(slot);
        }
    }

    /// One text frame: a message or a batch.
    pub fn on_text(&mut self, id: SessionId, text: &str) {
        match jsonrpc::parse_frame(text) {
            Err(e) => {
                self.ws_send(id, jsonrpc::error("null", &e));
            }
            Ok(Frame::Single(text)) => {
                if let Reply::Now(r) = self.on_message(id, text, None) {
                    self.ws_send(id, r.unwrap_or_else(|e| jsonrpc::error("null", &e)));
                }
            }
            Ok(Frame::Batch(items)) => {
                let Some(sess) = self.session_mut(id) else {
                    return;
                };
                sess.next_batch += 1;
                let b = sess.next_batch;
                sess.batches.push((
                    b,
                    Batch {
                        reading: true,
                        ..Batch::default()
                    },
                ));
                for raw in items {
                    let r = self.on_message(id, raw.get(), Some(b));
                    let Some(batch) = self.session_mut(id).and_then(|s| s.batch_mut(b)) else {
                        return; // the session ended (or the batch was cut off) meanwhile
                    };
                    match r {
                        Reply::Now(r) => {
                            batch.push(r.unwrap_or_else(|e| jsonrpc::error("null", &e)))
                        }
                        Reply::Later => batch.pending += 1,
                        Reply::None => {}
                    }
                    if !self.batch_within_bound(id, b) {
                        return;
                    }
                }
                if let Some(batch) = self.session_mut(id).and_then(|s| s.batch_mut(b)) {
                    batch.reading = false;
                }
                self.finish_batch(id, b);
            }
        }
    }

    /// Sends a batch's answer array once it is complete.
    pub fn finish_batch(&mut self, id: SessionId, b: u64) {
        let Some(sess) = self.session_mut(id) else {
            return;
        };
        if !sess.batch(b).is_some_and(Batch::done) {
            return;
        }
        if let Some(answer) = sess.take_batch(b).and_then(|batch| batch.answer()) {
            self.ws_send(id, answer);
        }
    }

    /// A batch whose collected answers outgrow the session's output bound closes the session
    /// 1008: answering it would buffer more than the proxy allows for one peer.
    pub fn batch_within_bound(&mut self, id: SessionId, b: u64) -> bool {
        let hard = self.hard_output_bound();
        let over = self
            .session(id)
            .and_then(|s| s.batch(b))
            .is_some_and(|batch| batch.bytes > hard);
        if over {
            self.close_session(id, 1008, "batch answer over the output bound");
        }
        !over
    }

    /// One JSON-RPC message. `Now` carries the full response text (result or error).
    fn on_message(&mut self, id: SessionId, text: &str, batch: Option<u64>) -> Reply {
        self.metrics.ws_messages_in_total += 1;
        let msg = match jsonrpc::parse_msg(text) {
            Ok(m) => m,
            Err(inv) => {
                let rid = inv.id.map_or("null", |i| i.get());
                return Reply::Now(Ok(jsonrpc::error(rid, &inv.error)));
            }
        };
        let (rid, method, params) = match msg {
            Msg::Response { id: rid, outcome } => {
                self.on_response(id, rid, outcome);
                return Reply::None;
            }
            Msg::Request {
                id: rid,
                method,
                params,
            } => (Some(rid), method, params),
            Msg::Notification { method, params } => (None, method, params),
        };
        // Rate limit (requests and notifications; answers to the proxy are not counted).
        let Some(sess) = self.session(id) else {
            return Reply::None;
        };
        let from = sess.server_id.clone();
        let (slot, peer) = (sess.slot, sess.peer);
        let limited = self.take_rate_at(Some(slot), &from, peer);
        let abuse_after =
            ABUSE_REFUSALS_PER_BURST.saturating_mul(u64::from(self.cfg.rate_burst.max(1)));
        let Some(sess) = self.session_mut(id) else {
            return Reply::None;
        };
        match limited {
            Ok(()) => sess.refused_in_row = 0,
            Err(retry_after_ms) => {
                sess.refused_in_row = sess.refused_in_row.saturating_add(1);
                if sess.refused_in_row > abuse_after {
                    self.close_session(id, 1008, "rate limit abuse");
                    return Reply::None;
                }
                return match rid {
                    Some(rid) => Reply::Now(Ok(jsonrpc::error(
                        rid.get(),
                        &RpcError::RateLimited { retry_after_ms },
                    ))),
                    None => {
                        self.metrics.notifications_dropped_total += 1;
                        Reply::None
                    }
                };
            }
        }
        let answer = |r: Result<String, RpcError>| match (rid, r) {
            (None, _) => Reply::None,
            (Some(rid), Ok(res)) => Reply::Now(Ok(jsonrpc::result(rid.get(), &res))),
            (Some(rid), Err(e)) => Reply::Now(Ok(jsonrpc::error(rid.get(), &e))),
        };
        match method.as_ref() {
            "federation/send" => {
                let reply_to = rid.map(|r| ReplyTo::Ws {
                    session: id,
                    id: r.get().to_string(),
                    batch,
                });
                match self.send(&from, params, reply_to) {
                    Reply::Now(r) => answer(r),
                    other => other,
                }
            }
            "federation/servers" => answer(Ok(self.online_servers_json())),
            "federation/refresh" => {
                let r = self.refresh(id, &from);
                answer(Ok(r))
            }
            _ => answer(Err(RpcError::MethodNotFound)),
        }
    }

    fn online_servers_json(&self) -> String {
        let mut s = String::from("{\"servers\":[");
        let mut first = true;
        for e in self.registry.entries().filter(|e| e.presence.is_online()) {
            if !first {
                s.push(',');
            }
            first = false;
            s.push_str(&format!(
                "{{\"serverId\":\"{}\",\"capabilities\":{}}}",
                e.server_id, e.capabilities
            ));
        }
        s.push_str("]}");
        s
    }

    /// `federation/refresh`: a new token; the session now ends at its expiry.
    fn refresh(&mut self, id: SessionId, server_id: &str) -> String {
        let (token, claims) = self.mint(server_id, TokenType::Federation);
        let (iat, exp) = (claims.iat, claims.exp);
        let turn = self.now;
        let mut peer = None;
        if let Some(sess) = self.session_mut(id) {
            sess.refreshed_jti = claims.jti;
            sess.expires_at = turn.instant_of(exp.saturating_mul(1000));
            sess.expires_at_secs = exp;
            sess.expiring_at = Some(Session::expiring_notice(turn, iat, exp));
            peer = sess.peer;
        }
        self.audit(Event::TokenIssued, Some(server_id), peer, Some("refresh"));
        self.rearm_session(id);
        format!(
            "{{\"token\":\"{token}\",\"expiresAt\":{}}}",
            secs_to_ms(exp)
        )
    }

    /// An answer from the server: to the welcome, or to a delivery.
    fn on_response(
        &mut self,
        id: SessionId,
        rid: &RawValue,
        outcome: Result<&RawValue, &RawValue>,
    ) {
        let self_now = self.now.at;
        let Ok(n) = rid.get().parse::<u64>() else {
            log::debug!("session {}: answer with an id the proxy never sent", id.idx);
            return;
        };
        let Some(sess) = self.session_mut(id) else {
            return;
        };
        match sess.welcome {
            Some((w, _)) if w == n => {
                let slot = sess.slot;
                if outcome.is_err() {
                    self.close_session(id, 1008, "welcome refused");
                    return;
                }
                sess.welcome = None;
                let caps = outcome.ok().and_then(capabilities_of);
                if let Some(e) = self.registry.get_mut(slot) {
                    e.presence = Presence::Online(id);
                    if let Some(o) = e.outbound.as_mut() {
                        o.online_since = Some(self_now);
                        o.last_error = None;
                    }
                    if let Some(c) = caps {
                        e.capabilities = c;
                    }
                }
                self.mcp_tools_may_change();
                self.pump(slot);
                self.announce(slot, true);
            }
            _ => self.on_delivery_answer(id, n, outcome),
        }
    }

    /// A session's deadline fired: welcome, heartbeat, token expiry.
    pub fn session_timer(&mut self, id: SessionId, now: Instant) {
        let hb = self.cfg.heartbeat;
        let Some(sess) = self.session_mut(id) else {
            return;
        };
        if sess.welcome.is_some_and(|(_, d)| now >= d) {
            return self.close_session(id, 1008, "welcome not answered in time");
        }
        if now >= sess.last_rx + hb * 2 {
            return self.drop_session(id, "heartbeat: silent for two intervals");
        }
        if sess.expiring_at.is_some_and(|t| now >= t) {
            sess.expiring_at = None;
            let exp = sess.expires_at_secs;
            self.ws_send(
                id,
                jsonrpc::request(
                    None,
                    "federation/tokenExpiring",
                    &format!("{{\"expiresAt\":{}}}", secs_to_ms(exp)),
                ),
            );
        }
        let Some(sess) = self.session_mut(id) else {
            return;
        };
        if now >= sess.expires_at {
            return self.close_session(id, 4002, "token expired");
        }
        if now >= sess.next_ping {
            sess.next_ping = now + hb;
            self.act(Action::Ping { session: id });
        }
    }
}

/// The `capabilities` object of a welcome answer, as JSON text.
fn capabilities_of(result: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct WelcomeAnswer<'a> {
        #[serde(borrow)]
        capabilities: Option<&'a RawValue>,
    }
    let a: WelcomeAnswer = serde_json::from_str(result.get()).ok()?;
    let c = a.capabilities?;
    c.get().starts_with('{').then(|| c.get().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_taken_only_as_an_object() {
        let r: &RawValue = serde_json::from_str(r#"{"capabilities":{"tools":[]}}"#).unwrap();
        assert_eq!(capabilities_of(r).as_deref(), Some(r#"{"tools":[]}"#));
        let r: &RawValue = serde_json::from_str(r#"{"capabilities":5}"#).unwrap();
        assert_eq!(capabilities_of(r), None);
        let r: &RawValue = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(capabilities_of(r), None);
        let r: &RawValue = serde_json::from_str(r#"null"#).unwrap();
        assert_eq!(capabilities_of(r), None);
    }
}
