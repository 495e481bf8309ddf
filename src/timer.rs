//! A deadline map: the reactor keeps one for its connections (HTTP head and idle, dialling
//! handshake, close linger), the core one for its own (sessions' welcome, heartbeat and
//! expiry, delivery timeouts, TTLs, dial backoff); the loop waits once, for the nearer.
//!
//! It is an ordered map keyed by `(deadline, sequence)`, so its owner can ask for the nearest
//! deadline (the `poll` timeout) and pop what is due. Cancelling is an exact removal, so the map holds only live timers and
//! its size is bounded by what it times (connections, sessions, in-flight deliveries, queued
//! messages).
//!
//! It never reads the clock: `now` is always passed in, which keeps every user testable.

use std::collections::BTreeMap;
use std::time::Instant;

/// A handle to an armed timer, used to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimerId {
    pub at: Instant,
    seq: u64,
}

/// Ordered deadlines carrying a key of the caller's choice.
#[derive(Debug)]
pub struct Timers<K> {
    map: BTreeMap<(Instant, u64), K>,
    seq: u64,
}

impl<K> Default for Timers<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K> Timers<K> {
    pub fn new() -> Self {
        Timers {
            map: BTreeMap::new(),
            seq: 0,
        }
    }

    /// Arms a timer for `at`; the returned id cancels it.
    pub fn insert(&mut self, at: Instant, key: K) -> TimerId {
        self.seq += 1;
        self.map.insert((at, self.seq), key);
        TimerId { at, seq: self.seq }
    }

    /// Disarms a timer; a timer that already fired or was cancelled is ignored.
    pub fn cancel(&mut self, id: TimerId) -> Option<K> {
        self.map.remove(&(id.at, id.seq))
    }

    /// The nearest deadline, if any timer is armed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.map.keys().next().map(|(at, _)| *at)
    }

    /// Removes and returns one timer that is due at `now`, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        let (&(at, seq), _) = self.map.iter().next()?;
        if at > now {
            return None;
        }
        self.map.remove(&(at, seq))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        t.insert(t0 + Duration::from_millis(30), "c");
        t.insert(t0 + Duration::from_millis(10), "a");
        t.insert(t0 + Duration::from_millis(20), "b");
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(t.pop_due(t0), None);
        assert_eq!(t.pop_due(t0 + Duration::from_millis(25)), Some("a"));
        assert_eq!(t.pop_due(t0 + Duration::from_millis(25)), Some("b"));
        assert_eq!(t.pop_due(t0 + Duration::from_millis(25)), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn cancel_removes_exactly_one_timer() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        let a = t.insert(t0, 1);
        let b = t.insert(t0, 2);
        assert_eq!(t.cancel(a), Some(1));
        assert_eq!(t.cancel(a), None);
        assert_eq!(t.pop_due(t0), Some(2));
        assert_eq!(t.cancel(b), None);
        assert!(t.is_empty());
    }
}
