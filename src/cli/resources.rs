//! `fedmcp put`, `get`, `ls`, `rm`: the data channel's resources (contract §3).
//!
//! Owns streaming a file or stdin up (`Content-Length` for a file, chunked for stdin, offered
//! with `Expect: 100-continue`) and a resource down to stdout or a file, with its SHA-256
//! checked against the proxy's `ETag`; progress on stderr only for transfers over 1 MiB and
//! only when stderr is a terminal. Memory does not grow with a resource's size. A missing
//! input file, a bad name or a bad `OWNER/NAME` is exit 2 before anything is sent; a
//! download that fails never leaves a partial `-o` file behind.

use super::common::{
    Body, Exit, Outcome, Progress, Proxy, Spec, compact, encode, one_line, print_line, usage_tail,
};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

/// How long a transfer waits for each answer and each read (a large upload's answer comes
/// once the proxy has it on disk).
const WAIT: Duration = Duration::from_secs(60);

pub const PUT_USAGE: &str = concat!(
    "usage: fedmcp put NAME [FILE|-] [--readers ID,ID]\n",
    "\n",
    "Stores FILE (or stdin: -, or no FILE when stdin is not a terminal) as the resource NAME,\n",
    "owned by the server the (federation) token names: PUT /v1/resources/NAME, streamed (a\n",
    "file with Content-Length, stdin chunked). NAME is 1 to 128 of A-Z a-z 0-9 . _ -, not\n",
    "starting with a dot; storing it again replaces it. Prints the answer, one JSON line\n",
    "{\"owner\",\"name\",\"size\",\"sha256\",\"readers\"}. Progress goes to stderr for files over\n",
    "1 MiB when stderr is a terminal.\n",
    "\n",
    "Options:\n",
    "  --readers ID,ID  only these servers (and the owner) may read it; '' for the owner only\n",
    "                   (default: every member of the federation)\n",
    "\n",
    usage_tail!()
);

pub const GET_USAGE: &str = concat!(
    "usage: fedmcp get OWNER/NAME [-o FILE]\n",
    "\n",
    "Fetches the resource NAME of server OWNER (GET /v1/resources/OWNER/NAME) to stdout or\n",
    "FILE, streamed; its SHA-256 is checked against the proxy's ETag. The token is a\n",
    "federation token of a server that may read it, or an admin token; a resource that does\n",
    "not exist, or that the token may not read, is 404 (exit 1). Progress goes to stderr for\n",
    "resources over 1 MiB when stderr is a terminal.\n",
    "\n",
    "Options:\n",
    "  -o, --output FILE  write to FILE instead of stdout (created or truncated once the\n",
    "                     proxy has answered 200; removed again if the transfer fails)\n",
    "\n",
    usage_tail!()
);

pub const LS_USAGE: &str = concat!(
    "usage: fedmcp ls [--json]\n",
    "\n",
    "Lists the resources the token may read (GET /v1/resources): one JSON line per resource,\n",
    "{\"owner\",\"name\",\"size\",\"sha256\",\"readers\"} (readers null: every member).\n",
    "\n",
    "Options:\n",
    "  --json  print the whole answer {\"resources\":[...]} instead\n",
    "\n",
    usage_tail!()
);

pub const RM_USAGE: &str = concat!(
    "usage: fedmcp rm OWNER/NAME\n",
    "\n",
    "Removes a resource (DELETE /v1/resources/OWNER/NAME) with the owner's federation token or\n",
    "an admin token. Prints nothing; a resource that does not exist is 404 (exit 1).\n",
    "\n",
    usage_tail!()
);

fn bad_name(s: &Spec, name: &str) -> Exit {
    s.usage_error(&format!(
        "{:?} is not a resource name; expected 1 to 128 of A-Z a-z 0-9 . _ -, not starting with a dot",
        one_line(name)
    ))
}

/// `OWNER/NAME`, both checked; the request path.
fn resource_path(s: &Spec, arg: &str) -> Result<String, Exit> {
    let Some((owner, name)) = arg.split_once('/') else {
        return Err(s.usage_error(&format!("{:?} is not OWNER/NAME", one_line(arg))));
    };
    if !fedmcp::proto::jwt::valid_server_id(owner) {
        return Err(s.usage_error(&format!(
            "{:?} is not a server id; expected 1 to 64 of A-Z a-z 0-9 . _ : -, starting with a letter or digit, without __",
            one_line(owner)
        )));
    }
    if !fedmcp::federation::resources::valid_name(name) {
        return Err(bad_name(s, name));
    }
    Ok(format!("/v1/resources/{}/{}", encode(owner), encode(name)))
}

/// The one positional argument a command takes.
fn one<'a>(s: &Spec, positional: &'a [String], what: &str) -> Result<&'a str, Exit> {
    match positional {
        [x] => Ok(x),
        [] => Err(s.usage_error(&format!("{what} is required"))),
        [_, extra, ..] => Err(s.usage_error(&format!("unexpected argument {:?}", one_line(extra)))),
    }
}

const PUT: Spec = Spec {
    cmd: "put",
    usage: PUT_USAGE,
    values: &["--readers"],
    switches: &[],
};

/// `fedmcp put NAME [FILE|-] [--readers ID,ID]`.
pub fn put(args: &[String]) -> Outcome {
    let s = &PUT;
    let Some(a) = s.parse(args)? else {
        return Ok(());
    };
    let (name, file) = match a.positional.as_slice() {
        [name] => (name, None),
        [name, file] => (name, Some(file.as_str()).filter(|f| *f != "-")),
        [] => return Err(s.usage_error("a resource NAME is required")),
        [_, _, extra, ..] => {
            return Err(s.usage_error(&format!("unexpected argument {:?}", one_line(extra))));
        }
    };
    if !fedmcp::federation::resources::valid_name(name) {
        return Err(bad_name(s, name));
    }
    let mut query = String::new();
    if let Some(r) = a.value("--readers") {
        let mut ids = Vec::new();
        for id in r.split(',').filter(|i| !i.is_empty()) {
            if !fedmcp::proto::jwt::valid_server_id(id) {
                return Err(
                    s.usage_error(&format!("--readers: {:?} is not a server id", one_line(id)))
                );
            }
            ids.push(encode(id));
        }
        query = format!("?readers={}", ids.join(","));
    }
    // The input is opened before the proxy is asked anything.
    let (mut input, len): (Box<dyn Read>, Option<u64>) = match file {
        Some(path) => {
            let f = std::fs::File::open(path)
                .map_err(|e| s.usage_error(&format!("cannot open {:?}: {e}", one_line(path))))?;
            let meta = f
                .metadata()
                .map_err(|e| s.usage_error(&format!("cannot read {:?}: {e}", one_line(path))))?;
            if meta.is_dir() {
                return Err(s.usage_error(&format!("{:?} is a directory", one_line(path))));
            }
            // A regular file has a size; a pipe or a device is streamed chunked.
            let len = meta.is_file().then_some(meta.len());
            (Box::new(f), len)
        }
        None => {
            let stdin = std::io::stdin();
            if a.positional.len() == 1 && stdin.is_terminal() {
                return Err(s.usage_error(
                    "no FILE, and stdin is a terminal; give a FILE, or - to type the content",
                ));
            }
            (Box::new(stdin.lock()), None)
        }
    };
    let mut p = Proxy::from_args(s, &a)?;
    let progress = Progress::new("fedmcp put", len);
    let mut r = p.request(
        "PUT",
        &format!("/v1/resources/{}{query}", encode(name)),
        Body::Stream {
            from: &mut input,
            len,
            progress,
        },
        WAIT,
    )?;
    let answer = read_text(&p, &mut r)?;
    if !matches!(r.status, 200 | 201) {
        return Err(p.answer_error(r.status, &answer));
    }
    print_line(s.cmd, answer.trim())
}

/// An answer's body as text (bounded).
fn read_text(p: &Proxy, r: &mut super::common::Response) -> Result<String, Exit> {
    let mut raw = Vec::new();
    r.take(super::common::MAX_JSON_BYTES)
        .read_to_end(&mut raw)
        .map_err(|e| p.lost(&e, WAIT))?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

const GET: Spec = Spec {
    cmd: "get",
    usage: GET_USAGE,
    values: &["-o", "--output"],
    switches: &[],
};

/// `fedmcp get OWNER/NAME [-o FILE]`.
pub fn get(args: &[String]) -> Outcome {
    let s = &GET;
    let Some(a) = s.parse(args)? else {
        return Ok(());
    };
    let path = resource_path(s, one(s, &a.positional, "OWNER/NAME")?)?;
    let out_path = a.value("-o").or(a.value("--output"));
    if out_path == Some("") {
        return Err(s.usage_error("-o takes a file name"));
    }
    let mut p = Proxy::from_args(s, &a)?;
    let mut r = p.request("GET", &path, Body::Empty, WAIT)?;
    if r.status != 200 {
        let answer = read_text(&p, &mut r)?;
        return Err(p.answer_error(r.status, &answer));
    }
    let etag = r
        .header("etag")
        .map(|t| t.trim_matches('"').to_ascii_lowercase());
    let mut progress = Progress::new("fedmcp get", r.length());
    let Some(path) = out_path.filter(|o| *o != "-") else {
        let mut out = std::io::stdout().lock();
        let done = copy(&p, &mut r, &mut out, &mut progress, etag.as_deref());
        progress.finish();
        return done;
    };
    let mut f = std::fs::File::create(path).map_err(|e| {
        Exit::Failed(format!(
            "fedmcp get: cannot create {:?}: {e}",
            one_line(path)
        ))
    })?;
    let done = copy(&p, &mut r, &mut f, &mut progress, etag.as_deref()).and_then(|()| {
        f.sync_all().map_err(|e| {
            Exit::Failed(format!(
                "fedmcp get: cannot write {:?}: {e}",
                one_line(path)
            ))
        })
    });
    progress.finish();
    if done.is_err() && std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        let _ = std::fs::remove_file(path);
    }
    done
}

/// Streams the body to `out`, hashing it; checks the hash against the `ETag`.
fn copy(
    p: &Proxy,
    r: &mut super::common::Response,
    out: &mut dyn Write,
    progress: &mut Progress,
    etag: Option<&str>,
) -> Outcome {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; super::common::CHUNK_BYTES];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(p.lost(&e, WAIT)),
        };
        hash.update(&buf[..n]);
        match out.write_all(&buf[..n]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(Exit::Quiet),
            Err(e) => {
                return Err(Exit::Failed(format!(
                    "fedmcp get: cannot write the output: {e}"
                )));
            }
        }
        progress.add(n as u64);
    }
    out.flush()
        .map_err(|e| Exit::Failed(format!("fedmcp get: cannot write the output: {e}")))?;
    let got: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    match etag {
        Some(t) if t.len() == 64 && t != got => Err(Exit::Failed(format!(
            "fedmcp get: the bytes received (sha256 {got}) do not match the proxy's ETag {t}"
        ))),
        _ => Ok(()),
    }
}

const LS: Spec = Spec {
    cmd: "ls",
    usage: LS_USAGE,
    values: &[],
    switches: &["--json"],
};

/// `fedmcp ls [--json]`.
pub fn ls(args: &[String]) -> Outcome {
    let s = &LS;
    let Some(a) = s.parse(args)? else {
        return Ok(());
    };
    if let Some(extra) = a.positional.first() {
        return Err(s.usage_error(&format!("unexpected argument {:?}", one_line(extra))));
    }
    let mut p = Proxy::from_args(s, &a)?;
    let (status, body) = p.json("GET", "/v1/resources", None, WAIT)?;
    if status != 200 {
        return Err(p.answer_error(status, &body));
    }
    if a.switch("--json") {
        return print_line(s.cmd, body.trim());
    }
    #[derive(serde::Deserialize)]
    struct List<'a> {
        #[serde(borrow)]
        resources: Vec<&'a RawValue>,
    }
    let list: List = serde_json::from_str(&body)
        .map_err(|e| Exit::Failed(format!("fedmcp ls: an answer without its list: {e}")))?;
    for item in list.resources {
        print_line(s.cmd, &compact(item))?;
    }
    Ok(())
}

const RM: Spec = Spec {
    cmd: "rm",
    usage: RM_USAGE,
    values: &[],
    switches: &[],
};

/// `fedmcp rm OWNER/NAME`.
pub fn rm(args: &[String]) -> Outcome {
    let s = &RM;
    let Some(a) = s.parse(args)? else {
        return Ok(());
    };
    let path = resource_path(s, one(s, &a.positional, "OWNER/NAME")?)?;
    let mut p = Proxy::from_args(s, &a)?;
    let (status, body) = p.json("DELETE", &path, None, WAIT)?;
    if !(200..300).contains(&status) {
        return Err(p.answer_error(status, &body));
    }
    Ok(())
}
