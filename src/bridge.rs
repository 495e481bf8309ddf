//! `fedmcp mcp-stdio`: the MCP facade as a command an MCP host starts (contract §9).
//!
//! Owns the relay between newline-delimited JSON-RPC on stdin/stdout (the MCP stdio
//! transport) and the proxy's `/mcp` over WebSocket (subprotocol `mcp`, so
//! `notifications/tools/list_changed` reaches the host; `wss://` verified like outbound
//! sessions, §5). It reconnects with the outbound backoff (250 ms doubling to 30 s) and, when
//! a connection is lost, answers every request still waiting with a JSON-RPC error, so the
//! host never waits forever. A bad URL or token is one line on stderr and exit code 2.
//!
//! It is a client in its own process, not part of the proxy's loop: one thread with a `mio`
//! poll for the socket, and one thread reading stdin (a pipe or a file) that wakes it. Bounds:
//! a line of stdin is at most [`MAX_LINE_BYTES`]; at most [`MAX_WAITING_LINES`] lines wait
//! while disconnected (past it, requests are answered with an error at once).

use crate::client::{ConnectError, connect};
use crate::proto::upgrade::ControlUrl;
use std::collections::{HashSet, VecDeque};
use std::io::{self, BufRead, Read, Write};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use tungstenite::Message;

/// The longest line taken from stdin (a message; the proxy's own limit applies after).
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;
/// Lines kept while the proxy cannot be reached.
pub const MAX_WAITING_LINES: usize = 1024;

const SOCKET: mio::Token = mio::Token(0);
const STDIN: mio::Token = mio::Token(1);

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: ControlUrl,
    pub token: String,
}

/// Why the bridge cannot start (exit code 2, one line).
#[derive(Debug, PartialEq, Eq)]
pub struct Usage(pub String);

/// The target from `--url`/`--token` or `FEDMCP_URL`/`FEDMCP_TOKEN`. The URL is the
/// proxy's (`http://`, `https://`, `ws://` or `wss://`, the path defaulting to `/mcp`).
pub fn target(url: Option<String>, token: Option<String>) -> Result<Target, Usage> {
    let url = url.ok_or_else(|| {
        Usage("FEDMCP_URL: the proxy's URL is required (--url or FEDMCP_URL), e.g. http://127.0.0.1:8443".into())
    })?;
    let token = token.ok_or_else(|| {
        Usage("FEDMCP_TOKEN: a token is required (--token or FEDMCP_TOKEN)".into())
    })?;
    let ws = if let Some(r) = url.strip_prefix("http://") {
        format!("ws://{r}")
    } else if let Some(r) = url.strip_prefix("https://") {
        format!("wss://{r}")
    } else {
        url.clone()
    };
    let mut parsed = ControlUrl::parse(&ws).ok_or_else(|| {
        Usage(format!(
            "FEDMCP_URL: {url:?} is not a proxy URL; expected http(s)://host[:port][/mcp] or ws(s)://host[:port][/mcp]"
        ))
    })?;
    if parsed.path == "/" {
        parsed.path = "/mcp".into();
    }
    let jwt_shaped = token.split('.').count() == 3
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !jwt_shaped {
        return Err(Usage(
            "FEDMCP_TOKEN: not a token; expected a JWT (three base64url parts separated by dots)"
                .into(),
        ));
    }
    Ok(Target { url: parsed, token })
}

/// A line from stdin, or its end.
enum Input {
    Line(String),
    Eof,
}

/// Reads stdin line by line on its own thread (a pipe, a terminal or a file), waking the
/// loop for each.
fn read_stdin(tx: Sender<Input>, waker: Arc<mio::Waker>) {
    let stdin = io::stdin();
    let mut lock = stdin.lock();
    loop {
        let mut buf = Vec::new();
        let n = (&mut lock)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf);
        match n {
            Ok(0) | Err(_) => {
                let _ = tx.send(Input::Eof);
                let _ = waker.wake();
                return;
            }
            Ok(_) => {
                if buf.len() > MAX_LINE_BYTES {
                    eprintln!("fedmcp mcp-stdio: a line over {MAX_LINE_BYTES} bytes was dropped");
                    // Skip the rest of that line.
                    let mut rest = Vec::new();
                    let _ = lock.read_until(b'\n', &mut rest);
                    continue;
                }
                let line = String::from_utf8_lossy(&buf).trim().to_string();
                if line.is_empty() {
                    continue;
                }
                if tx.send(Input::Line(line)).is_err() {
                    return;
                }
                let _ = waker.wake();
            }
        }
    }
}

/// The id of a JSON-RPC request (its JSON text), if the line is one.
fn request_id(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v.get("method").is_some()).then(|| v.get("id").map(|i| i.to_string()))?
}

/// The id of a JSON-RPC response (its JSON text), if the text is one.
fn response_id(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    (v.get("method").is_none()).then(|| v.get("id").map(|i| i.to_string()))?
}

fn lost(id: &str, why: &str) -> String {
    let mut m = String::new();
    crate::audit::push_json_str(&mut m, &format!("fedmcp mcp-stdio: {why}"));
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{{\"code\":-32603,\"message\":{m}}}}}")
}

fn emit(out: &mut impl Write, text: &str) -> io::Result<()> {
    out.write_all(text.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Runs the bridge until stdin ends: exit code 0, or 2 for a token the proxy refuses.
pub fn run(t: Target) -> u8 {
    let mut poll = match mio::Poll::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fedmcp mcp-stdio: {e}");
            return 1;
        }
    };
    let waker = match mio::Waker::new(poll.registry(), STDIN) {
        Ok(w) => Arc::new(w),
        Err(e) => {
            eprintln!("fedmcp mcp-stdio: {e}");
            return 1;
        }
    };
    let (tx, rx): (Sender<Input>, Receiver<Input>) = channel();
    let w = waker.clone();
    std::thread::spawn(move || read_stdin(tx, w));
    let mut stdout = io::stdout();
    let mut tls = None;
    let mut waiting: VecDeque<String> = VecDeque::new();
    let mut attempt = 0u32;
    let mut stdin_open = true;
    loop {
        // Connect (again), answering what arrives meanwhile.
        let mut ws = loop {
            match connect(&t.url, &t.url.path, "mcp", &t.token, &mut tls) {
                Ok(ws) => break ws,
                Err(ConnectError::Refused(why)) => {
                    eprintln!("{why}");
                    return 2;
                }
                Err(ConnectError::Retry(why)) => {
                    let delay = crate::federation::outbound::backoff(attempt, 0.5);
                    attempt = attempt.saturating_add(1);
                    eprintln!("fedmcp mcp-stdio: {why}; retrying in {delay:?}");
                    std::thread::sleep(delay);
                    while let Ok(i) = rx.try_recv() {
                        match i {
                            Input::Eof => return 0,
                            Input::Line(l) if waiting.len() < MAX_WAITING_LINES => {
                                waiting.push_back(l)
                            }
                            Input::Line(l) => {
                                if let Some(id) = request_id(&l) {
                                    let _ = emit(
                                        &mut stdout,
                                        &lost(&id, "the proxy cannot be reached"),
                                    );
                                }
                            }
                        }
                    }
                }
            }
        };
        attempt = 0;
        let fd = {
            use std::os::fd::AsRawFd;
            ws.get_ref().tcp().as_raw_fd()
        };
        let mut source = mio::unix::SourceFd(&fd);
        if let Err(e) = poll.registry().register(
            &mut source,
            SOCKET,
            mio::Interest::READABLE | mio::Interest::WRITABLE,
        ) {
            eprintln!("fedmcp mcp-stdio: {e}");
            return 1;
        }
        let mut pending: HashSet<String> = HashSet::new();
        let mut events = mio::Events::with_capacity(16);
        let why = 'session: loop {
            // Lines that waited for this connection go first.
            while let Some(l) = waiting.pop_front() {
                if let Some(id) = request_id(&l) {
                    pending.insert(id);
                }
                match ws.write(Message::text(l)) {
                    Ok(()) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => break 'session e.to_string(),
                }
            }
            match ws.flush() {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => break 'session e.to_string(),
            }
            // Everything the proxy sent.
            loop {
                match ws.read() {
                    Ok(Message::Text(text)) => {
                        if let Some(id) = response_id(text.as_str()) {
                            pending.remove(&id);
                        }
                        if emit(&mut stdout, text.as_str()).is_err() {
                            return 0; // the host went away
                        }
                    }
                    Ok(Message::Close(_)) => break 'session "the proxy closed the session".into(),
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        break;
                    }
                    Err(e) => break 'session e.to_string(),
                }
            }
            if !stdin_open && pending.is_empty() {
                let _ = ws.close(None);
                let _ = ws.flush();
                return 0;
            }
            if let Err(e) = poll.poll(&mut events, None)
                && e.kind() != io::ErrorKind::Interrupted
            {
                break 'session e.to_string();
            }
            while let Ok(i) = rx.try_recv() {
                match i {
                    Input::Eof => stdin_open = false,
                    Input::Line(l) => waiting.push_back(l),
                }
            }
        };
        let _ = poll.registry().deregister(&mut source);
        eprintln!("fedmcp mcp-stdio: connection lost ({why}); reconnecting");
        let mut ids: Vec<String> = pending.into_iter().collect();
        ids.sort();
        for id in ids {
            if emit(
                &mut stdout,
                &lost(&id, "the connection to the proxy was lost"),
            )
            .is_err()
            {
                return 0;
            }
        }
        if !stdin_open {
            return 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_from_urls_and_tokens() {
        let tok = Some("a.b.c".to_string());
        let t = target(Some("http://127.0.0.1:8080".into()), tok.clone()).unwrap();
        assert_eq!(
            (t.url.tls, t.url.port, t.url.path.as_str()),
            (false, 8080, "/mcp")
        );
        let t = target(Some("https://proxy.example/fed/mcp".into()), tok.clone()).unwrap();
        assert_eq!(
            (t.url.tls, t.url.port, t.url.path.as_str()),
            (true, 443, "/fed/mcp")
        );
        let t = target(Some("ws://[::1]:9/mcp".into()), tok.clone()).unwrap();
        assert_eq!(t.url.host, "::1");
        for bad in ["ftp://x", "127.0.0.1:8080", "http://", "http://a b"] {
            let e = target(Some(bad.into()), tok.clone()).unwrap_err();
            assert!(e.0.starts_with("FEDMCP_URL:"), "{bad}: {}", e.0);
        }
        for bad in ["", "abc", "a.b", "a.b.c d", "a.b.c\n"] {
            let e = target(Some("http://h".into()), Some(bad.into())).unwrap_err();
            assert!(e.0.starts_with("FEDMCP_TOKEN:"), "{bad:?}: {}", e.0);
        }
        assert!(target(None, tok).unwrap_err().0.starts_with("FEDMCP_URL:"));
        assert!(
            target(Some("http://h".into()), None)
                .unwrap_err()
                .0
                .starts_with("FEDMCP_TOKEN:")
        );
    }

    #[test]
    fn requests_and_responses_are_told_apart() {
        assert_eq!(
            request_id(r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#).as_deref(),
            Some("7")
        );
        assert_eq!(
            request_id(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            None
        );
        assert_eq!(
            request_id(r#"{"jsonrpc":"2.0","id":"x","result":{}}"#),
            None
        );
        assert_eq!(
            response_id(r#"{"jsonrpc":"2.0","id":"x","result":{}}"#).as_deref(),
            Some("\"x\"")
        );
        assert_eq!(
            response_id(r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#),
            None
        );
        let v: serde_json::Value = serde_json::from_str(&lost("\"x\"", "gone")).unwrap();
        assert_eq!(v["id"], "x");
        assert_eq!(v["error"]["code"], -32603);
    }
}
