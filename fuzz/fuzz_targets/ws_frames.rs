//! The WebSocket read step a control session's input goes through (`fedmcp::proto::ws::next_message`
//! over tungstenite, server role, the proxy's limits): never panics, never yields a message
//! over the limit, and the output it owes (pongs, close replies) stays within a frame's size
//! per input frame.
#![no_main]
use fedmcp::proto::ws::{Incoming, WsIo, context, flush_owed, next_message};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut ctx = context(fedmcp::proto::ws::Role::Server, MAX);
    let mut out = Vec::new();
    // The input arrives in reads of varying sizes, as from a socket.
    let mut rest = data;
    let mut cut = 1usize;
    while !rest.is_empty() {
        let n = cut.min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        cut = cut % 97 + 13;
        let mut io = WsIo {
            input: chunk,
            out: &mut out,
        };
        loop {
            match next_message(&mut ctx, &mut io) {
                Incoming::Text(t) => assert!(t.len() <= MAX),
                Incoming::Control => {}
                Incoming::More => break,
                Incoming::Closed | Incoming::Fail { .. } => return,
            }
        }
        flush_owed(&mut ctx, &mut out);
        assert!(
            out.len() <= data.len() + 16,
            "owed output outgrew the input"
        );
    }
});
