//! Resources of the HTTP data channel (contract §3): the pure parts.
//!
//! Owns what can be decided without touching a file or a socket: whether a resource name is
//! acceptable (checked before any path is built from it), how a `Range` header applies to a
//! resource of a given size, and the index of stored resources with the quota accounting
//! (`FEDMCP_RESOURCE_MAX_BYTES` per resource, `FEDMCP_RESOURCE_QUOTA_BYTES` in all). The
//! streaming to and from disk is built on these (issue 5).

use std::collections::BTreeMap;

/// The longest resource name.
pub const MAX_NAME: usize = 128;

/// 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.` (so never `.`, `..`, or a
/// hidden file, and never a path separator or NUL).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// How a `Range` header applies to a resource of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable single range: the whole resource, `200`.
    Full,
    /// `206` with bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// `416` (with `Content-Range: bytes */size`).
    Unsatisfiable,
}

/// Applies a `Range` header (RFC 9110 §14): one `bytes=a-b`, `bytes=a-` or `bytes=-n` range
/// is served as `206`; a range wholly past the end is `416`; several ranges, another unit or
/// a malformed header are ignored (the whole resource, as RFC 9110 allows).
pub fn apply_range(header: Option<&str>, size: u64) -> RangeAnswer {
    let Some(h) = header else {
        return RangeAnswer::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", n) => match num(n) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if size == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            None => RangeAnswer::Full,
        },
        (a, "") => match num(a) {
            Some(start) if start < size => RangeAnswer::Partial {
                start,
                end: size - 1,
            },
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        (a, b) => match (num(a), num(b)) {
            (Some(start), Some(end)) if start > end => RangeAnswer::Full,
            (Some(start), Some(_)) if start >= size => RangeAnswer::Unsatisfiable,
            (Some(start), Some(end)) => RangeAnswer::Partial {
                start,
                end: end.min(size - 1),
            },
            _ => RangeAnswer::Full,
        },
    }
}

/// What is known of one stored resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub size: u64,
    /// Lower-case hex SHA-256 of the bytes (also the `ETag`).
    pub sha256: String,
}

/// Why an upload cannot be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// Over `FEDMCP_RESOURCE_MAX_BYTES`: `413`.
    TooLarge,
    /// Over `FEDMCP_RESOURCE_QUOTA_BYTES` with everything else stored: `507 quota_exceeded`.
    QuotaExceeded,
}

/// The stored resources by owner and name, with the bytes they use.
#[derive(Debug, Default)]
pub struct Index {
    items: BTreeMap<(String, String), Meta>,
    total: u64,
    /// Bytes promised to uploads in progress (so two uploads cannot both fit the quota).
    reserved: u64,
}

impl Index {
    pub fn get(&self, owner: &str, name: &str) -> Option<&Meta> {
        self.items.get(&(owner.to_string(), name.to_string()))
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Checks that `size` more bytes fit, replacing `owner/name` if it exists, and reserves
    /// them until `commit` or `release`.
    pub fn reserve(
        &mut self,
        owner: &str,
        name: &str,
        size: u64,
        max: u64,
        quota: u64,
    ) -> Result<(), QuotaError> {
        if size > max {
            return Err(QuotaError::TooLarge);
        }
        let replaced = self.get(owner, name).map_or(0, |m| m.size);
        let after = self
            .total
            .saturating_sub(replaced)
            .saturating_add(self.reserved)
            .saturating_add(size);
        if after > quota {
            return Err(QuotaError::QuotaExceeded);
        }
        self.reserved += size;
        Ok(())
    }

    pub fn release(&mut self, size: u64) {
        self.reserved = self.reserved.saturating_sub(size);
    }

    /// Records a completed upload (its reservation of `reserved` bytes ends).
    pub fn commit(&mut self, owner: &str, name: &str, meta: Meta, reserved: u64) {
        self.release(reserved);
        self.total += meta.size;
        if let Some(old) = self
            .items
            .insert((owner.to_string(), name.to_string()), meta)
        {
            self.total = self.total.saturating_sub(old.size);
        }
    }

    pub fn remove(&mut self, owner: &str, name: &str) -> Option<Meta> {
        let m = self.items.remove(&(owner.to_string(), name.to_string()))?;
        self.total = self.total.saturating_sub(m.size);
        Some(m)
    }

    /// Every resource as `(owner, name, meta)`, ordered.
    pub fn list(&self) -> impl Iterator<Item = (&str, &str, &Meta)> + '_ {
        self.items
            .iter()
            .map(|((o, n), m)| (o.as_str(), n.as_str(), m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "report.pdf", "A-b_c.9", &"x".repeat(128)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "..",
            ".",
            "a/b",
            "a\\0",
            "a b",
            "ä",
            "%2f",
            &"x".repeat(129),
            "a\0",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn ranges_at_the_edges() {
        use RangeAnswer::*;
        let r = |h: &str, size| apply_range(Some(h), size);
        assert_eq!(apply_range(None, 10), Full);
        assert_eq!(r("bytes=0-0", 10), Partial { start: 0, end: 0 });
        assert_eq!(r("bytes=0-9", 10), Partial { start: 0, end: 9 });
        assert_eq!(r("bytes=0-99", 10), Partial { start: 0, end: 9 });
        assert_eq!(r("bytes=9-", 10), Partial { start: 9, end: 9 });
        assert_eq!(r("bytes=10-", 10), Unsatisfiable);
        assert_eq!(r("bytes=10-20", 10), Unsatisfiable);
        assert_eq!(r("bytes=-3", 10), Partial { start: 7, end: 9 });
        assert_eq!(r("bytes=-30", 10), Partial { start: 0, end: 9 });
        assert_eq!(r("bytes=-0", 10), Unsatisfiable);
        assert_eq!(r("bytes=0-", 0), Unsatisfiable);
        assert_eq!(r("bytes=-5", 0), Unsatisfiable);
        assert_eq!(r("bytes=5-2", 10), Full);
        assert_eq!(r("bytes=0-1,3-4", 10), Full);
        assert_eq!(r("items=0-1", 10), Full);
        assert_eq!(r("bytes=a-b", 10), Full);
        assert_eq!(r("bytes=99999999999999999999999-", 10), Full);
    }

    #[test]
    fn quota_counts_replacements_and_reservations() {
        let mut ix = Index::default();
        assert_eq!(ix.reserve("o", "a", 11, 10, 100), Err(QuotaError::TooLarge));
        ix.reserve("o", "a", 10, 10, 15).unwrap();
        assert_eq!(
            ix.reserve("o", "b", 10, 10, 15),
            Err(QuotaError::QuotaExceeded),
            "reserved bytes count"
        );
        ix.commit(
            "o",
            "a",
            Meta {
                size: 10,
                sha256: "x".into(),
            },
            10,
        );
        assert_eq!(ix.total_bytes(), 10);
        // Replacing a resource frees its old size.
        ix.reserve("o", "a", 10, 10, 15).unwrap();
        ix.commit(
            "o",
            "a",
            Meta {
                size: 8,
                sha256: "y".into(),
            },
            10,
        );
        assert_eq!(ix.total_bytes(), 8);
        assert_eq!(ix.remove("o", "a").unwrap().size, 8);
        assert_eq!(ix.total_bytes(), 0);
        assert_eq!(ix.list().count(), 0);
    }
}
