//! The HTTP/1.1 side of a connection (contract §3): requests in order, answers in order.
//!
//! Owns request framing on an HTTP connection (head, then a `Content-Length` or chunked JSON
//! body, keep-alive, pipelining, `Connection: close`, `Expect: 100-continue`), the request
//! deadlines (the whole request within the handshake timeout: `408`; keep-alive idle timeout:
//! silent close), the route table, authentication of each route, and the upgrade of
//! `GET /v1/control` into a control session.
//!
//! Bounds: a head is at most `MAX_HEAD_BYTES` (`431`), a JSON body at most
//! `FEDMCP_MAX_MESSAGE_BYTES` (`413`); no further request is read while an answer is owed
//! (pipelined requests wait in the socket, not in memory). Parsing is the sans-io `http`
//! module's; this module never touches a socket.

use crate::audit::Event;
use crate::conn::{Closing, ConnId, ConnState, HttpPhase};
use crate::durable::Record;
use crate::http::chunked::{ChunkedDecoder, Progress};
use crate::http::parse::{self, BodyKind, Method, RequestHead};
use crate::http::response;
use crate::jsonrpc::RpcError;
use crate::jwt::{self, TokenType};
use crate::metrics::Gauges;
use crate::proxy::{AuthError, CLOSE_LINGER, Proxy, Want, secs_to_ms};
use crate::registry::{Entry, RegistryError, State};
use crate::router::{Reply, ReplyTo};
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::net::SocketAddr;
use std::time::Instant;

/// Output owed on an HTTP connection above which no further pipelined request is processed
/// until the peer reads.
const HTTP_OUT_BOUND: usize = 256 * 1024;

/// The subprotocol a control client may offer.
const SUBPROTOCOL: &str = "fedmcp.v1";

/// An answer to one request.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Resp {
        Resp {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body: body.into(),
        }
    }

    pub fn error(status: u16, code: &str, message: &str) -> Resp {
        Resp::json(status, response::error_body(code, message))
    }

    pub fn no_content() -> Resp {
        Resp {
            status: 204,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn auth(e: &AuthError) -> Resp {
        let mut r = Resp::error(e.status, e.code, e.message());
        if e.status == 401 {
            r.headers
                .push(("WWW-Authenticate", "Bearer error=\"invalid_token\"".into()));
        }
        r
    }

    pub fn method_not_allowed(allow: &str) -> Resp {
        let mut r = Resp::error(
            405,
            "method_not_allowed",
            "this path does not take that method",
        );
        r.headers.push(("Allow", allow.into()));
        r
    }
}

/// What a request turned into.
enum Outcome {
    Respond(Resp),
    /// A send awaiting its recipient: the answer comes through `http_async_answer`.
    Later,
    /// The connection became a control session.
    Upgraded,
    /// The handler wrote the head and the body streams from a file (`data`).
    Streaming,
}

/// What a request is for: the route table of contract §3, decided from the method and the
/// path alone (so a token is checked before any byte of a body is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    Readyz,
    Metrics,
    Register,
    ListServers,
    /// `GET`/`HEAD /v1/servers/{id}` (the raw, still percent-encoded id).
    GetServer(&'a str),
    RemoveServer(&'a str),
    /// `POST /v1/servers/{id}/signing-key`.
    RotateKey(&'a str),
    /// `DELETE /v1/tokens/{jti}`.
    RevokeToken(&'a str),
    IssueToken,
    PostMessage,
    Control,
    ListResources,
    /// `PUT /v1/resources/{name}`: streamed to disk (`data`).
    Upload(&'a str),
    /// `GET`/`HEAD`/`DELETE /v1/resources/{owner}/{name}`.
    Resource(&'a str),
    /// A known path with a method it does not take; the `Allow` value.
    NotAllowed(&'static str),
    NotFound,
}

impl<'a> Route<'a> {
    pub fn of(m: Method, path: &'a str) -> Route<'a> {
        use Route::*;
        let get = matches!(m, Method::Get | Method::Head);
        match path {
            "/healthz" if get => Healthz,
            "/readyz" if get => Readyz,
            "/metrics" if get => Metrics,
            "/healthz" | "/readyz" | "/metrics" => NotAllowed("GET, HEAD"),
            "/v1/servers" => match m {
                Method::Post => Register,
                Method::Get | Method::Head => ListServers,
                _ => NotAllowed("GET, HEAD, POST"),
            },
            "/v1/token" if m == Method::Post => IssueToken,
            "/v1/token" => NotAllowed("POST"),
            "/v1/messages" if m == Method::Post => PostMessage,
            "/v1/messages" => NotAllowed("POST"),
            "/v1/control" if m == Method::Get => Control,
            "/v1/control" => NotAllowed("GET"),
            "/v1/resources" if get => ListResources,
            "/v1/resources" => NotAllowed("GET, HEAD"),
            _ => {
                if let Some(rest) = path.strip_prefix("/v1/resources/") {
                    match m {
                        Method::Put => Upload(rest),
                        Method::Get | Method::Head | Method::Delete => Resource(rest),
                        _ if rest.contains('/') => NotAllowed("GET, HEAD, DELETE"),
                        _ => NotAllowed("PUT"),
                    }
                } else if let Some(rest) = path.strip_prefix("/v1/servers/") {
                    match (rest.strip_suffix("/signing-key"), m) {
                        (Some(id), Method::Post) => RotateKey(id),
                        (Some(_), _) => NotAllowed("POST"),
                        (None, Method::Get | Method::Head) => GetServer(rest),
                        (None, Method::Delete) => RemoveServer(rest),
                        (None, _) => NotAllowed("GET, HEAD, DELETE"),
                    }
                } else if let Some(jti) = path.strip_prefix("/v1/tokens/") {
                    match m {
                        Method::Delete => RevokeToken(jti),
                        _ => NotAllowed("DELETE"),
                    }
                } else {
                    NotFound
                }
            }
        }
    }

    /// The token a route takes (`None`: anyone).
    pub fn auth(&self) -> Option<Want> {
        use Route::*;
        match self {
            Healthz | Readyz | Metrics | NotAllowed(_) | NotFound => None,
            Register | ListServers | GetServer(_) | RemoveServer(_) | RotateKey(_)
            | RevokeToken(_) => Some(Want::Admin),
            IssueToken | PostMessage | Control | Upload(_) => Some(Want::Federation),
            ListResources | Resource(_) => Some(Want::Either),
        }
    }
}

/// The answer when the route table and a handler disagree (a bug, never a peer's doing).
fn internal_error() -> Resp {
    Resp::error(
        500,
        "internal_error",
        "the proxy could not route this request",
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody<'a> {
    #[serde(rename = "serverId")]
    server_id: String,
    #[serde(default, borrow)]
    endpoints: Option<&'a RawValue>,
    #[serde(default, borrow)]
    capabilities: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Endpoints {
    #[serde(default)]
    control: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

fn url_ok(url: &str, schemes: &[&str]) -> bool {
    schemes.iter().any(|s| {
        url.strip_prefix(s)
            .and_then(|rest| rest.strip_prefix("://"))
            .is_some_and(|rest| {
                let host = rest.split(['/', '?', '#']).next().unwrap_or("");
                !host.is_empty() && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
            })
    })
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub fn bearer(head: &RequestHead) -> Option<&str> {
    let v = head.header("authorization")?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Proxy {
    /// Bytes from the socket for an HTTP connection.
    pub fn http_input(&mut self, id: ConnId, data: &[u8]) {
        if let Some(conn) = self.conn_mut(id)
            && let ConnState::Http(h) = &mut conn.state
            && !h.close_after
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
                    !matches!(h.phase, HttpPhase::Waiting { .. } | HttpPhase::Sending(_))
                        && !h.close_after
                        && c.unsent() <= HTTP_OUT_BOUND
                }
                _ => true,
            },
            None => false,
        }
    }

    /// Processes every complete request in the buffer, in order, until one is incomplete,
    /// asynchronous, or ends the connection.
    pub fn http_process(&mut self, id: ConnId) {
        let now = self.now.at;
        loop {
            let handshake = self.cfg.handshake_timeout;
            let Some(conn) = self.conn_mut(id) else {
                return;
            };
            let unsent = conn.unsent();
            let ConnState::Http(h) = &mut conn.state else {
                return;
            };
            if h.close_after || unsent > HTTP_OUT_BOUND {
                return;
            }
            let complete = match &mut h.phase {
                HttpPhase::Waiting { .. } | HttpPhase::Sending(_) => return,
                HttpPhase::Upload(_) => {
                    if self.upload_progress(id) {
                        continue;
                    }
                    return;
                }
                HttpPhase::Head { idle } => {
                    if h.inbuf.is_empty() {
                        return;
                    }
                    if *idle {
                        *idle = false;
                        h.deadline = now + handshake;
                    }
                    match parse::parse_head(&h.inbuf) {
                        Ok(None) => return,
                        Err(e) => {
                            let status = e.status();
                            let r = Resp::error(status, e.code(), &e.to_string());
                            h.close_after = true;
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
                                let status =
                                    if matches!(e, crate::http::chunked::ChunkError::TooLarge) {
                                        413
                                    } else {
                                        400
                                    };
                                let code = if status == 413 {
                                    "payload_too_large"
                                } else {
                                    "bad_request"
                                };
                                h.close_after = true;
                                let r = Resp::error(status, code, &e.to_string());
                                return self.respond(id, r, false, false);
                            }
                        },
                    };
                    if !done {
                        return;
                    }
                    match std::mem::replace(&mut h.phase, HttpPhase::Head { idle: false }) {
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
    fn on_head(&mut self, id: ConnId, head: RequestHead) {
        self.metrics.http_requests_total += 1;
        let Some(peer) = self.conn(id).map(|c| c.peer) else {
            return;
        };
        let has_body = !matches!(head.body, BodyKind::None | BodyKind::Length(0));
        let route = Route::of(head.method, &head.path);
        let claims = match route.auth() {
            None => None,
            Some(want) => {
                let query_token = match route {
                    Route::Control => head.query_param("token"),
                    _ => None,
                };
                let token = bearer(&head).or(query_token.as_deref());
                match self.authenticate(token, want, peer) {
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
        let max_body = self.cfg.max_message_bytes as u64;
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
    fn answer_head(&mut self, id: ConnId, head: &RequestHead, r: Resp, has_body: bool) {
        if has_body && let Some(ConnState::Http(h)) = self.conn_mut(id).map(|c| &mut c.state) {
            h.close_after = true;
            h.inbuf = Vec::new();
        }
        self.respond(id, r, head.keep_alive, head.method == Method::Head);
    }

    /// Routes a complete request and writes (or schedules) its answer. False when the
    /// connection stops processing requests for now (an answer is owed later, the
    /// connection became a session, or a download streams).
    fn dispatch(
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
    fn respond(&mut self, id: ConnId, r: Resp, keep_alive: bool, head_only: bool) {
        let now_t = self.now;
        let now = self.now.at;
        let idle = self.cfg.idle_timeout;
        let handshake = self.cfg.handshake_timeout;
        let draining = self.draining.is_some();
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let ConnState::Http(h) = &mut conn.state else {
            return;
        };
        let keep = keep_alive && !h.close_after && !draining;
        if !keep {
            h.close_after = true;
        }
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
        // The request is answered: the connection waits for the next one (or, with
        // `close_after`, is closed by the flush once the answer is out).
        if h.inbuf.is_empty() {
            h.phase = HttpPhase::Head { idle: true };
            h.deadline = now + idle;
        } else {
            h.phase = HttpPhase::Head { idle: false };
            h.deadline = now + handshake;
        }
        self.dirty.push(id);
        self.rearm(id);
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

    /// An answer that promises durability waits for the turn's fsync when changes were
    /// made (contract §7: `201`, `200` and `204` only once the change is on disk).
    fn durable_answer(&mut self, id: ConnId, (resp, record): (Resp, Record)) -> Outcome {
        if record.is_some() && resp.status < 300 {
            self.deferred.push(crate::durable::Deferred::Http {
                conn: id,
                resp,
                record,
            });
            Outcome::Later
        } else {
            Outcome::Respond(resp)
        }
    }

    /// An HTTP connection's deadline fired: idle keep-alive close, or `408`.
    pub fn http_timer(&mut self, id: ConnId, now: Instant) {
        let now_t = self.now;
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
            HttpPhase::Head { idle: true } if h.inbuf.is_empty() => {
                self.drop_conn(id, "keep-alive idle timeout");
            }
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
                conn.state = ConnState::Closing(Closing {
                    deadline,
                    fin_sent: false,
                });
                self.dirty.push(id);
            }
        }
    }

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
        use Outcome::Respond as R;
        let route = Route::of(head.method, &head.path);
        let Some(claims) = claims else {
            return R(match route {
                Route::Healthz => Resp::json(200, "{\"status\":\"ok\"}"),
                Route::Readyz => self.readyz(),
                Route::Metrics => {
                    let text = self.metrics.render(&self.gauges());
                    Resp {
                        status: 200,
                        headers: vec![(
                            "Content-Type",
                            "text/plain; version=0.0.4; charset=utf-8".into(),
                        )],
                        body: text.into_bytes(),
                    }
                }
                Route::NotAllowed(allow) => Resp::method_not_allowed(allow),
                Route::NotFound => Resp::error(404, "not_found", "no such path"),
                // A route that takes a token always has one here.
                _ => internal_error(),
            });
        };
        match route {
            Route::Register => {
                let r = self.register(body, peer);
                self.durable_answer(id, r)
            }
            Route::ListServers => R(self.list_servers()),
            Route::GetServer(raw) => R(self.get_server(raw)),
            Route::RemoveServer(raw) => {
                let r = self.remove_server(raw, peer);
                self.durable_answer(id, r)
            }
            Route::RotateKey(raw) => {
                let r = self.rotate_key(raw, peer);
                self.durable_answer(id, r)
            }
            Route::RevokeToken(raw) => {
                let r = self.revoke_token(raw, peer);
                self.durable_answer(id, r)
            }
            Route::IssueToken => R(self.issue_token(&claims.server_id, peer)),
            Route::PostMessage => self.post_message(id, &claims.server_id, body),
            Route::Control => self.upgrade(id, head, &claims),
            Route::ListResources => R(self.list_resources(&claims)),
            Route::Resource(rest) => match self.resource_route(id, head, rest, &claims) {
                Some(r) => R(r),
                None => Outcome::Streaming,
            },
            _ => R(internal_error()),
        }
    }

    fn readyz(&self) -> Resp {
        if let Some(e) = self.degraded.clone() {
            Resp::error(
                503,
                "degraded",
                &format!("the state dir cannot be written: {e}"),
            )
        } else if self.ready() {
            Resp::json(200, "{\"status\":\"ready\"}")
        } else {
            Resp::error(503, "draining", "the proxy is shutting down")
        }
    }

    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges {
            ready: self.ready(),
            pending_deliveries: self.pending.len(),
            ..Gauges::default()
        };
        for (_, c) in self.conns.iter() {
            match c.state.label() {
                "http" => g.conns_http += 1,
                "online" => g.conns_online += 1,
                "connecting" => g.conns_connecting += 1,
                _ => g.conns_closing += 1,
            }
        }
        for e in self.registry.entries() {
            g.servers_registered += 1;
            g.queue_messages += e.queue.len();
            if e.state == State::Online {
                g.servers_online += 1;
            }
        }
        g
    }

    fn register(&mut self, body: &[u8], peer: SocketAddr) -> (Resp, Record) {
        let bad = |m: &str| (Resp::error(400, "invalid_request", m), None);
        let Ok(text) = std::str::from_utf8(body) else {
            return bad("the body is not UTF-8");
        };
        let b: RegisterBody = match serde_json::from_str(text) {
            Ok(b) => b,
            Err(e) => return bad(&format!("the body is not a registration: {e}")),
        };
        if !jwt::valid_server_id(&b.server_id) {
            return bad(
                "serverId must be 1 to 64 of A-Z a-z 0-9 . _ : -, start with a letter or digit, and not contain __",
            );
        }
        if let Some(ep) = b.endpoints {
            let e: Endpoints = match serde_json::from_str(ep.get()) {
                Ok(e) => e,
                Err(_) => {
                    return bad(
                        "endpoints must be an object with optional \"control\" and \"data\" URLs",
                    );
                }
            };
            if e.control.as_deref().is_some_and(|u| {
                !url_ok(u, &["ws", "wss"]) || crate::outbound::ControlUrl::parse(u).is_none()
            }) {
                // A URL the proxy could not dial is refused now, not left to fail silently.
                return bad(
                    "endpoints.control must be a ws:// or wss:// URL with a host, an optional port from 1 to 65535, no user info and no fragment",
                );
            }
            // A token is never sent in clear text off the machine (§5).
            if let Some(u) = e
                .control
                .as_deref()
                .and_then(crate::outbound::ControlUrl::parse)
                && !u.tls
                && !u.loopback_host()
                && !self.cfg.allow_plaintext
            {
                return no_record(Resp::error(
                    400,
                    "insecure_endpoint",
                    "endpoints.control is ws:// to a host that is not loopback: the proxy would send a token in clear text; use wss:// (or set FEDMCP_ALLOW_PLAINTEXT=1)",
                ));
            }
            if e.data
                .as_deref()
                .is_some_and(|u| !url_ok(u, &["http", "https"]))
            {
                return bad("endpoints.data must be an http:// or https:// URL");
            }
        }
        if b.capabilities.is_some_and(|c| !c.get().starts_with('{')) {
            return bad("capabilities must be an object");
        }
        let status = match self.registry.find(&b.server_id) {
            Some(slot) => {
                let Some(e) = self.registry.get_mut(slot) else {
                    return bad("registry changed");
                };
                let was_registered = e.registered;
                e.registered = true;
                if let Some(ep) = b.endpoints {
                    e.endpoints = ep.get().to_string();
                }
                if let Some(c) = b.capabilities {
                    e.capabilities = c.get().to_string();
                    e.reg_capabilities = e.capabilities.clone();
                }
                if was_registered { 200 } else { 201 }
            }
            None => {
                let mut e = self.new_entry(&b.server_id);
                e.registered = true;
                if let Some(ep) = b.endpoints {
                    e.endpoints = ep.get().to_string();
                }
                if let Some(c) = b.capabilities {
                    e.capabilities = c.get().to_string();
                    e.reg_capabilities = e.capabilities.clone();
                }
                match self.registry.insert(e) {
                    Ok(_) => 201,
                    Err(RegistryError::Full) => {
                        return no_record(Resp::error(
                            507,
                            "registry_full",
                            "the registry is at FEDMCP_MAX_SERVERS",
                        ));
                    }
                }
            }
        };
        let mut record = None;
        if let Some(slot) = self.registry.find(&b.server_id) {
            if let Some(e) = self.registry.get(slot) {
                let op = crate::store::state::Op::Register {
                    id: e.server_id.clone(),
                    endpoints: RawValue::from_string(e.endpoints.clone())
                        .unwrap_or_else(|_| raw_empty()),
                    capabilities: RawValue::from_string(e.reg_capabilities.clone())
                        .unwrap_or_else(|_| raw_empty()),
                    epoch: e.key_epoch,
                };
                record = self.persist(op);
            }
            self.outbound_update(slot);
        }
        self.audit(
            Event::ServerRegistered,
            Some(&b.server_id),
            Some(peer),
            None,
        );
        let (token, claims) = self.mint(&b.server_id, TokenType::Federation);
        self.audit(
            Event::TokenIssued,
            Some(&b.server_id),
            Some(peer),
            Some("registration"),
        );
        let epoch = self.registry.by_id(&b.server_id).map_or(1, |e| e.key_epoch);
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.signing_key_at(&b.server_id, epoch));
        let resp = Resp::json(
            status,
            format!(
                "{{\"serverId\":\"{}\",\"token\":\"{token}\",\"expiresAt\":{},\"signingKey\":\"{key}\",\"signingKeyEpoch\":{epoch}}}",
                b.server_id,
                secs_to_ms(claims.exp)
            ),
        );
        (resp, record)
    }

    /// `POST /v1/servers/{id}/signing-key` (§6): the key moves to the next epoch; the old
    /// one stops verifying at once. Durable before it is answered.
    fn rotate_key(&mut self, raw: &str, peer: SocketAddr) -> (Resp, Record) {
        let Some(slot) = parse::percent_decode(raw).and_then(|id| self.registry.find(&id)) else {
            return no_record(Resp::error(404, "unknown_server", "no server with that id"));
        };
        let Some((id, epoch)) = self
            .registry
            .get(slot)
            .map(|e| (e.server_id.clone(), e.key_epoch.saturating_add(1)))
        else {
            return no_record(Resp::error(404, "unknown_server", "no server with that id"));
        };
        self.set_epoch(Some(slot), epoch);
        let record = self.persist(crate::store::state::Op::Rekey {
            id: id.clone(),
            epoch,
        });
        self.audit(Event::SigningKeyRotated, Some(&id), Some(peer), None);
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.signing_key_at(&id, epoch));
        let resp = Resp::json(
            200,
            format!("{{\"signingKey\":\"{key}\",\"signingKeyEpoch\":{epoch}}}"),
        );
        (resp, record)
    }

    /// `DELETE /v1/tokens/{jti}` (§2): every token with that `jti` is refused from now on,
    /// durably; sessions resting on it are closed 4001. Remembered until the latest `exp`
    /// seen with it (the sessions' tokens), else for `FEDMCP_TOKEN_TTL_SECS`.
    fn revoke_token(&mut self, raw: &str, peer: SocketAddr) -> (Resp, Record) {
        let Some(jti) = parse::percent_decode(raw).filter(|j| jwt::valid_jti(j)) else {
            return no_record(Resp::error(
                400,
                "invalid_request",
                "a token id (jti) is 1 to 64 printable ASCII characters",
            ));
        };
        let now = self.now.secs();
        let skew = self.cfg.clock_skew_secs as i64;
        let sessions: Vec<(ConnId, i64)> = self
            .conns
            .iter()
            .filter_map(|(_, c)| match &c.state {
                ConnState::Ws(ws) if ws.sess.uses_jti(&jti) => {
                    Some((c.id, ws.sess.expires_at_secs))
                }
                _ => None,
            })
            .collect();
        let until = sessions
            .iter()
            .map(|(_, exp)| *exp)
            .max()
            .unwrap_or(now.saturating_add(self.cfg.token_ttl_secs as i64));
        let until = match self.revocations.revoke(&jti, until, now, skew) {
            Ok(u) => u,
            Err(crate::revocations::RevokeError::Full) => {
                return no_record(Resp::error(
                    507,
                    "revocations_full",
                    "FEDMCP_MAX_REVOCATIONS revocations are held; try again once some expire",
                ));
            }
        };
        let record = self.persist(crate::store::state::Op::Revoke {
            jti: jti.clone(),
            until,
        });
        for (conn, _) in sessions {
            self.ws_close(conn, 4001, "token revoked");
        }
        self.audit(Event::TokenRevoked, None, Some(peer), None);
        (Resp::no_content(), record)
    }

    fn entry_json(e: &Entry) -> String {
        use crate::registry::OutPhase;
        let opt = |v: Option<i64>| v.map_or("null".to_string(), |t| t.to_string());
        let online = e.session.is_some();
        // Without a session, a dialled server is `connecting` while an attempt runs and
        // `backoff` between attempts (§5).
        let state = match (&e.outbound, online) {
            (Some(o), false) if o.phase == OutPhase::Backoff => "backoff",
            (Some(_), false) => "connecting",
            _ => e.state.as_str(),
        };
        let direction = match (online, e.outbound_session) {
            (false, _) => "null",
            (true, true) => "\"outbound\"",
            (true, false) => "\"inbound\"",
        };
        let mut dial = String::new();
        if let Some(o) = &e.outbound {
            dial.push_str(",\"lastError\":");
            match &o.last_error {
                Some(m) => crate::audit::push_json_str(&mut dial, m),
                None => dial.push_str("null"),
            }
            dial.push_str(",\"nextAttemptAt\":");
            let next = if o.phase == OutPhase::Backoff {
                o.next_attempt_ms
            } else {
                None
            };
            dial.push_str(&opt(next));
        }
        format!(
            "{{\"serverId\":\"{}\",\"state\":\"{}\",\"direction\":{},\"endpoints\":{},\"capabilities\":{},\"connectedAt\":{},\"lastSeenAt\":{},\"queued\":{},\"stats\":{{\"sent\":{},\"received\":{}}}{dial}}}",
            e.server_id,
            state,
            direction,
            e.endpoints,
            e.capabilities,
            if online {
                opt(e.connected_at_ms)
            } else {
                "null".into()
            },
            opt(e.last_seen_at_ms),
            e.queue.len(),
            e.sent,
            e.received
        )
    }

    fn list_servers(&self) -> Resp {
        let items: Vec<String> = self.registry.entries().map(Self::entry_json).collect();
        Resp::json(200, format!("{{\"servers\":[{}]}}", items.join(",")))
    }

    fn get_server(&self, raw: &str) -> Resp {
        match parse::percent_decode(raw)
            .and_then(|id| self.registry.by_id(&id).map(Self::entry_json))
        {
            Some(j) => Resp::json(200, j),
            None => Resp::error(404, "unknown_server", "no server with that id"),
        }
    }

    fn remove_server(&mut self, raw: &str, peer: SocketAddr) -> (Resp, Record) {
        let Some(slot) = parse::percent_decode(raw).and_then(|id| self.registry.find(&id)) else {
            return no_record(Resp::error(404, "unknown_server", "no server with that id"));
        };
        self.outbound_stop(slot);
        if let Some(conn) = self.registry.get(slot).and_then(|e| e.session) {
            // Its unanswered deliveries fail `unknown_server` now, instead of going back to
            // a queue that is about to be dropped; then the session closes.
            self.settle_deliveries(conn, crate::router::Gone::Removed);
            self.ws_close(conn, 4001, "server removed");
        }
        self.drop_queue(slot);
        let at = self.now.secs();
        let mut record = None;
        if let Some(e) = self.registry.remove(slot, at) {
            // Its resources go with it (§3); their files are removed before the removal is
            // acknowledged.
            if let Err(e) = self.remove_owned_resources(&e.server_id) {
                log::error!("resources of a removed server could not all be deleted: {e}");
            }
            record = self.persist(crate::store::state::Op::Remove {
                id: e.server_id.clone(),
                at,
                epoch: e.key_epoch,
            });
            self.audit(Event::ServerRemoved, Some(&e.server_id), Some(peer), None);
        }
        (Resp::no_content(), record)
    }

    fn issue_token(&mut self, server_id: &str, peer: SocketAddr) -> Resp {
        let (token, claims) = self.mint(server_id, TokenType::Federation);
        let exp = claims.exp;
        self.audit(
            Event::TokenIssued,
            Some(server_id),
            Some(peer),
            Some("http"),
        );
        Resp::json(
            200,
            format!(
                "{{\"token\":\"{token}\",\"expiresAt\":{}}}",
                secs_to_ms(exp)
            ),
        )
    }

    /// `POST /v1/messages` (§3): the control channel's limits apply — the body's size (on
    /// its head), its JSON nesting (`400 parse_error`), and the sender's rate limit, the same
    /// bucket its control session draws on (`429 rate_limited` with `Retry-After`).
    fn post_message(&mut self, id: ConnId, from: &str, body: &[u8]) -> Outcome {
        let peer = self.conn(id).map(|c| c.peer);
        if let Err(retry_after_ms) = self.take_rate(from, peer) {
            return Outcome::Respond(rpc_error_resp(&RpcError::RateLimited { retry_after_ms }));
        }
        let parsed = std::str::from_utf8(body)
            .ok()
            .filter(|t| !crate::jsonrpc::too_deep(t, crate::jsonrpc::MAX_JSON_DEPTH))
            .and_then(|t| serde_json::from_str::<&RawValue>(t).ok());
        let Some(params) = parsed else {
            return Outcome::Respond(Resp::error(
                400,
                "parse_error",
                "the body is not valid JSON, or nests deeper than 128",
            ));
        };
        match self.send(from, Some(params), Some(ReplyTo::Http { conn: id })) {
            Reply::Now(Ok(r)) => Outcome::Respond(Resp::json(200, r)),
            Reply::Now(Err(e)) => Outcome::Respond(rpc_error_resp(&e)),
            Reply::Later => Outcome::Later,
            Reply::None => Outcome::Respond(Resp::no_content()),
        }
    }

    /// `GET /v1/control`: token (header or `?token=`), then the RFC 6455 upgrade checks, then
    /// `101` and the session.
    fn upgrade(&mut self, id: ConnId, head: &RequestHead, claims: &jwt::Claims) -> Outcome {
        if !head.has_token("upgrade", "websocket") || !head.has_token("connection", "upgrade") {
            let mut r = Resp::error(
                426,
                "upgrade_required",
                "this path takes a WebSocket upgrade",
            );
            r.headers.push(("Upgrade", "websocket".into()));
            return Outcome::Respond(r);
        }
        if head.header("sec-websocket-version") != Some("13") {
            let mut r = Resp::error(
                426,
                "unsupported_websocket_version",
                "only WebSocket version 13 is supported",
            );
            r.headers.push(("Sec-WebSocket-Version", "13".into()));
            return Outcome::Respond(r);
        }
        let key = head.header("sec-websocket-key").unwrap_or("");
        let key_ok = base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16);
        if !key_ok {
            return Outcome::Respond(Resp::error(
                400,
                "bad_request",
                "Sec-WebSocket-Key must be 16 bytes in base64",
            ));
        }
        if self.draining.is_some() {
            return Outcome::Respond(Resp::error(503, "draining", "the proxy is shutting down"));
        }
        if self.registry.find(&claims.server_id).is_none()
            && self.registry.len() >= self.registry.capacity()
        {
            return Outcome::Respond(Resp::error(
                507,
                "registry_full",
                "the registry is at FEDMCP_MAX_SERVERS",
            ));
        }
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let offered = head
            .header("sec-websocket-protocol")
            .is_some_and(|v| v.split(',').any(|p| p.trim() == SUBPROTOCOL));
        let mut resp = String::with_capacity(200);
        resp.push_str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
        resp.push_str(&accept);
        resp.push_str("\r\n");
        if offered {
            resp.push_str("Sec-WebSocket-Protocol: fedmcp.v1\r\n");
        }
        resp.push_str("\r\n");
        let (leftover, welcome_by) = match self.conn_mut(id) {
            Some(conn) => {
                conn.out.extend_from_slice(resp.as_bytes());
                match &mut conn.state {
                    ConnState::Http(h) => (std::mem::take(&mut h.inbuf), h.deadline),
                    _ => return Outcome::Upgraded,
                }
            }
            None => return Outcome::Upgraded,
        };
        self.dirty.push(id);
        if self
            .open_session(id, claims, welcome_by, tungstenite::protocol::Role::Server)
            .is_err()
        {
            self.drop_conn(id, "registry full");
            return Outcome::Upgraded;
        }
        if !leftover.is_empty() {
            self.ws_input(id, &leftover);
        }
        Outcome::Upgraded
    }
}

/// An answer that changed nothing on disk.
fn no_record(r: Resp) -> (Resp, Record) {
    (r, None)
}

fn raw_empty() -> Box<RawValue> {
    RawValue::from_string("{}".to_string()).unwrap_or_default()
}

/// A proxy error as an HTTP answer to `POST /v1/messages`.
fn rpc_error_resp(e: &RpcError) -> Resp {
    let mut r = Resp::error(e.http_status(), e.reason(), &e.to_string());
    if let RpcError::RateLimited { retry_after_ms } = e {
        r.headers
            .push(("Retry-After", retry_after_ms.div_ceil(1000).to_string()));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_are_checked() {
        assert!(url_ok("ws://a:1/x", &["ws", "wss"]));
        assert!(url_ok("wss://a", &["ws", "wss"]));
        assert!(!url_ok("http://a", &["ws", "wss"]));
        assert!(!url_ok("ws://", &["ws", "wss"]));
        assert!(!url_ok("ws:///x", &["ws", "wss"]));
        assert!(!url_ok("ws://a b", &["ws", "wss"]));
        assert!(url_ok("https://h/p", &["http", "https"]));
    }
}
