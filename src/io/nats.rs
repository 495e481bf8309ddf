//! The cluster's NATS connection, on the reactor's side (contract §10).
//!
//! Owns one non-blocking TCP socket (TLS after the server's `INFO` for `tls://` URLs or a
//! server that requires it), its input and output buffers, the handshake (`INFO`, `CONNECT`,
//! `PING`/`PONG`), keep-alive pings, and reconnection: every URL of `FEDMCP_NATS_URL` and the
//! servers' `connect_urls` in turn, with a backoff that grows after each full round. It hands
//! every message to the core (`Federation::nats_message`) and writes what the core asks
//! (`Action::Nats`); it makes no cluster decision of its own.
//!
//! Bounds: input is parsed op by op with `proto::nats` limits; output past
//! [`OUT_SOFT_LIMIT`] makes the core refuse new remote sends (`recipient_overloaded`), past
//! [`OUT_HARD_LIMIT`] the connection is dropped (and re-made), so a slow NATS link never
//! costs unbounded memory. It never blocks (names that are not IP literals are resolved by
//! the dialler's resolver thread) and never logs a credential (URLs are shown without one).

use crate::config::{NatsUrl, parse_nats_url};
use crate::io::proxy::Proxy;
use crate::proto::nats::{self, ConnectOpts, Limits, ServerOp};
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The NATS connection's token in the poll.
pub const NATS: Token = Token(usize::MAX - 3);
/// Lookups of NATS host names carry ids from here (the dialler's are below).
pub use crate::io::dial::NATS_LOOKUP_BASE as LOOKUP_BASE;

/// Connect, `INFO`, TLS and the first `PONG` must fit in this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive: a `PING` this often; two unanswered and the link is dead.
const PING_INTERVAL: Duration = Duration::from_secs(5);
const MAX_PINGS_OUT: u32 = 2;
/// Reconnection delay: from this, doubling after each round of every URL, up to the max.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
pub use crate::federation::cluster::NATS_SOFT_LIMIT as OUT_SOFT_LIMIT;
/// Unsent bytes over which the link is dropped and made again.
pub const OUT_HARD_LIMIT: usize = 64 * 1024 * 1024;
/// URLs remembered (configured plus discovered).
const MAX_URLS: usize = 64;
/// Bytes read per call.
const READ_CHUNK: usize = 64 * 1024;

enum Phase {
    /// Waiting to try the next URL.
    Idle { retry_at: Instant },
    /// The URL's host is being resolved by the resolver thread.
    Resolving { lookup: u64, deadline: Instant },
    /// A socket: handshaking or live.
    Open(Box<Open>),
}

#[derive(PartialEq, Eq, Debug)]
enum Stage {
    AwaitInfo,
    AwaitPong,
    Live,
}

struct Open {
    sock: TcpStream,
    tls: Option<rustls::ClientConnection>,
    stage: Stage,
    inbuf: Vec<u8>,
    /// Plain bytes not yet handed to the socket (or to TLS).
    out: Vec<u8>,
    deadline: Instant,
    next_ping: Instant,
    pings_out: u32,
    url: usize,
}

pub struct NatsLink {
    urls: Vec<NatsUrl>,
    next: usize,
    attempt: u32,
    phase: Phase,
    name: String,
    tls_cfg: Option<Arc<rustls::ClientConfig>>,
    trusted_ca: Option<std::path::PathBuf>,
    lookups: u64,
    limits: Limits,
    /// A name for the reactor to resolve (through the dialler's resolver thread): the
    /// answer comes back through [`on_resolved`].
    pub resolve: Option<(u64, String, u16)>,
}

fn jitter(d: Duration) -> Duration {
    let r = crate::random::random_bytes::<2>();
    let f = 0.8 + 0.4 * (u16::from_le_bytes(r) as f64 / 65535.0);
    d.mul_f64(f)
}

impl NatsLink {
    pub fn new(
        cfg: &crate::config::ClusterConfig,
        node: &str,
        max_message_bytes: usize,
        trusted_ca: Option<std::path::PathBuf>,
        now: Instant,
    ) -> NatsLink {
        NatsLink {
            urls: cfg.urls.clone(),
            next: 0,
            attempt: 0,
            phase: Phase::Idle { retry_at: now },
            name: format!("fedmcp-{}-{node}", cfg.name),
            tls_cfg: None,
            trusted_ca,
            lookups: 0,
            resolve: None,
            limits: Limits {
                max_control_line: 4096,
                // A delivery is at most a message of the contract's size, with its envelope.
                max_payload: max_message_bytes * 2 + 65_536,
            },
        }
    }

    pub fn is_live(&self) -> bool {
        matches!(&self.phase, Phase::Open(o) if o.stage == Stage::Live)
    }

    /// Plain bytes waiting to be written.
    pub fn unsent(&self) -> usize {
        match &self.phase {
            Phase::Open(o) => o.out.len(),
            _ => 0,
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Idle { retry_at } => Some(*retry_at),
            Phase::Resolving { deadline, .. } => Some(*deadline),
            Phase::Open(o) if o.stage == Stage::Live => Some(o.next_ping),
            Phase::Open(o) => Some(o.deadline),
        }
    }

    /// Writes what the core asked (only on a live link: otherwise the core knows it is down).
    /// Takes what the core asked since the last call (`Proxy::nats_out`).
    pub fn take(&mut self, proxy: &mut Proxy) {
        for out in proxy.nats_out.drain(..) {
            Self::write(&mut self.phase, out);
        }
    }

    fn write(phase: &mut Phase, out: crate::federation::action::NatsOut) {
        use crate::federation::action::NatsOut;
        let Phase::Open(o) = phase else {
            return;
        };
        if o.stage != Stage::Live {
            return;
        }
        match out {
            NatsOut::Subscribe { sid, subject } => nats::subscribe(&mut o.out, &subject, None, sid),
            NatsOut::Unsubscribe { sid } => nats::unsubscribe(&mut o.out, sid, None),
            NatsOut::Publish {
                subject,
                reply,
                payload,
            } => nats::publish(&mut o.out, &subject, reply.as_deref(), &payload),
        }
    }

    fn backoff(&self) -> Duration {
        let rounds = self.attempt / (self.urls.len().max(1) as u32);
        jitter(
            BACKOFF_MIN
                .saturating_mul(1 << rounds.min(5))
                .min(BACKOFF_MAX),
        )
    }
}

/// The loop's turn for the link: start an attempt when due, check deadlines, write output.
pub fn turn(link: &mut NatsLink, proxy: &mut Proxy, registry: &mio::Registry) {
    let now = proxy.fed.now.at;
    match &mut link.phase {
        Phase::Idle { retry_at } if now >= *retry_at && proxy.fed.draining.is_none() => {
            start(link, proxy, registry);
        }
        Phase::Resolving { deadline, .. } if now >= *deadline => {
            fail(link, proxy, registry, "name resolution timed out");
        }
        Phase::Open(o) if o.stage != Stage::Live && now >= o.deadline => {
            fail(link, proxy, registry, "handshake timed out");
        }
        Phase::Open(o) if o.stage == Stage::Live && now >= o.next_ping => {
            if o.pings_out >= MAX_PINGS_OUT {
                fail(link, proxy, registry, "no PONG to keep-alive pings");
            } else {
                o.pings_out += 1;
                o.next_ping = now + PING_INTERVAL;
                nats::ping(&mut o.out);
            }
        }
        _ => {}
    }
    flush(link, proxy, registry);
}

fn start(link: &mut NatsLink, proxy: &mut Proxy, registry: &mio::Registry) {
    let now = proxy.fed.now.at;
    if link.urls.is_empty() {
        return;
    }
    let i = link.next % link.urls.len();
    let url = link.urls[i].clone();
    let ip = if url.host.eq_ignore_ascii_case("localhost") {
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        url.host.parse::<IpAddr>().ok()
    };
    match ip {
        Some(ip) => connect(link, proxy, registry, SocketAddr::new(ip, url.port)),
        None => {
            link.lookups += 1;
            let lookup = LOOKUP_BASE + link.lookups;
            link.phase = Phase::Resolving {
                lookup,
                deadline: now + HANDSHAKE_TIMEOUT,
            };
            link.resolve = Some((lookup, url.host.clone(), url.port));
        }
    }
}

/// The resolver answered a NATS lookup.
pub fn on_resolved(
    link: &mut NatsLink,
    proxy: &mut Proxy,
    registry: &mio::Registry,
    lookup: u64,
    r: Result<Vec<SocketAddr>, String>,
) {
    if !matches!(link.phase, Phase::Resolving { lookup: l, .. } if l == lookup) {
        return;
    }
    match r {
        Ok(addrs) if !addrs.is_empty() => connect(link, proxy, registry, addrs[0]),
        Ok(_) => fail(link, proxy, registry, "the name has no address"),
        Err(e) => fail(
            link,
            proxy,
            registry,
            &format!("name resolution failed: {e}"),
        ),
    }
}

fn connect(link: &mut NatsLink, proxy: &mut Proxy, registry: &mio::Registry, addr: SocketAddr) {
    let now = proxy.fed.now.at;
    let url = link.next % link.urls.len().max(1);
    let mut sock = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => return fail(link, proxy, registry, &format!("connect failed: {e}")),
    };
    if let Err(e) = registry.register(&mut sock, NATS, Interest::READABLE | Interest::WRITABLE) {
        return fail(link, proxy, registry, &format!("register failed: {e}"));
    }
    let _ = sock.set_nodelay(true);
    link.phase = Phase::Open(Box::new(Open {
        sock,
        tls: None,
        stage: Stage::AwaitInfo,
        inbuf: Vec::new(),
        out: Vec::new(),
        deadline: now + HANDSHAKE_TIMEOUT,
        next_ping: now + PING_INTERVAL,
        pings_out: 0,
        url,
    }));
}

/// The attempt (or the live link) failed: close, tell the core, try the next URL later.
fn fail(link: &mut NatsLink, proxy: &mut Proxy, registry: &mio::Registry, why: &str) {
    let now = proxy.fed.now.at;
    let was_live = link.is_live();
    let shown = link
        .urls
        .get(link.next % link.urls.len().max(1))
        .map(|u| u.to_string())
        .unwrap_or_default();
    if let Phase::Open(o) = &mut link.phase {
        let _ = registry.deregister(&mut o.sock);
    }
    link.attempt = link.attempt.saturating_add(1);
    link.next = link.next.wrapping_add(1);
    let delay = link.backoff();
    link.phase = Phase::Idle {
        retry_at: now + delay,
    };
    if was_live {
        log::warn!("NATS connection to {shown} lost: {why}");
        proxy.fed.nats_lost(why);
        proxy.apply();
    } else {
        log::info!("NATS: cannot connect to {shown}: {why}; next attempt in {delay:?}");
    }
}

/// The socket is readable or writable.
pub fn on_ready(link: &mut NatsLink, proxy: &mut Proxy, registry: &mio::Registry, readable: bool) {
    if readable {
        read(link, proxy, registry);
    }
    flush(link, proxy, registry);
}

fn read(link: &mut NatsLink, proxy: &mut Proxy, registry: &mio::Registry) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let Some(Phase::Open(o)) = Some(&mut link.phase) else {
            return;
        };
        let got = match o.tls.as_mut() {
            None => match o.sock.read(&mut buf) {
                Ok(0) => Err("closed by the server".to_string()),
                Ok(n) => {
                    o.inbuf.extend_from_slice(&buf[..n]);
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
                Err(e) => Err(format!("read failed: {e}")),
            },
            Some(tls) => match tls.read_tls(&mut o.sock) {
                Ok(0) => Err("closed by the server".to_string()),
                Ok(_) => match tls.process_new_packets() {
                    Ok(_) => {
                        loop {
                            match tls.reader().read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => o.inbuf.extend_from_slice(&buf[..n]),
                                Err(_) => break,
                            }
                        }
                        Ok(true)
                    }
                    Err(e) => Err(format!("TLS: {e}")),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
                Err(e) => Err(format!("read failed: {e}")),
            },
        };
        match got {
            Err(why) => return fail(link, proxy, registry, &why),
            Ok(more) => {
                if let Err(why) = process(link, proxy) {
                    return fail(link, proxy, registry, &why);
                }
                if !more {
                    return;
                }
            }
        }
    }
}

/// Parses and handles every complete op in the input.
fn process(link: &mut NatsLink, proxy: &mut Proxy) -> Result<(), String> {
    loop {
        let limits = link.limits;
        let Phase::Open(o) = &mut link.phase else {
            return Ok(());
        };
        let (op, used) = match nats::parse(&o.inbuf, &limits) {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("protocol error from the server: {e}")),
        };
        o.inbuf.drain(..used);
        match op {
            ServerOp::Info(info) => on_info(link, info)?,
            ServerOp::Ping => {
                if let Some(Phase::Open(o)) = Some(&mut link.phase) {
                    nats::pong(&mut o.out);
                }
            }
            ServerOp::Pong => {
                let Phase::Open(o) = &mut link.phase else {
                    return Ok(());
                };
                o.pings_out = 0;
                if o.stage == Stage::AwaitPong {
                    o.stage = Stage::Live;
                    link.attempt = 0;
                    let shown = link
                        .urls
                        .get(o.url)
                        .map(|u| u.to_string())
                        .unwrap_or_default();
                    log::info!("NATS: connected to {shown}");
                    // Nothing asked while the link was down goes out on the new one.
                    proxy.nats_out.clear();
                    proxy.fed.nats_connected();
                    proxy.apply();
                }
            }
            ServerOp::Ok => {}
            ServerOp::Err(text) => {
                let live = link.is_live();
                let fatal = !live
                    || !(text.to_ascii_lowercase().contains("permissions violation")
                        || text.to_ascii_lowercase().contains("invalid subject"));
                log::warn!("NATS server error: {text}");
                if fatal {
                    return Err(format!("server error: {text}"));
                }
            }
            ServerOp::Msg(m) => {
                proxy
                    .fed
                    .nats_message(m.sid, &m.subject, m.reply.as_deref(), m.status, &m.payload);
                proxy.apply();
            }
        }
    }
}

fn on_info(link: &mut NatsLink, info: nats::Info) -> Result<(), String> {
    // Servers the cluster announces are tried too (after the configured ones).
    let tls_scheme = link.urls.first().is_some_and(|u| u.tls);
    for u in info.connect_urls.iter().take(MAX_URLS) {
        let with_scheme = format!("{}://{u}", if tls_scheme { "tls" } else { "nats" });
        if let Ok(mut parsed) = parse_nats_url(&with_scheme) {
            // The configured credential goes with the discovered servers of the same cluster.
            if let Some(first) = link.urls.first() {
                parsed.user = first.user.clone();
                parsed.token = first.token.clone();
            }
            if link.urls.len() < MAX_URLS
                && !link
                    .urls
                    .iter()
                    .any(|x| x.host == parsed.host && x.port == parsed.port)
            {
                link.urls.push(parsed);
            }
        }
    }
    let Phase::Open(o) = &mut link.phase else {
        return Ok(());
    };
    if o.stage != Stage::AwaitInfo {
        return Ok(());
    }
    let url = link.urls.get(o.url).cloned().ok_or("no URL")?;
    if url.tls || info.tls_required {
        if link.tls_cfg.is_none() {
            let cfg = crate::io::tls::client_config(link.trusted_ca.as_deref())?;
            let mut cfg = (*cfg).clone();
            cfg.alpn_protocols.clear();
            link.tls_cfg = Some(Arc::new(cfg));
        }
        let cfg = link.tls_cfg.clone().ok_or("no TLS configuration")?;
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| format!("TLS server name: {e}"))?;
        let tls = rustls::ClientConnection::new(cfg, name).map_err(|e| format!("TLS: {e}"))?;
        o.tls = Some(tls);
    }
    let (user, pass) = match &url.user {
        Some((u, p)) => (Some(u.as_str()), Some(p.as_str())),
        None => (None, None),
    };
    nats::connect(
        &mut o.out,
        &ConnectOpts {
            name: &link.name,
            user,
            pass,
            auth_token: url.token.as_deref(),
            tls_required: o.tls.is_some(),
        },
    );
    nats::ping(&mut o.out);
    o.stage = Stage::AwaitPong;
    Ok(())
}

/// Writes owed output until the socket would block.
pub fn flush(link: &mut NatsLink, proxy: &mut Proxy, registry: &mio::Registry) {
    link.take(proxy);
    let Phase::Open(o) = &mut link.phase else {
        return;
    };
    let r: Result<(), String> = (|| {
        if o.out.len() > OUT_HARD_LIMIT {
            return Err(format!(
                "over {OUT_HARD_LIMIT} bytes unsent: the NATS link is too slow"
            ));
        }
        match o.tls.as_mut() {
            None => {
                while !o.out.is_empty() {
                    match o.sock.write(&o.out) {
                        Ok(0) => return Err("write returned 0".into()),
                        Ok(n) => {
                            o.out.drain(..n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("write failed: {e}")),
                    }
                }
            }
            Some(tls) => {
                if !o.out.is_empty() {
                    // rustls buffers plaintext until the handshake is done.
                    let n = tls
                        .writer()
                        .write(&o.out)
                        .map_err(|e| format!("TLS: {e}"))?;
                    o.out.drain(..n);
                }
                while tls.wants_write() {
                    match tls.write_tls(&mut o.sock) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("write failed: {e}")),
                    }
                }
            }
        }
        Ok(())
    })();
    let unsent = o.out.len();
    proxy.fed.nats_unsent = unsent;
    if let Err(why) = r {
        fail(link, proxy, registry, &why);
    }
}
