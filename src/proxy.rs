//! The proxy's state and the operations every layer shares.
//!
//! Owns everything the loop serves: configuration, signing secrets, the connection slab, the
//! registry, deliveries awaiting answers, the deadline structure, metrics and the audit trail.
//! The protocol handlers are `impl Proxy` blocks in their own modules (`api` for HTTP routes,
//! `control` for control sessions, `router` for federation semantics); the `reactor` owns the
//! sockets' readiness and calls in. This module holds only shared plumbing: ids and clocks,
//! writing to and closing connections, tokens and authentication.
//!
//! Invariant: a `ConnId` or `Slot` held anywhere is checked (generation) before use, so stale
//! references are harmless. Nothing here blocks or panics on peer input.

use crate::audit::{Audit, Event};
use crate::config::Config;
use crate::conn::{Closing, Conn, ConnId, ConnState};
use crate::jwt::{self, Claims, JwtError, TokenType};
use crate::metrics::Metrics;
use crate::registry::{Registry, Slot};
use crate::router::Pending;
use crate::timer::Timers;
use crate::ws::WsIo;
use slab::Slab;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

/// How long a closing connection may linger for the peer's close reply or EOF.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What a timer in the loop's deadline structure stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKey {
    /// A connection's own nearest deadline (handshake, idle, heartbeat, token, linger).
    Conn(ConnId),
    /// A delivery's answer timeout.
    Delivery(u64),
    /// A queued message's TTL.
    Ttl(Slot, u64),
    /// The next attempt to dial a server (§5).
    Dial(Slot),
}

/// An authentication failure, with the contract's status and code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    pub status: u16,
    pub code: &'static str,
}

impl AuthError {
    fn new(status: u16, code: &'static str) -> AuthError {
        AuthError { status, code }
    }

    pub fn message(&self) -> &'static str {
        match self.code {
            "missing_token" => "a bearer token is required",
            "malformed_token" => {
                "the token is not a well-formed HS256 JWT with the required claims"
            }
            "unsupported_alg" => "only HS256 tokens are accepted",
            "bad_signature" => "the token signature does not verify",
            "expired" => "the token has expired",
            "not_yet_valid" => "the token is not valid yet",
            "issued_in_future" => "the token was issued in the future",
            "wrong_type" => "the token is of the wrong type for this endpoint",
            "revoked" => "the token was revoked",
            _ => "the token was rejected",
        }
    }
}

impl From<JwtError> for AuthError {
    fn from(e: JwtError) -> AuthError {
        AuthError::new(401, e.code())
    }
}

/// Which tokens an endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Federation,
    Admin,
    Either,
}

pub struct Proxy {
    pub cfg: Config,
    /// The time of this loop turn, set by the reactor (the only reader of the clock) before
    /// it hands the turn's events in.
    pub now: crate::clock::Now,
    /// Verification keys: the current secret first, then the previous one (rotation).
    pub secrets: Vec<Vec<u8>>,
    pub conns: Slab<Conn>,
    next_generation: u32,
    pub registry: Registry,
    pub pending: HashMap<u64, Pending>,
    pub timers: Timers<TimerKey>,
    pub metrics: Metrics,
    pub audit: Audit,
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
    /// Lookups and connections dialling asked for this turn (the reactor's `dial` module
    /// carries them out; nothing here opens a socket).
    pub dial_requests: Vec<crate::outbound::DialRequest>,
    /// Name lookups in flight: lookup id → the server being dialled.
    pub lookups: HashMap<u64, Slot>,
    /// Set on SIGTERM/SIGINT: the instant the grace time ends.
    pub draining: Option<Instant>,
    /// The state log (`None`: memory only).
    pub store: Option<crate::store::state::Store>,
    /// Answers waiting for this turn's fsync.
    pub deferred: Vec<crate::durable::Deferred>,
    /// Resource files (`None` only if they could not be opened) and their index.
    pub blobs: Option<crate::store::blobs::Blobs>,
    pub resources: crate::resources::Index,
    /// Revoked token ids (`DELETE /v1/tokens/{jti}`).
    pub revocations: crate::revocations::Revocations,
    /// The rate limit of senders the registry had no room for (shared: still bounded).
    pub overflow_bucket: Option<crate::session::Bucket>,
    /// Set while the state dir cannot be written (readyz 503), with the error.
    pub degraded: Option<String>,
    seq: u64,
    boot_id: String,
    /// Where random ids come from (`Entropy::Os` but in simulation and fuzzing).
    pub entropy: Entropy,
}

/// Milliseconds since the epoch, read now: for `main` and tests. The loop uses `Proxy::now`.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Milliseconds of a seconds value (token claims are peer-supplied: saturate, never overflow).
pub fn secs_to_ms(secs: i64) -> i64 {
    secs.saturating_mul(1000)
}

/// Seconds since the epoch, read now: for `main` and tests. The loop uses `Proxy::now`.
pub fn now_secs() -> i64 {
    now_ms() / 1000
}

/// Where the proxy's random ids (message-id prefix, session ids, `jti`s, upgrade keys, backoff
/// jitter) come from: the OS, or, in the simulation and the fuzz harness, a generator seeded
/// so that every run of a seed is the same byte for byte. Secrets never come from here.
#[derive(Debug)]
pub enum Entropy {
    Os,
    Seeded(std::cell::Cell<u64>),
}

impl Entropy {
    /// Fills `buf`.
    pub fn fill(&self, buf: &mut [u8]) {
        match self {
            Entropy::Os => buf.copy_from_slice(&random_vec(buf.len())),
            Entropy::Seeded(state) => {
                for b in buf.iter_mut() {
                    // splitmix64, one byte a step: plenty for ids in a test.
                    let s = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
                    state.set(s);
                    let mut z = s;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    *b = (z ^ (z >> 31)) as u8;
                }
            }
        }
    }

    pub fn bytes<const N: usize>(&self) -> [u8; N] {
        let mut b = [0u8; N];
        self.fill(&mut b);
        b
    }
}

fn random_vec(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    if getrandom::fill(&mut v).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, x) in v.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8 ^ i as u8;
        }
    }
    v
}

/// Random bytes from the OS; an unusable OS source falls back to time-derived bytes
/// (only ever used for ids, never for secrets: `store` refuses to run without it).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if getrandom::fill(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8 ^ i as u8;
        }
    }
    b
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Proxy {
    /// A proxy whose first turn is at `now` (the reactor moves it on every turn after).
    pub fn new(cfg: Config, secret: Vec<u8>, audit: Audit, now: crate::clock::Now) -> Proxy {
        let mut secrets = vec![secret];
        if let Some(prev) = cfg.jwt_previous_secret.clone() {
            secrets.push(prev);
        }
        let conns = Slab::with_capacity(cfg.max_connections);
        let cfg_max_revocations = cfg.max_revocations;
        let registry = Registry::new(cfg.max_servers);
        Proxy {
            cfg,
            now,
            secrets,
            conns,
            next_generation: 1,
            registry,
            pending: HashMap::new(),
            timers: Timers::new(),
            metrics: Metrics::default(),
            audit,
            accept_order: std::collections::VecDeque::new(),
            dirty: Vec::new(),
            resume: Vec::new(),
            tls: None,
            tls_client: None,
            dial_requests: Vec::new(),
            lookups: HashMap::new(),
            draining: None,
            store: None,
            deferred: Vec::new(),
            blobs: None,
            resources: crate::resources::Index::default(),
            revocations: crate::revocations::Revocations::new(cfg_max_revocations),
            overflow_bucket: None,
            degraded: None,
            seq: 0,
            boot_id: hex(&random_bytes::<4>()),
            entropy: Entropy::Os,
        }
    }

    /// A fresh number for delivery ids and message ids.
    pub fn next_seq(&mut self) -> u64 {
        self.seq = self.seq.saturating_add(1);
        self.seq
    }

    /// Makes sure fresh sequence numbers come after `seq` (restored queues keep their order).
    pub fn bump_seq(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    /// A message id unique across restarts: a per-boot prefix and a sequence number.
    pub fn msg_id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.boot_id)
    }

    pub fn session_id(&self) -> String {
        hex(&self.entropy.bytes::<12>())
    }

    /// Random ids from a generator seeded with `seed` from now on (simulation, fuzzing), the
    /// message-id prefix included: a run of the same seed is the same byte for byte.
    pub fn seed_ids(&mut self, seed: u64) {
        self.entropy = Entropy::Seeded(std::cell::Cell::new(seed));
        self.boot_id = hex(&self.entropy.bytes::<4>());
    }

    /// Inserts a connection, giving it a fresh generation; `None` at capacity.
    pub fn insert_conn(&mut self, make: impl FnOnce(ConnId) -> Conn) -> Option<ConnId> {
        if self.conns.len() >= self.cfg.max_connections {
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
        if self.accept_order.len() > self.cfg.max_connections.saturating_mul(2) {
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
                self.metrics.displaced_total += 1;
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

    /// The bound on a session's unsent bytes: two of the largest messages and some slack.
    pub fn unsent_bound(&self) -> usize {
        self.cfg
            .max_message_bytes
            .saturating_mul(2)
            .saturating_add(64 * 1024)
    }

    /// The most a session's output may hold before the session is closed 1008: twice the
    /// soft bound. Past the soft bound deliveries are refused and the peer's input is not
    /// processed, so only answers already owed can get here: a peer that does not read.
    pub fn hard_output_bound(&self) -> usize {
        self.unsent_bound().saturating_mul(2)
    }

    /// Writes a text frame to a control session. False when the connection is gone or not a
    /// session (the caller treats the peer as offline), or when the frame would take the
    /// session's output past [`Proxy::hard_output_bound`] (the session is closed 1008).
    pub fn ws_send(&mut self, id: ConnId, text: String) -> bool {
        let hard = self.hard_output_bound();
        let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id) else {
            return false;
        };
        if conn.unsent().saturating_add(text.len()) > hard && matches!(conn.state, ConnState::Ws(_))
        {
            self.ws_close(id, 1008, "output over its bound: the peer does not read");
            return false;
        }
        let Some(conn) = self.conns.get_mut(id.idx as usize) else {
            return false;
        };
        let ConnState::Ws(ws) = &mut conn.state else {
            return false;
        };
        let mut io = WsIo {
            input: &[],
            out: &mut conn.out,
        };
        if let Err(e) = ws.ctx.write(&mut io, Message::text(text)) {
            log::debug!("conn {}: write failed: {e}", id.idx);
            return false;
        }
        self.dirty.push(id);
        true
    }

    /// Sends a ping on a control session.
    pub fn ws_ping(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id)
            && let ConnState::Ws(ws) = &mut conn.state
        {
            let mut io = WsIo {
                input: &[],
                out: &mut conn.out,
            };
            let _ = ws.ctx.write(&mut io, Message::Ping(Default::default()));
            self.dirty.push(id);
        }
    }

    /// Closes a control session with a close code: the close frame is queued, the session
    /// ends (registry, pending deliveries, audit), the connection lingers in `Closing`.
    pub fn ws_close(&mut self, id: ConnId, code: u16, reason: &str) {
        let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id) else {
            return;
        };
        let deadline = self.now.at + CLOSE_LINGER;
        let old = std::mem::replace(
            &mut conn.state,
            ConnState::Closing(Closing::Flushing { deadline }),
        );
        let ConnState::Ws(mut ws) = old else {
            conn.state = old;
            return;
        };
        let mut io = WsIo {
            input: &[],
            out: &mut conn.out,
        };
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        let _ = ws.ctx.close(&mut io, Some(frame));
        self.dirty.push(id);
        let peer = self.conn(id).map(|c| c.peer);
        self.end_session(id, ws.sess, reason, peer);
        self.rearm(id);
    }

    /// The peer of a control session went away (EOF without a close frame): the session
    /// ends now; answers already owed are still written before the socket closes.
    pub fn ws_peer_gone(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id.idx as usize).filter(|c| c.id == id) else {
            return;
        };
        let closing = Closing::Flushing {
            deadline: self.now.at + CLOSE_LINGER,
        };
        let old = std::mem::replace(&mut conn.state, ConnState::Closing(closing));
        let ConnState::Ws(ws) = old else {
            conn.state = old;
            return;
        };
        let peer = Some(conn.peer);
        let owed = conn.unsent() > 0;
        self.end_session(id, ws.sess, "connection lost", peer);
        if owed {
            self.dirty.push(id);
            self.rearm(id);
        } else {
            self.drop_conn(id, "connection lost");
        }
    }

    /// Removes a connection now, ending its session if it had one.
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
        let state = std::mem::replace(
            &mut conn.state,
            ConnState::Closing(Closing::FinSent {
                deadline: self.now.at,
            }),
        );
        match state {
            ConnState::Ws(ws) => self.end_session(id, ws.sess, why, Some(conn.peer)),
            ConnState::Dialing(d) => self.dial_failed(
                d.slot,
                crate::registry::OutPhase::Dialing(id),
                why.to_string(),
            ),
            _ => {}
        }
        // Deregistration happens implicitly when the socket is dropped (mio closes the fd,
        // which removes it from epoll).
        drop(conn);
    }

    /// Re-arms a connection's deadline when its nearest deadline moved earlier (or is unset).
    /// A deadline that moved later is left armed: it fires early and is recomputed.
    pub fn rearm(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get(id.idx as usize).filter(|c| c.id == id) else {
            return;
        };
        let want = match &conn.state {
            ConnState::Http(h) => match h.phase {
                crate::conn::HttpPhase::Waiting { .. } => None,
                _ => Some(h.deadline),
            },
            ConnState::Ws(ws) => Some(ws.sess.deadline()),
            ConnState::Dialing(d) => Some(d.deadline),
            ConnState::Closing(c) => Some(c.deadline()),
        };
        let armed = conn.timer;
        match (armed, want) {
            (Some(t), Some(w)) if t.at <= w => {}
            (armed, want) => {
                if let Some(t) = armed {
                    self.timers.cancel(t);
                }
                let new = want.map(|w| self.timers.insert(w, TimerKey::Conn(id)));
                if let Some(c) = self.conns.get_mut(id.idx as usize) {
                    c.timer = new;
                }
            }
        }
    }

    /// A server's signing key at `epoch` (contract §6):
    /// `HMAC-SHA256(secret, "fedmcp/v1/sign/" + serverId + "/" + epoch)`.
    pub fn signing_key_at(&self, server_id: &str, epoch: u64) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.secrets[0])
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"fedmcp/v1/sign/");
        mac.update(server_id.as_bytes());
        mac.update(b"/");
        mac.update(epoch.to_string().as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The current signing key of a server: its entry's, or (no entry yet) the one its
    /// next entry will get.
    pub fn signing_key(&self, server_id: &str) -> [u8; 32] {
        match self.registry.by_id(server_id) {
            Some(e) => e.signing_key,
            None => self.signing_key_at(server_id, self.registry.next_epoch(server_id)),
        }
    }

    /// A new registry entry for `server_id`, with the key epoch it is due.
    pub fn new_entry(&self, server_id: &str) -> crate::registry::Entry {
        let epoch = self.registry.next_epoch(server_id);
        crate::registry::Entry::new(
            server_id.to_string(),
            epoch,
            self.signing_key_at(server_id, epoch),
        )
    }

    /// The slot of `server_id`, inserting a "known" entry (not registered) when it has none.
    pub fn find_or_insert(
        &mut self,
        server_id: &str,
    ) -> Result<Slot, crate::registry::RegistryError> {
        match self.registry.find(server_id) {
            Some(s) => Ok(s),
            None => {
                let e = self.new_entry(server_id);
                self.registry.insert(e)
            }
        }
    }

    /// Mints a token for `server_id`, with a fresh random `jti`. Its `iat` is after any
    /// removal of that id, so a token issued now is never mistaken for one issued before the
    /// removal.
    pub fn mint(&self, server_id: &str, token_type: TokenType) -> (String, Claims) {
        let now = self.now.secs();
        let iat = match self.registry.removed_at(server_id) {
            Some(r) if token_type == TokenType::Federation => now.max(r.saturating_add(1)),
            _ => now,
        };
        let exp = iat + self.cfg.token_ttl_secs as i64;
        let claims = Claims {
            server_id: server_id.to_string(),
            token_type,
            iat,
            exp,
            nbf: None,
            jti: Some(hex(&self.entropy.bytes::<16>())),
        };
        (jwt::sign(&self.secrets[0], &claims), claims)
    }

    /// Verifies a presented token for an endpoint; failures are counted and audited (never
    /// with the token itself).
    pub fn authenticate(
        &mut self,
        token: Option<&str>,
        want: Want,
        peer: SocketAddr,
    ) -> Result<Claims, AuthError> {
        let r = self.check_token(token, want);
        if let Ok(c) = &r
            && let Some(jti) = &c.jti
            && self.revocations.saw(jti, c.exp)
        {
            // A revoked jti seen with a later expiry: remembered (durably) that long.
            let op = crate::store::state::Op::Revoke {
                jti: jti.clone(),
                until: c.exp,
            };
            // Not an answer anyone waits on: its record is not needed.
            let _ = self.persist(op);
        }
        let r = match r {
            Ok(c)
                if c.jti
                    .as_deref()
                    .is_some_and(|j| self.revocations.is_revoked(j)) =>
            {
                Err(AuthError::new(401, "revoked"))
            }
            r => r,
        };
        if let Err(e) = &r {
            self.metrics.auth_failure(e.code);
            self.audit.record(
                self.now.wall_ms,
                Event::AuthFailed,
                None,
                Some(peer),
                Some(e.code),
            );
        }
        r
    }

    fn check_token(&self, token: Option<&str>, want: Want) -> Result<Claims, AuthError> {
        let token = token.ok_or(AuthError::new(401, "missing_token"))?;
        let keys: Vec<&[u8]> = self.secrets.iter().map(|s| s.as_slice()).collect();
        let claims = jwt::verify(
            token,
            &keys,
            self.now.secs(),
            self.cfg.clock_skew_secs as i64,
        )?;
        let type_ok = match want {
            Want::Federation => claims.token_type == TokenType::Federation,
            Want::Admin => claims.token_type == TokenType::Admin,
            Want::Either => true,
        };
        if !type_ok {
            return Err(AuthError::new(403, "wrong_type"));
        }
        if claims.token_type == TokenType::Federation
            && let Some(removed) = self.registry.removed_at(&claims.server_id)
            && claims.iat <= removed
        {
            return Err(AuthError::new(401, "revoked"));
        }
        Ok(claims)
    }

    pub fn audit(
        &mut self,
        event: Event,
        server_id: Option<&str>,
        peer: Option<SocketAddr>,
        reason: Option<&str>,
    ) {
        self.audit
            .record(self.now.wall_ms, event, server_id, peer, reason);
    }

    /// SIGHUP: reload the certificate and key from the configured paths; a bad pair keeps
    /// the old one (the proxy keeps serving) and is logged.
    pub fn reload_tls(&mut self) {
        let (Some(cert), Some(key)) = (self.cfg.tls_cert.clone(), self.cfg.tls_key.clone()) else {
            log::info!("SIGHUP: no TLS certificate configured, nothing to reload");
            return;
        };
        match crate::tls::load(&cert, &key) {
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

    pub fn ready(&self) -> bool {
        self.draining.is_none()
    }
}
