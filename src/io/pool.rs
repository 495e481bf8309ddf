//! Output buffers and WebSocket contexts lent to connections while they are busy.
//!
//! Owns a bounded free list of byte buffers, and one of fresh tungstenite contexts
//! ([`CtxPool`]: a session takes one when a frame comes or goes and gives it back, reset,
//! when its peer is between messages). Byte buffers: A connection takes one when it has output to
//! write and no buffer ([`out_buf`]), and the reactor gives it back once the connection's
//! output is written out ([`BufPool::put`]), so an idle connection holds no output buffer
//! (the idle-memory budget of a session) while a busy one does not call the allocator per
//! burst. Invariants: a pooled buffer is empty; the pool never holds more than
//! [`POOL_BUFFERS`] buffers, nor one larger than [`POOL_BUFFER_MAX`] bytes (a buffer that
//! grew for one large answer goes back to the allocator). It never touches a socket.

/// Buffers kept for reuse: enough for every session active in one turn of a busy proxy;
/// the rest go back to the allocator. At most 256 × 16 KiB = 4 MiB held while idle after
/// a burst, typically a few hundred KiB (buffers rarely grow past a few frames).
pub const POOL_BUFFERS: usize = 256;
/// Largest capacity, in bytes, a buffer may have to be kept: a larger one was grown for
/// one big answer and is freed.
pub const POOL_BUFFER_MAX: usize = 16 * 1024;
/// Capacity, in bytes, of a buffer made when the pool is empty: a few frames' worth.
pub const POOL_BUFFER_NEW: usize = 2048;

#[derive(Debug, Default)]
pub struct BufPool {
    free: Vec<Vec<u8>>,
}

impl BufPool {
    pub fn new() -> BufPool {
        BufPool {
            free: Vec::with_capacity(POOL_BUFFERS),
        }
    }

    /// An empty buffer with room for a few frames.
    pub fn take(&mut self) -> Vec<u8> {
        self.free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(POOL_BUFFER_NEW))
    }

    /// Takes back a connection's written-out buffer (its contents are dropped).
    pub fn put(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > POOL_BUFFER_MAX {
            return;
        }
        if self.free.len() < POOL_BUFFERS {
            buf.clear();
            self.free.push(buf);
        }
    }

    /// Buffers held for reuse now.
    pub fn len(&self) -> usize {
        self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }
}

/// Fresh server-role contexts kept for reuse (boxes, so an idle session holds 8 bytes).
pub const POOL_CONTEXTS: usize = 256;

/// Fresh WebSocket contexts for busy sessions, all with the proxy's message limit.
#[derive(Default)]
pub struct CtxPool {
    /// Boxes, not contexts: a session holds the box it is lent, so lending is a move of a
    /// pointer, not an allocation.
    #[allow(clippy::vec_box, reason = "the boxes themselves are what is lent")]
    free: Vec<Box<WebSocketContext>>,
    max_message_bytes: usize,
}

impl CtxPool {
    pub fn new(max_message_bytes: usize) -> CtxPool {
        CtxPool {
            free: Vec::with_capacity(POOL_CONTEXTS),
            max_message_bytes,
        }
    }

    /// A fresh context in `role`.
    pub fn take(&mut self, role: Role) -> Box<WebSocketContext> {
        match (role, self.free.pop()) {
            (Role::Server, Some(ctx)) => ctx,
            (_, spare) => {
                if let Some(s) = spare {
                    self.free.push(s);
                }
                Box::new(ws::context(role, self.max_message_bytes))
            }
        }
    }

    /// Takes a context back: reset to a fresh one (its buffers freed) and kept for reuse.
    pub fn put(&mut self, mut ctx: Box<WebSocketContext>, role: Role) {
        if role == Role::Server && self.free.len() < POOL_CONTEXTS {
            *ctx = ws::context(Role::Server, self.max_message_bytes);
            self.free.push(ctx);
        }
    }

    /// Contexts held for reuse now.
    pub fn len(&self) -> usize {
        self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }
}

/// The session's context, taken from the pool if it has none (an idle session's state).
pub fn ctx_of<'a>(
    pool: &mut CtxPool,
    ctx: &'a mut Option<Box<WebSocketContext>>,
    role: Role,
) -> &'a mut WebSocketContext {
    ctx.get_or_insert_with(|| pool.take(role))
}

/// `out`, given a pooled buffer first if it has none (an idle connection's state).
pub fn out_buf<'a>(pool: &mut BufPool, out: &'a mut Vec<u8>) -> &'a mut Vec<u8> {
    if out.capacity() == 0 {
        *out = pool.take();
    }
    out
}

use crate::proto::ws::{self, Role, WebSocketContext};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_are_lent_fresh_and_taken_back() {
        let mut pool = CtxPool::new(1024);
        let mut slot = None;
        let ctx = ctx_of(&mut pool, &mut slot, Role::Server);
        assert!(ctx.can_read() && ctx.can_write());
        let taken = slot.take().expect("lent");
        pool.put(taken, Role::Server);
        assert_eq!(pool.len(), 1);
        let again = ctx_of(&mut pool, &mut slot, Role::Server);
        assert!(again.can_read());
        assert!(pool.is_empty());
        // Client-role contexts are not pooled (the pool holds server ones only).
        pool.put(Box::new(ws::context(Role::Client, 1024)), Role::Client);
        assert!(pool.is_empty());
        let _client = pool.take(Role::Client);
        for _ in 0..POOL_CONTEXTS + 3 {
            pool.put(Box::new(ws::context(Role::Server, 1024)), Role::Server);
        }
        assert_eq!(pool.len(), POOL_CONTEXTS);
    }

    #[test]
    fn buffers_are_lent_and_taken_back_within_bounds() {
        let mut pool = BufPool::new();
        let mut out = Vec::new();
        out_buf(&mut pool, &mut out).extend_from_slice(b"frame");
        assert!(out.capacity() >= POOL_BUFFER_NEW);
        pool.put(std::mem::take(&mut out));
        assert_eq!(pool.len(), 1);
        // Reused, and empty.
        let again = out_buf(&mut pool, &mut out);
        assert!(again.is_empty() && again.capacity() >= POOL_BUFFER_NEW);
        assert!(pool.is_empty());
        // A buffer that has one is left alone.
        let kept = out.as_ptr();
        assert_eq!(out_buf(&mut pool, &mut out).as_ptr(), kept);
        // Too large, or the pool full: freed.
        pool.put(Vec::with_capacity(POOL_BUFFER_MAX + 1));
        assert!(pool.is_empty());
        for _ in 0..POOL_BUFFERS + 10 {
            pool.put(Vec::with_capacity(64));
        }
        assert_eq!(pool.len(), POOL_BUFFERS);
    }
}
