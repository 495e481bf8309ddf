//! The latency an MCP `tools/call` adds over a direct `federation/send` (contract §9).
//!
//! One member serves a tool and answers every delivery at once. Three callers take turns
//! call by call, one request in flight at a time, on the same proxy in the same run: a
//! member sending `federation/send` to it over the control channel (the direct path), an MCP
//! client calling the tool over the facade's WebSocket, and one over Streamable HTTP (one
//! keep-alive connection, the token checked on every request). Each round trip is timed from the write of the request to the read of its
//! answer; the summary gives p50, p90 and p99 per path and the difference of the medians.
//!
//! Options: `--calls N` (default 5000 per path), `--label L`. `FEDMCP_BENCH_BIN` picks the
//! proxy binary. Exit 1 if any call fails.

mod common;

use common::{Opts, ProxyProc, Session};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut us: Vec<f64>) -> f64 {
    us.sort_by(|a, b| a.total_cmp(b));
    let (p50, p90, p99) = (
        percentile(&us, 0.5),
        percentile(&us, 0.9),
        percentile(&us, 0.99),
    );
    println!(
        "  {name}: calls={} p50_us={p50:.1} p90_us={p90:.1} p99_us={p99:.1}",
        us.len()
    );
    p50
}

/// One HTTP/1.1 exchange on a keep-alive connection: the answer's headers and body.
fn http_exchange(s: &mut TcpStream, buf: &mut Vec<u8>, req: &[u8]) -> (String, String) {
    s.write_all(req).expect("write");
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return (head, body);
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "the proxy closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn mcp_post(token: &str, session: Option<&str>, body: &str) -> Vec<u8> {
    let mut r = format!(
        "POST /mcp HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(s) = session {
        r.push_str(&format!("Mcp-Session-Id: {s}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

fn main() {
    let o = Opts::new("MCPBENCH");
    let calls: usize = o.parse("calls", 5000);
    let label = o.get("label").unwrap_or_default();
    let proxy = ProxyProc::spawn(&[
        ("FEDMCP_RATE_LIMIT", "1000000/s,burst=1000000".to_string()),
        ("FEDMCP_HEARTBEAT_MS", "600000".to_string()),
    ]);
    let admin = proxy.admin_token();
    let tool_token = proxy.register(&admin, "tool");
    let caller_token = proxy.register(&admin, "caller");

    // The member: declares one tool, answers every delivery at once.
    let mut member = Session::connect(proxy.addr, &tool_token, 1).expect("member");
    let welcome = member.recv_text().expect("welcome");
    let v: serde_json::Value = serde_json::from_str(&welcome).expect("welcome JSON");
    member
        .send_text(&format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{{\"capabilities\":{{\"tools\":[{{\"name\":\"echo\"}}]}}}}}}",
            v["id"]
        ))
        .expect("welcome answer");
    member.sync().expect("member online");
    member.sock.set_read_timeout(None).ok();
    let answering = std::thread::spawn(move || {
        while let Ok(m) = member.recv_text() {
            let v: serde_json::Value = match serde_json::from_str(&m) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if v["method"] == "federation/deliver" {
                let a = format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{{\"content\":[{{\"type\":\"text\",\"text\":\"ok\"}}]}}}}",
                    v["id"]
                );
                if member.send_text(&a).is_err() {
                    return;
                }
            }
        }
    });

    // The three callers, set up first; then they take turns call by call, so that all three
    // paths see the same conditions (a busy neighbour slows all of them alike).
    let mut caller = Session::open(proxy.addr, &caller_token, 2).expect("caller");
    caller.sync().expect("caller online");
    let mut ws = Session::connect_path(proxy.addr, "/mcp", &caller_token, 3).expect("mcp ws");
    ws.send_text("{\"jsonrpc\":\"2.0\",\"id\":\"i\",\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-11-25\"}}")
        .expect("initialize");
    ws.recv_text().expect("initialized");
    let mut h = TcpStream::connect(proxy.addr).expect("mcp http");
    h.set_nodelay(true).ok();
    h.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut buf = Vec::new();
    let (head, _) = http_exchange(
        &mut h,
        &mut buf,
        &mcp_post(
            &caller_token,
            None,
            "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-11-25\"}}",
        ),
    );
    let sid = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("mcp-session-id")
                .then(|| v.trim().to_string())
        })
        .expect("a session id");
    let (mut direct, mut over_ws, mut over_http) = (
        Vec::with_capacity(calls),
        Vec::with_capacity(calls),
        Vec::with_capacity(calls),
    );
    for i in 0..calls + calls / 10 {
        let keep = i >= calls / 10;
        let req = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"federation/send\",\"params\":{{\"to\":\"tool\",\"message\":{{\"method\":\"tools/call\",\"params\":{{\"name\":\"echo\",\"arguments\":{{}}}}}}}}}}"
        );
        let t = Instant::now();
        caller.send_text(&req).expect("send");
        let a = caller.recv_text().expect("answer");
        assert!(a.contains("\"delivered\""), "direct: {a}");
        if keep {
            direct.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let call = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"tools/call\",\"params\":{{\"name\":\"tool__echo\",\"arguments\":{{}}}}}}"
        );
        let t = Instant::now();
        ws.send_text(&call).expect("call");
        let a = ws.recv_text().expect("answer");
        assert!(a.contains("\"result\""), "mcp ws: {a}");
        if keep {
            over_ws.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let req = mcp_post(&caller_token, Some(&sid), &call);
        let t = Instant::now();
        let (head, body) = http_exchange(&mut h, &mut buf, &req);
        assert!(
            head.starts_with("HTTP/1.1 200") && body.contains("\"result\""),
            "mcp http: {head} {body}"
        );
        if keep {
            over_http.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }

    println!(
        "mcp-latency label={label} calls={calls} (one in flight, after {} warm-up calls each)",
        calls / 10
    );
    let d = summary("direct federation/send", direct);
    let w = summary("MCP tools/call over WebSocket", over_ws);
    let x = summary("MCP tools/call over Streamable HTTP", over_http);
    println!(
        "mcp-latency label={label} direct_p50_us={d:.1} mcp_ws_p50_us={w:.1} mcp_http_p50_us={x:.1} ws_added_us={:.1} http_added_us={:.1}",
        w - d,
        x - d
    );
    drop(proxy);
    let _ = answering.join();
}
