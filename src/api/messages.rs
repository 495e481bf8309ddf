//! `POST /v1/messages` (contract §3): a send over HTTP, with the control channel's limits.
//!
//! Owns the checks a body gets before it is routed (the sender's rate limit, JSON nesting)
//! and the mapping of the router's answer to HTTP. The send itself is `router`'s.

use super::{Resp, rpc_error_resp};
use crate::federation::Federation;
use crate::federation::action::RequestId;
use crate::federation::pending::{Reply, ReplyTo};
use crate::proto::jsonrpc::RpcError;
use serde_json::value::RawValue;
use std::net::SocketAddr;

impl Federation {
    /// `POST /v1/messages` (§3): the control channel's limits apply — the body's size (on
    /// its head), its JSON nesting (`400 parse_error`), and the sender's rate limit, the same
    /// bucket its control session draws on (`429 rate_limited` with `Retry-After`).
    /// `None`: the answer comes later, with [`crate::federation::action::Action::Respond`].
    pub fn post_message(
        &mut self,
        req: RequestId,
        from: &str,
        body: &[u8],
        peer: SocketAddr,
    ) -> Option<Resp> {
        if let Err(retry_after_ms) = self.take_rate(from, Some(peer)) {
            return Some(rpc_error_resp(&RpcError::RateLimited { retry_after_ms }));
        }
        let parsed = std::str::from_utf8(body)
            .ok()
            .filter(|t| !crate::proto::jsonrpc::too_deep(t, crate::proto::jsonrpc::MAX_JSON_DEPTH))
            .and_then(|t| serde_json::from_str::<&RawValue>(t).ok());
        let Some(params) = parsed else {
            return Some(Resp::error(
                400,
                "parse_error",
                "the body is not valid JSON, or nests deeper than 128",
            ));
        };
        match self.send(from, Some(params), Some(ReplyTo::Http { req })) {
            Reply::Now(Ok(r)) => Some(Resp::json(200, r)),
            Reply::Now(Err(e)) => Some(rpc_error_resp(&e)),
            Reply::Later => None,
            Reply::None => Some(Resp::no_content()),
        }
    }
}
