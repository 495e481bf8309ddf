//! WebSocket framing for control sessions, over tungstenite's `WebSocketContext`.
//!
//! Owns the adapter between tungstenite and our buffers: tungstenite reads from a slice of
//! bytes the loop already took off the socket ([`WsIo::input`]) and writes whole frames into
//! the connection's output buffer ([`WsIo::out`]). It never touches a socket, so a session can
//! be driven by a script of bytes in tests and fuzzing. When the slice is exhausted the adapter
//! answers `WouldBlock`, which is how tungstenite says "no complete message yet".
//!
//! [`next_message`] is the one read step the reactor repeats on a session's input: it maps
//! every frame and every framing error to what the session does (a text message for the
//! core, or the contract's close code).
//!
//! All of tungstenite's input sizes come from our limits ([`config`]). Its output buffer never
//! holds more than the frame being written (write buffer size 0, and the adapter accepts every
//! write), so its cap is left open: the output bound is ours, on `Conn::out`, enforced before
//! a frame is written (the slow-consumer check) and by not reading from a peer that does not
//! read. A frame is never refused half-way, so no answer is silently lost.

use std::io::{self, Read, Write};
pub use tungstenite::protocol::Role;
use tungstenite::protocol::WebSocketConfig;
pub use tungstenite::protocol::WebSocketContext;
use tungstenite::{Error as WsError, Message};

/// Initial read-buffer capacity per session: none. tungstenite reserves what each frame
/// needs as it arrives, and an idle session's context is replaced by a fresh one (see
/// [`Frames`]), so a session holds read memory only while a message is on its way.
pub const WS_READ_BUFFER: usize = 0;

/// tungstenite configuration from our limits.
pub fn config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
        .accept_unmasked_frames(false)
}

/// tungstenite's view of the connection: input from a slice, output into our buffer.
pub struct WsIo<'i, 'o> {
    pub input: &'i [u8],
    pub out: &'o mut Vec<u8>,
}

impl Read for WsIo<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for WsIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A session's WebSocket state in `role` (server for accepted sessions, client for dialled
/// ones), with the limits of [`config`].
pub fn context(role: Role, max_message_bytes: usize) -> WebSocketContext {
    WebSocketContext::new(role, Some(config(max_message_bytes)))
}

/// Moves the frames tungstenite owes (pongs, a close reply) into `out`.
pub fn flush_owed(ctx: &mut WebSocketContext, out: &mut Vec<u8>) {
    let _ = ctx.flush(&mut WsIo { input: &[], out });
}

/// Gives back an idle session's read memory: when the peer's stream is between messages
/// ([`Frames::idle`]) and the session is open both ways with nothing owed (call after
/// [`flush_owed`]), the context is replaced by a fresh one, which holds no buffer.
/// Returns whether it was replaced.
pub fn release_if_idle(
    ctx: &mut WebSocketContext,
    frames: &Frames,
    role: Role,
    max_message_bytes: usize,
) -> bool {
    if !at_rest(ctx, frames) {
        return false;
    }
    *ctx = context(role, max_message_bytes);
    true
}

/// The context holds nothing a fresh one would not: the peer's stream is between messages,
/// the session is open both ways and nothing is owed (call after [`flush_owed`]).
pub fn at_rest(ctx: &WebSocketContext, frames: &Frames) -> bool {
    frames.idle() && ctx.can_read() && ctx.can_write()
}

/// What one step of reading a session's input gave.
#[derive(Debug)]
pub enum Incoming {
    /// A complete text message.
    Text(tungstenite::Utf8Bytes),
    /// A ping or pong (answered by tungstenite into the output on the next flush).
    Control,
    /// The peer's close frame (its reply is owed in the output).
    Closed,
    /// No complete message in the input yet.
    More,
    /// The session must close with this code (contract §4): binary 1003, oversize 1009,
    /// bad UTF-8 1007, a protocol violation 1002, anything else 1011.
    Fail { code: u16, why: &'static str },
}

/// Reads the next message out of `io.input` (the step the reactor repeats until `More`).
pub fn next_message(ctx: &mut WebSocketContext, io: &mut WsIo) -> Incoming {
    match ctx.read(io) {
        Ok(Message::Text(t)) => Incoming::Text(t),
        Ok(Message::Binary(_)) => Incoming::Fail {
            code: 1003,
            why: "binary frames are not accepted",
        },
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Incoming::Control,
        Ok(Message::Close(_)) => Incoming::Closed,
        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Incoming::More,
        Err(WsError::Capacity(_)) => Incoming::Fail {
            code: 1009,
            why: "message too big",
        },
        Err(WsError::Utf8(_)) => Incoming::Fail {
            code: 1007,
            why: "invalid UTF-8 in a text frame",
        },
        Err(WsError::Protocol(p)) => {
            log::debug!("websocket protocol error: {p}");
            Incoming::Fail {
                code: 1002,
                why: "protocol error",
            }
        }
        Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Incoming::Fail {
            code: 1000,
            why: "closed",
        },
        Err(e) => {
            log::debug!("websocket error: {e}");
            Incoming::Fail {
                code: 1011,
                why: "internal error",
            }
        }
    }
}

/// Where a peer's frame stream is, from the frame headers alone: inside a header, inside a
/// payload, or between frames, and whether a fragmented message is under way.
///
/// The reactor feeds it exactly the bytes tungstenite consumed. When [`Frames::idle`] holds
/// (between frames, no fragmented message), tungstenite's context holds nothing of the
/// peer's stream that a fresh context would not: its read buffer can be given back by
/// replacing the context (what makes an idle session cost no read buffer). It only counts;
/// validating frames is tungstenite's job, and after a framing error the session ends, so
/// the tracker is never consulted again.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Frames {
    /// Header bytes seen of the frame being read (0 = between frames or in a payload).
    head: [u8; 14],
    head_len: u8,
    /// Payload bytes still to come of the current frame.
    payload_left: u64,
    /// A text or binary frame without FIN was seen and its final fragment has not been.
    fragmented: bool,
}

impl Frames {
    /// Between frames, with no fragmented message under way.
    pub fn idle(&self) -> bool {
        self.head_len == 0 && self.payload_left == 0 && !self.fragmented
    }

    /// Accounts for `bytes` of the peer's stream, in order.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = (bytes.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.head[self.head_len as usize] = bytes[0];
            self.head_len += 1;
            bytes = &bytes[1..];
            let h = &self.head[..self.head_len as usize];
            let Some(need) = header_len(h) else {
                continue;
            };
            if h.len() < need {
                continue;
            }
            let (b0, b1) = (h[0], h[1]);
            let len = match b1 & 0x7f {
                126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                n => u64::from(n),
            };
            let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
            if opcode < 8 {
                // Data: text/binary start a message, continuation (0) goes on with it.
                self.fragmented = !fin;
            }
            self.head_len = 0;
            self.payload_left = len;
        }
    }
}

/// A frame header's full length once its first two bytes are known.
fn header_len(h: &[u8]) -> Option<usize> {
    let b1 = *h.get(1)?;
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    Some(2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 })
}

/// The common case read without tungstenite: `input` starts with one whole, unfragmented,
/// masked text frame (FIN, no RSV bit) of at most `max_message_bytes` whose payload is valid
/// UTF-8. Its payload is unmasked into `buf` and returned with the bytes the frame took.
/// Anything else (a partial frame, a control frame, a fragment, a frame tungstenite would
/// refuse) is `None`, and the caller hands the input to tungstenite, which reads it exactly
/// as before. Only valid when the stream is between messages ([`Frames::idle`]) and no
/// context is in use (tungstenite reads ahead: a context that returned a message may hold
/// the next whole frame); then tungstenite would return this very text.
pub fn simple_text<'b>(
    input: &[u8],
    max_message_bytes: usize,
    buf: &'b mut Vec<u8>,
) -> Option<(&'b str, usize)> {
    let (&b0, &b1) = (input.first()?, input.get(1)?);
    if b0 != 0x81 || b1 & 0x80 == 0 {
        return None;
    }
    let (len, at) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes([*input.get(2)?, *input.get(3)?])),
            4,
        ),
        127 => {
            let b: [u8; 8] = input.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= max_message_bytes)?;
    let mask: [u8; 4] = input.get(at..at + 4)?.try_into().ok()?;
    let payload = input.get(at + 4..at + 4 + len)?;
    buf.clear();
    buf.extend_from_slice(payload);
    unmask(buf, mask);
    let text = std::str::from_utf8(buf).ok()?;
    Some((text, at + 4 + len))
}

/// XORs `data` with the frame's 4-byte mask (RFC 6455 §5.3), 8 bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let [a, b, c, d] = mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        if let Ok(bytes) = <[u8; 8]>::try_from(&*chunk) {
            chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
        }
    }
    // The rest starts at a multiple of 8, so the mask's phase is 0 again.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// Writes one whole unmasked frame, as a server sends it (RFC 6455 §5.2: FIN set, the
/// payload length in 7, 16 or 64 bits), straight into `out`: the same bytes tungstenite
/// writes for a server's message, without its context, its write buffer or a copy.
/// `opcode` is 0x1 (text), 0x9 (ping) or 0xA (pong); a control frame's payload must be at
/// most 125 bytes (ours are empty).
pub fn server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    out.push(0x80 | (opcode & 0x0f));
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n < 65536 => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// A masked client frame (`fin` false for a fragment), as a client would send it: for tests,
/// the fuzz harness and tools; the proxy itself never builds one.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | (opcode & 0x0f)];
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::Error;
    use tungstenite::protocol::Role;

    /// A deterministic stream of client frames: whole text messages, pings, and messages in
    /// fragments with pings between them, of sizes that take every header length.
    fn frame_script(seed: u64, n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut bytes = Vec::new();
        let mut boundaries = vec![0];
        for i in 0..n {
            let len = match next() % 4 {
                0 => (next() % 126) as usize,
                1 => 126 + (next() % 400) as usize,
                2 => 70_000 + (next() % 1000) as usize,
                _ => 0,
            };
            let text = vec![b'a' + (i % 26) as u8; len];
            match next() % 3 {
                0 => bytes.extend(client_frame(0x1, true, &text)),
                1 => bytes.extend(client_frame(0x9, true, b"p")),
                _ => {
                    let (a, b) = text.split_at(len / 2);
                    bytes.extend(client_frame(0x1, false, a));
                    bytes.extend(client_frame(0x9, true, b"in between"));
                    bytes.extend(client_frame(0x0, false, &[]));
                    bytes.extend(client_frame(0x0, true, b));
                }
            }
            boundaries.push(bytes.len());
        }
        (bytes, boundaries)
    }

    /// The fast read gives exactly what tungstenite gives for the frames it takes, and
    /// declines everything else.
    #[test]
    fn simple_text_reads_what_tungstenite_reads() {
        let mut buf = Vec::new();
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 70_000] {
            let text = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let mut frame = client_frame(0x1, true, text.as_bytes());
            frame.extend_from_slice(b"tail");
            let (got, used) = simple_text(&frame, 1 << 20, &mut buf).expect("taken");
            assert_eq!(got, text);
            assert_eq!(used, frame.len() - 4);
            let mut ctx = context(Role::Server, 1 << 20);
            let mut io = WsIo {
                input: &frame[..used],
                out: &mut Vec::new(),
            };
            assert!(
                matches!(next_message(&mut ctx, &mut io), Incoming::Text(t) if t.as_str() == text)
            );
        }
        let whole = client_frame(0x1, true, b"{\"a\":1}");
        for cut in 0..whole.len() {
            assert!(
                simple_text(&whole[..cut], 1024, &mut buf).is_none(),
                "partial at {cut}"
            );
        }
        assert!(simple_text(&whole, 3, &mut buf).is_none(), "over the limit");
        for declined in [
            client_frame(0x1, false, b"frag"),
            client_frame(0x2, true, b"bin"),
            client_frame(0x9, true, b"ping"),
            client_frame(0x1, true, &[0xff, 0xfe]),
        ] {
            assert!(simple_text(&declined, 1024, &mut buf).is_none());
        }
        let mut rsv = whole.clone();
        rsv[0] |= 0x40;
        assert!(simple_text(&rsv, 1024, &mut buf).is_none(), "RSV bit");
        let mut unmasked = vec![0x81, 3];
        unmasked.extend_from_slice(b"abc");
        assert!(simple_text(&unmasked, 1024, &mut buf).is_none(), "unmasked");
    }

    /// Our server frames are byte for byte what tungstenite writes for the same message.
    #[test]
    fn server_frames_match_tungstenite() {
        for len in [0usize, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let text = "x".repeat(len);
            let mut ours = Vec::new();
            server_frame(&mut ours, 0x1, text.as_bytes());
            let mut theirs = Vec::new();
            let mut ctx = context(Role::Server, 1 << 20);
            ctx.write(
                &mut WsIo {
                    input: &[],
                    out: &mut theirs,
                },
                Message::text(text),
            )
            .unwrap();
            assert_eq!(ours, theirs, "text of {len} bytes");
        }
        let mut ours = Vec::new();
        server_frame(&mut ours, 0x9, b"");
        let mut theirs = Vec::new();
        let mut ctx = context(Role::Server, 1024);
        ctx.write(
            &mut WsIo {
                input: &[],
                out: &mut theirs,
            },
            Message::Ping(Default::default()),
        )
        .unwrap();
        assert_eq!(ours, theirs, "ping");
    }

    #[test]
    fn frames_are_idle_exactly_between_messages() {
        let (bytes, boundaries) = frame_script(7, 60);
        let mut f = Frames::default();
        assert!(f.idle());
        for (i, b) in bytes.iter().enumerate() {
            f.feed(std::slice::from_ref(b));
            assert_eq!(f.idle(), boundaries.contains(&(i + 1)), "after byte {i}");
        }
        // Fed in one piece: the same end state.
        let mut g = Frames::default();
        g.feed(&bytes);
        assert_eq!(f, g);
        // A fragment's FIN pending keeps it busy even between frames.
        let mut h = Frames::default();
        h.feed(&client_frame(0x1, false, b"ab"));
        assert!(!h.idle());
        h.feed(&client_frame(0xA, true, b""));
        assert!(!h.idle());
        h.feed(&client_frame(0x0, true, b"cd"));
        assert!(h.idle());
    }

    /// Replacing the context whenever the stream is idle changes nothing a peer can see: the
    /// same messages, the same owed output, for any way the input is cut into reads.
    #[test]
    fn a_fresh_context_between_messages_reads_the_same() {
        for seed in 1..40u64 {
            let (bytes, _) = frame_script(seed, 25);
            let read_all = |release: bool, cut: usize| {
                let mut ctx = context(Role::Server, 100_000);
                let mut frames = Frames::default();
                let (mut got, mut out, mut released) = (Vec::new(), Vec::new(), 0);
                for chunk in bytes.chunks(cut) {
                    let mut io = WsIo {
                        input: chunk,
                        out: &mut out,
                    };
                    loop {
                        let before = io.input;
                        let r = next_message(&mut ctx, &mut io);
                        frames.feed(&before[..before.len() - io.input.len()]);
                        match r {
                            Incoming::Text(t) => got.push(t.as_str().to_string()),
                            Incoming::Control => got.push("<control>".into()),
                            Incoming::More => break,
                            other => panic!("{other:?}"),
                        }
                    }
                    flush_owed(&mut ctx, &mut out);
                    if release && release_if_idle(&mut ctx, &frames, Role::Server, 100_000) {
                        released += 1;
                    }
                }
                (got, out, released)
            };
            let cut = 1 + (seed as usize * 37) % 900;
            let (a, a_out, _) = read_all(false, cut);
            let (b, b_out, released) = read_all(true, cut);
            assert_eq!(a, b, "seed {seed}");
            assert_eq!(a_out, b_out, "seed {seed}");
            assert!(released > 0, "seed {seed}: never idle between reads");
        }
    }

    #[test]
    fn reads_a_message_split_across_inputs() {
        let mut ctx = WebSocketContext::new(Role::Server, Some(config(1024)));
        let frame = client_frame(0x1, true, b"{\"a\":1}");
        let mut out = Vec::new();
        let (a, b) = frame.split_at(3);
        let r = ctx.read(&mut WsIo {
            input: a,
            out: &mut out,
        });
        assert!(matches!(r, Err(Error::Io(ref e)) if e.kind() == io::ErrorKind::WouldBlock));
        let m = ctx
            .read(&mut WsIo {
                input: b,
                out: &mut out,
            })
            .unwrap();
        assert_eq!(m, Message::text("{\"a\":1}"));
    }

    #[test]
    fn oversize_message_is_a_capacity_error() {
        let mut ctx = WebSocketContext::new(Role::Server, Some(config(1024)));
        let frame = client_frame(0x1, true, &[b'x'; 2000]);
        let mut out = Vec::new();
        let r = ctx.read(&mut WsIo {
            input: &frame,
            out: &mut out,
        });
        assert!(matches!(r, Err(Error::Capacity(_))), "{r:?}");
    }

    #[test]
    fn ping_is_answered_into_the_output_buffer() {
        let mut ctx = WebSocketContext::new(Role::Server, Some(config(1024)));
        let mut out = Vec::new();
        let frame = client_frame(0x9, true, b"hi");
        let m = ctx
            .read(&mut WsIo {
                input: &frame,
                out: &mut out,
            })
            .unwrap();
        assert!(matches!(m, Message::Ping(_)));
        ctx.flush(&mut WsIo {
            input: &[],
            out: &mut out,
        })
        .unwrap();
        assert_eq!(out, vec![0x8a, 2, b'h', b'i']);
    }

    #[test]
    fn frames_are_written_whole_into_the_buffer() {
        let mut ctx = WebSocketContext::new(Role::Server, Some(config(1024)));
        let mut out = Vec::new();
        ctx.write(
            &mut WsIo {
                input: &[],
                out: &mut out,
            },
            Message::text("abc"),
        )
        .unwrap();
        assert_eq!(out, vec![0x81, 3, b'a', b'b', b'c']);
    }
}
