//! The append-only log's record framing: `[len: u32 LE][crc32c: u32 LE][payload]`.
//!
//! Owns encoding a record and reading records back one at a time from any `Read`, telling a
//! clean end from a torn or corrupt tail (short header, short payload, length over the
//! bound, checksum mismatch). Sans-io apart from the `Read` it is handed; it never panics on
//! any bytes, and never allocates more than [`MAX_RECORD`] for one record.
//!
//! CRC-32C (Castagnoli) is implemented here (a 1 KiB table): the checksum detects torn and
//! corrupted records, it is not a security measure.

use std::io::{self, Read};

/// The largest payload a record may have: a queued message of the largest allowed size
/// (`FEDMCP_MAX_MESSAGE_BYTES` ≤ 64 MiB) plus its envelope.
pub const MAX_RECORD: usize = 64 * 1024 * 1024 + 64 * 1024;
/// Bytes of a record header.
pub const HEADER: usize = 8;

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Appends one framed record to `out`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Why reading stopped before the end of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Torn {
    ShortHeader,
    ShortPayload,
    TooLong,
    BadChecksum,
}

impl std::fmt::Display for Torn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Torn::ShortHeader => "a record header is cut short",
            Torn::ShortPayload => "a record is cut short",
            Torn::TooLong => "a record length is over the limit",
            Torn::BadChecksum => "a record fails its checksum",
        })
    }
}

/// What one read step found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A whole, intact record (its payload is in the caller's buffer).
    Record,
    /// The clean end of the log.
    End,
    /// A torn or corrupt record starts here; nothing after it is trusted.
    Torn(Torn),
}

/// Logs what a torn or corrupt tail cost (never the payload).
pub fn warn_torn(what: &str, at: u64, why: Torn) {
    ::log::warn!(
        "state {what}: {why} at byte {at}; keeping the records before it and dropping the rest"
    );
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads the next record's payload into `payload`.
pub fn read_record(r: &mut impl Read, payload: &mut Vec<u8>) -> io::Result<Next> {
    let mut head = [0u8; HEADER];
    match read_full(r, &mut head)? {
        0 => return Ok(Next::End),
        HEADER => {}
        _ => return Ok(Next::Torn(Torn::ShortHeader)),
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_RECORD {
        return Ok(Next::Torn(Torn::TooLong));
    }
    payload.clear();
    // Memory follows the bytes actually there, not the length a damaged header claims.
    if r.take(len as u64).read_to_end(payload)? < len {
        return Ok(Next::Torn(Torn::ShortPayload));
    }
    if crc32c(payload) != crc {
        return Ok(Next::Torn(Torn::BadChecksum));
    }
    Ok(Next::Record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        // RFC 3720 B.4 and the common check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    fn log_of(records: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            encode(r, &mut out);
        }
        out
    }

    fn read_all(bytes: &[u8]) -> (Vec<Vec<u8>>, Next) {
        let mut r = bytes;
        let mut got = Vec::new();
        let mut p = Vec::new();
        loop {
            match read_record(&mut r, &mut p).unwrap() {
                Next::Record => got.push(p.clone()),
                other => return (got, other),
            }
        }
    }

    #[test]
    fn round_trip_and_clean_end() {
        let log = log_of(&[b"one", b"", b"three"]);
        let (got, end) = read_all(&log);
        assert_eq!(got, vec![b"one".to_vec(), vec![], b"three".to_vec()]);
        assert_eq!(end, Next::End);
    }

    #[test]
    fn every_truncation_keeps_the_intact_prefix() {
        let log = log_of(&[b"alpha", b"beta", b"gamma"]);
        for cut in 0..log.len() {
            let (got, end) = read_all(&log[..cut]);
            let whole = [13usize, 25, 38].iter().filter(|&&b| b <= cut).count();
            assert_eq!(got.len(), whole, "cut at {cut}");
            let boundary = [0usize, 13, 25, 38].contains(&cut);
            assert_eq!(end == Next::End, boundary, "cut at {cut}: {end:?}");
        }
    }

    #[test]
    fn a_flipped_byte_is_detected() {
        let log = log_of(&[b"alpha", b"beta"]);
        for i in 0..log.len() {
            let mut bad = log.clone();
            bad[i] ^= 0x40;
            let (got, end) = read_all(&bad);
            assert!(
                got.len() < 2
                    || end != Next::End
                    || got != vec![b"alpha".to_vec(), b"beta".to_vec()],
                "flip at {i}"
            );
            assert!(
                got.iter().all(|r| r == b"alpha" || r == b"beta"),
                "flip at {i} gave {got:?}"
            );
        }
    }

    #[test]
    fn an_absurd_length_is_refused_without_allocating() {
        let mut log = Vec::new();
        log.extend_from_slice(&u32::MAX.to_le_bytes());
        log.extend_from_slice(&[0; 4]);
        assert_eq!(read_all(&log).1, Next::Torn(Torn::TooLong));
    }
}
