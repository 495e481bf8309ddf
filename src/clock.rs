//! The time the proxy works with: read once per loop turn by the reactor, passed to the rest.
//!
//! Owns [`Now`], the pair of clocks every decision uses: the monotonic instant (deadlines,
//! timers, rate buckets) and the wall clock in milliseconds since the epoch (token times,
//! `expiresAt`, `sentAt`, audit `ts`). The reactor takes one reading per turn
//! ([`Now::read`]) and hands it to the core in `Federation::now`; nothing else reads a
//! clock, so the core sees one consistent time per turn and can be driven with any time a
//! simulation or a fuzz target chooses. `main` reads it at start (and [`now_secs`] for a
//! token minted on the command line), outside the loop.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One reading of both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic: deadlines and durations.
    pub at: Instant,
    /// Milliseconds since the epoch (0 if the wall clock is before it).
    pub wall_ms: i64,
}

impl Now {
    /// Reads both clocks. Called by the reactor once per turn, and by `main` and tests.
    pub fn read() -> Now {
        Now {
            at: Instant::now(),
            wall_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        }
    }

    /// Whole seconds since the epoch.
    pub fn secs(&self) -> i64 {
        self.wall_ms.div_euclid(1000)
    }

    /// The wall-clock time (ms since the epoch) of the instant `at`.
    pub fn wall_of(&self, at: Instant) -> i64 {
        let ahead = at.saturating_duration_since(self.at).as_millis() as i64;
        let behind = self.at.saturating_duration_since(at).as_millis() as i64;
        self.wall_ms.saturating_add(ahead).saturating_sub(behind)
    }

    /// The instant of a wall-clock time `at_ms`; a time in the past is now. The distance is
    /// capped (a century) so a peer's absurd `exp` cannot overflow an `Instant`.
    pub fn instant_of(&self, at_ms: i64) -> Instant {
        const CAP_MS: i64 = 100 * 365 * 24 * 3600 * 1000;
        self.at + Duration::from_millis(at_ms.saturating_sub(self.wall_ms).clamp(0, CAP_MS) as u64)
    }

    /// This reading moved `d` later (tests and simulations step time with it).
    pub fn after(&self, d: Duration) -> Now {
        Now {
            at: self.at + d,
            wall_ms: self.wall_ms.saturating_add(d.as_millis() as i64),
        }
    }
}

/// Milliseconds since the epoch, read now: for `main` and tests. The loop uses its turn's time.
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

/// Seconds since the epoch, read now: for `main` and tests. The loop uses its turn's time.
pub fn now_secs() -> i64 {
    now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_move_together() {
        let n = Now::read();
        let later = n.after(Duration::from_millis(1500));
        assert_eq!(later.wall_ms - n.wall_ms, 1500);
        assert_eq!(n.wall_of(later.at), later.wall_ms);
        assert_eq!(later.wall_of(n.at), n.wall_ms);
        assert_eq!(
            n.instant_of(n.wall_ms + 250),
            n.at + Duration::from_millis(250)
        );
        assert_eq!(n.instant_of(n.wall_ms - 250), n.at, "a past time is now");
        assert!(n.instant_of(i64::MAX) > n.at + Duration::from_secs(86400 * 365 * 99));
        assert_eq!(Now { wall_ms: 1999, ..n }.secs(), 1);
        assert_eq!(Now { wall_ms: -1, ..n }.secs(), -1);
    }
}
