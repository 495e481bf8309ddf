//! The chunked transfer-coding decoder (RFC 9112 §7.1) for request bodies, incremental and
//! sans-io: bytes in, decoded body bytes out.
//!
//! What it owns: the chunk framing state machine, the body-size limit the caller sets, and the
//! bounds on what it must hold or skip (a chunk-size line, the trailer section).
//!
//! Invariants:
//! - Memory is O(1): the decoder keeps a few integers; data goes straight into the caller's
//!   `out` and nothing else is buffered, so any input may be split at any byte.
//! - One call does at most `input.len()` steps and appends at most `max_out` body bytes.
//! - `decoded_len()` never exceeds `max_body`: a chunk that would pass it is refused from its
//!   size line, before any of its data is accepted.
//! - After `Done`, bytes past the final CRLF are never consumed: they are the next pipelined
//!   request. After an error the decoder stays failed and reports the same error again.
//!
//! Choices where RFC 9112 leaves room (recorded for `docs/`):
//! - Every line in the body must end in CRLF; a bare LF or bare CR is `BadTerminator`
//!   (stricter than the head, which accepts bare LF: body framing is where request smuggling
//!   hides).
//! - A chunk size is 1 to 16 hex digits (so it always fits a `u64`; leading zeros count).
//!   Whitespace (SP, HTAB) may follow it, then `;` extensions, which are skipped unread but
//!   must not hold control bytes other than HTAB. The whole size line, without CRLF, is at most
//!   [`MAX_CHUNK_LINE`] bytes.
//! - Trailer fields are skipped, not parsed: any bytes but CR/LF, each line CRLF-terminated,
//!   at most [`MAX_TRAILER_BYTES`] bytes before the final empty line.
//!
//! What it must never do: panic on any input, allocate on its own, or consume past `Done`.

use std::fmt;

/// Longest chunk-size line (size, whitespace and extensions, without CRLF), in bytes.
pub const MAX_CHUNK_LINE: usize = 1024;
/// Most bytes of trailer fields after the last chunk (not counting the final CRLF).
pub const MAX_TRAILER_BYTES: usize = 8 * 1024;
/// A `u64` holds 16 hex digits.
const MAX_SIZE_DIGITS: u32 = 16;

/// Why a chunked body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkError {
    /// The chunk size is missing, not hex, longer than 16 digits, or followed by junk.
    BadSize,
    /// The chunk-size line is longer than [`MAX_CHUNK_LINE`].
    LineTooLong,
    /// A line did not end in CRLF, or chunk data was not followed by CRLF.
    BadTerminator,
    /// The trailer section is longer than [`MAX_TRAILER_BYTES`].
    TrailerTooLarge,
    /// The body would exceed the caller's `max_body`.
    TooLarge,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkError::BadSize => "invalid chunk size",
            ChunkError::LineTooLong => "chunk-size line too long",
            ChunkError::BadTerminator => "chunk framing not terminated by CRLF",
            ChunkError::TrailerTooLarge => "chunked trailer section too large",
            ChunkError::TooLarge => "chunked body over the size limit",
        })
    }
}

impl std::error::Error for ChunkError {}

/// What a [`ChunkedDecoder::decode`] call reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The body is not finished: call again with more input (or the rest of this input).
    NeedMore,
    /// The last chunk and the trailer section are in; the body is complete.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Reading the hex digits of a chunk size.
    Size {
        value: u64,
        digits: u32,
    },
    /// After the digits: optional whitespace, then `;`, or CR.
    SizeWs {
        value: u64,
        line: usize,
    },
    /// Inside chunk extensions, skipping until CR.
    Ext {
        value: u64,
        line: usize,
    },
    /// Saw the CR of the size line.
    SizeLf {
        value: u64,
    },
    /// `left` (> 0) data bytes of this chunk still to come.
    Data {
        left: u64,
    },
    /// Chunk data done; expect CR.
    DataCr,
    /// Expect the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart {
        total: usize,
    },
    /// Inside a trailer field line.
    TrailerField {
        total: usize,
    },
    /// Saw the CR ending a trailer field line.
    TrailerFieldLf {
        total: usize,
    },
    /// Saw the CR of the final empty line.
    TrailerEndLf,
    Done,
    Failed(ChunkError),
}

/// Incremental decoder for one chunked body.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    decoded: u64,
    max_body: u64,
}

impl ChunkedDecoder {
    /// A decoder that refuses (`TooLarge`) a body whose decoded length would exceed `max_body`.
    pub fn new(max_body: u64) -> Self {
        ChunkedDecoder {
            state: State::Size {
                value: 0,
                digits: 0,
            },
            decoded: 0,
            max_body,
        }
    }

    /// Consume bytes from `input` and append the decoded body bytes to `out`.
    ///
    /// Returns the number of input bytes consumed and whether the body is complete.
    /// - `Done`: the body ended at `input[consumed - 1]`; the rest of `input` belongs to the
    ///   next request. Later calls consume nothing and return `Done` again.
    /// - `NeedMore` with `consumed == input.len()`: everything was used, send more.
    /// - `NeedMore` with `consumed < input.len()`: `out` grew by exactly `max_out` bytes in
    ///   this call (the caller's budget); call again with `&input[consumed..]`.
    ///
    /// Work: at most `input.len()` bytes examined, at most `max_out` bytes appended.
    pub fn decode(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max_out: usize,
    ) -> Result<(usize, Progress), ChunkError> {
        let mut at = 0usize;
        let mut produced = 0usize;
        loop {
            match self.state {
                State::Done => return Ok((at, Progress::Done)),
                State::Failed(ref error) => return Err(error.clone()),
                _ => {}
            }
            if at >= input.len() {
                return Ok((at, Progress::NeedMore));
            }
            if let State::Data { left } = self.state {
                let budget = max_out.saturating_sub(produced);
                if budget == 0 {
                    return Ok((at, Progress::NeedMore));
                }
                let available = input.len() - at;
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(available)
                    .min(budget);
                out.extend_from_slice(&input[at..at + take]);
                at += take;
                produced += take;
                self.decoded += take as u64;
                let left = left - take as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data { left }
                };
            } else {
                let byte = input[at];
                at += 1;
                match self.step(byte) {
                    Ok(next) => self.state = next,
                    Err(error) => {
                        self.state = State::Failed(error.clone());
                        return Err(error);
                    }
                }
            }
        }
    }

    /// Body bytes decoded so far.
    pub fn decoded_len(&self) -> u64 {
        self.decoded
    }

    /// The state after one framing byte (any state but `Data`, `Done`, `Failed`).
    fn step(&self, b: u8) -> Result<State, ChunkError> {
        let next = match self.state {
            State::Size { value, digits } => match hex_value(b) {
                Some(h) if digits < MAX_SIZE_DIGITS => State::Size {
                    value: value << 4 | u64::from(h),
                    digits: digits + 1,
                },
                Some(_) => return Err(ChunkError::BadSize),
                None if digits == 0 => return Err(ChunkError::BadSize),
                None => {
                    let line = digits as usize;
                    match b {
                        b'\r' => State::SizeLf { value },
                        b' ' | b'\t' => State::SizeWs {
                            value,
                            line: line + 1,
                        },
                        b';' => State::Ext {
                            value,
                            line: line + 1,
                        },
                        b'\n' => return Err(ChunkError::BadTerminator),
                        _ => return Err(ChunkError::BadSize),
                    }
                }
            },
            State::SizeWs { value, line } => match b {
                b'\r' => State::SizeLf { value },
                b' ' | b'\t' => State::SizeWs {
                    value,
                    line: line + 1,
                },
                b';' => State::Ext {
                    value,
                    line: line + 1,
                },
                b'\n' => return Err(ChunkError::BadTerminator),
                _ => return Err(ChunkError::BadSize),
            },
            State::Ext { value, line } => match b {
                b'\r' => State::SizeLf { value },
                b'\n' => return Err(ChunkError::BadTerminator),
                b'\t' | 0x20..=0x7e | 0x80..=0xff => State::Ext {
                    value,
                    line: line + 1,
                },
                _ => return Err(ChunkError::BadSize),
            },
            State::SizeLf { value } => match b {
                b'\n' if value == 0 => State::TrailerStart { total: 0 },
                b'\n' => {
                    let total = self.decoded.checked_add(value);
                    if total.is_none_or(|t| t > self.max_body) {
                        return Err(ChunkError::TooLarge);
                    }
                    State::Data { left: value }
                }
                _ => return Err(ChunkError::BadTerminator),
            },
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(ChunkError::BadTerminator),
            },
            State::DataLf => match b {
                b'\n' => State::Size {
                    value: 0,
                    digits: 0,
                },
                _ => return Err(ChunkError::BadTerminator),
            },
            State::TrailerStart { total } => match b {
                b'\r' => State::TrailerEndLf,
                b'\n' => return Err(ChunkError::BadTerminator),
                _ => State::TrailerField { total: total + 1 },
            },
            State::TrailerField { total } => match b {
                b'\r' => State::TrailerFieldLf { total: total + 1 },
                b'\n' => return Err(ChunkError::BadTerminator),
                _ => State::TrailerField { total: total + 1 },
            },
            State::TrailerFieldLf { total } => match b {
                b'\n' => State::TrailerStart { total: total + 1 },
                _ => return Err(ChunkError::BadTerminator),
            },
            State::TrailerEndLf => match b {
                b'\n' => State::Done,
                _ => return Err(ChunkError::BadTerminator),
            },
            // Not reached: `decode` handles these before stepping. Staying put is harmless.
            State::Data { .. } | State::Done | State::Failed(_) => self.state.clone(),
        };
        match next {
            State::SizeWs { line, .. } | State::Ext { line, .. } if line > MAX_CHUNK_LINE => {
                Err(ChunkError::LineTooLong)
            }
            State::TrailerField { total }
            | State::TrailerFieldLf { total }
            | State::TrailerStart { total }
                if total > MAX_TRAILER_BYTES =>
            {
                Err(ChunkError::TrailerTooLarge)
            }
            next => Ok(next),
        }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Outcome = (Result<Progress, ChunkError>, Vec<u8>, usize);

    /// Decode `input` in one call with an unlimited budget. On an error the partial output is
    /// dropped (callers discard it too), so outcomes compare by the error alone.
    fn whole(input: &[u8], max_body: u64) -> Outcome {
        let mut decoder = ChunkedDecoder::new(max_body);
        let mut out = Vec::new();
        match decoder.decode(input, &mut out, usize::MAX) {
            Ok((consumed, progress)) => {
                assert_eq!(decoder.decoded_len(), out.len() as u64);
                (Ok(progress), out, consumed)
            }
            Err(e) => (Err(e), Vec::new(), 0),
        }
    }

    /// Decode `input` fed as `pieces`, each with budget `max_out`, as a caller would: re-offer
    /// unconsumed bytes, stop at Done or an error.
    fn fed(input: &[u8], cuts: &[usize], max_body: u64, max_out: usize) -> Outcome {
        let mut decoder = ChunkedDecoder::new(max_body);
        let mut out = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut offered = 0usize;
        let mut used = 0usize;
        let mut bounds: Vec<usize> = cuts.to_vec();
        bounds.push(input.len());
        for &end in &bounds {
            pending.extend_from_slice(&input[offered..end]);
            offered = end;
            loop {
                let before = out.len();
                match decoder.decode(&pending, &mut out, max_out) {
                    Err(e) => return (Err(e), Vec::new(), 0),
                    Ok((n, progress)) => {
                        assert!(n <= pending.len());
                        assert!(out.len() - before <= max_out);
                        if progress == Progress::NeedMore && n < pending.len() {
                            assert_eq!(out.len() - before, max_out, "early stop only at budget");
                        }
                        pending.drain(..n);
                        used += n;
                        if progress == Progress::Done {
                            return (Ok(Progress::Done), out, used);
                        }
                        if pending.is_empty() || n == 0 {
                            break;
                        }
                    }
                }
            }
        }
        (Ok(Progress::NeedMore), out, used)
    }

    /// Whole, every two-piece split, byte by byte, and tiny budgets all agree.
    fn decode_checked(input: &[u8], max_body: u64) -> Outcome {
        let expected = whole(input, max_body);
        for k in 0..=input.len() {
            assert_eq!(
                fed(input, &[k], max_body, usize::MAX),
                expected,
                "split at {k}"
            );
        }
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            fed(input, &every, max_body, usize::MAX),
            expected,
            "byte by byte"
        );
        for budget in [1, 2, 3, 7] {
            assert_eq!(
                fed(input, &[], max_body, budget),
                expected,
                "budget {budget}"
            );
        }
        expected
    }

    fn ok(body: &[u8], consumed: usize) -> Outcome {
        (Ok(Progress::Done), body.to_vec(), consumed)
    }

    fn err(e: ChunkError) -> Outcome {
        (Err(e), Vec::new(), 0)
    }

    #[test]
    fn good_bodies() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"0\r\n\r\n", b""),
            (b"000\r\n\r\n", b""),
            (b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n", b"abcdefg"),
            (
                b"a\r\n0123456789\r\nA\r\nABCDEFGHIJ\r\n0\r\n\r\n",
                b"0123456789ABCDEFGHIJ",
            ),
            (
                b"000000000000000f\r\n0123456789abcde\r\n0\r\n\r\n",
                b"0123456789abcde",
            ),
            (b"1\r\n\r\r\n1\r\n\n\r\n0\r\n\r\n", b"\r\n"),
            // Extensions and whitespace before them.
            (b"5;name=value\r\nhello\r\n0;last\r\n\r\n", b"hello"),
            (b"5 ;a=\"q;\\\"x\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5\t \r\nhello\r\n0 \r\n\r\n", b"hello"),
            (b"5;\xc3\xa9\r\nhello\r\n0\r\n\r\n", b"hello"),
            // Trailers are skipped.
            (
                b"5\r\nhello\r\n0\r\nX-A: 1\r\nX-B: two words\r\n\r\n",
                b"hello",
            ),
            (b"0\r\nChecksum: abc\r\n\r\n", b""),
        ];
        for (input, body) in cases {
            assert_eq!(
                decode_checked(input, 1 << 20),
                ok(body, input.len()),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn done_leaves_the_next_request() {
        let body = b"5\r\nhello\r\n0\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(decode_checked(&input, 100), ok(b"hello", body.len()));

        let mut decoder = ChunkedDecoder::new(100);
        let mut out = Vec::new();
        assert_eq!(
            decoder.decode(&input, &mut out, 1000),
            Ok((body.len(), Progress::Done))
        );
        assert_eq!(
            decoder.decode(&input[body.len()..], &mut out, 1000),
            Ok((0, Progress::Done))
        );
        assert_eq!((out.as_slice(), decoder.decoded_len()), (&b"hello"[..], 5));
    }

    #[test]
    fn max_out_stops_early() {
        let input = b"a\r\n0123456789\r\n0\r\n\r\n";
        let mut decoder = ChunkedDecoder::new(100);
        let mut out = Vec::new();
        assert_eq!(
            decoder.decode(input, &mut out, 3),
            Ok((6, Progress::NeedMore))
        );
        assert_eq!(out, b"012");
        assert_eq!(
            decoder.decode(&input[6..], &mut out, 3),
            Ok((3, Progress::NeedMore))
        );
        assert_eq!(
            decoder.decode(&input[9..], &mut out, 100),
            Ok((input.len() - 9, Progress::Done))
        );
        assert_eq!(out, b"0123456789");
        assert_eq!(decoder.decoded_len(), 10);

        // A zero budget consumes framing but no data.
        let mut decoder = ChunkedDecoder::new(100);
        let mut out = Vec::new();
        assert_eq!(
            decoder.decode(input, &mut out, 0),
            Ok((3, Progress::NeedMore))
        );
        assert!(out.is_empty());
    }

    #[test]
    fn bad_bodies() {
        use ChunkError::*;
        let long_ext = [
            &b"5;"[..],
            &[b'a'; MAX_CHUNK_LINE],
            b"\r\nhello\r\n0\r\n\r\n",
        ]
        .concat();
        let max_ext = [
            &b"5;"[..],
            &[b'a'; MAX_CHUNK_LINE - 2],
            b"\r\nhello\r\n0\r\n\r\n",
        ]
        .concat();
        let big_trailer = [&b"0\r\nX: "[..], &[b'a'; MAX_TRAILER_BYTES], b"\r\n\r\n"].concat();
        let max_trailer = [
            &b"0\r\nX: "[..],
            &[b'a'; MAX_TRAILER_BYTES - 5],
            b"\r\n\r\n",
        ]
        .concat();
        let many_trailers = [&b"0\r\n"[..], &b"X: y\r\n".repeat(1400), b"\r\n"].concat();
        let cases: Vec<(&[u8], Outcome)> = vec![
            (b"\r\n", err(BadSize)),
            (b";x\r\n", err(BadSize)),
            (b"g\r\n", err(BadSize)),
            (b"-1\r\n", err(BadSize)),
            (b"+1\r\n", err(BadSize)),
            (b"0x5\r\n", err(BadSize)),
            (b"5 5\r\n", err(BadSize)),
            (b" 5\r\n", err(BadSize)),
            (b"00000000000000005\r\n", err(BadSize)),
            (b"10000000000000000\r\n", err(BadSize)),
            (b"5;\x01\r\n", err(BadSize)),
            (b"5;\0\r\n", err(BadSize)),
            (&long_ext, err(LineTooLong)),
            (&max_ext, ok(b"hello", max_ext.len())),
            (b"5\nhello\r\n0\r\n\r\n", err(BadTerminator)),
            (b"5;x\nhello", err(BadTerminator)),
            (b"5 \n", err(BadTerminator)),
            (b"5\rX", err(BadTerminator)),
            (b"5\r\nhelloX\r\n", err(BadTerminator)),
            (b"5\r\nhello\n0\r\n\r\n", err(BadTerminator)),
            (b"5\r\nhello\rX", err(BadTerminator)),
            (b"0\r\n\n", err(BadTerminator)),
            (b"0\r\nX: y\n\r\n", err(BadTerminator)),
            (b"0\r\nX: y\rz\r\n\r\n", err(BadTerminator)),
            (b"0\r\n\rX", err(BadTerminator)),
            (&big_trailer, err(TrailerTooLarge)),
            (&many_trailers, err(TrailerTooLarge)),
            (&max_trailer, ok(b"", max_trailer.len())),
        ];
        for (input, expected) in cases {
            assert_eq!(
                decode_checked(input, 1 << 20),
                expected,
                "{:?}",
                String::from_utf8_lossy(&input[..input.len().min(40)])
            );
        }
    }

    #[test]
    fn body_limit() {
        use ChunkError::TooLarge;
        assert_eq!(decode_checked(b"5\r\nhello\r\n0\r\n\r\n", 4), err(TooLarge));
        assert_eq!(
            decode_checked(b"5\r\nhello\r\n0\r\n\r\n", 5),
            ok(b"hello", 15)
        );
        // Refused from the size line, before the data arrives.
        assert_eq!(decode_checked(b"3\r\nabc\r\n4\r\n", 6), err(TooLarge));
        assert_eq!(
            decode_checked(b"ffffffffffffffff\r\n", u64::MAX - 1),
            err(TooLarge)
        );
        // The largest size fits when allowed; no overflow on a following chunk either.
        let mut decoder = ChunkedDecoder::new(u64::MAX);
        let mut out = Vec::new();
        assert_eq!(
            decoder.decode(b"ffffffffffffffff\r\nab", &mut out, 10),
            Ok((20, Progress::NeedMore))
        );
        assert_eq!(decoder.decoded_len(), 2);
    }

    #[test]
    fn errors_are_sticky() {
        let mut decoder = ChunkedDecoder::new(100);
        let mut out = Vec::new();
        assert_eq!(
            decoder.decode(b"zz", &mut out, 10),
            Err(ChunkError::BadSize)
        );
        assert_eq!(
            decoder.decode(b"5\r\nhello\r\n0\r\n\r\n", &mut out, 10),
            Err(ChunkError::BadSize)
        );
        for e in [
            ChunkError::BadSize,
            ChunkError::LineTooLong,
            ChunkError::BadTerminator,
            ChunkError::TrailerTooLarge,
            ChunkError::TooLarge,
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    struct XorShift(u64);

    impl XorShift {
        fn step(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.step() % n.max(1) as u64) as usize
        }
    }

    const FRAGMENTS: &[&[u8]] = &[
        b"0",
        b"1",
        b"5",
        b"a",
        b"F",
        b"ffffffffffffffff",
        b"\r\n",
        b"\r\n",
        b"\r",
        b"\n",
        b";",
        b"x=y",
        b" ",
        b"hello",
        b"abc",
        b"X: y",
        b"\0",
        b"\xff",
        b"0\r\n\r\n",
    ];

    /// 10,000 random bodies, half raw bytes and half stitched from chunk fragments: nothing
    /// panics, and feeding in random pieces with random budgets gives the one-call answer.
    #[test]
    fn random_inputs_never_panic() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let mut finished = 0;
        for i in 0..10_000 {
            let mut input = Vec::new();
            if i % 2 == 0 {
                let len = rng.below(200);
                input.extend((0..len).map(|_| rng.step() as u8));
            } else {
                for _ in 0..rng.below(40) {
                    input.extend_from_slice(FRAGMENTS[rng.below(FRAGMENTS.len())]);
                }
            }
            let max_body = [0, 5, 64, u64::MAX][rng.below(4)];
            let expected = whole(&input, max_body);
            if expected.0 == Ok(Progress::Done) {
                finished += 1;
            }
            let mut cuts: Vec<usize> = (0..rng.below(5))
                .map(|_| rng.below(input.len() + 1))
                .collect();
            cuts.sort_unstable();
            let budget = 1 + rng.below(16);
            assert_eq!(fed(&input, &cuts, max_body, budget), expected, "input {i}");
        }
        assert!(
            finished > 100,
            "the generator should reach complete bodies ({finished})"
        );
    }
}
