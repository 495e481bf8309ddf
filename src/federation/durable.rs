//! Keeping acknowledged promises (contract §7): what the proxy writes to the state log, the
//! once-a-turn commit that releases answers, and the restore at start.
//!
//! Owns the policy, not the format (`store::state` owns that) and not the file (the
//! reactor's disk thread writes it): a change is encoded into the
//! [`crate::store::state::Batch`]; a registration (`201`/`200`), a removal (`204`), a
//! `queued` answer and the `delivered`/`expired` notice of a queued copy taken out are
//! *deferred* until the records made before them are fsynced, and a queued copy is not
//! delivered before its enqueue record is (its `commit_gen`). The reactor begins a commit
//! once per loop turn ([`Federation::begin_commit`], at most one in flight: records reach the
//! disk in order, and what is made while one is written goes with the next) and reports it
//! with [`Federation::committed`] when the disk thread is done; the loop never waits. What
//! a change makes visible before its answer (a listing, a session it admits) is the state
//! the proxy will keep unless the write fails, in which case the change is undone.
//! If the write or fsync fails, nothing deferred is acknowledged: the sender gets
//! `storage_failed`, the queued copy is taken back out of memory, `readyz` reports the
//! degradation until a commit succeeds again, and the failure is logged and counted.
//! Restore replays the log into the registry and queues before the listener serves.

use crate::federation::Federation;
use crate::federation::action::Slot;
use crate::federation::action::{Action, Answer, RequestId};
use crate::federation::pending::{Committing, Deferred, Record};
use crate::federation::registry::Queued;
use crate::proto::http::response::Resp;
use crate::proto::jsonrpc::RpcError;
use crate::store::state::{Op, Replay};
use serde_json::value::RawValue;
use std::ops::Range;

fn raw(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_string())
        .unwrap_or_else(|_| RawValue::from_string("{}".to_string()).unwrap_or_default())
}

/// Latest removal time accepted from disk (year 9999), and the highest sequence number.
const MAX_TIME_SECS: i64 = 253_402_300_799;
const MAX_SEQ: u64 = u64::MAX / 4;

/// A msgId as the proxy makes them (boot prefix, `-`, number): safe inside a JSON string.
pub(crate) fn safe_msg_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Whether a record read from disk is one the proxy could have written: a crafted or
/// damaged log must not inject ids that break JSON, or numbers that overflow.
pub(crate) fn sane(op: &Op) -> bool {
    use crate::proto::jwt::valid_server_id as id_ok;
    let object = |v: &RawValue| v.get().starts_with('{');
    match op {
        Op::Register {
            id,
            endpoints,
            capabilities,
            epoch,
        } => id_ok(id) && object(endpoints) && object(capabilities) && *epoch <= MAX_SEQ,
        Op::Remove { id, at, epoch } => {
            id_ok(id) && (0..=MAX_TIME_SECS).contains(at) && *epoch <= MAX_SEQ
        }
        Op::Rekey { id, epoch } => id_ok(id) && (1..=MAX_SEQ).contains(epoch),
        Op::Revoke { jti, until } => {
            crate::proto::jwt::valid_jti(jti) && (0..=MAX_TIME_SECS).contains(until)
        }
        Op::Enqueue {
            to,
            seq,
            msg_id,
            from,
            sent_at,
            expires_at,
            ..
        } => {
            id_ok(to)
                && id_ok(from)
                && safe_msg_id(msg_id)
                && *seq <= MAX_SEQ
                && (0..=MAX_TIME_SECS * 1000).contains(sent_at)
                && expires_at.is_none_or(|e| (0..=MAX_TIME_SECS * 1000).contains(&e))
        }
        Op::Dequeue { to, seq } => id_ok(to) && *seq <= MAX_SEQ,
    }
}

impl Federation {
    /// An answer that promises durability waits for the turn's fsync when changes were
    /// made (contract §7: `201`, `200` and `204` only once the change is on disk): `None`
    /// then, and the answer comes with [`Action::Respond`] after the commit.
    pub fn durable_answer(
        &mut self,
        req: RequestId,
        (resp, record): (Resp, Record),
    ) -> Option<Resp> {
        // In a cluster, JetStream's acknowledgement is the promise (§10).
        let resp = self.cluster_answer(req, resp)?;
        if record.is_some() && resp.status < 300 {
            self.deferred.push(Deferred::Http { req, resp, record });
            None
        } else {
            Some(resp)
        }
    }

    /// True when changes are written to a state dir (answers must wait for the fsync).
    pub fn durable(&self) -> bool {
        self.batch.is_some()
    }

    /// True while a `queued` answer for this copy still waits for an fsync.
    pub fn queued_answer_pending(&self, slot: Slot, qseq: u64) -> bool {
        let waiting = self.committing.iter().flat_map(|c| c.deferred.iter());
        waiting.chain(self.deferred.iter()).any(
            |d| matches!(d, Deferred::Queued { slot: s, qseq: q, .. } if *s == slot && *q == qseq),
        )
    }

    /// Adds a change to this turn's batch; returns where its record sits, for a caller that
    /// defers an answer on it.
    pub fn persist(&mut self, op: Op) -> Record {
        if self.cluster.is_some() {
            // The cluster's registry gets the entry's whole state (one record a server).
            let whole = match &op {
                Op::Rekey { id, .. } => {
                    self.registry
                        .by_id(id)
                        .filter(|e| e.registered)
                        .map(|e| Op::Register {
                            id: e.server_id.clone(),
                            endpoints: raw(&e.endpoints),
                            capabilities: raw(&e.reg_capabilities),
                            epoch: e.key_epoch,
                        })
                }
                _ => None,
            };
            self.cluster_record(whole.as_ref().unwrap_or(&op));
        }
        self.persist_local(op)
    }

    /// Adds a change to this turn's batch only (not to the cluster's registry).
    pub fn persist_local(&mut self, op: Op) -> Record {
        self.batch.as_mut().and_then(|b| b.append(&op))
    }

    /// The `Enqueue` record of a queued copy.
    pub fn persist_enqueue(&mut self, to: &str, q: &Queued) -> Record {
        if !self.durable() {
            return None;
        }
        let expires_at = q.expires.map(|at| self.now.wall_of(at));
        let op = Op::Enqueue {
            to: to.to_string(),
            seq: q.seq,
            msg_id: q.msg_id.clone(),
            from: q.from.clone(),
            message: raw(&q.message),
            sent_at: q.sent_at_ms,
            expires_at,
            notify: q.notify_sender,
        };
        self.persist(op)
    }

    /// Starts a commit: the records made since the last one (possibly none, when only
    /// answers wait), to be written with one fsync and reported with
    /// [`Federation::committed`]. `None` when there is nothing to commit (memory only, no
    /// change and no answer waiting) or while the previous commit is still being written:
    /// one commit at a time keeps records in order on disk, and what is made meanwhile goes
    /// with the next (group commit across the turns a slow disk takes).
    pub fn begin_commit(&mut self) -> Option<Vec<u8>> {
        if self.committing.is_some() {
            return None;
        }
        let b = self.batch.as_ref()?;
        if b.is_empty() && self.deferred.is_empty() {
            return None;
        }
        let bytes = b.bytes().to_vec();
        self.committing = Some(Committing {
            len: bytes.len(),
            deferred: std::mem::take(&mut self.deferred),
            generation: self.commit_gen,
            slots: std::mem::take(&mut self.enqueued_slots),
        });
        self.commit_gen += 1;
        Some(bytes)
    }

    /// True while a commit is being written.
    pub fn commit_in_flight(&self) -> bool {
        self.committing.is_some()
    }

    /// The commit begun last is on disk (`Ok`), or could not be written (`Err`, the reason):
    /// what waited on it is released, or fails `storage_failed` and is taken back out of
    /// memory (its records leave the batch; the rest of its records are retried, ahead of
    /// the changes made since, by the next commit).
    pub fn committed(&mut self, result: Result<(), String>) {
        let Some(Committing {
            len,
            deferred,
            generation,
            slots,
        }) = self.committing.take()
        else {
            return;
        };
        match result {
            Ok(()) => {
                self.durable_gen = generation;
                if let Some(b) = self.batch.as_mut() {
                    b.drain_front(len);
                }
                for d in &mut self.deferred {
                    d.shift_record(len);
                }
                if self.degraded.take().is_some() {
                    log::info!("state dir writable again");
                }
                for d in deferred {
                    match d {
                        Deferred::Queued { to, body, .. } => self.reply(to, Ok(body)),
                        Deferred::Http { req, resp, .. } => self.act(Action::Respond {
                            req,
                            resp: Answer::Http(resp),
                        }),
                        Deferred::Notify { sender, params } => self.notify_sender(&sender, params),
                    }
                }
                // Copies that waited for their record go out now, after their `queued`.
                for slot in slots {
                    self.pump(slot);
                }
            }
            Err(e) => {
                // The records not undone are retried with the next commit: the copies they
                // queue are pumped after it.
                let mut retried = slots;
                retried.append(&mut self.enqueued_slots);
                self.enqueued_slots = retried;
                log::error!("state dir write failed: {e}; nothing of this commit is acknowledged");
                self.metrics.storage_failures_total += 1;
                self.degraded = Some(e);
                let undone: Vec<Range<usize>> =
                    deferred.iter().filter_map(Deferred::record).collect();
                // Every undone record lies before the changes made since: theirs move by
                // what is taken out.
                let removed: usize = undone
                    .iter()
                    .filter(|r| r.end <= len)
                    .map(|r| r.end - r.start)
                    .sum();
                for d in &mut self.deferred {
                    d.shift_record(removed);
                }
                if let Some(b) = self.batch.as_mut() {
                    b.strip(undone);
                }
                let mut retried = Vec::new();
                for d in deferred {
                    match d {
                        // Its removal record stays in the batch and is retried: so does it.
                        Deferred::Notify { .. } => retried.push(d),
                        Deferred::Queued { to, slot, qseq, .. } => {
                            self.unqueue(slot, qseq);
                            self.reply(to, Err(RpcError::StorageFailed));
                        }
                        Deferred::Http { req, .. } => {
                            let r = Resp::error(
                                503,
                                "storage_failed",
                                "the change could not be made durable",
                            );
                            self.act(Action::Respond {
                                req,
                                resp: Answer::Http(r),
                            });
                        }
                    }
                }
                retried.append(&mut self.deferred);
                self.deferred = retried;
            }
        }
    }

    /// The whole current state as ops (for a snapshot).
    pub fn state_ops(&self) -> Vec<Op> {
        let mut ops: Vec<Op> = self
            .registry
            .removals()
            .map(|(id, r)| Op::Remove {
                id: id.to_string(),
                at: r.at,
                epoch: r.epoch,
            })
            .collect();
        for e in self.registry.entries() {
            if e.registered {
                ops.push(Op::Register {
                    id: e.server_id.clone(),
                    endpoints: raw(&e.endpoints),
                    capabilities: raw(&e.reg_capabilities),
                    epoch: e.key_epoch,
                });
            } else if e.key_epoch > 1 {
                // A known server whose key was rotated: the epoch must survive too.
                ops.push(Op::Rekey {
                    id: e.server_id.clone(),
                    epoch: e.key_epoch,
                });
            }
        }
        for (jti, until) in self.revocations.iter() {
            ops.push(Op::Revoke {
                jti: jti.to_string(),
                until,
            });
        }
        let turn = self.now;
        for e in self.registry.entries() {
            for q in e.queue.iter() {
                ops.push(Op::Enqueue {
                    to: e.server_id.clone(),
                    seq: q.seq,
                    msg_id: q.msg_id.clone(),
                    from: q.from.clone(),
                    message: raw(&q.message),
                    sent_at: q.sent_at_ms,
                    expires_at: q.expires.map(|at| turn.wall_of(at)),
                    notify: q.notify_sender,
                });
            }
        }
        ops
    }

    /// Sets an entry's signing-key epoch (and key) when it is later than the one it has.
    pub fn set_epoch(&mut self, slot: Option<Slot>, epoch: u64) {
        let Some(id) = slot
            .and_then(|s| self.registry.get(s))
            .filter(|e| e.key_epoch < epoch)
            .map(|e| e.server_id.clone())
        else {
            return;
        };
        let key = self.signing_key_at(&id, epoch);
        if let Some(e) = slot.and_then(|s| self.registry.get_mut(s)) {
            e.key_epoch = epoch;
            e.signing_key = key;
        }
    }

    /// Rebuilds the registry, removals and queues from what was on disk.
    pub fn restore(&mut self, replay: Replay) {
        let now_ms = self.now.wall_ms;
        let (mut regs, mut removals, mut queued) = (0usize, 0usize, 0usize);
        let mut max_seq = 0u64;
        let mut insane = 0usize;
        for op in replay.ops {
            if !sane(&op) {
                insane += 1;
                continue;
            }
            match op {
                Op::Register {
                    id,
                    endpoints,
                    capabilities,
                    epoch,
                } => {
                    let slot = self.find_or_insert(&id).ok();
                    if epoch > 0 {
                        self.set_epoch(slot, epoch);
                    }
                    if let Some(e) = slot.and_then(|s| self.registry.get_mut(s)) {
                        e.registered = true;
                        e.endpoints = endpoints.get().to_string();
                        e.capabilities = capabilities.get().to_string();
                        e.reg_capabilities = e.capabilities.clone();
                        regs += 1;
                    }
                }
                Op::Remove { id, at, epoch } => {
                    match self.registry.find(&id) {
                        Some(slot) => {
                            self.unqueue_all(slot);
                            if let Some(e) = self.registry.remove(slot, at) {
                                self.registry
                                    .record_removal(&id, at, e.key_epoch.max(epoch));
                            }
                        }
                        None => self.registry.record_removal(&id, at, epoch),
                    }
                    removals += 1;
                }
                Op::Rekey { id, epoch } => {
                    let slot = self.find_or_insert(&id).ok();
                    self.set_epoch(slot, epoch);
                }
                Op::Revoke { jti, until } => {
                    let (now_secs, skew) = (now_ms / 1000, self.cfg.clock_skew_secs as i64);
                    if until.saturating_add(skew) > now_secs
                        && self
                            .revocations
                            .revoke(&jti, until, now_secs, skew)
                            .is_err()
                    {
                        // Lowered FEDMCP_MAX_REVOCATIONS: a revocation that does not fit
                        // would be forgotten silently; say so.
                        log::error!(
                            "state restore: more live revocations than FEDMCP_MAX_REVOCATIONS; one was not restored"
                        );
                    }
                }
                Op::Enqueue {
                    to,
                    seq,
                    msg_id,
                    from,
                    message,
                    sent_at,
                    expires_at,
                    notify,
                } => {
                    max_seq = max_seq.max(seq);
                    let slot = self.find_or_insert(&to).ok();
                    let Some(slot) = slot else { continue };
                    if self.find_queued(slot, seq).is_some() {
                        continue;
                    }
                    let q = Queued {
                        seq,
                        msg_id,
                        from,
                        message: message.get().to_string(),
                        sent_at_ms: sent_at,
                        expires: expires_at.map(|ms| self.now.instant_of(ms)),
                        ttl_timer: None,
                        inflight: None,
                        commit_gen: 0,
                        notify_sender: notify,
                    };
                    if self.enqueue_restored(slot, q) {
                        queued += 1;
                    }
                }
                Op::Dequeue { to, seq } => {
                    if let Some(slot) = self.registry.find(&to) {
                        self.unqueue(slot, seq);
                    }
                }
            }
        }
        self.bump_seq(max_seq);
        let slots: Vec<Slot> = self.registry.slots().collect();
        for s in slots {
            self.outbound_update(s);
        }
        let left: usize = self.registry.entries().map(|e| e.queue.len()).sum();
        log::info!(
            "state restored: {regs} registrations, {removals} removals, {queued} queued ({left} still queued), {} unreadable and {insane} invalid records skipped{}",
            replay.unreadable,
            replay
                .torn
                .map(|(at, why)| format!(", torn tail at byte {at} cut off ({why})"))
                .unwrap_or_default()
        );
    }
}
