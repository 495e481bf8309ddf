//! The reactor's side of outbound sessions (contract §5): name lookups, sockets, TLS setup.
//!
//! Owns what dialling needs of the operating system, so that `outbound` (the decisions) never
//! touches it: the resolver thread (`getaddrinfo` blocks, so names are resolved there and the
//! answers come back through a channel and the loop's `mio::Waker`; IP literals never leave
//! the loop), opening and registering the non-blocking socket of an attempt, and finishing
//! the connect (the socket's error, the TLS client session for `wss://`, the upgrade request
//! in the output), then reading the upgrade's answer and handing the connection to the
//! session the core opens. It carries out the core's `Action::Dial` requests and answers
//! with `on_resolved`, `dial_opened`, `dial_established` and `dial_failed`; it makes no
//! decision of its own. The resolver thread holds no proxy state and does nothing else.

use crate::federation::action::DialRequest;
use crate::federation::outbound::MAX_ADDRESSES;
use crate::federation::registry::OutPhase;
use crate::io::conn::{Conn, ConnId, ConnState, DialPhase, Dialing};
use crate::io::proxy::Proxy;
use crate::proto::upgrade::{check_answer, upgrade_request};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

/// A name resolution handed to the resolver thread and back.
struct Lookup {
    id: u64,
    host: String,
    port: u16,
}

pub type Answer = (u64, Result<Vec<SocketAddr>, String>);

/// The resolver thread's two ends, as the loop sees them.
struct Resolver {
    tx: Sender<Lookup>,
    rx: Receiver<Answer>,
}

impl Resolver {
    /// Starts the thread; it wakes the loop through `waker` after every answer.
    fn start(waker: Arc<mio::Waker>) -> std::io::Result<Resolver> {
        let (tx, req_rx) = channel::<Lookup>();
        let (ans_tx, rx) = channel();
        std::thread::Builder::new()
            .name("fedmcp-resolver".into())
            .spawn(move || {
                for l in req_rx {
                    let r = (l.host.as_str(), l.port)
                        .to_socket_addrs()
                        .map_err(|e| e.to_string())
                        .map(|it| it.take(MAX_ADDRESSES).collect::<Vec<_>>())
                        .and_then(|v| {
                            if v.is_empty() {
                                Err("no address".to_string())
                            } else {
                                Ok(v)
                            }
                        });
                    if ans_tx.send((l.id, r)).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })?;
        Ok(Resolver { tx, rx })
    }
}

/// Dialling's operating-system side, owned by the reactor.
pub struct Dialer {
    waker: Arc<mio::Waker>,
    /// Started at the first name to resolve (a proxy that dials only IP literals, or
    /// nothing, has no thread).
    resolver: Option<Resolver>,
    /// Answers to lookups of other users (ids from [`NATS_LOOKUP_BASE`]), for the reactor
    /// to hand on.
    pub nats_answers: Vec<Answer>,
}

/// Lookups for the NATS link carry ids from here (dialling's are below).
pub const NATS_LOOKUP_BASE: u64 = 1 << 62;

impl Dialer {
    pub fn new(waker: Arc<mio::Waker>) -> Dialer {
        Dialer {
            waker,
            resolver: None,
            nats_answers: Vec::new(),
        }
    }

    /// Carries out every request dialling made (and those its answers make in turn).
    pub fn run(&mut self, proxy: &mut Proxy, registry: &mio::Registry) {
        proxy.apply();
        while !proxy.dial_requests.is_empty() {
            for req in std::mem::take(&mut proxy.dial_requests) {
                match req {
                    DialRequest::Resolve { lookup, host, port } => {
                        if let Err(why) = self.ask(Lookup {
                            id: lookup,
                            host,
                            port,
                        }) {
                            proxy.fed.on_resolved(lookup, Err(why));
                        }
                    }
                    DialRequest::Connect { addr, plan } => {
                        let slot = plan.slot;
                        match open(proxy, registry, addr, plan) {
                            Ok(id) => {
                                if proxy.fed.dial_opened(slot, Proxy::link_id(id)) {
                                    proxy.rearm(id);
                                } else {
                                    proxy.drop_conn(id, "dialling stopped");
                                }
                            }
                            Err(why) => proxy.fed.dial_failed(slot, OutPhase::Opening, why),
                        }
                    }
                }
                proxy.apply();
            }
        }
    }

    /// Resolves `host` off the loop for another user of the resolver (the NATS link): the
    /// answer comes back to `on_wake` with this `id`.
    pub fn resolve(&mut self, id: u64, host: String, port: u16) -> Result<(), String> {
        self.ask(Lookup { id, host, port })
    }

    fn ask(&mut self, l: Lookup) -> Result<(), String> {
        if self.resolver.is_none() {
            let r =
                Resolver::start(self.waker.clone()).map_err(|e| format!("resolver thread: {e}"))?;
            self.resolver = Some(r);
        }
        match self.resolver.as_ref().map(|r| r.tx.send(l)) {
            Some(Ok(())) => Ok(()),
            _ => {
                self.resolver = None;
                Err("resolver thread gone".into())
            }
        }
    }

    /// The waker fired: hands the resolver's answers in.
    pub fn on_wake(&mut self, proxy: &mut Proxy) {
        let mut answers = Vec::new();
        if let Some(r) = &self.resolver {
            while let Ok(a) = r.rx.try_recv() {
                answers.push(a);
            }
        }
        for (id, result) in answers {
            if id >= NATS_LOOKUP_BASE {
                self.nats_answers.push((id, result));
            } else {
                proxy.fed.on_resolved(id, result);
            }
        }
        proxy.apply();
    }
}

/// Opens a non-blocking connection for an attempt and registers it with the loop.
fn open(
    proxy: &mut Proxy,
    registry: &mio::Registry,
    addr: SocketAddr,
    plan: Box<crate::federation::action::DialPlan>,
) -> Result<ConnId, String> {
    let sock = mio::net::TcpStream::connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
    let dialing = Box::new(Dialing {
        plan,
        phase: DialPhase::Connecting,
    });
    let id = proxy
        .insert_conn(|id| Conn::new(id, sock, addr, ConnState::Dialing(dialing)))
        .ok_or_else(|| "the connection table is full".to_string())?;
    let registered = match proxy.conn_mut(id) {
        Some(c) => registry
            .register(
                &mut c.sock,
                id.token(),
                mio::Interest::READABLE | mio::Interest::WRITABLE,
            )
            .map_err(|e| e.to_string()),
        None => Err("the connection went away".to_string()),
    };
    if let Err(e) = registered {
        // Not yet the attempt's connection: dropping it changes no dialling state.
        proxy.conns.remove(id.idx as usize);
        return Err(format!("register: {e}"));
    }
    Ok(id)
}

/// An event on a dialling connection still connecting: finish the connect, then put the
/// upgrade request in the output (through TLS for `wss://`).
pub fn on_ready(proxy: &mut Proxy, id: ConnId) {
    let wss =
        matches!(proxy.conn(id).map(|c| &c.state), Some(ConnState::Dialing(d)) if d.plan.url.tls);
    if wss && proxy.tls_client.is_none() {
        match crate::io::tls::client_config(None) {
            Ok(c) => proxy.tls_client = Some(c),
            Err(e) => return proxy.drop_conn(id, &e),
        }
    }
    let tls_client = proxy.tls_client.clone();
    let Some(conn) = proxy.conn_mut(id) else {
        return;
    };
    let ConnState::Dialing(d) = &mut conn.state else {
        return;
    };
    if !matches!(d.phase, DialPhase::Connecting) {
        return;
    }
    let err = match conn.sock.take_error() {
        Ok(Some(e)) | Err(e) => Some(e.to_string()),
        Ok(None) => match conn.sock.peer_addr() {
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => return, // not yet
            Err(e) => Some(e.to_string()),
        },
    };
    if let Some(e) = err {
        return proxy.drop_conn(id, &format!("connect failed: {e}"));
    }
    if d.plan.url.tls {
        let name = match rustls::pki_types::ServerName::try_from(d.plan.url.host.clone()) {
            Ok(n) => n,
            Err(e) => return proxy.drop_conn(id, &format!("bad TLS server name: {e}")),
        };
        let Some(cfg) = tls_client else {
            return proxy.drop_conn(id, "no TLS client configuration");
        };
        match rustls::ClientConnection::new(cfg, name) {
            Ok(mut c) => {
                c.set_buffer_limit(Some(crate::io::conn::TLS_BUFFER_LIMIT));
                conn.tls = Some(Box::new(rustls::Connection::Client(c)));
            }
            Err(e) => return proxy.drop_conn(id, &format!("TLS client: {e}")),
        }
    }
    let request = upgrade_request(&d.plan.url, &d.plan.key, &d.plan.token);
    d.phase = DialPhase::Upgrading { inbuf: Vec::new() };
    conn.out.extend_from_slice(request.as_bytes());
    proxy.dirty.push(id);
}

/// Bytes on a dialling connection: the answer to our upgrade, then the first frames.
pub fn dial_input(proxy: &mut Proxy, id: ConnId, data: &[u8]) {
    let Some(conn) = proxy.conn_mut(id) else {
        return;
    };
    let peer = conn.peer;
    let ConnState::Dialing(d) = &mut conn.state else {
        return;
    };
    let DialPhase::Upgrading { inbuf } = &mut d.phase else {
        return;
    };
    inbuf.extend_from_slice(data);
    let n = match check_answer(inbuf, &d.plan.key) {
        Ok(None) => return,
        Ok(Some(n)) => n,
        Err(e) => return proxy.drop_conn(id, &e.to_string()),
    };
    let leftover = inbuf.split_off(n);
    let plan = d.plan.clone();
    let opened = proxy
        .fed
        .dial_established(Proxy::link_id(id), &plan, Some(peer));
    let session = match opened {
        Ok(s) => s,
        // The attempt failed (`drop_conn` tells the core, which backs off).
        Err(why) => return proxy.drop_conn(id, why),
    };
    proxy.attach(id, session, tungstenite::protocol::Role::Client);
    proxy.apply();
    if !leftover.is_empty() {
        proxy.ws_input(id, &leftover);
    }
}
