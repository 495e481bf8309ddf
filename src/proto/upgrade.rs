//! The WebSocket client upgrade (RFC 6455 §4.1) the proxy sends when it dials a server (§5):
//! the `ws://` / `wss://` URL of `endpoints.control`, the request, and the check of the
//! `101` answer.
//!
//! A codec over byte buffers: no socket, no clock, no federation state. Bounds: the answer's
//! head is looked for only within [`MAX_ANSWER_HEAD`] bytes, however the bytes arrive
//! (fuzz target `outbound_answer`).

use std::net::{IpAddr, SocketAddr};

/// Bytes of an upgrade answer head accepted from a dialled server.
pub const MAX_ANSWER_HEAD: usize = 16 * 1024;
/// A parsed `endpoints.control` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl ControlUrl {
    /// Parses `ws://host[:port][/path]` or `wss://...`; `None` for anything else.
    pub fn parse(url: &str) -> Option<ControlUrl> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            return None;
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path
        };
        if authority.contains('@')
            || path.contains('#')
            || path.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return None;
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']')?;
            h.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => default_port,
                None => return None,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().ok()?),
                None => (authority.to_string(), default_port),
            }
        };
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
        (host_ok && port != 0).then_some(ControlUrl {
            tls,
            host,
            port,
            path,
        })
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }

    /// Whether the host, as written in the URL (never resolved), is loopback: `localhost`,
    /// an address in 127.0.0.0/8, or `::1` (§5: only there may a token travel in clear).
    pub fn loopback_host(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| match ip {
                IpAddr::V4(v4) => v4.is_loopback(),
                IpAddr::V6(v6) => v6.is_loopback(),
            })
    }

    /// The address when the host is an IP literal (no resolver needed).
    pub fn literal(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

/// The WebSocket client upgrade request, with the bearer token of the dialled server.
pub fn upgrade_request(url: &ControlUrl, key: &str, token: &str) -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: fedmcp.v1\r\nAuthorization: Bearer {token}\r\nUser-Agent: fedmcp/{}\r\n\r\n",
        url.path,
        url.host_header(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Why a dialled server's answer is not a valid upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerError {
    Malformed,
    Status(u16),
    NotWebSocket,
    BadAccept,
    TooLarge,
}

impl std::fmt::Display for AnswerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnswerError::Malformed => f.write_str("the upgrade answer is not HTTP/1.1"),
            AnswerError::Status(s) => write!(f, "the server answered the upgrade with HTTP {s}"),
            AnswerError::NotWebSocket => f.write_str("the answer does not switch to websocket"),
            AnswerError::BadAccept => f.write_str("Sec-WebSocket-Accept does not match the key"),
            AnswerError::TooLarge => f.write_str("the upgrade answer head is too large"),
        }
    }
}

/// Checks the answer to our upgrade request. `Ok(None)`: incomplete; `Ok(Some(n))`: a valid
/// `101` whose head is `buf[..n]` (bytes after it are the first frames).
pub fn check_answer(buf: &[u8], key: &str) -> Result<Option<usize>, AnswerError> {
    // The bound holds however the bytes arrive: a head is looked for only within the first
    // MAX_ANSWER_HEAD bytes, so one large read cannot pass a longer head.
    let window = &buf[..buf.len().min(MAX_ANSWER_HEAD)];
    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_ANSWER_HEAD {
            Err(AnswerError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| AnswerError::Malformed)?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(AnswerError::Malformed)?;
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(AnswerError::Malformed);
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(AnswerError::Malformed)?;
    if status != 101 {
        return Err(AnswerError::Status(status));
    }
    let (mut upgrade, mut accept) = (false, None);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            return Err(AnswerError::Malformed);
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("upgrade") {
            upgrade = v.eq_ignore_ascii_case("websocket");
        } else if k.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = Some(v.to_string());
        }
    }
    if !upgrade {
        return Err(AnswerError::NotWebSocket);
    }
    if accept.as_deref() != Some(tungstenite::handshake::derive_accept_key(key.as_bytes()).as_str())
    {
        return Err(AnswerError::BadAccept);
    }
    Ok(Some(end + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_control_urls() {
        let u = ControlUrl::parse("ws://127.0.0.1:9001/fed?x=1").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 9001, "/fed?x=1")
        );
        assert_eq!(u.literal(), Some("127.0.0.1:9001".parse().unwrap()));
        let u = ControlUrl::parse("wss://example.org").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/"));
        assert_eq!(u.host_header(), "example.org");
        assert_eq!(u.literal(), None);
        let u = ControlUrl::parse("ws://[::1]:8080/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8080));
        assert_eq!(u.host_header(), "[::1]:8080");
        for bad in [
            "http://a",
            "ws://",
            "ws://:80",
            "ws://a:0",
            "ws://a:x",
            "ws://u@a",
            "ws://a b",
            "ws://[zz]:1",
            "ws://a/#f",
        ] {
            assert_eq!(ControlUrl::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn checks_the_upgrade_answer() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nXY";
        assert_eq!(check_answer(ok, key), Ok(Some(ok.len() - 2)));
        assert_eq!(check_answer(&ok[..20], key), Ok(None));
        assert_eq!(
            check_answer(b"HTTP/1.1 401 Unauthorized\r\n\r\n", key),
            Err(AnswerError::Status(401))
        );
        let bad = b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert_eq!(check_answer(bad, key), Err(AnswerError::BadAccept));
        assert_eq!(
            check_answer(&[b'a'; MAX_ANSWER_HEAD + 1], key),
            Err(AnswerError::TooLarge)
        );
        // A head longer than the bound is refused even when it arrives whole in one read.
        let mut long = b"HTTP/1.1 101 OK\r\nX: ".to_vec();
        long.resize(MAX_ANSWER_HEAD + 10, b'a');
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(check_answer(&long, key), Err(AnswerError::TooLarge));
    }
}
