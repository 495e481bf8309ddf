//! The chunked body decoder: never panics, never decodes more than its limit, and decoding
//! in one call equals decoding byte by byte.
#![no_main]
use fedmcp::proto::http::chunked::{ChunkedDecoder, Progress};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut one = ChunkedDecoder::new(4096);
    let mut out_one = Vec::new();
    let r1 = one.decode(data, &mut out_one, usize::MAX);
    assert!(out_one.len() <= 4096);

    let mut split = ChunkedDecoder::new(4096);
    let mut out_split = Vec::new();
    let mut pos = 0;
    let mut r2 = Ok((0, Progress::NeedMore));
    while pos < data.len() {
        r2 = split.decode(&data[pos..pos + 1], &mut out_split, usize::MAX);
        match r2 {
            Ok((used, Progress::NeedMore)) => pos += used.max(1),
            _ => break,
        }
    }
    if let (Ok((_, Progress::Done)), Ok((_, Progress::Done))) = (&r1, &r2) {
        assert_eq!(out_one, out_split);
    }
});
