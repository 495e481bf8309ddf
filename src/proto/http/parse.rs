//! The HTTP/1.1 request-head parser: request line, header fields, and the framing decision
//! (no body, `Content-Length`, or chunked) for one request at the start of a byte buffer.
//!
//! What it owns: the grammar of RFC 9112 §2–§3 and §5–§6 as the proxy accepts it, the head
//! limits of the wire contract (§3: over 16 KiB → `431`), and the mapping of every malformed
//! head to one [`HeadError`], whose `status()`/`code()` are the only place those errors meet the
//! contract's numbers and codes.
//!
//! Invariants:
//! - [`parse_head`] is a pure function of its input: no I/O, no clock, no state between calls.
//!   Callers hand it the whole buffer again after each read; one call is O(`buf.len()`), capped
//!   at [`MAX_HEAD_BYTES`] bytes looked at, plus the allocation of the finished head.
//! - Prefix-consistent: if a prefix of some input yields an error, the whole input yields the
//!   same error; if a prefix yields a head, the whole input yields the same head and length.
//!   Lines are validated in order as soon as they are complete (a binary or TLS client is
//!   refused on its first bytes), and every check that needs the whole head runs only once the
//!   blank line has arrived.
//! - `Ok(None)` is only ever returned while `buf.len() <= MAX_HEAD_BYTES`.
//! - A [`RequestHead`] exists only after every check passed, so its accessors cannot fail.
//!
//! Choices where RFC 9112 leaves room (recorded for `docs/`):
//! - Line ends: CRLF, and a bare LF is accepted as a line terminator (RFC 9112 §2.2). A CR not
//!   directly followed by LF is rejected anywhere in the head.
//! - Up to [`MAX_LEADING_EMPTY_LINES`] empty lines before the request line are skipped (§2.2);
//!   one more is a `400`. They count toward the 16 KiB and toward the returned length.
//! - The request line is `method SP target SP HTTP/x.y` with single spaces. The method is a
//!   case-sensitive token (`get` is [`Method::Other`]). `HTTP/1.2`–`HTTP/1.9` are served as 1.1
//!   (RFC 9110 §6.2); `HTTP/0.9`, `HTTP/2`, `HTTP/2.0`, `HTTP/3` … are `505`; anything else
//!   (`http/1.1`, `HTTP/1`, `HTTP/1.10`) is `400`.
//! - The target must be origin-form (`/…`), or `*` with `OPTIONS`. Absolute-form and
//!   authority-form are `400`: the proxy is an origin, never a forward proxy (a deliberate
//!   departure from the "MUST accept absolute-form" of §3.2.2). Target bytes must be visible
//!   ASCII without `#`; percent-escapes are not checked here (see [`percent_decode`]).
//! - Header fields: a token name, no whitespace before the colon, no obs-fold (`400`). Values
//!   may hold SP, HTAB, visible ASCII and obs-text (bytes ≥ 0x80); any other control byte
//!   (NUL, bare CR, DEL, …) is `400`. Values are stored with `String::from_utf8_lossy`, so
//!   non-UTF-8 obs-text becomes U+FFFD; nothing the proxy compares is ever outside ASCII.
//! - `Host` is neither required nor checked: the proxy serves one origin and never routes by it.
//! - Body framing (§6.3): `Transfer-Encoding` together with `Content-Length` is `400`; in an
//!   HTTP/1.0 request it is `400`; any coding but a single `chunked` (case-insensitive, empty
//!   list elements ignored) is `501`, except `chunked` named twice, which is malformed (`400`).
//!   `Content-Length` is a comma list of decimal values over all its fields; every element must
//!   be 1+ digits fitting a `u64` and all must be equal (`5, 5` is fine), else `400`.
//!   Without either field the request has no body.
//! - `Expect: 100-continue` is honoured for HTTP/1.1 only (RFC 9110 §10.1.1); other
//!   expectations are ignored.
//!
//! What it must never do: panic or index out of bounds on any input, allocate in proportion to
//! anything but the (bounded) head, or look past `MAX_HEAD_BYTES` bytes for the end of a head.

use std::fmt;

/// Longest request head, from its first byte through the blank line, in bytes (contract §3).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields in one request head; one more is `431`.
pub const MAX_HEADERS: usize = 100;
/// Empty lines skipped before a request line (RFC 9112 §2.2 asks for at least one).
pub const MAX_LEADING_EMPTY_LINES: usize = 4;

/// The request method, with the ones the proxy routes on named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    /// Any other valid method token; the exact text is in [`RequestHead::method_raw`].
    Other,
}

impl Method {
    fn from_token(token: &[u8]) -> Method {
        match token {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }
}

/// How the request body is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    /// No `Content-Length` and no `Transfer-Encoding`: the request has no body.
    None,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// A chunked body follows; decode it with `ChunkedDecoder`.
    Chunked,
}

/// One validated request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// The method token exactly as sent.
    pub method_raw: String,
    /// The path as sent (still percent-encoded); starts with `/`, or is `*` for `OPTIONS *`.
    pub path: String,
    /// The raw text after the first `?`, if there was one (possibly empty).
    pub query: Option<String>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1 (and higher 1.x minors).
    pub minor_version: u8,
    /// Header fields in arrival order: names lower-cased, values trimmed of OWS.
    pub headers: Vec<(String, String)>,
    pub body: BodyKind,
    /// HTTP/1.1: true unless `Connection: close`. HTTP/1.0: only with `Connection: keep-alive`
    /// (and no `close`).
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request.
    pub expect_continue: bool,
}

impl RequestHead {
    /// The first value of header `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether any `name` field, read as a comma-separated list, holds `token`
    /// (case-insensitive), e.g. `has_token("connection", "upgrade")`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| list_contains(v, token))
    }

    /// The decoded value of the first `key=value` pair of the query whose decoded key equals
    /// `key`. Pairs are split on `&`, `+` means a space, a pair without `=` has the value `""`.
    /// `None` when the key is absent or the first matching value does not decode
    /// (see [`percent_decode`]).
    pub fn query_param(&self, key: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if form_decode(k).as_deref() == Some(key) {
                return form_decode(v);
            }
        }
        None
    }
}

/// Why a request head was refused. Each maps to one status and one contract code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Head over [`MAX_HEAD_BYTES`] or more than [`MAX_HEADERS`] fields: `431`.
    TooLarge,
    /// Malformed head or ambiguous framing: `400`. The text says which rule was broken.
    BadRequest(&'static str),
    /// A transfer coding other than `chunked`: `501`.
    UnsupportedCoding,
    /// A well-formed version that is not HTTP/1.x: `505`.
    VersionNotSupported,
}

impl HeadError {
    /// The response status for this error.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge => 431,
            HeadError::BadRequest(_) => 400,
            HeadError::UnsupportedCoding => 501,
            HeadError::VersionNotSupported => 505,
        }
    }

    /// The contract's `error.code` for this error.
    pub fn code(&self) -> &'static str {
        match self {
            HeadError::TooLarge => "header_too_large",
            HeadError::BadRequest(_) => "bad_request",
            HeadError::UnsupportedCoding => "unsupported_transfer_coding",
            HeadError::VersionNotSupported => "http_version_not_supported",
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge => write!(
                f,
                "request head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} header fields"
            ),
            HeadError::BadRequest(why) => write!(f, "malformed request: {why}"),
            HeadError::UnsupportedCoding => {
                f.write_str("transfer coding not supported (only chunked is)")
            }
            HeadError::VersionNotSupported => f.write_str("HTTP version not supported"),
        }
    }
}

impl std::error::Error for HeadError {}

const MALFORMED_REQUEST_LINE: &str = "malformed request line";
const INVALID_METHOD: &str = "invalid method token";
const MALFORMED_VERSION: &str = "malformed HTTP version";
const INVALID_CONTENT_LENGTH: &str = "invalid Content-Length";
const CL_AND_TE: &str = "both Content-Length and Transfer-Encoding";
const DIFFERING_CL: &str = "differing Content-Length values";
const CHUNKED_TWICE: &str = "chunked applied more than once";
const EMPTY_TE: &str = "empty Transfer-Encoding";
const TOO_MANY_EMPTY_LINES: &str = "too many empty lines before the request line";

fn bad(why: &'static str) -> HeadError {
    HeadError::BadRequest(why)
}

/// Parse one request head at the start of `buf`.
///
/// - `Ok(None)`: the head is not complete yet; call again with more bytes. Only returned while
///   `buf.len() <= MAX_HEAD_BYTES`.
/// - `Ok(Some((head, n)))`: the head occupies `buf[..n]`, blank line included; the body or the
///   next pipelined request starts at `buf[n]`.
/// - `Err(e)`: the request must be refused with `e.status()`, and the connection closed.
///
/// Work: one pass over at most `MAX_HEAD_BYTES` bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let mut pos = 0usize;
    let mut empty_lines = 0usize;
    let mut request: Option<RequestLine<'_>> = None;
    let mut fields: Vec<(&[u8], &[u8])> = Vec::new();

    while let Some(offset) = window[pos..].iter().position(|&b| b == b'\n') {
        let end = pos + offset;
        let line = strip_cr(&window[pos..end]);
        pos = end + 1;
        if line.is_empty() {
            match request.take() {
                Some(request_line) => {
                    let head = finish(request_line, &fields)?;
                    return Ok(Some((head, pos)));
                }
                None => {
                    empty_lines += 1;
                    if empty_lines > MAX_LEADING_EMPTY_LINES {
                        return Err(bad(TOO_MANY_EMPTY_LINES));
                    }
                }
            }
        } else if request.is_none() {
            request = Some(parse_request_line(line)?);
        } else {
            if fields.len() >= MAX_HEADERS {
                return Err(HeadError::TooLarge);
            }
            fields.push(parse_field_line(line)?);
        }
    }

    if request.is_none() {
        check_partial_method(&window[pos..])?;
    }
    if buf.len() > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    Ok(None)
}

/// The pieces of a validated request line, borrowed from the buffer.
struct RequestLine<'a> {
    method: &'a [u8],
    target: &'a [u8],
    minor_version: u8,
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// tchar from RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s
        && is_ows(*first)
    {
        s = rest;
    }
    while let [rest @ .., last] = s
        && is_ows(*last)
    {
        s = rest;
    }
    s
}

fn trim_ows_str(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

fn list_contains(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|element| trim_ows_str(element).eq_ignore_ascii_case(token))
}

/// Early refusal of an unfinished request line: every byte before the first SP must be a
/// tchar. Stops at SP or CR so it can only report what the complete line would report too
/// (a CR may still turn out to end an empty line).
fn check_partial_method(partial: &[u8]) -> Result<(), HeadError> {
    for &b in partial {
        if b == b' ' || b == b'\r' {
            break;
        }
        if !is_tchar(b) {
            return Err(bad(INVALID_METHOD));
        }
    }
    Ok(())
}

/// `method SP request-target SP HTTP-version`, the line without its terminator.
/// The method is checked first so that [`check_partial_method`] agrees with this function.
fn parse_request_line(line: &[u8]) -> Result<RequestLine<'_>, HeadError> {
    let first_space = line.iter().position(|&b| b == b' ');
    let method = &line[..first_space.unwrap_or(line.len())];
    if !method.iter().all(|&b| is_tchar(b)) {
        return Err(bad(INVALID_METHOD));
    }
    let Some(first_space) = first_space else {
        return Err(bad(MALFORMED_REQUEST_LINE));
    };
    if method.is_empty() {
        return Err(bad(MALFORMED_REQUEST_LINE));
    }
    if line.contains(&b'\r') {
        return Err(bad("bare CR in request line"));
    }
    let rest = &line[first_space + 1..];
    let Some(second_space) = rest.iter().position(|&b| b == b' ') else {
        return Err(bad(MALFORMED_REQUEST_LINE));
    };
    let target = &rest[..second_space];
    let version = &rest[second_space + 1..];
    if target.is_empty() || version.contains(&b' ') {
        return Err(bad(MALFORMED_REQUEST_LINE));
    }
    let minor_version = parse_version(version)?;
    validate_target(method, target)?;
    Ok(RequestLine {
        method,
        target,
        minor_version,
    })
}

/// `HTTP/1.0` → 0, `HTTP/1.1`..`HTTP/1.9` → 1; other single-digit majors → 505.
fn parse_version(version: &[u8]) -> Result<u8, HeadError> {
    let Some(rest) = version.strip_prefix(b"HTTP/") else {
        return Err(bad(MALFORMED_VERSION));
    };
    match *rest {
        [major] if major.is_ascii_digit() => {
            if major == b'1' {
                Err(bad(MALFORMED_VERSION))
            } else {
                Err(HeadError::VersionNotSupported)
            }
        }
        [major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit() => {
            if major != b'1' {
                Err(HeadError::VersionNotSupported)
            } else if minor == b'0' {
                Ok(0)
            } else {
                Ok(1)
            }
        }
        _ => Err(bad(MALFORMED_VERSION)),
    }
}

fn validate_target(method: &[u8], target: &[u8]) -> Result<(), HeadError> {
    if !target
        .iter()
        .all(|&b| (0x21..=0x7e).contains(&b) && b != b'#')
    {
        return Err(bad("invalid byte in request-target"));
    }
    if target == b"*" {
        if method == b"OPTIONS" {
            return Ok(());
        }
        return Err(bad("asterisk-form is only allowed with OPTIONS"));
    }
    if target.first() != Some(&b'/') {
        return Err(bad("request-target must be origin-form"));
    }
    Ok(())
}

/// `field-name ":" OWS field-value OWS`, the line without its terminator (never empty).
fn parse_field_line(line: &[u8]) -> Result<(&[u8], &[u8]), HeadError> {
    if line.first().is_some_and(|&b| is_ows(b)) {
        return Err(bad("obsolete line folding"));
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(bad("header line without a colon"));
    };
    let name = &line[..colon];
    if name.is_empty() {
        return Err(bad("empty header name"));
    }
    if name.last().is_some_and(|&b| is_ows(b)) {
        return Err(bad("whitespace before the colon"));
    }
    if !name.iter().all(|&b| is_tchar(b)) {
        return Err(bad("invalid header name"));
    }
    let value = trim_ows(&line[colon + 1..]);
    for &b in value {
        match b {
            b'\t' | 0x20..=0x7e | 0x80..=0xff => {}
            0 => return Err(bad("NUL in header value")),
            b'\r' => return Err(bad("bare CR in header value")),
            _ => return Err(bad("control character in header value")),
        }
    }
    Ok((name, value))
}

/// Build the head once the blank line is in: owned strings and the framing decision.
fn finish(line: RequestLine<'_>, fields: &[(&[u8], &[u8])]) -> Result<RequestHead, HeadError> {
    let headers: Vec<(String, String)> = fields
        .iter()
        .map(|(name, value)| {
            (
                String::from_utf8_lossy(name).to_ascii_lowercase(),
                String::from_utf8_lossy(value).into_owned(),
            )
        })
        .collect();
    let body = body_kind(line.minor_version, &headers)?;

    // Validated: the method is tchars and the target visible ASCII, so both are UTF-8.
    let method_raw = String::from_utf8_lossy(line.method).into_owned();
    let target = String::from_utf8_lossy(line.target);
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
        None => (target.into_owned(), None),
    };

    let mut head = RequestHead {
        method: Method::from_token(line.method),
        method_raw,
        path,
        query,
        minor_version: line.minor_version,
        headers,
        body,
        keep_alive: false,
        expect_continue: false,
    };
    let close = head.has_token("connection", "close");
    head.keep_alive = if head.minor_version == 0 {
        !close && head.has_token("connection", "keep-alive")
    } else {
        !close
    };
    head.expect_continue = head.minor_version >= 1
        && head
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    Ok(head)
}

/// RFC 9112 §6.3 for requests, with the contract's statuses.
fn body_kind(minor_version: u8, headers: &[(String, String)]) -> Result<BodyKind, HeadError> {
    let mut transfer_encoding = false;
    let mut chunked = 0usize;
    let mut other_coding = false;
    let mut content_length: Option<u64> = None;

    for (name, value) in headers {
        if name == "transfer-encoding" {
            transfer_encoding = true;
            for coding in value.split(',').map(trim_ows_str) {
                if coding.is_empty() {
                    continue;
                }
                if coding.eq_ignore_ascii_case("chunked") {
                    chunked += 1;
                } else {
                    other_coding = true;
                }
            }
        } else if name == "content-length" {
            for element in value.split(',').map(trim_ows_str) {
                let length = parse_decimal(element).ok_or(bad(INVALID_CONTENT_LENGTH))?;
                match content_length {
                    Some(previous) if previous != length => {
                        return Err(bad(DIFFERING_CL));
                    }
                    _ => content_length = Some(length),
                }
            }
        }
    }

    if transfer_encoding {
        if minor_version == 0 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if content_length.is_some() {
            return Err(bad(CL_AND_TE));
        }
        if other_coding {
            return Err(HeadError::UnsupportedCoding);
        }
        return match chunked {
            0 => Err(bad(EMPTY_TE)),
            1 => Ok(BodyKind::Chunked),
            _ => Err(bad(CHUNKED_TWICE)),
        };
    }
    Ok(content_length.map_or(BodyKind::None, BodyKind::Length))
}

/// 1 or more ASCII digits that fit a `u64`.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decode `%XX` escapes (either hex case). `+` stays `+` (paths); see
/// [`RequestHead::query_param`] for query values.
///
/// `None` for a truncated or non-hex escape, a result that is not UTF-8, or one holding NUL.
pub fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let high = hex_value(bytes.next()?)?;
            let low = hex_value(bytes.next()?)?;
            out.push(high << 4 | low);
        } else {
            out.push(b);
        }
    }
    if out.contains(&0) {
        return None;
    }
    String::from_utf8(out).ok()
}

/// `application/x-www-form-urlencoded` value decoding: `+` is a space, then `%XX`.
fn form_decode(s: &str) -> Option<String> {
    if s.contains('+') {
        percent_decode(&s.replace('+', " "))
    } else {
        percent_decode(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Result<Option<(RequestHead, usize)>, HeadError>;

    /// Split points to try for `len` bytes: all of them for small inputs, a stride plus the
    /// neighbourhood of the size limit for big ones (every split of 16 KiB is 16 K parses).
    fn split_points(len: usize) -> Vec<usize> {
        if len <= 2048 {
            return (0..=len).collect();
        }
        let mut points: Vec<usize> = (0..=len).step_by(61).collect();
        let near_limit = MAX_HEAD_BYTES.saturating_sub(4)..=MAX_HEAD_BYTES + 4;
        points.extend(near_limit.filter(|&k| k <= len));
        points.push(len);
        points
    }

    /// Parse `input` whole, and assert every prefix agrees with it: a prefix is either
    /// incomplete (and within the limit) or gives exactly the whole input's answer. Then feed
    /// it as a real caller would, in pieces, and compare again.
    fn parse_checked(input: &[u8]) -> Parsed {
        let full = parse_head(input);
        for k in split_points(input.len()) {
            match parse_head(&input[..k]) {
                Ok(None) => assert!(k <= MAX_HEAD_BYTES, "Ok(None) over the limit at {k}"),
                other => assert_eq!(other, full, "prefix of {k} bytes disagrees"),
            }
        }
        for piece in [1usize, 7, 100] {
            if input.len() > 2048 && piece < 100 {
                continue;
            }
            let mut buf = Vec::new();
            let mut result = Ok(None);
            for chunk in input.chunks(piece) {
                buf.extend_from_slice(chunk);
                result = parse_head(&buf);
                if !matches!(result, Ok(None)) {
                    break;
                }
            }
            assert_eq!(result, full, "fed in pieces of {piece}");
        }
        full
    }

    fn head(input: &[u8]) -> RequestHead {
        match parse_checked(input) {
            Ok(Some((head, n))) => {
                assert_eq!(n, input.len(), "head length");
                head
            }
            other => panic!("expected a head for {:?}, got {other:?}", show(input)),
        }
    }

    fn show(input: &[u8]) -> String {
        String::from_utf8_lossy(&input[..input.len().min(120)]).into_owned()
    }

    #[test]
    fn good_heads() {
        let h = head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.method_raw, "GET");
        assert_eq!(h.path, "/");
        assert_eq!(h.query, None);
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.headers, vec![("host".to_owned(), "a".to_owned())]);
        assert_eq!(h.body, BodyKind::None);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);

        let h = head(
            b"GET /v1/control?token=abc%2Fd&x=1 HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\
              Upgrade: WebSocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        assert_eq!(h.path, "/v1/control");
        assert_eq!(h.query.as_deref(), Some("token=abc%2Fd&x=1"));
        assert!(h.has_token("Connection", "upgrade"));
        assert!(h.has_token("upgrade", "websocket"));
        assert!(!h.has_token("upgrade", "h2c"));
        assert_eq!(h.header("SEC-WEBSOCKET-VERSION"), Some("13"));
        assert_eq!(h.query_param("token").as_deref(), Some("abc/d"));

        let h = head(b"GET /a HTTP/1.0\r\n\r\n");
        assert_eq!(h.minor_version, 0);
        assert!(!h.keep_alive);
        let h = head(b"GET /a HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(h.keep_alive);
        let h = head(b"GET /a HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head(b"GET / HTTP/1.1\r\nConnection: x\r\nConnection: CLOSE\r\n\r\n");
        assert!(!h.keep_alive, "close in a second Connection field");

        let h = head(b"POST /v1/messages HTTP/1.1\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.body, BodyKind::Length(5));
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(5));
        let h = head(b"POST / HTTP/1.1\r\ncontent-length: 5\r\nContent-Length: 005\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(5));
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(0));
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(u64::MAX));

        let h = head(b"PUT /v1/resources/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.method, Method::Put);
        assert_eq!(h.body, BodyKind::Chunked);
        let h = head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: ChUnKeD\r\n\r\n");
        assert_eq!(h.body, BodyKind::Chunked);
        let h = head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: , chunked ,\r\n\r\n");
        assert_eq!(h.body, BodyKind::Chunked);

        // Leading empty lines, bare LF terminators, mixed.
        let h = head(b"\r\n\n\r\n\r\nDELETE /x HTTP/1.1\nA: b\r\n\n");
        assert_eq!(h.method, Method::Delete);
        assert_eq!(h.header("a"), Some("b"));
        let h = head(b"HEAD / HTTP/1.1\n\n");
        assert_eq!(h.method, Method::Head);

        let h = head(b"OPTIONS * HTTP/1.1\r\n\r\n");
        assert_eq!((h.method, h.path.as_str()), (Method::Options, "*"));
        let h = head(b"OPTIONS /x? HTTP/1.1\r\n\r\n");
        assert_eq!(h.query.as_deref(), Some(""));
        let h = head(b"PATCH /x HTTP/1.1\r\n\r\n");
        assert_eq!((h.method, h.method_raw.as_str()), (Method::Other, "PATCH"));
        let h = head(b"get /x HTTP/1.1\r\n\r\n");
        assert_eq!(h.method, Method::Other, "methods are case-sensitive");

        // Values: OWS trimmed, inner whitespace kept, empty allowed, obs-text kept lossily.
        let h =
            head(b"GET / HTTP/1.1\r\nX:   a \t b \t\r\nY:\r\nZ: caf\xc3\xa9\r\nW: \xff\r\n\r\n");
        assert_eq!(h.header("x"), Some("a \t b"));
        assert_eq!(h.header("y"), Some(""));
        assert_eq!(h.header("z"), Some("café"));
        assert_eq!(h.header("w"), Some("\u{fffd}"));

        let h = head(b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n");
        assert!(h.expect_continue);
        let h = head(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert!(!h.expect_continue, "ignored for HTTP/1.0");

        let h = head(b"GET / HTTP/1.7\r\n\r\n");
        assert_eq!(h.minor_version, 1, "higher 1.x minors are served as 1.1");

        // Target characters that real clients send unescaped.
        let h = head(b"GET /a/b;c=d/%7Bx%7D/{y}|z?q=\"1\" HTTP/1.1\r\n\r\n");
        assert_eq!(h.path, "/a/b;c=d/%7Bx%7D/{y}|z");
    }

    #[test]
    fn limits_at_the_edge() {
        // Exactly MAX_HEADERS fields.
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            req.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        assert_eq!(head(&req).headers.len(), MAX_HEADERS);
        // One more.
        let mut over = req[..req.len() - 2].to_vec();
        over.extend_from_slice(b"X-last: v\r\n\r\n");
        assert_eq!(parse_checked(&over), Err(HeadError::TooLarge));

        // A head of exactly MAX_HEAD_BYTES, then one byte more.
        let exact = sized_head(MAX_HEAD_BYTES);
        assert_eq!(exact.len(), MAX_HEAD_BYTES);
        head(&exact);
        assert_eq!(
            parse_checked(&sized_head(MAX_HEAD_BYTES + 1)),
            Err(HeadError::TooLarge)
        );

        // A head that never ends: TooLarge as soon as the buffer passes the limit.
        let mut endless = b"GET / HTTP/1.1\r\nX: ".to_vec();
        endless.resize(MAX_HEAD_BYTES, b'a');
        assert_eq!(parse_head(&endless), Ok(None));
        endless.push(b'a');
        assert_eq!(parse_head(&endless), Err(HeadError::TooLarge));
        endless.resize(40_000, b'a');
        assert_eq!(parse_checked(&endless), Err(HeadError::TooLarge));
    }

    /// `GET / HTTP/1.1`, one padding header, blank line: `len` bytes in all.
    fn sized_head(len: usize) -> Vec<u8> {
        let mut req = b"GET / HTTP/1.1\r\nX: ".to_vec();
        let fill = len - req.len() - 4;
        req.resize(req.len() + fill, b'p');
        req.extend_from_slice(b"\r\n\r\n");
        req
    }

    #[test]
    fn bad_heads() {
        use HeadError::*;
        let cases: &[(&[u8], HeadError)] = &[
            // Request line.
            (b"GET /\r\n\r\n", bad(MALFORMED_REQUEST_LINE)),
            (b"GET\r\n\r\n", bad(MALFORMED_REQUEST_LINE)),
            (b" GET / HTTP/1.1\r\n\r\n", bad(MALFORMED_REQUEST_LINE)),
            (b"GET  / HTTP/1.1\r\n\r\n", bad(MALFORMED_REQUEST_LINE)),
            (b"GET / HTTP/1.1 \r\n\r\n", bad(MALFORMED_REQUEST_LINE)),
            (b"GET / HTTP/1.1 extra\r\n\r\n", bad(MALFORMED_REQUEST_LINE)),
            (b"GET\t/ HTTP/1.1\r\n\r\n", bad(INVALID_METHOD)),
            (b"G(T / HTTP/1.1\r\n\r\n", bad(INVALID_METHOD)),
            (b"G\0T / HTTP/1.1\r\n\r\n", bad(INVALID_METHOD)),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                bad(INVALID_METHOD),
            ),
            (b"\r\r\n\r\n", bad(INVALID_METHOD)),
            (b"GE\rT / HTTP/1.1\r\n\r\n", bad(INVALID_METHOD)),
            (b"GET /\r HTTP/1.1\r\n\r\n", bad("bare CR in request line")),
            (b"GET / HTTP/1.1\r\r\n\r\n", bad("bare CR in request line")),
            (b"GET / http/1.1\r\n\r\n", bad(MALFORMED_VERSION)),
            (b"GET / HTTP/1\r\n\r\n", bad(MALFORMED_VERSION)),
            (b"GET / HTTP/1.10\r\n\r\n", bad(MALFORMED_VERSION)),
            (b"GET / HTTP/1.x\r\n\r\n", bad(MALFORMED_VERSION)),
            (b"GET / HTTP/11\r\n\r\n", bad(MALFORMED_VERSION)),
            (b"GET / HTTP\r\n\r\n", bad(MALFORMED_VERSION)),
            (
                b"GET http://a/ HTTP/1.1\r\n\r\n",
                bad("request-target must be origin-form"),
            ),
            (
                b"CONNECT a:443 HTTP/1.1\r\n\r\n",
                bad("request-target must be origin-form"),
            ),
            (
                b"GET * HTTP/1.1\r\n\r\n",
                bad("asterisk-form is only allowed with OPTIONS"),
            ),
            (
                b"GET /a#b HTTP/1.1\r\n\r\n",
                bad("invalid byte in request-target"),
            ),
            (
                b"GET /\x7f HTTP/1.1\r\n\r\n",
                bad("invalid byte in request-target"),
            ),
            (
                b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n",
                bad("invalid byte in request-target"),
            ),
            (
                b"GET /\0 HTTP/1.1\r\n\r\n",
                bad("invalid byte in request-target"),
            ),
            (
                b"\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                bad(TOO_MANY_EMPTY_LINES),
            ),
            // Versions that are well-formed but not 1.x.
            (b"GET / HTTP/2.0\r\n\r\n", VersionNotSupported),
            (b"GET / HTTP/2\r\n\r\n", VersionNotSupported),
            (b"GET / HTTP/3\r\n\r\n", VersionNotSupported),
            (b"GET / HTTP/0.9\r\n\r\n", VersionNotSupported),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", VersionNotSupported),
        ];
        // Header fields after `POST / HTTP/1.1`, then the blank line.
        let field_cases: &[(&[u8], HeadError)] = &[
            (b" X: a\r\n", bad("obsolete line folding")),
            (b"X: a\r\n\tb\r\n", bad("obsolete line folding")),
            (b"X : a\r\n", bad("whitespace before the colon")),
            (b"X\t: a\r\n", bad("whitespace before the colon")),
            (b": a\r\n", bad("empty header name")),
            (b"X a\r\n", bad("header line without a colon")),
            (b"X: a\r\n\r\r\n", bad("header line without a colon")),
            (b"X(y: a\r\n", bad("invalid header name")),
            (b"X y: a\r\n", bad("invalid header name")),
            (b"X\xc3\xa9: a\r\n", bad("invalid header name")),
            (b"X\ry: a\r\n", bad("invalid header name")),
            (b"X: a\rb\r\n", bad("bare CR in header value")),
            (b"X: a\r\r\n", bad("bare CR in header value")),
            (b"X: a\0b\r\n", bad("NUL in header value")),
            (b"X: a\x01b\r\n", bad("control character in header value")),
            (b"X: a\x7f\r\n", bad("control character in header value")),
            // Framing.
            (
                b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                bad(CL_AND_TE),
            ),
            (
                b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
                bad(CL_AND_TE),
            ),
            (
                b"Transfer-Encoding: gzip\r\nContent-Length: 5\r\n",
                bad(CL_AND_TE),
            ),
            (b"Content-Length: 5, 6\r\n", bad(DIFFERING_CL)),
            (
                b"Content-Length: 5\r\nContent-Length: 6\r\n",
                bad(DIFFERING_CL),
            ),
            (b"Content-Length: abc\r\n", bad(INVALID_CONTENT_LENGTH)),
            (b"Content-Length:\r\n", bad(INVALID_CONTENT_LENGTH)),
            (b"Content-Length: -1\r\n", bad(INVALID_CONTENT_LENGTH)),
            (b"Content-Length: +5\r\n", bad(INVALID_CONTENT_LENGTH)),
            (b"Content-Length: 5 5\r\n", bad(INVALID_CONTENT_LENGTH)),
            (b"Content-Length: 5,,5\r\n", bad(INVALID_CONTENT_LENGTH)),
            (b"Content-Length: 0x10\r\n", bad(INVALID_CONTENT_LENGTH)),
            (
                b"Content-Length: 18446744073709551616\r\n",
                bad(INVALID_CONTENT_LENGTH),
            ),
            (
                b"Content-Length: 99999999999999999999999\r\n",
                bad(INVALID_CONTENT_LENGTH),
            ),
            (
                b"Transfer-Encoding: chunked, chunked\r\n",
                bad(CHUNKED_TWICE),
            ),
            (
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                bad(CHUNKED_TWICE),
            ),
            (b"Transfer-Encoding:\r\n", bad(EMPTY_TE)),
            (b"Transfer-Encoding: ,\r\n", bad(EMPTY_TE)),
            // Codings other than chunked.
            (b"Transfer-Encoding: gzip\r\n", UnsupportedCoding),
            (b"Transfer-Encoding: gzip, chunked\r\n", UnsupportedCoding),
            (b"Transfer-Encoding: chunked, gzip\r\n", UnsupportedCoding),
            (b"Transfer-Encoding: identity\r\n", UnsupportedCoding),
            (b"Transfer-Encoding: chunked;q=1\r\n", UnsupportedCoding),
            (
                b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                UnsupportedCoding,
            ),
        ];
        let http10_te = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let cases = cases
            .iter()
            .map(|(input, e)| (input.to_vec(), e.clone()))
            .chain(field_cases.iter().map(|(fields, e)| {
                let input = [&b"POST / HTTP/1.1\r\n"[..], fields, b"\r\n"].concat();
                (input, e.clone())
            }))
            .chain([(http10_te, bad("Transfer-Encoding in an HTTP/1.0 request"))]);
        for (input, expected) in cases {
            assert_eq!(
                parse_checked(&input).map(|r| r.map(|(_, n)| n)),
                Err(expected),
                "input {:?}",
                show(&input)
            );
        }
    }

    #[test]
    fn errors_map_to_the_contract() {
        let table = [
            (HeadError::TooLarge, 431, "header_too_large"),
            (bad("x"), 400, "bad_request"),
            (
                HeadError::UnsupportedCoding,
                501,
                "unsupported_transfer_coding",
            ),
            (
                HeadError::VersionNotSupported,
                505,
                "http_version_not_supported",
            ),
        ];
        for (error, status, code) in table {
            assert_eq!((error.status(), error.code()), (status, code));
            assert!(!error.to_string().is_empty());
        }
        assert_eq!(bad("why").to_string(), "malformed request: why");
    }

    #[test]
    fn incomplete_heads_wait() {
        for input in [
            &b""[..],
            b"\r",
            b"\r\n",
            b"\r\n\r\n\r\n\r\n",
            b"G",
            b"GET",
            b"GET /",
            b"GET / HTTP/1.1",
            b"GET / HTTP/1.1\r",
            b"GET / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r",
        ] {
            assert_eq!(parse_head(input), Ok(None), "{:?}", show(input));
        }
        // Junk is refused on its first bytes, before any line is complete.
        assert_eq!(parse_head(b"\x16\x03"), Err(bad(INVALID_METHOD)));
        assert_eq!(parse_head(b"{\"json\":"), Err(bad(INVALID_METHOD)));
    }

    #[test]
    fn pipelined_heads() {
        let first = b"POST /v1/messages HTTP/1.1\r\nContent-Length: 2\r\n\r\n";
        let second = b"GET /healthz HTTP/1.1\r\n\r\n";
        let mut buf = first.to_vec();
        buf.extend_from_slice(b"{}");
        buf.extend_from_slice(second);
        buf.extend_from_slice(b"GET /rea");

        let Ok(Some((h1, n1))) = parse_head(&buf) else {
            panic!("first head")
        };
        assert_eq!(n1, first.len());
        assert_eq!(h1.body, BodyKind::Length(2));
        assert_eq!(&buf[n1..n1 + 2], b"{}");
        let rest = &buf[n1 + 2..];
        let Ok(Some((h2, n2))) = parse_head(rest) else {
            panic!("second head")
        };
        assert_eq!((h2.path.as_str(), n2), ("/healthz", second.len()));
        assert_eq!(parse_head(&rest[n2..]), Ok(None));

        // Two bodiless heads back to back, with bare-LF endings.
        let buf = b"GET /a HTTP/1.1\n\nGET /b HTTP/1.1\n\n";
        let Ok(Some((a, n))) = parse_head(buf) else {
            panic!("a")
        };
        assert_eq!((a.path.as_str(), n), ("/a", 17));
        let Ok(Some((b, m))) = parse_head(&buf[n..]) else {
            panic!("b")
        };
        assert_eq!((b.path.as_str(), n + m), ("/b", buf.len()));

        // A complete head followed by megabytes of body is not "too large".
        let mut big = first.to_vec();
        big.resize(first.len() + 100_000, b'x');
        assert_eq!(
            parse_head(&big).map(|r| r.map(|(_, n)| n)),
            Ok(Some(first.len()))
        );
    }

    #[test]
    fn query_params() {
        let h =
            head(b"GET /q?a=1&b=x+y&c=%2B&d&e=&a=2&tok%65n=t&f=%zz&g=%E2%82%AC HTTP/1.1\r\n\r\n");
        assert_eq!(h.query_param("a").as_deref(), Some("1"), "first match wins");
        assert_eq!(h.query_param("b").as_deref(), Some("x y"));
        assert_eq!(h.query_param("c").as_deref(), Some("+"));
        assert_eq!(h.query_param("d").as_deref(), Some(""));
        assert_eq!(h.query_param("e").as_deref(), Some(""));
        assert_eq!(
            h.query_param("token").as_deref(),
            Some("t"),
            "keys are decoded"
        );
        assert_eq!(h.query_param("f"), None, "bad escape");
        assert_eq!(h.query_param("g").as_deref(), Some("€"));
        assert_eq!(h.query_param("missing"), None);
        assert_eq!(head(b"GET /q HTTP/1.1\r\n\r\n").query_param("a"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(
            percent_decode("a+b").as_deref(),
            Some("a+b"),
            "+ is literal in paths"
        );
        assert_eq!(percent_decode("").as_deref(), Some(""));
        assert_eq!(percent_decode("%41%62c").as_deref(), Some("Abc"));
        assert_eq!(percent_decode("%c3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("é").as_deref(), Some("é"));
        assert_eq!(percent_decode("%00"), None, "NUL");
        assert_eq!(percent_decode("a\0"), None, "literal NUL");
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("a%"), None);
        assert_eq!(percent_decode("%2g"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
        assert_eq!(percent_decode("%c3"), None, "truncated UTF-8");
        assert_eq!(percent_decode("%c3%28"), None, "invalid UTF-8");
    }

    /// xorshift64: deterministic, no crates.
    struct XorShift(u64);

    impl XorShift {
        fn step(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.step() % n.max(1) as u64) as usize
        }
    }

    fn pick<'a>(rng: &mut XorShift, items: &[&'a [u8]]) -> &'a [u8] {
        items[rng.below(items.len())]
    }

    const METHODS: &[&[u8]] = &[
        b"GET", b"GET", b"POST", b"POST", b"PUT", b"OPTIONS", b"get", b"G(T", b"",
    ];
    const TARGETS: &[&[u8]] = &[
        b"/",
        b"/",
        b"/a?b=c+d&e=%41",
        b"/a?b=c+d&e=%41",
        b"*",
        b"/%2",
        b"http://x/",
        b"/a#b",
        b"/q?token=%00",
        b"",
    ];
    const VERSIONS: &[&[u8]] = &[
        b"HTTP/1.1",
        b"HTTP/1.1",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/2",
        b"HTTP/1.9",
        b"http/1.1",
    ];
    const EOLS: &[&[u8]] = &[
        b"\r\n", b"\r\n", b"\r\n", b"\r\n", b"\r\n", b"\r\n", b"\n", b"\n", b"\r", b"",
    ];
    const NAMES: &[&[u8]] = &[
        b"Content-Length",
        b"Transfer-Encoding",
        b"Connection",
        b"Expect",
        b"Upgrade",
        b"X",
        b"Host",
        b"Accept",
        b" X",
        b"X ",
        b"",
        b"X(",
    ];
    const VALUES: &[&[u8]] = &[
        b"5",
        b"5, 5",
        b"5, 6",
        b"",
        b"-1",
        b"99999999999999999999",
        b"chunked",
        b"gzip, chunked",
        b"ChUnKeD",
        b"close",
        b"keep-alive, Upgrade",
        b"100-continue",
        b"a\0b",
        b"\xff\xfe",
        b"\t x \t",
    ];

    /// A request built from plausible pieces, then mutated at a few random bytes.
    fn structured(rng: &mut XorShift) -> Vec<u8> {
        let mut req = Vec::new();
        for _ in 0..rng.below(3) {
            req.extend_from_slice(pick(rng, EOLS));
        }
        req.extend_from_slice(pick(rng, METHODS));
        req.push(b' ');
        req.extend_from_slice(pick(rng, TARGETS));
        req.push(b' ');
        req.extend_from_slice(pick(rng, VERSIONS));
        req.extend_from_slice(pick(rng, EOLS));
        for _ in 0..rng.below(6) {
            req.extend_from_slice(pick(rng, NAMES));
            req.extend_from_slice(b": ");
            req.extend_from_slice(pick(rng, VALUES));
            req.extend_from_slice(pick(rng, EOLS));
        }
        req.extend_from_slice(pick(rng, EOLS));
        for _ in 0..rng.below(3) {
            if rng.below(8) == 0 && !req.is_empty() {
                let at = rng.below(req.len());
                req[at] = rng.step() as u8;
            }
        }
        if rng.below(8) == 0 {
            req.truncate(rng.below(req.len() + 1));
        }
        req
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut heads = 0;
        for i in 0..10_000 {
            let mut input = Vec::new();
            if i % 2 == 0 {
                let len = rng.below(300);
                input.extend((0..len).map(|_| rng.step() as u8));
            } else {
                input = structured(&mut rng);
            }
            let result = if i % 10 == 1 {
                parse_checked(&input)
            } else {
                parse_head(&input)
            };
            match result {
                Ok(None) => assert!(input.len() <= MAX_HEAD_BYTES),
                Ok(Some((h, n))) => {
                    heads += 1;
                    assert!(n <= input.len() && n <= MAX_HEAD_BYTES);
                    assert!(h.path.starts_with('/') || h.path == "*");
                    assert!(h.minor_version <= 1);
                    let _ = (h.query_param("a"), h.has_token("connection", "close"));
                    let _ = percent_decode(&h.path);
                }
                Err(e) => assert!([400, 431, 501, 505].contains(&e.status())),
            }
        }
        assert!(
            heads > 100,
            "the generator should reach complete heads ({heads})"
        );
    }
}
