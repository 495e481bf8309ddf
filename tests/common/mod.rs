//! Test harness: start the real `fedmcp` binary on loopback port 0 and talk to it over real
//! sockets, with bounded waits everywhere (no test can hang: every read has a timeout).
#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocket;
use tungstenite::{Message, http::HeaderValue};

pub use fedmcp::proto::jwt::{self, Claims, TokenType};

/// The secret every test proxy is started with (unless a test overrides it).
pub const SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";
/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn now_secs() -> i64 {
    fedmcp::clock::now_secs()
}

/// The `fedmcp` binary the tests run: `FEDMCP_TEST_BIN` when set (e.g. an older build, to
/// show that a test catches what it was written for), else the one cargo built.
pub fn bin() -> PathBuf {
    match std::env::var_os("FEDMCP_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_fedmcp")),
    }
}

pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub secret: String,
    pub stderr: PathBuf,
    pub dir: PathBuf,
}

/// A fresh scratch directory under the target dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("fedmcp-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Proxy {
    /// Starts the proxy with the default test environment plus `env` (later entries win).
    pub fn start(env: &[(&str, &str)]) -> Proxy {
        Self::try_start(env).unwrap_or_else(|e| panic!("proxy did not start: {e}"))
    }

    pub fn try_start(env: &[(&str, &str)]) -> Result<Proxy, String> {
        Self::try_start_unset(env, &[])
    }

    /// Starts the proxy like [`Proxy::start`], but with each variable named in `unset` left
    /// out of its environment (e.g. `FEDMCP_JWT_SECRET`, which the harness otherwise always
    /// sets). `secret` then still holds [`SECRET`]: the caller sets it if it needs to mint.
    pub fn start_unset(env: &[(&str, &str)], unset: &[&str]) -> Proxy {
        Self::try_start_unset(env, unset).unwrap_or_else(|e| panic!("proxy did not start: {e}"))
    }

    pub fn try_start_unset(env: &[(&str, &str)], unset: &[&str]) -> Result<Proxy, String> {
        let dir = scratch_dir("proxy");
        let stderr = dir.join("stderr.log");
        let mut cmd = Command::new(bin());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FEDMCP_LISTEN", "127.0.0.1:0")
            .env("FEDMCP_JWT_SECRET", SECRET)
            .env("FEDMCP_STATE_DIR", "")
            // A memory-only proxy keeps its resources in a private directory under the
            // temporary dir: inside this scratch dir, so it goes when the test's proxy does
            // (a killed proxy cannot remove it itself).
            .env("TMPDIR", &dir)
            .env("RUST_LOG", "info");
        let mut secret = SECRET.to_string();
        for (k, v) in env {
            cmd.env(k, v);
            if *k == "FEDMCP_JWT_SECRET" {
                secret = v.to_string();
            }
        }
        for k in unset {
            cmd.env_remove(k);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .stdin(Stdio::null());
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(WAIT) {
            Ok(l) if !l.is_empty() => l,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no ready line; stderr: {}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                ));
            }
        };
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .ok_or_else(|| format!("bad ready line {line:?}"))?
            .parse()
            .map_err(|e| format!("bad address in {line:?}: {e}"))?;
        Ok(Proxy {
            child,
            addr,
            secret,
            stderr,
            dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// A token signed with the proxy's secret.
    pub fn token_with(&self, server_id: &str, token_type: TokenType, iat: i64, exp: i64) -> String {
        jwt::sign(
            self.secret.as_bytes(),
            &Claims {
                server_id: server_id.into(),
                token_type,
                iat,
                exp,
                nbf: None,
                jti: None,
            },
        )
    }

    pub fn admin_token(&self) -> String {
        let now = now_secs();
        self.token_with("operator", TokenType::Admin, now, now + 3600)
    }

    pub fn federation_token(&self, server_id: &str) -> String {
        let now = now_secs();
        self.token_with(server_id, TokenType::Federation, now, now + 3600)
    }

    /// One HTTP request on a fresh connection (`Connection: close`).
    pub fn http(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Resp {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
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
        let raw = self.raw(req.as_bytes());
        Resp::parse(&raw)
            .unwrap_or_else(|| panic!("unparseable response: {:?}", String::from_utf8_lossy(&raw)))
    }

    /// Sends raw bytes on a fresh connection and reads until EOF (bounded by `WAIT`).
    pub fn raw(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    /// Registers a server with the admin API; returns its federation token.
    pub fn register(&self, server_id: &str) -> String {
        let r = self.http(
            "POST",
            "/v1/servers",
            Some(&self.admin_token()),
            Some(&json!({"serverId": server_id}).to_string()),
        );
        assert!(
            r.status == 201 || r.status == 200,
            "register {server_id}: {} {}",
            r.status,
            r.text()
        );
        r.json()["token"].as_str().unwrap().to_string()
    }

    /// Opens a control session with a bearer token; does not answer the welcome.
    pub fn ws_raw(&self, token: &str) -> Result<Ws, tungstenite::Error> {
        let mut req = format!("ws://{}/v1/control", self.addr).into_client_request()?;
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _) = tungstenite::client::client(req, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
        })?;
        Ok(Ws { ws })
    }

    /// Opens a control session and answers the welcome (with `capabilities`): the server is
    /// online when this returns (checked through `federation/servers`).
    pub fn online(&self, token: &str, capabilities: Value) -> (Ws, Value) {
        let mut ws = self.ws_raw(token).expect("upgrade");
        let welcome = ws.recv();
        assert_eq!(welcome["method"], "federation/welcome", "{welcome}");
        ws.send(&json!({"jsonrpc": "2.0", "id": welcome["id"], "result": {"capabilities": capabilities}}));
        // A round trip proves the welcome answer was processed.
        ws.send(&json!({"jsonrpc": "2.0", "id": "sync", "method": "federation/servers"}));
        let r = ws.recv_id(&json!("sync"));
        assert!(r["result"]["servers"].is_array(), "{r}");
        (ws, welcome)
    }

    /// Sends SIGTERM and waits (bounded) for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        unsafe_kill(self.child.id(), "TERM");
        let start = Instant::now();
        while start.elapsed() < WAIT {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Sends a signal with the `kill` command (no libc binding needed in tests).
pub fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    /// Parses one response (Content-Length bodies, or to the end).
    pub fn parse(raw: &[u8]) -> Option<Resp> {
        Self::parse_one(raw).map(|(r, _)| r)
    }

    /// Parses one response and says how many bytes it took (for pipelining tests).
    pub fn parse_one(raw: &[u8]) -> Option<(Resp, usize)> {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = std::str::from_utf8(&raw[..end]).ok()?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            })
            .collect();
        let len = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let body_end = match len {
            Some(n) => (end + n).min(raw.len()),
            None => raw.len(),
        };
        Some((
            Resp {
                status,
                headers,
                body: raw[end..body_end].to_vec(),
            },
            body_end,
        ))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The contract's error code: `body.error.code`.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

pub struct Ws {
    pub ws: WebSocket<TcpStream>,
}

impl Ws {
    pub fn send(&mut self, v: &Value) {
        self.ws.send(Message::text(v.to_string())).expect("ws send");
    }

    pub fn send_text(&mut self, t: &str) {
        self.ws.send(Message::text(t.to_string())).expect("ws send");
    }

    /// The next text message as JSON (pings and pongs skipped); panics after `WAIT`.
    pub fn recv(&mut self) -> Value {
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < WAIT, "no message within {WAIT:?}");
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(t.as_str()).expect("text frame is JSON");
                }
                Ok(Message::Close(c)) => panic!("closed while waiting for a message: {c:?}"),
                Ok(_) => continue,
                Err(e) => panic!("ws read failed: {e}"),
            }
        }
    }

    /// The next text message's raw text.
    pub fn recv_text(&mut self) -> String {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return t.as_str().to_string(),
                Ok(Message::Close(c)) => panic!("closed while waiting for a message: {c:?}"),
                Ok(_) => continue,
                Err(e) => panic!("ws read failed: {e}"),
            }
        }
    }

    /// Reads until a message whose `id` equals `id` (other messages are dropped).
    pub fn recv_id(&mut self, id: &Value) -> Value {
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < WAIT, "no answer to {id} within {WAIT:?}");
            let m = self.recv();
            if &m["id"] == id && m.get("method").is_none() {
                return m;
            }
        }
    }

    /// Reads until a message with `method` (others dropped).
    pub fn recv_method(&mut self, method: &str) -> Value {
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < WAIT, "no {method} within {WAIT:?}");
            let m = self.recv();
            if m["method"] == method {
                return m;
            }
        }
    }

    /// Reads until the close frame; returns its code (None if the socket just ended).
    pub fn recv_close(&mut self) -> Option<u16> {
        let start = Instant::now();
        while start.elapsed() < WAIT {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return Some(f.code.into()),
                Ok(Message::Close(None)) => return None,
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        panic!("no close within {WAIT:?}");
    }

    /// Answers a `federation/deliver` request with `result`.
    pub fn answer(&mut self, deliver: &Value, result: Value) {
        self.send(&json!({"jsonrpc": "2.0", "id": deliver["id"], "result": result}));
    }
}

/// A manual WebSocket upgrade of `GET /v1/control` with `token` on a plain socket (for tests
/// that write frames by hand): returns the socket (reads time out after `read_timeout`) and
/// any bytes that came after the `101` head. Panics unless the answer is `101`.
pub fn raw_upgrade(p: &Proxy, token: &str, read_timeout: Duration) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(read_timeout)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    let req = format!(
        "GET /v1/control HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let t0 = Instant::now();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(t0.elapsed() < WAIT, "no upgrade answer within {WAIT:?}");
        match s.read(&mut chunk) {
            Ok(0) => panic!("EOF before the upgrade answer: {buf:?}"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read failed before the upgrade answer: {e}"),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    buf.drain(..end);
    (s, buf)
}
