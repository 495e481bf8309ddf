//! Store-and-forward (contract §4 `queue: true`, §7): a recipient's queue and the bytes held
//! for it.
//!
//! Owns the queue of each registry entry: putting a copy in, in send order (its durable
//! record first, when there is a state dir), the bound on what is held for one recipient
//! (`FEDMCP_QUEUE_MAX_MESSAGES` queued, `FEDMCP_QUEUE_MAX_BYTES` for the queue plus the
//! copies of direct deliveries awaiting an answer: `Federation::hold`), delivering queued copies
//! to an online recipient as it has room ([`Federation::pump`]), TTL expiry, and taking copies
//! out (answered, expired, delivered as a notification, restored state, a removed server).
//! Routing a send and answering its sender are `router`'s; this module never touches a
//! socket or a file (its records go into the turn's batch).

use crate::federation::Federation;
use crate::federation::action::CoreTimer;
use crate::federation::action::Slot;
use crate::federation::pending::Record;
use crate::federation::pending::{Pending, PendingKind};
use crate::federation::registry::Queued;
use crate::federation::router::MAX_INFLIGHT_PER_RECIPIENT;
use crate::metrics::MsgResult;
use crate::proto::jsonrpc::{self, RpcError};
use std::time::Duration;

/// How much later an expired copy whose `queued` answer still waits for the turn's commit
/// is looked at again (the next turn, in practice).
const TTL_RECHECK: Duration = Duration::from_millis(1);

impl Federation {
    /// Puts a message in its recipient's queue, in send order, and arms its TTL timer (a
    /// TTL already past fires on the next turn and drops it as `expired`).
    /// Returns the enqueue record (`queued` is answered once it is on disk).
    /// With a state dir the copy is not delivered before its record is on disk (it carries
    /// the generation of the commit that writes it; the recipient is pumped after it).
    pub(crate) fn enqueue(&mut self, slot: Slot, mut q: Queued) -> Result<Record, RpcError> {
        let mut record = None;
        if self.durable()
            && let Some(e) = self.registry.get(slot)
        {
            let to = e.server_id.clone();
            if e.queue.len() < self.cfg.queue_max_messages
                && e.queue_bytes + e.inflight_bytes + q.bytes() <= self.cfg.queue_max_bytes
            {
                record = self.persist_enqueue(&to, &q);
            }
        }
        if record.is_some() {
            q.commit_gen = self.commit_gen;
            if self.enqueued_slots.last() != Some(&slot) {
                self.enqueued_slots.push(slot);
            }
        }
        self.insert_queued(slot, q, true).map(|()| record)
    }

    /// A queued copy read back from the state log (not written again).
    /// Restored copies were acknowledged: they are kept even over the queue bounds (which
    /// may have been lowered since); new sends to that queue are refused until it drains.
    pub fn enqueue_restored(&mut self, slot: Slot, q: Queued) -> bool {
        self.insert_queued(slot, q, false).is_ok()
    }

    pub(crate) fn insert_queued(
        &mut self,
        slot: Slot,
        mut q: Queued,
        bounded: bool,
    ) -> Result<(), RpcError> {
        let (max, max_bytes) = (self.cfg.queue_max_messages, self.cfg.queue_max_bytes);
        let Some(e) = self.registry.get(slot) else {
            return Err(RpcError::UnknownServer);
        };
        let held = e.queue_bytes + e.inflight_bytes + q.bytes();
        if bounded && (e.queue.len() >= max || held > max_bytes) {
            return Err(RpcError::QueueFull);
        }
        if let (Some(at), None) = (q.expires, q.ttl_timer) {
            q.ttl_timer = Some(self.timers.insert(at, CoreTimer::Ttl(slot, q.seq)));
        }
        let Some(e) = self.registry.get_mut(slot) else {
            return Err(RpcError::UnknownServer);
        };
        e.queue_bytes += q.bytes();
        // Kept in send order (a requeued message goes back to its place).
        e.queue.insert(q);
        Ok(())
    }

    /// Counts `bytes` of a delivery's copy as held for the recipient in `slot`, if they fit
    /// under `FEDMCP_QUEUE_MAX_BYTES` with its queue and its other held copies.
    pub(crate) fn hold(&mut self, slot: Slot, bytes: usize) -> bool {
        let max = self.cfg.queue_max_bytes;
        match self.registry.get_mut(slot) {
            Some(e) if e.queue_bytes + e.inflight_bytes + bytes <= max => {
                e.inflight_bytes += bytes;
                true
            }
            _ => false,
        }
    }

    /// A pending delivery is settled: the copy it kept (if any) is no longer held.
    pub(crate) fn unhold(&mut self, p: &Pending) {
        if let PendingKind::Direct {
            requeue: Some(q), ..
        } = &p.kind
            && let Some(e) = self.registry.get_mut(p.slot)
        {
            e.inflight_bytes = e.inflight_bytes.saturating_sub(q.bytes());
        }
    }

    /// Delivers queued messages to an online recipient while it has room, in order.
    pub fn pump(&mut self, slot: Slot) {
        loop {
            let Some(entry) = self.registry.get(slot) else {
                return;
            };
            let Some(conn) = entry.presence.online() else {
                return;
            };
            let Some(i) = entry.queue.first_waiting() else {
                return;
            };
            let Some(sess) = self.session(conn) else {
                return;
            };
            if sess.unsent > self.unsent_bound() || sess.inflight >= MAX_INFLIGHT_PER_RECIPIENT {
                return;
            }
            let q = &entry.queue[i];
            if q.commit_gen > self.durable_gen {
                // Its record is not on disk yet: delivered once it is (in order).
                return;
            }
            if q.expires.is_some_and(|at| at <= self.now.at) {
                let qseq = q.seq;
                self.on_ttl(slot, qseq);
                continue;
            }
            let params =
                self.deliver_params_for(slot, &q.msg_id, &q.from, &q.message, q.sent_at_ms);
            if q.notify_sender {
                let qseq = q.seq;
                let seq = self.next_seq();
                if let Some(e) = self.registry.get_mut(slot) {
                    e.queue.set_inflight(i, Some(seq));
                }
                self.deliver(conn, slot, seq, &params, PendingKind::FromQueue { qseq });
            } else {
                self.ws_send(conn, jsonrpc::request(None, "federation/deliver", &params));
                self.count_received(slot);
                self.metrics.message(MsgResult::Forwarded);
                self.remove_queued(slot, i);
            }
        }
    }

    /// Removes a queued copy for good (answered, expired, delivered as a notification): the
    /// removal is written to the state log.
    pub(crate) fn remove_queued(&mut self, slot: Slot, i: usize) -> Option<Queued> {
        let q = self.take_queued(slot, i)?;
        if self.durable()
            && let Some(e) = self.registry.get(slot)
        {
            let op = crate::store::state::Op::Dequeue {
                to: e.server_id.clone(),
                seq: q.seq,
            };
            self.persist(op);
        }
        Some(q)
    }

    /// Takes a copy out of memory only (a failed commit, or restoring).
    pub fn unqueue(&mut self, slot: Slot, qseq: u64) {
        if let Some(i) = self.find_queued(slot, qseq) {
            self.take_queued(slot, i);
        }
    }

    /// Empties a queue in memory only (its removal record covers it on disk).
    pub fn unqueue_all(&mut self, slot: Slot) {
        while self.registry.get(slot).is_some_and(|e| !e.queue.is_empty()) {
            self.take_queued(slot, 0);
        }
    }

    pub(crate) fn take_queued(&mut self, slot: Slot, i: usize) -> Option<Queued> {
        let e = self.registry.get_mut(slot)?;
        let q = e.queue.remove(i)?;
        e.queue_bytes = e.queue_bytes.saturating_sub(q.bytes());
        if let Some(t) = q.ttl_timer {
            self.timers.cancel(t);
        }
        Some(q)
    }

    pub fn find_queued(&self, slot: Slot, qseq: u64) -> Option<usize> {
        let e = self.registry.get(slot)?;
        e.queue.binary_search_by_key(&qseq, |q| q.seq).ok()
    }

    /// A queued message's TTL ran out: drop it unless it is already delivered.
    pub fn on_ttl(&mut self, slot: Slot, qseq: u64) {
        let Some(i) = self.find_queued(slot, qseq) else {
            return;
        };
        if self.queued_answer_pending(slot, qseq) {
            // `expired` must not overtake `queued`: look again after this turn's commit. The
            // turn's timers fire until none is due at the turn's time, so "again" must be
            // later than that time, or this would fire again at once, forever.
            let again = self.now.at + TTL_RECHECK;
            let t = self.timers.insert(again, CoreTimer::Ttl(slot, qseq));
            if let Some(e) = self.registry.get_mut(slot)
                && let Some(timer) = e.queue.ttl_timer_mut(i)
            {
                *timer = Some(t);
            }
            return;
        }
        let Some(e) = self.registry.get_mut(slot) else {
            return;
        };
        if let Some(timer) = e.queue.ttl_timer_mut(i) {
            *timer = None;
        }
        if e.queue[i].inflight.is_some() {
            return;
        }
        if let Some(q) = self.remove_queued(slot, i) {
            self.metrics.message(MsgResult::Expired);
            if q.notify_sender {
                self.notify_after_commit(
                    q.from,
                    format!("{{\"msgId\":\"{}\",\"status\":\"expired\"}}", q.msg_id),
                );
            }
        }
    }

    /// Drops a removed server's queue.
    pub fn drop_queue(&mut self, slot: Slot) {
        while let Some(e) = self.registry.get(slot) {
            if e.queue.is_empty() {
                break;
            }
            // The removal record covers the queue on disk.
            if self.take_queued(slot, 0).is_some() {
                self.metrics.message(MsgResult::Dropped);
            }
        }
    }
}
