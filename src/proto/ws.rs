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
use tungstenite::protocol::{WebSocketConfig, WebSocketContext};
use tungstenite::{Error as WsError, Message};

/// Initial read-buffer capacity per session: small, because idle sessions dominate memory;
/// tungstenite grows it for a large frame.
pub const WS_READ_BUFFER: usize = 2048;

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
