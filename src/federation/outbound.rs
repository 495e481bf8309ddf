//! Outbound sessions (contract §5): the proxy dials a registered server's `endpoints.control`.
//!
//! Owns the pure parts of dialling: parsing a `ws://` / `wss://` URL, the retry schedule
//! (250 ms doubling to 30 s, ±20 % jitter), the WebSocket client upgrade request and the
//! check of its `101` answer; and the decisions, in `impl Federation` at the end of this
//! file: when to dial, which address next, backoff, what an answer means. Part of the core:
//! it never opens, registers or resolves anything itself. It asks with a [`DialRequest`]
//! (an [`Action::Dial`]), which the reactor's `dial` module carries out (a lookup on its
//! resolver thread, a non-blocking connect on a socket it registers, the upgrade) and answers
//! with `on_resolved`, `dial_opened`, `dial_established` or `dial_failed`. A dialled session
//! is an ordinary session once its upgrade is answered.

use crate::federation::Federation;
use crate::federation::action::Slot;
use crate::federation::action::{Action, CoreTimer, DialPlan, DialRequest, LinkId, SessionId};
use crate::federation::registry::{OutPhase, Outbound};
use crate::proto::jwt::TokenType;
use crate::proto::upgrade::ControlUrl;
use base64::Engine;
use std::net::SocketAddr;
use std::time::Duration;

/// First retry delay.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Addresses of one name tried in turn (a name with more is tried on its first ones).
pub const MAX_ADDRESSES: usize = 16;

/// The delay before retry number `attempt` (0-based): 250 ms doubling to 30 s, scaled by a
/// jitter factor in [0.8, 1.2] taken from `unit` in [0, 1).
pub fn backoff(attempt: u32, unit: f64) -> Duration {
    let base = BACKOFF_FIRST
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    base.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

/// The `control` URL of an entry's endpoints, when it is one the proxy dials.
fn control_url_of(endpoints: &str) -> Option<ControlUrl> {
    #[derive(serde::Deserialize)]
    struct Endpoints {
        #[serde(default)]
        control: Option<String>,
    }
    let e: Endpoints = serde_json::from_str(endpoints).ok()?;
    ControlUrl::parse(e.control.as_deref()?)
}

/// A jitter unit in [0, 1).
fn jitter_unit(entropy: &crate::random::Entropy) -> f64 {
    let b = entropy.bytes::<4>();
    u32::from_le_bytes(b) as f64 / (u32::MAX as f64 + 1.0)
}

impl Federation {
    /// After a registration: start, restart or stop dialling to match `endpoints.control`.
    pub fn outbound_update(&mut self, slot: Slot) {
        let Some(e) = self.registry.get(slot) else {
            return;
        };
        let url = control_url_of(&e.endpoints);
        let unchanged = match (&e.outbound, &url) {
            (Some(o), Some(u)) => &o.url == u,
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return;
        }
        self.outbound_stop(slot);
        if let Some(url) = url {
            let timer = self.timers.insert(self.now.at, CoreTimer::Dial(slot));
            if let Some(e) = self.registry.get_mut(slot) {
                e.outbound = Some(Outbound {
                    url,
                    attempt: 0,
                    phase: OutPhase::Backoff,
                    last_error: None,
                    next_attempt_ms: Some(self.now.wall_ms),
                    timer: Some(timer),
                    online_since: None,
                    untried: Vec::new(),
                });
            }
        }
    }

    /// Stops dialling a server (removal, or its control endpoint changed). A session that is
    /// already up stays; an attempt in progress is dropped.
    pub fn outbound_stop(&mut self, slot: Slot) {
        let Some(o) = self.registry.get_mut(slot).and_then(|e| e.outbound.take()) else {
            return;
        };
        if let Some(t) = o.timer {
            self.timers.cancel(t);
        }
        if let OutPhase::Dialing(link) = o.phase {
            self.act(Action::StopDial {
                link,
                why: "dialling stopped".into(),
            });
        }
    }

    /// The dial timer fired: resolve (off the loop) or connect.
    pub fn dial(&mut self, slot: Slot) {
        if self.draining.is_some() {
            return;
        }
        let (now, now_ms) = (self.now.at, self.now.wall_ms);
        let Some(e) = self.registry.get_mut(slot) else {
            return;
        };
        let busy = e.presence.session().is_some();
        let Some(o) = e.outbound.as_mut() else { return };
        o.timer = None;
        if let OutPhase::Resolving(lookup) = o.phase {
            // The resolver did not answer within the handshake timeout (§5).
            self.lookups.remove(&lookup);
            let why = "name resolution timed out".to_string();
            return self.dial_failed(slot, OutPhase::Resolving(lookup), why);
        }
        if o.phase != OutPhase::Backoff {
            return;
        }
        if busy {
            // The server is connected (inbound): look again later instead of replacing it.
            o.next_attempt_ms = Some(now_ms + BACKOFF_MAX.as_millis() as i64);
            let t = self.timers.insert(now + BACKOFF_MAX, CoreTimer::Dial(slot));
            if let Some(o) = self
                .registry
                .get_mut(slot)
                .and_then(|e| e.outbound.as_mut())
            {
                o.timer = Some(t);
            }
            return;
        }
        let url = o.url.clone();
        o.untried.clear();
        if !url.tls && !url.loopback_host() && !self.cfg.allow_plaintext {
            // A registration from before this check (restored state): never send its token
            // in clear text off the machine.
            let why = "insecure endpoint: ws:// to a host that is not loopback (FEDMCP_ALLOW_PLAINTEXT is not set)";
            return self.dial_failed(slot, OutPhase::Backoff, why.into());
        }
        if let Some(addr) = url.literal() {
            return self.dial_connect(slot, addr);
        }
        let id = self.next_seq();
        self.act(Action::Dial(DialRequest::Resolve {
            lookup: id,
            host: url.host.clone(),
            port: url.port,
        }));
        self.lookups.insert(id, slot);
        // Resolving has the handshake timeout: the dial timer fires then (see above).
        let t = self.timers.insert(
            self.now.at + self.cfg.handshake_timeout,
            CoreTimer::Dial(slot),
        );
        if let Some(o) = self
            .registry
            .get_mut(slot)
            .and_then(|e| e.outbound.as_mut())
        {
            o.phase = OutPhase::Resolving(id);
            o.timer = Some(t);
        }
    }

    /// The answer to lookup `id` (from the reactor's resolver): every address of the name, or
    /// why there is none. A late answer (the attempt timed out or was stopped) is ignored.
    pub fn on_resolved(&mut self, id: u64, result: Result<Vec<SocketAddr>, String>) {
        {
            let Some(slot) = self.lookups.remove(&id) else {
                return;
            };
            let current = self
                .registry
                .get(slot)
                .and_then(|e| e.outbound.as_ref())
                .map(|o| o.phase);
            if current != Some(OutPhase::Resolving(id)) {
                return;
            }
            if let Some(t) = self
                .registry
                .get_mut(slot)
                .and_then(|e| e.outbound.as_mut())
                .and_then(|o| o.timer.take())
            {
                self.timers.cancel(t);
            }
            match result {
                Ok(mut addrs) if !addrs.is_empty() => {
                    let first = addrs.remove(0);
                    if let Some(o) = self
                        .registry
                        .get_mut(slot)
                        .and_then(|e| e.outbound.as_mut())
                    {
                        o.untried = addrs;
                    }
                    self.dial_connect(slot, first)
                }
                Ok(_) => self.dial_failed(
                    slot,
                    OutPhase::Resolving(id),
                    "cannot resolve: no address".into(),
                ),
                Err(e) => self.dial_failed(
                    slot,
                    OutPhase::Resolving(id),
                    format!("cannot resolve: {e}"),
                ),
            }
        }
    }

    /// Asks the reactor to connect to `addr` for this attempt (the socket is its business).
    fn dial_connect(&mut self, slot: Slot, addr: SocketAddr) {
        if self.draining.is_some() {
            return;
        }
        let Some(e) = self.registry.get(slot) else {
            return;
        };
        let server_id = e.server_id.clone();
        let Some(o) = e.outbound.as_ref() else { return };
        let url = o.url.clone();
        let (token, claims) = self.mint(&server_id, TokenType::Federation);
        let key = base64::engine::general_purpose::STANDARD.encode(self.entropy.bytes::<16>());
        let deadline = self.now.at + self.cfg.handshake_timeout;
        let plan = DialPlan {
            slot,
            url,
            key,
            claims,
            token,
            deadline,
        };
        self.act(Action::Dial(DialRequest::Connect {
            addr,
            plan: Box::new(plan),
        }));
        if let Some(o) = self
            .registry
            .get_mut(slot)
            .and_then(|e| e.outbound.as_mut())
        {
            o.phase = OutPhase::Opening;
        }
    }

    /// The reactor opened and registered the connection of this attempt. False: the
    /// attempt was stopped meanwhile (removed, endpoint changed) and the connection is not
    /// wanted.
    pub fn dial_opened(&mut self, slot: Slot, link: LinkId) -> bool {
        match self
            .registry
            .get_mut(slot)
            .and_then(|e| e.outbound.as_mut())
        {
            Some(o) if o.phase == OutPhase::Opening => {
                o.phase = OutPhase::Dialing(link);
                true
            }
            _ => false,
        }
    }

    /// The upgrade of attempt `link` was answered `101`: the session opens (`Err` says why
    /// the connection is not wanted, and the reactor drops it).
    pub fn dial_established(
        &mut self,
        link: LinkId,
        plan: &DialPlan,
        peer: Option<SocketAddr>,
    ) -> Result<SessionId, &'static str> {
        let slot = plan.slot;
        let Some(e) = self.registry.get(slot) else {
            return Err("dialling stopped");
        };
        if e.outbound.as_ref().map(|o| o.phase) != Some(OutPhase::Dialing(link)) {
            return Err("dialling stopped");
        }
        if e.presence.session().is_some() {
            // It connected inbound while we were dialling: keep that session.
            return Err("the server connected inbound meanwhile");
        }
        let opening = crate::federation::control::Opening {
            claims: &plan.claims,
            welcome_by: plan.deadline,
            outbound: true,
            peer,
        };
        let Ok(id) = self.open_session(opening) else {
            return Err("registry full");
        };
        if let Some(o) = self
            .registry
            .get_mut(slot)
            .and_then(|e| e.outbound.as_mut())
        {
            o.phase = OutPhase::Session;
        }
        Ok(id)
    }

    /// An attempt failed (or a session ended): the next one after the backoff. `expect` is
    /// the phase the failure belongs to; a stale failure changes nothing.
    pub fn dial_failed(&mut self, slot: Slot, expect: OutPhase, why: String) {
        let draining = self.draining.is_some();
        let (now, now_ms) = (self.now.at, self.now.wall_ms);
        let jitter = jitter_unit(&self.entropy);
        let Some(e) = self.registry.get_mut(slot) else {
            return;
        };
        let server = e.server_id.clone();
        let Some(o) = e.outbound.as_mut() else { return };
        if o.phase != expect {
            return;
        }
        if matches!(expect, OutPhase::Dialing(_) | OutPhase::Opening)
            && !o.untried.is_empty()
            && !draining
        {
            // The name has more addresses: the next one, in the same attempt.
            let next = o.untried.remove(0);
            log::debug!("outbound {server}: {why}; trying {next}");
            o.last_error = Some(why);
            o.phase = OutPhase::Backoff;
            return self.dial_connect(slot, next);
        }
        o.untried.clear();
        // A session that stayed online for a while starts the schedule again; one that ended
        // at once (welcome refused, closed straight away) counts as a failed attempt, so a
        // remote that accepts and drops is not dialled every 250 ms forever.
        if o.online_since
            .take()
            .is_some_and(|t| now.saturating_duration_since(t) >= BACKOFF_MAX)
        {
            o.attempt = 0;
        }
        let delay = backoff(o.attempt, jitter);
        o.attempt = o.attempt.saturating_add(1);
        o.phase = OutPhase::Backoff;
        o.next_attempt_ms = Some(now_ms + delay.as_millis() as i64);
        log::warn!("outbound {server}: {why}; next attempt in {delay:?}");
        o.last_error = Some(why);
        if draining {
            return;
        }
        let t = self.timers.insert(now + delay, CoreTimer::Dial(slot));
        if let Some(o) = self
            .registry
            .get_mut(slot)
            .and_then(|e| e.outbound.as_mut())
        {
            o.timer = Some(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy with one registered server whose control endpoint is `url`.
    fn dialling(url: &str, allow_plaintext: bool) -> (Federation, Slot) {
        let mut cfg = crate::config::Config::default_for_tests();
        cfg.allow_plaintext = allow_plaintext;
        let audit = crate::audit::Audit::discard();
        let mut p = Federation::new(cfg, b"k".repeat(32), audit, crate::clock::Now::read());
        let slot = p.find_or_insert("svc").unwrap();
        p.registry.get_mut(slot).unwrap().endpoints = format!("{{\"control\":\"{url}\"}}");
        p.outbound_update(slot);
        (p, slot)
    }

    /// Fires the dial timers due at the proxy's time (as the reactor does).
    fn fire(p: &mut Federation) {
        let at = p.now.at;
        while let Some(k) = p.timers.pop_due(at) {
            if let CoreTimer::Dial(s) = k {
                p.dial(s);
            }
        }
    }

    /// The last dialling request the core asked for since the last look.
    fn next_dial(p: &mut Federation) -> Option<DialRequest> {
        p.take_actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Dial(d) => Some(d),
                _ => None,
            })
            .next_back()
    }

    fn attempt(p: &Federation, slot: Slot) -> u32 {
        p.registry
            .get(slot)
            .unwrap()
            .outbound
            .as_ref()
            .unwrap()
            .attempt
    }

    fn phase(p: &Federation, slot: Slot) -> OutPhase {
        p.registry
            .get(slot)
            .unwrap()
            .outbound
            .as_ref()
            .unwrap()
            .phase
    }

    #[test]
    fn every_address_of_a_name_is_tried_before_backing_off() {
        let (mut p, slot) = dialling("ws://svc.example:9000/c", true);
        fire(&mut p);
        let Some(DialRequest::Resolve { lookup, host, port }) = next_dial(&mut p) else {
            panic!("a name is resolved first");
        };
        assert_eq!((host.as_str(), port), ("svc.example", 9000));
        assert_eq!(phase(&p, slot), OutPhase::Resolving(lookup));
        let a1: SocketAddr = "[2001:db8::1]:9000".parse().unwrap();
        let a2: SocketAddr = "192.0.2.7:9000".parse().unwrap();
        p.on_resolved(lookup, Ok(vec![a1, a2]));
        let Some(DialRequest::Connect { addr, .. }) = next_dial(&mut p) else {
            panic!("the first address is dialled");
        };
        assert_eq!(addr, a1);
        assert_eq!(phase(&p, slot), OutPhase::Opening);
        // The first address fails: the second is tried in the same attempt, no backoff.
        p.dial_failed(slot, OutPhase::Opening, "refused".into());
        let Some(DialRequest::Connect { addr, .. }) = next_dial(&mut p) else {
            panic!("the next address is dialled");
        };
        assert_eq!(addr, a2);
        assert_eq!(attempt(&p, slot), 0);
        // The last one fails too: now the attempt has failed and waits.
        p.dial_failed(slot, OutPhase::Opening, "refused".into());
        assert!(next_dial(&mut p).is_none());
        assert_eq!(phase(&p, slot), OutPhase::Backoff);
        assert_eq!(attempt(&p, slot), 1);
    }

    #[test]
    fn resolving_has_the_handshake_timeout_and_late_answers_are_ignored() {
        let (mut p, slot) = dialling("wss://svc.example/c", false);
        fire(&mut p);
        let Some(DialRequest::Resolve { lookup, .. }) = next_dial(&mut p) else {
            panic!("resolve first");
        };
        // The dial timer fires at the handshake deadline with the lookup unanswered.
        p.now = p.now.after(p.cfg.handshake_timeout);
        fire(&mut p);
        assert_eq!(phase(&p, slot), OutPhase::Backoff);
        let o = p.registry.get(slot).unwrap().outbound.as_ref().unwrap();
        assert_eq!(o.last_error.as_deref(), Some("name resolution timed out"));
        p.on_resolved(lookup, Ok(vec!["192.0.2.7:443".parse().unwrap()]));
        assert!(next_dial(&mut p).is_none(), "a late answer dials nothing");
    }

    #[test]
    fn a_plain_endpoint_off_the_machine_is_never_dialled() {
        let (mut p, slot) = dialling("ws://192.0.2.7:9000/c", false);
        fire(&mut p);
        assert!(next_dial(&mut p).is_none());
        assert_eq!(phase(&p, slot), OutPhase::Backoff);
        let (mut p, _) = dialling("ws://127.0.0.1:9000/c", false);
        fire(&mut p);
        assert!(matches!(
            next_dial(&mut p),
            Some(DialRequest::Connect { .. })
        ));
    }

    #[test]
    fn backoff_doubles_to_thirty_seconds_with_jitter() {
        assert_eq!(backoff(0, 0.5), Duration::from_millis(250));
        assert_eq!(backoff(1, 0.5), Duration::from_millis(500));
        assert_eq!(backoff(20, 0.5), Duration::from_secs(30));
        assert_eq!(backoff(0, 0.0), Duration::from_millis(200));
        assert_eq!(backoff(0, 1.0), Duration::from_millis(300));
        assert_eq!(backoff(99, 1.0), Duration::from_secs(36));
    }
}
