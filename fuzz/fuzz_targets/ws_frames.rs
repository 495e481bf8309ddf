//! The WebSocket read step a control session's input goes through (`fedmcp::proto::ws::next_message`
//! over tungstenite, server role, the proxy's limits): never panics, never yields a message
//! over the limit, and the output it owes (pongs, close replies) stays within a frame's size
//! per input frame. A second context that is replaced by a fresh one whenever the frame
//! tracker says the stream is between messages (`release_if_idle`, what the reactor does
//! to give idle sessions' read buffers back) reads exactly the same messages and owes
//! exactly the same output.
#![no_main]
use fedmcp::proto::ws::{
    Frames, Incoming, Role, WebSocketContext, WsIo, context, flush_owed, next_message,
    release_if_idle,
};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

/// What one side read: each step's outcome, as text.
fn step(ctx: &mut WebSocketContext, frames: &mut Frames, io: &mut WsIo) -> (String, bool) {
    let before = io.input;
    let r = next_message(ctx, io);
    frames.feed(&before[..before.len() - io.input.len()]);
    match r {
        Incoming::Text(t) => {
            assert!(t.len() <= MAX);
            (format!("text {}", t.as_str()), true)
        }
        Incoming::Control => ("control".into(), true),
        Incoming::More => ("more".into(), false),
        Incoming::Closed => ("closed".into(), false),
        Incoming::Fail { code, .. } => (format!("fail {code}"), false),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut plain = context(Role::Server, MAX);
    let mut fresh = context(Role::Server, MAX);
    let (mut plain_frames, mut fresh_frames) = (Frames::default(), Frames::default());
    let (mut out, mut fresh_out) = (Vec::new(), Vec::new());
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
        let mut fresh_io = WsIo {
            input: chunk,
            out: &mut fresh_out,
        };
        loop {
            let (a, go_on) = step(&mut plain, &mut plain_frames, &mut io);
            let (b, _) = step(&mut fresh, &mut fresh_frames, &mut fresh_io);
            assert_eq!(a, b, "a released context read differently");
            if a == "closed" || a.starts_with("fail") {
                return;
            }
            if !go_on {
                break;
            }
        }
        flush_owed(&mut plain, &mut out);
        flush_owed(&mut fresh, &mut fresh_out);
        release_if_idle(&mut fresh, &fresh_frames, Role::Server, MAX);
        assert_eq!(out, fresh_out, "a released context owed different output");
        assert!(
            out.len() <= data.len() + 16,
            "owed output outgrew the input"
        );
    }
});
