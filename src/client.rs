//! A blocking client of the proxy, for the proxy's own tools and examples: a WebSocket
//! session (`/v1/control` as a member, `/mcp` as an MCP client) and one-shot HTTP requests.
//!
//! Owns connecting (every resolved address in turn, within [`HANDSHAKE_TIMEOUT`]), TLS
//! (verified: the bundled roots or `FEDMCP_TRUSTED_CA_FILE`, as outbound sessions are), the
//! upgrade with a bearer token and a subprotocol, and telling a refused token (`401`/`403`,
//! final) from anything worth retrying. It is never used by the proxy's loop: it blocks, and
//! it runs in the `fedmcp mcp-stdio` process, a `fedmcp` client command (`send`, `put`, ...)
//! or an example member.

use crate::proto::upgrade::ControlUrl;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// The handshake (connect, TLS, upgrade) and an HTTP request must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest message read on a session (the proxy's own limit applies to what it takes).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The socket, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

pub type Ws = tungstenite::WebSocket<Stream>;

/// Why a connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// The proxy refused the token: retrying will not help.
    Refused(String),
    /// Anything else (unreachable, TLS, a drain): retried after the backoff.
    Retry(String),
}

/// Opens a WebSocket session on `path` of the proxy at `url` (its host, port and TLS),
/// offering `subprotocol` and presenting `token` as a bearer token; the socket is left
/// non-blocking. The TLS client configuration is made on first use (bundled roots, or
/// `FEDMCP_TRUSTED_CA_FILE`) and kept in `tls`.
pub fn connect(
    url: &ControlUrl,
    path: &str,
    subprotocol: &'static str,
    token: &str,
    tls: &mut Option<Arc<rustls::ClientConfig>>,
) -> Result<Ws, ConnectError> {
    use tungstenite::client::IntoClientRequest;
    let retry = |e: String| ConnectError::Retry(e);
    let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&(url.host.as_str(), url.port))
        .map_err(|e| retry(format!("cannot resolve {}: {e}", url.host)))?
        .collect();
    let mut last = String::from("no address");
    let mut sock = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, HANDSHAKE_TIMEOUT) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = format!("connect to {a}: {e}"),
        }
    }
    let sock = sock.ok_or_else(|| retry(last))?;
    let _ = sock.set_nodelay(true);
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|_| sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(|e| retry(e.to_string()))?;
    let stream = if url.tls {
        if tls.is_none() {
            let ca = std::env::var_os("FEDMCP_TRUSTED_CA_FILE").map(std::path::PathBuf::from);
            *tls =
                Some(crate::io::tls::client_config(ca.as_deref()).map_err(ConnectError::Refused)?);
        }
        let cfg = tls
            .clone()
            .ok_or_else(|| retry("no TLS configuration".into()))?;
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| ConnectError::Refused(format!("bad TLS server name: {e}")))?;
        let conn =
            rustls::ClientConnection::new(cfg, name).map_err(|e| retry(format!("TLS: {e}")))?;
        Stream::Tls(Box::new(rustls::StreamOwned::new(conn, sock)))
    } else {
        Stream::Plain(sock)
    };
    let target = format!(
        "{}://{}{}",
        if url.tls { "wss" } else { "ws" },
        url.host_header(),
        path
    );
    let mut req = target
        .into_client_request()
        .map_err(|e| ConnectError::Refused(format!("FEDMCP_URL: {e}")))?;
    let headers = req.headers_mut();
    let bearer = format!("Bearer {}", token);
    let auth = tungstenite::http::HeaderValue::from_str(&bearer)
        .map_err(|_| ConnectError::Refused("FEDMCP_TOKEN: not a token".into()))?;
    headers.insert("Authorization", auth);
    headers.insert(
        "Sec-WebSocket-Protocol",
        tungstenite::http::HeaderValue::from_static(subprotocol),
    );
    let config = crate::proto::ws::config(MAX_MESSAGE_BYTES);
    match tungstenite::client::client_with_config(req, stream, Some(config)) {
        Ok((ws, _)) => {
            let tcp = ws.get_ref().tcp();
            tcp.set_read_timeout(None)
                .and_then(|_| tcp.set_write_timeout(None))
                .and_then(|_| tcp.set_nonblocking(true))
                .map_err(|e| retry(e.to_string()))?;
            Ok(ws)
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r)))
            if matches!(r.status().as_u16(), 401 | 403) =>
        {
            Err(ConnectError::Refused(format!(
                "FEDMCP_TOKEN: the proxy refused the token ({})",
                r.status()
            )))
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => Err(retry(
            format!("the proxy answered the upgrade {}", r.status()),
        )),
        Err(e) => Err(retry(format!("upgrade: {e}"))),
    }
}

/// Opens a connection to the proxy at `url` for an HTTP exchange: every resolved address in
/// turn, each within [`HANDSHAKE_TIMEOUT`], and the TLS handshake when the URL says so (done
/// here, so a certificate problem is reported now). Reads and writes time out after
/// [`HANDSHAKE_TIMEOUT`] (the caller may change that on [`Stream::tcp`]). The TLS client
/// configuration is made on first use and kept in `tls`, as in [`connect`].
pub fn open(
    url: &ControlUrl,
    tls: &mut Option<Arc<rustls::ClientConfig>>,
) -> Result<Stream, String> {
    let addrs = std::net::ToSocketAddrs::to_socket_addrs(&(url.host.as_str(), url.port))
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?;
    let mut last = format!("{} resolves to no address", url.host);
    let mut sock = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, HANDSHAKE_TIMEOUT) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = format!("connect to {a}: {e}"),
        }
    }
    let sock = sock.ok_or(last)?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|_| sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    if !url.tls {
        return Ok(Stream::Plain(sock));
    }
    if tls.is_none() {
        let ca = std::env::var_os("FEDMCP_TRUSTED_CA_FILE").map(std::path::PathBuf::from);
        *tls = Some(crate::io::tls::client_config(ca.as_deref())?);
    }
    let cfg = tls.clone().ok_or("no TLS configuration")?;
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|e| format!("bad TLS server name: {e}"))?;
    let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| format!("TLS: {e}"))?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("TLS with {}: {e}", url.host_header()))?;
    }
    Ok(Stream::Tls(Box::new(s)))
}

/// One HTTP request with a JSON body (or none) and a bearer token, on its own connection:
/// the status and the body. For small admin calls (registering a server), not for data.
pub fn http_json(
    url: &ControlUrl,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
    tls: &mut Option<Arc<rustls::ClientConfig>>,
) -> Result<(u16, String), String> {
    let mut stream = open(url, tls)?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        url.host_header(),
        body.len()
    );
    stream
        .write_all(req.as_bytes())
        .and_then(|_| stream.flush())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let _ = stream.take(MAX_MESSAGE_BYTES as u64).read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no HTTP status")?;
    Ok((status, rest.to_string()))
}
