//! The HTTP API (contract §3): the route table, the answers, and the handlers of each route.
//!
//! Owns what a request means: [`Route::of`] decides from the method and path alone which
//! route a request is for and [`Route::auth`] which token it takes, so the token is checked on
//! the head, before any byte of a body (`http`). [`Resp`] is an answer; `route` dispatches an
//! authorised request to its handler, one module per concern: `http` (the connection's
//! framing, deadlines, keep-alive, pipelining), `servers` (registry, signing keys), `tokens`
//! (issue, revoke), `messages` (`POST /v1/messages`), `upgrade` (`GET /v1/control`), and the
//! data channel's resources in `crate::data`. The framing (`http`, `upgrade`) and the data
//! channel's streaming are the reactor's side (`impl Proxy`); the handlers of `servers`,
//! `tokens` and `messages` are the core's (`impl Federation`): they take a request's parts
//! and give back an answer, or say it comes later (an `Action::Respond`). No handler
//! touches a socket.

mod http;

pub(crate) use http::next_request;
mod messages;
mod servers;
mod tokens;
mod upgrade;

use crate::conn::ConnId;
use crate::durable::Record;
use crate::federation::{AuthError, Federation, Want};
use crate::http::parse::{Method, RequestHead};
use crate::jsonrpc::RpcError;
use crate::jwt;
use crate::proxy::Proxy;
use std::net::SocketAddr;

pub use crate::http::response::Resp;

/// The contract's answer to a refused token: its status and code, and for a `401` the
/// `WWW-Authenticate` challenge.
impl Resp {
    pub fn auth(e: &AuthError) -> Resp {
        let mut r = Resp::error(e.status, e.code, e.message());
        if e.status == 401 {
            r.headers
                .push(("WWW-Authenticate", "Bearer error=\"invalid_token\"".into()));
        }
        r
    }
}

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
pub(super) fn internal_error() -> Resp {
    Resp::error(
        500,
        "internal_error",
        "the proxy could not route this request",
    )
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub fn bearer(head: &RequestHead) -> Option<&str> {
    let v = head.header("authorization")?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Proxy {
    /// One request, its token already checked against [`Route::auth`] (`claims` is `Some`
    /// exactly when the route takes a token).
    pub(super) fn route(
        &mut self,
        id: ConnId,
        peer: SocketAddr,
        head: &RequestHead,
        body: &[u8],
        claims: Option<jwt::Claims>,
    ) -> Outcome {
        use Outcome::Respond as R;
        let route = Route::of(head.method, &head.path);
        let req = Proxy::request_id(id);
        let Some(claims) = claims else {
            return R(match route {
                Route::Healthz => Resp::json(200, "{\"status\":\"ok\"}"),
                Route::Readyz => self.fed.readyz(),
                Route::Metrics => {
                    let text = self.fed.metrics.render(&self.gauges());
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
        let fed = &mut self.fed;
        let later = |r: Option<Resp>| r.map_or(Outcome::Later, Outcome::Respond);
        match route {
            Route::Register => {
                let r = fed.register(body, peer);
                later(fed.durable_answer(req, r))
            }
            Route::ListServers => R(fed.list_servers()),
            Route::GetServer(raw) => R(fed.get_server(raw)),
            Route::RemoveServer(raw) => {
                let r = fed.remove_server(raw, peer);
                later(fed.durable_answer(req, r))
            }
            Route::RotateKey(raw) => {
                let r = fed.rotate_key(raw, peer);
                later(fed.durable_answer(req, r))
            }
            Route::RevokeToken(raw) => {
                let r = fed.revoke_token(raw, peer);
                later(fed.durable_answer(req, r))
            }
            Route::IssueToken => R(fed.issue_token(&claims.server_id, peer)),
            Route::PostMessage => later(fed.post_message(req, &claims.server_id, body, peer)),
            Route::Control => self.upgrade(id, head, &claims),
            Route::ListResources => R(self.fed.list_resources(&claims)),
            Route::Resource(rest) => match self.resource_route(id, head, rest, &claims) {
                Some(r) => R(r),
                None => Outcome::Streaming,
            },
            _ => R(internal_error()),
        }
    }
}

impl Federation {
    pub(super) fn readyz(&self) -> Resp {
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
}

/// An answer that changed nothing on disk.
pub(super) fn no_record(r: Resp) -> (Resp, Record) {
    (r, None)
}

/// A proxy error as an HTTP answer to `POST /v1/messages`.
pub(super) fn rpc_error_resp(e: &RpcError) -> Resp {
    let mut r = Resp::error(e.http_status(), e.reason(), &e.to_string());
    if let RpcError::RateLimited { retry_after_ms } = e {
        r.headers
            .push(("Retry-After", retry_after_ms.div_ceil(1000).to_string()));
    }
    r
}
