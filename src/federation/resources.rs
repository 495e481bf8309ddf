//! Resources of the HTTP data channel (contract §3): the pure parts.
//!
//! Owns what can be decided without touching a file or a socket: whether a resource name is
//! acceptable (checked before any path is built from it), how a `Range` header applies to a
//! resource of a given size, and the index of stored resources with the quota accounting
//! (`FEDMCP_RESOURCE_MAX_BYTES` per resource, `FEDMCP_RESOURCE_QUOTA_BYTES` in all and
//! `FEDMCP_RESOURCE_QUOTA_PER_SERVER_BYTES` per owner), and who may read one (`?readers=`).
//! The streaming to and from disk (`io::data`, `store::blobs`) is built on these.

use std::collections::{BTreeMap, HashMap};

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

/// Most server ids in one resource's `?readers=` list.
pub const MAX_READERS: usize = 256;

/// Who may read a resource besides its owner and admins: `None` every federation member,
/// `Some(ids)` only those (empty: the owner only).
pub type Readers = Option<Vec<String>>;

/// Why a `?readers=` value is refused (`400 invalid_readers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadersError {
    /// An entry is not a valid serverId.
    BadId(String),
    /// More than [`MAX_READERS`] ids.
    TooMany,
}

impl std::fmt::Display for ReadersError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadersError::BadId(id) => write!(
                f,
                "readers must be serverIds separated by commas; {id:?} is not a serverId"
            ),
            ReadersError::TooMany => write!(f, "readers names more than {MAX_READERS} servers"),
        }
    }
}

/// Parses the (percent-decoded) `?readers=` value of an upload: absent is everyone, empty
/// is the owner only, else comma-separated serverIds (order kept, repeats dropped).
pub fn parse_readers(value: Option<&str>) -> Result<Readers, ReadersError> {
    let Some(v) = value else {
        return Ok(None);
    };
    let mut ids: Vec<String> = Vec::new();
    for id in v.split(',').filter(|p| !p.is_empty()) {
        if !crate::proto::jwt::valid_server_id(id) {
            let shown: String = id.chars().take(80).collect();
            return Err(ReadersError::BadId(shown));
        }
        if !ids.iter().any(|x| x == id) {
            if ids.len() == MAX_READERS {
                return Err(ReadersError::TooMany);
            }
            ids.push(id.to_string());
        }
    }
    Ok(Some(ids))
}

/// The `readers` value of a resource as JSON: `null` for everyone, else an array.
pub fn readers_json(readers: &Readers) -> String {
    match readers {
        None => "null".to_string(),
        Some(ids) => {
            let quoted: Vec<String> = ids.iter().map(|i| format!("\"{i}\"")).collect();
            format!("[{}]", quoted.join(","))
        }
    }
}

/// What is known of one stored resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub size: u64,
    /// Lower-case hex SHA-256 of the bytes (also the `ETag`).
    pub sha256: String,
    pub readers: Readers,
}

impl Meta {
    /// Whether `server_id` (holding a federation token, or an admin one when `admin`) may
    /// read the resource `owner` stored.
    pub fn readable_by(&self, owner: &str, server_id: &str, admin: bool) -> bool {
        admin
            || owner == server_id
            || self
                .readers
                .as_ref()
                .is_none_or(|ids| ids.iter().any(|i| i == server_id))
    }
}

/// Why an upload cannot be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// Over `FEDMCP_RESOURCE_MAX_BYTES`: `413`.
    TooLarge,
    /// Over `FEDMCP_RESOURCE_QUOTA_BYTES` with everything else stored: `507 quota_exceeded`.
    QuotaExceeded,
    /// Over `FEDMCP_RESOURCE_QUOTA_PER_SERVER_BYTES` with the owner's other resources:
    /// `507 quota_exceeded`.
    OwnerQuotaExceeded,
}

/// The limits an upload is checked against (from the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `FEDMCP_RESOURCE_MAX_BYTES`.
    pub max: u64,
    /// `FEDMCP_RESOURCE_QUOTA_BYTES`.
    pub quota: u64,
    /// `FEDMCP_RESOURCE_QUOTA_PER_SERVER_BYTES`.
    pub per_owner: u64,
}

impl Limits {
    /// No limit at all (rebuilding the index from disk: what is stored is counted as is).
    pub const NONE: Limits = Limits {
        max: u64::MAX,
        quota: u64::MAX,
        per_owner: u64::MAX,
    };
}

/// Bytes one owner stores and has promised to uploads in progress.
#[derive(Debug, Default, Clone, Copy)]
struct OwnerUse {
    stored: u64,
    reserved: u64,
}

/// The stored resources by owner and name, with the bytes they use in all and per owner.
#[derive(Debug, Default)]
pub struct Index {
    items: BTreeMap<(String, String), Meta>,
    total: u64,
    /// Bytes promised to uploads in progress (so two uploads cannot both fit the quota).
    reserved: u64,
    /// Per owner: the same two counts (an owner with neither is not kept).
    owners: HashMap<String, OwnerUse>,
}

impl Index {
    pub fn get(&self, owner: &str, name: &str) -> Option<&Meta> {
        self.items.get(&(owner.to_string(), name.to_string()))
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Bytes `owner` stores now.
    pub fn owner_bytes(&self, owner: &str) -> u64 {
        self.owners.get(owner).map_or(0, |u| u.stored)
    }

    /// Checks that `size` more bytes fit, replacing `owner/name` if it exists, and reserves
    /// them (in all and for the owner) until `commit` or `release`.
    pub fn reserve(
        &mut self,
        owner: &str,
        name: &str,
        size: u64,
        limits: Limits,
    ) -> Result<(), QuotaError> {
        if size > limits.max {
            return Err(QuotaError::TooLarge);
        }
        let replaced = self.get(owner, name).map_or(0, |m| m.size);
        // What would be in use: stored (less what this upload replaces), promised, and it.
        let after = |stored: u64, reserved: u64| {
            stored
                .saturating_sub(replaced)
                .saturating_add(reserved)
                .saturating_add(size)
        };
        if after(self.total, self.reserved) > limits.quota {
            return Err(QuotaError::QuotaExceeded);
        }
        let mine = self.owners.get(owner).copied().unwrap_or_default();
        if after(mine.stored, mine.reserved) > limits.per_owner {
            return Err(QuotaError::OwnerQuotaExceeded);
        }
        self.reserved += size;
        self.owners.entry(owner.to_string()).or_default().reserved += size;
        Ok(())
    }

    /// Ends a reservation of `size` bytes made for `owner`.
    pub fn release(&mut self, owner: &str, size: u64) {
        self.reserved = self.reserved.saturating_sub(size);
        if let Some(u) = self.owners.get_mut(owner) {
            u.reserved = u.reserved.saturating_sub(size);
            if u.reserved == 0 && u.stored == 0 {
                self.owners.remove(owner);
            }
        }
    }

    /// Records a completed upload (its reservation of `reserved` bytes ends).
    pub fn commit(&mut self, owner: &str, name: &str, meta: Meta, reserved: u64) {
        self.release(owner, reserved);
        let size = meta.size;
        let old = self
            .items
            .insert((owner.to_string(), name.to_string()), meta)
            .map_or(0, |m| m.size);
        self.total = self.total.saturating_sub(old).saturating_add(size);
        let u = self.owners.entry(owner.to_string()).or_default();
        u.stored = u.stored.saturating_sub(old).saturating_add(size);
    }

    pub fn remove(&mut self, owner: &str, name: &str) -> Option<Meta> {
        let m = self.items.remove(&(owner.to_string(), name.to_string()))?;
        self.total = self.total.saturating_sub(m.size);
        if let Some(u) = self.owners.get_mut(owner) {
            u.stored = u.stored.saturating_sub(m.size);
            if u.reserved == 0 && u.stored == 0 {
                self.owners.remove(owner);
            }
        }
        Some(m)
    }

    /// The names `owner` stores, ordered.
    pub fn names_of(&self, owner: &str) -> Vec<String> {
        self.items
            .range((owner.to_string(), String::new())..)
            .take_while(|((o, _), _)| o == owner)
            .map(|((_, n), _)| n.clone())
            .collect()
    }

    /// Every resource as `(owner, name, meta)`, ordered.
    pub fn list(&self) -> impl Iterator<Item = (&str, &str, &Meta)> + '_ {
        self.items
            .iter()
            .map(|((o, n), m)| (o.as_str(), n.as_str(), m))
    }
}

/// A resource as the API shows it: `{"owner","name","size","sha256","readers"}`.
pub(crate) fn resource_json(owner: &str, name: &str, m: &Meta) -> String {
    format!(
        "{{\"owner\":\"{owner}\",\"name\":\"{name}\",\"size\":{},\"sha256\":\"{}\",\"readers\":{}}}",
        m.size,
        m.sha256,
        readers_json(&m.readers)
    )
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

    fn meta(size: u64) -> Meta {
        Meta {
            size,
            sha256: "x".into(),
            readers: None,
        }
    }

    const L: Limits = Limits {
        max: 10,
        quota: 15,
        per_owner: 100,
    };

    #[test]
    fn quota_counts_replacements_and_reservations() {
        let mut ix = Index::default();
        assert_eq!(ix.reserve("o", "a", 11, L), Err(QuotaError::TooLarge));
        ix.reserve("o", "a", 10, L).unwrap();
        assert_eq!(
            ix.reserve("o", "b", 10, L),
            Err(QuotaError::QuotaExceeded),
            "reserved bytes count"
        );
        ix.commit("o", "a", meta(10), 10);
        assert_eq!(ix.total_bytes(), 10);
        // Replacing a resource frees its old size.
        ix.reserve("o", "a", 10, L).unwrap();
        ix.commit("o", "a", meta(8), 10);
        assert_eq!(ix.total_bytes(), 8);
        assert_eq!(ix.owner_bytes("o"), 8);
        assert_eq!(ix.remove("o", "a").unwrap().size, 8);
        assert_eq!(ix.total_bytes(), 0);
        assert_eq!(ix.owner_bytes("o"), 0);
        assert_eq!(ix.list().count(), 0);
        assert!(ix.owners.is_empty(), "an owner with nothing is forgotten");
    }

    #[test]
    fn per_owner_quota_is_apart_from_the_total() {
        let lim = Limits {
            max: 10,
            quota: 100,
            per_owner: 12,
        };
        let mut ix = Index::default();
        ix.reserve("alice", "a", 10, lim).unwrap();
        assert_eq!(
            ix.reserve("alice", "b", 5, lim),
            Err(QuotaError::OwnerQuotaExceeded),
            "alice's reservation counts against alice"
        );
        ix.reserve("bob", "b", 10, lim).unwrap();
        ix.commit("alice", "a", meta(10), 10);
        ix.release("bob", 10);
        assert_eq!(
            ix.reserve("alice", "c", 3, lim),
            Err(QuotaError::OwnerQuotaExceeded)
        );
        // Replacing her own resource frees its size for her too.
        ix.reserve("alice", "a", 10, lim).unwrap();
        ix.release("alice", 10);
        ix.reserve("alice", "c", 2, lim).unwrap();
        ix.commit("alice", "c", meta(2), 2);
        assert_eq!(ix.names_of("alice"), vec!["a".to_string(), "c".to_string()]);
        assert!(ix.names_of("bob").is_empty());
        assert_eq!(ix.names_of("alic"), Vec::<String>::new());
    }

    #[test]
    fn readers_parse_and_decide() {
        assert_eq!(parse_readers(None), Ok(None));
        assert_eq!(parse_readers(Some("")), Ok(Some(vec![])));
        assert_eq!(
            parse_readers(Some("b,a,b,,c")),
            Ok(Some(vec!["b".into(), "a".into(), "c".into()]))
        );
        assert!(matches!(
            parse_readers(Some("ok,../x")),
            Err(ReadersError::BadId(_))
        ));
        assert!(matches!(
            parse_readers(Some("a__b")),
            Err(ReadersError::BadId(_))
        ));
        let many: Vec<String> = (0..=MAX_READERS).map(|i| format!("s{i}")).collect();
        assert_eq!(
            parse_readers(Some(&many.join(","))),
            Err(ReadersError::TooMany)
        );
        let everyone = meta(1);
        assert!(everyone.readable_by("o", "x", false));
        let only = Meta {
            readers: Some(vec!["r".into()]),
            ..meta(1)
        };
        assert!(only.readable_by("o", "r", false));
        assert!(only.readable_by("o", "o", false), "the owner always reads");
        assert!(only.readable_by("o", "x", true), "an admin always reads");
        assert!(!only.readable_by("o", "x", false));
        let owner_only = Meta {
            readers: Some(vec![]),
            ..meta(1)
        };
        assert!(!owner_only.readable_by("o", "r", false));
        assert_eq!(readers_json(&None), "null");
        assert_eq!(
            readers_json(&Some(vec!["a".into(), "b".into()])),
            r#"["a","b"]"#
        );
    }
}
