//! Random ids: where the proxy's message-id prefix, session ids, `jti`s, upgrade keys and
//! backoff jitter come from, and their hex form.
//!
//! Owns [`Entropy`] (the OS, or a seeded generator for the simulation and the fuzz harness,
//! so a run of a seed is the same byte for byte) and [`random_bytes`]. Never used for
//! secrets: `store` takes those from the OS and refuses to run without it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Where the proxy's random ids (message-id prefix, session ids, `jti`s, upgrade keys, backoff
/// jitter) come from: the OS, or, in the simulation and the fuzz harness, a generator seeded
/// so that every run of a seed is the same byte for byte. Secrets never come from here.
#[derive(Debug)]
pub enum Entropy {
    Os,
    Seeded(std::cell::Cell<u64>),
}

impl Entropy {
    /// Fills `buf`.
    pub fn fill(&self, buf: &mut [u8]) {
        match self {
            Entropy::Os => buf.copy_from_slice(&random_vec(buf.len())),
            Entropy::Seeded(state) => {
                for b in buf.iter_mut() {
                    // splitmix64, one byte a step: plenty for ids in a test.
                    let s = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
                    state.set(s);
                    let mut z = s;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    *b = (z ^ (z >> 31)) as u8;
                }
            }
        }
    }

    pub fn bytes<const N: usize>(&self) -> [u8; N] {
        let mut b = [0u8; N];
        self.fill(&mut b);
        b
    }
}

fn random_vec(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    if getrandom::fill(&mut v).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, x) in v.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8 ^ i as u8;
        }
    }
    v
}

/// Random bytes from the OS; an unusable OS source falls back to time-derived bytes
/// (only ever used for ids, never for secrets: `store` refuses to run without it).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(&random_vec(N));
    b
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}
