//! What the client commands of `fedmcp` share: their arguments, their exit codes, the proxy
//! they talk to (`--url`/`FEDMCP_URL`, `--token`/`FEDMCP_TOKEN`), and HTTP exchanges with it
//! on the project's own client connection (`fedmcp::client::open`), bodies streamed both ways.
//!
//! Invariants: a command ends with one of the codes of [`Exit`] (0 on success) and a failure
//! is one line on stderr (control characters in it are replaced); nothing is read past a
//! bound (a response head [`MAX_HEAD_BYTES`], a JSON answer [`MAX_JSON_BYTES`], a chunk-size
//! line [`MAX_LINE_BYTES`]); every wait on the proxy has a socket timeout. It never reads a
//! clock, never prints the token, and never panics on an argument, a variable or an answer.

use fedmcp::client::{self, Stream};
use fedmcp::proto::upgrade::ControlUrl;
use serde_json::value::RawValue;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::sync::Arc;
use std::time::Duration;

/// The proxy when neither `--url` nor `FEDMCP_URL` names one.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8443";
/// The largest response head taken from the proxy.
pub const MAX_HEAD_BYTES: u64 = 64 * 1024;
/// The largest JSON answer taken from the proxy (a listing of a full registry fits).
pub const MAX_JSON_BYTES: u64 = 64 * 1024 * 1024;
/// The longest chunk-size or trailer line of a chunked answer.
pub const MAX_LINE_BYTES: u64 = 4096;
/// How long an upload waits for `100 Continue` before it sends its body anyway.
pub const CONTINUE_WAIT: Duration = Duration::from_secs(2);
/// Bytes moved per read or write of a streamed body.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Above this size a transfer shows its progress (when stderr is a terminal).
pub const PROGRESS_FROM_BYTES: u64 = 1024 * 1024;

/// The exit codes, the same for every client command (`usage_tail!` says them to people).
#[derive(Debug)]
pub enum Exit {
    /// 1: the proxy answered, and the operation failed (its code and message).
    Failed(String),
    /// 2: a bad flag, argument or variable; nothing was sent.
    Usage(String),
    /// 3: the proxy could not be reached (connection, TLS, timeout, a cut-off answer).
    Unreachable(String),
    /// 4: the proxy refused the token (`401`/`403`, or a session closed for it).
    Refused(String),
    /// 0 with nothing said: stdout was closed by its reader (`| head -1`); stop.
    Quiet,
}

/// The end of every client command's `--help`: the options they all take, then the exit
/// codes (a macro, so that each usage text is one `concat!`ed constant).
macro_rules! usage_tail {
    () => {
        concat!(
            "Common options:\n",
            "  --url URL      the proxy: http://HOST[:PORT] or https://HOST[:PORT] (default\n",
            "                 FEDMCP_URL, else http://127.0.0.1:8443); https is verified against\n",
            "                 FEDMCP_TRUSTED_CA_FILE, else the bundled roots\n",
            "  --token TOKEN  the token to present (default FEDMCP_TOKEN)\n",
            "  -h, --help     print this text\n",
            "\n",
            "Exit codes: 0 success; 1 the proxy answered that the operation failed (its error\n",
            "code and message on stderr); 2 a bad flag, argument or variable; 3 the proxy could\n",
            "not be reached (connection refused, TLS failure, timeout); 4 the proxy refused the\n",
            "token (401/403)."
        )
    };
}
pub(crate) use usage_tail;

impl Exit {
    pub fn code(&self) -> u8 {
        match self {
            Exit::Quiet => 0,
            Exit::Failed(_) => 1,
            Exit::Usage(_) => 2,
            Exit::Unreachable(_) => 3,
            Exit::Refused(_) => 4,
        }
    }

    /// Says the failure on stderr, one line; the exit code.
    pub fn report(&self) -> u8 {
        match self {
            Exit::Quiet => {}
            Exit::Failed(m) | Exit::Usage(m) | Exit::Unreachable(m) | Exit::Refused(m) => {
                eprintln!("{}", one_line(m));
            }
        }
        self.code()
    }
}

pub type Outcome = Result<(), Exit>;

/// `text` with every control character (a newline too) replaced by a space.
pub fn one_line(text: &str) -> String {
    text.trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// What a command accepts.
pub struct Spec {
    /// `send`, `servers add`, ...: how its errors begin (`fedmcp send: ...`).
    pub cmd: &'static str,
    pub usage: &'static str,
    /// Options that take a value (`--url` and `--token` are always taken).
    pub values: &'static [&'static str],
    /// Options that take none.
    pub switches: &'static [&'static str],
}

/// Parsed arguments: options (the last of a repeated one wins) and positional arguments.
pub struct Args {
    values: Vec<(&'static str, String)>,
    switches: Vec<&'static str>,
    pub positional: Vec<String>,
}

impl Args {
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn switch(&self, name: &str) -> bool {
        self.switches.contains(&name)
    }
}

impl Spec {
    pub fn usage_error(&self, what: &str) -> Exit {
        Exit::Usage(format!(
            "fedmcp {}: {what}; see fedmcp {} --help",
            self.cmd, self.cmd
        ))
    }

    /// Parses `args`; `None` when `-h`/`--help` was asked for (the usage is then printed on
    /// stdout). `--opt=value` is taken as `--opt value`; `--` ends the options; `-` alone is
    /// a positional argument (stdin).
    pub fn parse(&self, args: &[String]) -> Result<Option<Args>, Exit> {
        let mut out = Args {
            values: Vec::new(),
            switches: Vec::new(),
            positional: Vec::new(),
        };
        let mut it = args.iter();
        let mut options_ended = false;
        while let Some(a) = it.next() {
            if options_ended || a == "-" || !a.starts_with('-') {
                out.positional.push(a.clone());
                continue;
            }
            if a == "--" {
                options_ended = true;
                continue;
            }
            if a == "-h" || a == "--help" {
                println!("{}", self.usage);
                return Ok(None);
            }
            let (name, inline) = match a.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (a.as_str(), None),
            };
            if let Some(&known) = ["--url", "--token"]
                .iter()
                .chain(self.values)
                .find(|v| **v == name)
            {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| self.usage_error(&format!("{known} needs a value")))?,
                };
                out.values.push((known, v));
            } else if let Some(&known) = self.switches.iter().find(|s| **s == name) {
                if inline.is_some() {
                    return Err(self.usage_error(&format!("{known} takes no value")));
                }
                out.switches.push(known);
            } else {
                return Err(self.usage_error(&format!("unknown option {:?}", one_line(a))));
            }
        }
        Ok(Some(out))
    }
}

/// A variable's value: `None` when unset; a usage error when it is not UTF-8.
fn env_var(name: &str) -> Result<Option<String>, Exit> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Exit::Usage(format!(
            "{name}: the value is not valid UTF-8; expected text"
        ))),
    }
}

/// The proxy a command talks to, and as whom.
pub struct Proxy {
    pub cmd: &'static str,
    pub url: ControlUrl,
    /// A path prefix put before every request path (`https://host/fed` → `/fed`).
    base: String,
    pub token: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Whether `token` looks like a JWT: three base64url parts separated by dots.
fn jwt_shaped(token: &str) -> bool {
    token.split('.').count() == 3
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Proxy {
    /// The proxy from `--url` or `FEDMCP_URL` (default [`DEFAULT_URL`]) and the token from
    /// `--token` or `FEDMCP_TOKEN`, both checked; with `https://`, the TLS client
    /// configuration is made now (a bad `FEDMCP_TRUSTED_CA_FILE` is a usage error).
    pub fn from_args(spec: &Spec, args: &Args) -> Result<Proxy, Exit> {
        let (url, source) = match args.value("--url") {
            Some(u) => (u.to_string(), "--url"),
            None => match env_var("FEDMCP_URL")? {
                Some(u) => (u, "FEDMCP_URL"),
                None => (DEFAULT_URL.to_string(), "FEDMCP_URL"),
            },
        };
        let bad_url = || {
            Exit::Usage(format!(
                "{source}: {:?} is not a proxy URL; expected http://HOST[:PORT] or https://HOST[:PORT]",
                one_line(&url)
            ))
        };
        let ws = if let Some(r) = url.strip_prefix("http://") {
            format!("ws://{r}")
        } else if let Some(r) = url.strip_prefix("https://") {
            format!("wss://{r}")
        } else if url.starts_with("ws://") || url.starts_with("wss://") {
            url.clone()
        } else {
            return Err(bad_url());
        };
        let parsed = ControlUrl::parse(&ws).ok_or_else(bad_url)?;
        if parsed.path.contains('?') {
            return Err(bad_url());
        }
        // The path is a prefix; a trailing `/mcp` is dropped, so that the URL given to
        // `fedmcp mcp-stdio` (whose default path is `/mcp`) serves here as well.
        let trimmed = parsed.path.trim_end_matches('/');
        let base = trimmed.strip_suffix("/mcp").unwrap_or(trimmed).to_string();
        let token = match args.value("--token") {
            Some(t) => t.to_string(),
            None => env_var("FEDMCP_TOKEN")?.ok_or_else(|| {
                Exit::Usage(format!(
                    "fedmcp {}: a token is required (--token TOKEN or FEDMCP_TOKEN)",
                    spec.cmd
                ))
            })?,
        };
        if !jwt_shaped(&token) {
            let name = if args.value("--token").is_some() {
                "--token"
            } else {
                "FEDMCP_TOKEN"
            };
            return Err(Exit::Usage(format!(
                "{name}: not a token; expected a JWT (three base64url parts separated by dots)"
            )));
        }
        let mut tls = None;
        if parsed.tls {
            let ca = env_var("FEDMCP_TRUSTED_CA_FILE")?;
            if ca.as_deref() == Some("") {
                return Err(Exit::Usage(
                    "FEDMCP_TRUSTED_CA_FILE: the empty string; expected the path of a PEM file"
                        .into(),
                ));
            }
            let cfg = fedmcp::io::tls::client_config(ca.as_deref().map(std::path::Path::new))
                .map_err(Exit::Usage)?;
            rustls::pki_types::ServerName::try_from(parsed.host.clone())
                .map_err(|e| Exit::Usage(format!("{source}: {:?}: {e}", parsed.host)))?;
            tls = Some(cfg);
        }
        Ok(Proxy {
            cmd: spec.cmd,
            url: parsed,
            base,
            token,
            tls,
        })
    }

    /// The full path of `path` (`/v1/control`) on this proxy, after the URL's prefix.
    pub fn path(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Where the proxy is, for messages: `http://host:port`.
    pub fn shown(&self) -> String {
        format!(
            "{}://{}",
            if self.url.tls { "https" } else { "http" },
            self.url.host_header()
        )
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> Exit {
        Exit::Unreachable(format!(
            "fedmcp {}: cannot reach the proxy at {}: {why}",
            self.cmd,
            self.shown()
        ))
    }

    /// An I/O failure while waiting for or reading an answer.
    pub fn lost(&self, e: &io::Error, wait: Duration) -> Exit {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                self.unreachable(format!("no answer within {} s", wait.as_secs()))
            }
            io::ErrorKind::UnexpectedEof => {
                self.unreachable("the connection ended before the answer did")
            }
            _ => self.unreachable(e),
        }
    }

    /// One request on its own connection: the answer's head, its body left to read.
    /// `wait` bounds each wait for the answer (the head, and each read of the body).
    /// A streamed body is offered with `Expect: 100-continue`, so a refusal (a bad token,
    /// a full quota) comes before any byte of it is sent.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Body<'_>,
        wait: Duration,
    ) -> Result<Response, Exit> {
        let stream = client::open(&self.url, &mut self.tls).map_err(|e| self.unreachable(e))?;
        let mut conn = BufReader::with_capacity(CHUNK_BYTES, stream);
        let mut head = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nUser-Agent: fedmcp/{}\r\nAccept: */*\r\nConnection: close\r\n",
            self.base,
            self.url.host_header(),
            self.token,
            env!("CARGO_PKG_VERSION")
        );
        match &body {
            Body::Empty => {}
            Body::Json(j) => head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                j.len()
            )),
            Body::Stream { len: Some(n), .. } => head.push_str(&format!(
                "Content-Type: application/octet-stream\r\nContent-Length: {n}\r\nExpect: 100-continue\r\n"
            )),
            Body::Stream { len: None, .. } => head.push_str(
                "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n",
            ),
        }
        head.push_str("\r\n");
        let w = conn.get_mut();
        w.write_all(head.as_bytes())
            .and_then(|_| w.flush())
            .map_err(|e| self.unreachable(e))?;
        match body {
            Body::Empty => {}
            Body::Json(j) => {
                let w = conn.get_mut();
                w.write_all(j.as_bytes())
                    .and_then(|_| w.flush())
                    .map_err(|e| self.unreachable(e))?;
            }
            Body::Stream {
                from,
                len,
                mut progress,
            } => {
                // Wait (briefly) for `100 Continue` or an early final answer; a proxy that
                // sends neither gets the body after CONTINUE_WAIT.
                set_read_timeout(&conn, CONTINUE_WAIT);
                let early = conn.fill_buf().map(|b| !b.is_empty());
                set_read_timeout(&conn, wait);
                match early {
                    Ok(false) => {
                        return Err(self.lost(&io::ErrorKind::UnexpectedEof.into(), wait));
                    }
                    Ok(true) => {
                        let h = self.read_head(&mut conn, wait, method)?;
                        if h.status >= 200 {
                            return Ok(Response::new(h, conn));
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(self.unreachable(e)),
                }
                let sent = send_body(conn.get_mut(), from, len, &mut progress);
                progress.finish();
                match sent {
                    Ok(()) => {}
                    Err(SendError::Input(e)) => {
                        return Err(Exit::Usage(format!(
                            "fedmcp {}: cannot read the input: {e}",
                            self.cmd
                        )));
                    }
                    Err(SendError::Short(n)) => {
                        return Err(Exit::Usage(format!(
                            "fedmcp {}: the input ended after {n} bytes, before its announced size",
                            self.cmd
                        )));
                    }
                    // The proxy may have answered before it stopped reading (`413`,
                    // `507`): that answer is the outcome.
                    Err(SendError::Output(e)) => {
                        return match self.read_head(&mut conn, wait, method) {
                            Ok(h) if h.status >= 200 => Ok(Response::new(h, conn)),
                            _ => Err(self.unreachable(e)),
                        };
                    }
                }
            }
        }
        loop {
            let h = self.read_head(&mut conn, wait, method)?;
            if h.status >= 200 {
                return Ok(Response::new(h, conn));
            }
        }
    }

    /// Reads one answer head; its body (if any) is left in `conn`.
    fn read_head(
        &self,
        conn: &mut BufReader<Stream>,
        wait: Duration,
        method: &str,
    ) -> Result<Head, Exit> {
        let mut raw = Vec::new();
        let mut limited = conn.by_ref().take(MAX_HEAD_BYTES);
        loop {
            let before = raw.len();
            let n = limited
                .read_until(b'\n', &mut raw)
                .map_err(|e| self.lost(&e, wait))?;
            if n == 0 {
                return Err(if raw.is_empty() {
                    self.lost(&io::ErrorKind::UnexpectedEof.into(), wait)
                } else if raw.len() as u64 >= MAX_HEAD_BYTES {
                    self.unreachable(format!("an answer head over {MAX_HEAD_BYTES} bytes"))
                } else {
                    self.lost(&io::ErrorKind::UnexpectedEof.into(), wait)
                });
            }
            let line = &raw[before..];
            if line == b"\r\n" || line == b"\n" {
                break;
            }
        }
        let text = String::from_utf8_lossy(&raw);
        let mut lines = text.lines();
        let status: u16 = lines
            .next()
            .filter(|l| l.starts_with("HTTP/1."))
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.unreachable("the answer is not HTTP/1.1"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let kind = if status < 200 || status == 204 || status == 304 || method == "HEAD" {
            Kind::Length(0)
        } else if find("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Kind::Chunk {
                left: 0,
                first: true,
            }
        } else if let Some(v) = find("content-length") {
            Kind::Length(
                v.parse()
                    .map_err(|_| self.unreachable("the answer has a bad Content-Length"))?,
            )
        } else {
            Kind::Eof
        };
        Ok(Head {
            status,
            headers,
            kind,
        })
    }

    /// One request with a JSON body (or none), its answer read whole: status and body.
    pub fn json(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
        wait: Duration,
    ) -> Result<(u16, String), Exit> {
        let mut r = self.request(method, path, body.map_or(Body::Empty, Body::Json), wait)?;
        let mut raw = Vec::new();
        (&mut r)
            .take(MAX_JSON_BYTES + 1)
            .read_to_end(&mut raw)
            .map_err(|e| self.lost(&e, wait))?;
        if raw.len() as u64 > MAX_JSON_BYTES {
            return Err(self.unreachable(format!("an answer over {MAX_JSON_BYTES} bytes")));
        }
        Ok((r.status, String::from_utf8_lossy(&raw).into_owned()))
    }

    /// The outcome of an answer that is not the success expected: exit code 4 for a refused
    /// token (`401`/`403`), else 1; the line names the status, and the contract's error
    /// code and message when the body has them.
    pub fn answer_error(&self, status: u16, body: &str) -> Exit {
        let line = format!("fedmcp {}: {}", self.cmd, describe_error(status, body));
        if matches!(status, 401 | 403) {
            Exit::Refused(line)
        } else {
            Exit::Failed(line)
        }
    }
}

/// `404 unknown_server: no server "x"` from an error answer (contract §3's body), or the
/// status and the start of whatever else the body holds.
pub fn describe_error(status: u16, body: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Inner {
        code: Option<String>,
        message: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Outer {
        error: Inner,
    }
    match serde_json::from_str::<Outer>(body) {
        Ok(Outer {
            error: Inner { code, message },
        }) => format!(
            "{status} {}: {}",
            code.as_deref().unwrap_or("error"),
            message.as_deref().unwrap_or("")
        ),
        Err(_) => {
            let start: String = one_line(body).chars().take(200).collect();
            if start.is_empty() {
                format!("the proxy answered {status}")
            } else {
                format!("the proxy answered {status}: {start}")
            }
        }
    }
}

fn set_read_timeout(conn: &BufReader<Stream>, wait: Duration) {
    let _ = conn.get_ref().tcp().set_read_timeout(Some(wait));
}

/// A request body.
pub enum Body<'a> {
    Empty,
    Json(&'a str),
    /// Streamed from `from`: `len` bytes with `Content-Length`, or chunked to its end.
    Stream {
        from: &'a mut dyn Read,
        len: Option<u64>,
        progress: Progress,
    },
}

enum SendError {
    /// Reading the input failed.
    Input(io::Error),
    /// The input ended before its announced length (bytes sent).
    Short(u64),
    /// Writing to the proxy failed.
    Output(io::Error),
}

fn send_body(
    out: &mut Stream,
    from: &mut dyn Read,
    len: Option<u64>,
    progress: &mut Progress,
) -> Result<(), SendError> {
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut sent = 0u64;
    loop {
        let want = match len {
            Some(n) if n == sent => break,
            Some(n) => ((n - sent) as usize).min(buf.len()),
            None => buf.len(),
        };
        let got = match from.read(&mut buf[..want]) {
            Ok(0) => match len {
                Some(_) => return Err(SendError::Short(sent)),
                None => break,
            },
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SendError::Input(e)),
        };
        let written = if len.is_some() {
            out.write_all(&buf[..got])
        } else {
            out.write_all(format!("{got:x}\r\n").as_bytes())
                .and_then(|_| out.write_all(&buf[..got]))
                .and_then(|_| out.write_all(b"\r\n"))
        };
        written.map_err(SendError::Output)?;
        sent += got as u64;
        progress.add(got as u64);
    }
    if len.is_none() {
        out.write_all(b"0\r\n\r\n").map_err(SendError::Output)?;
    }
    out.flush().map_err(SendError::Output)
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    kind: Kind,
}

/// How an answer's body is framed, and how much of it is left.
enum Kind {
    Length(u64),
    /// Chunked: bytes left in the current chunk; `first` before the first size line.
    Chunk {
        left: u64,
        first: bool,
    },
    /// To the end of the connection.
    Eof,
}

/// An answer: its status and headers; its body is read through `Read`.
pub struct Response {
    pub status: u16,
    headers: Vec<(String, String)>,
    conn: BufReader<Stream>,
    kind: Kind,
}

impl Response {
    fn new(h: Head, conn: BufReader<Stream>) -> Response {
        Response {
            status: h.status,
            headers: h.headers,
            conn,
            kind: h.kind,
        }
    }

    /// A header's value (the name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body's length when the answer says it.
    pub fn length(&self) -> Option<u64> {
        match self.kind {
            Kind::Length(n) => Some(n),
            _ => None,
        }
    }

    fn line(&mut self) -> io::Result<String> {
        let mut raw = Vec::new();
        (&mut self.conn)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut raw)?;
        if !raw.ends_with(b"\n") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a bad chunked answer",
            ));
        }
        Ok(String::from_utf8_lossy(&raw).trim().to_string())
    }
}

impl Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.kind {
                Kind::Length(0) => return Ok(0),
                Kind::Length(n) => {
                    let max = (n.min(buf.len() as u64)) as usize;
                    let got = self.conn.read(&mut buf[..max])?;
                    if got == 0 && max > 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    self.kind = Kind::Length(n - got as u64);
                    return Ok(got);
                }
                Kind::Eof => return self.conn.read(buf),
                Kind::Chunk { left: 0, first } => {
                    if !first && !self.line()?.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "a bad chunked answer",
                        ));
                    }
                    let size_line = self.line()?;
                    let hex = size_line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(hex, 16).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "a bad chunk size")
                    })?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        while !self.line()?.is_empty() {}
                        self.kind = Kind::Length(0);
                        return Ok(0);
                    }
                    self.kind = Kind::Chunk {
                        left: size,
                        first: false,
                    };
                }
                Kind::Chunk { left, .. } => {
                    let max = (left.min(buf.len() as u64)) as usize;
                    let got = self.conn.read(&mut buf[..max])?;
                    if got == 0 && max > 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    self.kind = Kind::Chunk {
                        left: left - got as u64,
                        first: false,
                    };
                    return Ok(got);
                }
            }
        }
    }
}

/// A transfer's progress on stderr, a line redrawn with `\r`: only when stderr is a terminal
/// and the transfer is over [`PROGRESS_FROM_BYTES`] (when its size is unknown, once it is).
pub struct Progress {
    label: &'static str,
    total: Option<u64>,
    done: u64,
    next: u64,
    on: bool,
    shown: bool,
}

impl Progress {
    pub fn new(label: &'static str, total: Option<u64>) -> Progress {
        let on = io::stderr().is_terminal() && total.is_none_or(|t| t > PROGRESS_FROM_BYTES);
        Progress {
            label,
            total,
            done: 0,
            next: PROGRESS_FROM_BYTES.min(total.map_or(u64::MAX, |t| t / 100)),
            on,
            shown: false,
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if !self.on || self.done < self.next {
            return;
        }
        if self.total.is_none() && self.done <= PROGRESS_FROM_BYTES {
            return;
        }
        let step = self.total.map_or(PROGRESS_FROM_BYTES, |t| (t / 100).max(1));
        self.next = self.done + step;
        self.draw();
    }

    fn draw(&mut self) {
        let line = match self.total {
            Some(t) if t > 0 => format!(
                "\r{}: {} of {} bytes ({}%)",
                self.label,
                self.done,
                t,
                (self.done.min(t) * 100) / t
            ),
            _ => format!("\r{}: {} bytes", self.label, self.done),
        };
        let mut err = io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
        self.shown = true;
    }

    /// Ends the line, if one was drawn.
    pub fn finish(&mut self) {
        if self.shown {
            self.draw();
            eprintln!();
            self.shown = false;
        }
    }
}

/// `text` percent-encoded for a path segment or a query value: every byte but
/// `A-Z a-z 0-9 - . _ ~` escaped.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `text` as JSON: itself when it is one JSON value (kept byte for byte, surrounding
/// whitespace dropped), else a JSON string of it.
pub fn json_or_string(text: &str) -> String {
    let t = text.trim();
    match serde_json::from_str::<&RawValue>(t) {
        Ok(raw) => raw.get().to_string(),
        Err(_) => serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into()),
    }
}

/// A JSON argument (`--capabilities`, `--reply`): one JSON value, as given (re-written on one
/// line when it spans several);
/// `object` asks for a JSON object.
pub fn json_arg(spec: &Spec, flag: &str, text: &str, object: bool) -> Result<String, Exit> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) if !object || v.is_object() => Ok(if text.contains(['\n', '\r']) {
            v.to_string()
        } else {
            text.trim().to_string()
        }),
        Ok(_) => Err(spec.usage_error(&format!("{flag} takes a JSON object"))),
        Err(e) => Err(spec.usage_error(&format!("{flag} is not valid JSON ({e})"))),
    }
}

/// Prints one line on stdout and flushes it; a closed stdout ends the command quietly.
pub fn print_line(cmd: &str, line: &str) -> Outcome {
    let mut out = io::stdout().lock();
    match out
        .write_all(line.as_bytes())
        .and_then(|_| out.write_all(b"\n"))
        .and_then(|_| out.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Exit::Quiet),
        Err(e) => Err(Exit::Failed(format!(
            "fedmcp {cmd}: cannot write to stdout: {e}"
        ))),
    }
}

/// One JSON line of an item of a listing (kept as the proxy wrote it when it is one line).
pub fn compact(raw: &RawValue) -> String {
    let t = raw.get();
    if t.contains('\n') {
        serde_json::from_str::<serde_json::Value>(t)
            .map(|v| v.to_string())
            .unwrap_or_else(|_| one_line(t))
    } else {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            cmd: "t",
            usage: "usage",
            values: &["--to", "-o"],
            switches: &["--queue"],
        }
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_are_parsed() {
        let a = spec()
            .parse(&args(&[
                "--to=bob", "--queue", "-", "x", "-o", "f", "--", "--to",
            ]))
            .unwrap()
            .unwrap();
        assert_eq!(a.value("--to"), Some("bob"));
        assert_eq!(a.value("-o"), Some("f"));
        assert!(a.switch("--queue"));
        assert_eq!(a.positional, vec!["-", "x", "--to"]);
        for bad in [&["--bogus"][..], &["--to"], &["--queue=1"], &["-x"]] {
            let e = spec().parse(&args(bad)).err().unwrap();
            assert_eq!(e.code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn messages_are_json_or_strings() {
        assert_eq!(json_or_string("hello"), "\"hello\"");
        assert_eq!(json_or_string(" {\"a\": 1}\n"), "{\"a\": 1}");
        assert_eq!(json_or_string("42"), "42");
        assert_eq!(json_or_string("{oops"), "\"{oops\"");
        assert_eq!(encode("a b/c:d"), "a%20b%2Fc%3Ad");
    }

    #[test]
    fn error_answers_are_described() {
        assert_eq!(
            describe_error(
                404,
                r#"{"error":{"code":"unknown_server","message":"no such server"}}"#
            ),
            "404 unknown_server: no such server"
        );
        assert_eq!(
            describe_error(502, "bad\ngateway"),
            "the proxy answered 502: bad gateway"
        );
        assert_eq!(one_line("a\nb\tc"), "a b c");
    }
}
