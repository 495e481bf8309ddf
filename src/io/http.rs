//! An HTTP/1.1 connection's framing (contract §3): requests in order, answers in order.
//!
//! Owns request framing (head, then a `Content-Length` or chunked JSON body, keep-alive,
//! pipelining, `Connection: close`, `Expect: 100-continue`), the order "route and token on the
//! head, body only once authorised" (an unauthenticated socket costs at most its head), the
//! request deadlines (the whole request within the handshake timeout: `408`; keep-alive idle
//! timeout: silent close) and answers that wait (a send, a durable change).
//!
//! Bounds: a head is at most `MAX_HEAD_BYTES` (`431`), a JSON body at most
//! `FEDMCP_MAX_MESSAGE_BYTES` (`413`); no further request is read while an answer is owed
//! (pipelined requests wait in the socket, not in memory). Parsing is `proto::http`'s; what
//! a request means is the core's (`Federation::handle`), except `GET /v1/control`
//! (`upgrade`), resources' bodies (`data`) and `/metrics` (whose gauges count connections).
//! It works on the connection's buffers; the reactor moves them to and from the socket.

use crate::api::{Resp, Route, bearer, internal_error, rpc_error_resp};
use crate::io::conn::{ConnId, ConnState, HttpPhase};
use crate::io::proxy::{CLOSE_LINGER, Proxy};
use crate::proto::http::chunked::{ChunkedDecoder, Progress};
use crate::proto::http::parse::{self, BodyKind, Method, RequestHead};
use crate::proto::http::response;
use crate::proto::jsonrpc::RpcError;
use crate::proto::jwt;
use std::net::SocketAddr;
use std::time::Instant;

/// What a request turned into.
pub(crate) enum Outcome {
    Respond(Resp),
    /// A send awaiting its recipient: the answer comes through `http_async_answer`.
    Later,
    /// The connection became a control session.
    Upgraded,
    /// The handler wrote the head and the body streams from a file (`data`).
    Streaming,
}

/// Output owed on an HTTP connection above which no further pipelined request is processed
/// until the peer reads.
const HTTP_OUT_BOUND: usize = 256 * 1024;

impl Proxy {
    /// Bytes from the socket for an HTTP connection.
    pub fn http_input(&mut self, id: ConnId, data: &[u8]) {
        if let Some(conn) = self.conn_mut(id)
            && let ConnState::Http(h) = &mut conn.state
            && !matches!(h.phase, HttpPhase::LastAnswer)
        {
            // Once the connection is to close (an answer from the head to a request whose
            // body is not read), what still arrives is not kept.
            h.inbuf.extend_from_slice(data);
        }
        self.http_process(id);
    }

    /// Whether the loop may read more from this HTTP connection now.
    pub fn http_wants_input(&self, id: ConnId) -> bool {
        match self.conn(id) {
            Some(c) => match &c.state {
                ConnState::Http(h) => {
                    !matches!(
                        h.phase,
                        HttpPhase::Waiting { .. } | HttpPhase::Sending(_) | HttpPhase::LastAnswer
                    ) && c.unsent() <= HTTP_OUT_BOUND
                }
                _ => true,
            },
            None => false,
        }
    }

    /// Processes every complete request in the buffer, in order, until one is incomplete,
    /// asynchronous, or ends the connection.
    pub fn http_process(&mut self, id: ConnId) {
        let now = self.fed.now.at;
        loop {
            let handshake = self.fed.cfg.handshake_timeout;
            let Some(conn) = self.conn_mut(id) else {
                return;
            };
            let unsent = conn.unsent();
            let ConnState::Http(h) = &mut conn.state else {
                return;
            };
            if unsent > HTTP_OUT_BOUND {
                return;
            }
            if matches!(h.phase, HttpPhase::Idle) {
                if h.inbuf.is_empty() {
                    return;
                }
                // The first byte of a request: the whole of it is due within the handshake
                // timeout.
                h.phase = HttpPhase::Head;
                h.deadline = now + handshake;
            }
            let complete = match &mut h.phase {
                HttpPhase::Idle
                | HttpPhase::Waiting { .. }
                | HttpPhase::Sending(_)
                | HttpPhase::LastAnswer => return,
                HttpPhase::Upload(_) => {
                    if self.upload_progress(id) {
                        continue;
                    }
                    return;
                }
                HttpPhase::Head => {
                    if h.inbuf.is_empty() {
                        return;
                    }
                    match parse::parse_head(&h.inbuf) {
                        Ok(None) => return,
                        Err(e) => {
                            let status = e.status();
                            let r = Resp::error(status, e.code(), &e.to_string());
                            h.inbuf = Vec::new();
                            return self.respond(id, r, false, false);
                        }
                        Ok(Some((head, n))) => {
                            h.inbuf.drain(..n);
                            self.on_head(id, head);
                            continue;
                        }
                    }
                }
                HttpPhase::Body {
                    body,
                    chunked,
                    left,
                    ..
                } => {
                    let done = match chunked {
                        None => {
                            let take = (*left).min(h.inbuf.len() as u64) as usize;
                            body.extend_from_slice(&h.inbuf[..take]);
                            h.inbuf.drain(..take);
                            *left -= take as u64;
                            *left == 0
                        }
                        Some(dec) => match dec.decode(&h.inbuf, body, usize::MAX) {
                            Ok((used, p)) => {
                                h.inbuf.drain(..used);
                                matches!(p, Progress::Done)
                            }
                            Err(e) => {
                                let status = if matches!(
                                    e,
                                    crate::proto::http::chunked::ChunkError::TooLarge
                                ) {
                                    413
                                } else {
                                    400
                                };
                                let code = if status == 413 {
                                    "payload_too_large"
                                } else {
                                    "bad_request"
                                };
                                let r = Resp::error(status, code, &e.to_string());
                                return self.respond(id, r, false, false);
                            }
                        },
                    };
                    if !done {
                        return;
                    }
                    match std::mem::replace(&mut h.phase, HttpPhase::Head) {
                        HttpPhase::Body {
                            head, body, claims, ..
                        } => Some((*head, body, claims)),
                        _ => None,
                    }
                }
            };
            let Some((head, body, claims)) = complete else {
                return;
            };
            if !self.dispatch(id, &head, &body, claims) {
                return;
            }
        }
    }

    /// A complete request head (contract §3, "authentication comes before the body"): the
    /// route is found and its token checked before any byte of a body is read. A refused
    /// token is answered at once and, when a body was announced, the connection closes
    /// without reading it. A route that takes no token never has its body read either (an
    /// unauthenticated socket costs at most its head): it is answered from the head, and
    /// the connection closes if a body was announced. Only an authorised request may have
    /// its body read, `Expect: 100-continue` being answered then.
    pub(super) fn on_head(&mut self, id: ConnId, head: RequestHead) {
        self.fed.metrics.http_requests_total += 1;
        let Some(peer) = self.conn(id).map(|c| c.peer) else {
            return;
        };
        let has_body = !matches!(head.body, BodyKind::None | BodyKind::Length(0));
        let route = Route::of(head.method, &head.path);
        let claims = match route.auth() {
            None => None,
            Some(want) => {
                let query_token = match route {
                    Route::Control | Route::Mcp => head.query_param("token"),
                    _ => None,
                };
                let token = bearer(&head).or(query_token.as_deref());
                match self.fed.authenticate(token, want, peer) {
                    Ok(c) => {
                        if let Some(ConnState::Http(h)) = self.conn_mut(id).map(|c| &mut c.state) {
                            h.authenticated = true;
                        }
                        Some(c)
                    }
                    Err(e) => return self.answer_head(id, &head, Resp::auth(&e), has_body),
                }
            }
        };
        if let Route::Upload(_) = route {
            // Streamed to disk, not buffered: see `data`.
            return match claims {
                Some(c) => self.start_upload(id, head, c),
                None => self.answer_head(id, &head, internal_error(), has_body),
            };
        }
        if !has_body {
            self.dispatch(id, &head, &[], claims);
            return;
        }
        if claims.is_none() {
            // Nothing this route does needs the body of a peer that showed no token.
            if let Outcome::Respond(r) = self.route(id, peer, &head, &[], None) {
                self.answer_head(id, &head, r, true);
            }
            return;
        }
        let max_body = self.fed.cfg.max_message_bytes as u64;
        let (chunked, left) = match head.body {
            BodyKind::Length(len) if len > max_body => {
                let r = Resp::error(
                    413,
                    "payload_too_large",
                    "the request body is over FEDMCP_MAX_MESSAGE_BYTES",
                );
                return self.answer_head(id, &head, r, true);
            }
            BodyKind::Length(len) => (None, len),
            _ => (Some(ChunkedDecoder::new(max_body)), 0),
        };
        let cont = head.expect_continue;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        if let ConnState::Http(h) = &mut conn.state {
            h.phase = HttpPhase::Body {
                head: Box::new(head),
                body: Vec::new(),
                chunked,
                left,
                claims,
            };
            if cont {
                conn.out.extend_from_slice(response::CONTINUE);
                self.dirty.push(id);
            }
        }
    }

    /// Answers a request from its head alone; when it announced a body, the body is not read
    /// and the connection closes once the answer is out.
    pub(super) fn answer_head(&mut self, id: ConnId, head: &RequestHead, r: Resp, has_body: bool) {
        if has_body && let Some(ConnState::Http(h)) = self.conn_mut(id).map(|c| &mut c.state) {
            h.inbuf = Vec::new();
        }
        self.respond(
            id,
            r,
            head.keep_alive && !has_body,
            head.method == Method::Head,
        );
    }

    /// Routes a complete request and writes (or schedules) its answer. False when the
    /// connection stops processing requests for now (an answer is owed later, the
    /// connection became a session, or a download streams).
    pub(super) fn dispatch(
        &mut self,
        id: ConnId,
        head: &RequestHead,
        body: &[u8],
        claims: Option<jwt::Claims>,
    ) -> bool {
        let keep_alive = head.keep_alive;
        let head_only = head.method == Method::Head;
        let Some(peer) = self.conn(id).map(|c| c.peer) else {
            return false;
        };
        match self.route(id, peer, head, body, claims) {
            Outcome::Respond(r) => {
                self.respond(id, r, keep_alive, head_only);
                true
            }
            Outcome::Later => {
                if let Some(ConnState::Http(h)) = self.conn_mut(id).map(|c| &mut c.state) {
                    h.phase = HttpPhase::Waiting { keep_alive };
                }
                self.rearm(id);
                false
            }
            // Bytes after the upgrade request were handed to the session.
            Outcome::Upgraded => false,
            // The download continues as the socket drains; pipelined requests wait.
            Outcome::Streaming => {
                self.rearm(id);
                false
            }
        }
    }

    /// Writes an answer and moves the connection to its next request (or to closing).
    pub(super) fn respond(&mut self, id: ConnId, r: Resp, keep_alive: bool, head_only: bool) {
        let now_t = self.fed.now;
        let now = self.fed.now.at;
        let idle = self.fed.cfg.idle_timeout;
        let handshake = self.fed.cfg.handshake_timeout;
        let draining = self.fed.draining.is_some();
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let ConnState::Http(h) = &mut conn.state else {
            return;
        };
        let keep = keep_alive && !draining;
        let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        response::write_response(
            &mut conn.out,
            r.status,
            &headers,
            &r.body,
            head_only,
            keep,
            now_t.secs() as u64,
        );
        // The request is answered: the connection waits for the next one, or closes once
        // the answer is flushed.
        next_request(h, keep, now, idle, handshake);
        self.dirty.push(id);
        self.rearm(id);
    }

    /// The peer closed its side of an HTTP connection: what was asked is still answered, then
    /// the connection closes; with nothing owed it goes at once.
    pub fn http_peer_closed(&mut self, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let unsent = conn.unsent();
        let ConnState::Http(h) = &mut conn.state else {
            return;
        };
        match &mut h.phase {
            HttpPhase::Waiting { keep_alive } => *keep_alive = false,
            _ if unsent == 0 => self.drop_conn(id, "peer closed"),
            HttpPhase::Sending(s) => s.keep_alive = false,
            _ => {
                self.abandon_upload(id);
                if let Some(ConnState::Http(h)) = self.conn_mut(id).map(|c| &mut c.state) {
                    h.phase = HttpPhase::LastAnswer;
                }
            }
        }
    }

    /// The answer to a `POST /v1/messages` that waited for its recipient.
    pub fn http_async_answer(&mut self, id: ConnId, r: Result<String, RpcError>) {
        let resp = match r {
            Ok(body) => Resp::json(200, body),
            Err(e) => rpc_error_resp(&e),
        };
        self.http_finish(id, resp);
    }

    /// Writes the answer a waiting request was owed, and goes on with the connection.
    pub fn http_finish(&mut self, id: ConnId, resp: Resp) {
        let keep_alive = match self.conn(id).map(|c| &c.state) {
            Some(ConnState::Http(h)) => match h.phase {
                HttpPhase::Waiting { keep_alive } => keep_alive,
                _ => return,
            },
            _ => return,
        };
        self.respond(id, resp, keep_alive, false);
        self.resume.push(id);
    }

    /// An HTTP connection's deadline fired: idle keep-alive close, or `408`.
    pub fn http_timer(&mut self, id: ConnId, now: Instant) {
        let now_t = self.fed.now;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let ConnState::Http(h) = &mut conn.state else {
            return;
        };
        if now < h.deadline {
            return;
        }
        match h.phase {
            HttpPhase::Waiting { .. } => {}
            // A download whose reader stopped reading, or an upload whose writer stopped.
            HttpPhase::Sending(_) => self.drop_conn(id, "download stalled"),
            HttpPhase::Upload(_) => {
                self.abandon_upload(id);
                self.drop_conn(id, "upload stalled");
            }
            HttpPhase::Idle => self.drop_conn(id, "keep-alive idle timeout"),
            // The last answer was not read in time.
            HttpPhase::LastAnswer => self.drop_conn(id, "answer not read"),
            _ => {
                let r = Resp::error(
                    408,
                    "request_timeout",
                    "the request did not arrive within the handshake timeout",
                );
                let headers: Vec<(&str, &str)> =
                    r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let date = now_t.secs() as u64;
                response::write_response(&mut conn.out, 408, &headers, &r.body, false, false, date);
                // Closing: the past deadline cannot fire this answer again.
                let deadline = now + CLOSE_LINGER;
                conn.close_after_output(deadline);
                self.dirty.push(id);
            }
        }
    }
}

/// After an answer: the next request (`Idle`, or `Head` when its bytes are already here), or,
/// when the connection is not kept, `LastAnswer` until the flush closes it.
pub(crate) fn next_request(
    h: &mut crate::io::conn::HttpConn,
    keep: bool,
    now: Instant,
    idle: std::time::Duration,
    handshake: std::time::Duration,
) {
    if !keep {
        h.phase = HttpPhase::LastAnswer;
        h.deadline = now + idle;
    } else if h.inbuf.is_empty() {
        h.phase = HttpPhase::Idle;
        h.deadline = now + idle;
    } else {
        h.phase = HttpPhase::Head;
        h.deadline = now + handshake;
    }
}

impl Proxy {
    /// One request, its token already checked against [`Route::auth`] (`claims` is `Some`
    /// exactly when the route takes a token).
    fn route(
        &mut self,
        id: ConnId,
        peer: SocketAddr,
        head: &RequestHead,
        body: &[u8],
        claims: Option<jwt::Claims>,
    ) -> Outcome {
        let route = Route::of(head.method, &head.path);
        match (route, &claims) {
            (Route::Metrics, None) => {
                let text = self.fed.metrics.render(&self.gauges());
                Outcome::Respond(Resp {
                    status: 200,
                    headers: vec![(
                        "Content-Type",
                        "text/plain; version=0.0.4; charset=utf-8".into(),
                    )],
                    body: text.into_bytes(),
                })
            }
            (Route::Control, Some(c)) => self.upgrade(id, head, c),
            (Route::Mcp, Some(c)) => self.mcp_request(id, head, body, c),
            (Route::Resource(rest), Some(c)) => match self.resource_route(id, head, rest, c) {
                Some(r) => Outcome::Respond(r),
                None => Outcome::Streaming,
            },
            (route, claims) => {
                let req = Proxy::request_id(id);
                match self.fed.handle(req, route, peer, body, claims.as_ref()) {
                    Some(r) => Outcome::Respond(r),
                    None => Outcome::Later,
                }
            }
        }
    }
}

impl Proxy {
    /// The gauges `/metrics` shows: connections by state (a session's from the core) and
    /// the registry's totals.
    pub fn gauges(&self) -> crate::metrics::Gauges {
        let mut g = crate::metrics::Gauges {
            ready: self.fed.ready(),
            pending_deliveries: self.fed.pending.len(),
            ..crate::metrics::Gauges::default()
        };
        for (_, c) in self.conns.iter() {
            match &c.state {
                crate::io::conn::ConnState::Ws(ws) => {
                    let online = match ws.carries {
                        crate::io::conn::Carries::Control(s) => {
                            self.fed.session(s).is_some_and(|s| s.is_online())
                        }
                        crate::io::conn::Carries::Mcp(_) => true,
                    };
                    if online {
                        g.conns_online += 1;
                    } else {
                        g.conns_connecting += 1;
                    }
                }
                s => match s.label() {
                    "http" => g.conns_http += 1,
                    "connecting" => g.conns_connecting += 1,
                    _ => g.conns_closing += 1,
                },
            }
        }
        for e in self.fed.registry.entries() {
            g.servers_registered += 1;
            g.queue_messages += e.queue.len();
            if e.presence.is_online() {
                g.servers_online += 1;
            }
        }
        g
    }
}

impl Proxy {
    /// `/mcp` over Streamable HTTP (§9): `POST` one JSON-RPC message, `DELETE` a session,
    /// `GET` refused `405` (no server-initiated stream is offered). What a message means is
    /// the core's (`Federation::mcp_http`); this is the transport's status codes and headers.
    fn mcp_request(
        &mut self,
        id: ConnId,
        head: &RequestHead,
        body: &[u8],
        claims: &jwt::Claims,
    ) -> Outcome {
        use crate::federation::mcp::{McpRefusal, McpReply, REVISIONS, SESSION_HEADER};
        let session = head.header(SESSION_HEADER);
        let peer = self.conn(id).map(|c| c.peer);
        match head.method {
            Method::Post => {}
            Method::Delete => {
                let r = match session {
                    None => Resp::error(400, "bad_request", "an Mcp-Session-Id is required"),
                    Some(s) if self.fed.mcp_end(s, &claims.server_id, peer) => Resp::no_content(),
                    Some(_) => Resp::error(404, "unknown_session", "no such MCP session"),
                };
                return Outcome::Respond(r);
            }
            Method::Get if head.has_token("upgrade", "websocket") => {
                return self.mcp_upgrade(id, head, claims);
            }
            _ => return Outcome::Respond(Resp::method_not_allowed("POST, DELETE")),
        }
        if let Some(v) = head.header("mcp-protocol-version")
            && !REVISIONS.contains(&v)
        {
            return Outcome::Respond(Resp::error(
                400,
                "unsupported_protocol_version",
                "this MCP protocol revision is not served",
            ));
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return Outcome::Respond(Resp::error(400, "parse_error", "the body is not UTF-8"));
        };
        let req = Proxy::request_id(id);
        match self
            .fed
            .mcp_http(req, &claims.server_id, peer, session, text)
        {
            Ok(McpReply::Now { text, session }) => {
                let mut r = Resp::json(200, text.into_bytes());
                if let Some(s) = session {
                    r.headers.push(("Mcp-Session-Id", s));
                }
                Outcome::Respond(r)
            }
            Ok(McpReply::Accepted) => Outcome::Respond(Resp {
                status: 202,
                headers: Vec::new(),
                body: Vec::new(),
            }),
            Ok(McpReply::Later) => Outcome::Later,
            Err(McpRefusal::BadRequest(why)) => {
                Outcome::Respond(Resp::error(400, "bad_request", why))
            }
            Err(McpRefusal::UnknownSession) => Outcome::Respond(Resp::error(
                404,
                "unknown_session",
                "no such MCP session (it ended, or was never issued)",
            )),
        }
    }
}
