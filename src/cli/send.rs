//! `fedmcp send`: one message to a server, or to every online server, over HTTP
//! (`POST /v1/messages`, contract §3 and §4) with the sender's federation token.
//!
//! Owns making the send's params from the command line (the message as JSON when it parses,
//! else as a JSON string; `-` reads it from stdin, bounded by [`MAX_STDIN_BYTES`]) and the
//! outcome: the result is printed as the proxy wrote it; `rejected` (the recipient answered
//! with an error) is exit 1 with that error on stderr; an HTTP error is exit 1 (4 for the
//! token). It never retries a send: a retry could deliver the message twice.

use super::common::{Exit, Outcome, Proxy, Spec, json_or_string, one_line, print_line, usage_tail};
use std::io::Read;
use std::time::Duration;

/// The most taken from stdin (the proxy's largest `FEDMCP_MAX_MESSAGE_BYTES`).
pub const MAX_STDIN_BYTES: u64 = 64 * 1024 * 1024;
/// How long the answer is waited for by default (the proxy's delivery timeout is 30 s).
const DEFAULT_TIMEOUT_SECS: u64 = 60;

pub const USAGE: &str = concat!(
    "usage: fedmcp send --to ID [--queue] [--ttl MS] [--timeout SECS] MESSAGE\n",
    "       fedmcp send --to ID [--queue] [--ttl MS] [--timeout SECS] -    (MESSAGE from stdin)\n",
    "\n",
    "Sends MESSAGE to server ID, or to every other online server with --to '*', as the server\n",
    "the (federation) token names: POST /v1/messages. MESSAGE goes as JSON when it is valid\n",
    "JSON ({\"hello\":\"bob\"}, 42, true, '\"text\"'), else as a JSON string (hello); - reads it\n",
    "from stdin (one trailing newline dropped). Prints the result, one JSON line:\n",
    "{\"msgId\",\"status\":\"delivered\",\"reply\":...} (the recipient's answer),\n",
    "{\"msgId\",\"status\":\"queued\"} or {\"msgId\",\"status\":\"broadcast\",\"recipients\":N}.\n",
    "A \"rejected\" result (the recipient answered with an error) is printed too, and the\n",
    "recipient's error goes to stderr with exit code 1.\n",
    "\n",
    "Options:\n",
    "  --to ID         the recipient, or '*' for every other online server\n",
    "  --queue         if ID is offline, keep the message until it connects (without it:\n",
    "                  exit 1, server_offline)\n",
    "  --ttl MS        drop a queued message not delivered within MS milliseconds\n",
    "  --timeout SECS  how long to wait for the answer (default 60; the proxy answers within\n",
    "                  its FEDMCP_DELIVERY_TIMEOUT_MS, 30 s unless configured)\n",
    "\n",
    usage_tail!()
);

const SPEC: Spec = Spec {
    cmd: "send",
    usage: USAGE,
    values: &["--to", "--ttl", "--timeout"],
    switches: &["--queue"],
};

/// `fedmcp send ...`.
pub fn run(args: &[String]) -> Outcome {
    let s = &SPEC;
    let Some(a) = s.parse(args)? else {
        return Ok(());
    };
    let to = a
        .value("--to")
        .ok_or_else(|| s.usage_error("--to ID is required"))?;
    if to != "*" && !fedmcp::proto::jwt::valid_server_id(to) {
        return Err(s.usage_error(&format!(
            "--to {:?} is not a server id or '*'; expected 1 to 64 of A-Z a-z 0-9 . _ : -, starting with a letter or digit, without __",
            one_line(to)
        )));
    }
    let ttl = match a.value("--ttl") {
        Some(v) => Some(
            v.parse::<u64>()
                .ok()
                .filter(|t| *t > 0)
                .ok_or_else(|| s.usage_error("--ttl takes a positive number of milliseconds"))?,
        ),
        None => None,
    };
    let timeout = match a.value("--timeout") {
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|t| (1..=86_400).contains(t))
            .ok_or_else(|| s.usage_error("--timeout takes 1 to 86400 seconds"))?,
        None => DEFAULT_TIMEOUT_SECS,
    };
    let message = match a.positional.as_slice() {
        [m] if m == "-" => {
            let mut raw = Vec::new();
            std::io::stdin()
                .lock()
                .take(MAX_STDIN_BYTES + 1)
                .read_to_end(&mut raw)
                .map_err(|e| Exit::Usage(format!("fedmcp send: cannot read stdin: {e}")))?;
            if raw.len() as u64 > MAX_STDIN_BYTES {
                return Err(s.usage_error(&format!(
                    "the message on stdin is over {MAX_STDIN_BYTES} bytes"
                )));
            }
            let text = String::from_utf8(raw)
                .map_err(|_| s.usage_error("the message on stdin is not UTF-8 text"))?;
            let text = text
                .strip_suffix("\r\n")
                .or_else(|| text.strip_suffix('\n'))
                .unwrap_or(&text);
            json_or_string(text)
        }
        [m] => json_or_string(m),
        [] => return Err(s.usage_error("a MESSAGE (or - for stdin) is required")),
        [_, extra, ..] => {
            return Err(s.usage_error(&format!(
                "unexpected argument {:?} (quote a message with spaces)",
                one_line(extra)
            )));
        }
    };
    let mut p = Proxy::from_args(s, &a)?;
    let mut body = format!(
        "{{\"to\":{},\"message\":{message}",
        serde_json::to_string(to).unwrap_or_default()
    );
    if a.switch("--queue") {
        body.push_str(",\"queue\":true");
    }
    if let Some(t) = ttl {
        body.push_str(&format!(",\"ttlMs\":{t}"));
    }
    body.push('}');
    let (status, answer) = p.json(
        "POST",
        "/v1/messages",
        Some(&body),
        Duration::from_secs(timeout),
    )?;
    if status != 200 {
        return Err(p.answer_error(status, &answer));
    }
    print_line(s.cmd, answer.trim())?;
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
    if v["status"] == "rejected" {
        let e = &v["error"];
        let code = match &e["code"] {
            serde_json::Value::Null => String::new(),
            c => format!("{c} "),
        };
        return Err(Exit::Failed(format!(
            "fedmcp send: {to} rejected the message: {code}{}",
            e["message"].as_str().unwrap_or("")
        )));
    }
    Ok(())
}
