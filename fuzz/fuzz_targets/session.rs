//! Control sessions driven by a script of text frames, a second member, timer ticks, reads,
//! reconnects and commits, against the federation core with no socket and no clock
//! (`fedmcp::harness`): deterministic, never panics, and what the proxy owes one peer or
//! holds for one recipient stays bounded (asserted inside the harness).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fedmcp::harness::play_session(data);
});
