//! `GET /v1/control` (contract §4): the RFC 6455 upgrade of an authorised request into a
//! control session.
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

/// The subprotocol a control client may offer.
const SUBPROTOCOL: &str = "fedmcp.v1";

impl Proxy {
    /// `GET /v1/control`: token (header or `?token=`), then the RFC 6455 upgrade checks, then
    /// `101` and the session.
    pub(super) fn upgrade(
        &mut self,
        id: ConnId,
        head: &RequestHead,
        claims: &jwt::Claims,
    ) -> Outcome {
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
        if self.fed.draining.is_some() {
            return Outcome::Respond(Resp::error(503, "draining", "the proxy is shutting down"));
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
        let (leftover, welcome_by, peer) = match self.conn_mut(id) {
            Some(conn) => {
                conn.out.extend_from_slice(resp.as_bytes());
                let peer = conn.peer;
                match &mut conn.state {
                    ConnState::Http(h) => (std::mem::take(&mut h.inbuf), h.deadline, peer),
                    _ => return Outcome::Upgraded,
                }
            }
            None => return Outcome::Upgraded,
        };
        self.dirty.push(id);
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
}
