//! The event loop: one thread, one `mio::Poll`, sockets in a slab, one wait per turn.
//!
//! Owns readiness and nothing else: it accepts (refusing at `FEDMCP_MAX_CONNECTIONS`), tracks
//! each socket's readable/writable state (cleared only on `WouldBlock`, because mio is
//! edge-triggered), reads into one scratch buffer with a per-connection budget per wake-up
//! (a busy peer cannot starve the others; what is left is read on the next turn), hands the
//! bytes to the connection's protocol state (and through it to the core), fires due
//! deadlines (the connections' and the core's), hands the turn's records to the disk thread
//! (`io::disk`; its wake-up releases the answers that waited on them), and flushes every
//! connection that has output once per turn. Signals arrive as readiness (signal-hook-mio): SIGTERM and
//! SIGINT start the drain, SIGHUP asks for a certificate reload.
//!
//! It never interprets protocol bytes and never sleeps: the poll timeout is the nearest
//! deadline, so an idle proxy makes no wake-ups at all. It is the only reader of the clock:
//! one reading per turn (`Federation::now`) is the time every handler of that turn works
//! with.

use crate::clock::Now;
use crate::io::conn::{Closing, Conn, ConnId, ConnState, HttpConn, HttpPhase, ReadOutcome};
use crate::io::proxy::{CLOSE_LINGER, Proxy};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::io;
use std::net::Shutdown;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

/// Bytes read per `read` call (the shared scratch buffer).
const READ_CHUNK: usize = 64 * 1024;
/// Bytes one connection may read per wake-up before the others get their turn.
const READ_BUDGET: usize = 256 * 1024;
/// Events taken per `poll`.
const EVENTS_CAPACITY: usize = 1024;
/// Retry delay for `accept` after a resource error (EMFILE and the like).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

pub struct Reactor {
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    signals: Signals,
    scratch: Vec<u8>,
    /// Connections with read budget left over (still readable) or resumed after a flush.
    again: Vec<ConnId>,
    accept_retry_at: Option<Instant>,
    /// Outbound dialling's lookups and sockets (`dial`).
    dialer: crate::io::dial::Dialer,
    /// The cluster's NATS connection (§10; `None` for a proxy alone).
    pub nats: Option<crate::io::nats::NatsLink>,
    /// Wakes the loop from the helper threads (the resolver, the disk thread).
    waker: std::sync::Arc<mio::Waker>,
}

impl Reactor {
    /// What a helper thread wakes the loop with.
    pub fn waker(&self) -> std::sync::Arc<mio::Waker> {
        self.waker.clone()
    }

    pub fn new(mut listener: TcpListener) -> io::Result<Reactor> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let waker = std::sync::Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
        Ok(Reactor {
            poll,
            events: Events::with_capacity(EVENTS_CAPACITY),
            listener: Some(listener),
            signals,
            scratch: vec![0; READ_CHUNK],
            again: Vec::new(),
            accept_retry_at: None,
            dialer: crate::io::dial::Dialer::new(waker.clone()),
            waker,
            nats: None,
        })
    }

    /// Runs until a drain completes (all connections closed, or the grace time is over).
    pub fn run(&mut self, proxy: &mut Proxy) -> io::Result<()> {
        loop {
            // A reading for this poll's timeout; the turn's own is taken after the poll.
            proxy.fed.now = Now::read();
            let now = proxy.fed.now.at;
            let next = [
                proxy.next_deadline(),
                self.nats.as_ref().and_then(|l| l.next_deadline()),
            ]
            .into_iter()
            .flatten()
            .min();
            let mut timeout = next.map(|d| d.saturating_duration_since(now));
            if let Some(at) = self.accept_retry_at {
                let t = at.saturating_duration_since(now);
                timeout = Some(timeout.map_or(t, |x| x.min(t)));
            }
            if let Some(end) = proxy.fed.draining {
                let t = end.saturating_duration_since(now);
                timeout = Some(timeout.map_or(t, |x| x.min(t)));
            }
            if proxy.fed.degraded.is_some() {
                // Retry the kept batch at least every second.
                let t = Duration::from_secs(1);
                timeout = Some(timeout.map_or(t, |x| x.min(t)));
            }
            if !self.again.is_empty()
                || !proxy.resume.is_empty()
                || !proxy.dirty.is_empty()
                || !proxy.dial_requests.is_empty()
                || proxy.fed.has_actions()
            {
                timeout = Some(Duration::ZERO);
            }
            if let Err(e) = self.poll.poll(&mut self.events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e);
            }
            // The turn's one reading of the clock: everything handled below sees this time.
            proxy.fed.now = Now::read();
            let tokens: Vec<(Token, bool, bool)> = self
                .events
                .iter()
                .map(|ev| {
                    let r = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    let w = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                    (ev.token(), r, w)
                })
                .collect();
            for (token, r, w) in tokens {
                match token {
                    LISTENER => self.accept(proxy),
                    SIGNALS => self.signals(proxy),
                    WAKER => {
                        proxy.disk_done();
                        self.dialer.on_wake(proxy);
                        let answers = std::mem::take(&mut self.dialer.nats_answers);
                        if let Some(link) = self.nats.as_mut() {
                            for (id, result) in answers {
                                crate::io::nats::on_resolved(
                                    link,
                                    proxy,
                                    self.poll.registry(),
                                    id,
                                    result,
                                );
                            }
                        }
                    }
                    crate::io::nats::NATS => {
                        if let Some(link) = self.nats.as_mut() {
                            crate::io::nats::on_ready(link, proxy, self.poll.registry(), r);
                        }
                    }
                    t => {
                        let id = ConnId::from_token(t);
                        let Some(conn) = proxy.conn_mut(id) else {
                            continue;
                        };
                        conn.writable |= w;
                        conn.readable |= r;
                        if matches!(conn.state, ConnState::Dialing(_)) {
                            crate::io::dial::on_ready(proxy, id);
                        }
                        if w {
                            proxy.dirty.push(id);
                        }
                        if r {
                            self.read(proxy, id);
                        }
                    }
                }
                proxy.apply();
            }
            if self.accept_retry_at.is_some_and(|t| proxy.fed.now.at >= t) {
                self.accept_retry_at = None;
                self.accept(proxy);
            }
            // Once per connection per turn, whoever asked (budget left over, output drained).
            let mut again = std::mem::take(&mut self.again);
            again.sort_unstable_by_key(|id| (id.idx, id.generation));
            again.dedup();
            for id in again {
                self.read(proxy, id);
            }
            for id in std::mem::take(&mut proxy.resume) {
                proxy.http_process(id);
                self.read(proxy, id);
            }
            proxy.apply();
            let now = proxy.fed.now.at;
            proxy.fire_due(now);
            // Lookups and connections the turn's dialling asked for.
            self.dialer.run(proxy, self.poll.registry());
            // The cluster's link: attempts, deadlines, keep-alive (its output is written at
            // the end of the turn, with the connections').
            if let Some(link) = self.nats.as_mut() {
                crate::io::nats::turn(link, proxy, self.poll.registry());
                if let Some((id, host, port)) = link.resolve.take()
                    && let Err(e) = self.dialer.resolve(id, host, port)
                {
                    crate::io::nats::on_resolved(link, proxy, self.poll.registry(), id, Err(e));
                }
            }
            // Tools that changed this turn reach MCP WebSocket clients (§9).
            proxy.fed.mcp_end_turn();
            proxy.apply();
            // The records made since the last commit go to the disk thread (one fsync for
            // all; one commit in flight at a time); the loop does not wait for it.
            proxy.commit();
            self.flush(proxy);
            if let Some(link) = self.nats.as_mut() {
                crate::io::nats::flush(link, proxy, self.poll.registry());
            }
            proxy.fed.audit.flush();
            if let Some(end) = proxy.fed.draining {
                if proxy.conns.iter().all(|(_, c)| idle_http(c)) {
                    log::info!("drained: no session or request left");
                    return Ok(());
                }
                if proxy.fed.now.at >= end {
                    log::warn!(
                        "grace time over with {} connections open; exiting",
                        proxy.conns.len()
                    );
                    return Ok(());
                }
            }
        }
    }

    fn accept(&mut self, proxy: &mut Proxy) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        loop {
            let (mut sock, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors or similar: the edge will not fire again for the
                    // connections already waiting, so come back on a timer.
                    log::warn!("accept failed: {e}");
                    self.accept_retry_at = Some(proxy.fed.now.at + ACCEPT_RETRY);
                    return;
                }
            };
            if proxy.conns.len() >= proxy.fed.cfg.max_connections && !proxy.displace_one() {
                proxy.fed.metrics.refused_total += 1;
                let _ = io::Write::write(&mut sock, REFUSED_503);
                continue;
            }
            let _ = sock.set_nodelay(true);
            let deadline = proxy.fed.now.at + proxy.fed.cfg.handshake_timeout;
            let id = proxy.insert_conn(|id| {
                Conn::new(
                    id,
                    sock,
                    peer,
                    ConnState::Http(Box::new(HttpConn::new(deadline))),
                )
            });
            let Some(id) = id else { continue };
            proxy.fed.metrics.accepted_total += 1;
            proxy.accepted(id);
            if let Some(cfg) = proxy.tls.clone() {
                match rustls::ServerConnection::new(cfg) {
                    Ok(mut t) => {
                        t.set_buffer_limit(Some(crate::io::conn::TLS_BUFFER_LIMIT));
                        if let Some(c) = proxy.conn_mut(id) {
                            c.tls = Some(Box::new(rustls::Connection::Server(t)));
                        }
                    }
                    Err(e) => {
                        log::warn!("TLS session setup failed: {e}");
                        proxy.drop_conn(id, "tls setup failed");
                        continue;
                    }
                }
            }
            let registered = match proxy.conn_mut(id) {
                Some(c) => self.poll.registry().register(
                    &mut c.sock,
                    id.token(),
                    Interest::READABLE | Interest::WRITABLE,
                ),
                None => continue,
            };
            if let Err(e) = registered {
                log::warn!("register failed: {e}");
                proxy.drop_conn(id, "register failed");
                continue;
            }
            proxy.rearm(id);
        }
    }

    fn signals(&mut self, proxy: &mut Proxy) {
        let got: Vec<i32> = self.signals.pending().collect();
        for sig in got {
            match sig {
                SIGTERM | SIGINT => self.begin_drain(proxy),
                SIGHUP => proxy.reload_tls(),
                _ => {}
            }
        }
    }

    /// Stop accepting, answer `readyz` 503, close sessions 1001, let requests finish.
    fn begin_drain(&mut self, proxy: &mut Proxy) {
        if proxy.fed.draining.is_some() {
            return;
        }
        log::info!(
            "draining: closing sessions, exiting within {:?}",
            proxy.fed.cfg.shutdown_grace
        );
        // Exit a little before the grace time is over, so "within the grace time" holds
        // even with the last turn's work.
        let grace = proxy.fed.cfg.shutdown_grace;
        let margin = (grace / 10).min(Duration::from_millis(100));
        proxy.fed.draining = Some(proxy.fed.now.at + grace - margin);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        // Sessions close 1001. HTTP connections stay: a request on them is answered (readyz
        // with 503) with `Connection: close`; idle ones do not hold the exit back.
        proxy.fed.close_all_sessions(1001, "proxy shutting down");
        // The other nodes forget this one's sessions at once.
        proxy.fed.cluster_bye();
        proxy.apply();
        // Attempts to dial stop (no new attempt is scheduled while draining).
        let dialing: Vec<ConnId> = proxy
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, ConnState::Dialing(_)))
            .map(|(_, c)| c.id)
            .collect();
        for id in dialing {
            proxy.drop_conn(id, "draining");
        }
    }

    /// Reads from a connection until `WouldBlock`, its budget, or backpressure.
    fn read(&mut self, proxy: &mut Proxy, id: ConnId) {
        let mut budget = READ_BUDGET;
        loop {
            if !wants_input(proxy, id) {
                return;
            }
            let Some(conn) = proxy.conn_mut(id) else {
                return;
            };
            if !conn.readable || conn.read_closed {
                return;
            }
            if budget == 0 {
                // (A closing peer that keeps sending is still read and discarded until its
                // linger ends: dropping it earlier would reset the connection and could destroy
                // our close frame in the peer's receive buffer before it reads it.)
                self.again.push(id);
                return;
            }
            match conn.read_some(&mut self.scratch) {
                ReadOutcome::Data(n) => {
                    budget = budget.saturating_sub(n);
                    let owes_tls = conn.tls_wants_write();
                    let data = &self.scratch[..n];
                    match conn.state {
                        ConnState::Http(_) => proxy.http_input(id, data),
                        ConnState::Ws(_) => proxy.ws_input(id, data),
                        ConnState::Dialing(_) => crate::io::dial::dial_input(proxy, id, data),
                        ConnState::Closing(_) => {}
                    }
                    if owes_tls {
                        proxy.dirty.push(id);
                    }
                    proxy.rearm(id);
                }
                ReadOutcome::WouldBlock => {
                    conn.readable = false;
                    if conn.tls_wants_write() {
                        proxy.dirty.push(id);
                    }
                    return;
                }
                ReadOutcome::Eof => {
                    conn.read_closed = true;
                    on_eof(proxy, id);
                    return;
                }
                ReadOutcome::Failed(e) => {
                    // A TLS alert may be owed: one last best-effort write, then drop.
                    if conn.tls_wants_write() {
                        let _ = conn.flush();
                    }
                    proxy.drop_conn(id, &format!("read failed: {e}"));
                    return;
                }
            }
        }
    }

    /// Writes every connection's owed output; finishes closing connections.
    fn flush(&mut self, proxy: &mut Proxy) {
        let now = proxy.fed.now.at;
        let mut dirty = std::mem::take(&mut proxy.dirty);
        dirty.sort_unstable_by_key(|id| (id.idx, id.generation));
        dirty.dedup();
        for id in dirty {
            let Some(conn) = proxy.conns.get_mut(id.idx as usize).filter(|c| c.id == id) else {
                continue;
            };
            let done = match conn.flush() {
                Ok(done) => done,
                Err(e) => {
                    proxy.drop_conn(id, &format!("write failed: {e}"));
                    continue;
                }
            };
            if done {
                // Written out: the buffer goes back to the pool (an idle connection holds
                // none; the next output takes one).
                proxy.out_pool.put(std::mem::take(&mut conn.out));
            } else {
                // A session's output only partly written: the core learns what is left.
                if let ConnState::Ws(ws) = &conn.state
                    && let crate::io::conn::Carries::Control(session) = ws.carries
                {
                    let unsent = conn.unsent();
                    proxy.fed.set_unsent(session, unsent);
                }
                continue;
            }
            let readable = conn.readable && !conn.read_closed;
            let read_closed = conn.read_closed;
            match &mut conn.state {
                ConnState::Http(h) if matches!(h.phase, HttpPhase::LastAnswer) => {
                    finish_write(conn);
                    if read_closed {
                        proxy.drop_conn(id, "answered");
                        continue;
                    }
                    conn.fin_sent(now + CLOSE_LINGER);
                    proxy.rearm(id);
                }
                ConnState::Closing(c) => {
                    if let Closing::Flushing { .. } = *c {
                        *c = c.fin_sent();
                        finish_write(conn);
                    }
                    if read_closed {
                        proxy.drop_conn(id, "closed");
                        continue;
                    }
                }
                ConnState::Ws(_) => {
                    proxy.ws_drained(id);
                    if readable {
                        self.again.push(id);
                    }
                }
                ConnState::Dialing(_) => {
                    if readable {
                        self.again.push(id);
                    }
                }
                ConnState::Http(h) => {
                    if matches!(h.phase, HttpPhase::Sending(_)) {
                        // The socket took the last chunk of a download: read the next.
                        proxy.refill(id);
                        continue;
                    }
                    // Pipelined requests already buffered were held back while the output
                    // was over its bound: process them now.
                    if !h.inbuf.is_empty() {
                        proxy.resume.push(id);
                    }
                    if readable {
                        self.again.push(id);
                    }
                }
            }
        }
        // Pumping may have produced output; it is flushed on the next turn (zero timeout).
    }
}

/// A minimal answer for a connection refused at capacity.
const REFUSED_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 85\r\nConnection: close\r\n\r\n{\"error\":{\"code\":\"too_many_connections\",\"message\":\"FEDMCP_MAX_CONNECTIONS reached\"}}\n";

/// Ends our side of a connection whose output is flushed: TLS `close_notify` (best effort),
/// then FIN.
fn finish_write(conn: &mut Conn) {
    if conn.tls.is_some() {
        conn.tls_close_notify();
        let _ = conn.flush();
    }
    let _ = conn.sock.shutdown(Shutdown::Write);
}

/// An HTTP connection between requests with nothing owed: it does not hold a drain back.
fn idle_http(c: &Conn) -> bool {
    match &c.state {
        ConnState::Http(h) => {
            matches!(h.phase, HttpPhase::Idle) && h.inbuf.is_empty() && c.unsent() == 0
        }
        _ => false,
    }
}

fn wants_input(proxy: &Proxy, id: ConnId) -> bool {
    match proxy.conn(id) {
        Some(c) => match &c.state {
            ConnState::Http(_) => proxy.http_wants_input(id),
            ConnState::Ws(ws) => c.unsent() <= proxy.fed.unsent_bound() && ws.stash.is_empty(),
            ConnState::Dialing(_) | ConnState::Closing(_) => true,
        },
        None => false,
    }
}

fn on_eof(proxy: &mut Proxy, id: ConnId) {
    let Some(conn) = proxy.conn_mut(id) else {
        return;
    };
    let unsent = conn.unsent();
    match &mut conn.state {
        ConnState::Http(_) => proxy.http_peer_closed(id),
        // Answers already owed still go out; then the connection closes.
        ConnState::Ws(_) => proxy.ws_peer_gone(id),
        ConnState::Dialing(_) => proxy.drop_conn(id, "closed by the server during the upgrade"),
        ConnState::Closing(_) => {
            if unsent == 0 {
                proxy.drop_conn(id, "closed");
            }
        }
    }
}

/// Binds the listener (non-blocking), for `main` to print the real address.
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
}
