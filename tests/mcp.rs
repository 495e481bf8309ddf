//! The MCP facade over Streamable HTTP (contract §9), against the real binary: sessions and
//! their status codes, revisions, `tools/list` as the union of online members' tools with
//! pages and cursors, `tools/call` delivered to the member with the exact message of §9,
//! results and errors handed back unchanged, calls to unknown tools never delivered,
//! offline owners, timeouts, and concurrent calls answered out of order.

mod common;

use common::{Proxy, Resp, Ws};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One request to `/mcp` on a fresh connection, with the MCP headers it should carry.
fn mcp(
    p: &Proxy,
    method: &str,
    token: &str,
    session: Option<&str>,
    version: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let raw = request(method, "/mcp", token, session, version, body);
    let out = p.raw(raw.as_bytes());
    Resp::parse(&out).unwrap_or_else(|| panic!("unparseable: {:?}", String::from_utf8_lossy(&out)))
}

fn request(
    method: &str,
    path: &str,
    token: &str,
    session: Option<&str>,
    version: Option<&str>,
    body: Option<&Value>,
) -> String {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nAccept: application/json, text/event-stream\r\n"
    );
    if let Some(s) = session {
        req.push_str(&format!("Mcp-Session-Id: {s}\r\n"));
    }
    if let Some(v) = version {
        req.push_str(&format!("MCP-Protocol-Version: {v}\r\n"));
    }
    let body = body.map(|b| b.to_string());
    if let Some(b) = &body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = &body {
        req.push_str(b);
    }
    req
}

/// `initialize` and `notifications/initialized`: the session id.
fn open(p: &Proxy, token: &str) -> String {
    let r = mcp(
        p,
        "POST",
        token,
        None,
        None,
        Some(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r
        .header("mcp-session-id")
        .expect("a session id")
        .to_string();
    let n = mcp(
        p,
        "POST",
        token,
        Some(&sid),
        Some("2025-06-18"),
        Some(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"})),
    );
    assert_eq!(n.status, 202);
    sid
}

fn call(p: &Proxy, token: &str, sid: &str, id: Value, name: &str, args: Value) -> Resp {
    mcp(
        p,
        "POST",
        token,
        Some(sid),
        Some("2025-06-18"),
        Some(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": name, "arguments": args}})),
    )
}

fn list_all(p: &Proxy, token: &str, sid: &str) -> Vec<Value> {
    let mut tools = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        assert!(page < 100, "the cursors never end");
        let mut params = json!({});
        if let Some(c) = &cursor {
            params["cursor"] = json!(c);
        }
        let r = mcp(
            p,
            "POST",
            token,
            Some(sid),
            None,
            Some(&json!({"jsonrpc": "2.0", "id": page, "method": "tools/list", "params": params})),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let got = v["result"]["tools"].as_array().expect("tools").clone();
        assert!(got.len() <= 100, "a page holds at most 100 tools");
        tools.extend(got);
        match v["result"]["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    tools
}

fn names(tools: &[Value]) -> Vec<String> {
    tools
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

fn member(p: &Proxy, id: &str, tools: Value) -> Ws {
    let token = p.register(id);
    p.online(&token, json!({"tools": tools})).0
}

#[test]
fn sessions_revisions_and_status_codes() {
    let p = Proxy::start(&[]);
    let t = p.federation_token("client");
    // Every request but initialize needs a session: 400 without, 404 unknown.
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
    assert_eq!(mcp(&p, "POST", &t, None, None, Some(&ping)).status, 400);
    let discover = json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover"});
    assert_eq!(
        mcp(&p, "POST", &t, None, None, Some(&discover)).status,
        400,
        "a dual-era client falls back to initialize"
    );
    assert_eq!(
        mcp(&p, "POST", &t, Some("nope"), None, Some(&ping)).status,
        404
    );
    // A token is required, either type.
    assert_eq!(
        mcp(&p, "POST", "garbage", None, None, Some(&ping)).status,
        401
    );
    let admin = p.admin_token();
    let init = |v: &str| {
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": v, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    };
    let r = mcp(&p, "POST", &admin, None, None, Some(&init("2024-11-05")));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"]["protocolVersion"], "2024-11-05");
    assert_eq!(r.json()["result"]["serverInfo"]["name"], "fedmcp");
    assert_eq!(
        r.json()["result"]["capabilities"]["tools"]["listChanged"],
        true
    );
    let r = mcp(&p, "POST", &t, None, None, Some(&init("2099-01-01")));
    assert_eq!(r.json()["result"]["protocolVersion"], "2025-11-25");
    let sid = r.header("mcp-session-id").unwrap().to_string();
    assert!(sid.len() >= 32 && sid.bytes().all(|b| b.is_ascii_graphic()));
    // A session is its opener's.
    let other = p.federation_token("someone-else");
    assert_eq!(
        mcp(&p, "POST", &other, Some(&sid), None, Some(&ping)).status,
        404
    );
    let pong = mcp(&p, "POST", &t, Some(&sid), None, Some(&ping));
    assert_eq!(pong.status, 200);
    assert_eq!(pong.header("content-type"), Some("application/json"));
    assert_eq!(
        pong.json(),
        json!({"jsonrpc": "2.0", "id": 1, "result": {}})
    );
    // An unknown method, a revision not served, GET.
    let r = mcp(
        &p,
        "POST",
        &t,
        Some(&sid),
        None,
        Some(&json!({"jsonrpc": "2.0", "id": 2, "method": "resources/list"})),
    );
    assert_eq!(r.json()["error"]["code"], -32601);
    assert_eq!(
        mcp(&p, "POST", &t, Some(&sid), Some("2026-07-28"), Some(&ping)).status,
        400
    );
    let g = mcp(&p, "GET", &t, Some(&sid), None, None);
    assert_eq!(g.status, 405);
    assert_eq!(g.header("allow"), Some("POST, DELETE"));
    // A response or a notification is 202 with no body.
    let n = mcp(
        &p,
        "POST",
        &t,
        Some(&sid),
        None,
        Some(&json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {}})),
    );
    assert_eq!((n.status, n.body.len()), (202, 0));
    // DELETE ends it.
    assert_eq!(mcp(&p, "DELETE", &t, Some(&sid), None, None).status, 204);
    assert_eq!(
        mcp(&p, "POST", &t, Some(&sid), None, Some(&ping)).status,
        404
    );
    assert_eq!(mcp(&p, "DELETE", &t, Some(&sid), None, None).status, 404);
    assert_eq!(mcp(&p, "DELETE", &t, None, None, None).status, 400);
    // Counted by method and result; sessions opened and closed are audited.
    let m = p.http("GET", "/metrics", None, None).text();
    for line in [
        "fedmcp_mcp_requests_total{method=\"initialize\",result=\"ok\"} 2",
        "fedmcp_mcp_requests_total{method=\"ping\",result=\"ok\"} 1",
        "fedmcp_mcp_requests_total{method=\"other\",result=\"error\"} 1",
    ] {
        assert!(m.contains(line), "{line} not in:\n{m}");
    }
    let log = p.stderr_text();
    assert!(log.contains("\"event\":\"mcp_session_opened\""), "{log}");
    assert!(log.contains("\"event\":\"mcp_session_closed\""), "{log}");
    assert!(!log.contains(&t), "no token in the log");
}

#[test]
fn tools_list_is_the_union_of_online_members_with_pages() {
    let p = Proxy::start(&[]);
    // 150 tools on one member, a clash of names across two, a member id with `_` and a
    // tool name with `__` in it.
    let many: Vec<Value> = (0..150)
        .map(|i| json!({"name": format!("t{i:03}"), "inputSchema": {"type": "object"}}))
        .collect();
    let _a = member(&p, "alpha", Value::Array(many));
    let _b = member(
        &p,
        "svc_b",
        json!([{"name": "search", "description": "b's", "x-kept": [1, 2]},
               {"name": "my__tool", "inputSchema": {"type": "object"}}]),
    );
    let c = member(
        &p,
        "gamma",
        json!([{"name": "search", "description": "c's"}]),
    );
    let t = p.federation_token("client");
    let sid = open(&p, &t);
    let tools = list_all(&p, &t, &sid);
    let mut n = names(&tools);
    assert_eq!(n.len(), 153, "each tool exactly once across the pages");
    n.dedup();
    assert_eq!(n.len(), 153);
    for want in [
        "alpha__t000",
        "alpha__t149",
        "svc_b__search",
        "svc_b__my__tool",
        "gamma__search",
    ] {
        assert!(n.iter().any(|x| x == want), "{want} missing");
    }
    let b = tools.iter().find(|t| t["name"] == "svc_b__search").unwrap();
    assert_eq!(b["description"], "b's");
    assert_eq!(b["x-kept"], json!([1, 2]), "every field is kept");
    // An invalid cursor.
    let r = mcp(
        &p,
        "POST",
        &t,
        Some(&sid),
        None,
        Some(
            &json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list", "params": {"cursor": "bogus"}}),
        ),
    );
    assert_eq!(r.json()["error"]["code"], -32602);
    // A member that leaves takes its tools with it.
    drop(c);
    let mut gone = false;
    for _ in 0..50 {
        if !names(&list_all(&p, &t, &sid)).contains(&"gamma__search".to_string()) {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone, "gamma's tools are still listed after it left");
}

#[test]
fn tools_call_is_delivered_with_the_exact_message_and_answered_unchanged() {
    let p = Proxy::start(&[]);
    let mut a = member(
        &p,
        "svc_a",
        json!([{"name": "echo"}, {"name": "my__tool"}, {"name": "fail"}]),
    );
    let t = p.federation_token("client");
    let sid = open(&p, &t);
    // The call waits on its own connection while the member answers.
    let (p_addr, t2, sid2) = (p.addr, t.clone(), sid.clone());
    let caller = std::thread::spawn(move || {
        let body = json!({"jsonrpc": "2.0", "id": "c1", "method": "tools/call",
            "params": {"name": "svc_a__my__tool", "arguments": {"x": 1.50}, "_meta": {"progressToken": 7}}});
        send_raw(
            p_addr,
            &request("POST", "/mcp", &t2, Some(&sid2), None, Some(&body)),
        )
    });
    let d = a.recv_method("federation/deliver");
    let params = &d["params"];
    assert_eq!(params["from"], "client");
    assert_eq!(
        params["message"],
        json!({"method": "tools/call", "params": {"name": "my__tool", "arguments": {"x": 1.5}, "_meta": {"progressToken": 7}}})
    );
    a.answer(
        &d,
        json!({"content": [{"type": "text", "text": "done"}], "isError": true}),
    );
    let r = caller.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"jsonrpc": "2.0", "id": "c1", "result": {"content": [{"type": "text", "text": "done"}], "isError": true}}),
        "the member's result is the call's result, isError included"
    );
    // No arguments: {} is delivered; a member error is a JSON-RPC error with its code.
    let (t3, sid3) = (t.clone(), sid.clone());
    let caller = std::thread::spawn(move || {
        let body = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "svc_a__fail"}});
        send_raw(
            p_addr,
            &request("POST", "/mcp", &t3, Some(&sid3), None, Some(&body)),
        )
    });
    let d = a.recv_method("federation/deliver");
    assert_eq!(d["params"]["message"]["params"]["arguments"], json!({}));
    a.send(&json!({"jsonrpc": "2.0", "id": d["id"], "error": {"code": -32000, "message": "it broke", "data": {"why": "disk"}}}));
    let r = caller.join().unwrap().json();
    assert_eq!(r["id"], 2);
    assert_eq!(r["error"]["code"], -32000);
    assert_eq!(r["error"]["message"], "it broke");
    assert_eq!(r["error"]["data"]["why"], "disk");
    // A name not listed is -32602 and is not delivered.
    for name in ["svc_a__nope", "nobody__echo", "plain", "svc_a__"] {
        let r = call(&p, &t, &sid, json!(3), name, json!({})).json();
        assert_eq!(r["error"]["code"], -32602, "{name}: {r}");
    }
    a.send(&json!({"jsonrpc": "2.0", "id": "sync", "method": "federation/servers"}));
    let next = a.recv();
    assert_eq!(next["id"], "sync", "nothing was delivered: {next}");
    let m = p.http("GET", "/metrics", None, None).text();
    for line in [
        "fedmcp_mcp_requests_total{method=\"tools/call\",result=\"ok\"} 1",
        "fedmcp_mcp_requests_total{method=\"tools/call\",result=\"error\"} 5",
    ] {
        assert!(m.contains(line), "{line} not in:\n{m}");
    }
}

#[test]
fn offline_owners_timeouts_and_calls_answered_out_of_order() {
    let p = Proxy::start(&[("FEDMCP_DELIVERY_TIMEOUT_MS", "800")]);
    let mut a = member(&p, "slow", json!([{"name": "work"}]));
    let t = p.federation_token("client");
    let sid = open(&p, &t);
    let spawn_call = |id: u64| {
        let (addr, t, sid) = (p.addr, t.clone(), sid.clone());
        std::thread::spawn(move || {
            let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": "slow__work", "arguments": {"n": id}}});
            send_raw(
                addr,
                &request("POST", "/mcp", &t, Some(&sid), None, Some(&body)),
            )
        })
    };
    // Three calls at once, answered in reverse order: each gets its own answer.
    let calls: Vec<_> = (1..=3).map(spawn_call).collect();
    let mut delivered: Vec<Value> = (0..3)
        .map(|_| a.recv_method("federation/deliver"))
        .collect();
    delivered.reverse();
    for d in &delivered {
        let n = d["params"]["message"]["params"]["arguments"]["n"].clone();
        a.answer(d, json!({"content": [], "n": n}));
    }
    for (i, c) in calls.into_iter().enumerate() {
        let r = c.join().unwrap().json();
        assert_eq!(r["id"], i as u64 + 1);
        assert_eq!(r["result"]["n"], i as u64 + 1, "{r}");
    }
    // No answer within the delivery timeout: -32003 with its reason.
    let c = spawn_call(4);
    let _ignored = a.recv_method("federation/deliver");
    let r = c.join().unwrap().json();
    assert_eq!(r["error"]["code"], -32003, "{r}");
    assert_eq!(r["error"]["data"]["reason"], "delivery_timeout");
    // The owner goes offline: -32002.
    drop(a);
    let mut code = Value::Null;
    for _ in 0..50 {
        let r = call(&p, &t, &sid, json!(5), "slow__work", json!({})).json();
        code = r["error"]["code"].clone();
        if code == -32002 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(code, -32002);
}

fn send_raw(addr: std::net::SocketAddr, req: &str) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Resp::parse(&out).unwrap_or_else(|| panic!("unparseable: {:?}", String::from_utf8_lossy(&out)))
}

/// An MCP client over WebSocket as the official SDK 1.x `websocket_client` connects: the
/// token in `?token=`, the subprotocol `mcp`, no other header.
fn mcp_ws(p: &Proxy, token: &str) -> Result<Ws, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let url = format!("ws://{}/mcp?token={token}", p.addr);
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tungstenite::http::HeaderValue::from_static("mcp"),
    );
    let stream = TcpStream::connect(p.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (ws, resp) = tungstenite::client::client(req, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
    })?;
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("mcp"),
        "the subprotocol is selected"
    );
    Ok(Ws { ws })
}

#[test]
fn the_websocket_transport_lists_calls_and_tells_of_changes() {
    let p = Proxy::start(&[]);
    let mut a = member(&p, "alpha", json!([{"name": "echo"}]));
    let t = p.federation_token("client");
    // A bad token is refused before the upgrade.
    match mcp_ws(&p, "garbage") {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    let mut c = mcp_ws(&p, &t).expect("upgrade");
    c.send(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}));
    let r = c.recv_id(&json!(1));
    assert_eq!(r["result"]["protocolVersion"], "2025-03-26");
    c.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    c.send(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    let r = c.recv_id(&json!(2));
    assert_eq!(
        names(r["result"]["tools"].as_array().unwrap()),
        ["alpha__echo"]
    );
    // A call goes to the member and its answer comes back on the socket.
    c.send(&json!({"jsonrpc": "2.0", "id": "k", "method": "tools/call",
        "params": {"name": "alpha__echo", "arguments": {"s": "hi"}}}));
    let d = a.recv_method("federation/deliver");
    assert_eq!(d["params"]["message"]["params"]["arguments"]["s"], "hi");
    a.answer(&d, json!({"content": [{"type": "text", "text": "hi"}]}));
    let r = c.recv_id(&json!("k"));
    assert_eq!(r["result"]["content"][0]["text"], "hi");
    // A member joins: list_changed within a second, and the next list shows its tools.
    let t0 = std::time::Instant::now();
    let b = member(&p, "beta", json!([{"name": "sum"}]));
    let n = c.recv_method("notifications/tools/list_changed");
    assert!(n.get("id").is_none());
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    c.send(&json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}));
    let r = c.recv_id(&json!(3));
    assert_eq!(
        names(r["result"]["tools"].as_array().unwrap()),
        ["alpha__echo", "beta__sum"]
    );
    // A member leaves: list_changed again, and its tools are gone.
    drop(b);
    c.recv_method("notifications/tools/list_changed");
    c.send(&json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}));
    let r = c.recv_id(&json!(4));
    assert_eq!(
        names(r["result"]["tools"].as_array().unwrap()),
        ["alpha__echo"]
    );
    // A member that comes online with no tools changes nothing: no notification.
    let _quiet = member(&p, "quiet", json!([]));
    c.send(&json!({"jsonrpc": "2.0", "id": 5, "method": "ping"}));
    let r = c.recv();
    assert_eq!(
        r["id"], 5,
        "no list_changed when the tools did not change: {r}"
    );
    // Binary frames are refused like on the control channel.
    c.ws.send(tungstenite::Message::Binary(vec![1u8, 2].into()))
        .unwrap();
    assert_eq!(c.recv_close(), Some(1003));
}

/// `fedmcp mcp-stdio` with its stdin and stdout as pipes, as an MCP host starts it.
struct Bridge {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Bridge {
    fn start(url: &str, token: &str) -> Bridge {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(common::bin())
            .args(["mcp-stdio", "--url", url, "--token", token])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fedmcp mcp-stdio");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Bridge {
            child,
            stdin,
            lines,
        }
    }

    fn send(&mut self, v: &Value) {
        let s = self.stdin.as_mut().unwrap();
        writeln!(s, "{v}").unwrap();
        s.flush().unwrap();
    }

    /// The next line with this id (notifications in between are skipped).
    fn recv_id(&self, id: &Value) -> Value {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .expect("an answer on stdout");
            let v: Value = serde_json::from_str(&l).expect("a JSON line");
            if v.get("id") == Some(id) {
                return v;
            }
        }
    }

    /// Closes stdin and waits (bounded) for the exit code.
    fn finish(mut self) -> (Option<i32>, String) {
        drop(self.stdin.take());
        for _ in 0..100 {
            if let Ok(Some(st)) = self.child.try_wait() {
                let mut err = String::new();
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                return (st.code(), err);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("mcp-stdio did not exit when stdin ended");
    }
}

#[test]
fn the_stdio_bridge_relays_lists_and_calls() {
    let p = Proxy::start(&[]);
    let mut a = member(&p, "alpha", json!([{"name": "echo"}]));
    let url = format!("http://{}", p.addr);
    let mut b = Bridge::start(&url, &p.federation_token("host"));
    b.send(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "h", "version": "1"}}}));
    assert_eq!(
        b.recv_id(&json!(1))["result"]["serverInfo"]["name"],
        "fedmcp"
    );
    b.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    b.send(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    let r = b.recv_id(&json!(2));
    assert_eq!(
        names(r["result"]["tools"].as_array().unwrap()),
        ["alpha__echo"]
    );
    b.send(&json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "alpha__echo", "arguments": {"s": "x"}}}));
    let d = a.recv_method("federation/deliver");
    a.answer(&d, json!({"content": [{"type": "text", "text": "x"}]}));
    assert_eq!(b.recv_id(&json!(3))["result"]["content"][0]["text"], "x");
    // The proxy dies (kill -9) with a call in flight: the host gets an error for it from the
    // bridge, not silence. (A proxy that drains answers it itself: -32002.)
    b.send(&json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": {"name": "alpha__echo", "arguments": {}}}));
    let _ = a.recv_method("federation/deliver");
    common::unsafe_kill(p.pid(), "KILL");
    let r = b.recv_id(&json!(4));
    assert_eq!(r["error"]["code"], -32603, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("lost"),
        "{r}"
    );
    // stdin ends: the bridge exits 0 (even while it waits to reconnect).
    let (code, _) = b.finish();
    assert_eq!(code, Some(0));
}

#[test]
fn the_stdio_bridge_refuses_a_bad_url_or_token_with_exit_2() {
    let p = Proxy::start(&[]);
    let url = format!("http://{}", p.addr);
    for (u, t, want) in [
        ("ftp://nowhere", "a.b.c", "FEDMCP_URL:"),
        (url.as_str(), "not-a-token", "FEDMCP_TOKEN:"),
        // JWT-shaped, but the proxy refuses it: found out at connect time.
        (
            url.as_str(),
            "eyJh.eyJz.c2ln",
            "FEDMCP_TOKEN: the proxy refused the token",
        ),
    ] {
        let b = Bridge::start(u, t);
        let (code, err) = b.finish();
        assert_eq!(code, Some(2), "{u} {t}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
        assert!(err.starts_with(want), "{err:?}");
    }
}
