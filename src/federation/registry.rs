//! The registry: a fixed-capacity table of servers, allocated once at start.
//!
//! Owns every server's entry (id, endpoints, capabilities, signing key and its epoch, its
//! presence — offline, or connecting or online on a session —, statistics, and the queue of
//! messages waiting for it) and the record of removals that keeps old tokens revoked and
//! their keys retired. Slots are addressed by [`Slot`] (index + generation), so a handle kept
//! by a timer or a pending delivery can never reach a newer server that reused the slot.
//!
//! Invariants: at most `capacity` entries; `by_id` maps exactly the occupied slots; a slot's
//! generation changes whenever its entry is removed. It never does I/O and never panics on a
//! peer-supplied id (lookups return `Option`).

use crate::federation::action::Slot;
use crate::federation::action::{LinkId, SessionId};
use crate::timer::TimerId;
use std::collections::{HashMap, VecDeque};

/// Where a server's session is: the one answer to "is it connected, is it a recipient".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Offline,
    /// A session whose welcome is not answered yet: it may send, but it is not a recipient.
    Connecting(SessionId),
    /// A session whose welcome was answered: a recipient.
    Online(SessionId),
    /// Online on another node of the cluster (§10), by its index in the cluster's node table.
    Remote(u16),
}

impl Presence {
    /// The session, online or still connecting.
    pub fn session(self) -> Option<SessionId> {
        match self {
            Presence::Offline | Presence::Remote(_) => None,
            Presence::Connecting(c) | Presence::Online(c) => Some(c),
        }
    }

    /// The session when it is a recipient.
    pub fn online(self) -> Option<SessionId> {
        match self {
            Presence::Online(c) => Some(c),
            _ => None,
        }
    }

    /// Online here or on another node: a recipient somewhere in the federation.
    pub fn is_online(self) -> bool {
        matches!(self, Presence::Online(_) | Presence::Remote(_))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Offline => "offline",
            Presence::Connecting(_) => "connecting",
            Presence::Online(_) | Presence::Remote(_) => "online",
        }
    }
}

/// A message waiting for its recipient (contract §4 `queue: true`).
#[derive(Debug)]
pub struct Queued {
    pub seq: u64,
    pub msg_id: String,
    pub from: String,
    /// The `message` value exactly as the sender sent it.
    pub message: String,
    pub sent_at_ms: i64,
    /// When an undelivered copy is dropped as `expired` (the send's `ttlMs`), and the timer
    /// armed for it while the message waits in the queue.
    pub expires: Option<std::time::Instant>,
    pub ttl_timer: Option<TimerId>,
    /// The delivery id while delivered and awaiting the recipient's answer.
    pub inflight: Option<u64>,
    /// The commit that writes its enqueue record (`Federation::commit_gen` when it was
    /// queued; 0 for a copy restored from disk or held in memory only). It is not delivered
    /// before that commit is on disk: a delivery must never get ahead of its `queued`.
    pub commit_gen: u64,
    /// Whether the sender awaits `federation/delivered` (false for queued notifications).
    pub notify_sender: bool,
}

impl Queued {
    pub fn bytes(&self) -> usize {
        self.message.len() + self.msg_id.len() + self.from.len() + 64
    }
}

/// A recipient's queue, in send order (`seq`), with a count of the copies not delivered yet,
/// so that "is anything waiting?" (asked on every send to the recipient) costs O(1) whatever
/// the queue's length. Reading goes through `Deref`; every change goes through the methods
/// here, which keep `waiting` equal to the number of copies whose `inflight` is `None`.
#[derive(Debug, Default)]
pub struct Queue {
    items: VecDeque<Queued>,
    waiting: usize,
}

impl std::ops::Deref for Queue {
    type Target = VecDeque<Queued>;
    fn deref(&self) -> &VecDeque<Queued> {
        &self.items
    }
}

impl Queue {
    /// True when a copy waits to be delivered (not in flight).
    pub fn has_waiting(&self) -> bool {
        self.waiting > 0
    }

    /// Puts a copy at its place in send order (at the back for a new send: O(1)).
    pub fn insert(&mut self, q: Queued) {
        if q.inflight.is_none() {
            self.waiting += 1;
        }
        let pos = self.items.partition_point(|x| x.seq < q.seq);
        self.items.insert(pos, q);
    }

    pub fn remove(&mut self, i: usize) -> Option<Queued> {
        let q = self.items.remove(i)?;
        if q.inflight.is_none() {
            self.waiting -= 1;
        }
        Some(q)
    }

    /// Marks the copy at `i` delivered as `Some(delivery id)`, or waiting again (`None`).
    pub fn set_inflight(&mut self, i: usize, inflight: Option<u64>) {
        let Some(q) = self.items.get_mut(i) else {
            return;
        };
        match (q.inflight.is_some(), inflight.is_some()) {
            (false, true) => self.waiting -= 1,
            (true, false) => self.waiting += 1,
            _ => {}
        }
        q.inflight = inflight;
    }

    /// The TTL timer of the copy at `i` (the one field changed in place besides `inflight`).
    pub fn ttl_timer_mut(&mut self, i: usize) -> Option<&mut Option<TimerId>> {
        self.items.get_mut(i).map(|q| &mut q.ttl_timer)
    }

    /// The first copy not in flight: the next to deliver. Copies in flight before it are at
    /// most the recipient's in-flight bound, so this is O(1) in the queue's length.
    pub fn first_waiting(&self) -> Option<usize> {
        if self.waiting == 0 {
            return None;
        }
        self.items.iter().position(|q| q.inflight.is_none())
    }
}

/// Where the proxy is with dialling a server that has `endpoints.control` (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutPhase {
    /// Waiting for the next attempt (`state: "backoff"` while there is no session).
    Backoff,
    /// Resolving the host name (lookup id).
    Resolving(u64),
    /// Asked the reactor to open the connection of this attempt (done within the turn).
    Opening,
    /// Connecting / TLS / upgrading on the reactor's connection `LinkId`.
    Dialing(LinkId),
    /// The dialled session is the server's session (`Entry::presence` names it) until it
    /// ends.
    Session,
}

#[derive(Debug)]
pub struct Outbound {
    pub url: crate::proto::upgrade::ControlUrl,
    /// Failed attempts since the last session that came online.
    pub attempt: u32,
    pub phase: OutPhase,
    pub last_error: Option<String>,
    pub next_attempt_ms: Option<i64>,
    pub timer: Option<TimerId>,
    /// When the current dialled session came online (its welcome was answered).
    pub online_since: Option<std::time::Instant>,
    /// Addresses of the resolved name not tried yet in this attempt (§5: all are tried in
    /// turn before the attempt counts as failed).
    pub untried: Vec<std::net::SocketAddr>,
}

#[derive(Debug)]
pub struct Entry {
    pub server_id: String,
    /// JSON text of the `endpoints` object (`{}` when none).
    pub endpoints: String,
    /// JSON text of the `capabilities` object served now (`{}` when none): the session's,
    /// from its welcome answer, else the registered ones.
    pub capabilities: String,
    /// The capabilities given at registration (what is written to the state log).
    pub reg_capabilities: String,
    /// Registered by an admin (true) or known because it connected with a valid token.
    pub registered: bool,
    /// The signing key's epoch (contract §6): 1 for a new id, one more than the last epoch
    /// of a removed id registered again, and one more at each rotation.
    pub key_epoch: u64,
    /// `K = HMAC-SHA256(secret, "fedmcp/v1/sign/" + serverId + "/" + epoch)` (contract §6).
    pub signing_key: [u8; 32],
    /// Tokens with `iat <= revoked_through` were issued before a removal and stay revoked.
    pub revoked_through: Option<i64>,
    /// Its session, if it has one, and whether that session is a recipient yet.
    pub presence: Presence,
    /// Present while the server has a `ws://`/`wss://` `endpoints.control`.
    pub outbound: Option<Outbound>,
    pub connected_at_ms: Option<i64>,
    pub last_seen_at_ms: Option<i64>,
    pub queue: Queue,
    pub queue_bytes: usize,
    /// Bytes of copies of direct deliveries awaiting this server's answer (`queue: true`
    /// sends keep one to requeue it): with `queue_bytes`, bounded by
    /// `FEDMCP_QUEUE_MAX_BYTES` (contract §4).
    pub inflight_bytes: usize,
    /// The server's rate limit, shared by its control session and its HTTP sends (made at
    /// its first message).
    pub bucket: Option<crate::federation::rate::Bucket>,
    /// In a run of refused messages (one `rate_limited` audit line per run).
    pub rate_limited: bool,
    pub sent: u64,
    pub received: u64,
}

struct Cell {
    generation: u32,
    entry: Option<Entry>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RegistryError {
    Full,
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the registry is full (FEDMCP_MAX_SERVERS)")
    }
}

/// What is remembered of a removed id: when (older tokens stay revoked) and its last key
/// epoch (a new registration gets the next one, so the old key never verifies again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removal {
    pub at: i64,
    pub epoch: u64,
}

pub struct Registry {
    cells: Vec<Cell>,
    free: Vec<u32>,
    by_id: HashMap<String, u32>,
    /// serverId → its last removal; bounded by `capacity` (oldest dropped).
    removed: HashMap<String, Removal>,
    capacity: usize,
}

impl Registry {
    /// Allocates the whole table now: `capacity` cells and index space.
    pub fn new(capacity: usize) -> Registry {
        let mut cells = Vec::with_capacity(capacity);
        cells.resize_with(capacity, || Cell {
            generation: 0,
            entry: None,
        });
        Registry {
            cells,
            free: (0..capacity as u32).rev().collect(),
            by_id: HashMap::with_capacity(capacity),
            removed: HashMap::new(),
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn find(&self, server_id: &str) -> Option<Slot> {
        let idx = *self.by_id.get(server_id)?;
        Some(Slot {
            idx,
            generation: self.cells[idx as usize].generation,
        })
    }

    pub fn get(&self, slot: Slot) -> Option<&Entry> {
        let c = self.cells.get(slot.idx as usize)?;
        if c.generation != slot.generation {
            return None;
        }
        c.entry.as_ref()
    }

    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut Entry> {
        let c = self.cells.get_mut(slot.idx as usize)?;
        if c.generation != slot.generation {
            return None;
        }
        c.entry.as_mut()
    }

    pub fn by_id(&self, server_id: &str) -> Option<&Entry> {
        self.find(server_id).and_then(|s| self.get(s))
    }

    pub fn by_id_mut(&mut self, server_id: &str) -> Option<&mut Entry> {
        let s = self.find(server_id)?;
        self.get_mut(s)
    }

    /// The last removal time of a server id, if it was ever removed (and not forgotten).
    pub fn removed_at(&self, server_id: &str) -> Option<i64> {
        self.removed.get(server_id).map(|r| r.at)
    }

    /// The key epoch a new entry for `server_id` gets: one past a removed id's last epoch,
    /// else 1.
    pub fn next_epoch(&self, server_id: &str) -> u64 {
        self.removed
            .get(server_id)
            .map_or(1, |r| r.epoch.saturating_add(1))
    }

    /// Inserts a new entry (the caller checked the id is absent).
    pub fn insert(&mut self, mut entry: Entry) -> Result<Slot, RegistryError> {
        let idx = self.free.pop().ok_or(RegistryError::Full)?;
        entry.revoked_through = self.removed_at(&entry.server_id);
        self.by_id.insert(entry.server_id.clone(), idx);
        let cell = &mut self.cells[idx as usize];
        cell.entry = Some(entry);
        Ok(Slot {
            idx,
            generation: cell.generation,
        })
    }

    /// Removes an entry and records the removal time so older tokens stay revoked.
    pub fn remove(&mut self, slot: Slot, now_secs: i64) -> Option<Entry> {
        let cell = self.cells.get_mut(slot.idx as usize)?;
        if cell.generation != slot.generation {
            return None;
        }
        let entry = cell.entry.take()?;
        cell.generation = cell.generation.wrapping_add(1);
        self.by_id.remove(&entry.server_id);
        self.free.push(slot.idx);
        self.record_removal(&entry.server_id, now_secs, entry.key_epoch);
        Some(entry)
    }

    /// Records a removal without an entry (restoring state).
    pub fn record_removal(&mut self, server_id: &str, at: i64, epoch: u64) {
        // Bounded: at capacity, the oldest removal record is forgotten.
        if self.removed.len() >= self.capacity
            && !self.removed.contains_key(server_id)
            && let Some(oldest) = self
                .removed
                .iter()
                .min_by_key(|(_, r)| r.at)
                .map(|(k, _)| k.clone())
        {
            self.removed.remove(&oldest);
        }
        let epoch = self
            .removed
            .get(server_id)
            .map_or(epoch, |r| r.epoch.max(epoch));
        self.removed
            .insert(server_id.to_string(), Removal { at, epoch });
    }

    /// Every removal record: server id and its removal.
    pub fn removals(&self) -> impl Iterator<Item = (&str, Removal)> + '_ {
        self.removed.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// All occupied slots, in slot order.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.cells
            .iter()
            .enumerate()
            .filter(|(_, c)| c.entry.is_some())
            .map(|(i, c)| Slot {
                idx: i as u32,
                generation: c.generation,
            })
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.cells.iter().filter_map(|c| c.entry.as_ref())
    }
}

impl Entry {
    /// A new entry whose key has epoch `key_epoch` and value `signing_key` (derived by the
    /// caller, who holds the secret).
    pub fn new(server_id: String, key_epoch: u64, signing_key: [u8; 32]) -> Entry {
        Entry {
            server_id,
            endpoints: "{}".to_string(),
            capabilities: "{}".to_string(),
            reg_capabilities: "{}".to_string(),
            registered: false,
            key_epoch,
            signing_key,
            revoked_through: None,
            presence: Presence::Offline,
            outbound: None,
            connected_at_ms: None,
            last_seen_at_ms: None,
            queue: Queue::default(),
            queue_bytes: 0,
            inflight_bytes: 0,
            bucket: None,
            rate_limited: false,
            sent: 0,
            received: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(seq: u64) -> Queued {
        Queued {
            seq,
            msg_id: format!("m{seq}"),
            from: "a".into(),
            message: "{}".into(),
            sent_at_ms: 0,
            expires: None,
            ttl_timer: None,
            inflight: None,
            commit_gen: 0,
            notify_sender: true,
        }
    }

    #[test]
    fn the_queue_counts_what_waits() {
        let mut q = Queue::default();
        assert!(!q.has_waiting());
        assert_eq!(q.first_waiting(), None);
        for seq in [1, 2, 4] {
            q.insert(queued(seq));
        }
        q.insert(queued(3)); // a requeued copy goes back to its place
        let seqs: Vec<u64> = q.iter().map(|x| x.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        q.set_inflight(0, Some(10));
        q.set_inflight(1, Some(11));
        q.set_inflight(1, Some(12)); // in flight again under another id: no double count
        assert_eq!(q.first_waiting(), Some(2));
        q.set_inflight(2, Some(13));
        q.set_inflight(3, Some(14));
        assert!(!q.has_waiting());
        assert_eq!(q.first_waiting(), None);
        q.set_inflight(1, None); // undelivered: waits again, ahead of later ones in flight
        assert_eq!(q.first_waiting(), Some(1));
        assert!(q.remove(1).is_some_and(|x| x.seq == 2));
        assert!(!q.has_waiting());
        assert!(q.remove(0).is_some());
        q.insert(queued(5));
        assert!(q.has_waiting());
        assert_eq!(q.first_waiting(), Some(2));
        assert!(q.remove(9).is_none());
        q.set_inflight(9, Some(1)); // out of range: nothing changes
        assert_eq!(q.len(), 3);
        assert!(q.has_waiting());
    }

    #[test]
    fn fixed_capacity_and_generations() {
        let mut r = Registry::new(2);
        let a = r.insert(Entry::new("a".into(), 1, [0; 32])).unwrap();
        let _b = r.insert(Entry::new("b".into(), 1, [0; 32])).unwrap();
        assert_eq!(
            r.insert(Entry::new("c".into(), 1, [0; 32])).unwrap_err(),
            RegistryError::Full
        );
        assert_eq!(r.find("a"), Some(a));
        assert!(r.remove(a, 100).is_some());
        assert!(r.get(a).is_none(), "a stale slot reaches nothing");
        assert_eq!(r.removed_at("a"), Some(100));
        let c = r.insert(Entry::new("c".into(), 1, [0; 32])).unwrap();
        assert_eq!(c.idx, a.idx);
        assert_ne!(c.generation, a.generation);
        let a2 = r.insert(Entry::new("a".into(), 1, [0; 32])).unwrap_err();
        assert_eq!(a2, RegistryError::Full);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn reinserted_entry_keeps_old_tokens_revoked() {
        let mut r = Registry::new(4);
        let a = r.insert(Entry::new("a".into(), 1, [0; 32])).unwrap();
        r.remove(a, 50);
        let a = r.insert(Entry::new("a".into(), 1, [0; 32])).unwrap();
        assert_eq!(r.get(a).unwrap().revoked_through, Some(50));
        assert_eq!(
            r.next_epoch("a"),
            2,
            "a removed id's next key is a new epoch"
        );
        assert_eq!(r.next_epoch("zz"), 1);
    }

    #[test]
    fn removal_records_are_bounded() {
        let mut r = Registry::new(2);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            let s = r.insert(Entry::new(name.to_string(), 1, [0; 32])).unwrap();
            r.remove(s, i as i64);
        }
        assert!(r.removed.len() <= 2);
        assert_eq!(r.removed_at("d"), Some(3));
        assert_eq!(r.removed_at("a"), None);
    }
}
