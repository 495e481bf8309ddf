//! A dialled server's answer to our WebSocket upgrade (`outbound::check_answer`): never panics,
//! never claims more bytes than it was given, and, fed the way the loop feeds it (a prefix,
//! then the whole buffer as more bytes arrive), agrees with the one-call answer once the head
//! is complete in the prefix.
//!
//! The key is fixed (RFC 6455's sample nonce, 16 bytes in base64), so the whole input is the
//! answer and the checked-in seeds are plain HTTP: a valid `101` for this key passes.
#![no_main]
use fedmcp::proto::upgrade::{AnswerError, MAX_ANSWER_HEAD, check_answer};
use libfuzzer_sys::fuzz_target;

/// Our `Sec-WebSocket-Key`; the matching `Sec-WebSocket-Accept` is
/// `s3pPLMBiTxaQ9kYGzzhZRbK+xOo=`.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The invariants of one call on `buf`.
fn check(buf: &[u8]) -> Result<Option<usize>, AnswerError> {
    let r = check_answer(buf, KEY);
    match &r {
        Ok(Some(n)) => {
            let n = *n;
            assert!(n <= buf.len(), "head length {n} > buffer {}", buf.len());
            assert!(
                n >= 4 && &buf[n - 4..n] == b"\r\n\r\n",
                "head of {n} bytes does not end in CRLF CRLF"
            );
            // The bytes after the head (the first frames) play no part in the answer.
            assert_eq!(check_answer(&buf[..n], KEY), Ok(Some(n)));
        }
        // Incomplete is only said while the buffer is within the head limit.
        Ok(None) => assert!(buf.len() <= MAX_ANSWER_HEAD, "Ok(None) at {}", buf.len()),
        Err(_) => {}
    }
    r
}

/// A split point in `0..=len` that varies with the input without taking bytes from it.
fn split_point(data: &[u8]) -> usize {
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % (data.len() as u64 + 1)) as usize
}

fuzz_target!(|data: &[u8]| {
    let whole = check(data);
    for k in [split_point(data), data.len().saturating_sub(1)] {
        let first = check(&data[..k]);
        match first {
            // The loop waits for more bytes, then looks at the whole buffer again.
            Ok(None) => {}
            // The head ended inside the prefix: the loop stops here, and the whole buffer
            // (same head, more bytes after it) gets the same answer.
            Ok(Some(n)) => {
                assert!(n <= k);
                assert_eq!(whole, Ok(Some(n)), "prefix of {k} vs whole");
            }
            // Too large without a head end: the prefix is over the limit, so is the whole.
            Err(AnswerError::TooLarge) => assert!(data.len() > MAX_ANSWER_HEAD),
            Err(e) => assert_eq!(whole, Err(e), "prefix of {k} vs whole"),
        }
    }
});
