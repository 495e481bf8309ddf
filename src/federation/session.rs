//! A control session's own state: who it is, where it is in its lifetime, and its limits.
//!
//! Owns the per-session facts the router and the loop consult: the server id and registry
//! slot, the welcome handshake (a session is `connecting` until the server answers the
//! welcome), token expiry and the one-time `tokenExpiring` notice, heartbeat bookkeeping,
//! the run of rate-limit refusals (the token bucket itself is the server's, in the registry,
//! shared with its HTTP sends), deliveries awaiting this server's answer, batches whose
//! answer waits on deliveries, and the output the reactor has not written yet. The core's
//! session table holds these, keyed by `SessionId`. Times are passed in; nothing here does
//! I/O.

use crate::clock::Now;
use crate::federation::action::Slot;
use std::time::{Duration, Instant};

/// A batch's answer array, collected until every entry is settled.
#[derive(Debug, Default)]
pub struct Batch {
    /// True while the batch's frame is still being read: it is not sent before that ends,
    /// even if every entry read so far is settled.
    pub reading: bool,
    /// Entries answered later (sends awaiting their recipient) not yet settled; may dip
    /// below zero while reading, when an entry settles one read before it.
    pub pending: i64,
    pub parts: Vec<String>,
    pub bytes: usize,
}

impl Batch {
    pub fn push(&mut self, part: String) {
        self.bytes += part.len() + 1;
        self.parts.push(part);
    }

    /// Complete: read to the end and nothing pending.
    pub fn done(&self) -> bool {
        !self.reading && self.pending <= 0
    }

    /// The answer array (`None` when no entry needed an answer).
    pub fn answer(&self) -> Option<String> {
        (!self.parts.is_empty()).then(|| format!("[{}]", self.parts.join(",")))
    }
}

#[derive(Debug)]
pub struct Session {
    /// Its handle in the core's session table.
    pub id: crate::federation::action::SessionId,
    /// Where the session's connection comes from (audit lines).
    pub peer: Option<std::net::SocketAddr>,
    /// The proxy dialled it (§5): when it ends, the server is dialled again.
    pub outbound: bool,
    /// Bytes written to the session and not yet taken by the socket: the reactor's count
    /// after its last flush plus what was asked for since (backpressure, §4 bounds).
    pub unsent: usize,
    /// The session's armed deadline in the core's timers.
    pub timer: Option<crate::timer::TimerId>,
    pub server_id: String,
    pub slot: Slot,
    /// The welcome request's id and the deadline for its answer, while `connecting`.
    pub welcome: Option<(u64, Instant)>,
    /// When the token ends the session (close 4002), and its unix-seconds value.
    pub expires_at: Instant,
    pub expires_at_secs: i64,
    /// When to send `federation/tokenExpiring`; `None` once sent.
    pub expiring_at: Option<Instant>,
    pub last_rx: Instant,
    pub next_ping: Instant,
    /// The `jti` of the token the session was opened (or last refreshed) with: revoking it
    /// closes the session 4001.
    pub jti: Option<String>,
    /// The `jti` of the token the last `federation/refresh` issued (revoking it closes the
    /// session too).
    pub refreshed_jti: Option<String>,
    /// Messages refused by the rate limit since the last accepted one; over
    /// `ABUSE_REFUSALS_PER_BURST` × burst the session is closed 1008 (contract §4).
    pub refused_in_row: u64,
    /// Deliveries written to this server and awaiting its answer.
    pub inflight: usize,
    /// Batches whose answer array waits on deliveries, by batch number (few at a time).
    pub batches: Vec<(u64, Batch)>,
    pub next_batch: u64,
}

impl Session {
    pub fn is_online(&self) -> bool {
        self.welcome.is_none()
    }

    pub fn batch(&self, b: u64) -> Option<&Batch> {
        self.batches.iter().find(|(n, _)| *n == b).map(|(_, x)| x)
    }

    pub fn batch_mut(&mut self, b: u64) -> Option<&mut Batch> {
        self.batches
            .iter_mut()
            .find(|(n, _)| *n == b)
            .map(|(_, x)| x)
    }

    pub fn take_batch(&mut self, b: u64) -> Option<Batch> {
        let i = self.batches.iter().position(|(n, _)| *n == b)?;
        Some(self.batches.swap_remove(i).1)
    }

    /// Whether the session rests on a token with this `jti`.
    pub fn uses_jti(&self, jti: &str) -> bool {
        self.jti.as_deref() == Some(jti) || self.refreshed_jti.as_deref() == Some(jti)
    }

    /// The instant `federation/tokenExpiring` is due for a token valid from `iat` to `exp`
    /// (seconds): when a tenth of its lifetime or 60 s, whichever is less, remains. Computed
    /// in milliseconds, so a short token still gets its notice before it ends.
    pub fn expiring_notice(now: Now, iat: i64, exp: i64) -> Instant {
        let lifetime_ms = exp.saturating_sub(iat).max(0).saturating_mul(1000);
        let lead_ms = (lifetime_ms / 10).min(60_000);
        now.instant_of(exp.saturating_mul(1000) - lead_ms)
    }

    /// The earliest instant at which this session needs the loop's attention, with pings
    /// every `heartbeat`.
    pub fn deadline(&self, heartbeat: Duration) -> Instant {
        let mut d = self
            .next_ping
            .min(self.expires_at)
            .min(self.last_rx + heartbeat * 2);
        if let Some((_, w)) = self.welcome {
            d = d.min(w);
        }
        if let Some(e) = self.expiring_at {
            d = d.min(e);
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, wall_ms: i64) -> Now {
        Now { at: t0, wall_ms }
    }

    #[test]
    fn expiring_notice_is_a_tenth_or_sixty_seconds() {
        let t0 = Instant::now();
        // 100 s token: notice 10 s before the end.
        assert_eq!(
            Session::expiring_notice(at(t0, 1_000_000), 1000, 1100),
            t0 + Duration::from_secs(90)
        );
        // 1 day token: notice 60 s before the end.
        assert_eq!(
            Session::expiring_notice(at(t0, 0), 0, 86400),
            t0 + Duration::from_secs(86340)
        );
        // 3 s token: notice 300 ms before the end, not at the end.
        assert_eq!(
            Session::expiring_notice(at(t0, 1_000_000), 1000, 1003),
            t0 + Duration::from_millis(2700)
        );
        // An absurd exp (a signed token can say anything) neither panics nor overflows.
        let far = Session::expiring_notice(at(t0, 0), i64::MIN, i64::MAX);
        assert!(far > t0 + Duration::from_secs(86400 * 365 * 99));
        // Already inside the window: due now.
        assert_eq!(Session::expiring_notice(at(t0, 1_099_500), 1000, 1100), t0);
    }
}
