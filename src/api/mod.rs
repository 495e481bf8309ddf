//! The HTTP API (contract §3): the route table, the answers, and the handlers of each route.
//!
//! Owns what a request means: [`Route::of`] decides from the method and path alone which
//! route a request is for and [`Route::auth`] which token it takes, so the token is checked on
//! the head, before any byte of a body. [`Resp`] is an answer; [`Federation::handle`]
//! dispatches an authorised request to its handler, one module per concern: `servers`
//! (registry, signing keys), `tokens` (issue, revoke), `messages` (`POST /v1/messages`).
//! Handlers are the core's: they take a request's parts (route, peer, body, claims) and give
//! back an answer, or say it comes later (an `Action::Respond`). The connection's framing,
//! the upgrade of `GET /v1/control` and the data channel's streaming are the reactor's side
//! (`io::http`, `io::upgrade`, `io::data`). Nothing here touches a socket.

mod messages;
mod resources;
mod servers;
mod tokens;

use crate::federation::action::RequestId;
use crate::federation::pending::Record;
use crate::federation::{AuthError, Federation, Want};
use crate::proto::http::parse::{Method, RequestHead};
use crate::proto::jsonrpc::RpcError;
use crate::proto::jwt;
use std::net::SocketAddr;

pub use crate::proto::http::response::Resp;

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
    /// `/mcp` (§9), any method: the MCP facade over Streamable HTTP.
    Mcp,
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
            "/mcp" => Mcp,
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
            ListResources | Resource(_) | Mcp => Some(Want::Either),
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

impl Federation {
    /// An authorised request to a route the core answers by itself (every route but
    /// `Control`, `Upload`, `Resource` and `Metrics`, which the reactor's side serves):
    /// `None` when the answer comes later, with an `Action::Respond` for `req`. `claims` is
    /// `Some` exactly when the route takes a token.
    pub fn handle(
        &mut self,
        req: RequestId,
        route: Route,
        peer: SocketAddr,
        body: &[u8],
        claims: Option<&jwt::Claims>,
    ) -> Option<Resp> {
        let Some(claims) = claims else {
            return Some(match route {
                Route::Healthz => Resp::json(200, "{\"status\":\"ok\"}"),
                Route::Readyz => self.readyz(),
                Route::NotAllowed(allow) => Resp::method_not_allowed(allow),
                Route::NotFound => Resp::error(404, "not_found", "no such path"),
                // A route that takes a token always has one here.
                _ => internal_error(),
            });
        };
        let changes_registry = matches!(
            route,
            Route::Register | Route::RemoveServer(_) | Route::RotateKey(_) | Route::RevokeToken(_)
        );
        if changes_registry && !self.cluster_ready() {
            // A change the cluster's registry cannot take now is not made here either (§10).
            return Some(Resp::error(
                503,
                "cluster_unavailable",
                "the proxy has not joined the cluster's registry (NATS or JetStream unavailable); try again",
            ));
        }
        match route {
            Route::Register => {
                let r = self.register(body, peer);
                self.durable_answer(req, r)
            }
            Route::ListServers => Some(self.list_servers()),
            Route::GetServer(raw) => Some(self.get_server(raw)),
            Route::RemoveServer(raw) => {
                let r = self.remove_server(raw, peer);
                self.durable_answer(req, r)
            }
            Route::RotateKey(raw) => {
                let r = self.rotate_key(raw, peer);
                self.durable_answer(req, r)
            }
            Route::RevokeToken(raw) => {
                let r = self.revoke_token(raw, peer);
                self.durable_answer(req, r)
            }
            Route::IssueToken => Some(self.issue_token(&claims.server_id, peer)),
            Route::PostMessage => self.post_message(req, &claims.server_id, body, peer),
            Route::ListResources => Some(self.list_resources(claims)),
            _ => Some(internal_error()),
        }
    }

    pub(crate) fn readyz(&self) -> Resp {
        if let Some(e) = self.degraded.clone() {
            Resp::error(
                503,
                "degraded",
                &format!("the state dir cannot be written: {e}"),
            )
        } else if self.cluster_degraded() && self.draining.is_none() {
            // Cut off from NATS: serving local sessions only (§10).
            Resp::json(503, "{\"status\":\"degraded\"}")
        } else if !self.cluster_ready() && self.draining.is_none() {
            // Joined, but not yet caught up with the cluster's registry.
            Resp::json(503, "{\"status\":\"starting\"}")
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
