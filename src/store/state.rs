//! The state log: what is written to disk, when it is fsynced, and how it is read back.
//!
//! Owns `<state dir>/state.log` (append-only records, see `log`) and `<state dir>/state.snap`
//! (a compacted copy of the same records). Changes are [`Op`]s appended to an in-memory
//! [`Batch`] during a loop turn (by the core, which holds no file); [`Store::write`] writes
//! a commit's records and fsyncs once (group commit, on the reactor's disk thread,
//! `io::disk`); only then does the core release the answers that promised durability.
//! Replay applies the snapshot, then the log; every op is idempotent (upsert / remove-if-
//! present), so a crash between writing a snapshot and truncating the log replays to the
//! same state. A torn or corrupt tail is detected, logged, and cut off.
//!
//! It never blocks on anything but the local disk, and writes only during `write` (once a
//! turn) and `compact`.

use super::log::{self, Next};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const LOG_FILE: &str = "state.log";
pub const SNAP_FILE: &str = "state.snap";
/// The log is compacted into a snapshot once it is over this size and over twice the last
/// snapshot's size (so compaction work stays proportional to the changes).
pub const COMPACT_MIN_BYTES: u64 = 8 * 1024 * 1024;

/// One durable change.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A registration (new or updated): the entry's endpoints, capabilities and signing-key
    /// epoch (`0` in records written before epochs existed: read as 1).
    Register {
        id: String,
        endpoints: Box<RawValue>,
        capabilities: Box<RawValue>,
        #[serde(default)]
        epoch: u64,
    },
    /// A removal at `at` (unix seconds): the entry, its queue and its resources are gone,
    /// older tokens revoked; `epoch` is its last key epoch (the next registration gets a
    /// later one).
    Remove {
        id: String,
        at: i64,
        #[serde(default)]
        epoch: u64,
    },
    /// A server's signing key was rotated to `epoch` (contract §6).
    Rekey { id: String, epoch: u64 },
    /// Tokens with this `jti` are refused until `until` (unix seconds) has passed.
    Revoke { jti: String, until: i64 },
    /// A message queued for `to`, in its order `seq`.
    Enqueue {
        to: String,
        seq: u64,
        #[serde(rename = "msgId")]
        msg_id: String,
        from: String,
        message: Box<RawValue>,
        #[serde(rename = "sentAt")]
        sent_at: i64,
        /// When an undelivered copy expires (ms since the epoch).
        #[serde(rename = "expiresAt")]
        expires_at: Option<i64>,
        notify: bool,
    },
    /// A queued message left the queue (answered, expired, or delivered as a notification).
    Dequeue { to: String, seq: u64 },
}

/// What was read back at start.
#[derive(Debug, Default)]
pub struct Replay {
    pub ops: Vec<Op>,
    /// Records skipped because their payload did not parse (counted, logged).
    pub unreadable: usize,
    /// Where the log's intact prefix ended, when a torn or corrupt tail was cut off.
    pub torn: Option<(u64, String)>,
}

pub struct Store {
    dir: PathBuf,
    log: File,
    log_bytes: u64,
    snap_bytes: u64,
}

/// A loop turn's changes, encoded as log records and not yet on disk: filled by the core
/// (pure: no file), written by [`Store::write`] once a turn.
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
}

impl Batch {
    /// Adds a change; returns where its record sits, so a failed commit can take it out.
    pub fn append(&mut self, op: &Op) -> Option<std::ops::Range<usize>> {
        let start = self.bytes.len();
        match serde_json::to_vec(op) {
            Ok(p) => log::encode(&p, &mut self.bytes),
            Err(e) => {
                ::log::error!("state record not encodable: {e}");
                return None;
            }
        }
        Some(start..self.bytes.len())
    }

    /// After a failed commit: removes the records of changes that were not acknowledged
    /// and were undone (their ranges, from `append`); the rest is retried.
    pub fn strip(&mut self, mut ranges: Vec<std::ops::Range<usize>>) {
        ranges.sort_by_key(|r| std::cmp::Reverse(r.start));
        for r in ranges {
            if r.end <= self.bytes.len() {
                self.bytes.drain(r);
            }
        }
    }

    /// The first `n` bytes (a commit's records) are on disk: the rest moves to the front.
    pub fn drain_front(&mut self, n: usize) {
        self.bytes.drain(..n.min(self.bytes.len()));
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The records, in order.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The batch is on disk.
    pub fn clear(&mut self) {
        self.bytes.clear();
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens (creating, mode 0600) the log; an existing log is made 0600 too (§7).
fn open_private(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).read(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let f = o.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

/// Reads every intact record of a file; returns the ops, the unreadable count, and the
/// offset and reason of a torn tail.
fn read_file(path: &Path, replay: &mut Replay) -> io::Result<(u64, Option<(u64, log::Torn)>)> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, None)),
        Err(e) => return Err(e),
    };
    let mut r = BufReader::new(f);
    let mut payload = Vec::new();
    let mut offset = 0u64;
    loop {
        match log::read_record(&mut r, &mut payload)? {
            Next::End => return Ok((offset, None)),
            Next::Torn(t) => return Ok((offset, Some((offset, t)))),
            Next::Record => {
                offset += (log::HEADER + payload.len()) as u64;
                match serde_json::from_slice::<Op>(&payload) {
                    Ok(op) => replay.ops.push(op),
                    Err(_) => replay.unreadable += 1,
                }
            }
        }
    }
}

impl Store {
    /// Opens (creating) the state files and reads them back. A torn tail of the log is cut
    /// off here, so new records never follow garbage.
    pub fn open(dir: &Path) -> io::Result<(Store, Replay)> {
        super::create_dir_private(dir)?;
        let mut replay = Replay::default();
        super::keep_private(&dir.join(SNAP_FILE))?;
        let (snap_bytes, snap_torn) = read_file(&dir.join(SNAP_FILE), &mut replay)?;
        if let Some((at, why)) = snap_torn {
            // A snapshot is renamed into place only when complete: damage here is disk
            // corruption. Keep what is intact and say so.
            log::warn_torn("snapshot", at, why);
        }
        let log_path = dir.join(LOG_FILE);
        let (good, torn) = read_file(&log_path, &mut replay)?;
        let mut file = open_private(&log_path)?;
        fsync_dir(dir)?; // the log's directory entry survives a power loss too
        if let Some((at, why)) = torn {
            let len = file.metadata()?.len();
            log::warn_torn("log", at, why);
            replay.torn = Some((at, format!("{why}; {} bytes dropped", len - at)));
            file.set_len(at)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok((
            Store {
                dir: dir.to_path_buf(),
                log: file,
                log_bytes: good,
                snap_bytes,
            },
            replay,
        ))
    }

    /// Writes a turn's batch and fsyncs it: one fsync for every change of the turn. On an
    /// error the log is cut back to its last good length: the caller keeps the batch,
    /// strips the records it undid, and writes the rest with the next commit, so disk and
    /// memory agree after a restart.
    pub fn write(&mut self, batch: &[u8]) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let r = self.log.write_all(batch).and_then(|_| self.log.sync_data());
        match r {
            Ok(()) => {
                self.log_bytes += batch.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.log.set_len(self.log_bytes);
                let _ = self.log.seek(SeekFrom::Start(self.log_bytes));
                Err(e)
            }
        }
    }

    pub fn wants_compaction(&self) -> bool {
        self.log_bytes > COMPACT_MIN_BYTES && self.log_bytes > 2 * self.snap_bytes
    }

    /// Replaces the snapshot with `ops` (the whole current state) and empties the log.
    /// Crash-safe: the snapshot is written to a temporary file, fsynced and renamed; the log
    /// is emptied only after that, and replaying an old log over the new snapshot is harmless.
    pub fn compact(&mut self, ops: &[Op]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{SNAP_FILE}.tmp"));
        let mut buf = Vec::new();
        for op in ops {
            if let Ok(p) = serde_json::to_vec(op) {
                log::encode(&p, &mut buf);
            }
        }
        super::write_new_private(&tmp, &buf)?;
        fs::rename(&tmp, self.dir.join(SNAP_FILE))?;
        self.snap_bytes = buf.len() as u64;
        let emptied = fsync_dir(&self.dir)
            .and_then(|_| self.log.set_len(0))
            .and_then(|_| self.log.seek(SeekFrom::Start(0)).map(|_| ()))
            .and_then(|_| self.log.sync_all());
        // Whatever happened, the next write must start where the file really ends (a stale
        // length would make a later failed commit cut or zero-fill the log).
        self.log_bytes = self
            .log
            .metadata()
            .map(|m| m.len())
            .unwrap_or(self.log_bytes);
        let _ = self.log.seek(SeekFrom::Start(self.log_bytes));
        emptied
    }

    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the reactor does once a turn: the batch to disk, then forgotten.
    fn commit(s: &mut Store, b: &mut Batch) {
        s.write(b.bytes()).unwrap();
        b.clear();
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fedmcp-state-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn enqueue(seq: u64) -> Op {
        Op::Enqueue {
            to: "bob".into(),
            seq,
            msg_id: format!("m-{seq}"),
            from: "alice".into(),
            message: raw(r#"{"a" : 1.50}"#),
            sent_at: 7,
            expires_at: None,
            notify: true,
        }
    }

    #[test]
    fn commit_then_replay_returns_the_ops_in_order() {
        let d = dir("replay");
        let (mut s, r) = Store::open(&d).unwrap();
        let mut b = Batch::default();
        assert!(r.ops.is_empty());
        b.append(&Op::Register {
            id: "bob".into(),
            endpoints: raw("{}"),
            capabilities: raw(r#"{"x":1}"#),
            epoch: 1,
        });
        b.append(&enqueue(1));
        b.append(&enqueue(2));
        commit(&mut s, &mut b);
        b.append(&Op::Dequeue {
            to: "bob".into(),
            seq: 1,
        });
        // Not committed: lost, as a crash would lose it.
        drop(s);
        let (_, r) = Store::open(&d).unwrap();
        assert_eq!(r.ops.len(), 3);
        match &r.ops[2] {
            Op::Enqueue { seq, message, .. } => {
                assert_eq!(*seq, 2);
                assert_eq!(
                    message.get(),
                    r#"{"a" : 1.50}"#,
                    "message bytes kept exactly"
                );
            }
            other => panic!("{other:?}"),
        }
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_tail_is_cut_and_new_records_follow_the_intact_prefix() {
        let d = dir("torn");
        let (mut s, _) = Store::open(&d).unwrap();
        let mut b = Batch::default();
        b.append(&enqueue(1));
        b.append(&enqueue(2));
        commit(&mut s, &mut b);
        drop(s);
        let path = d.join(LOG_FILE);
        let len = fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 5).unwrap(); // cut the second record mid-way
        drop(f);
        let (mut s, r) = Store::open(&d).unwrap();
        let mut b = Batch::default();
        assert_eq!(r.ops.len(), 1);
        assert!(r.torn.is_some());
        b.append(&enqueue(3));
        commit(&mut s, &mut b);
        drop(s);
        let (_, r) = Store::open(&d).unwrap();
        let seqs: Vec<u64> = r
            .ops
            .iter()
            .filter_map(|o| {
                if let Op::Enqueue { seq, .. } = o {
                    Some(*seq)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(seqs, vec![1, 3]);
        assert!(r.torn.is_none());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_flipped_byte_keeps_every_record_before_it() {
        let d = dir("flip");
        let (mut s, _) = Store::open(&d).unwrap();
        let mut b = Batch::default();
        for i in 1..=3 {
            b.append(&enqueue(i));
        }
        commit(&mut s, &mut b);
        drop(s);
        let path = d.join(LOG_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let third = bytes.len() - 20;
        bytes[third] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let (_, r) = Store::open(&d).unwrap();
        assert_eq!(r.ops.len(), 2);
        assert!(r.torn.unwrap().1.contains("checksum"));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn compaction_replaces_the_log_with_a_snapshot() {
        let d = dir("compact");
        let (mut s, _) = Store::open(&d).unwrap();
        let mut b = Batch::default();
        for i in 1..=5 {
            b.append(&enqueue(i));
        }
        commit(&mut s, &mut b);
        s.compact(&[enqueue(4), enqueue(5)]).unwrap();
        assert_eq!(s.log_bytes(), 0);
        b.append(&enqueue(6));
        commit(&mut s, &mut b);
        drop(s);
        let (_, r) = Store::open(&d).unwrap();
        let seqs: Vec<u64> = r
            .ops
            .iter()
            .filter_map(|o| {
                if let Op::Enqueue { seq, .. } = o {
                    Some(*seq)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(seqs, vec![4, 5, 6]);
        let _ = fs::remove_dir_all(&d);
    }
}
