//! A connection: its socket, its readiness, its output buffer and its protocol state.
//!
//! Owns the byte movement between a non-blocking socket and the protocol layers: reads are
//! drained into a caller-supplied scratch buffer until `WouldBlock` (or a per-wake budget),
//! writes go from [`Conn::out`] to the socket when it is writable. Readiness is tracked here
//! (`readable`/`writable` are cleared only on `WouldBlock`), because mio is edge-triggered.
//!
//! The state is an explicit enum, and what a state needs lives in its variant, not beside
//! it: an HTTP connection (`Http`, whose [`HttpPhase`] goes `Idle` → `Head` → `Body` →
//! `Waiting` / `Upload` / `Sending` → `Idle` again, or `LastAnswer` when it is not kept), a
//! dial in progress (`Dialing`), an upgraded control session (`Ws`, with the input it holds
//! back), or a connection that is finishing (`Closing`: `Flushing` its last output, then
//! `FinSent` until the peer's EOF or the linger ends). The one fact kept across HTTP phases
//! is whether a request on the connection presented a valid token (`authenticated`, for
//! the connection slots of contract §1). Moving between the four states is done only by
//! the transitions here (`carry_session`, `end_session`, `close_after_output`, `fin_sent`,
//! `take_state`), each of which hands back the state it leaves. A session connection
//! carries the core's `SessionId`; the session's protocol state is the core's. This module
//! never interprets protocol bytes and never blocks; the TLS session sits between the
//! socket and these buffers.

use crate::proto::http::chunked::ChunkedDecoder;
use crate::proto::http::parse::RequestHead;
use crate::timer::TimerId;
use mio::Token;
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

/// A connection's slab index plus a generation, so a stale reference never reaches a newer
/// connection that reused the slot. Packed into the mio `Token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub idx: u32,
    pub generation: u32,
}

impl ConnId {
    pub fn token(self) -> Token {
        Token(((self.generation as usize) << 32) | self.idx as usize)
    }

    pub fn from_token(t: Token) -> ConnId {
        ConnId {
            idx: (t.0 & 0xffff_ffff) as u32,
            generation: (t.0 >> 32) as u32,
        }
    }
}

/// What one read attempt produced.
#[derive(Debug)]
pub enum ReadOutcome {
    Data(usize),
    WouldBlock,
    Eof,
    Failed(io::Error),
}

/// HTTP request progress on a connection.
#[derive(Debug)]
pub enum HttpPhase {
    /// Between requests: no byte of the next one yet (the keep-alive idle deadline).
    Idle,
    /// A request head is arriving (the handshake deadline).
    Head,
    /// Reading a JSON body.
    Body {
        head: Box<RequestHead>,
        body: Vec<u8>,
        chunked: Option<ChunkedDecoder>,
        left: u64,
        /// The request's verified token (only an authorised request has its body read).
        claims: Option<crate::proto::jwt::Claims>,
    },
    /// A request is being answered asynchronously (a send awaiting its recipient).
    Waiting { keep_alive: bool },
    /// A resource body streaming to disk.
    Upload(Box<Uploading>),
    /// A resource streaming to the peer as the socket drains.
    Sending(Box<Sending>),
    /// The connection's last answer is in the output: nothing more is read, and it closes
    /// once the answer is flushed (`Connection: close`, an error, a refused body, the peer's
    /// EOF).
    LastAnswer,
}

/// An upload in progress on a connection.
pub struct Uploading {
    pub owner: String,
    pub name: String,
    /// Who may read it once stored (`?readers=`).
    pub readers: crate::federation::resources::Readers,
    pub up: crate::store::blobs::Upload,
    pub chunked: Option<ChunkedDecoder>,
    /// Bytes still expected (Content-Length uploads).
    pub left: u64,
    /// Quota bytes reserved for it.
    pub reserved: u64,
    pub keep_alive: bool,
}

impl std::fmt::Debug for Uploading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Uploading({}/{}, {} bytes)",
            self.owner, self.name, self.up.written
        )
    }
}

/// A download in progress on a connection.
#[derive(Debug)]
pub struct Sending {
    pub file: std::fs::File,
    pub offset: u64,
    pub left: u64,
    pub keep_alive: bool,
}

#[derive(Debug)]
pub struct HttpConn {
    /// Unparsed request bytes (bounded by the head limit plus the body limit).
    pub inbuf: Vec<u8>,
    pub phase: HttpPhase,
    /// Head/body deadline (handshake timeout) or keep-alive idle deadline.
    pub deadline: Instant,
    /// A request on this connection presented a valid token (contract §1: only sockets that
    /// never did are displaced at `FEDMCP_MAX_CONNECTIONS`).
    pub authenticated: bool,
}

impl HttpConn {
    /// A new HTTP connection: its first request head is due by `deadline`.
    pub fn new(deadline: Instant) -> HttpConn {
        HttpConn {
            inbuf: Vec::new(),
            phase: HttpPhase::Head,
            deadline,
            authenticated: false,
        }
    }
}

/// What a WebSocket connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    /// A member's control session (§4), the core's `SessionId`.
    Control(crate::federation::action::SessionId),
    /// An MCP client's session (§9), named to the core by this connection's link id.
    Mcp(crate::federation::action::LinkId),
}

pub struct WsConn {
    /// tungstenite's state for this session while it is busy: given back to the pool
    /// (`io::pool::CtxPool`) whenever the peer's stream is between messages (`frames`) and
    /// nothing is owed, and taken again when a frame comes or goes, so an idle session holds
    /// neither the context nor its read buffer.
    pub ctx: Option<Box<tungstenite::protocol::WebSocketContext>>,
    /// Our side's role (server for accepted sessions, client for dialled ones).
    pub role: tungstenite::protocol::Role,
    /// Where the peer's frame stream is (counted from the bytes tungstenite consumed).
    pub frames: crate::proto::ws::Frames,
    /// The session this connection carries.
    pub carries: Carries,
    /// Input read from the socket but not yet processed, because the session's output went
    /// over its bound mid-read (at most one read chunk: nothing more is read until it is
    /// processed).
    pub stash: Vec<u8>,
}

/// A connection that is finishing: its last output is flushed, then our side is shut (FIN),
/// then it waits for the peer's EOF until `deadline` (the linger), and is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Output still to flush before our FIN.
    Flushing { deadline: Instant },
    /// Our FIN was sent; waiting for the peer's EOF or the deadline.
    FinSent { deadline: Instant },
}

impl Closing {
    pub fn deadline(self) -> Instant {
        match self {
            Closing::Flushing { deadline } | Closing::FinSent { deadline } => deadline,
        }
    }

    /// Our FIN went out.
    pub fn fin_sent(self) -> Closing {
        Closing::FinSent {
            deadline: self.deadline(),
        }
    }
}

impl From<Closing> for ConnState {
    fn from(c: Closing) -> ConnState {
        ConnState::Closing(c)
    }
}

pub enum ConnState {
    Http(Box<HttpConn>),
    /// An outbound connection on its way to a session: TCP connect, TLS, upgrade (§5).
    Dialing(Box<Dialing>),
    Ws(WsConn),
    Closing(Closing),
}

/// Where an outbound connection is.
#[derive(Debug)]
pub enum DialPhase {
    /// Non-blocking connect in progress (done when the socket turns writable).
    Connecting,
    /// Upgrade request sent; the answer head accumulates here (bounded).
    Upgrading { inbuf: Vec<u8> },
}

#[derive(Debug)]
pub struct Dialing {
    /// What the core decided for this attempt (server, URL, key, token, deadline).
    pub plan: Box<crate::federation::action::DialPlan>,
    pub phase: DialPhase,
}

impl ConnState {
    pub fn label(&self) -> &'static str {
        match self {
            ConnState::Http(_) => "http",
            ConnState::Dialing(_) => "connecting",
            ConnState::Ws(_) => "session",
            ConnState::Closing(_) => "closing",
        }
    }
}

pub struct Conn {
    pub id: ConnId,
    pub sock: TcpStream,
    pub peer: SocketAddr,
    pub state: ConnState,
    /// Bytes owed to the peer, from `out_pos` on.
    pub out: Vec<u8>,
    pub out_pos: usize,
    pub readable: bool,
    pub writable: bool,
    /// The peer sent EOF (or the socket failed): nothing more will be read.
    pub read_closed: bool,
    /// The conn's armed deadline in the loop's timer structure.
    pub timer: Option<TimerId>,
    /// The TLS session when the listener serves TLS (boxed: most of a plain proxy's
    /// connections do not pay for it).
    pub tls: Option<Box<rustls::Connection>>,
}

/// Plaintext rustls may hold encrypted-but-unsent per connection; the rest waits in
/// `Conn::out`, where the slow-consumer bounds see it.
pub const TLS_BUFFER_LIMIT: usize = 64 * 1024;

/// Output capacity kept across flushes; a larger buffer is released once empty.
const OUT_KEEP_CAPACITY: usize = 16 * 1024;

impl Conn {
    /// A connection in `state` with nothing read, owed or armed yet.
    pub fn new(id: ConnId, sock: TcpStream, peer: SocketAddr, state: ConnState) -> Conn {
        Conn {
            id,
            sock,
            peer,
            state,
            out: Vec::new(),
            out_pos: 0,
            readable: false,
            writable: false,
            read_closed: false,
            timer: None,
            tls: None,
        }
    }

    pub fn unsent(&self) -> usize {
        self.out.len() - self.out_pos
    }

    // The state's transitions: each consumes the state it leaves (returned to the caller,
    // which owns what it carried) and is the only way into the state it enters.

    /// A session connection's session is over: `Closing`, flushing what is owed until
    /// `deadline`. Returns what the session connection carried; `None` (and no change) when
    /// the connection carries no session.
    pub fn end_session(&mut self, deadline: Instant) -> Option<WsConn> {
        if !matches!(self.state, ConnState::Ws(_)) {
            return None;
        }
        match std::mem::replace(&mut self.state, Closing::Flushing { deadline }.into()) {
            ConnState::Ws(ws) => Some(ws),
            _ => None,
        }
    }

    /// An upgraded connection (an HTTP request answered `101`, or a dial's answer) carries
    /// `carries` from now on. Returns the state it left.
    pub fn carry_session(
        &mut self,
        role: tungstenite::protocol::Role,
        carries: Carries,
    ) -> ConnState {
        let ws = WsConn {
            ctx: None,
            role,
            frames: crate::proto::ws::Frames::default(),
            carries,
            stash: Vec::new(),
        };
        std::mem::replace(&mut self.state, ConnState::Ws(ws))
    }

    /// The connection's last answer is queued: `Closing`, flushing it until `deadline`.
    pub fn close_after_output(&mut self, deadline: Instant) -> ConnState {
        std::mem::replace(&mut self.state, Closing::Flushing { deadline }.into())
    }

    /// Our FIN went out: wait for the peer's EOF until `deadline`.
    pub fn fin_sent(&mut self, deadline: Instant) -> ConnState {
        std::mem::replace(&mut self.state, Closing::FinSent { deadline }.into())
    }

    /// The connection is being dropped (at `now`): whatever it carried is handed back.
    pub fn take_state(&mut self, now: Instant) -> ConnState {
        self.fin_sent(now)
    }

    /// One non-blocking read of plaintext into `buf` (through TLS when the listener has it).
    pub fn read_some(&mut self, buf: &mut [u8]) -> ReadOutcome {
        if self.tls.is_some() {
            return self.tls_read(buf);
        }
        loop {
            match self.sock.read(buf) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(n) => return ReadOutcome::Data(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return ReadOutcome::Failed(e),
            }
        }
    }

    /// The TLS read pump: plaintext rustls already holds comes first (data decrypted with
    /// the last handshake record raises no socket event), then records from the socket.
    /// `WouldBlock` only when both are exhausted. A protocol error queues the alert, which
    /// the caller's flush sends before the connection is dropped.
    fn tls_read(&mut self, buf: &mut [u8]) -> ReadOutcome {
        let Some(tls) = self.tls.as_mut() else {
            return ReadOutcome::Eof;
        };
        loop {
            match tls.reader().read(buf) {
                Ok(0) => return ReadOutcome::Eof, // close_notify
                Ok(n) => return ReadOutcome::Data(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return ReadOutcome::Eof,
                Err(e) => return ReadOutcome::Failed(e),
            }
            match tls.read_tls(&mut self.sock) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        // Best effort: the alert goes out now, the connection is dropped next.
                        let _ = tls.write_tls(&mut self.sock);
                        return ReadOutcome::Failed(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return ReadOutcome::Failed(e),
            }
        }
    }

    /// True when TLS has records to send (a handshake step after a read, an alert).
    pub fn tls_wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Queues TLS `close_notify` (no-op on a plain connection); the next flush sends it.
    pub fn tls_close_notify(&mut self) {
        if let Some(t) = self.tls.as_mut() {
            t.send_close_notify();
        }
    }

    /// Writes owed bytes until done or `WouldBlock`. `Ok(true)` when nothing is left.
    pub fn flush(&mut self) -> io::Result<bool> {
        if self.tls.is_some() {
            return self.tls_flush();
        }
        while self.out_pos < self.out.len() {
            if !self.writable {
                return Ok(false);
            }
            match self.sock.write(&self.out[self.out_pos..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "socket wrote 0 bytes",
                    ));
                }
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.reset_out();
        Ok(true)
    }

    /// The TLS write pump: plaintext moves into rustls only as far as its bounded buffer
    /// takes it (the rest stays in `out`, where it counts as unsent), records go to the
    /// socket until it would block. rustls' `Ok(0)` (buffer full) is not an error here.
    fn tls_flush(&mut self) -> io::Result<bool> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(true);
        };
        loop {
            while self.out_pos < self.out.len() {
                let n = tls.writer().write(&self.out[self.out_pos..])?;
                if n == 0 {
                    break;
                }
                self.out_pos += n;
            }
            if !tls.wants_write() {
                break;
            }
            if !self.writable {
                return Ok(false);
            }
            match tls.write_tls(&mut self.sock) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "socket wrote 0 bytes",
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out_pos < self.out.len() {
            return Ok(false); // still handshaking: rustls holds plaintext until it is done
        }
        self.reset_out();
        Ok(true)
    }

    fn reset_out(&mut self) {
        self.out.clear();
        self.out_pos = 0;
        if self.out.capacity() > OUT_KEEP_CAPACITY {
            self.out = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_id_round_trips_through_a_token() {
        let id = ConnId {
            idx: 12345,
            generation: 0xfeed_beef,
        };
        assert_eq!(ConnId::from_token(id.token()), id);
    }
}
