//! `fedmcp servers add|list|show|remove`: the registry (contract §3) with an admin token.
//!
//! Owns turning those four into `POST /v1/servers`, `GET /v1/servers[/{id}]` and
//! `DELETE /v1/servers/{id}`, and printing the answers as JSON lines. A server id is checked
//! before anything is sent (exit 2); the proxy's refusals are exit 1 (4 for the token). It
//! prints a token only when asked to (`add`, whose answer holds one, or `--print-token`).

use super::common::{
    Args, Exit, Outcome, Proxy, Spec, compact, encode, json_arg, one_line, print_line, usage_tail,
};
use serde_json::value::RawValue;
use std::time::Duration;

/// How long an admin call waits for its answer (a cluster answers once JetStream has).
const WAIT: Duration = Duration::from_secs(30);

pub const USAGE: &str = concat!(
    "usage: fedmcp servers add ID [--control URL] [--data URL] [--capabilities JSON] [--print-token]\n",
    "       fedmcp servers list [--json]\n",
    "       fedmcp servers show ID\n",
    "       fedmcp servers remove ID\n",
    "\n",
    "The registry, with an admin token (contract section 3).\n",
    "  add     registers server ID, or updates it (POST /v1/servers); prints the answer, one\n",
    "          JSON line {\"serverId\",\"token\",\"expiresAt\",\"signingKey\",\"signingKeyEpoch\"}\n",
    "    --control URL        a ws:// or wss:// URL the proxy dials to reach the server\n",
    "    --data URL           the server's http:// or https:// data URL\n",
    "    --capabilities JSON  a JSON object kept with the entry\n",
    "    --print-token        print only the server's federation token, e.g.\n",
    "                         ALICE=$(fedmcp servers add alice --print-token)\n",
    "  list    one JSON line per registry entry; with --json the whole answer {\"servers\":[...]}\n",
    "  show    the entry of ID, one JSON line (exit 1 when there is none)\n",
    "  remove  removes ID: its tokens are revoked, its session closed, its queue and\n",
    "          resources dropped; prints nothing\n",
    "\n",
    usage_tail!()
);

fn spec(
    cmd: &'static str,
    values: &'static [&'static str],
    switches: &'static [&'static str],
) -> Spec {
    Spec {
        cmd,
        usage: USAGE,
        values,
        switches,
    }
}

/// `fedmcp servers ACTION ...`.
pub fn run(args: &[String]) -> Outcome {
    let group = spec("servers", &[], &[]);
    let Some(action) = args.first() else {
        return Err(group.usage_error("an action is required: add, list, show or remove"));
    };
    let rest = &args[1..];
    let s = match action.as_str() {
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return Ok(());
        }
        "add" => spec(
            "servers add",
            &["--control", "--data", "--capabilities"],
            &["--print-token"],
        ),
        "list" => spec("servers list", &[], &["--json"]),
        "show" => spec("servers show", &[], &[]),
        "remove" => spec("servers remove", &[], &[]),
        other => {
            return Err(group.usage_error(&format!(
                "unknown action {:?}; expected add, list, show or remove",
                one_line(other)
            )));
        }
    };
    let Some(a) = s.parse(rest)? else {
        return Ok(());
    };
    match action.as_str() {
        "list" => {
            if !a.positional.is_empty() {
                return Err(s.usage_error("takes no argument"));
            }
            let mut p = Proxy::from_args(&s, &a)?;
            let (status, body) = p.json("GET", "/v1/servers", None, WAIT)?;
            if status != 200 {
                return Err(p.answer_error(status, &body));
            }
            if a.switch("--json") {
                return print_line(s.cmd, body.trim());
            }
            #[derive(serde::Deserialize)]
            struct List<'a> {
                #[serde(borrow)]
                servers: Vec<&'a RawValue>,
            }
            let list: List = serde_json::from_str(&body).map_err(|e| {
                Exit::Failed(format!("fedmcp {}: an answer without its list: {e}", s.cmd))
            })?;
            for entry in list.servers {
                print_line(s.cmd, &compact(entry))?;
            }
            Ok(())
        }
        _ => {
            let id = one_id(&s, &a.positional)?;
            let mut p = Proxy::from_args(&s, &a)?;
            match action.as_str() {
                "add" => add(&s, &a, &mut p, id),
                "show" => {
                    let (status, body) =
                        p.json("GET", &format!("/v1/servers/{}", encode(id)), None, WAIT)?;
                    if status != 200 {
                        return Err(p.answer_error(status, &body));
                    }
                    print_line(s.cmd, body.trim())
                }
                _ => {
                    let (status, body) =
                        p.json("DELETE", &format!("/v1/servers/{}", encode(id)), None, WAIT)?;
                    if !(200..300).contains(&status) {
                        return Err(p.answer_error(status, &body));
                    }
                    Ok(())
                }
            }
        }
    }
}

/// The one server id an action takes, checked (contract §2's form).
fn one_id<'a>(s: &Spec, positional: &'a [String]) -> Result<&'a str, Exit> {
    match positional {
        [id] if fedmcp::proto::jwt::valid_server_id(id) && !id.is_empty() => Ok(id),
        [id] => Err(s.usage_error(&format!(
            "{:?} is not a server id; expected 1 to 64 of A-Z a-z 0-9 . _ : -, starting with a letter or digit, without __",
            one_line(id)
        ))),
        [] => Err(s.usage_error("a server ID is required")),
        [_, extra, ..] => Err(s.usage_error(&format!(
            "unexpected argument {:?}",
            one_line(extra)
        ))),
    }
}

fn add(s: &Spec, a: &Args, p: &mut Proxy, id: &str) -> Outcome {
    let mut body = serde_json::Map::new();
    body.insert("serverId".into(), id.into());
    let mut endpoints = serde_json::Map::new();
    if let Some(c) = a.value("--control") {
        endpoints.insert("control".into(), c.into());
    }
    if let Some(d) = a.value("--data") {
        endpoints.insert("data".into(), d.into());
    }
    if !endpoints.is_empty() {
        body.insert("endpoints".into(), endpoints.into());
    }
    if let Some(c) = a.value("--capabilities") {
        let caps = json_arg(s, "--capabilities", c, true)?;
        let v: serde_json::Value = serde_json::from_str(&caps)
            .map_err(|e| s.usage_error(&format!("--capabilities: {e}")))?;
        body.insert("capabilities".into(), v);
    }
    let body = serde_json::Value::Object(body).to_string();
    let (status, answer) = p.json("POST", "/v1/servers", Some(&body), WAIT)?;
    if !matches!(status, 200 | 201) {
        return Err(p.answer_error(status, &answer));
    }
    if a.switch("--print-token") {
        let token = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_string))
            .ok_or_else(|| Exit::Failed(format!("fedmcp {}: the answer holds no token", s.cmd)))?;
        return print_line(s.cmd, &token);
    }
    print_line(s.cmd, answer.trim())
}
