//! `GET /v1/control` (contract §4) and `GET /mcp` (§9): the RFC 6455 upgrade of an
//! authorised request into a control session, or into an MCP client's session.
//!
//! Owns the upgrade's checks (`Upgrade`/`Connection` tokens, version 13, the key), the `101`
//! with the selected subprotocol, and handing the connection and any bytes after the head to
//! the session the core opens (`Federation::open_session`). The token was checked on the
//! head (`http`).

use super::http::Outcome;
use crate::api::Resp;
use crate::io::conn::{ConnId, ConnState};
use crate::io::proxy::Proxy;
use crate::proto::http::parse::RequestHead;
use crate::proto::jwt;
use base64::Engine;
use std::net::SocketAddr;
use std::time::Instant;

/// The subprotocol a control client may offer.
const SUBPROTOCOL: &str = "fedmcp.v1";
/// The subprotocol an MCP client offers on `GET /mcp` (§9).
const MCP_SUBPROTOCOL: &str = "mcp";

/// What switching protocols left: the bytes after the request head, the connection's
/// handshake deadline, its peer.
type Switched = (Vec<u8>, Instant, SocketAddr);

impl Proxy {
    /// `GET /v1/control`: token (header or `?token=`), then the RFC 6455 upgrade checks, then
    /// `101` and the session.
    pub(super) fn upgrade(
        &mut self,
        id: ConnId,
        head: &RequestHead,
        claims: &jwt::Claims,
    ) -> Outcome {
        if let Some(refused) = self.refuse_upgrade(head) {
            return refused;
        }
        if self.fed.registry.find(&claims.server_id).is_none()
            && self.fed.registry.len() >= self.fed.registry.capacity()
        {
            return Outcome::Respond(Resp::error(
                507,
                "registry_full",
                "the registry is at FEDMCP_MAX_SERVERS",
            ));
        }
        let Some((leftover, welcome_by, peer)) = self.switch_protocols(id, head, SUBPROTOCOL)
        else {
            return Outcome::Upgraded;
        };
        let opening = crate::federation::control::Opening {
            claims,
            welcome_by,
            outbound: false,
            peer: Some(peer),
        };
        let Ok(session) = self.fed.open_session(opening) else {
            self.apply();
            self.drop_conn(id, "registry full");
            return Outcome::Upgraded;
        };
        self.attach(id, session, tungstenite::protocol::Role::Server);
        self.apply();
        if !leftover.is_empty() {
            self.ws_input(id, &leftover);
        }
        Outcome::Upgraded
    }

    /// `GET /mcp` with a WebSocket upgrade (§9): the MCP facade over WebSocket, one MCP
    /// session per connection, subprotocol `mcp` selected when offered.
    pub(crate) fn mcp_upgrade(
        &mut self,
        id: ConnId,
        head: &RequestHead,
        claims: &jwt::Claims,
    ) -> Outcome {
        if let Some(refused) = self.refuse_upgrade(head) {
            return refused;
        }
        let Some((leftover, _, peer)) = self.switch_protocols(id, head, MCP_SUBPROTOCOL) else {
            return Outcome::Upgraded;
        };
        let link = self.attach_mcp(id);
        self.fed.mcp_ws_open(link, &claims.server_id, Some(peer));
        if !leftover.is_empty() {
            self.ws_input(id, &leftover);
        }
        Outcome::Upgraded
    }

    /// The RFC 6455 checks of an upgrade request (and the drain): the refusal, if any.
    fn refuse_upgrade(&self, head: &RequestHead) -> Option<Outcome> {
        if !head.has_token("upgrade", "websocket") || !head.has_token("connection", "upgrade") {
            let mut r = Resp::error(
                426,
                "upgrade_required",
                "this path takes a WebSocket upgrade",
            );
            r.headers.push(("Upgrade", "websocket".into()));
            return Some(Outcome::Respond(r));
        }
        if head.header("sec-websocket-version") != Some("13") {
            let mut r = Resp::error(
                426,
                "unsupported_websocket_version",
                "only WebSocket version 13 is supported",
            );
            r.headers.push(("Sec-WebSocket-Version", "13".into()));
            return Some(Outcome::Respond(r));
        }
        let key = head.header("sec-websocket-key").unwrap_or("");
        let key_ok = base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16);
        if !key_ok {
            return Some(Outcome::Respond(Resp::error(
                400,
                "bad_request",
                "Sec-WebSocket-Key must be 16 bytes in base64",
            )));
        }
        if self.fed.draining.is_some() {
            return Some(Outcome::Respond(Resp::error(
                503,
                "draining",
                "the proxy is shutting down",
            )));
        }
        None
    }

    /// Writes the `101` (selecting `subprotocol` when the client offered it) and takes the
    /// connection out of HTTP: `None` when the connection is gone.
    fn switch_protocols(
        &mut self,
        id: ConnId,
        head: &RequestHead,
        subprotocol: &str,
    ) -> Option<Switched> {
        let key = head.header("sec-websocket-key").unwrap_or("");
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let offered = head
            .header("sec-websocket-protocol")
            .is_some_and(|v| v.split(',').any(|p| p.trim() == subprotocol));
        let mut resp = String::with_capacity(200);
        resp.push_str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
        resp.push_str(&accept);
        resp.push_str("\r\n");
        if offered {
            resp.push_str("Sec-WebSocket-Protocol: ");
            resp.push_str(subprotocol);
            resp.push_str("\r\n");
        }
        resp.push_str("\r\n");
        let conn = self.conn_mut(id)?;
        conn.out.extend_from_slice(resp.as_bytes());
        let peer = conn.peer;
        let ConnState::Http(h) = &mut conn.state else {
            return None;
        };
        let switched = (std::mem::take(&mut h.inbuf), h.deadline, peer);
        self.dirty.push(id);
        Some(switched)
    }
}
