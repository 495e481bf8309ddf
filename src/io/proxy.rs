//! The reactor's side of the proxy: connections, their sockets' buffers, and the core.
//!
//! Owns the connection slab (sockets, TLS sessions, output buffers, connection states), the
//! connections' deadlines (HTTP head and idle, dialling handshake, close linger), which
//! control session runs on which connection, and the [`Federation`] core it drives. It turns
//! what the connections carry into calls on the core (a text frame, a session lost, an HTTP
//! request), and the core's [`Action`]s into writes, closes and dials ([`Proxy::apply`]).
//! The WebSocket framing of a control session (tungstenite over the connection's buffers,
//! binary frames 1003, oversize 1009, bad UTF-8 1007, protocol errors 1002, input held back
//! while the output is over its bound) is here too; what a frame means is the core's.
//!
//! Invariant: a `ConnId` held anywhere is checked (generation) before use, so stale
//! references are harmless; a session's link to its connection is removed when either ends.
//! Nothing here blocks or panics on peer input, and nothing here decides federation
//! semantics.

use crate::audit::Audit;
use crate::config::Config;
use crate::federation::Federation;
use crate::federation::action::{Action, Answer, LinkId, RequestId, SessionId};
use crate::io::conn::{Carries, Conn, ConnId, ConnState};
use crate::io::pool::{BufPool, CtxPool, ctx_of, out_buf};
use crate::proto::ws::{Incoming, WsIo};
use crate::timer::Timers;
use slab::Slab;
use std::time::{Duration, Instant};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

/// How long a closing connection may linger for the peer's close reply or EOF.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

pub struct Proxy {
    /// The federation core.
    pub fed: Federation,
    pub conns: Slab<Conn>,
    next_generation: u32,
    /// Connections' own deadlines (sessions' deadlines are the core's).
    pub timers: Timers<ConnId>,
    /// Accepted connections in accept order, for displacing the oldest unauthenticated one at
    /// `FEDMCP_MAX_CONNECTIONS` (entries of connections gone or authenticated are skipped
    /// and dropped lazily; compacted past twice the capacity).
    pub accept_order: std::collections::VecDeque<ConnId>,
    /// Connections with output to flush at the end of the turn.
    pub dirty: Vec<ConnId>,
    /// HTTP connections to process again (an asynchronous answer was written).
    pub resume: Vec<ConnId>,
    /// The TLS configuration new connections get (`None`: plain listener). Replaced on
    /// SIGHUP; connections keep the configuration they started with.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// The TLS client configuration for `wss://` servers the proxy dials (from
    /// `FEDMCP_TRUSTED_CA_FILE` at start, or the bundled roots on first use).
    pub tls_client: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Lookups and connections the core asked for, for the reactor's `dial` module.
    pub dial_requests: Vec<crate::federation::action::DialRequest>,
    /// Which connection carries each session, indexed by the session's table index.
    links: Vec<Option<(SessionId, ConnId)>>,
    /// The actions being carried out (kept to reuse its capacity).
    spare: Vec<Action>,
    /// Output buffers lent to connections while they have output (idle ones hold none).
    pub out_pool: BufPool,
    /// WebSocket contexts lent to sessions while a frame is under way (idle ones hold none).
    pub ctx_pool: CtxPool,
    /// The unmasked text of a frame read without tungstenite (`ws::simple_text`), kept
    /// between calls (capacity at most one message; freed when over 64 KiB).
    ws_text: Vec<u8>,
    /// The disk thread that writes the core's commits to the state log (`None`: memory
    /// only), and whether the next commit carries a snapshot (the log has grown).
    pub disk: Option<crate::io::disk::Disk>,
    pub compact_next: bool,
    /// Uploads being synced by the disk thread, by job token.
    pub finishing: std::collections::HashMap<u64, crate::io::disk::Finishing>,
    pub next_finishing: u64,
    /// Resource files (`None` only if they could not be opened).
    pub blobs: Option<crate::store::blobs::Blobs>,
    /// What the core asked of the cluster's NATS connection, for the reactor's `nats` module.
    pub nats_out: Vec<crate::federation::action::NatsOut>,
}

impl Proxy {
    /// A proxy whose first turn is at `now` (the reactor moves it on every turn after).
    pub fn new(cfg: Config, secret: Vec<u8>, audit: Audit, now: crate::clock::Now) -> Proxy {
        let conns = Slab::with_capacity(cfg.max_connections);
        let cfg_max_message_bytes = cfg.max_message_bytes;
        Proxy {
            fed: Federation::new(cfg, secret, audit, now),
            conns,
            next_generation: 1,
            timers: Timers::new(),
            accept_order: std::collections::VecDeque::new(),
            dirty: Vec::new(),
            resume: Vec::new(),
            tls: None,
            tls_client: None,
            dial_requests: Vec::new(),
            links: Vec::new(),
            spare: Vec::new(),
            out_pool: BufPool::new(),
            ctx_pool: CtxPool::new(cfg_max_message_bytes),
            ws_text: Vec::new(),
            disk: None,
            compact_next: false,
            finishing: std::collections::HashMap::new(),
            next_finishing: 0,
            blobs: None,
            nats_out: Vec::new(),
        }
    }

    /// The configuration (the core's copy).
    pub fn cfg(&self) -> &Config {
        &self.fed.cfg
    }

    /// Inserts a connection, giving it a fresh generation; `None` at capacity.
    pub fn insert_conn(&mut self, make: impl FnOnce(ConnId) -> Conn) -> Option<ConnId> {
        if self.conns.len() >= self.fed.cfg.max_connections {
            return None;
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let entry = self.conns.vacant_entry();
        let id = ConnId {
            idx: entry.key() as u32,
            generation,
        };
        entry.insert(make(id));
        Some(id)
    }

    /// Whether a connection may be displaced for a new one (contract §1): it never presented
    /// a valid token (or it is only finishing its close).
    fn displaceable(&self, id: ConnId) -> bool {
        self.conn(id).is_some_and(|c| match &c.state {
            ConnState::Http(h) => !h.authenticated,
            ConnState::Closing(_) => true,
            _ => false,
        })
    }

    /// Records an accepted connection for [`Proxy::displace_one`].
    pub fn accepted(&mut self, id: ConnId) {
        self.accept_order.push_back(id);
        if self.accept_order.len() > self.fed.cfg.max_connections.saturating_mul(2) {
            let order = std::mem::take(&mut self.accept_order);
            self.accept_order = order
                .into_iter()
                .filter(|&c| self.displaceable(c))
                .collect();
        }
    }

    /// At `FEDMCP_MAX_CONNECTIONS`: drops the oldest connection that never presented a valid
    /// token, making room for a new one. False when every held connection is authenticated
    /// (the new one is then refused `503`).
    pub fn displace_one(&mut self) -> bool {
        while let Some(id) = self.accept_order.pop_front() {
            if self.displaceable(id) {
                self.fed.metrics.displaced_total += 1;
                self.drop_conn(id, "displaced: FEDMCP_MAX_CONNECTIONS reached");
                return true;
            }
        }
        false
    }

    pub fn conn(&self, id: ConnId) -> Option<&Conn> {
        self.conns.get(id.idx as usize).filter(|c| c.id == id)
    }

    pub fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(id.idx as usize).filter(|c| c.id == id)
    }

    pub fn mark_dirty(&mut self, id: ConnId) {
        self.dirty.push(id);
    }

    /// The request id the core is given for a request on connection `id`.
    pub fn request_id(id: ConnId) -> RequestId {
        RequestId(id.token().0 as u64)
    }

    /// The dialling link id the core is given for connection `id`.
    pub fn link_id(id: ConnId) -> LinkId {
        LinkId(id.token().0 as u64)
    }

    fn conn_of_token(t: u64) -> ConnId {
        ConnId::from_token(mio::Token(t as usize))
    }

    // ---- sessions on connections ------------------------------------------------------

    /// Records that `session` runs on connection `conn`.
    pub fn link(&mut self, session: SessionId, conn: ConnId) {
        let i = session.idx as usize;
        if self.links.len() <= i {
            self.links.resize(i + 1, None);
        }
        self.links[i] = Some((session, conn));
    }

    fn unlink(&mut self, session: SessionId) {
        if let Some(l) = self.links.get_mut(session.idx as usize)
            && l.is_some_and(|(s, _)| s == session)
        {
            *l = None;
        }
    }

    /// The connection a session runs on.
    pub fn conn_of(&self, session: SessionId) -> Option<ConnId> {
        match self.links.get(session.idx as usize) {
            Some(Some((s, c))) if *s == session => Some(*c),
            _ => None,
        }
    }

    /// The session on a connection.
    pub fn session_of(&self, id: ConnId) -> Option<SessionId> {
        match &self.conn(id)?.state {
            ConnState::Ws(ws) => match ws.carries {
                Carries::Control(s) => Some(s),
                Carries::Mcp(_) => None,
            },
            _ => None,
        }
    }

    /// What a WebSocket connection carries.
    fn carries(&self, id: ConnId) -> Option<Carries> {
        match &self.conn(id)?.state {
            ConnState::Ws(ws) => Some(ws.carries),
            _ => None,
        }
    }

    /// Turns an upgraded connection into the carrier of `session`: WebSocket framing in
    /// `role`, no input held back.
    pub fn attach(&mut self, id: ConnId, session: SessionId, role: tungstenite::protocol::Role) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        if let Some(t) = conn.timer.take() {
            self.timers.cancel(t);
        }
        if let Some(conn) = self.conn_mut(id) {
            conn.carry_session(role, Carries::Control(session));
        }
        self.link(session, id);
    }

    /// Turns an upgraded `GET /mcp` into an MCP client's session (§9), named to the core by
    /// the connection's link id.
    pub fn attach_mcp(&mut self, id: ConnId) -> LinkId {
        let link = Self::link_id(id);
        if let Some(t) = self.conn_mut(id).and_then(|c| c.timer.take()) {
            self.timers.cancel(t);
        }
        if let Some(conn) = self.conn_mut(id) {
            conn.carry_session(tungstenite::protocol::Role::Server, Carries::Mcp(link));
        }
        link
    }

    /// Carries out what the core asked for, in order, until it asks nothing more.
    pub fn apply(&mut self) {
        while self.fed.has_actions() {
            let mut batch = std::mem::take(&mut self.spare);
            self.fed.swap_actions(&mut batch);
            for a in batch.drain(..) {
                self.act(a);
            }
            self.spare = batch;
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Send { session, text } => {
                // The core counted the frame (`Federation::ws_send`); the count is set to
                // the connection's after each flush.
                if let Some(id) = self.conn_of(session) {
                    self.ws_send_frame(id, 0x1, text);
                }
            }
            Action::Ping { session } => {
                if let Some(id) = self.conn_of(session) {
                    self.ws_send_frame(id, 0x9, String::new());
                }
            }
            Action::Close {
                session,
                code,
                reason,
            } => {
                if let Some(id) = self.conn_of(session) {
                    self.unlink(session);
                    self.ws_close_conn(id, code, &reason);
                }
            }
            Action::Drop { session, why } => {
                if let Some(id) = self.conn_of(session) {
                    self.unlink(session);
                    self.drop_conn(id, &why);
                }
            }
            Action::Respond { req, resp } => {
                let id = Self::conn_of_token(req.0);
                match resp {
                    Answer::Rpc(r) => self.http_async_answer(id, r),
                    Answer::Http(r) => self.http_finish(id, r),
                    Answer::Mcp(text) => {
                        self.http_finish(id, crate::api::Resp::json(200, text.into_bytes()))
                    }
                }
            }
            Action::Dial(req) => self.dial_requests.push(req),
            Action::StopDial { link, why } => self.drop_conn(Self::conn_of_token(link.0), &why),
            Action::McpSend { link, text } => {
                let id = Self::conn_of_token(link.0);
                let hard = self.fed.hard_output_bound();
                let over = self
                    .conn(id)
                    .is_some_and(|c| c.unsent().saturating_add(text.len()) > hard);
                if over {
                    // An MCP client that does not read its answers (§9 bounds as §4's).
                    self.mcp_close(id, 1008, "output over its bound: the peer does not read");
                } else {
                    self.ws_send_frame(id, 0x1, text);
                }
            }
            Action::Nats(out) => {
                if self.fed.cluster.is_some() {
                    self.nats_out.push(out);
                }
            }
            Action::RemoveResources { owner, names } => {
                // Uploads of the removed server still being synced are not put in place.
                for f in self.finishing.values_mut() {
                    f.cancel_if_owned_by(&owner);
                }
                if let Some(Err(e)) = self.blobs.as_mut().map(|b| b.remove_owner(&owner, &names)) {
                    log::error!("resources of a removed server could not all be deleted: {e}");
                }
            }
        }
    }

    /// Writes a text (0x1) or ping (0x9) frame into a session connection's output: an
    /// accepted session's (server role, unmasked) straight into the buffer, a dialled one's
    /// (client role, masked) through tungstenite.
    fn ws_send_frame(&mut self, id: ConnId, opcode: u8, text: String) {
        let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id) else {
            return;
        };
        let ConnState::Ws(ws) = &mut conn.state else {
            return;
        };
        if ws.role == tungstenite::protocol::Role::Server {
            let out = out_buf(&mut self.out_pool, &mut conn.out);
            crate::proto::ws::server_frame(out, opcode, text.as_bytes());
            self.dirty.push(id);
            return;
        }
        let m = if opcode == 0x9 {
            Message::Ping(Default::default())
        } else {
            Message::text(text)
        };
        self.ws_write(id, m);
    }

    /// Writes a WebSocket message into a session connection's output through tungstenite.
    fn ws_write(&mut self, id: ConnId, m: Message) {
        let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id) else {
            return;
        };
        let ConnState::Ws(ws) = &mut conn.state else {
            return;
        };
        let mut io = WsIo {
            input: &[],
            out: out_buf(&mut self.out_pool, &mut conn.out),
        };
        // The context stays lent until the session's input is read to `More` (it may hold
        // a frame it read ahead): `flush_ws_replies` gives it back.
        let ctx = ctx_of(&mut self.ctx_pool, &mut ws.ctx, ws.role);
        let written = ctx.write(&mut io, m);
        if let Err(e) = written {
            log::debug!("conn {}: write failed: {e}", id.idx);
            return;
        }
        self.dirty.push(id);
    }

    /// A WebSocket connection's session ended from the connection's side: the core forgets it.
    fn session_gone(&mut self, carries: Carries, why: &str) {
        match carries {
            Carries::Control(session) => {
                self.unlink(session);
                self.fed.session_lost(session, why);
            }
            Carries::Mcp(link) => self.fed.mcp_ws_closed(link),
        }
    }

    /// Closes an MCP client's WebSocket with `code` (a framing error, its close, a peer that
    /// does not read): the close frame, the core forgets the session.
    fn mcp_close(&mut self, id: ConnId, code: u16, why: &str) {
        if let Some(Carries::Mcp(link)) = self.carries(id) {
            self.fed.mcp_ws_closed(link);
            self.ws_close_conn(id, code, why);
        }
    }

    /// Writes a close frame on a session connection whose session is over, and lets the
    /// connection linger in `Closing` for the peer's reply.
    fn ws_close_conn(&mut self, id: ConnId, code: u16, reason: &str) {
        let deadline = self.fed.now.at + CLOSE_LINGER;
        let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id) else {
            return;
        };
        let Some(mut ws) = conn.end_session(deadline) else {
            return;
        };
        let mut io = WsIo {
            input: &[],
            out: out_buf(&mut self.out_pool, &mut conn.out),
        };
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        let mut ctx = ws.ctx.take().unwrap_or_else(|| self.ctx_pool.take(ws.role));
        let _ = ctx.close(&mut io, Some(frame));
        self.ctx_pool.put(ctx, ws.role);
        self.dirty.push(id);
        self.rearm(id);
    }

    /// Bytes from the socket for the session on `id`: every complete message goes to the
    /// core; framing errors close the session with the contract's code.
    pub fn ws_input(&mut self, id: ConnId, mut input: &[u8]) {
        let Some(carries) = self.carries(id) else {
            return;
        };
        if let Carries::Control(session) = carries {
            self.fed.session_heard(session);
        }
        let bound = self.fed.unsent_bound();
        let max = self.fed.cfg.max_message_bytes;
        let fail = |p: &mut Proxy, code: u16, why: &str| match carries {
            Carries::Control(session) => {
                p.fed.close_session(session, code, why);
                p.apply();
            }
            Carries::Mcp(_) => p.mcp_close(id, code, why),
        };
        // Unmasked text of the frames read without tungstenite (reused within the call).
        let mut text_buf = std::mem::take(&mut self.ws_text);
        loop {
            // The common frame (whole, unfragmented, masked, valid text) while the stream is
            // between messages: read here, with no context and no allocation.
            let fast = {
                let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id) else {
                    return;
                };
                let ConnState::Ws(ws) = &mut conn.state else {
                    return;
                };
                // Only with no context lent: one in use may hold a whole frame it read ahead
                // and has not returned yet, which must come first.
                let at_rest = ws.frames.idle() && ws.ctx.is_none();
                let within = conn.out.len() - conn.out_pos <= bound;
                match at_rest && within && ws.role == tungstenite::protocol::Role::Server {
                    true => crate::proto::ws::simple_text(input, max, &mut text_buf),
                    false => None,
                }
                .map(|(text, used)| {
                    ws.frames.feed(&input[..used]);
                    (text, used)
                })
            };
            if let Some((text, used)) = fast {
                input = &input[used..];
                match carries {
                    Carries::Control(session) => self.fed.on_text(session, text),
                    Carries::Mcp(link) => self.fed.mcp_ws_text(link, text),
                }
                self.apply();
                continue;
            }
            // Nothing left to read and no context lent (one in use may still hold a whole
            // frame it read ahead: it is asked until it says `More`).
            if input.is_empty()
                && self
                    .conn(id)
                    .is_some_and(|c| matches!(&c.state, ConnState::Ws(ws) if ws.ctx.is_none()))
            {
                break;
            }
            let r = {
                let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id) else {
                    return;
                };
                let ConnState::Ws(ws) = &mut conn.state else {
                    return;
                };
                if conn.out.len() - conn.out_pos > bound && !input.is_empty() {
                    // The peer is not reading its answers: keep the rest of the input for
                    // when the output drains, and read nothing more until then.
                    ws.stash.extend_from_slice(input);
                    break;
                }
                let mut io = WsIo {
                    input,
                    out: out_buf(&mut self.out_pool, &mut conn.out),
                };
                let ctx = ctx_of(&mut self.ctx_pool, &mut ws.ctx, ws.role);
                let r = crate::proto::ws::next_message(ctx, &mut io);
                ws.frames.feed(&input[..input.len() - io.input.len()]);
                input = io.input;
                r
            };
            match r {
                Incoming::Text(t) => {
                    match carries {
                        Carries::Control(session) => self.fed.on_text(session, t.as_str()),
                        Carries::Mcp(link) => self.fed.mcp_ws_text(link, t.as_str()),
                    }
                    self.apply();
                }
                Incoming::Control => {}
                Incoming::More => break,
                Incoming::Closed => {
                    self.flush_ws_replies(id);
                    return fail(self, 1000, "closed by peer");
                }
                Incoming::Fail { code, why } => return fail(self, code, why),
            }
        }
        if text_buf.capacity() <= 64 * 1024 {
            self.ws_text = text_buf;
        }
        self.flush_ws_replies(id);
    }

    /// Moves tungstenite's owed control frames (pongs, close replies) into the output, then
    /// gives back the session's read memory if its peer is between messages.
    fn flush_ws_replies(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id)
            && let ConnState::Ws(ws) = &mut conn.state
        {
            if let Some(ctx) = ws.ctx.as_mut() {
                crate::proto::ws::flush_owed(ctx, out_buf(&mut self.out_pool, &mut conn.out));
                if crate::proto::ws::at_rest(ctx, &ws.frames)
                    && let Some(ctx) = ws.ctx.take()
                {
                    self.ctx_pool.put(ctx, ws.role);
                }
            }
            if conn.unsent() > 0 {
                self.dirty.push(id);
            }
        }
    }

    /// A session's output was written out: input held back while it was over its bound is
    /// processed now, and the core learns it has room (queued messages go out).
    pub fn ws_drained(&mut self, id: ConnId) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let ConnState::Ws(ws) = &mut conn.state else {
            return;
        };
        let carries = ws.carries;
        let stash = std::mem::take(&mut ws.stash);
        if !stash.is_empty() {
            self.ws_input(id, &stash);
        }
        if let Carries::Control(session) = carries {
            let unsent = self.conn(id).map_or(0, Conn::unsent);
            self.fed.session_drained(session, unsent);
            self.apply();
        }
    }

    /// The peer of a control session went away (EOF without a close frame): the session
    /// ends now; answers already owed are still written before the socket closes.
    pub fn ws_peer_gone(&mut self, id: ConnId) {
        let deadline = self.fed.now.at + CLOSE_LINGER;
        let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id) else {
            return;
        };
        let Some(ws) = conn.end_session(deadline) else {
            return;
        };
        let owed = conn.unsent() > 0;
        self.session_gone(ws.carries, "connection lost");
        if owed {
            self.dirty.push(id);
            self.rearm(id);
        } else {
            self.drop_conn(id, "connection lost");
        }
    }

    /// Removes a connection now, ending its session (or its dialling attempt) if it had one.
    pub fn drop_conn(&mut self, id: ConnId, why: &str) {
        if self.conn(id).is_none() {
            return;
        }
        self.abandon_upload(id);
        let mut conn = self.conns.remove(id.idx as usize);
        if let Some(t) = conn.timer.take() {
            self.timers.cancel(t);
        }
        log::debug!("conn {} from {}: closed ({why})", id.idx, conn.peer);
        match conn.take_state(self.fed.now.at) {
            ConnState::Ws(ws) => self.session_gone(ws.carries, why),
            ConnState::Dialing(d) => self.fed.dial_failed(
                d.plan.slot,
                crate::federation::registry::OutPhase::Dialing(Self::link_id(id)),
                why.to_string(),
            ),
            _ => {}
        }
        // Deregistration happens implicitly when the socket is dropped (mio closes the fd,
        // which removes it from epoll).
        drop(conn);
    }

    /// Re-arms a connection's deadline when its nearest deadline moved earlier (or is unset).
    /// A deadline that moved later is left armed: it fires early and is recomputed. A
    /// session connection has none of its own (its session's deadlines are the core's).
    pub fn rearm(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get(id.idx as usize).filter(|c| c.id == id) else {
            return;
        };
        let want = match &conn.state {
            ConnState::Http(h) => match h.phase {
                crate::io::conn::HttpPhase::Waiting { .. } => None,
                _ => Some(h.deadline),
            },
            ConnState::Ws(_) => None,
            ConnState::Dialing(d) => Some(d.plan.deadline),
            ConnState::Closing(c) => Some(c.deadline()),
        };
        let armed = conn.timer;
        match (armed, want) {
            (Some(t), Some(w)) if t.at <= w => {}
            (armed, want) => {
                if let Some(t) = armed {
                    self.timers.cancel(t);
                }
                let new = want.map(|w| self.timers.insert(w, id));
                if let Some(c) = self.conns.get_mut(id.idx as usize) {
                    c.timer = new;
                }
            }
        }
    }

    /// The nearest deadline, the connections' and the core's.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.timers.next_deadline(), self.fed.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// A connection's deadline fired.
    fn conn_timer(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conn(id) else { return };
        match &conn.state {
            ConnState::Http(_) => self.http_timer(id, now),
            ConnState::Ws(_) => {}
            ConnState::Dialing(d) => {
                if now >= d.plan.deadline {
                    self.drop_conn(id, "handshake timeout");
                }
            }
            ConnState::Closing(c) => {
                if now >= c.deadline() {
                    self.drop_conn(id, "close linger over");
                }
            }
        }
    }

    /// Fires every deadline due at `now`: the connections', then the core's; then carries
    /// out what they asked for.
    pub fn fire_due(&mut self, now: Instant) {
        while let Some(id) = self.timers.pop_due(now) {
            if let Some(c) = self.conn_mut(id) {
                c.timer = None;
            }
            self.conn_timer(id, now);
            self.rearm(id);
        }
        self.fed.fire_due(now);
        self.apply();
    }

    /// Hands the state dir's log to the disk thread, which writes the core's commits from
    /// now on (it wakes the loop through `waker` when one is done).
    pub fn attach_store(
        &mut self,
        store: crate::store::state::Store,
        waker: std::sync::Arc<mio::Waker>,
    ) -> std::io::Result<()> {
        self.compact_next = store.wants_compaction();
        // One commit, and one job per connection finishing an upload.
        let max_jobs = self.fed.cfg.max_connections + 1;
        self.disk = Some(crate::io::disk::Disk::start(store, waker, max_jobs)?);
        self.fed.batch = Some(crate::store::state::Batch::default());
        Ok(())
    }

    /// The end of a turn: the records made since the last commit go to the disk thread
    /// (one fsync for all of them), unless a commit is still being written: then they go
    /// with the next. The answers that wait on them go out when it is done
    /// ([`Proxy::disk_done`]). The loop never waits for the disk.
    pub fn commit(&mut self) {
        if self.disk.is_none() {
            return; // memory only: nothing is written, no answer waits on a write
        }
        let Some(bytes) = self.fed.begin_commit() else {
            return;
        };
        // The snapshot is the whole state as of this commit (what is on disk plus its
        // records), taken here, where nothing can change it; the thread writes it.
        let snapshot = std::mem::take(&mut self.compact_next).then(|| self.fed.state_ops());
        let job = crate::io::disk::Job::Commit { bytes, snapshot };
        let sent = match self.disk.as_mut() {
            Some(disk) => disk.send(job),
            None => Err(job),
        };
        if let Err(job) = sent {
            // Cannot happen (one commit at a time): say so, and fail it rather than wait.
            log::error!("disk thread refused a commit ({job:?} dropped)");
            self.fed
                .committed(Err("the disk thread is not taking work".into()));
            self.apply();
        }
    }

    /// The disk thread woke the loop: finished commits release (or fail) what waited on
    /// them.
    pub fn disk_done(&mut self) {
        let Some(disk) = self.disk.as_mut() else {
            return;
        };
        for done in disk.take_done() {
            match done {
                crate::io::disk::Done::Committed {
                    result,
                    compacted,
                    wants_compaction,
                } => self.on_committed(result, compacted, wants_compaction),
                crate::io::disk::Done::UploadSynced { token, result } => {
                    self.upload_synced(token, result)
                }
                crate::io::disk::Done::DirSynced { token, result } => {
                    self.upload_dir_synced(token, result)
                }
            }
        }
    }

    fn on_committed(
        &mut self,
        result: Result<(), String>,
        compacted: Option<Result<(u64, usize), String>>,
        wants_compaction: bool,
    ) {
        match compacted {
            Some(Ok((before, records))) => log::info!(
                "state log compacted: {before} bytes into a snapshot of {records} records"
            ),
            Some(Err(e)) => log::error!("state log compaction failed (the log is kept): {e}"),
            None => {}
        }
        self.compact_next = wants_compaction && result.is_ok();
        self.fed.committed(result);
        self.apply();
    }

    /// At exit: waits for the commit being written, writes what is left with one more, and
    /// stops the disk thread (the only place the loop's thread waits for the disk).
    pub fn close_disk(&mut self) {
        use crate::io::disk::{Done, Job};
        let Some(mut disk) = self.disk.take() else {
            return;
        };
        // The commit's answer, past any upload's (uploads still finishing are not answered:
        // their connections close with the process, and their files stay temporary).
        let wait = |disk: &mut crate::io::disk::Disk| loop {
            match disk.wait_done() {
                Some(Done::Committed { result, .. }) => return result,
                Some(Done::UploadSynced { .. } | Done::DirSynced { .. }) => {}
                None => return Err("the disk thread stopped".to_string()),
            }
        };
        if self.fed.commit_in_flight() {
            let r = wait(&mut disk);
            self.fed.committed(r);
            self.apply();
        }
        if let Some(bytes) = self.fed.begin_commit() {
            let r = match disk.send(Job::Commit {
                bytes,
                snapshot: None,
            }) {
                Ok(()) => wait(&mut disk),
                Err(_) => Err("the disk thread is not taking work".to_string()),
            };
            self.fed.committed(r);
            self.apply();
        }
        let _ = disk.stop();
    }

    /// SIGHUP: reload the certificate and key from the configured paths; a bad pair keeps
    /// the old one (the proxy keeps serving) and is logged.
    pub fn reload_tls(&mut self) {
        let (Some(cert), Some(key)) = (self.fed.cfg.tls_cert.clone(), self.fed.cfg.tls_key.clone())
        else {
            log::info!("SIGHUP: no TLS certificate configured, nothing to reload");
            return;
        };
        match crate::io::tls::load(&cert, &key) {
            Ok(cfg) => {
                self.tls = Some(cfg);
                log::info!(
                    "SIGHUP: TLS certificate and key reloaded from {}",
                    cert.display()
                );
            }
            Err(e) => log::error!("SIGHUP: keeping the current certificate: {e}"),
        }
    }
}
