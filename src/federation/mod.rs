//! The federation core: everything the proxy decides, keyed by session, with no socket in it.
//!
//! Owns the registry, the control sessions' protocol state (welcome, heartbeat, rate-limit
//! run, token expiry, batches, unanswered deliveries), routing, pending deliveries, queues,
//! revocations, the resource index, the durability policy (what is written, which answers
//! wait for the turn's fsync), dialling decisions, tokens and authentication, metrics and
//! the audit trail. Its deadlines (deliveries, TTLs, sessions, dial backoff) are in its own
//! [`Timers`]: the reactor asks for the nearest one and calls [`Federation::fire_due`].
//!
//! Interface: the reactor (or the simulation, or a fuzz target) calls the core with what
//! happened — a session opened ([`Federation::open_session`]), a text frame arrived
//! ([`Federation::on_text`]), a session's output drained, a session was lost, an HTTP
//! request for a route, a lookup answered, a timer is due — with the turn's time in
//! [`Federation::now`]. The core answers through its outbox: [`Action`]s the caller drains
//! with [`Federation::take_actions`] and carries out in order (write a frame, close a
//! session, answer a request, dial). The seams for other front ends and transports are
//! [`SessionId`] (a local session today; anything that carries frames tomorrow) and
//! [`RequestId`](action::RequestId) (an HTTP request today).
//!
//! Invariants: the core never holds a socket, a `mio` handle or a clock; ids it hands out
//! (`SessionId`, registry `Slot`) carry a generation, so a stale one never reaches a newer
//! session; every peer-driven table it holds is bounded by configuration. It never panics
//! on peer input.

pub mod action;
pub mod cluster;
pub mod control;
pub mod durable;
pub mod mcp;
pub mod outbound;
pub mod pending;
pub mod queue;
pub mod rate;
pub mod registry;
pub mod resources;
pub mod revocations;
pub mod router;
pub mod session;

use action::{Action, CoreTimer, SessionId};

use crate::audit::{Audit, Event};
use crate::config::Config;
use crate::federation::action::Slot;
use crate::federation::pending::Pending;
use crate::federation::registry::Registry;
use crate::federation::session::Session;
use crate::metrics::Metrics;
use crate::proto::jwt::{self, Claims, JwtError, TokenType};
use crate::random::{Entropy, hex, random_bytes};
use crate::timer::Timers;
use slab::Slab;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

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

impl Want {
    fn takes(self, t: TokenType) -> bool {
        match self {
            Want::Federation => t == TokenType::Federation,
            Want::Admin => t == TokenType::Admin,
            Want::Either => true,
        }
    }
}

/// The bytes a text frame of `len` bytes takes in a session's output: the WebSocket header
/// of a server frame (2, 4 or 10 bytes; a dialled session's client frames add a 4-byte mask,
/// which the reactor's count after the flush corrects).
fn frame_bytes(len: usize) -> usize {
    len + match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

pub struct Federation {
    pub cfg: Config,
    /// The time of this turn, set by whoever drives the core (the reactor reads the clock
    /// once per turn; the simulation moves it by hand).
    pub now: crate::clock::Now,
    /// Verification keys: the current secret first, then the previous one (rotation).
    pub secrets: Vec<Vec<u8>>,
    pub registry: Registry,
    /// Control sessions' protocol state. An ended session's entry stays (`None`) until the
    /// actions that name it are taken, so its index is not reused by a session opened in
    /// the same call: an action's `SessionId` always means the session it was asked for.
    sessions: Slab<Option<Session>>,
    /// Entries of ended sessions, freed when the outbox is next taken.
    retired: Vec<usize>,
    next_generation: u32,
    pub pending: HashMap<u64, Pending>,
    /// The core's deadlines.
    pub timers: Timers<CoreTimer>,
    pub metrics: Metrics,
    pub audit: Audit,
    /// Set on SIGTERM/SIGINT: the instant the grace time ends.
    pub draining: Option<Instant>,
    /// The turn's changes not yet on disk (`None`: memory only, nothing is written).
    pub batch: Option<crate::store::state::Batch>,
    /// Answers waiting for the next commit's fsync.
    pub deferred: Vec<crate::federation::pending::Deferred>,
    /// The commit being written now (by the reactor's disk thread), if any: at most one at
    /// a time, so records reach the disk in the order they were made.
    pub committing: Option<crate::federation::pending::Committing>,
    /// The generation of the commit the batch's new records will go with, and the last
    /// generation on disk: a queued copy with `commit_gen > durable_gen` is not delivered.
    pub commit_gen: u64,
    pub durable_gen: u64,
    /// Recipients given queued copies since the last commit began (pumped once it is on
    /// disk).
    pub enqueued_slots: Vec<crate::federation::action::Slot>,
    /// The resources' index (their files are the reactor's).
    pub resources: crate::federation::resources::Index,
    /// Revoked token ids (`DELETE /v1/tokens/{jti}`).
    pub revocations: crate::federation::revocations::Revocations,
    /// The rate limit of senders the registry had no room for (shared: still bounded).
    pub overflow_bucket: Option<crate::federation::rate::Bucket>,
    /// Set while the state dir cannot be written (readyz 503), with the error.
    pub degraded: Option<String>,
    /// MCP sessions of the facade (§9).
    pub mcp: mcp::McpSessions,
    /// Cluster mode (§10): `None` for a proxy alone.
    pub cluster: Option<cluster::Cluster>,
    /// Bytes unsent on the NATS link (set by the reactor after each flush).
    pub nats_unsent: usize,
    /// Name lookups in flight: lookup id → the server being dialled.
    pub lookups: HashMap<u64, Slot>,
    seq: u64,
    boot_id: String,
    /// Where random ids come from (`Entropy::Os` but in simulation and fuzzing).
    pub entropy: Entropy,
    /// What the caller is to do, in order (drained with [`Federation::take_actions`]).
    actions: Vec<Action>,
}

impl Federation {
    /// A core whose first turn is at `now`.
    pub fn new(cfg: Config, secret: Vec<u8>, audit: Audit, now: crate::clock::Now) -> Federation {
        let mut secrets = vec![secret];
        if let Some(prev) = cfg.jwt_previous_secret.clone() {
            secrets.push(prev);
        }
        let registry = Registry::new(cfg.max_servers);
        let revocations = crate::federation::revocations::Revocations::new(cfg.max_revocations);
        let sessions = Slab::with_capacity(cfg.max_connections.min(4096));
        Federation {
            cfg,
            now,
            secrets,
            registry,
            sessions,
            retired: Vec::new(),
            next_generation: 1,
            pending: HashMap::new(),
            timers: Timers::new(),
            metrics: Metrics::default(),
            audit,
            draining: None,
            batch: None,
            deferred: Vec::new(),
            committing: None,
            commit_gen: 1,
            durable_gen: 0,
            enqueued_slots: Vec::new(),
            resources: crate::federation::resources::Index::default(),
            revocations,
            overflow_bucket: None,
            degraded: None,
            mcp: mcp::McpSessions::default(),
            cluster: None,
            nats_unsent: 0,
            lookups: HashMap::new(),
            seq: 0,
            boot_id: hex(&random_bytes::<4>()),
            entropy: Entropy::Os,
            actions: Vec::new(),
        }
    }

    /// What the core asked for since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        self.free_retired();
        std::mem::take(&mut self.actions)
    }

    fn free_retired(&mut self) {
        for i in self.retired.drain(..) {
            self.sessions.try_remove(i);
        }
    }

    /// Swaps the outbox with `buf` (an empty buffer whose capacity is reused).
    pub fn swap_actions(&mut self, buf: &mut Vec<Action>) {
        self.free_retired();
        std::mem::swap(&mut self.actions, buf);
    }

    /// True when actions wait to be carried out.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    pub(crate) fn act(&mut self, a: Action) {
        self.actions.push(a);
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

    /// A session id for a welcome.
    pub fn session_name(&self) -> String {
        hex(&self.entropy.bytes::<12>())
    }

    /// Random ids from a generator seeded with `seed` from now on (simulation, fuzzing), the
    /// message-id prefix included: a run of the same seed is the same byte for byte.
    pub fn seed_ids(&mut self, seed: u64) {
        self.entropy = Entropy::Seeded(std::cell::Cell::new(seed));
        self.boot_id = hex(&self.entropy.bytes::<4>());
    }

    // ---- the session table --------------------------------------------------------------

    /// Inserts a session's state, giving it a fresh generation.
    pub(crate) fn insert_session(&mut self, make: impl FnOnce(SessionId) -> Session) -> SessionId {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let entry = self.sessions.vacant_entry();
        let id = SessionId {
            idx: entry.key() as u32,
            generation,
        };
        entry.insert(Some(make(id)));
        id
    }

    pub fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions
            .get(id.idx as usize)
            .and_then(Option::as_ref)
            .filter(|s| s.id == id)
    }

    pub fn session_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        self.sessions
            .get_mut(id.idx as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.id == id)
    }

    /// Every live session.
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.iter().filter_map(|(_, s)| s.as_ref())
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

    /// Asks for a text frame on a session. False when the session is gone (the caller treats
    /// the peer as offline), or when the frame would take the session's output past
    /// [`Federation::hard_output_bound`] (the session is closed 1008).
    pub fn ws_send(&mut self, id: SessionId, text: String) -> bool {
        let hard = self.hard_output_bound();
        let Some(s) = self.session_mut(id) else {
            return false;
        };
        if s.unsent.saturating_add(text.len()) > hard {
            self.close_session(id, 1008, "output over its bound: the peer does not read");
            return false;
        }
        s.unsent = s.unsent.saturating_add(frame_bytes(text.len()));
        self.act(Action::Send { session: id, text });
        true
    }

    /// The reactor wrote some of a session's output: `unsent` bytes are left.
    pub fn set_unsent(&mut self, id: SessionId, unsent: usize) {
        if let Some(s) = self.session_mut(id) {
            s.unsent = unsent;
        }
    }

    /// Closes a session with a close code: its state ends now (registry, pending
    /// deliveries, audit); the reactor writes the close frame.
    pub fn close_session(&mut self, id: SessionId, code: u16, reason: &str) {
        let Some(sess) = self.take_session(id) else {
            return;
        };
        self.act(Action::Close {
            session: id,
            code,
            reason: reason.to_string(),
        });
        self.end_session(id, sess, reason);
    }

    /// The session's connection is gone (EOF, a failed read or write, a protocol error the
    /// reactor answered itself): its state ends now; nothing is asked of the reactor.
    pub fn session_lost(&mut self, id: SessionId, reason: &str) {
        if let Some(sess) = self.take_session(id) {
            self.end_session(id, sess, reason);
        }
    }

    /// The session went silent: its state ends and its connection is dropped.
    pub(crate) fn drop_session(&mut self, id: SessionId, why: &str) {
        if let Some(sess) = self.take_session(id) {
            self.act(Action::Drop {
                session: id,
                why: why.to_string(),
            });
            self.end_session(id, sess, why);
        }
    }

    fn take_session(&mut self, id: SessionId) -> Option<Session> {
        self.session(id)?;
        let sess = self.sessions.get_mut(id.idx as usize)?.take()?;
        self.retired.push(id.idx as usize);
        if let Some(t) = sess.timer {
            self.timers.cancel(t);
        }
        Some(sess)
    }

    /// Every session closes with `code` (a drain).
    pub fn close_all_sessions(&mut self, code: u16, reason: &str) {
        let ids: Vec<SessionId> = self.sessions().map(|s| s.id).collect();
        for id in ids {
            self.close_session(id, code, reason);
        }
    }

    /// Re-arms a session's deadline when its nearest deadline moved earlier (or is unset).
    /// A deadline that moved later is left armed: it fires early and is recomputed.
    pub(crate) fn rearm_session(&mut self, id: SessionId) {
        let Some(s) = self.session(id) else {
            return;
        };
        let want = s.deadline(self.cfg.heartbeat);
        match s.timer {
            Some(t) if t.at <= want => {}
            armed => {
                if let Some(t) = armed {
                    self.timers.cancel(t);
                }
                let t = self.timers.insert(want, CoreTimer::Session(id));
                if let Some(s) = self.session_mut(id) {
                    s.timer = Some(t);
                }
            }
        }
    }

    /// The nearest of the core's deadlines.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Fires every core timer due at `now`, each to its handler.
    pub fn fire_due(&mut self, now: Instant) {
        while let Some(key) = self.timers.pop_due(now) {
            match key {
                CoreTimer::Session(id) => {
                    if let Some(s) = self.session_mut(id) {
                        s.timer = None;
                    }
                    self.session_timer(id, now);
                    self.rearm_session(id);
                }
                CoreTimer::Delivery(seq) => self.on_delivery_timeout(seq),
                CoreTimer::Ttl(slot, qseq) => self.on_ttl(slot, qseq),
                CoreTimer::Dial(slot) => self.dial(slot),
                CoreTimer::Cluster(rid) => self.cluster_deadline(rid),
                CoreTimer::ClusterTick => self.cluster_tick(),
                CoreTimer::ClusterRetry => self.cluster_retry(),
            }
        }
    }

    // ---- keys, tokens, authentication ---------------------------------------------------

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
    pub fn new_entry(&self, server_id: &str) -> crate::federation::registry::Entry {
        let epoch = self.registry.next_epoch(server_id);
        crate::federation::registry::Entry::new(
            server_id.to_string(),
            epoch,
            self.signing_key_at(server_id, epoch),
        )
    }

    /// The slot of `server_id`, inserting a "known" entry (not registered) when it has none.
    pub fn find_or_insert(
        &mut self,
        server_id: &str,
    ) -> Result<Slot, crate::federation::registry::RegistryError> {
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
        let r = self.check_token(token);
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
            let _ = self.persist_local(op);
        }
        let r = match r {
            Ok(c)
                if c.jti
                    .as_deref()
                    .is_some_and(|j| self.revocations.is_revoked(j)) =>
            {
                Err(AuthError::new(401, "revoked"))
            }
            // Only a valid token can be of the wrong type (§2): revocation is said first.
            Ok(c) if !want.takes(c.token_type) => Err(AuthError::new(403, "wrong_type")),
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

    /// A token's signature, times and removal: what makes it valid, whatever its type.
    fn check_token(&self, token: Option<&str>) -> Result<Claims, AuthError> {
        let token = token.ok_or(AuthError::new(401, "missing_token"))?;
        let keys: Vec<&[u8]> = self.secrets.iter().map(|s| s.as_slice()).collect();
        let claims = jwt::verify(
            token,
            &keys,
            self.now.secs(),
            self.cfg.clock_skew_secs as i64,
        )?;
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

    pub fn ready(&self) -> bool {
        self.draining.is_none()
    }
}
