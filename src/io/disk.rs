//! The disk thread: the state log's writes, fsyncs and compactions, off the loop.
//!
//! Owns the [`Store`] once the proxy serves, and one thread that does what the loop must
//! never wait for: appending a commit's records and fsyncing them, compacting the log into
//! a snapshot, and the fsyncs that finish a resource upload (its file and sidecar, then its
//! directory once renamed). The loop hands it a [`Job`] and goes on; the thread answers
//! with a [`Done`] and wakes the loop through the reactor's `mio::Waker`.
//!
//! Invariants: jobs are done one at a time, in the order given (so records reach the disk
//! in the order the core made them); the core has at most one commit in flight
//! (`Federation::begin_commit`) and each upload at most one job, so the jobs outstanding are
//! bounded by the connections; over the bound given at start a job is refused (a failed
//! commit, a `503` upload), never waited for. A compaction goes with a
//! commit: its snapshot is the core's whole state at the moment the commit began (what is
//! on disk plus the commit's records), so once the snapshot is in place the commit's
//! records are durable too; if the snapshot fails, the records are appended to the log as
//! usual. This module never decides what is written; it never touches a socket.

use crate::store::blobs::{Sealed, sync_dir, sync_sealed};
use crate::store::state::{Op, Store};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

/// Work for the disk thread.
#[derive(Debug)]
pub enum Job {
    /// Append `bytes` (a commit's records) and fsync; with `snapshot`, first try to replace
    /// the log by that snapshot (the whole state, the commit's records included).
    Commit {
        bytes: Vec<u8>,
        snapshot: Option<Vec<Op>>,
    },
    /// Sync a sealed upload's file and write its sidecar (`token` names the upload).
    SyncUpload { token: u64, sealed: Sealed },
    /// Sync the directory a finished upload was renamed into.
    SyncDir { token: u64, dir: PathBuf },
}

/// What the disk thread did.
#[derive(Debug)]
pub enum Done {
    Committed {
        /// Whether the commit's records are on disk (the reason when not).
        result: Result<(), String>,
        /// The compaction tried with it: the log's size before and the snapshot's records,
        /// or why it failed (the log is kept).
        compacted: Option<Result<(u64, usize), String>>,
        /// The log has grown enough for the next commit to carry a snapshot.
        wants_compaction: bool,
    },
    UploadSynced {
        token: u64,
        result: Result<(), String>,
    },
    DirSynced {
        token: u64,
        result: Result<(), String>,
    },
}

/// An upload whose bytes are all in, on its way to the disk (`io::data` drives it): the
/// disk thread syncs its file and sidecar, the loop renames it into place and indexes it,
/// the disk thread syncs the directory, and the connection is answered `201`.
pub struct Finishing {
    pub(crate) conn: crate::io::conn::ConnId,
    /// Until published: dropped, it removes the temporary file.
    pub(crate) up: crate::store::blobs::Upload,
    pub(crate) owner: String,
    pub(crate) name: String,
    pub(crate) meta: crate::federation::resources::Meta,
    pub(crate) size: u64,
    pub(crate) keep_alive: bool,
    pub(crate) side_tmp: PathBuf,
    /// Its owner was removed while it was synced: it is not put in place.
    pub(crate) cancelled: bool,
}

impl Finishing {
    pub fn cancel_if_owned_by(&mut self, owner: &str) {
        if self.owner == owner {
            self.cancelled = true;
        }
    }
}

/// The loop's handle on the disk thread.
pub struct Disk {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<Store>>,
    /// Jobs handed over and not yet heard back about, and the most there may be.
    outstanding: usize,
    max_jobs: usize,
}

impl Disk {
    /// Starts the thread with the opened store; it wakes the loop after every job. At most
    /// `max_jobs` may be outstanding (one commit and an upload per connection).
    pub fn start(store: Store, waker: Arc<mio::Waker>, max_jobs: usize) -> std::io::Result<Disk> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, done) = mpsc::channel::<Done>();
        let thread = std::thread::Builder::new()
            .name("fedmcp-disk".into())
            .spawn(move || run(store, rx, tx, waker))?;
        Ok(Disk {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            outstanding: 0,
            max_jobs: max_jobs.max(1),
        })
    }

    /// Hands a job over without waiting; `Err` gives it back when `max_jobs` are
    /// outstanding or the thread is gone.
    pub fn send(&mut self, job: Job) -> Result<(), Job> {
        let Some(jobs) = self.jobs.as_ref() else {
            return Err(job);
        };
        if self.outstanding >= self.max_jobs {
            return Err(job);
        }
        jobs.send(job).map_err(|e| e.0)?;
        self.outstanding += 1;
        Ok(())
    }

    /// What the thread has finished since the last call (never waits).
    pub fn take_done(&mut self) -> Vec<Done> {
        let mut out = Vec::new();
        while let Ok(d) = self.done.try_recv() {
            out.push(d);
        }
        self.outstanding = self.outstanding.saturating_sub(out.len());
        out
    }

    /// Waits for the next finished job (at exit only: the loop never calls it).
    pub fn wait_done(&mut self) -> Option<Done> {
        let d = self.done.recv().ok()?;
        self.outstanding = self.outstanding.saturating_sub(1);
        Some(d)
    }

    /// Stops the thread once its queue is done and gives the store back (at exit).
    pub fn stop(mut self) -> Option<Store> {
        drop(self.jobs.take());
        self.thread.take().and_then(|t| t.join().ok())
    }
}

fn run(
    mut store: Store,
    jobs: Receiver<Job>,
    done: mpsc::Sender<Done>,
    waker: Arc<mio::Waker>,
) -> Store {
    for job in jobs {
        let d = match job {
            Job::Commit { bytes, snapshot } => commit(&mut store, &bytes, snapshot),
            Job::SyncUpload { token, sealed } => Done::UploadSynced {
                token,
                result: sync_sealed(sealed).map_err(|e| e.to_string()),
            },
            Job::SyncDir { token, dir } => Done::DirSynced {
                token,
                result: sync_dir(&dir).map_err(|e| e.to_string()),
            },
        };
        if done.send(d).is_err() {
            break;
        }
        let _ = waker.wake();
    }
    store
}

/// One commit, with its compaction if asked.
fn commit(store: &mut Store, bytes: &[u8], snapshot: Option<Vec<Op>>) -> Done {
    let compacted = snapshot.map(|ops| {
        let before = store.log_bytes();
        store
            .compact(&ops)
            .map(|()| (before, ops.len()))
            .map_err(|e| e.to_string())
    });
    let result = match compacted {
        // The snapshot holds the commit's records: they are on disk.
        Some(Ok(_)) => Ok(()),
        _ => store.write(bytes).map_err(|e| e.to_string()),
    };
    Done::Committed {
        result,
        compacted,
        wants_compaction: store.wants_compaction(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::state::Batch;

    fn waker() -> (mio::Poll, Arc<mio::Waker>) {
        let poll = mio::Poll::new().expect("poll");
        let w = Arc::new(mio::Waker::new(poll.registry(), mio::Token(7)).expect("waker"));
        (poll, w)
    }

    fn record(id: &str) -> Vec<u8> {
        let mut b = Batch::default();
        b.append(&Op::Revoke {
            jti: id.to_string(),
            until: 4_000_000_000,
        });
        b.bytes().to_vec()
    }

    #[test]
    fn commits_are_written_in_order_and_answered() {
        let dir = std::env::temp_dir().join(format!("fedmcp-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (store, _) = Store::open(&dir).expect("open");
        let (mut poll, w) = waker();
        let mut disk = Disk::start(store, w, 2).expect("start");
        disk.send(Job::Commit {
            bytes: record("a"),
            snapshot: None,
        })
        .expect("queued");
        let mut events = mio::Events::with_capacity(4);
        let mut got = Vec::new();
        while got.is_empty() {
            poll.poll(&mut events, Some(std::time::Duration::from_secs(5)))
                .expect("poll");
            got = disk.take_done();
        }
        assert!(matches!(got[0], Done::Committed { result: Ok(()), .. }));
        // A compaction with the next commit: the snapshot covers its records.
        let snapshot = vec![
            Op::Revoke {
                jti: "a".into(),
                until: 4_000_000_000,
            },
            Op::Revoke {
                jti: "b".into(),
                until: 4_000_000_000,
            },
        ];
        disk.send(Job::Commit {
            bytes: record("b"),
            snapshot: Some(snapshot),
        })
        .expect("queued");
        let d = disk.wait_done().expect("done");
        assert!(
            matches!(
                d,
                Done::Committed {
                    result: Ok(()),
                    compacted: Some(Ok((_, 2))),
                    ..
                }
            ),
            "{d:?}"
        );
        let store = disk.stop().expect("store back");
        assert_eq!(
            store.log_bytes(),
            0,
            "the log was emptied into the snapshot"
        );
        let (_, replay) = Store::open(&dir).expect("reopen");
        let revoked: Vec<String> = replay
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Revoke { jti, .. } => Some(jti.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(revoked, ["a", "b"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
