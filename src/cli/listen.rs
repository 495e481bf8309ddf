//! `fedmcp listen`: a member of the federation on the command line, over the control channel
//! (WebSocket `/v1/control`, contract §4) with its own federation token.
//!
//! Owns the member's side of a session: the welcome answered (with `--capabilities`), each
//! `federation/deliver` printed as one JSON line `{"msgId","from","message","sentAt"}` on
//! stdout (flushed per line, `message` as the proxy delivered it, whitespace outside strings
//! dropped when it spans lines), each request answered — with `--reply`, or with the output of
//! `--exec` (run by one worker thread, one message at a time, in order, so the socket keeps
//! being read and pings answered meanwhile) — the token refreshed when the proxy says it
//! is expiring, and reconnecting with the outbound backoff after a lost connection.
//!
//! Never: retry a refused token (exit 4), fight a newer session of the same server (close
//! 4003 ends it, exit 1), or read a clock (the socket's read timeout paces the loop).
//! Bounds: a command's stdout is taken up to [`MAX_REPLY_BYTES`], its stderr up to
//! [`MAX_STDERR_BYTES`] (the rest is read and dropped).

use super::common::{Exit, Outcome, Proxy, Spec, json_arg, json_or_string, one_line, usage_tail};
use fedmcp::client::{ConnectError, HANDSHAKE_TIMEOUT, Ws, connect};
use serde_json::value::RawValue;
use std::io::{self, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;
use tungstenite::Message;

/// How long one read of the socket waits (the loop's pace while a command runs).
const TICK: Duration = Duration::from_millis(50);
/// The largest answer taken from a command's stdout.
pub const MAX_REPLY_BYTES: u64 = 16 * 1024 * 1024;
/// The most of a command's stderr put in an error answer.
pub const MAX_STDERR_BYTES: u64 = 4096;
/// The JSON-RPC error code of an answer from a command that failed.
pub const EXEC_ERROR_CODE: i64 = -32000;
/// Reads given to the proxy's answer to our close (at [`TICK`] each: about 2 s).
const CLOSE_TICKS: u32 = 40;
/// The id of our `federation/refresh` request.
const REFRESH_ID: &str = "\"fedmcp-listen-refresh\"";

pub const USAGE: &str = concat!(
    "usage: fedmcp listen [--reply JSON | --exec CMD] [--count N] [--capabilities JSON]\n",
    "\n",
    "Joins the federation as the server the (federation) token names, over the control\n",
    "channel (WebSocket /v1/control), and prints each message delivered to it as one JSON\n",
    "line on stdout: {\"msgId\",\"from\",\"message\",\"sentAt\"}. A message sent as a request is\n",
    "answered with --reply, or with the output of --exec; a broadcast takes no answer.\n",
    "If the first connection fails it exits (3, or 4 for a refused token); once joined, a lost\n",
    "connection is retried with backoff (250 ms doubling to 30 s) until it is killed. A\n",
    "session closed because the token was revoked (4001) or expired (4002) ends with 4; one\n",
    "replaced by a newer session of the same server (4003) with 1. The token is refreshed\n",
    "when the proxy says it is expiring.\n",
    "\n",
    "Options:\n",
    "  --reply JSON         the answer to every request (default {\"ok\":true})\n",
    "  --exec CMD           run `sh -c CMD` for each message (one at a time, in order) with the\n",
    "                       message's JSON on stdin and FEDMCP_MSG_ID and FEDMCP_MSG_FROM set;\n",
    "                       its stdout is the answer (JSON if it parses, else a string); a\n",
    "                       non-zero exit answers a JSON-RPC error (code -32000) whose message\n",
    "                       is its stderr\n",
    "  --count N            exit 0 once N messages have been handled (printed and answered)\n",
    "  --capabilities JSON  a JSON object declared in the welcome answer, e.g. {\"tools\":[...]}\n",
    "\n",
    usage_tail!()
);

const SPEC: Spec = Spec {
    cmd: "listen",
    usage: USAGE,
    values: &["--reply", "--exec", "--count", "--capabilities"],
    switches: &[],
};

/// How requests are answered.
enum Answer {
    /// This JSON, always.
    Fixed(String),
    /// What a command says (jobs to the worker).
    Exec(Sender<Job>),
}

/// A message for the command worker.
struct Job {
    session: u64,
    /// The request's id (its JSON), `None` for a notification.
    id: Option<String>,
    msg_id: String,
    from: String,
    message: String,
}

/// The worker's outcome of a job: the `result` or `error` member of the answer.
struct Done {
    session: u64,
    id: Option<String>,
    answer: String,
}

struct State {
    answer: Answer,
    results: Option<Receiver<Done>>,
    capabilities: Option<String>,
    count: Option<u64>,
    handled: u64,
    session: u64,
    token: String,
}

/// How a session ended.
enum End {
    /// Lost (or closed for a reason worth reconnecting): why.
    Lost(String),
    /// The command is over (success, or a final failure).
    Exit(Outcome),
}

/// `fedmcp listen ...`.
pub fn run(args: &[String]) -> Outcome {
    let s = &SPEC;
    let Some(a) = s.parse(args)? else {
        return Ok(());
    };
    if let Some(extra) = a.positional.first() {
        return Err(s.usage_error(&format!("unexpected argument {:?}", one_line(extra))));
    }
    let count = match a.value("--count") {
        Some(v) => Some(
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| s.usage_error("--count takes a positive number"))?,
        ),
        None => None,
    };
    let capabilities = match a.value("--capabilities") {
        Some(c) => Some(json_arg(s, "--capabilities", c, true)?),
        None => None,
    };
    let (answer, results) = match (a.value("--reply"), a.value("--exec")) {
        (Some(_), Some(_)) => {
            return Err(s.usage_error("--reply and --exec do not go together"));
        }
        (_, Some("")) => return Err(s.usage_error("--exec takes a command")),
        (_, Some(cmd)) => {
            let (jobs_tx, jobs_rx) = channel::<Job>();
            let (done_tx, done_rx) = channel::<Done>();
            let cmd = cmd.to_string();
            std::thread::spawn(move || worker(&cmd, jobs_rx, done_tx));
            (Answer::Exec(jobs_tx), Some(done_rx))
        }
        (Some(r), None) => (Answer::Fixed(json_arg(s, "--reply", r, false)?), None),
        (None, None) => (Answer::Fixed("{\"ok\":true}".into()), None),
    };
    let mut p = Proxy::from_args(s, &a)?;
    let mut st = State {
        answer,
        results,
        capabilities,
        count,
        handled: 0,
        session: 0,
        token: p.token.clone(),
    };
    let path = p.path("/v1/control");
    let mut attempt = 0u32;
    loop {
        match connect(&p.url, &path, "fedmcp.v1", &st.token, &mut p.tls) {
            Ok(mut ws) => {
                st.session += 1;
                attempt = 0;
                match session(&mut ws, &mut st) {
                    End::Exit(outcome) => return outcome,
                    End::Lost(why) => {
                        eprintln!(
                            "fedmcp listen: connection lost ({}); reconnecting",
                            one_line(&why)
                        );
                    }
                }
            }
            Err(ConnectError::Refused(why)) => {
                return Err(Exit::Refused(format!("fedmcp listen: {why}")));
            }
            Err(ConnectError::Retry(why)) if st.session == 0 => {
                return Err(Exit::Unreachable(format!(
                    "fedmcp listen: cannot reach the proxy at {}: {why}",
                    p.shown()
                )));
            }
            Err(ConnectError::Retry(why)) => {
                let delay = fedmcp::federation::outbound::backoff(attempt, jitter());
                attempt = attempt.saturating_add(1);
                eprintln!(
                    "fedmcp listen: cannot reach the proxy ({}); retrying in {} ms",
                    one_line(&why),
                    delay.as_millis()
                );
                std::thread::sleep(delay);
            }
        }
    }
}

/// A jitter unit in [0, 1) from the OS (0.5 if it has none).
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    match getrandom::fill(&mut b) {
        Ok(()) => u32::from_le_bytes(b) as f64 / (u32::MAX as f64 + 1.0),
        Err(_) => 0.5,
    }
}

/// Whether a read or write that failed with `e` is to be tried again: its timeout passed
/// (the loop's pace), or a signal interrupted it (a command ending).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Writes one message; `Err` with why the session is lost. A write interrupted by a signal
/// is finished by flushing again (the frame is already queued).
fn send(ws: &mut Ws, text: String) -> Result<(), String> {
    let mut result = ws.send(Message::text(text));
    for _ in 0..100 {
        match result {
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {
                result = ws.flush();
            }
            _ => break,
        }
    }
    result.map_err(|e| e.to_string())
}

/// One session, from the upgrade to its end.
fn session(ws: &mut Ws, st: &mut State) -> End {
    let tcp = ws.get_ref().tcp();
    if let Err(e) = tcp
        .set_nonblocking(false)
        .and_then(|_| tcp.set_read_timeout(Some(TICK)))
        .and_then(|_| tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
    {
        return End::Lost(e.to_string());
    }
    loop {
        // Answers the command worker has made, for this session's requests.
        let mut finished = Vec::new();
        if let Some(rx) = &st.results {
            while let Ok(d) = rx.try_recv() {
                finished.push(d);
            }
        }
        for d in finished {
            if d.session != st.session {
                continue;
            }
            if let Some(id) = d.id
                && let Err(why) = send(
                    ws,
                    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},{}}}", d.answer),
                )
            {
                return End::Lost(why);
            }
            if let Some(end) = handled(ws, st) {
                return end;
            }
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                if let Some(end) = on_text(ws, st, t.as_str()) {
                    return end;
                }
            }
            Ok(Message::Close(frame)) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                let _ = ws.flush();
                let said = if reason.is_empty() {
                    format!("close {code}")
                } else {
                    format!("close {code}: {reason}")
                };
                return match code {
                    4001 => End::Exit(Err(Exit::Refused(format!(
                        "fedmcp listen: the proxy revoked the token ({said})"
                    )))),
                    4002 => End::Exit(Err(Exit::Refused(format!(
                        "fedmcp listen: the token expired ({said})"
                    )))),
                    4003 => End::Exit(Err(Exit::Failed(format!(
                        "fedmcp listen: a newer session of this server replaced this one ({said})"
                    )))),
                    _ => End::Lost(format!("the proxy closed the session, {said}")),
                };
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                // Nothing came: push out what is pending (a pong).
                match ws.flush() {
                    Ok(()) => {}
                    Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
                    Err(e) => return End::Lost(e.to_string()),
                }
            }
            Err(e) => return End::Lost(e.to_string()),
        }
    }
}

/// One text frame: a message or a batch of them.
fn on_text(ws: &mut Ws, st: &mut State, text: &str) -> Option<End> {
    if text.trim_start().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
        for item in items {
            if let Some(end) = on_message(ws, st, item.get()) {
                return Some(end);
            }
        }
        None
    } else {
        on_message(ws, st, text)
    }
}

#[derive(serde::Deserialize)]
struct Incoming<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    method: Option<String>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Deliver<'a> {
    #[serde(borrow)]
    msg_id: &'a RawValue,
    #[serde(borrow)]
    from: &'a RawValue,
    #[serde(borrow)]
    message: &'a RawValue,
    #[serde(borrow, default)]
    sent_at: Option<&'a RawValue>,
}

fn on_message(ws: &mut Ws, st: &mut State, text: &str) -> Option<End> {
    let m: Incoming = serde_json::from_str(text).ok()?;
    let id = m.id.map(|i| i.get().to_string()).filter(|i| i != "null");
    let lost = |why: String| Some(End::Lost(why));
    match m.method.as_deref() {
        Some("federation/welcome") => {
            let result = match &st.capabilities {
                Some(c) => format!("{{\"capabilities\":{c}}}"),
                None => "{}".into(),
            };
            let who = m
                .params
                .and_then(|p| serde_json::from_str::<serde_json::Value>(p.get()).ok())
                .and_then(|v| v["serverId"].as_str().map(str::to_string))
                .unwrap_or_default();
            if let Err(why) = send(
                ws,
                format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{result}}}",
                    id.as_deref().unwrap_or("null")
                ),
            ) {
                return lost(why);
            }
            eprintln!("fedmcp listen: joined as {}", one_line(&who));
            None
        }
        Some("federation/deliver") => {
            let d: Deliver = serde_json::from_str(m.params?.get()).ok()?;
            let line = format!(
                "{{\"msgId\":{},\"from\":{},\"message\":{},\"sentAt\":{}}}",
                d.msg_id.get(),
                d.from.get(),
                one_line_json(d.message.get()),
                d.sent_at.map_or("null", |s| s.get())
            );
            if let Err(e) = super::common::print_line("listen", &line) {
                return Some(End::Exit(Err(e)));
            }
            match &st.answer {
                Answer::Fixed(reply) => {
                    if let Some(id) = id
                        && let Err(why) = send(
                            ws,
                            format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{reply}}}"),
                        )
                    {
                        return lost(why);
                    }
                    handled(ws, st)
                }
                Answer::Exec(jobs) => {
                    let job = Job {
                        session: st.session,
                        id,
                        msg_id: json_text(d.msg_id),
                        from: json_text(d.from),
                        message: d.message.get().to_string(),
                    };
                    if jobs.send(job).is_err() {
                        return Some(End::Exit(Err(Exit::Failed(
                            "fedmcp listen: the command worker has stopped".into(),
                        ))));
                    }
                    None
                }
            }
        }
        Some("federation/tokenExpiring") => {
            let refresh = format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{REFRESH_ID},\"method\":\"federation/refresh\"}}"
            );
            send(ws, refresh).err().and_then(lost)
        }
        Some(_) => {
            // A request this member does not serve; notifications (`federation/delivered`)
            // are not printed.
            let id = id?;
            send(
                ws,
                format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{{\"code\":-32601,\"message\":\"method not found\"}}}}"
                ),
            )
            .err()
            .and_then(lost)
        }
        None => {
            // A response: ours to `federation/refresh` carries the new token.
            if id.as_deref() == Some(REFRESH_ID) {
                let token = m
                    .result
                    .and_then(|r| serde_json::from_str::<serde_json::Value>(r.get()).ok())
                    .and_then(|v| v["token"].as_str().map(str::to_string));
                match token {
                    Some(t) => {
                        st.token = t;
                        eprintln!("fedmcp listen: token refreshed");
                    }
                    None => eprintln!("fedmcp listen: the proxy did not refresh the token"),
                }
            }
            None
        }
    }
}

/// One more message handled; at `--count`, the session is closed and the command is over.
fn handled(ws: &mut Ws, st: &mut State) -> Option<End> {
    st.handled += 1;
    if st.count.is_some_and(|n| st.handled >= n) {
        close(ws);
        return Some(End::Exit(Ok(())));
    }
    None
}

/// Closes the session and waits (about 2 s at most) for the proxy's close, so that every
/// answer written before is read by the proxy before the socket goes.
fn close(ws: &mut Ws) {
    let _ = ws.close(None);
    let _ = ws.flush();
    for _ in 0..CLOSE_TICKS {
        match ws.read() {
            Ok(Message::Close(_)) => {}
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// A JSON string's text (its raw JSON when it is not a string).
fn json_text(raw: &RawValue) -> String {
    serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_string())
}

/// A JSON value on one line: whitespace outside strings dropped when it has a line break
/// (the bytes are kept as they are otherwise).
pub fn one_line_json(raw: &str) -> String {
    if !raw.contains(['\n', '\r']) {
        return raw.to_string();
    }
    let mut out = String::with_capacity(raw.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in raw.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_ascii_whitespace() {
            out.push(c);
        }
    }
    out
}

/// The command worker: runs `sh -c CMD` for each job, in order.
fn worker(cmd: &str, jobs: Receiver<Job>, done: Sender<Done>) {
    for job in jobs {
        let answer = run_command(cmd, &job);
        let d = Done {
            session: job.session,
            id: job.id,
            answer,
        };
        if done.send(d).is_err() {
            return;
        }
    }
}

/// An error member of an answer.
fn error_member(message: &str, exit_code: Option<i32>) -> String {
    let m = serde_json::to_string(message).unwrap_or_else(|_| "\"\"".into());
    match exit_code {
        Some(c) => format!(
            "\"error\":{{\"code\":{EXEC_ERROR_CODE},\"message\":{m},\"data\":{{\"exitCode\":{c}}}}}"
        ),
        None => format!("\"error\":{{\"code\":{EXEC_ERROR_CODE},\"message\":{m}}}"),
    }
}

/// Runs the command for one message: the `result` or `error` member of its answer.
fn run_command(cmd: &str, job: &Job) -> String {
    let child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("FEDMCP_MSG_ID", &job.msg_id)
        .env("FEDMCP_MSG_FROM", &job.from)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fedmcp listen: cannot run sh: {e}");
            return error_member(&format!("fedmcp listen: cannot run sh: {e}"), None);
        }
    };
    // Stdin and stderr on their own threads, so no pipe can fill up and stall the command.
    let input = format!("{}\n", job.message);
    let stdin = child.stdin.take().map(|mut w| {
        std::thread::spawn(move || {
            let _ = w.write_all(input.as_bytes());
        })
    });
    let stderr = child.stderr.take().map(|r| {
        std::thread::spawn(move || {
            let mut r = r;
            let mut text = Vec::new();
            let _ = (&mut r).take(MAX_STDERR_BYTES).read_to_end(&mut text);
            let _ = io::copy(&mut r, &mut io::sink());
            String::from_utf8_lossy(&text).into_owned()
        })
    });
    let mut out = Vec::new();
    if let Some(mut r) = child.stdout.take() {
        let _ = (&mut r).take(MAX_REPLY_BYTES + 1).read_to_end(&mut out);
        let _ = io::copy(&mut r, &mut io::sink());
    }
    let status = child.wait();
    if let Some(t) = stdin {
        let _ = t.join();
    }
    let err_text = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    let status = match status {
        Ok(s) => s,
        Err(e) => return error_member(&format!("fedmcp listen: the command was lost: {e}"), None),
    };
    if !status.success() {
        let code = status.code().unwrap_or(-1);
        let why = one_line(&err_text);
        let message = if why.is_empty() {
            format!("the command exited with status {code}")
        } else {
            why
        };
        return error_member(&message, Some(code));
    }
    if out.len() as u64 > MAX_REPLY_BYTES {
        return error_member(
            &format!("the command's output is over {MAX_REPLY_BYTES} bytes"),
            None,
        );
    }
    let text = String::from_utf8_lossy(&out);
    let text = text.trim_end_matches(['\n', '\r']);
    format!("\"result\":{}", json_or_string(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_put_on_one_line() {
        assert_eq!(one_line_json("{\"a\": 1}"), "{\"a\": 1}");
        assert_eq!(
            one_line_json("{\n  \"a b\": \"x\\\" \\n y\",\n  \"c\": [1, 2]\n}"),
            "{\"a b\":\"x\\\" \\n y\",\"c\":[1,2]}"
        );
    }

    #[test]
    fn a_failed_command_answers_an_error() {
        let e = error_member("boom", Some(3));
        let v: serde_json::Value = serde_json::from_str(&format!("{{{e}}}")).unwrap();
        assert_eq!(v["error"]["code"], EXEC_ERROR_CODE);
        assert_eq!(v["error"]["message"], "boom");
        assert_eq!(v["error"]["data"]["exitCode"], 3);
    }
}
