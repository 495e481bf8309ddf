//! Revoked token ids (contract §2, `DELETE /v1/tokens/{jti}`): which `jti`s are refused, and
//! until when each must be remembered.
//!
//! Owns the table `jti → until` (unix seconds): a revocation is kept until the latest `exp`
//! seen with that `jti` has passed (plus the clock skew, during which an expired token would
//! still be accepted), so the table forgets only what can no longer be presented. Capacity is
//! `FEDMCP_MAX_REVOCATIONS`, fixed at start; at capacity, expired entries are pruned first
//! and a new revocation is refused (`Full`, answered `507 revocations_full`) rather than
//! forgetting a live one.
//!
//! Pure: times are passed in, nothing here does I/O, and ids are checked by the caller
//! (`jwt::valid_jti`). Durability is the caller's (`store::state::Op::Revoke`).

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeError {
    /// `FEDMCP_MAX_REVOCATIONS` live revocations are held.
    Full,
}

#[derive(Debug)]
pub struct Revocations {
    until: HashMap<String, i64>,
    capacity: usize,
}

impl Revocations {
    pub fn new(capacity: usize) -> Revocations {
        Revocations {
            until: HashMap::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }

    /// Revokes `jti` until at least `until` (a later time already held is kept). Returns
    /// the time now held.
    pub fn revoke(
        &mut self,
        jti: &str,
        until: i64,
        now: i64,
        skew: i64,
    ) -> Result<i64, RevokeError> {
        if let Some(t) = self.until.get_mut(jti) {
            *t = (*t).max(until);
            return Ok(*t);
        }
        if self.until.len() >= self.capacity {
            self.prune(now, skew);
        }
        if self.until.len() >= self.capacity {
            return Err(RevokeError::Full);
        }
        self.until.insert(jti.to_string(), until);
        Ok(until)
    }

    /// Whether `jti` is revoked.
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.until.contains_key(jti)
    }

    /// A token with a revoked `jti` was seen with expiry `exp`: the revocation now lasts at
    /// least that long. True when that moved it later (the caller persists the change).
    pub fn saw(&mut self, jti: &str, exp: i64) -> bool {
        match self.until.get_mut(jti) {
            Some(t) if *t < exp => {
                *t = exp;
                true
            }
            _ => false,
        }
    }

    /// Forgets revocations whose tokens can no longer be presented.
    pub fn prune(&mut self, now: i64, skew: i64) {
        self.until
            .retain(|_, until| until.saturating_add(skew) > now);
    }

    /// Every live revocation: `(jti, until)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> + '_ {
        self.until.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_remember_extend_and_forget() {
        let mut r = Revocations::new(2);
        assert_eq!(r.revoke("a", 100, 0, 30), Ok(100));
        assert!(r.is_revoked("a"));
        assert!(!r.is_revoked("b"));
        // A later exp seen with the same jti keeps it longer; an earlier one changes nothing.
        assert!(r.saw("a", 150));
        assert!(!r.saw("a", 120));
        assert!(!r.saw("zz", 500), "an id never revoked stays so");
        assert_eq!(
            r.revoke("a", 90, 0, 30),
            Ok(150),
            "revoking again never shortens"
        );
        // Forgotten only once its tokens are past exp + skew.
        r.prune(179, 30);
        assert!(r.is_revoked("a"));
        r.prune(180, 30);
        assert!(!r.is_revoked("a"));
    }

    #[test]
    fn full_table_refuses_rather_than_forgets_a_live_one() {
        let mut r = Revocations::new(2);
        r.revoke("a", 100, 0, 0).unwrap();
        r.revoke("b", 200, 0, 0).unwrap();
        assert_eq!(r.revoke("c", 300, 50, 0), Err(RevokeError::Full));
        assert!(r.is_revoked("a") && r.is_revoked("b"));
        // Once one has expired, its place is taken.
        assert_eq!(r.revoke("c", 300, 150, 0), Ok(300));
        assert!(!r.is_revoked("a"));
        assert!(r.is_revoked("c"));
        // Revoking a held id again never needs room.
        assert_eq!(r.revoke("b", 250, 150, 0), Ok(250));
        assert_eq!(r.len(), 2);
    }
}
