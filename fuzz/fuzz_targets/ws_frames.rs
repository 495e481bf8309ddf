//! The WebSocket read step a control session's input goes through (`fedmcp::proto::ws::next_message`
//! over tungstenite, server role, the proxy's limits): never panics, never yields a message
//! over the limit, and the output it owes (pongs, close replies) stays within a frame's size
//! per input frame. Two more readers must read exactly what it reads and owe exactly what it
//! owes: one whose context is replaced by a fresh one whenever the frame tracker says the
//! stream is between messages (`release_if_idle`), and one that also reads the common frame
//! itself (`simple_text`) while the stream is between messages and its context released
//! (tungstenite reads ahead: a context in use may hold a whole frame not yet returned), as
//! the reactor does.
#![no_main]
use fedmcp::proto::ws::{
    Frames, Incoming, Role, WebSocketContext, WsIo, context, flush_owed, next_message,
    release_if_idle, simple_text,
};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

/// One reader: a context, its frame tracker, what it read and what it owes.
struct Reader {
    ctx: WebSocketContext,
    frames: Frames,
    events: Vec<String>,
    out: Vec<u8>,
    ended: bool,
    /// The context was used since it was last released: tungstenite may hold frames it
    /// read ahead, so the fast read must wait until it is released again.
    lent: bool,
}

impl Reader {
    fn new() -> Reader {
        Reader {
            ctx: context(Role::Server, MAX),
            frames: Frames::default(),
            events: Vec::new(),
            out: Vec::new(),
            ended: false,
            lent: false,
        }
    }

    /// Reads one chunk as the reactor does; `release` and `fast` pick the variant.
    fn read(&mut self, mut input: &[u8], release: bool, fast: bool) {
        let mut buf = Vec::new();
        while !self.ended {
            if fast
                && !self.lent
                && self.frames.idle()
                && let Some((text, used)) = simple_text(input, MAX, &mut buf)
            {
                self.events.push(format!("text {text}"));
                self.frames.feed(&input[..used]);
                input = &input[used..];
                continue;
            }
            if fast && input.is_empty() && !self.lent {
                break;
            }
            self.lent = true;
            let mut io = WsIo {
                input,
                out: &mut self.out,
            };
            let r = next_message(&mut self.ctx, &mut io);
            let rest = io.input;
            self.frames.feed(&input[..input.len() - rest.len()]);
            input = rest;
            match r {
                Incoming::Text(t) => {
                    assert!(t.len() <= MAX);
                    self.events.push(format!("text {}", t.as_str()));
                }
                Incoming::Control => self.events.push("control".into()),
                Incoming::More => break,
                Incoming::Closed => {
                    self.events.push("closed".into());
                    self.ended = true;
                }
                Incoming::Fail { code, .. } => {
                    self.events.push(format!("fail {code}"));
                    self.ended = true;
                }
            }
        }
        flush_owed(&mut self.ctx, &mut self.out);
        if release && !self.ended && release_if_idle(&mut self.ctx, &self.frames, Role::Server, MAX)
        {
            self.lent = false;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (mut plain, mut released, mut fast) = (Reader::new(), Reader::new(), Reader::new());
    // The input arrives in reads of varying sizes, as from a socket.
    let mut rest = data;
    let mut cut = 1usize;
    while !rest.is_empty() && !plain.ended {
        let n = cut.min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        cut = cut % 97 + 13;
        plain.read(chunk, false, false);
        released.read(chunk, true, false);
        fast.read(chunk, true, true);
        assert_eq!(
            plain.events, released.events,
            "a released context read differently"
        );
        assert_eq!(plain.events, fast.events, "the fast read read differently");
        assert_eq!(
            plain.out, released.out,
            "a released context owed different output"
        );
        assert_eq!(plain.out, fast.out, "the fast read owed different output");
        assert!(
            plain.out.len() <= data.len() + 16,
            "owed output outgrew the input"
        );
    }
});
