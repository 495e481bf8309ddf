//! The registry's admin endpoints (contract §3, §6): register, list, show, remove, rotate a
//! signing key.
//!
//! Owns the checks of a registration (serverId rule, endpoint URLs, `insecure_endpoint`),
//! the registry entry's JSON, and the durable records these changes write (answered only once
//! on disk). A removal closes the server's session 4001, settles its deliveries, drops its
//! queue and its resources.

use super::{Resp, no_record};
use crate::audit::Event;
use crate::clock::secs_to_ms;
use crate::federation::Federation;
use crate::federation::pending::Record;
use crate::federation::registry::{Entry, RegistryError};
use crate::proto::http::parse;
use crate::proto::jwt::{self, TokenType};
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::net::SocketAddr;

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

/// A registration's fields on its entry (new or updated): registered, and the endpoints and
/// capabilities the body gave (absent ones are kept).
fn apply_registration(e: &mut Entry, b: &RegisterBody) {
    e.registered = true;
    if let Some(ep) = b.endpoints {
        e.endpoints = ep.get().to_string();
    }
    if let Some(c) = b.capabilities {
        e.capabilities = c.get().to_string();
        e.reg_capabilities = e.capabilities.clone();
    }
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

impl Federation {
    pub fn register(&mut self, body: &[u8], peer: SocketAddr) -> (Resp, Record) {
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
                !url_ok(u, &["ws", "wss"]) || crate::proto::upgrade::ControlUrl::parse(u).is_none()
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
                .and_then(crate::proto::upgrade::ControlUrl::parse)
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
                apply_registration(e, &b);
                // An online server's capabilities may have changed its tools (§9).
                self.mcp_tools_may_change();
                if was_registered { 200 } else { 201 }
            }
            None => {
                let mut e = self.new_entry(&b.server_id);
                apply_registration(&mut e, &b);
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
    pub fn rotate_key(&mut self, raw: &str, peer: SocketAddr) -> (Resp, Record) {
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

    pub fn entry_json(&self, e: &Entry) -> String {
        use crate::federation::registry::OutPhase;
        let opt = |v: Option<i64>| v.map_or("null".to_string(), |t| t.to_string());
        let online = e.presence.session().is_some() || e.presence.is_online();
        // Without a session, a dialled server is `connecting` while an attempt runs and
        // `backoff` between attempts (§5).
        let state = match (&e.outbound, online) {
            (Some(o), false) if o.phase == OutPhase::Backoff => "backoff",
            (Some(_), false) => "connecting",
            _ => e.presence.as_str(),
        };
        let dialled = e
            .presence
            .session()
            .and_then(|s| self.session(s))
            .map(|s| s.outbound);
        let direction = match dialled {
            None => "null",
            Some(true) => "\"outbound\"",
            Some(false) => "\"inbound\"",
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
        // In a cluster, where its session is (§10).
        let mut node = String::new();
        if self.cluster.is_some() {
            node.push_str(",\"node\":");
            match self.node_of(e.presence) {
                Some(n) => crate::audit::push_json_str(&mut node, n),
                None => node.push_str("null"),
            }
        }
        format!(
            "{{\"serverId\":\"{}\"{node},\"state\":\"{}\",\"direction\":{},\"endpoints\":{},\"capabilities\":{},\"connectedAt\":{},\"lastSeenAt\":{},\"queued\":{},\"stats\":{{\"sent\":{},\"received\":{}}}{dial}}}",
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

    pub fn list_servers(&self) -> Resp {
        let items: Vec<String> = self
            .registry
            .entries()
            .map(|e| self.entry_json(e))
            .collect();
        Resp::json(200, format!("{{\"servers\":[{}]}}", items.join(",")))
    }

    pub fn get_server(&self, raw: &str) -> Resp {
        match parse::percent_decode(raw)
            .and_then(|id| self.registry.by_id(&id).map(|e| self.entry_json(e)))
        {
            Some(j) => Resp::json(200, j),
            None => Resp::error(404, "unknown_server", "no server with that id"),
        }
    }

    pub fn remove_server(&mut self, raw: &str, peer: SocketAddr) -> (Resp, Record) {
        let Some(slot) = parse::percent_decode(raw).and_then(|id| self.registry.find(&id)) else {
            return no_record(Resp::error(404, "unknown_server", "no server with that id"));
        };
        let at = self.now.secs();
        let record = self.remove_entry(slot, at, Some(peer));
        (Resp::no_content(), record)
    }

    /// A server's removal (an admin's here, or one followed from the cluster's registry
    /// with `peer` `None`): its session closes 4001, its deliveries settle, its queue and
    /// resources go; the removal is recorded (durably).
    pub fn remove_entry(
        &mut self,
        slot: crate::federation::action::Slot,
        at: i64,
        peer: Option<SocketAddr>,
    ) -> Record {
        self.outbound_stop(slot);
        if let Some(session) = self.registry.get(slot).and_then(|e| e.presence.session()) {
            // Its unanswered deliveries fail `unknown_server` now, instead of going back to
            // a queue that is about to be dropped; then the session closes.
            self.settle_deliveries(session, crate::federation::pending::Gone::Removed);
            self.close_session(session, 4001, "server removed");
        }
        self.mcp_tools_may_change();
        self.drop_queue(slot);
        if peer.is_some()
            && let Some(id) = self.registry.get(slot).map(|e| e.server_id.clone())
        {
            self.cluster_drop_queue(&id);
        }
        let mut record = None;
        if let Some(e) = self.registry.remove(slot, at) {
            // Its resources go with it (§3); their files are removed in this turn, before the
            // removal is acknowledged.
            self.remove_owned_resources(&e.server_id);
            let op = crate::store::state::Op::Remove {
                id: e.server_id.clone(),
                at,
                epoch: e.key_epoch,
            };
            // A removal followed from the cluster's registry is not published again.
            record = if peer.is_some() {
                self.persist(op)
            } else {
                self.persist_local(op)
            };
            self.audit(Event::ServerRemoved, Some(&e.server_id), peer, None);
        }
        record
    }
}

pub(super) fn raw_empty() -> Box<RawValue> {
    RawValue::from_string("{}".to_string()).unwrap_or_default()
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
