//! `POST /v1/messages` (contract §3): a send over HTTP, with the control channel's limits.
//!
//! Owns the checks a body gets before it is routed (the sender's rate limit, JSON nesting)
//! and the mapping of the router's answer to HTTP. The send itself is `router`'s.

use super::{Outcome, Resp, rpc_error_resp};
use crate::conn::ConnId;
use crate::jsonrpc::RpcError;
use crate::proxy::Proxy;
use crate::router::{Reply, ReplyTo};
use serde_json::value::RawValue;

impl Proxy {
    /// `POST /v1/messages` (§3): the control channel's limits apply — the body's size (on
    /// its head), its JSON nesting (`400 parse_error`), and the sender's rate limit, the same
    /// bucket its control session draws on (`429 rate_limited` with `Retry-After`).
    pub(super) fn post_message(&mut self, id: ConnId, from: &str, body: &[u8]) -> Outcome {
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
}
