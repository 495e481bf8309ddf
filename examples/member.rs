//! A member of the federation in Rust: it registers itself, joins over the control channel
//! with the project's own client code (`fedmcp::client`), declares two tools, and answers
//! their calls — MCP clients of the proxy see them as `demo-rust__echo` and `demo-rust__add`.
//!
//! ```sh
//! make run                                    # in one terminal; it prints an admin token
//! FEDMCP_TOKEN=<that token> cargo run --example member
//! ```
//!
//! `FEDMCP_URL` (default `http://127.0.0.1:8443`) is the proxy; `FEDMCP_SERVER_ID` (default
//! `demo-rust`) the id it registers. With a federation token instead of an admin one it
//! skips registering and joins as the token's server.

use fedmcp::client::{self, ConnectError, Ws};
use fedmcp::proto::upgrade::ControlUrl;
use serde_json::{Value, json};
use tungstenite::Message;

fn main() {
    if let Err(e) = run() {
        eprintln!("member: {e}");
        std::process::exit(2);
    }
}

/// The tools this member declares (MCP Tool objects).
fn tools() -> Value {
    json!([
        {"name": "echo", "description": "Returns its text.",
         "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
        {"name": "add", "description": "Adds two numbers.",
         "inputSchema": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}
    ])
}

/// The answer to one `tools/call`: an MCP result, or a JSON-RPC error object.
fn call(name: &str, args: &Value) -> Result<Value, Value> {
    let text = |t: String| json!({"content": [{"type": "text", "text": t}]});
    match name {
        "echo" => match args["text"].as_str() {
            Some(t) => Ok(text(t.to_string())),
            None => Err(json!({"code": -32602, "message": "echo takes {\"text\": string}"})),
        },
        "add" => match (args["a"].as_f64(), args["b"].as_f64()) {
            (Some(a), Some(b)) => Ok(text(format!("{}", a + b))),
            _ => {
                Err(json!({"code": -32602, "message": "add takes {\"a\": number, \"b\": number}"}))
            }
        },
        other => Err(json!({"code": -32601, "message": format!("no tool {other}")})),
    }
}

fn run() -> Result<(), String> {
    let base = std::env::var("FEDMCP_URL").unwrap_or_else(|_| "http://127.0.0.1:8443".into());
    let token = std::env::var("FEDMCP_TOKEN").map_err(|_| "FEDMCP_TOKEN is required")?;
    let id = std::env::var("FEDMCP_SERVER_ID").unwrap_or_else(|_| "demo-rust".into());
    let ws_url = base
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    let url = ControlUrl::parse(&ws_url).ok_or(format!("FEDMCP_URL: {base:?} is not a URL"))?;
    let mut tls = None;
    // An admin token registers the member and gets its federation token back.
    let body = json!({"serverId": id, "capabilities": {"tools": tools()}}).to_string();
    let (status, answer) =
        client::http_json(&url, "POST", "/v1/servers", &token, Some(&body), &mut tls)?;
    let member_token = match status {
        200 | 201 => serde_json::from_str::<Value>(&answer)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_string))
            .ok_or("the registration answer has no token")?,
        // Not an admin token: take it as this member's own federation token.
        403 => token,
        s => return Err(format!("registering {id}: {s} {answer}")),
    };
    let mut ws = match client::connect(&url, "/v1/control", "fedmcp.v1", &member_token, &mut tls) {
        Ok(ws) => ws,
        Err(ConnectError::Refused(e) | ConnectError::Retry(e)) => return Err(e),
    };
    // Blocking is fine here: one member, one socket.
    ws.get_ref()
        .tcp()
        .set_nonblocking(false)
        .map_err(|e| e.to_string())?;
    eprintln!("member: joined as {id}; serving echo and add (Ctrl-C ends)");
    serve(&mut ws)
}

fn serve(ws: &mut Ws) -> Result<(), String> {
    loop {
        let text = match ws.read().map_err(|e| e.to_string())? {
            Message::Text(t) => t,
            Message::Close(_) => return Ok(()),
            _ => continue,
        };
        let v: Value = serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
        let answer = match v["method"].as_str() {
            // The welcome: answer with the tools this member serves.
            Some("federation/welcome") => {
                json!({"jsonrpc": "2.0", "id": v["id"], "result": {"capabilities": {"tools": tools()}}})
            }
            // A delivery: an MCP `tools/call` from a client of the facade, or any message.
            Some("federation/deliver") if v.get("id").is_some() => {
                let m = &v["params"]["message"];
                let outcome = if m["method"] == "tools/call" {
                    call(
                        m["params"]["name"].as_str().unwrap_or(""),
                        &m["params"]["arguments"],
                    )
                } else {
                    Ok(json!({"received": m}))
                };
                match outcome {
                    Ok(r) => json!({"jsonrpc": "2.0", "id": v["id"], "result": r}),
                    Err(e) => json!({"jsonrpc": "2.0", "id": v["id"], "error": e}),
                }
            }
            _ => continue,
        };
        ws.send(Message::text(answer.to_string()))
            .map_err(|e| e.to_string())?;
    }
}
