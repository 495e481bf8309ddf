//! The MCP facade (contract §9): the whole federation as one MCP server.
//!
//! Owns what an MCP client's messages mean, whatever carries them: MCP sessions (issued by
//! `initialize`, bounded, the least recently used forgotten first), the protocol revisions
//! served, `tools/list` (the union of the tools online members declared in their welcome
//! answer, each renamed `<serverId>__<name>`, 100 a page with an opaque cursor), and
//! `tools/call` (split at the first `__`, delivered to the member as a `federation/deliver`
//! request whose answer comes back as the call's answer, through the router). A transport
//! (`io::http` for Streamable HTTP) hands it one JSON-RPC message with the caller's
//! identity and gets back the answer's text, nothing (a notification or a response), or
//! "later" (a call on its way to a member).
//!
//! Part of the core: no socket, no clock (times come in `Federation::now`), no file. Bounds:
//! [`MCP_SESSIONS_PER_CONNECTION_SLOT`] × `FEDMCP_MAX_CONNECTIONS` sessions; a page is at
//! most [`TOOLS_PAGE`] tools; a call is bounded like any delivery (the member's inflight
//! bound, its output bound, the delivery timeout) and counts against the caller's rate.

use crate::audit::Event;
use crate::federation::Federation;
use crate::federation::action::{Action, LinkId, RequestId, Slot};
use crate::federation::pending::{PendingKind, ReplyTo};
use crate::proto::jsonrpc::{self, Msg, RpcError};
use base64::Engine;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

/// Tools per `tools/list` page (§9).
pub const TOOLS_PAGE: usize = 100;

/// The revisions `initialize` serves, oldest first; the last is answered when the client
/// asks for one not served (§9).
pub const REVISIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// MCP sessions held per connection slot: a Streamable HTTP session holds no connection, so
/// the bound follows the connection bound with room for clients that keep a few each.
pub const MCP_SESSIONS_PER_CONNECTION_SLOT: usize = 4;

/// The JSON-RPC error code of an invalid `params` (an unknown tool, a bad cursor).
const INVALID_PARAMS: i64 = -32602;

/// The session header, and the prefix of a cursor (so a cursor from elsewhere is refused).
pub const SESSION_HEADER: &str = "mcp-session-id";
const CURSOR_PREFIX: &str = "fedmcp-tools:";

/// One MCP session (Streamable HTTP: named by `Mcp-Session-Id`).
#[derive(Debug)]
pub struct McpSession {
    /// The caller's `serverId` (from its token): the `from` of its calls.
    pub caller: String,
    /// The revision agreed at `initialize`.
    pub revision: &'static str,
    /// A counter of use, for forgetting the least recently used at the bound.
    last_used: u64,
}

/// An MCP client's WebSocket session (one per connection).
#[derive(Debug)]
pub struct McpWs {
    pub caller: String,
    pub peer: Option<SocketAddr>,
}

/// The MCP sessions: Streamable HTTP ones by id, WebSocket ones by connection.
#[derive(Debug, Default)]
pub struct McpSessions {
    map: HashMap<String, McpSession>,
    uses: u64,
    /// WebSocket sessions (bounded by the connections that carry them).
    pub ws: HashMap<LinkId, McpWs>,
    /// The digest of the tools the WebSocket sessions were last told of.
    tools_digest: u64,
    /// Presence or capabilities changed this turn: compare the tools at the turn's end.
    tools_maybe_changed: bool,
    /// The union of tools, kept until presence or capabilities change (a `tools/list` is
    /// not counted against any rate, so it must not cost a parse of every member's tools).
    tools: Option<Rc<Vec<Tool>>>,
}

impl McpSessions {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The session `id` of `caller`, marked used; `None` when unknown or ended (a session is
    /// only ever used by the server that opened it).
    fn touch(&mut self, id: &str, caller: &str) -> Option<&McpSession> {
        self.uses += 1;
        let uses = self.uses;
        let s = self.map.get_mut(id).filter(|s| s.caller == caller)?;
        s.last_used = uses;
        Some(s)
    }

    /// Adds a session; at `cap`, the least recently used one is forgotten and returned.
    fn insert(&mut self, id: String, s: McpSession, cap: usize) -> Option<McpSession> {
        let mut evicted = None;
        if self.map.len() >= cap.max(1)
            && let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
        {
            evicted = self.map.remove(&oldest);
        }
        self.map.insert(id, s);
        evicted
    }

    /// Ends session `id` of `caller`; false when there was none.
    pub fn end(&mut self, id: &str, caller: &str) -> bool {
        if self.map.get(id).is_some_and(|s| s.caller == caller) {
            self.map.remove(id);
            true
        } else {
            false
        }
    }
}

/// What an MCP message turned into.
#[derive(Debug, PartialEq, Eq)]
pub enum McpReply {
    /// The JSON-RPC response's text (a result or an error); with the session id when this
    /// answer opened a session (`initialize`).
    Now {
        text: String,
        session: Option<String>,
    },
    /// A notification or a response: nothing to answer (`202`).
    Accepted,
    /// A call on its way to a member: the answer comes with `Action::Respond`.
    Later,
}

/// Why an MCP message was refused before any JSON-RPC answer (a transport status).
#[derive(Debug, PartialEq, Eq)]
pub enum McpRefusal {
    /// A request other than `initialize` without a session, or a revision not served:
    /// `400`.
    BadRequest(&'static str),
    /// The session is unknown or ended: `404`.
    UnknownSession,
}

/// One tool of the union: its public name and its Tool object (name rewritten).
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub object: Value,
}

/// The tools a member declared in its capabilities (`{"tools": [Tool, ...]}`), renamed
/// `<serverId>__<name>`: objects without a string `name` are skipped, a repeated name keeps
/// its first declaration.
pub fn member_tools(server_id: &str, capabilities: &str) -> Vec<Tool> {
    let Ok(caps) = serde_json::from_str::<Value>(capabilities) else {
        return Vec::new();
    };
    let Some(list) = caps.get("tools").and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut out: Vec<Tool> = Vec::new();
    for t in list {
        let Some(obj) = t.as_object() else { continue };
        let Some(name) = obj.get("name").and_then(Value::as_str) else {
            continue;
        };
        let public = format!("{server_id}__{name}");
        if out.iter().any(|x| x.name == public) {
            continue;
        }
        let mut o: Map<String, Value> = obj.clone();
        o.insert("name".into(), Value::String(public.clone()));
        out.push(Tool {
            name: public,
            object: Value::Object(o),
        });
    }
    out
}

/// Splits a public tool name at the first `__`: `(serverId, tool name)`.
pub fn split_name(public: &str) -> Option<(&str, &str)> {
    let (server, name) = public.split_once("__")?;
    (!server.is_empty() && !name.is_empty()).then_some((server, name))
}

/// The opaque cursor that continues after the tool named `last`.
pub fn cursor_after(last: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{last}"))
}

/// The tool name a cursor continues after; `None` for a cursor this proxy did not issue.
pub fn cursor_position(cursor: &str) -> Option<String> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.strip_prefix(CURSOR_PREFIX).map(str::to_string)
}

/// One page of `tools` (sorted by name) after `after`: the page and the next cursor. Keyed
/// by name, so following the cursors yields every tool present throughout exactly once,
/// even when tools come and go between pages.
pub fn page<'t>(tools: &'t [Tool], after: Option<&str>) -> (Vec<&'t Tool>, Option<String>) {
    let start = match after {
        Some(a) => tools.partition_point(|t| t.name.as_str() <= a),
        None => 0,
    };
    let page: Vec<&Tool> = tools[start..].iter().take(TOOLS_PAGE).collect();
    let more = start + page.len() < tools.len();
    let next = more
        .then(|| page.last().map(|t| cursor_after(&t.name)))
        .flatten();
    (page, next)
}

/// A JSON-RPC error answer with a code of its own (not one of the §4 table).
fn error_with(id: &str, code: i64, message: &str) -> String {
    let mut m = String::new();
    crate::audit::push_json_str(&mut m, message);
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{{\"code\":{code},\"message\":{m}}}}}")
}

/// The member's answer to a delivered `tools/call`, as the call's JSON-RPC answer: a result
/// unchanged, an error with its code and message (and `data` when it had one).
pub fn call_answer(id: &str, outcome: Result<&str, &str>) -> String {
    match outcome {
        Ok(result) => jsonrpc::result(id, result),
        Err(err) => {
            #[derive(serde::Deserialize)]
            struct E<'a> {
                code: Option<i64>,
                #[serde(borrow)]
                message: Option<std::borrow::Cow<'a, str>>,
                #[serde(borrow)]
                data: Option<&'a RawValue>,
            }
            let e: Option<E> = serde_json::from_str(err).ok();
            let code = e.as_ref().and_then(|e| e.code).unwrap_or(-32603);
            let message = e
                .as_ref()
                .and_then(|e| e.message.as_deref())
                .unwrap_or("the member answered with an error")
                .to_string();
            let mut m = String::new();
            crate::audit::push_json_str(&mut m, &message);
            match e.and_then(|e| e.data) {
                Some(d) => format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{{\"code\":{code},\"message\":{m},\"data\":{}}}}}",
                    d.get()
                ),
                None => format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{{\"code\":{code},\"message\":{m}}}}}"
                ),
            }
        }
    }
}

/// The revision an `initialize` is answered with: the one asked for when served, else the
/// latest (§9).
fn revision_for(params: Option<&RawValue>) -> &'static str {
    let asked: Option<String> = params_of::<InitializeParams>(params)
        .ok()
        .and_then(|p| p.protocol_version.map(|v| v.into_owned()));
    asked
        .as_deref()
        .and_then(|a| REVISIONS.iter().find(|r| **r == a))
        .copied()
        .unwrap_or(REVISIONS[REVISIONS.len() - 1])
}

/// `initialize`'s result (§9).
fn initialize_result(params: Option<&RawValue>) -> String {
    format!(
        "{{\"protocolVersion\":\"{}\",\"serverInfo\":{{\"name\":\"fedmcp\",\"version\":\"{}\"}},\"capabilities\":{{\"tools\":{{\"listChanged\":true}}}}}}",
        revision_for(params),
        env!("CARGO_PKG_VERSION")
    )
}

/// A digest of the tools a client would list (names and declarations), to tell a change.
fn tools_digest(tools: &[Tool]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for t in tools {
        t.name.hash(&mut h);
        t.object.to_string().hash(&mut h);
    }
    h.finish()
}

#[derive(serde::Deserialize)]
struct InitializeParams<'a> {
    #[serde(default, rename = "protocolVersion", borrow)]
    protocol_version: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct ListParams<'a> {
    #[serde(default, borrow)]
    cursor: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct CallParams<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    arguments: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "_meta")]
    meta: Option<&'a RawValue>,
}

fn params_of<'a, T: serde::Deserialize<'a>>(p: Option<&'a RawValue>) -> Result<T, String> {
    serde_json::from_str(p.map_or("{}", |p| p.get())).map_err(|e| e.to_string())
}

impl Federation {
    /// The union of the tools online members declared, sorted by public name (computed
    /// once per change of presence or capabilities).
    pub fn mcp_tools(&mut self) -> Rc<Vec<Tool>> {
        if let Some(t) = &self.mcp.tools {
            return t.clone();
        }
        let mut all: Vec<Tool> = self
            .registry
            .entries()
            .filter(|e| e.presence.is_online())
            .flat_map(|e| member_tools(&e.server_id, &e.capabilities))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let all = Rc::new(all);
        self.mcp.tools = Some(all.clone());
        all
    }

    /// The most MCP sessions held at once.
    pub fn mcp_sessions_cap(&self) -> usize {
        self.cfg
            .max_connections
            .saturating_mul(MCP_SESSIONS_PER_CONNECTION_SLOT)
    }

    /// One MCP message from `caller` (its token's `serverId`) over Streamable HTTP, with the
    /// `Mcp-Session-Id` it carried, if any; `req` names the HTTP request a later answer goes
    /// to. `Err` is a refusal before any JSON-RPC answer (`400`/`404`).
    pub fn mcp_http(
        &mut self,
        req: RequestId,
        caller: &str,
        peer: Option<SocketAddr>,
        session: Option<&str>,
        text: &str,
    ) -> Result<McpReply, McpRefusal> {
        let msg = match jsonrpc::parse_msg(text) {
            Ok(m) => m,
            Err(inv) => {
                let id = inv.id.map_or("null", |i| i.get());
                return Ok(McpReply::Now {
                    text: jsonrpc::error(id, &inv.error),
                    session: None,
                });
            }
        };
        let (id, method, params) = match msg {
            Msg::Request { id, method, params } => (Some(id), method, params),
            Msg::Notification { method, params } => (None, method, params),
            // A response to the proxy: it asks nothing of clients.
            Msg::Response { .. } => return Ok(McpReply::Accepted),
        };
        if method == "initialize" {
            let Some(id) = id else {
                return Ok(McpReply::Accepted);
            };
            self.metrics.mcp_request("initialize", true);
            return Ok(self.mcp_initialize(caller, peer, id.get(), params));
        }
        let Some(sid) = session else {
            return Err(McpRefusal::BadRequest(
                "an Mcp-Session-Id is required (send initialize first)",
            ));
        };
        if self.mcp.touch(sid, caller).is_none() {
            return Err(McpRefusal::UnknownSession);
        }
        let Some(id) = id else {
            // `notifications/initialized` and any other notification: accepted.
            return Ok(McpReply::Accepted);
        };
        let id = id.get();
        let reply_to = ReplyTo::Mcp {
            req,
            id: id.to_string(),
        };
        Ok(
            match self.mcp_method(caller, id, &method, params, reply_to) {
                Some(text) => McpReply::Now {
                    text,
                    session: None,
                },
                None => McpReply::Later,
            },
        )
    }

    /// A request other than `initialize`: its answer now, or `None` when a call went to a
    /// member (the answer goes to `reply_to` when it comes). Counted in the metrics.
    fn mcp_method(
        &mut self,
        caller: &str,
        id: &str,
        method: &str,
        params: Option<&RawValue>,
        reply_to: ReplyTo,
    ) -> Option<String> {
        let (text, ok) = match method {
            "ping" => (jsonrpc::result(id, "{}"), true),
            "tools/list" => match self.mcp_tools_list(id, params) {
                Ok(t) => (t, true),
                Err(t) => (t, false),
            },
            "tools/call" => match self.mcp_call(caller, params, reply_to) {
                // Counted when its answer comes.
                Ok(()) => return None,
                Err(text) => (text, false),
            },
            _ => (jsonrpc::error(id, &RpcError::MethodNotFound), false),
        };
        self.metrics.mcp_request(method, ok);
        Some(text)
    }

    // ---- the WebSocket transport: one MCP session per connection -------------------------

    /// An MCP client's WebSocket (`GET /mcp`, subprotocol `mcp`) was accepted for `caller`;
    /// the connection is `link`. The session is the connection's: `initialize` answers on it
    /// and issues no id.
    pub fn mcp_ws_open(&mut self, link: LinkId, caller: &str, peer: Option<SocketAddr>) {
        if !self.mcp.tools_maybe_changed {
            // What this client will list is what every session was last told of.
            self.mcp.tools_digest = tools_digest(&self.mcp_tools());
        }
        self.mcp.ws.insert(
            link,
            McpWs {
                caller: caller.to_string(),
                peer,
            },
        );
        self.audit(
            Event::McpSessionOpened,
            Some(caller),
            peer,
            Some("websocket"),
        );
    }

    /// The MCP client's WebSocket ended (closed, lost, or closed by the proxy).
    pub fn mcp_ws_closed(&mut self, link: LinkId) {
        if let Some(w) = self.mcp.ws.remove(&link) {
            self.audit(
                Event::McpSessionClosed,
                Some(&w.caller),
                w.peer,
                Some("websocket"),
            );
        }
    }

    /// One text frame from an MCP client's WebSocket: its answer goes out on the same
    /// connection (`Action::McpSend`), now or when a member answers.
    pub fn mcp_ws_text(&mut self, link: LinkId, text: &str) {
        let Some(caller) = self.mcp.ws.get(&link).map(|w| w.caller.clone()) else {
            return;
        };
        let answer = match jsonrpc::parse_msg(text) {
            Err(inv) => Some(jsonrpc::error(
                inv.id.map_or("null", |i| i.get()),
                &inv.error,
            )),
            Ok(Msg::Response { .. } | Msg::Notification { .. }) => None,
            Ok(Msg::Request { id, method, params }) => {
                let id = id.get();
                if method == "initialize" {
                    self.metrics.mcp_request("initialize", true);
                    Some(jsonrpc::result(id, &initialize_result(params)))
                } else {
                    let reply_to = ReplyTo::McpWs {
                        link,
                        id: id.to_string(),
                    };
                    self.mcp_method(&caller, id, &method, params, reply_to)
                }
            }
        };
        if let Some(text) = answer {
            self.act(Action::McpSend { link, text });
        }
    }

    /// Once a turn: when the tools a client would list have changed since it was last told,
    /// every MCP WebSocket session gets `notifications/tools/list_changed` (§9: within a
    /// second). Only looked at after a change of presence or capabilities.
    pub fn mcp_end_turn(&mut self) {
        if !std::mem::take(&mut self.mcp.tools_maybe_changed) || self.mcp.ws.is_empty() {
            return;
        }
        let digest = tools_digest(&self.mcp_tools());
        if digest == self.mcp.tools_digest {
            return;
        }
        self.mcp.tools_digest = digest;
        let mut links: Vec<LinkId> = self.mcp.ws.keys().copied().collect();
        links.sort_by_key(|l| l.0);
        for link in links {
            let text = "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/tools/list_changed\"}";
            self.act(Action::McpSend {
                link,
                text: text.to_string(),
            });
        }
    }

    /// A member's presence or capabilities changed: the tools may have.
    pub(crate) fn mcp_tools_may_change(&mut self) {
        self.mcp.tools_maybe_changed = true;
        self.mcp.tools = None;
    }

    fn mcp_initialize(
        &mut self,
        caller: &str,
        peer: Option<SocketAddr>,
        id: &str,
        params: Option<&RawValue>,
    ) -> McpReply {
        let revision = revision_for(params);
        let session = crate::random::hex(&self.entropy.bytes::<16>());
        self.mcp.uses += 1;
        let s = McpSession {
            caller: caller.to_string(),
            revision,
            last_used: self.mcp.uses,
        };
        let cap = self.mcp_sessions_cap();
        if let Some(old) = self.mcp.insert(session.clone(), s, cap) {
            self.audit(
                Event::McpSessionClosed,
                Some(&old.caller),
                None,
                Some("evicted"),
            );
        }
        self.audit(Event::McpSessionOpened, Some(caller), peer, None);
        McpReply::Now {
            text: jsonrpc::result(id, &initialize_result(params)),
            session: Some(session),
        }
    }

    /// `tools/list`'s answer: `Ok` a page, `Err` an error answer.
    fn mcp_tools_list(&mut self, id: &str, params: Option<&RawValue>) -> Result<String, String> {
        let p: ListParams = match params_of(params) {
            Ok(p) => p,
            Err(e) => {
                return Err(error_with(
                    id,
                    INVALID_PARAMS,
                    &format!("invalid params: {e}"),
                ));
            }
        };
        let after = match p.cursor.as_deref() {
            None => None,
            Some(c) => match cursor_position(c) {
                Some(a) => Some(a),
                None => return Err(error_with(id, INVALID_PARAMS, "invalid cursor")),
            },
        };
        let tools = self.mcp_tools();
        let (page, next) = page(&tools, after.as_deref());
        let items: Vec<String> = page.iter().map(|t| t.object.to_string()).collect();
        let next = next.map_or(String::new(), |c| format!(",\"nextCursor\":\"{c}\""));
        Ok(jsonrpc::result(
            id,
            &format!("{{\"tools\":[{}]{next}}}", items.join(",")),
        ))
    }

    /// `DELETE /mcp`: ends session `id` of `caller`; false when there was none.
    pub fn mcp_end(&mut self, id: &str, caller: &str, peer: Option<SocketAddr>) -> bool {
        let ended = self.mcp.end(id, caller);
        if ended {
            self.audit(Event::McpSessionClosed, Some(caller), peer, Some("deleted"));
        }
        ended
    }

    /// `tools/call`: delivered to the tool's member, or answered now with an error.
    fn mcp_call(
        &mut self,
        caller: &str,
        params: Option<&RawValue>,
        reply_to: ReplyTo,
    ) -> Result<(), String> {
        let id = match &reply_to {
            ReplyTo::Mcp { id, .. } | ReplyTo::McpWs { id, .. } => id.clone(),
            _ => "null".to_string(),
        };
        let p: CallParams = match params_of(params) {
            Ok(p) => p,
            Err(e) => {
                return Err(error_with(
                    &id,
                    INVALID_PARAMS,
                    &format!("invalid params: {e}"),
                ));
            }
        };
        let unknown = || error_with(&id, INVALID_PARAMS, &format!("unknown tool: {}", p.name));
        let Some((server, tool)) = split_name(&p.name) else {
            return Err(unknown());
        };
        let Some(entry) = self
            .registry
            .find(server)
            .and_then(|s| self.registry.get(s))
        else {
            return Err(unknown());
        };
        if !entry.presence.is_online() {
            // A member the proxy knows, not online now: its tools are not listed, but a
            // client that listed them earlier learns why its call cannot go (§9: -32002).
            return Err(jsonrpc::error(&id, &RpcError::ServerOffline));
        }
        let declared = member_tools(&entry.server_id, &entry.capabilities)
            .iter()
            .any(|t| t.name == p.name.as_ref());
        let Some(slot) = self.registry.find(server).filter(|_| declared) else {
            return Err(unknown());
        };
        if let Err(retry_after_ms) = self.take_rate(caller, None) {
            return Err(jsonrpc::error(
                &id,
                &RpcError::RateLimited { retry_after_ms },
            ));
        }
        let mut name = String::new();
        crate::audit::push_json_str(&mut name, tool);
        let arguments = p.arguments.map_or("{}", |a| a.get());
        let meta = p
            .meta
            .map_or(String::new(), |m| format!(",\"_meta\":{}", m.get()));
        let message = format!(
            "{{\"method\":\"tools/call\",\"params\":{{\"name\":{name},\"arguments\":{arguments}{meta}}}}}"
        );
        self.mcp_deliver(slot, caller, &message, reply_to)
            .map_err(|e| jsonrpc::error(&id, &e))
    }

    /// Delivers an MCP call's message to the member in `slot` (like a direct send that awaits
    /// its answer, never queued).
    fn mcp_deliver(
        &mut self,
        slot: Slot,
        caller: &str,
        message: &str,
        reply_to: ReplyTo,
    ) -> Result<(), RpcError> {
        if let Some((crate::federation::registry::Presence::Remote(n), to)) = self
            .registry
            .get(slot)
            .map(|e| (e.presence, e.server_id.clone()))
        {
            // On another node of the cluster (§10).
            let seq = self.next_seq();
            let msg_id = self.msg_id(seq);
            let sent_at = self.now.wall_ms;
            self.remote_send(
                n,
                &to,
                &msg_id,
                caller,
                message,
                sent_at,
                false,
                Some(reply_to),
            );
            return Ok(());
        }
        let session = self.mcp_recipient(slot)?;
        let seq = self.next_seq();
        let msg_id = self.msg_id(seq);
        let sent_at = self.now.wall_ms;
        let params = self.deliver_params_for(slot, &msg_id, caller, message, sent_at);
        let kind = PendingKind::Direct {
            reply_to,
            msg_id,
            requeue: None,
        };
        self.deliver(session, slot, seq, &params, kind);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ts: &[&Tool]) -> Vec<String> {
        ts.iter().map(|t| t.name.clone()).collect()
    }

    #[test]
    fn tools_are_renamed_and_every_field_kept() {
        let caps = r#"{"tools":[{"name":"echo","description":"d","inputSchema":{"type":"object"},"x-extra":1},{"name":"echo"},{"nameless":true},"junk"]}"#;
        let t = member_tools("alice", caps);
        assert_eq!(t.len(), 1, "a repeated name keeps its first declaration");
        assert_eq!(t[0].name, "alice__echo");
        assert_eq!(t[0].object["description"], "d");
        assert_eq!(t[0].object["x-extra"], 1);
        assert_eq!(t[0].object["inputSchema"]["type"], "object");
        assert!(member_tools("alice", "{}").is_empty());
        assert!(member_tools("alice", "not json").is_empty());
    }

    #[test]
    fn names_split_at_the_first_double_underscore() {
        // A member id with one `_`, a tool name with `__` in it.
        assert_eq!(split_name("svc_a__my__tool"), Some(("svc_a", "my__tool")));
        assert_eq!(split_name("a__b"), Some(("a", "b")));
        assert_eq!(split_name("__b"), None);
        assert_eq!(split_name("a__"), None);
        assert_eq!(split_name("plain"), None);
        let t = member_tools("svc_a", r#"{"tools":[{"name":"my__tool"}]}"#);
        assert_eq!(split_name(&t[0].name), Some(("svc_a", "my__tool")));
    }

    #[test]
    fn the_same_tool_name_on_two_members_is_two_tools() {
        let mut all = member_tools("a", r#"{"tools":[{"name":"search"}]}"#);
        all.extend(member_tools("b", r#"{"tools":[{"name":"search"}]}"#));
        all.sort_by(|x, y| x.name.cmp(&y.name));
        let (p, next) = page(&all, None);
        assert_eq!(names(&p), ["a__search", "b__search"]);
        assert_eq!(next, None);
    }

    fn many(n: usize, prefix: &str) -> Vec<Tool> {
        let mut v: Vec<Tool> = (0..n)
            .map(|i| Tool {
                name: format!("{prefix}__t{i:04}"),
                object: Value::Null,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    #[test]
    fn following_the_cursors_yields_each_tool_exactly_once() {
        for n in [0, 1, 99, 100, 101, 250, 1000] {
            let tools = many(n, "m");
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let (p, next) = page(&tools, after.as_deref());
                assert!(p.len() <= TOOLS_PAGE);
                seen.extend(names(&p));
                match next {
                    Some(c) => after = Some(cursor_position(&c).expect("our cursor")),
                    None => break,
                }
            }
            let want: Vec<String> = tools.iter().map(|t| t.name.clone()).collect();
            assert_eq!(seen, want, "n = {n}");
        }
    }

    #[test]
    fn tools_that_come_and_go_between_pages_do_not_repeat_the_others() {
        let mut tools = many(150, "m");
        let (p1, next) = page(&tools, None);
        let first = names(&p1);
        let after = cursor_position(&next.unwrap()).unwrap();
        // A member with tools sorting before and after the cursor joins.
        tools.extend(many(3, "a"));
        tools.extend(many(3, "z"));
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        let (p2, _) = page(&tools, Some(&after));
        let second = names(&p2);
        assert!(second.iter().all(|n| !first.contains(n)));
        assert!(second.iter().any(|n| n.starts_with("z__")));
    }

    #[test]
    fn a_cursor_from_elsewhere_is_refused() {
        assert_eq!(cursor_position("not base64!"), None);
        let foreign = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("offset:100");
        assert_eq!(cursor_position(&foreign), None);
        assert_eq!(
            cursor_position(&cursor_after("a__b")).as_deref(),
            Some("a__b")
        );
    }

    #[test]
    fn a_members_error_keeps_its_code_message_and_data() {
        let a = call_answer(
            "7",
            Err(r#"{"code":-32000,"message":"no \"such\" file","data":{"p":1}}"#),
        );
        let v: Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["code"], -32000);
        assert_eq!(v["error"]["message"], "no \"such\" file");
        assert_eq!(v["error"]["data"]["p"], 1);
        let r = call_answer("\"x\"", Ok(r#"{"content":[],"isError":true}"#));
        let v: Value = serde_json::from_str(&r).unwrap();
        assert_eq!(
            v["result"]["isError"], true,
            "an isError result stays a result"
        );
        let odd = call_answer("1", Err("\"just a string\""));
        let v: Value = serde_json::from_str(&odd).unwrap();
        assert_eq!(v["error"]["code"], -32603);
    }

    #[test]
    fn the_session_table_is_bounded_and_forgets_the_least_recently_used() {
        let mut t = McpSessions::default();
        for i in 0..3 {
            t.uses += 1;
            let s = McpSession {
                caller: "c".into(),
                revision: REVISIONS[3],
                last_used: t.uses,
            };
            assert!(t.insert(format!("s{i}"), s, 3).is_none());
        }
        assert!(
            t.touch("s0", "c").is_some(),
            "s0 used again: s1 is now the oldest"
        );
        assert!(
            t.touch("s0", "other").is_none(),
            "a session is its opener's only"
        );
        t.uses += 1;
        let s = McpSession {
            caller: "c".into(),
            revision: REVISIONS[3],
            last_used: t.uses,
        };
        let evicted = t.insert("s3".into(), s, 3).expect("one forgotten");
        assert_eq!(evicted.last_used, 2, "the least recently used");
        assert_eq!(t.len(), 3);
        assert!(t.touch("s1", "c").is_none());
        assert!(t.touch("s0", "c").is_some());
        assert!(t.end("s0", "c"));
        assert!(!t.end("s0", "c"));
    }
}
