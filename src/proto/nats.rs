//! The NATS client protocol, as a codec over byte buffers: what a NATS server sends us is
//! parsed one op at a time from the front of a buffer ([`parse`]), and what we send it is
//! appended to a caller's `Vec<u8>` ([`connect`], [`publish`], [`hpublish`], [`subscribe`],
//! [`unsubscribe`], [`ping`], [`pong`]).
//!
//! What it owns: the server ops a client receives (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`,
//! `+OK`, `-ERR`), the `NATS/1.0` header block (status code and `Name: value` lines), the
//! `CONNECT` options we announce, the subject rules of [`valid_subject`], and [`token_hex`],
//! which makes any text one safe subject token.
//!
//! Invariants:
//! - Every length the server controls is bounded by [`Limits`]: a control line longer than
//!   `max_control_line` is refused as soon as that many bytes are seen without its end, and a
//!   `MSG`/`HMSG` that announces more than `max_payload` bytes is refused from its control line
//!   alone, before any of the payload is buffered. A header block holds at most
//!   [`MAX_HEADERS`] lines.
//! - [`parse`] answers the same for an op whatever way its bytes arrive: `Ok(None)` for every
//!   strict prefix of a well-formed op, then the op and the exact number of bytes it used.
//!   The bytes after an op play no part in it.
//! - No encoder can emit bytes that parse as more than one op: a subject, reply or queue group
//!   that fails [`valid_subject`] makes the encoder write nothing at all; a header whose name
//!   is not a token is dropped, and a control byte in a header value is written as a space.
//!
//! What it must never do: panic on any input, perform I/O, read a clock, or buffer more than
//! the limits allow on a server's word.

use std::fmt;

/// Header lines accepted in one `HMSG` header block (the `NATS/1.0` line not counted).
pub const MAX_HEADERS: usize = 1024;
/// Bytes of a subject accepted by [`valid_subject`].
pub const MAX_SUBJECT: usize = 1024;

/// Bounds on what the server may send us.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of a control line, not counting its `\r\n`.
    pub max_control_line: usize,
    /// Bytes of a message's headers and payload together.
    pub max_payload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_control_line: 4096,
            max_payload: 8 * 1024 * 1024,
        }
    }
}

/// Why the bytes from the server are not a NATS op. Each is fatal to the connection: the
/// stream cannot be resynchronised after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsError {
    /// A control line longer than [`Limits::max_control_line`].
    LineTooLong,
    /// A message announcing this many bytes, over [`Limits::max_payload`].
    PayloadTooBig(usize),
    /// Anything else that is not the protocol.
    Malformed(String),
}

impl fmt::Display for NatsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsError::LineTooLong => write!(f, "NATS control line too long"),
            NatsError::PayloadTooBig(n) => write!(f, "NATS message of {n} bytes is too big"),
            NatsError::Malformed(why) => write!(f, "malformed NATS op: {why}"),
        }
    }
}

impl std::error::Error for NatsError {}

fn malformed(why: &str) -> NatsError {
    NatsError::Malformed(why.to_string())
}

/// What a server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    Info(Info),
    Msg(Msg),
    Ping,
    Pong,
    Ok,
    /// The text inside the quotes of `-ERR 'text'` (the whole text if it is not quoted).
    Err(String),
}

/// A message delivered to one of our subscriptions (`MSG` or `HMSG`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub subject: String,
    pub sid: u64,
    pub reply: Option<String>,
    /// From HMSG: the status code of the header block's first line (`NATS/1.0 404 No Messages`
    /// -> Some(404)), else None.
    pub status: Option<u16>,
    /// From HMSG: header name/value pairs in order (names as sent); empty for MSG.
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// The server's `INFO`. Unknown fields are ignored; a missing field takes its default.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct Info {
    pub server_id: String,
    pub server_name: String,
    pub version: String,
    pub max_payload: u64,
    pub headers: bool,
    pub tls_required: bool,
    pub tls_available: bool,
    pub auth_required: bool,
    pub connect_urls: Vec<String>,
    pub jetstream: bool,
    pub nonce: Option<String>,
}

/// A byte that may not appear in a control line or a header line (tab is allowed).
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Digits only (no sign, no blank), checked against overflow.
fn parse_u64(s: &str) -> Result<u64, NatsError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("a number is not decimal digits"));
    }
    s.bytes().try_fold(0u64, |n, b| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or_else(|| malformed("a number overflows"))
    })
}

/// A size the server announces, refused at once when over `max`.
fn bounded_size(n: u64, max: usize) -> Result<usize, NatsError> {
    let n = usize::try_from(n).map_err(|_| NatsError::PayloadTooBig(usize::MAX))?;
    if n > max {
        return Err(NatsError::PayloadTooBig(n));
    }
    Ok(n)
}

/// Parses one op from the front of `buf`.
///
/// `Ok(None)`: incomplete, more bytes are needed (but an incomplete control line longer than
/// `limits.max_control_line` is `Err(LineTooLong)`, and a `MSG`/`HMSG` whose announced size
/// is over `limits.max_payload` is `Err(PayloadTooBig)` at once, before the payload arrives).
/// `Ok(Some((op, consumed)))` otherwise, with `0 < consumed <= buf.len()`. Op names are
/// case-insensitive; arguments are separated by one or more spaces or tabs; lines end with
/// `\r\n`.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(ServerOp, usize)>, NatsError> {
    let max_line = limits.max_control_line;
    // A line of `max_line` bytes and its CRLF fit in this window.
    let window = &buf[..buf.len().min(max_line.saturating_add(2))];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        // No end of line yet: the bytes seen are all line, but a trailing `\r` may be the
        // start of its end.
        let seen = if window.len() == buf.len() && buf.last() == Some(&b'\r') {
            buf.len() - 1
        } else {
            window.len()
        };
        return if seen > max_line {
            Err(NatsError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    if nl == 0 || buf[nl - 1] != b'\r' {
        return Err(malformed("a line is not ended by CRLF"));
    }
    let line = &buf[..nl - 1];
    let after_line = nl + 1;
    if line.iter().any(|&b| is_ctl(b)) {
        return Err(malformed("control byte in a control line"));
    }
    let line = std::str::from_utf8(line).map_err(|_| malformed("control line is not UTF-8"))?;
    let (op, rest) = match line.find(is_blank) {
        Some(i) => (&line[..i], &line[i..]),
        None => (line, ""),
    };
    let args = rest.trim_matches(is_blank);
    let op = if op.eq_ignore_ascii_case("MSG") {
        return parse_msg(buf, after_line, args, false, limits);
    } else if op.eq_ignore_ascii_case("HMSG") {
        return parse_msg(buf, after_line, args, true, limits);
    } else if op.eq_ignore_ascii_case("PING") && args.is_empty() {
        ServerOp::Ping
    } else if op.eq_ignore_ascii_case("PONG") && args.is_empty() {
        ServerOp::Pong
    } else if op.eq_ignore_ascii_case("+OK") && args.is_empty() {
        ServerOp::Ok
    } else if op.eq_ignore_ascii_case("-ERR") {
        let text = args
            .strip_prefix('\'')
            .and_then(|t| t.strip_suffix('\''))
            .unwrap_or(args);
        ServerOp::Err(text.to_string())
    } else if op.eq_ignore_ascii_case("INFO") {
        let info: Info = serde_json::from_str(args)
            .map_err(|e| NatsError::Malformed(format!("INFO is not its JSON object: {e}")))?;
        ServerOp::Info(info)
    } else {
        return Err(malformed("unknown op, or arguments where none belong"));
    };
    Ok(Some((op, after_line)))
}

/// `MSG <subject> <sid> [reply-to] <#bytes>` or
/// `HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>`, whose line ends at
/// `start`; then the payload and its `\r\n`.
fn parse_msg(
    buf: &[u8],
    start: usize,
    args: &str,
    with_headers: bool,
    limits: &Limits,
) -> Result<Option<(ServerOp, usize)>, NatsError> {
    let mut a = args.split(is_blank).filter(|s| !s.is_empty());
    let (mut fields, mut n) = ([""; 5], 0);
    for f in a.by_ref().take(5) {
        fields[n] = f;
        n += 1;
    }
    if a.next().is_some() {
        return Err(malformed("too many arguments"));
    }
    let sizes = if with_headers { 2 } else { 1 };
    let (subject, sid, reply) = match n.checked_sub(sizes) {
        Some(2) => (fields[0], fields[1], None),
        Some(3) => (fields[0], fields[1], Some(fields[2])),
        _ => return Err(malformed("wrong number of arguments")),
    };
    let sid = parse_u64(sid)?;
    let total = parse_u64(fields[n - 1])?;
    let hdr_len = if with_headers {
        let h = parse_u64(fields[n - 2])?;
        if h > total {
            return Err(malformed("header size over total size"));
        }
        h
    } else {
        0
    };
    let total = bounded_size(total, limits.max_payload)?;
    // Not over `total`, which fits a usize.
    let hdr_len = usize::try_from(hdr_len).map_err(|_| NatsError::PayloadTooBig(total))?;
    let end = start
        .checked_add(total)
        .ok_or(NatsError::PayloadTooBig(total))?;
    let consumed = end.checked_add(2).ok_or(NatsError::PayloadTooBig(total))?;
    if buf.len() < consumed {
        return Ok(None);
    }
    if &buf[end..consumed] != b"\r\n" {
        return Err(malformed("payload is not followed by CRLF"));
    }
    let body_start = start + hdr_len;
    let (status, headers) = if with_headers {
        parse_header_block(&buf[start..body_start])?
    } else {
        (None, Vec::new())
    };
    let msg = Msg {
        subject: subject.to_string(),
        sid,
        reply: reply.map(str::to_string),
        status,
        headers,
        payload: buf[body_start..end].to_vec(),
    };
    Ok(Some((ServerOp::Msg(msg), consumed)))
}

type HeaderBlock = (Option<u16>, Vec<(String, String)>);

/// `NATS/1.0[ <status>[ <description>]]\r\n` then `Name: value\r\n` lines, then `\r\n`.
fn parse_header_block(block: &[u8]) -> Result<HeaderBlock, NatsError> {
    let text = std::str::from_utf8(block).map_err(|_| malformed("header block is not UTF-8"))?;
    let body = text
        .strip_suffix("\r\n\r\n")
        .ok_or_else(|| malformed("header block is not ended by an empty line"))?;
    let mut lines = body.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let after_version = first
        .strip_prefix("NATS/1.0")
        .ok_or_else(|| malformed("header block does not start with NATS/1.0"))?;
    let status = parse_status(after_version)?;
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(malformed("too many headers"));
        }
        if line.bytes().any(is_ctl) {
            return Err(malformed("control byte in a header line"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed("header line without ':'"))?;
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            return Err(malformed("bad header name"));
        }
        headers.push((name.to_string(), value.trim_matches(is_blank).to_string()));
    }
    Ok((status, headers))
}

/// What follows `NATS/1.0` on the first header line: nothing, or a 3-digit status code and
/// an optional description (which is not kept).
fn parse_status(rest: &str) -> Result<Option<u16>, NatsError> {
    if rest.bytes().any(is_ctl) {
        return Err(malformed("control byte in the header version line"));
    }
    let trimmed = rest.trim_start_matches(is_blank);
    if trimmed.is_empty() {
        return Ok(None);
    }
    if trimmed.len() == rest.len() {
        return Err(malformed("no blank after NATS/1.0"));
    }
    let code = trimmed.split(is_blank).next().unwrap_or_default();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("status is not a 3-digit code"));
    }
    let code = code.bytes().fold(0u16, |n, b| n * 10 + u16::from(b - b'0'));
    Ok(Some(code))
}

/// What we announce in `CONNECT`.
#[derive(Clone, Copy)]
pub struct ConnectOpts<'a> {
    pub name: &'a str,
    pub user: Option<&'a str>,
    pub pass: Option<&'a str>,
    pub auth_token: Option<&'a str>,
    pub tls_required: bool,
}

/// Secrets are not printed.
impl fmt::Debug for ConnectOpts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOpts")
            .field("name", &self.name)
            .field("user", &self.user)
            .field("pass", &self.pass.map(|_| "<redacted>"))
            .field("auth_token", &self.auth_token.map(|_| "<redacted>"))
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

#[derive(serde::Serialize)]
struct ConnectJson<'a> {
    verbose: bool,
    pedantic: bool,
    tls_required: bool,
    name: &'a str,
    lang: &'a str,
    version: &'a str,
    protocol: u8,
    headers: bool,
    no_responders: bool,
    echo: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_token: Option<&'a str>,
}

fn push(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
}

fn push_num(out: &mut Vec<u8>, n: u64) {
    push(out, &n.to_string());
}

/// `CONNECT {json}\r\n`. The JSON is built by serde_json, so every string is escaped and the
/// line holds no CR or LF.
pub fn connect(out: &mut Vec<u8>, opts: &ConnectOpts) {
    let json = ConnectJson {
        verbose: false,
        pedantic: false,
        tls_required: opts.tls_required,
        name: opts.name,
        lang: "rust",
        version: env!("CARGO_PKG_VERSION"),
        protocol: 1,
        headers: true,
        no_responders: true,
        echo: true,
        user: opts.user,
        pass: opts.pass,
        auth_token: opts.auth_token,
    };
    // Serializing a struct of strings and booleans cannot fail; should it ever, the server
    // gets an empty object (and refuses us) rather than a half-written line.
    let body = serde_json::to_vec(&json).unwrap_or_else(|_| b"{}".to_vec());
    push(out, "CONNECT ");
    out.extend_from_slice(&body);
    push(out, "\r\n");
}

fn subjects_ok(subject: &str, reply: Option<&str>) -> bool {
    valid_subject(subject, false) && reply.is_none_or(|r| valid_subject(r, false))
}

/// `PUB <subject> [reply-to] <#bytes>\r\n<payload>\r\n`. Writes nothing when `subject` or
/// `reply` fails [`valid_subject`] (without wildcards).
pub fn publish(out: &mut Vec<u8>, subject: &str, reply: Option<&str>, payload: &[u8]) {
    if !subjects_ok(subject, reply) {
        return;
    }
    push(out, "PUB ");
    push(out, subject);
    if let Some(r) = reply {
        push(out, " ");
        push(out, r);
    }
    push(out, " ");
    push_num(out, payload.len() as u64);
    push(out, "\r\n");
    out.extend_from_slice(payload);
    push(out, "\r\n");
}

/// An HTTP token byte: what a header name we write is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `HPUB <subject> [reply-to] <#header bytes> <#total bytes>\r\n` then the header block
/// (`NATS/1.0\r\n`, `Name: value\r\n` for each header, `\r\n`), the payload and `\r\n`.
/// Writes nothing when `subject` or `reply` fails [`valid_subject`] (without wildcards). A
/// header whose name is not a token is dropped; a control byte in a value becomes a space.
pub fn hpublish(
    out: &mut Vec<u8>,
    subject: &str,
    reply: Option<&str>,
    headers: &[(&str, &str)],
    payload: &[u8],
) {
    if !subjects_ok(subject, reply) {
        return;
    }
    let mut block = b"NATS/1.0\r\n".to_vec();
    for (name, value) in headers {
        if name.is_empty() || !name.bytes().all(is_tchar) {
            continue;
        }
        push(&mut block, name);
        push(&mut block, ": ");
        block.extend(value.bytes().map(|b| if is_ctl(b) { b' ' } else { b }));
        push(&mut block, "\r\n");
    }
    push(&mut block, "\r\n");
    push(out, "HPUB ");
    push(out, subject);
    if let Some(r) = reply {
        push(out, " ");
        push(out, r);
    }
    push(out, " ");
    push_num(out, block.len() as u64);
    push(out, " ");
    push_num(out, (block.len() + payload.len()) as u64);
    push(out, "\r\n");
    out.extend_from_slice(&block);
    out.extend_from_slice(payload);
    push(out, "\r\n");
}

/// `SUB <subject> [queue group] <sid>\r\n`. Writes nothing when `subject` fails
/// [`valid_subject`] (wildcards allowed) or `queue_group` fails it (without wildcards).
pub fn subscribe(out: &mut Vec<u8>, subject: &str, queue_group: Option<&str>, sid: u64) {
    if !valid_subject(subject, true) || queue_group.is_some_and(|q| !valid_subject(q, false)) {
        return;
    }
    push(out, "SUB ");
    push(out, subject);
    if let Some(q) = queue_group {
        push(out, " ");
        push(out, q);
    }
    push(out, " ");
    push_num(out, sid);
    push(out, "\r\n");
}

/// `UNSUB <sid> [max msgs]\r\n`.
pub fn unsubscribe(out: &mut Vec<u8>, sid: u64, max: Option<u64>) {
    push(out, "UNSUB ");
    push_num(out, sid);
    if let Some(m) = max {
        push(out, " ");
        push_num(out, m);
    }
    push(out, "\r\n");
}

/// `PING\r\n`.
pub fn ping(out: &mut Vec<u8>) {
    push(out, "PING\r\n");
}

/// `PONG\r\n`.
pub fn pong(out: &mut Vec<u8>) {
    push(out, "PONG\r\n");
}

/// A subject the client may publish to / subscribe to: non-empty, at most [`MAX_SUBJECT`]
/// bytes, tokens separated by '.', no empty token, no whitespace or control characters;
/// wildcards '*' (a whole token) and '>' (a whole last token) only when `wildcards` is true.
/// '*' and '>' never appear inside a longer token.
pub fn valid_subject(s: &str, wildcards: bool) -> bool {
    if s.is_empty() || s.len() > MAX_SUBJECT {
        return false;
    }
    let mut tokens = s.split('.').peekable();
    while let Some(t) = tokens.next() {
        let last = tokens.peek().is_none();
        let ok = match t {
            "" => false,
            "*" => wildcards,
            ">" => wildcards && last,
            _ => !t
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>'),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Hex encoding of arbitrary text into one subject token (lowercase hex of the UTF-8 bytes):
/// ids with '.' or spaces never break a subject. The empty text gives the empty string (not a
/// token), and text over 512 bytes gives more than a subject may hold.
pub fn token_hex(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits::default()
    }

    fn one(buf: &[u8]) -> ServerOp {
        let (op, n) = parse(buf, &lim()).unwrap().unwrap();
        assert_eq!(n, buf.len(), "consumed");
        op
    }

    fn msg(op: ServerOp) -> Msg {
        match op {
            ServerOp::Msg(m) => m,
            other => panic!("not a Msg: {other:?}"),
        }
    }

    fn bad(buf: &[u8]) {
        match parse(buf, &lim()) {
            Err(NatsError::Malformed(_)) => {}
            other => panic!(
                "{:?}: expected Malformed, got {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    /// Every strict prefix is incomplete, the whole is the op.
    fn every_split(buf: &[u8]) -> ServerOp {
        for k in 0..buf.len() {
            assert_eq!(
                parse(&buf[..k], &lim()),
                Ok(None),
                "prefix {k} of {:?}",
                String::from_utf8_lossy(buf)
            );
        }
        one(buf)
    }

    const INFO: &[u8] = b"INFO {\"server_id\":\"NABC\",\"server_name\":\"n1\",\"version\":\"2.10.7\",\"proto\":1,\"max_payload\":1048576,\"headers\":true,\"auth_required\":true,\"connect_urls\":[\"10.0.0.1:4222\"],\"jetstream\":true,\"nonce\":\"xyz\",\"unknown\":{\"a\":[1]}}\r\n";

    #[test]
    fn info() {
        let ServerOp::Info(i) = every_split(INFO) else {
            panic!()
        };
        assert_eq!(
            i,
            Info {
                server_id: "NABC".into(),
                server_name: "n1".into(),
                version: "2.10.7".into(),
                max_payload: 1048576,
                headers: true,
                tls_required: false,
                tls_available: false,
                auth_required: true,
                connect_urls: vec!["10.0.0.1:4222".into()],
                jetstream: true,
                nonce: Some("xyz".into()),
            }
        );
        assert_eq!(one(b"INFO {}\r\n"), ServerOp::Info(Info::default()));
        assert_eq!(one(b"info\t {}  \r\n"), ServerOp::Info(Info::default()));
        bad(b"INFO {\"server_id\":1}\r\n");
        bad(b"INFO {\r\n");
        bad(b"INFO\r\n");
        bad(b"INFO [1]\r\n");
        bad(b"INFO {\"max_payload\":-1}\r\n");
    }

    #[test]
    fn simple_ops() {
        assert_eq!(every_split(b"PING\r\n"), ServerOp::Ping);
        assert_eq!(every_split(b"PONG\r\n"), ServerOp::Pong);
        assert_eq!(every_split(b"+OK\r\n"), ServerOp::Ok);
        assert_eq!(
            every_split(b"-ERR 'Unknown Protocol Operation'\r\n"),
            ServerOp::Err("Unknown Protocol Operation".into())
        );
        assert_eq!(
            one(b"-ERR  bare text \r\n"),
            ServerOp::Err("bare text".into())
        );
        assert_eq!(one(b"-ERR ''\r\n"), ServerOp::Err(String::new()));
        assert_eq!(one(b"-ERR\r\n"), ServerOp::Err(String::new()));
        assert_eq!(one(b"PING \t\r\n"), ServerOp::Ping);
        bad(b"PING x\r\n");
        bad(b"+OK x\r\n");
        bad(b"PINGX\r\n");
        bad(b"PUB a 1\r\n");
        bad(b" PING\r\n");
        bad(b"\r\n");
    }

    #[test]
    fn case_insensitive() {
        assert_eq!(one(b"ping\r\n"), ServerOp::Ping);
        assert_eq!(one(b"PoNg\r\n"), ServerOp::Pong);
        assert_eq!(one(b"+ok\r\n"), ServerOp::Ok);
        assert_eq!(one(b"-err 'x'\r\n"), ServerOp::Err("x".into()));
        assert_eq!(msg(one(b"msg a 1 2\r\nhi\r\n")).payload, b"hi");
        let m = msg(one(b"hMsG a 1 12 12\r\nNATS/1.0\r\n\r\n\r\n"));
        assert_eq!((m.status, m.headers.len(), m.payload.len()), (None, 0, 0));
    }

    #[test]
    fn msg_plain_and_reply() {
        let m = msg(every_split(b"MSG foo.bar 9 11\r\nHello World\r\n"));
        assert_eq!(
            m,
            Msg {
                subject: "foo.bar".into(),
                sid: 9,
                reply: None,
                status: None,
                headers: vec![],
                payload: b"Hello World".to_vec(),
            }
        );
        let m = msg(every_split(b"MSG foo.bar 9 _INBOX.x.y 4\r\na\r\nb\r\n"));
        assert_eq!(m.reply.as_deref(), Some("_INBOX.x.y"));
        assert_eq!(m.payload, b"a\r\nb");
        let m = msg(one(b"MSG\t foo  18446744073709551615 \t_R  0 \r\n\r\n"));
        assert_eq!((m.sid, m.reply.as_deref()), (u64::MAX, Some("_R")));
        assert!(m.payload.is_empty());
        // Binary payload.
        let mut buf = b"MSG a 1 3\r\n".to_vec();
        buf.extend_from_slice(&[0, 0xff, b'\n']);
        buf.extend_from_slice(b"\r\n");
        assert_eq!(msg(every_split(&buf)).payload, vec![0, 0xff, b'\n']);
    }

    #[test]
    fn hmsg_status_and_headers() {
        let block = "NATS/1.0 404 No Messages\r\n\r\n";
        let line = format!(
            "HMSG _INBOX.a 3 {} {}\r\n{block}\r\n",
            block.len(),
            block.len()
        );
        let m = msg(every_split(line.as_bytes()));
        assert_eq!((m.status, m.headers.len()), (Some(404), 0));
        assert!(m.payload.is_empty());

        let block = "NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\nNats-Pending-Bytes:0\r\n\r\n";
        let line = format!(
            "HMSG a.b 3 rep {} {}\r\n{block}xy\r\n",
            block.len(),
            block.len() + 2
        );
        let m = msg(every_split(line.as_bytes()));
        assert_eq!(m.status, Some(408));
        assert_eq!(m.reply.as_deref(), Some("rep"));
        assert_eq!(
            m.headers,
            vec![
                ("Nats-Pending-Messages".into(), "1".into()),
                ("Nats-Pending-Bytes".into(), "0".into())
            ]
        );
        assert_eq!(m.payload, b"xy");

        let block = "NATS/1.0 503\r\n\r\n";
        let line = format!("HMSG a 1 {} {}\r\n{block}\r\n", block.len(), block.len());
        assert_eq!(msg(one(line.as_bytes())).status, Some(503));

        // Names as sent, repeated names kept in order, values trimmed, ':' in values.
        let block = "NATS/1.0\r\nX-a:  1 \r\nx-A: 2\r\nX-a: http://h:1/\r\n\r\n";
        let line = format!(
            "HMSG a 1 {} {}\r\n{block}body\r\n",
            block.len(),
            block.len() + 4
        );
        let m = msg(one(line.as_bytes()));
        assert_eq!(m.status, None);
        assert_eq!(
            m.headers,
            vec![
                ("X-a".into(), "1".into()),
                ("x-A".into(), "2".into()),
                ("X-a".into(), "http://h:1/".into())
            ]
        );
        assert_eq!(m.payload, b"body");
    }

    fn hmsg(block: &str) -> Vec<u8> {
        format!("HMSG a 1 {} {}\r\n{block}\r\n", block.len(), block.len()).into_bytes()
    }

    #[test]
    fn hmsg_malformed_blocks() {
        bad(&hmsg("NATS/1.0\r\n"));
        bad(&hmsg("NATS/2.0\r\n\r\n"));
        bad(&hmsg("nats/1.0\r\n\r\n"));
        bad(&hmsg("NATS/1.0404\r\n\r\n"));
        bad(&hmsg("NATS/1.0 40\r\n\r\n"));
        bad(&hmsg("NATS/1.0 4040\r\n\r\n"));
        bad(&hmsg("NATS/1.0 abc\r\n\r\n"));
        bad(&hmsg("NATS/1.0\r\nNoColon\r\n\r\n"));
        bad(&hmsg("NATS/1.0\r\n: v\r\n\r\n"));
        bad(&hmsg("NATS/1.0\r\nA B: v\r\n\r\n"));
        bad(&hmsg("NATS/1.0\r\n\r\nA: v\r\n\r\n"));
        bad(&hmsg("NATS/1.0\r\nA: v\nB: w\r\n\r\n"));
        bad(&hmsg("NATS/1.0\r\nA: v\rB\r\n\r\n"));
        bad(&hmsg(""));
        // Header size over total.
        bad(b"HMSG a 1 13 12\r\nNATS/1.0\r\n\r\n\r\n");
        // Not UTF-8.
        bad(b"HMSG a 1 17 17\r\nNATS/1.0\r\nA:\xff\r\n\r\n\r\n");
        assert!(matches!(
            parse(b"HMSG a 1 17 17\r\nNATS/1.0\r\nA:\xff\r\n\r\n\r", &lim()),
            Ok(None)
        ));
        // Too many headers.
        let mut block = "NATS/1.0\r\n".to_string();
        for _ in 0..=MAX_HEADERS {
            block.push_str("a:\r\n");
        }
        block.push_str("\r\n");
        bad(&hmsg(&block));
    }

    #[test]
    fn msg_malformed_lines() {
        bad(b"MSG a 1\r\n");
        bad(b"MSG a\r\n");
        bad(b"MSG a 1 r s 2\r\n");
        bad(b"MSG a x 2\r\nhi\r\n");
        bad(b"MSG a 1 +2\r\nhi\r\n");
        bad(b"MSG a 1 -2\r\n");
        bad(b"MSG a 1 2x\r\n");
        bad(b"MSG a 1 0x2\r\n");
        bad(b"MSG a 1 18446744073709551616\r\n");
        bad(b"MSG a 18446744073709551616 2\r\nhi\r\n");
        bad(b"MSG a 1 99999999999999999999999\r\n");
        bad(b"HMSG a 1 12\r\n");
        bad(b"HMSG a 1 r s 12 12\r\n");
        bad(b"HMSG a 1 x 12\r\n");
        bad(b"MSG a\x001 2\r\n");
        bad(b"MSG \xff 1 2\r\nhi\r\n");
    }

    #[test]
    fn payload_must_end_with_crlf() {
        bad(b"MSG a 1 2\r\nhiX\n");
        bad(b"MSG a 1 2\r\nhi\n\r");
        bad(b"MSG a 1 2\r\nhi\r\r");
        bad(b"MSG a 1 1\r\nhi\r\n");
        let block = "NATS/1.0\r\n\r\n";
        bad(format!("HMSG a 1 12 13\r\n{block}xy\r\n").as_bytes());
        // Not yet arrived: incomplete, not an error.
        assert_eq!(parse(b"MSG a 1 2\r\nhi\r", &lim()), Ok(None));
    }

    #[test]
    fn bare_lf_and_controls() {
        bad(b"PING\n");
        bad(b"\n");
        bad(b"PI\rNG\r\n");
        bad(b"INFO {\"a\":\"\x7f\"}\r\n");
    }

    #[test]
    fn pipelined() {
        let mut buf = INFO.to_vec();
        buf.extend_from_slice(b"+OK\r\nPING\r\nMSG a 1 r 2\r\nhi\r\n");
        buf.extend_from_slice(&hmsg("NATS/1.0 503\r\n\r\n"));
        buf.extend_from_slice(b"-ERR 'Stale Connection'\r\nPONG\r\nMSG b");
        let mut rest = &buf[..];
        let mut ops = Vec::new();
        while let Some((op, n)) = parse(rest, &lim()).unwrap() {
            assert!(n > 0 && n <= rest.len());
            ops.push(op);
            rest = &rest[n..];
        }
        assert_eq!(rest, b"MSG b");
        assert_eq!(ops.len(), 7);
        assert!(matches!(ops[0], ServerOp::Info(_)));
        assert_eq!(ops[1], ServerOp::Ok);
        assert_eq!(ops[2], ServerOp::Ping);
        assert_eq!(msg(ops[3].clone()).payload, b"hi");
        assert_eq!(msg(ops[4].clone()).status, Some(503));
        assert_eq!(ops[5], ServerOp::Err("Stale Connection".into()));
        assert_eq!(ops[6], ServerOp::Pong);
    }

    #[test]
    fn line_bounds() {
        let small = Limits {
            max_control_line: 10,
            max_payload: 16,
        };
        // Exactly the limit (10 bytes of line) is fine.
        assert_eq!(
            parse(b"-ERR 'abc'\r\n", &small),
            Ok(Some((ServerOp::Err("abc".into()), 12)))
        );
        // Ten bytes and a CR: still possibly the end.
        assert_eq!(parse(b"-ERR 'abc'\r", &small), Ok(None));
        assert_eq!(parse(b"-ERR 'abc'", &small), Ok(None));
        // Eleven bytes of line without its end: too long, at once.
        assert_eq!(parse(b"-ERR 'abcd'", &small), Err(NatsError::LineTooLong));
        assert_eq!(parse(b"-ERR 'abcd'\r", &small), Err(NatsError::LineTooLong));
        assert_eq!(
            parse(b"-ERR 'abcd'\r\n", &small),
            Err(NatsError::LineTooLong)
        );
        assert_eq!(
            parse(b"-ERR 'abc'\rxxxxx", &small),
            Err(NatsError::LineTooLong)
        );
        // A long line with no end, with default limits.
        let long = vec![b'A'; 4097];
        assert_eq!(parse(&long, &lim()), Err(NatsError::LineTooLong));
        assert_eq!(parse(&long[..4096], &lim()), Ok(None));
        // Zero limit: only an empty line would fit, and that is malformed.
        let zero = Limits {
            max_control_line: 0,
            max_payload: 0,
        };
        assert_eq!(parse(b"P", &zero), Err(NatsError::LineTooLong));
        assert_eq!(parse(b"\r", &zero), Ok(None));
        assert!(matches!(
            parse(b"\r\n", &zero),
            Err(NatsError::Malformed(_))
        ));
        let huge = Limits {
            max_control_line: usize::MAX,
            max_payload: usize::MAX,
        };
        assert_eq!(parse(b"PING", &huge), Ok(None));
        assert_eq!(
            parse(b"MSG a 1 18446744073709551615\r\n", &huge),
            Err(NatsError::PayloadTooBig(usize::MAX))
        );
        assert_eq!(
            parse(b"MSG a 1 5\r\nhello\r\n", &huge).unwrap().unwrap().1,
            18
        );
    }

    #[test]
    fn payload_bound_before_payload() {
        let small = Limits {
            max_control_line: 64,
            max_payload: 16,
        };
        assert_eq!(
            parse(b"MSG a 1 17\r\n", &small),
            Err(NatsError::PayloadTooBig(17))
        );
        assert_eq!(parse(b"MSG a 1 16\r\n", &small), Ok(None));
        assert_eq!(
            parse(b"HMSG a 1 12 17\r\n", &small),
            Err(NatsError::PayloadTooBig(17))
        );
        assert_eq!(parse(b"HMSG a 1 12 16\r\n", &small), Ok(None));
        assert_eq!(
            parse(b"MSG a 1 8388609\r\n", &lim()),
            Err(NatsError::PayloadTooBig(8388609))
        );
        assert_eq!(
            parse(b"MSG a 1 18446744073709551615\r\n", &lim()),
            Err(NatsError::PayloadTooBig(usize::MAX))
        );
    }

    #[test]
    fn encoders_exact_bytes() {
        let mut out = Vec::new();
        publish(&mut out, "a.b", None, b"hi");
        assert_eq!(out, b"PUB a.b 2\r\nhi\r\n");
        out.clear();
        publish(&mut out, "a.b", Some("_INBOX.1"), b"");
        assert_eq!(out, b"PUB a.b _INBOX.1 0\r\n\r\n");
        out.clear();
        hpublish(
            &mut out,
            "a",
            Some("r"),
            &[("K", "v"), ("K2", "w x")],
            b"pay",
        );
        let block = "NATS/1.0\r\nK: v\r\nK2: w x\r\n\r\n";
        let expect = format!(
            "HPUB a r {} {}\r\n{block}pay\r\n",
            block.len(),
            block.len() + 3
        );
        assert_eq!(String::from_utf8(out).unwrap(), expect);
        assert!(expect.starts_with("HPUB a r 27 30\r\n"));
        let mut out = Vec::new();
        hpublish(&mut out, "a", None, &[], b"");
        assert_eq!(out, b"HPUB a 12 12\r\nNATS/1.0\r\n\r\n\r\n");
        out.clear();
        subscribe(&mut out, "a.*.>", None, 7);
        subscribe(&mut out, "a", Some("q1"), 8);
        unsubscribe(&mut out, 7, None);
        unsubscribe(&mut out, 8, Some(5));
        ping(&mut out);
        pong(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "SUB a.*.> 7\r\nSUB a q1 8\r\nUNSUB 7\r\nUNSUB 8 5\r\nPING\r\nPONG\r\n"
        );
    }

    #[test]
    fn encoders_refuse_what_could_split_an_op() {
        let mut out = Vec::new();
        publish(&mut out, "a\r\nPUB b 0\r\n", None, b"");
        publish(&mut out, "a b", None, b"");
        publish(&mut out, "a.*", None, b"");
        publish(&mut out, "a", Some("r x"), b"");
        publish(&mut out, "", None, b"");
        hpublish(&mut out, "a.>", None, &[], b"");
        hpublish(&mut out, "a", Some(""), &[], b"");
        subscribe(&mut out, "a b", None, 1);
        subscribe(&mut out, "a", Some("q 1"), 1);
        subscribe(&mut out, "a", Some("q.*"), 1);
        assert!(out.is_empty(), "{:?}", String::from_utf8_lossy(&out));

        // Bad header names dropped; control bytes in values become spaces.
        hpublish(
            &mut out,
            "a",
            None,
            &[
                ("Bad Name", "x"),
                ("", "y"),
                ("A:B", "z"),
                ("Ok", "1\r\nInjected: 2"),
            ],
            b"",
        );
        let block = "NATS/1.0\r\nOk: 1  Injected: 2\r\n\r\n";
        let expect = format!("HPUB a {} {}\r\n{block}\r\n", block.len(), block.len());
        assert_eq!(String::from_utf8(out).unwrap(), expect);
    }

    #[test]
    fn connect_json() {
        let mut out = Vec::new();
        connect(
            &mut out,
            &ConnectOpts {
                name: "fed\"mcp\r\n",
                user: None,
                pass: None,
                auth_token: None,
                tls_required: false,
            },
        );
        assert!(out.starts_with(b"CONNECT {"));
        assert!(out.ends_with(b"}\r\n"));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out[8..out.len() - 2]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "verbose": false, "pedantic": false, "tls_required": false,
                "name": "fed\"mcp\r\n", "lang": "rust", "version": env!("CARGO_PKG_VERSION"),
                "protocol": 1, "headers": true, "no_responders": true, "echo": true
            })
        );
        let exact = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"tls_required\":false,\"name\":\"fed\\\"mcp\\r\\n\",\"lang\":\"rust\",\"version\":\"{}\",\"protocol\":1,\"headers\":true,\"no_responders\":true,\"echo\":true}}\r\n",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(String::from_utf8(out).unwrap(), exact);

        let mut out = Vec::new();
        let opts = ConnectOpts {
            name: "n",
            user: Some("u"),
            pass: Some("p"),
            auth_token: Some("t"),
            tls_required: true,
        };
        connect(&mut out, &opts);
        let v: serde_json::Value = serde_json::from_slice(&out[8..out.len() - 2]).unwrap();
        assert_eq!(v["user"], "u");
        assert_eq!(v["pass"], "p");
        assert_eq!(v["auth_token"], "t");
        assert_eq!(v["tls_required"], true);
        let dbg = format!("{opts:?}");
        assert!(!dbg.contains("\"p\"") && !dbg.contains("\"t\"") && dbg.contains("redacted"));
    }

    /// What a server does with our PUB/HPUB: deliver it back as MSG/HMSG on `sid`.
    fn server_echo(frame: &[u8], sid: u64) -> Vec<u8> {
        let nl = frame.windows(2).position(|w| w == b"\r\n").unwrap();
        let line = std::str::from_utf8(&frame[..nl]).unwrap();
        let mut f: Vec<&str> = line.split(' ').collect();
        let op = f.remove(0);
        let new_op = match op {
            "PUB" => "MSG",
            "HPUB" => "HMSG",
            _ => panic!("{op}"),
        };
        let subject = f.remove(0);
        let sid = sid.to_string();
        let mut echo = format!("{new_op} {subject} {sid} {}", f.join(" ")).into_bytes();
        echo.extend_from_slice(&frame[nl..]);
        echo
    }

    #[test]
    fn round_trip() {
        let payload: Vec<u8> = (0..=255u8).collect();
        let mut out = Vec::new();
        publish(&mut out, "fed.peer.abc", Some("_INBOX.z"), &payload);
        let m = msg(every_split(&server_echo(&out, 42)));
        assert_eq!(
            m,
            Msg {
                subject: "fed.peer.abc".into(),
                sid: 42,
                reply: Some("_INBOX.z".into()),
                status: None,
                headers: vec![],
                payload: payload.clone(),
            }
        );
        out.clear();
        hpublish(
            &mut out,
            "x",
            None,
            &[("Nats-Msg-Id", "id 1"), ("A", "")],
            &payload,
        );
        let m = msg(every_split(&server_echo(&out, 1)));
        assert_eq!(m.status, None);
        assert_eq!(
            m.headers,
            vec![
                ("Nats-Msg-Id".into(), "id 1".into()),
                ("A".into(), "".into())
            ]
        );
        assert_eq!(m.payload, payload);
    }

    #[test]
    fn subjects() {
        for s in ["a", "a.b.c", "_INBOX.x1", "fed.ü.日本", "a-b_c"] {
            assert!(valid_subject(s, false), "{s}");
            assert!(valid_subject(s, true), "{s}");
        }
        for s in ["*", "a.*", "a.*.b", ">", "a.>", "*.>"] {
            assert!(!valid_subject(s, false), "{s}");
            assert!(valid_subject(s, true), "{s}");
        }
        for s in [
            "", ".", "a.", ".a", "a..b", "a b", "a\tb", "a\r\nb", "a\0", "a.>.b", ">.a", "a*",
            "a.b>", "*a", "a\u{a0}b", "a\u{85}",
        ] {
            assert!(!valid_subject(s, false), "{s:?}");
            assert!(!valid_subject(s, true), "{s:?}");
        }
        let max = "a".repeat(MAX_SUBJECT);
        assert!(valid_subject(&max, false));
        assert!(!valid_subject(&format!("{max}b"), false));
    }

    #[test]
    fn hex_tokens() {
        assert_eq!(token_hex(""), "");
        assert_eq!(token_hex("a.b c"), "612e622063");
        assert_eq!(token_hex("é"), "c3a9");
        assert_eq!(token_hex("\u{7f}\u{0}"), "7f00");
        let t = token_hex("peer.with spaces\r\n>*");
        assert!(valid_subject(&format!("fed.{t}.x"), false));
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            NatsError::LineTooLong.to_string(),
            "NATS control line too long"
        );
        assert!(NatsError::PayloadTooBig(9).to_string().contains('9'));
        assert!(malformed("x").to_string().ends_with(": x"));
    }
}
