//! A whole control session driven by a script of frames, raw bytes and timer ticks, through
//! the same code the reactor runs (`fedmcp::harness`): never panics, and what the proxy owes
//! the peer stays bounded (asserted inside the harness).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fedmcp::harness::play_session(data);
});
