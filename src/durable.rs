//! Keeping acknowledged promises (contract §7): what the proxy writes to the state log, the
//! once-a-turn commit that releases answers, and the restore at start.
//!
//! Owns the policy, not the format (`store::state` owns that): a registration (`201`/`200`),
//! a removal (`204`) and a `queued` answer are *deferred* until the turn's records are
//! fsynced ([`Proxy::commit`], called by the reactor once per loop turn, before flushing).
//! If the write or fsync fails, nothing deferred is acknowledged: the sender gets
//! `storage_failed`, the queued copy is taken back out of memory, `readyz` reports the
//! degradation until a commit succeeds again, and the failure is logged and counted.
//! Restore replays the log into the registry and queues before the listener serves.

use crate::api::Resp;
use crate::conn::ConnId;
use crate::jsonrpc::RpcError;
use crate::proxy::{Proxy, now_ms};
use crate::registry::{Entry, Queued, Slot};
use crate::router::ReplyTo;
use crate::session::instant_at;
use crate::store::state::{Op, Replay};
use serde_json::value::RawValue;
use std::time::Instant;

/// An answer that waits for the turn's fsync.
#[derive(Debug)]
pub enum Deferred {
    /// `{"msgId","status":"queued"}` for the copy `qseq` in `slot`'s queue.
    Queued {
        to: ReplyTo,
        body: String,
        slot: Slot,
        qseq: u64,
    },
    /// An HTTP answer (registration, removal) on a connection waiting for it.
    Http { conn: ConnId, resp: Resp },
}

fn raw(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_string())
        .unwrap_or_else(|_| RawValue::from_string("{}".to_string()).unwrap_or_default())
}

impl Proxy {
    /// True when changes are written to a state dir (answers must wait for the fsync).
    pub fn durable(&self) -> bool {
        self.store.is_some()
    }

    /// Adds a change to this turn's batch.
    pub fn persist(&mut self, op: Op) {
        if let Some(s) = self.store.as_mut() {
            s.append(&op);
        }
    }

    /// The `Enqueue` record of a queued copy.
    pub fn persist_enqueue(&mut self, to: &str, q: &Queued) {
        if !self.durable() {
            return;
        }
        let expires_at = q.expires.map(|at| {
            let left = at.saturating_duration_since(Instant::now()).as_millis() as i64;
            now_ms() + left
        });
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
        self.persist(op);
    }

    /// Writes the turn's changes with one fsync, then releases (or fails) what waited on it.
    pub fn commit(&mut self) {
        let Some(store) = self.store.as_mut() else {
            return;
        };
        if !store.has_batch() && self.deferred.is_empty() {
            return;
        }
        let result = store.commit();
        let deferred = std::mem::take(&mut self.deferred);
        match result {
            Ok(()) => {
                if self.degraded.take().is_some() {
                    log::info!("state dir writable again");
                }
                for d in deferred {
                    match d {
                        Deferred::Queued { to, body, .. } => self.reply(to, Ok(body)),
                        Deferred::Http { conn, resp } => self.http_finish(conn, resp),
                    }
                }
                self.maybe_compact();
            }
            Err(e) => {
                log::error!("state dir write failed: {e}; nothing of this turn is acknowledged");
                self.metrics.storage_failures_total += 1;
                self.degraded = Some(e.to_string());
                for d in deferred {
                    match d {
                        Deferred::Queued { to, slot, qseq, .. } => {
                            // The copy is not on disk: take it back, the sender is told.
                            self.unqueue(slot, qseq);
                            self.reply(to, Err(RpcError::StorageFailed));
                        }
                        Deferred::Http { conn, .. } => {
                            let r = Resp::error(
                                503,
                                "storage_failed",
                                "the change could not be made durable",
                            );
                            self.http_finish(conn, r);
                        }
                    }
                }
            }
        }
    }

    /// The whole current state as ops (for a snapshot).
    fn state_ops(&self) -> Vec<Op> {
        let mut ops: Vec<Op> = self
            .registry
            .removals()
            .map(|(id, at)| Op::Remove {
                id: id.to_string(),
                at,
            })
            .collect();
        for e in self.registry.entries() {
            if e.registered {
                ops.push(Op::Register {
                    id: e.server_id.clone(),
                    endpoints: raw(&e.endpoints),
                    capabilities: raw(&e.capabilities),
                });
            }
        }
        let now = Instant::now();
        let now_ms = now_ms();
        for e in self.registry.entries() {
            for q in &e.queue {
                ops.push(Op::Enqueue {
                    to: e.server_id.clone(),
                    seq: q.seq,
                    msg_id: q.msg_id.clone(),
                    from: q.from.clone(),
                    message: raw(&q.message),
                    sent_at: q.sent_at_ms,
                    expires_at: q
                        .expires
                        .map(|at| now_ms + at.saturating_duration_since(now).as_millis() as i64),
                    notify: q.notify_sender,
                });
            }
        }
        ops
    }

    fn maybe_compact(&mut self) {
        if !self.store.as_ref().is_some_and(|s| s.wants_compaction()) {
            return;
        }
        let ops = self.state_ops();
        if let Some(s) = self.store.as_mut() {
            let before = s.log_bytes();
            match s.compact(&ops) {
                Ok(()) => log::info!(
                    "state log compacted: {before} bytes into a snapshot of {} records",
                    ops.len()
                ),
                Err(e) => log::error!("state log compaction failed (the log is kept): {e}"),
            }
        }
    }

    /// Rebuilds the registry, removals and queues from what was on disk.
    pub fn restore(&mut self, replay: Replay) {
        let now = Instant::now();
        let now_ms = now_ms();
        let (mut regs, mut removals, mut queued) = (0usize, 0usize, 0usize);
        let mut max_seq = 0u64;
        for op in replay.ops {
            match op {
                Op::Register {
                    id,
                    endpoints,
                    capabilities,
                } => {
                    let slot = match self.registry.find(&id) {
                        Some(s) => Some(s),
                        None => {
                            let key = self.signing_key(&id);
                            self.registry.insert(Entry::new(id.clone(), key)).ok()
                        }
                    };
                    if let Some(e) = slot.and_then(|s| self.registry.get_mut(s)) {
                        e.registered = true;
                        e.endpoints = endpoints.get().to_string();
                        e.capabilities = capabilities.get().to_string();
                        regs += 1;
                    }
                }
                Op::Remove { id, at } => {
                    match self.registry.find(&id) {
                        Some(slot) => {
                            self.unqueue_all(slot);
                            self.registry.remove(slot, at);
                        }
                        None => self.registry.record_removal(&id, at),
                    }
                    removals += 1;
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
                    let slot = match self.registry.find(&to) {
                        Some(s) => Some(s),
                        None => {
                            let key = self.signing_key(&to);
                            self.registry.insert(Entry::new(to.clone(), key)).ok()
                        }
                    };
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
                        expires: expires_at.map(|ms| instant_at(now, now_ms, ms)),
                        ttl_timer: None,
                        inflight: None,
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
            "state restored: {regs} registrations, {removals} removals, {queued} queued ({left} still queued), {} unreadable records{}",
            replay.unreadable,
            replay
                .torn
                .map(|(at, why)| format!(", torn tail at byte {at} cut off ({why})"))
                .unwrap_or_default()
        );
    }
}
