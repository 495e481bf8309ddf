//! Shared plumbing for the benchmarks: starting the release proxy, registering servers,
//! a minimal WebSocket client (RFC 6455 framing over plain sockets, no allocation per frame
//! beyond the caller's buffers), and process statistics from `/proc`.
//!
//! Nothing here depends on the proxy's internals except `fedmcp::proto::jwt` for admin tokens.
#![allow(dead_code)]

use base64::Engine;
use fedmcp::proto::jwt::{self, Claims, TokenType};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Secret the benchmarks start the proxy with (and sign admin tokens with).
pub const BENCH_SECRET: &str = "bench-secret-0123456789-abcdefghijklmnopqrst";

/// Upper bound on any blocking wait during setup.
pub const SETUP_WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Options: `--name=value`, `--name value`, or the environment variable `PREFIX_NAME`.
// ---------------------------------------------------------------------------------------------

pub struct Opts {
    args: Vec<String>,
    prefix: &'static str,
}

impl Opts {
    pub fn new(prefix: &'static str) -> Opts {
        Opts {
            args: std::env::args().skip(1).collect(),
            prefix,
        }
    }

    /// The raw value of option `name` (`--name`, env `PREFIX_NAME` with `-` as `_`).
    pub fn get(&self, name: &str) -> Option<String> {
        let flag = format!("--{name}");
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if let Some(v) = a.strip_prefix(&flag) {
                if let Some(v) = v.strip_prefix('=') {
                    return Some(v.to_string());
                }
                if v.is_empty() {
                    return it.next().cloned();
                }
            }
        }
        let env = format!(
            "{}_{}",
            self.prefix,
            name.to_ascii_uppercase().replace('-', "_")
        );
        std::env::var(env).ok().filter(|v| !v.is_empty())
    }

    pub fn parse<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("bad value {v:?} for --{name}");
                std::process::exit(2)
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy process.
// ---------------------------------------------------------------------------------------------

pub struct ProxyProc {
    pub child: Option<Child>,
    pub pid: u32,
    pub addr: SocketAddr,
    pub secret: String,
    pub stderr: Option<PathBuf>,
}

/// The proxy binary: `FEDMCP_BENCH_BIN`, else the one cargo built for this bench profile.
pub fn proxy_bin() -> PathBuf {
    std::env::var_os("FEDMCP_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fedmcp")))
}

impl ProxyProc {
    /// Starts the proxy on a free loopback port, memory-only state, with `env` on top of the
    /// defaults; waits for its `listening on` line.
    pub fn spawn(env: &[(&str, String)]) -> ProxyProc {
        let bin = proxy_bin();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let stderr = std::env::temp_dir().join(format!(
            "fedmcp-bench-{}-{nanos}.stderr",
            std::process::id()
        ));
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FEDMCP_LISTEN", "127.0.0.1:0")
            .env("FEDMCP_JWT_SECRET", BENCH_SECRET)
            .env("FEDMCP_STATE_DIR", "")
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(&stderr).expect("create stderr file"),
            ));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("stdout piped");
        let line = first_line(stdout, SETUP_WAIT);
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "proxy did not start (line {line:?}); stderr: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        ProxyProc {
            pid: child.id(),
            child: Some(child),
            addr,
            secret: BENCH_SECRET.to_string(),
            stderr: Some(stderr),
        }
    }

    /// A proxy somebody else started: `addr`, its pid if known, its secret.
    pub fn external(addr: SocketAddr, pid: u32, secret: String) -> ProxyProc {
        ProxyProc {
            child: None,
            pid,
            addr,
            secret,
            stderr: None,
        }
    }

    pub fn stderr_tail(&self, lines: usize) -> String {
        let Some(p) = &self.stderr else {
            return String::new();
        };
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    pub fn admin_token(&self) -> String {
        let now = fedmcp::clock::now_secs();
        jwt::sign(
            self.secret.as_bytes(),
            &Claims {
                server_id: "bench-operator".into(),
                token_type: TokenType::Admin,
                iat: now,
                exp: now + 3600,
                nbf: None,
                jti: None,
            },
        )
    }

    /// Registers `server_id`; returns its federation token.
    pub fn register(&self, admin: &str, server_id: &str) -> String {
        let body = format!("{{\"serverId\":\"{server_id}\"}}");
        let (status, resp) = http(self.addr, "POST", "/v1/servers", Some(admin), Some(&body))
            .unwrap_or_else(|e| panic!("register {server_id}: {e}"));
        assert!(
            status == 200 || status == 201,
            "register {server_id}: {status} {resp}"
        );
        let v: serde_json::Value = serde_json::from_str(&resp).expect("register answer is JSON");
        v["token"]
            .as_str()
            .expect("register answer has a token")
            .to_string()
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(p) = &self.stderr {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Finds the pid of the process listening on `addr` (for `--addr` runs without `--pid`):
/// the socket's inode in `/proc/net/tcp`, then the process holding it. `None` if not found.
pub fn pid_listening_on(addr: SocketAddr) -> Option<u32> {
    let port = format!(":{:04X}", addr.port());
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // local_address, st == 0A (LISTEN), inode is field 9.
        (f.len() > 9 && f[1].ends_with(&port) && f[3] == "0A").then(|| f[9].to_string())
    })?;
    let target = format!("socket:[{inode}]");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                return Some(pid);
            }
        }
    }
    None
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`): status and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(SETUP_WAIT))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad HTTP answer {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// One sample of the proxy's `/metrics`, by its exact series name (labels included), e.g.
/// `fedmcp_messages_total{result="delivered"}`.
pub fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let (status, body) = http(addr, "GET", "/metrics", None, None).ok()?;
    if status != 200 {
        return None;
    }
    body.lines().find_map(|l| {
        let v = l.strip_prefix(series)?.strip_prefix(' ')?;
        v.trim().parse().ok()
    })
}

// ---------------------------------------------------------------------------------------------
// WebSocket client framing.
// ---------------------------------------------------------------------------------------------

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A small xorshift generator for masking keys (RFC 6455 wants them unpredictable to
/// intermediaries; this is a benchmark client on loopback).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng::new(t ^ ((std::process::id() as u64) << 32))
    }

    pub fn next_u32(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 16) as u32
    }
}

/// Appends one masked client frame (FIN set) holding `payload` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: u32) {
    encode_frame_parts(out, opcode, &[payload], mask);
}

/// Appends one masked client frame (FIN set) whose payload is the concatenation of `parts`
/// (so a message can be framed from a template without first being assembled).
pub fn encode_frame_parts(out: &mut Vec<u8>, opcode: u8, parts: &[&[u8]], mask: u32) {
    out.push(0x80 | opcode);
    let n: usize = parts.iter().map(|p| p.len()).sum();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let m = mask.to_be_bytes();
    out.extend_from_slice(&m);
    let start = out.len();
    for p in parts {
        out.extend_from_slice(p);
    }
    let body = &mut out[start..];
    let m8 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = body.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ m8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// A server frame found at the start of a buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef {
    pub fin: bool,
    pub opcode: u8,
    /// Payload range in the buffer given to [`decode_frame`].
    pub start: usize,
    pub end: usize,
}

/// Decodes the frame at the start of `buf`: `Ok(None)` when incomplete. Server frames are
/// unmasked; a masked one is an error.
pub fn decode_frame(buf: &[u8]) -> Result<Option<FrameRef>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    if buf[1] & 0x80 != 0 {
        return Err("masked frame from the server");
    }
    let (len, hdr) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < hdr + len {
        return Ok(None);
    }
    Ok(Some(FrameRef {
        fin,
        opcode,
        start: hdr,
        end: hdr + len,
    }))
}

/// A control session opened with blocking I/O: the socket, bytes already read past the
/// handshake, and the welcome request's id (answered).
pub struct Session {
    pub sock: TcpStream,
    pub rbuf: Vec<u8>,
    pub rng: Rng,
}

impl Session {
    /// Upgrades `GET /v1/control` with `token`; does not read the welcome.
    pub fn connect(addr: SocketAddr, token: &str, rng_seed: u64) -> io::Result<Session> {
        Session::connect_path(addr, "/v1/control", token, rng_seed)
    }

    /// Upgrades `GET path` with `token` (e.g. `/mcp` for the MCP facade's WebSocket).
    pub fn connect_path(
        addr: SocketAddr,
        path: &str,
        token: &str,
        rng_seed: u64,
    ) -> io::Result<Session> {
        let sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(SETUP_WAIT))?;
        let mut rng = Rng::new(rng_seed);
        let mut key = [0u8; 16];
        for c in key.chunks_mut(4) {
            c.copy_from_slice(&rng.next_u32().to_ne_bytes());
        }
        let key = base64::engine::general_purpose::STANDARD.encode(key);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        let mut s = Session {
            sock,
            rbuf: Vec::with_capacity(4096),
            rng,
        };
        s.sock.write_all(req.as_bytes())?;
        let end = loop {
            if let Some(p) = s.rbuf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if s.rbuf.len() > 16 * 1024 || s.fill()? == 0 {
                return Err(io::Error::other("no upgrade answer"));
            }
        };
        let head = String::from_utf8_lossy(&s.rbuf[..end]).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(io::Error::other(format!("upgrade refused: {head:?}")));
        }
        s.rbuf.drain(..end);
        Ok(s)
    }

    /// Connects and answers the welcome; the server is online once the proxy reads that
    /// answer (see [`Session::sync`]).
    pub fn open(addr: SocketAddr, token: &str, rng_seed: u64) -> io::Result<Session> {
        let mut s = Session::connect(addr, token, rng_seed)?;
        let welcome = s.recv_text()?;
        if !welcome.contains("\"federation/welcome\"") {
            return Err(io::Error::other(format!(
                "first message is not the welcome: {welcome}"
            )));
        }
        let v: serde_json::Value = serde_json::from_str(&welcome).map_err(io::Error::other)?;
        let answer = format!("{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{{}}}}", v["id"]);
        s.send_text(&answer)?;
        Ok(s)
    }

    /// A request the proxy answers at once (an unknown method: `-32601`), read back: every
    /// message sent before it, the welcome answer included, has been processed.
    pub fn sync(&mut self) -> io::Result<()> {
        self.send_text("{\"jsonrpc\":\"2.0\",\"id\":\"bench-sync\",\"method\":\"bench/sync\"}")?;
        let start = Instant::now();
        while start.elapsed() < SETUP_WAIT {
            let m = self.recv_text()?;
            if m.contains("\"bench-sync\"") {
                return Ok(());
            }
        }
        Err(io::Error::other("no answer to the sync request"))
    }

    pub fn send_text(&mut self, text: &str) -> io::Result<()> {
        let mut f = Vec::with_capacity(text.len() + 14);
        let mask = self.rng.next_u32();
        encode_frame(&mut f, OP_TEXT, text.as_bytes(), mask);
        self.sock.write_all(&f)
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.sock.read(&mut chunk)?;
        self.rbuf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next text message (pings answered, pongs skipped); blocking, bounded by the
    /// socket's read timeout.
    pub fn recv_text(&mut self) -> io::Result<String> {
        loop {
            match decode_frame(&self.rbuf).map_err(io::Error::other)? {
                Some(f) => {
                    let payload = self.rbuf[f.start..f.end].to_vec();
                    self.rbuf.drain(..f.end);
                    match f.opcode {
                        OP_TEXT if f.fin => {
                            return String::from_utf8(payload).map_err(io::Error::other);
                        }
                        OP_PING => {
                            let mut out = Vec::new();
                            let mask = self.rng.next_u32();
                            encode_frame(&mut out, OP_PONG, &payload, mask);
                            self.sock.write_all(&out)?;
                        }
                        OP_PONG => {}
                        OP_CLOSE => {
                            let code = (payload.len() >= 2)
                                .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                            return Err(io::Error::other(format!(
                                "closed by the proxy, code {code:?}"
                            )));
                        }
                        op => {
                            return Err(io::Error::other(format!(
                                "unexpected frame opcode {op} (fin {})",
                                f.fin
                            )));
                        }
                    }
                }
                None => {
                    if self.fill()? == 0 {
                        return Err(io::Error::other("connection closed"));
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc statistics.
// ---------------------------------------------------------------------------------------------

/// Clock ticks per second for `/proc/<pid>/stat` times (`getconf CLK_TCK`, else 100).
pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads), in clock ticks. `pid` 0 means this process.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    cpu_ticks_split(pid).map(|(u, s)| u + s)
}

/// (utime, stime) of a process (all its threads), in clock ticks. `pid` 0: this process.
pub fn cpu_ticks_split(pid: u32) -> Option<(u64, u64)> {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let s = std::fs::read_to_string(path).ok()?;
    // Fields after the `(comm)`, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// Machine load (1-minute average), for the summary line.
pub fn loadavg1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

/// The first line a child process prints on `stdout` (its address), or "" after `within`.
pub fn first_line(stdout: std::process::ChildStdout, within: Duration) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(within).unwrap_or_default()
}
