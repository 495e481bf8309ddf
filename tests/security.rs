//! Security findings and the v1.1 hardening (docs/PROTOCOL.md §1-§8), end to end against the real
//! binary. One test per finding that was fixed; each fails against the code before the fix
//! (commit 1468131: run with `FEDMCP_TEST_BIN=<old fedmcp>`) and passes now:
//!
//! 1. server ids are never path components (`.`, `..`, hidden names, `__`); no token or
//!    resource name, whatever it is called, reaches a file outside `resources/<owner>/`;
//! 2. a token is checked on the request head, before any byte of a body is read (also for
//!    `Expect: 100-continue`), and an unauthenticated socket costs at most its head;
//! 3. the bytes held for one recipient (queue plus copies awaiting its answer) are bounded by
//!    `FEDMCP_QUEUE_MAX_BYTES`;
//! 4. `POST /v1/messages` has the control channel's limits (JSON depth, the shared rate limit);
//! 5. signing keys have epochs: a removed server's key, or a rotated one, never verifies again;
//! 6. a token is never sent in clear text off the machine (`ws://` endpoints must be loopback);
//! 7. the state dir is 0700 and its files 0600, also when they existed with loose modes;
//!
//! and the v1.1 items: connection slots go to members with tokens (unauthenticated sockets are
//! displaced), `jti` revocation (durable, bounded, sessions closed 4001), resource readers
//! and per-owner quotas (a removed server's resources go with it), and the limit on
//! `auth_failed` audit lines.
//!
//! Every wait is bounded: harness reads time out after `WAIT`, and every polling loop here has
//! its own deadline. A crash is `SIGKILL` and a reap, so the old process is gone before a new
//! one opens the same state dir.
mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A directory (a state dir, an audit log's home) removed when the test ends.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        Dir(scratch_dir(&format!("sec-{tag}")))
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("scratch path is UTF-8")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A proxy (the harness keeps a memory-only proxy's private resources directory inside the
/// proxy's scratch dir, which goes when the proxy does).
struct Px(Proxy);

impl std::ops::Deref for Px {
    type Target = Proxy;
    fn deref(&self) -> &Proxy {
        &self.0
    }
}

impl std::ops::DerefMut for Px {
    fn deref_mut(&mut self) -> &mut Proxy {
        &mut self.0
    }
}

/// A memory-only proxy with `env`.
fn start(env: &[(&str, &str)]) -> Px {
    Px(Proxy::start(env))
}

/// A proxy on the state dir `dir`, with `env`.
fn start_on(dir: &Dir, env: &[(&str, &str)]) -> Px {
    let mut all = vec![("FEDMCP_STATE_DIR", dir.arg())];
    all.extend_from_slice(env);
    Px(Proxy::start(&all))
}

/// A proxy on the state dir `dir` with no `FEDMCP_JWT_SECRET`: it generates (or reloads)
/// `<dir>/jwt-secret`, whose text is the key; `secret` is set to it so the harness mints
/// valid tokens.
fn start_on_generated_secret(dir: &Dir) -> Px {
    let mut p = Px(Proxy::start_unset(
        &[("FEDMCP_STATE_DIR", dir.arg())],
        &["FEDMCP_JWT_SECRET"],
    ));
    p.secret = generated_secret(&dir.0);
    p
}

/// The key kept in `<dir>/jwt-secret`: the file's text without a trailing newline.
fn generated_secret(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("jwt-secret")).expect("jwt-secret is written");
    let key = text.trim_end_matches(['\n', '\r']).to_string();
    assert!(key.len() >= 32, "a generated secret of {} bytes", key.len());
    key
}

/// `kill -9` and reap: the process is gone when this returns.
fn crash(p: &mut Proxy) {
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();
}

fn rpc(id: Value, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn file_sha(path: &Path) -> Option<String> {
    std::fs::read(path).ok().map(|b| sha256_hex(&b))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn set_mode(path: &Path, m: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(m))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Every file and directory under `root` (not `root` itself), depth first.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

/// A connection to the proxy (writes bounded by `WAIT`).
fn connect(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(p.addr).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

/// Reads until EOF (or a reset) or until `limit` has passed; says whether the connection
/// ended within `limit`.
fn read_until_eof(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

/// Reads until `buf` holds `pat`, the connection ends, or `limit` has passed.
fn read_until(s: &mut TcpStream, pat: &[u8], limit: Duration) -> Vec<u8> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while t0.elapsed() < limit && !out.windows(pat.len()).any(|w| w == pat) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    out
}

/// Reads one complete `Content-Length` response within `limit`; the connection may stay
/// open.
#[track_caller]
fn read_one_response(s: &mut TcpStream, limit: Duration) -> Resp {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some((r, _)) = Resp::parse_one(&out)
            && r.header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .is_some_and(|n| r.body.len() >= n)
        {
            return r;
        }
        assert!(
            t0.elapsed() < limit,
            "no complete response within {limit:?}: {:?}",
            String::from_utf8_lossy(&out)
        );
        match s.read(&mut buf) {
            Ok(0) => panic!(
                "connection ended before a complete response: {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!(
                "read failed ({e}) before a complete response: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

#[track_caller]
fn parse(raw: &[u8]) -> Resp {
    Resp::parse(raw)
        .unwrap_or_else(|| panic!("unparseable response: {:?}", String::from_utf8_lossy(raw)))
}

#[track_caller]
fn assert_error(r: &Resp, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert_eq!(r.code(), code, "{what}: {}", r.text());
}

/// `PUT /v1/resources/{target}` (target: name, maybe with a query) by `Content-Length`.
fn put(p: &Proxy, token: &str, target: &str, body: &[u8]) -> Resp {
    let mut req = format!(
        "PUT /v1/resources/{target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let mut s = connect(p);
    let _ = s.write_all(&req); // refused uploads may close before the body is read
    let (raw, _) = read_until_eof(&mut s, WAIT);
    parse(&raw)
}

/// The claims of a compact JWS, decoded without checking it.
fn claims_of(token: &str) -> Value {
    let seg = token.split('.').nth(1).expect("three segments");
    let bytes = URL_SAFE_NO_PAD.decode(seg).expect("claims are base64url");
    serde_json::from_slice(&bytes).expect("claims are JSON")
}

/// A token minted with the proxy's secret and the given `jti`.
fn token_with_jti(p: &Proxy, id: &str, t: TokenType, jti: &str) -> String {
    let now = now_secs();
    jwt::sign(
        p.secret.as_bytes(),
        &Claims {
            server_id: id.into(),
            token_type: t,
            iat: now,
            exp: now + 3600,
            nbf: None,
            jti: Some(jti.into()),
        },
    )
}

/// The sum of a metric's samples over all its labels (`None`: no sample of that name).
fn metric_sum(p: &Proxy, name: &str) -> Option<f64> {
    let r = p.http("GET", "/metrics", None, None);
    assert_eq!(r.status, 200, "metrics: {}", r.text());
    let mut found = None;
    for line in r.text().lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if key.split('{').next() == Some(name)
            && let Ok(v) = value.trim().parse::<f64>()
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// A raw `GET /v1/control` upgrade request with a bearer token.
fn upgrade_request(token: &str) -> String {
    format!(
        "GET /v1/control HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
}

/// A signing key as the contract derives it (§6), base64url without padding.
fn signing_key_b64(secret: &str, id: &str, epoch: u64) -> String {
    jwt::hmac_b64(
        secret.as_bytes(),
        &[format!("fedmcp/v1/sign/{id}/{epoch}").as_bytes()],
    )
}

fn key_bytes(b64: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(b64)
        .unwrap_or_else(|e| panic!("signingKey {b64:?} is not base64url: {e}"))
}

/// A `federation/send` request whose `message` is the raw JSON `message`, signed by the
/// sender with `key` (§6: msgId and from are empty strings).
fn signed_send(id: &str, to: &str, message: &str, key: &[u8]) -> String {
    let sig = jwt::hmac_b64(key, &[b"\n\n", message.as_bytes()]);
    format!(
        r#"{{"jsonrpc":"2.0","id":"{id}","method":"federation/send","params":{{"to":"{to}","message":{message},"sig":"{sig}"}}}}"#
    )
}

/// Runs the binary with `args` and `env` (nothing else in its environment); its stdout, or
/// a panic after `WAIT`.
fn run_bin(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = Dir::new("run");
    let out_path = dir.0.join("stdout");
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn fedmcp");
    let t0 = Instant::now();
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if t0.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fedmcp {args:?} did not exit within {WAIT:?}");
        }
        sleep_ms(20);
    };
    (code, std::fs::read_to_string(&out_path).unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// Finding 1: server ids are never path components
// ---------------------------------------------------------------------------------------------

#[test]
fn finding1_server_ids_are_never_path_components() {
    // Registration refuses ids that are path components, hidden names, or split an MCP tool
    // name; a well-formed id next to them is accepted (the check can tell them apart).
    {
        let p = start(&[]);
        let admin = p.admin_token();
        for id in [".", "..", ".tmp", "-x", "_x", "a__b"] {
            let r = p.http(
                "POST",
                "/v1/servers",
                Some(&admin),
                Some(&json!({"serverId": id}).to_string()),
            );
            assert_error(&r, 400, "invalid_request", &format!("register {id:?}"));
        }
        let r = p.http(
            "POST",
            "/v1/servers",
            Some(&admin),
            Some(&json!({"serverId": "a_b.c:d-e"}).to_string()),
        );
        assert_eq!(r.status, 201, "a valid id: {}", r.text());
        // A token naming such an id is malformed.
        let dotdot = p.federation_token("..");
        let r = put(&p, &dotdot, "x", b"payload");
        assert_error(&r, 401, "malformed_token", "PUT with serverId \"..\"");
        let ok = put(&p, &p.federation_token("a_b.c:d-e"), "x", b"payload");
        assert_eq!(ok.status, 201, "PUT with a valid id: {}", ok.text());
    }

    // Every name found in a state dir, used as an owner and as a resource name, stays inside
    // `resources/<owner>/`: nothing outside is written, and everything survives a restart.
    let state = Dir::new("names");
    let mut p = start_on_generated_secret(&state);
    let secret = p.secret.clone();
    let alice = p.register("alice");
    let original = b"alice's original resource bytes".to_vec();
    let r = put(&p, &alice, "data.bin", &original);
    assert_eq!(r.status, 201, "alice's upload: {}", r.text());

    let root = state.0.clone();
    let mut names: BTreeSet<String> = [
        ".",
        "..",
        ".tmp",
        "jwt-secret",
        "state.log",
        "state.snap",
        "resources",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for path in walk(&root) {
        names.insert(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    for expected in ["alice", "data.bin", ".data.bin.meta"] {
        assert!(names.contains(expected), "{expected} in {names:?}");
    }
    let before: BTreeMap<PathBuf, Option<String>> = walk(&root)
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let h = file_sha(&p);
            (p, h)
        })
        .collect();
    let guarded = ["jwt-secret", "state.log", "state.snap"].map(|n| (n, file_sha(&root.join(n))));
    assert!(
        guarded[0].1.is_some() && guarded[1].1.is_some(),
        "{guarded:?}"
    );

    let mut stored: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
    for owner in &names {
        let token = p.federation_token(owner);
        if !jwt::valid_server_id(owner) {
            let r = put(&p, &token, "probe", b"x");
            assert_error(&r, 401, "malformed_token", &format!("owner {owner:?}"));
            continue;
        }
        // Plain, percent-encoded and traversing spellings of each name.
        let mut targets: Vec<(String, Option<String>)> = Vec::new();
        for name in &names {
            targets.push((name.clone(), Some(name.clone())));
            let encoded: String = name.bytes().map(|b| format!("%{b:02X}")).collect();
            targets.push((encoded, Some(name.clone())));
            targets.push((format!("..%2F{name}"), None));
            targets.push((format!("%2E%2E%2F%2E%2E%2F{name}"), None));
        }
        for (target, decoded) in targets {
            if owner == "alice" && decoded.as_deref() == Some("data.bin") {
                continue; // alice's original stays as it was
            }
            let body = format!("{owner} wrote {target}").into_bytes();
            let r = put(&p, &token, &target, &body);
            let what = format!("owner {owner:?} PUT {target:?}");
            match decoded.filter(|n| fedmcp::federation::resources::valid_name(n)) {
                Some(name) => {
                    assert_eq!(r.status, 201, "{what}: {}", r.text());
                    let j = r.json();
                    assert_eq!(j["owner"], owner.as_str(), "{what}: {j}");
                    assert_eq!(j["name"], name.as_str(), "{what}: {j}");
                    stored.insert((owner.clone(), name), body);
                }
                None => assert_error(&r, 400, "invalid_name", &what),
            }
        }
    }
    assert!(
        stored.len() > 20,
        "only {} uploads were stored",
        stored.len()
    );
    // Reads and deletes do not traverse either.
    let admin = p.admin_token();
    for path in [
        "/v1/resources/%2E%2E/jwt-secret",
        "/v1/resources/../state.log",
        "/v1/resources/alice/..%2F..%2Fjwt-secret",
        "/v1/resources/.tmp/x",
        "/v1/resources/%2E/state.log",
    ] {
        for method in ["GET", "DELETE"] {
            let r = p.http(method, path, Some(&admin), None);
            assert_error(&r, 404, "not_found", &format!("{method} {path}"));
        }
    }

    for (name, h) in &guarded {
        assert_eq!(
            &file_sha(&root.join(name)),
            h,
            "{name} changed: an upload wrote outside resources/<owner>/"
        );
    }
    // What the uploads created is exactly their files and sidecars under resources/<owner>/.
    let res = root.join("resources");
    for path in walk(&root).into_iter().filter(|p| p.is_file()) {
        if before.contains_key(&path) {
            assert_eq!(file_sha(&path), before[&path], "{} changed", path.display());
            continue;
        }
        let rel = path
            .strip_prefix(&res)
            .unwrap_or_else(|_| panic!("{} was created outside resources/", path.display()));
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            parts.len(),
            2,
            "{} is not resources/<owner>/<file>",
            path.display()
        );
        let (owner, file) = (&parts[0], &parts[1]);
        let name = file
            .strip_prefix('.')
            .and_then(|f| f.strip_suffix(".meta"))
            .unwrap_or(file);
        assert!(
            stored.contains_key(&(owner.clone(), name.to_string())),
            "{} belongs to no accepted upload",
            path.display()
        );
    }
    for ((owner, name), body) in &stored {
        let path = res.join(owner).join(name);
        assert_eq!(
            std::fs::read(&path).ok().as_ref(),
            Some(body),
            "{} holds the upload",
            path.display()
        );
    }

    // Restart on the same dir: the original secret still signs, alice's bytes are intact.
    crash(&mut p);
    let p = start_on_generated_secret(&state);
    assert_eq!(p.secret, secret, "the generated secret was kept");
    let r = p.http("GET", "/v1/servers", Some(&p.admin_token()), None);
    assert_eq!(r.status, 200, "admin token after restart: {}", r.text());
    assert!(
        r.json()["servers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["serverId"] == "alice"),
        "{}",
        r.text()
    );
    let r = p.http("GET", "/v1/resources/alice/data.bin", Some(&alice), None);
    assert_eq!(
        r.status,
        200,
        "alice's resource after restart: {}",
        r.text()
    );
    assert_eq!(r.body, original);
}

// ---------------------------------------------------------------------------------------------
// Finding 2: bodies are not read before authentication
// ---------------------------------------------------------------------------------------------

const BIG_HEAD_NO_TOKEN: &str = "POST /v1/servers HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n";

/// Sends `head` alone; the answer and the end of the connection must both come within 2 s.
#[track_caller]
fn head_only_answered_and_closed(p: &Proxy, head: &str, what: &str) -> (Resp, Vec<u8>) {
    let mut s = connect(p);
    s.write_all(head.as_bytes()).unwrap();
    let (raw, closed) = read_until_eof(&mut s, Duration::from_secs(2));
    assert!(
        !raw.is_empty(),
        "{what}: no answer within 2 s without the body"
    );
    assert!(
        closed,
        "{what}: the connection stayed open after the answer: {:?}",
        String::from_utf8_lossy(&raw)
    );
    (parse(&raw), raw)
}

#[test]
fn finding2_bodies_are_not_read_before_authentication() {
    let p = start(&[]);
    let fed = p.federation_token("member");

    // No token: 401 from the head alone, then the connection closes.
    let (r, _) = head_only_answered_and_closed(&p, BIG_HEAD_NO_TOKEN, "no token");
    assert_error(&r, 401, "missing_token", "no token");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{:?}",
        r.headers
    );

    // A federation token on an admin endpoint: 403 from the head.
    let head = format!(
        "POST /v1/servers HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {fed}\r\n\
         Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
    );
    let (r, _) = head_only_answered_and_closed(&p, &head, "wrong type");
    assert_error(
        &r,
        403,
        "wrong_type",
        "federation token on POST /v1/servers",
    );

    // `Expect: 100-continue` with a bad token: the 401, never a `100 Continue`.
    let head = "POST /v1/servers HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer not-a-token\r\n\
                Expect: 100-continue\r\nContent-Type: application/json\r\n\
                Content-Length: 1048576\r\n\r\n";
    let (r, raw) = head_only_answered_and_closed(&p, head, "bad token, 100-continue");
    assert_error(&r, 401, "malformed_token", "bad token with 100-continue");
    assert!(
        !String::from_utf8_lossy(&raw).contains("100 Continue"),
        "a refused request was invited to send its body: {:?}",
        String::from_utf8_lossy(&raw)
    );

    // A valid admin token: `100 Continue` first, then the request completes.
    let body = json!({"serverId": "continued"}).to_string();
    let mut s = connect(&p);
    write!(
        s,
        "POST /v1/servers HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\nExpect: 100-continue\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        p.admin_token(),
        body.len()
    )
    .unwrap();
    let interim = read_until(&mut s, b"\r\n\r\n", Duration::from_secs(2));
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "no 100 Continue for an authorised request: {:?}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(body.as_bytes()).unwrap();
    let (raw, closed) = read_until_eof(&mut s, WAIT);
    assert!(closed, "Connection: close was not honoured");
    let head_end = interim.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut rest = interim[head_end..].to_vec();
    rest.extend_from_slice(&raw);
    let r = parse(&rest);
    assert_eq!(
        r.status,
        201,
        "registration after 100 Continue: {}",
        r.text()
    );

    // A route that takes no token never reads a body either.
    let (r, _) = head_only_answered_and_closed(
        &p,
        "POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n",
        "POST /healthz",
    );
    assert_eq!(r.status, 405, "POST /healthz: {}", r.text());

    // Memory: 200 unauthenticated sockets, each pushing 256 KiB of an announced 1 MiB body,
    // cost the proxy next to nothing (the old code buffered each body: 50 MiB).
    for _ in 0..3 {
        assert_eq!(p.http("GET", "/healthz", None, None).status, 200);
    }
    let rss0 = vm_rss_kib(p.pid());
    const EACH: usize = 256 * 1024;
    let chunk = vec![b'x'; 64 * 1024];
    let mut socks: Vec<(TcpStream, usize)> = Vec::new();
    for _ in 0..200 {
        let mut s = connect(&p);
        s.write_all(BIG_HEAD_NO_TOKEN.as_bytes()).unwrap();
        s.set_nonblocking(true).unwrap();
        socks.push((s, 0));
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(1) {
        let mut progress = false;
        for (s, sent) in socks.iter_mut() {
            while *sent < EACH {
                let n = (EACH - *sent).min(chunk.len());
                match s.write(&chunk[..n]) {
                    Ok(0) => *sent = EACH,
                    Ok(k) => {
                        *sent += k;
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => *sent = EACH, // closed by the proxy: nothing more to push
                }
            }
        }
        if !progress {
            sleep_ms(10);
        }
    }
    sleep_ms(200);
    let rss1 = vm_rss_kib(p.pid());
    let growth = rss1.saturating_sub(rss0);
    assert!(
        growth < 16 * 1024,
        "VmRSS grew {growth} KiB ({rss0} -> {rss1}) for 200 unauthenticated bodies"
    );
    drop(socks);
    assert_eq!(p.http("GET", "/healthz", None, None).status, 200);
}

// ---------------------------------------------------------------------------------------------
// Finding 3: bytes held for a recipient are bounded
// ---------------------------------------------------------------------------------------------

#[test]
fn finding3_bytes_held_for_a_recipient_are_bounded() {
    let p = start(&[("FEDMCP_QUEUE_MAX_BYTES", "1048576")]);
    let (mut ws, _) = p.online(&p.federation_token("self"), json!({}));
    let big = "x".repeat(100_000);
    let send = |id: &str, to: &str| {
        rpc(
            json!(id),
            "federation/send",
            json!({"to": to, "message": big, "queue": true}),
        )
    };

    // Sends to itself, never answered: each holds a copy until its delivery is answered.
    let mut deliveries = Vec::new();
    let mut refused_at = None;
    for i in 0..30 {
        let id = format!("s{i}");
        ws.send(&send(&id, "self"));
        let m = ws.recv();
        if m["method"] == "federation/deliver" {
            assert!(m.get("id").is_some(), "a delivery awaiting an answer: {m}");
            deliveries.push(m);
            continue;
        }
        assert_eq!(m["id"], json!(id), "unexpected {m}");
        assert_eq!(m["error"]["code"], -32004, "send {i}: {m}");
        assert_eq!(m["error"]["data"]["reason"], "recipient_overloaded", "{m}");
        refused_at = Some(i);
        break;
    }
    let held = refused_at.expect("30 sends of 100 KB were all held for one recipient");
    assert!(
        (8..=11).contains(&held),
        "{held} copies of 100 KB held under a 1 MiB bound"
    );

    // Answering the deliveries releases what was held.
    for (k, d) in deliveries.iter().enumerate() {
        ws.answer(d, json!({"ok": k}));
    }
    let mut answered = BTreeSet::new();
    while answered.len() < deliveries.len() {
        let m = ws.recv();
        assert!(m.get("method").is_none(), "unexpected {m}");
        assert_eq!(m["result"]["status"], "delivered", "{m}");
        assert!(answered.insert(m["id"].to_string()), "answered twice: {m}");
    }
    ws.send(&send("again", "self"));
    let d = ws.recv_method("federation/deliver");
    ws.answer(&d, json!({"ok": "again"}));
    let m = ws.recv_id(&json!("again"));
    assert_eq!(m["result"]["status"], "delivered", "after the answers: {m}");

    // An offline recipient's queue is bounded by the same bytes.
    p.register("off");
    let mut queued = 0;
    let mut full = false;
    for i in 0..30 {
        let id = format!("q{i}");
        ws.send(&send(&id, "off"));
        let m = ws.recv_id(&json!(id));
        if m["result"]["status"] == "queued" {
            queued += 1;
            continue;
        }
        assert_eq!(m["error"]["code"], -32005, "queued send {i}: {m}");
        assert_eq!(m["error"]["data"]["reason"], "queue_full", "{m}");
        full = true;
        break;
    }
    assert!(full, "30 messages of 100 KB queued under a 1 MiB bound");
    assert!(
        (8..=11).contains(&queued),
        "{queued} messages of 100 KB queued under a 1 MiB bound"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 4: HTTP sends have the control channel's limits
// ---------------------------------------------------------------------------------------------

/// Writes `POST /v1/messages` with `body` (`Connection: close`); the answer is read later.
fn post_message(p: &Proxy, token: &str, body: &str) -> TcpStream {
    let mut s = connect(p);
    write!(
        s,
        "POST /v1/messages HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

#[track_caller]
fn answer_of(mut s: TcpStream) -> Resp {
    let (raw, _) = read_until_eof(&mut s, WAIT);
    parse(&raw)
}

#[test]
fn finding4_http_sends_have_the_control_channel_limits() {
    let p = start(&[("FEDMCP_RATE_LIMIT", "1/s,burst=2")]);

    // JSON nesting over 128 is a parse error, as on the control channel.
    let deep = p.federation_token("deep");
    let nested = |n: usize| {
        format!(
            r#"{{"to":"x","message":{}{}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    let r = answer_of(post_message(&p, &deep, &nested(200)));
    assert_error(&r, 400, "parse_error", "200-deep message");
    let r = answer_of(post_message(&p, &deep, &nested(100)));
    assert_error(&r, 404, "unknown_server", "100-deep message to nobody");

    // The rate limit: burst 2, then 429 with Retry-After.
    let (mut rcpt, _) = p.online(&p.federation_token("rcpt"), json!({}));
    let sender = p.federation_token("sender");
    for i in 0..2 {
        let s = post_message(
            &p,
            &sender,
            &json!({"to": "rcpt", "message": {"n": i}}).to_string(),
        );
        let d = rcpt.recv_method("federation/deliver");
        assert_eq!(d["params"]["message"]["n"], i, "{d}");
        rcpt.answer(&d, json!({"got": i}));
        let r = answer_of(s);
        assert_eq!(r.status, 200, "send {i}: {}", r.text());
        assert_eq!(r.json()["status"], "delivered", "{}", r.text());
    }
    let r = answer_of(post_message(
        &p,
        &sender,
        &json!({"to": "rcpt", "message": {"n": 2}}).to_string(),
    ));
    assert_error(&r, 429, "rate_limited", "third quick send");
    let retry: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {:?}", r.headers))
        .parse()
        .expect("Retry-After is integer seconds");
    assert!(retry >= 1, "Retry-After {retry}");

    // One bucket per server: spent over the control channel, the HTTP send is refused.
    let (mut m, _) = p.online(&p.federation_token("member"), json!({}));
    let mut limited = false;
    for i in 0..5 {
        let id = json!(format!("servers{i}"));
        m.send(&rpc(id.clone(), "federation/servers", json!({})));
        let a = m.recv_id(&id);
        if a["error"]["code"] == -32029 {
            limited = true;
            break;
        }
        assert!(a["result"]["servers"].is_array(), "{a}");
    }
    assert!(limited, "5 quick requests at burst 2 were all accepted");
    let r = answer_of(post_message(
        &p,
        &p.federation_token("member"),
        &json!({"to": "nobody", "message": 1}).to_string(),
    ));
    assert_error(
        &r,
        429,
        "rate_limited",
        "HTTP send after the session spent the burst",
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 5: a removed server's key does not come back
// ---------------------------------------------------------------------------------------------

#[test]
fn finding5_a_removed_servers_key_does_not_come_back() {
    let state = Dir::new("keys");
    let mut p = start_on(&state, &[]);
    let admin = p.admin_token();
    let register = |p: &Proxy, id: &str| -> Value {
        let r = p.http(
            "POST",
            "/v1/servers",
            Some(&p.admin_token()),
            Some(&json!({"serverId": id}).to_string()),
        );
        assert!(r.status == 201 || r.status == 200, "{}", r.text());
        r.json()
    };

    let r1 = register(&p, "alice");
    assert_eq!(r1["signingKeyEpoch"], 1, "{r1}");
    let k1 = r1["signingKey"].as_str().expect("signingKey").to_string();
    assert_eq!(
        k1,
        signing_key_b64(SECRET, "alice", 1),
        "K1 is the §6 formula"
    );

    let r = p.http("DELETE", "/v1/servers/alice", Some(&admin), None);
    assert_eq!(r.status, 204, "{}", r.text());
    let r2 = register(&p, "alice");
    assert_eq!(r2["signingKeyEpoch"], 2, "{r2}");
    let k2 = r2["signingKey"].as_str().unwrap().to_string();
    assert_ne!(k2, k1, "a removed server's key came back");
    assert_eq!(k2, signing_key_b64(SECRET, "alice", 2));

    let bob_token = register(&p, "bob")["token"].as_str().unwrap().to_string();
    let (mut bob, _) = p.online(&bob_token, json!({}));
    let (mut alice, _) = p.online(r2["token"].as_str().unwrap(), json!({}));

    let refused = |alice: &mut Ws, id: &str, key: &str| {
        alice.send_text(&signed_send(id, "bob", r#""signed""#, &key_bytes(key)));
        let a = alice.recv_id(&json!(id));
        assert_eq!(a["error"]["code"], -32006, "{id}: {a}");
        assert_eq!(a["error"]["data"]["reason"], "bad_signature", "{id}: {a}");
    };
    let accepted = |alice: &mut Ws, bob: &mut Ws, id: &str, key: &str| {
        alice.send_text(&signed_send(id, "bob", r#""signed""#, &key_bytes(key)));
        let d = bob.recv_method("federation/deliver");
        assert_eq!(d["params"]["from"], "alice", "{d}");
        bob.answer(&d, json!({"ok": id}));
        let a = alice.recv_id(&json!(id));
        assert_eq!(a["result"]["status"], "delivered", "{id}: {a}");
    };
    refused(&mut alice, "with-k1", &k1);
    accepted(&mut alice, &mut bob, "with-k2", &k2);

    // Rotation: admin only, known ids only; the old key stops verifying at once.
    let r = p.http(
        "POST",
        "/v1/servers/alice/signing-key",
        Some(&bob_token),
        None,
    );
    assert_eq!(
        r.status,
        403,
        "rotation with a federation token: {}",
        r.text()
    );
    let r = p.http("POST", "/v1/servers/nobody/signing-key", Some(&admin), None);
    assert_error(&r, 404, "unknown_server", "rotation of an unknown id");
    let r = p.http("POST", "/v1/servers/alice/signing-key", Some(&admin), None);
    assert_eq!(r.status, 200, "rotation: {}", r.text());
    let j = r.json();
    assert_eq!(j["signingKeyEpoch"], 3, "{j}");
    let k3 = j["signingKey"].as_str().unwrap().to_string();
    assert_eq!(k3, signing_key_b64(SECRET, "alice", 3));
    refused(&mut alice, "with-k2-after", &k2);
    accepted(&mut alice, &mut bob, "with-k3", &k3);

    // Deliveries to alice are signed with her current key.
    let message = r#""to alice""#;
    bob.send_text(&format!(
        r#"{{"jsonrpc":"2.0","id":"b1","method":"federation/send","params":{{"to":"alice","message":{message}}}}}"#
    ));
    let d = alice.recv_method("federation/deliver");
    let params = &d["params"];
    assert_eq!(params["from"], "bob", "{d}");
    assert_eq!(serde_json::to_string(&params["message"]).unwrap(), message);
    let msg_id = params["msgId"].as_str().expect("msgId");
    let sig = params["sig"].as_str().expect("sig");
    let data: [&[u8]; 5] = [msg_id.as_bytes(), b"\n", b"bob", b"\n", message.as_bytes()];
    assert_eq!(
        sig,
        jwt::hmac_b64(&key_bytes(&k3), &data),
        "delivery sig under K3"
    );
    assert_ne!(sig, jwt::hmac_b64(&key_bytes(&k2), &data));
    alice.answer(&d, json!({"ok": true}));
    let a = bob.recv_id(&json!("b1"));
    assert_eq!(a["result"]["status"], "delivered", "{a}");

    // The epoch survives kill -9.
    drop(alice);
    drop(bob);
    crash(&mut p);
    let p = start_on(&state, &[]);
    let r = p.http(
        "POST",
        "/v1/servers/alice/signing-key",
        Some(&p.admin_token()),
        None,
    );
    assert_eq!(r.status, 200, "rotation after restart: {}", r.text());
    let j = r.json();
    assert_eq!(j["signingKeyEpoch"], 4, "the epoch after kill -9: {j}");
    assert_eq!(j["signingKey"], signing_key_b64(SECRET, "alice", 4));
    let again = register(&p, "alice");
    assert_eq!(
        again["signingKeyEpoch"], 4,
        "re-registration keeps the epoch: {again}"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 6: tokens never go in clear text off the machine
// ---------------------------------------------------------------------------------------------

#[test]
fn finding6_tokens_never_go_in_clear_text_off_the_machine() {
    let register = |p: &Proxy, id: &str, url: &str| -> Resp {
        p.http(
            "POST",
            "/v1/servers",
            Some(&p.admin_token()),
            Some(&json!({"serverId": id, "endpoints": {"control": url}}).to_string()),
        )
    };
    let p = start(&[]);
    for (i, url) in [
        "ws://example.com/x",
        "ws://10.0.0.1:9/x",
        "ws://127.0.0.1.example.com:9/x",
        "ws://localhost.example.com:9/x",
        "ws://[::2]:9/x",
    ]
    .iter()
    .enumerate()
    {
        let r = register(&p, &format!("far{i}"), url);
        assert_error(&r, 400, "insecure_endpoint", url);
    }
    for (i, url) in [
        "ws://127.0.0.1:9/x",
        "ws://127.8.9.10:9/",
        "ws://localhost:9/",
        "ws://[::1]:9/",
        "wss://example.com/x",
    ]
    .iter()
    .enumerate()
    {
        let r = register(&p, &format!("near{i}"), url);
        assert_eq!(r.status, 201, "{url}: {}", r.text());
    }
    drop(p);
    let p = start(&[("FEDMCP_ALLOW_PLAINTEXT", "1")]);
    let r = register(&p, "far", "ws://example.com/x");
    assert_eq!(
        r.status,
        201,
        "FEDMCP_ALLOW_PLAINTEXT=1 allows it: {}",
        r.text()
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 7: the state dir and its files are private
// ---------------------------------------------------------------------------------------------

#[test]
fn finding7_state_dir_and_files_are_private() {
    let state = Dir::new("modes");
    let root = state.0.clone();
    {
        let mut p = start_on_generated_secret(&state);
        p.register("seed");
        crash(&mut p);
    }
    assert!(
        root.join("state.log").is_file(),
        "a first run made state.log"
    );
    set_mode(&root, 0o755);
    set_mode(&root.join("state.log"), 0o644);
    set_mode(&root.join("jwt-secret"), 0o644);
    set_mode(&root.join("resources"), 0o755);
    assert_eq!(mode(&root), 0o755);

    let p = start_on_generated_secret(&state);
    assert_eq!(mode(&root), 0o700, "the state dir");
    assert_eq!(mode(&root.join("state.log")), 0o600, "state.log");
    assert_eq!(mode(&root.join("jwt-secret")), 0o600, "jwt-secret");

    let alice = p.federation_token("alice");
    let r = put(&p, &alice, "report.txt", b"private bytes");
    assert_eq!(r.status, 201, "{}", r.text());
    let res = root.join("resources");
    assert_eq!(mode(&res), 0o700, "resources/");
    assert_eq!(mode(&res.join("alice")), 0o700, "resources/alice/");
    assert_eq!(mode(&res.join("alice").join("report.txt")), 0o600);
    assert_eq!(mode(&res.join("alice").join(".report.txt.meta")), 0o600);
    // And everything else in the state dir.
    for path in walk(&root) {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&path), want, "{}", path.display());
    }
}

// ---------------------------------------------------------------------------------------------
// v1.1: connection slots go to members with tokens
// ---------------------------------------------------------------------------------------------

/// Whether the peer ended `s` (EOF or reset) within `limit`.
fn ends_within(s: &mut TcpStream, limit: Duration) -> bool {
    read_until_eof(s, limit).1
}

#[test]
fn connection_slots_go_to_members_with_tokens() {
    let p = start(&[
        ("FEDMCP_MAX_CONNECTIONS", "8"),
        ("FEDMCP_HANDSHAKE_TIMEOUT_MS", "60000"),
    ]);
    let mut idle: Vec<TcpStream> = (0..8).map(|_| connect(&p)).collect();
    sleep_ms(300); // all eight accepted and held
    let mut ws = p.ws_raw(&p.federation_token("member")).unwrap_or_else(|e| {
        panic!("a member with a valid token was refused while idle sockets held every slot: {e}")
    });
    let welcome = ws.recv();
    assert_eq!(welcome["method"], "federation/welcome", "{welcome}");
    ws.answer(&welcome, json!({}));
    let t0 = Instant::now();
    let mut ended = 0;
    while ended == 0 && t0.elapsed() < Duration::from_secs(3) {
        for s in idle.iter_mut() {
            if ends_within(s, Duration::from_millis(20)) {
                ended += 1;
            }
        }
    }
    assert!(ended >= 1, "no idle unauthenticated socket was displaced");
    let displaced = metric_sum(&p, "fedmcp_connections_displaced_total");
    assert!(
        displaced.is_some_and(|n| n >= 1.0),
        "fedmcp_connections_displaced_total {displaced:?}"
    );
    ws.send(&rpc(json!("after"), "federation/servers", json!({})));
    assert!(ws.recv_id(&json!("after"))["result"]["servers"].is_array());
    drop(idle);
    drop(ws);
    drop(p);

    // Every slot authenticated: a new connection is refused 503.
    let p = start(&[("FEDMCP_MAX_CONNECTIONS", "4")]);
    let mut sessions: Vec<Ws> = (0..4)
        .map(|i| p.online(&p.federation_token(&format!("m{i}")), json!({})).0)
        .collect();
    let mut s = connect(&p);
    let (raw, closed) = read_until_eof(&mut s, WAIT);
    assert!(closed, "the refused connection was closed");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
    assert_error(
        &parse(&raw),
        503,
        "too_many_connections",
        "a fifth connection",
    );
    let m0 = &mut sessions[0];
    m0.send(&rpc(json!("still"), "federation/servers", json!({})));
    assert!(m0.recv_id(&json!("still"))["result"]["servers"].is_array());
}

// ---------------------------------------------------------------------------------------------
// v1.1: revocation by jti
// ---------------------------------------------------------------------------------------------

#[test]
fn revoked_tokens_are_refused_and_their_sessions_closed() {
    let state = Dir::new("revoke");
    let mut p = start_on(&state, &[("FEDMCP_MAX_REVOCATIONS", "2")]);
    let admin = p.admin_token();

    let token = p.register("alice");
    let jti = claims_of(&token)["jti"]
        .as_str()
        .unwrap_or_else(|| panic!("a registration token without jti: {}", claims_of(&token)))
        .to_string();
    assert!(jwt::valid_jti(&jti), "{jti:?}");
    let (mut ws, _) = p.online(&token, json!({}));
    let r = p.http("DELETE", &format!("/v1/tokens/{jti}"), Some(&admin), None);
    assert_eq!(r.status, 204, "revoke: {}", r.text());
    assert_eq!(
        ws.recv_close(),
        Some(4001),
        "the session on a revoked token"
    );
    let r = p.http("POST", "/v1/token", Some(&token), None);
    assert_error(&r, 401, "revoked", "POST /v1/token with a revoked token");
    let mut s = connect(&p);
    s.write_all(upgrade_request(&token).as_bytes()).unwrap();
    let r = read_one_response(&mut s, WAIT);
    assert_error(&r, 401, "revoked", "upgrade with a revoked token");
    // Another token of the same server is not affected.
    let r = p.http(
        "POST",
        "/v1/token",
        Some(&p.federation_token("alice")),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Admin tokens too.
    let adm = token_with_jti(&p, "ops", TokenType::Admin, "admin-jti-1");
    assert_eq!(p.http("GET", "/v1/servers", Some(&adm), None).status, 200);
    let r = p.http("DELETE", "/v1/tokens/admin-jti-1", Some(&admin), None);
    assert_eq!(r.status, 204, "{}", r.text());
    let r = p.http("GET", "/v1/servers", Some(&adm), None);
    assert_error(&r, 401, "revoked", "a revoked admin token");

    // Bounded: the third distinct revocation does not fit; a bad jti is refused.
    let r = p.http("DELETE", "/v1/tokens/third-jti", Some(&admin), None);
    assert_error(&r, 507, "revocations_full", "a third revocation");
    let long = "j".repeat(65);
    let r = p.http("DELETE", &format!("/v1/tokens/{long}"), Some(&admin), None);
    assert_eq!(r.status, 400, "a 65-character jti: {}", r.text());

    // `fedmcp token` mints with a jti.
    let (code, out) = run_bin(
        &["token", "--server-id", "x"],
        &[("FEDMCP_JWT_SECRET", SECRET), ("FEDMCP_STATE_DIR", "")],
    );
    assert_eq!(code, Some(0), "fedmcp token: {out}");
    let minted = out.trim();
    let c = jwt::verify(minted, &[SECRET.as_bytes()], now_secs(), 30).expect("a valid token");
    assert_eq!(c.server_id, "x");
    assert!(
        c.jti.as_deref().is_some_and(jwt::valid_jti),
        "fedmcp token without a jti: {}",
        claims_of(minted)
    );

    // Durable: kill -9 and restart.
    crash(&mut p);
    let p = start_on(&state, &[("FEDMCP_MAX_REVOCATIONS", "2")]);
    let r = p.http("POST", "/v1/token", Some(&token), None);
    assert_error(&r, 401, "revoked", "a revoked token after kill -9");
    let r = p.http("GET", "/v1/servers", Some(&adm), None);
    assert_error(&r, 401, "revoked", "a revoked admin token after kill -9");
    let r = p.http(
        "POST",
        "/v1/token",
        Some(&p.federation_token("alice")),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// v1.1: resource readers and per-owner quotas
// ---------------------------------------------------------------------------------------------

/// `(owner, name) -> readers` of a caller's listing.
fn listing(p: &Proxy, token: &str) -> BTreeMap<(String, String), Value> {
    let r = p.http("GET", "/v1/resources", Some(token), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["resources"]
        .as_array()
        .expect("resources array")
        .iter()
        .map(|e| {
            (
                (
                    e["owner"].as_str().unwrap().to_string(),
                    e["name"].as_str().unwrap().to_string(),
                ),
                e["readers"].clone(),
            )
        })
        .collect()
}

#[test]
fn resource_readers_and_per_owner_quota() {
    let state = Dir::new("readers");
    let p = start_on(&state, &[("FEDMCP_RESOURCE_QUOTA_PER_SERVER_BYTES", "100")]);
    let admin = p.admin_token();
    let alice = p.register("alice");
    let bob = p.federation_token("bob");
    let carol = p.federation_token("carol");
    let key = |o: &str, n: &str| (o.to_string(), n.to_string());

    // Readers: only bob (besides alice and admins).
    let r = put(&p, &alice, "r1?readers=bob", b"r1!");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["readers"], json!(["bob"]), "{}", r.text());
    assert_eq!(r.json()["name"], "r1", "{}", r.text());
    let g = p.http("GET", "/v1/resources/alice/r1", Some(&bob), None);
    assert_eq!(g.status, 200, "bob reads r1: {}", g.text());
    assert_eq!(g.body, b"r1!");
    let g = p.http("GET", "/v1/resources/alice/r1", Some(&carol), None);
    assert_error(&g, 404, "not_found", "carol GET r1");
    let h = p.http("HEAD", "/v1/resources/alice/r1", Some(&carol), None);
    assert_eq!(h.status, 404, "carol HEAD r1");
    assert!(!listing(&p, &carol).contains_key(&key("alice", "r1")));
    assert_eq!(
        listing(&p, &bob).get(&key("alice", "r1")),
        Some(&json!(["bob"]))
    );
    assert_eq!(
        listing(&p, &admin).get(&key("alice", "r1")),
        Some(&json!(["bob"]))
    );
    assert!(listing(&p, &alice).contains_key(&key("alice", "r1")));

    // Empty: the owner only.
    let r = put(&p, &alice, "r2?readers=", b"r2!");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["readers"], json!([]), "{}", r.text());
    let g = p.http("GET", "/v1/resources/alice/r2", Some(&bob), None);
    assert_eq!(
        g.status,
        404,
        "bob reads an owner-only resource: {}",
        g.text()
    );
    assert_eq!(
        p.http("GET", "/v1/resources/alice/r2", Some(&alice), None)
            .status,
        200
    );
    assert_eq!(
        p.http("GET", "/v1/resources/alice/r2", Some(&admin), None)
            .status,
        200
    );
    assert!(!listing(&p, &bob).contains_key(&key("alice", "r2")));

    // Absent: everyone.
    let r = put(&p, &alice, "r3", b"r3!");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["readers"], Value::Null, "{}", r.text());
    let g = p.http("GET", "/v1/resources/alice/r3", Some(&carol), None);
    assert_eq!(g.status, 200, "{}", g.text());
    assert_eq!(g.body, b"r3!");
    assert_eq!(
        listing(&p, &carol).get(&key("alice", "r3")),
        Some(&Value::Null)
    );

    let r = put(&p, &alice, "r4?readers=bad..id,__x", b"r4!");
    assert_error(&r, 400, "invalid_readers", "readers with __x");
    let r = put(&p, &alice, "r4?readers=..", b"r4!");
    assert_error(&r, 400, "invalid_readers", "readers ..");

    // Per-owner quota (alice already holds 9 bytes).
    let r = put(&p, &alice, "q1", &[b'a'; 80]);
    assert_eq!(r.status, 201, "alice 80 bytes: {}", r.text());
    let r = put(&p, &alice, "q2", &[b'a'; 30]);
    assert_error(&r, 507, "quota_exceeded", "alice over her quota");
    let r = put(&p, &bob, "q1", &[b'b'; 80]);
    assert_eq!(r.status, 201, "bob's own quota: {}", r.text());

    // Removing alice removes her resources, files and directory.
    let alice_dir = state.0.join("resources").join("alice");
    assert!(alice_dir.is_dir());
    let r = p.http("DELETE", "/v1/servers/alice", Some(&admin), None);
    assert_eq!(r.status, 204, "{}", r.text());
    for name in ["r1", "r2", "r3", "q1"] {
        let g = p.http(
            "GET",
            &format!("/v1/resources/alice/{name}"),
            Some(&admin),
            None,
        );
        assert_eq!(g.status, 404, "alice/{name} after removal: {}", g.text());
    }
    let all = listing(&p, &admin);
    assert!(
        all.keys().all(|(o, _)| o != "alice"),
        "alice's resources are still listed: {all:?}"
    );
    assert!(all.contains_key(&key("bob", "q1")), "{all:?}");
    assert!(
        !alice_dir.exists(),
        "{} is still there",
        alice_dir.display()
    );
}

// ---------------------------------------------------------------------------------------------
// v1.1: auth_failed audit lines are limited
// ---------------------------------------------------------------------------------------------

#[test]
fn auth_failed_audit_lines_are_limited() {
    let dir = Dir::new("audit");
    let log = dir.0.join("audit.log");
    let p = start(&[("FEDMCP_AUDIT_LOG", log.to_str().unwrap())]);

    // 60 refused requests, pipelined on one connection: well within one or two seconds.
    let mut req = String::new();
    for i in 0..60 {
        let close = if i == 59 { "Connection: close\r\n" } else { "" };
        req.push_str(&format!(
            "GET /v1/servers HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer bad-token-{i}\r\n{close}\r\n"
        ));
    }
    let mut s = connect(&p);
    s.write_all(req.as_bytes()).unwrap();
    let (raw, closed) = read_until_eof(&mut s, WAIT);
    assert!(closed, "the pipelined requests were not all answered");
    let answers = String::from_utf8_lossy(&raw)
        .matches("HTTP/1.1 401")
        .count();
    assert_eq!(answers, 60, "401s");

    sleep_ms(1200);
    let r = p.http("GET", "/v1/servers", Some("bad-token-61"), None);
    assert_eq!(r.status, 401);
    sleep_ms(300);

    let text = std::fs::read_to_string(&log).expect("the audit log");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let auth: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "auth_failed")
        .collect();
    let suppressed: u64 = auth.iter().filter_map(|l| l["suppressed"].as_u64()).sum();
    assert!(
        auth.len() <= 21,
        "{} auth_failed lines for 61 refusals in about a second",
        auth.len()
    );
    assert!(
        auth.iter().any(|l| l["suppressed"].as_u64() >= Some(1)),
        "no line says how many were left out"
    );
    assert_eq!(
        auth.len() as u64 + suppressed,
        61,
        "lines plus suppressed count every refusal: {text}"
    );
    let counted = metric_sum(&p, "fedmcp_auth_failures_total");
    assert!(
        counted.is_some_and(|n| n >= 61.0),
        "fedmcp_auth_failures_total {counted:?}"
    );
}
