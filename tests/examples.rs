//! The Rust example member (`examples/member.rs`), run as the README says — an admin token
//! in `FEDMCP_TOKEN`, the proxy in `FEDMCP_URL` — against the real binary: it registers,
//! joins, and its tools answer MCP calls through the facade. (The Python example runs in the
//! interop suite, where its venv is.)

mod common;

use common::Proxy;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The example's binary, built by `cargo test` next to the test binaries.
fn example(name: &str) -> PathBuf {
    let mut p = PathBuf::from(env!("CARGO_BIN_EXE_fedmcp"));
    p.pop();
    p.push("examples");
    p.push(name);
    p
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mcp(p: &Proxy, token: &str, session: Option<&str>, body: &Value) -> (Option<String>, Value) {
    let body = body.to_string();
    let mut req = format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(s) = session {
        req.push_str(&format!("Mcp-Session-Id: {s}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let r = common::Resp::parse(&out).expect("an answer");
    let sid = r.header("mcp-session-id").map(str::to_string);
    (
        sid,
        if r.body.is_empty() {
            Value::Null
        } else {
            r.json()
        },
    )
}

#[test]
fn the_rust_example_member_serves_its_tools_to_mcp_clients() {
    let p = Proxy::start(&[]);
    let bin = example("member");
    assert!(bin.exists(), "no example binary at {}", bin.display());
    let _member = Running(
        Command::new(&bin)
            .env("FEDMCP_URL", format!("http://{}", p.addr))
            .env("FEDMCP_TOKEN", p.admin_token())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the example"),
    );
    let t = p.federation_token("client");
    let (sid, _) = mcp(
        &p,
        &t,
        None,
        &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}}),
    );
    let sid = sid.expect("a session");
    let mut listed = Vec::new();
    for _ in 0..100 {
        let (_, r) = mcp(
            &p,
            &t,
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        );
        listed = r["result"]["tools"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| t["name"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        if listed.len() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(listed, ["demo-rust__add", "demo-rust__echo"]);
    let (_, r) = mcp(
        &p,
        &t,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "demo-rust__add", "arguments": {"a": 2, "b": 3.5}}}),
    );
    assert_eq!(r["result"]["content"][0]["text"], "5.5", "{r}");
    let (_, r) = mcp(
        &p,
        &t,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "demo-rust__echo", "arguments": {}}}),
    );
    assert_eq!(
        r["error"]["code"], -32602,
        "a member's error reaches the client: {r}"
    );
}
