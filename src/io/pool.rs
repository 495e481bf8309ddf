//! Output buffers lent to connections while they have something to write.
//!
//! Owns a bounded free list of byte buffers. A connection takes one when it has output to
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

/// `out`, given a pooled buffer first if it has none (an idle connection's state).
pub fn out_buf<'a>(pool: &mut BufPool, out: &'a mut Vec<u8>) -> &'a mut Vec<u8> {
    if out.capacity() == 0 {
        *out = pool.take();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
