//! The command line for people (`fedmcp servers|send|listen|put|get|ls|rm`, and the `serve`
//! and `token` arguments), run as a shell would run it against the real binary on loopback
//! port 0: every command's happy path, `--help` (stdout, exit 0), bad arguments (one stderr
//! line, exit 2), and the exit codes 1 (the proxy answered a failure), 3 (unreachable) and
//! 4 (token refused). `listen` and `send` make the README's tour without Python.
//!
//! Every wait is bounded by `WAIT`; every child process is killed when its guard drops.

mod common;

use common::{Claims, Proxy, TokenType, WAIT, bin, jwt, now_secs, scratch_dir};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a finished command did.
struct Out {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
    what: String,
}

impl Out {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Each stdout line as JSON.
    fn json_lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{}: stdout line not JSON ({e}): {l:?}", self.what))
            })
            .collect()
    }

    /// The one stdout line, as JSON.
    fn json(&self) -> Value {
        let lines = self.json_lines();
        assert_eq!(
            lines.len(),
            1,
            "{}: stdout {:?} stderr {:?}",
            self.what,
            self.text(),
            self.stderr
        );
        lines.into_iter().next().unwrap_or(Value::Null)
    }

    /// Exit `code` and the shape of a failure: nothing on stdout (unless `stdout_ok`), one
    /// line on stderr.
    fn fails(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "{}: stdout {:?} stderr {:?}",
            self.what,
            self.text(),
            self.stderr
        );
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "{}: stderr must be one line: {:?}",
            self.what,
            self.stderr
        );
        assert!(
            self.stderr.ends_with('\n'),
            "{}: {:?}",
            self.what,
            self.stderr
        );
        self
    }

    fn ok(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "{}: stdout {:?} stderr {:?}",
            self.what,
            self.text(),
            self.stderr
        );
        self
    }
}

/// A command line's environment: only PATH, plus `env`.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Reads all of `r` on a thread.
fn drain(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `fedmcp args...` to its end (at most `WAIT`), with `stdin` (or an empty one).
fn run_with(args: &[&str], env: &[(&str, &str)], stdin: Option<Vec<u8>>) -> Out {
    let what = format!("fedmcp {}", args.join(" "));
    let mut child = command(args, env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let input = stdin.unwrap_or_default();
    let mut w = child.stdin.take().expect("stdin");
    std::thread::spawn(move || {
        let _ = w.write_all(&input);
    });
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let start = Instant::now();
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: did not end within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        code,
        stdout: out.recv_timeout(WAIT).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&err.recv_timeout(WAIT).unwrap_or_default()).into_owned(),
        what,
    }
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Out {
    run_with(args, env, None)
}

/// A command left running (`listen`): its stdout lines as they come; killed on drop.
struct Bg {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Says that stderr has ended (all of it is in `stderr`).
    err_done: mpsc::Receiver<()>,
    what: String,
}

impl Bg {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Bg {
        let what = format!("fedmcp {}", args.join(" "));
        let mut child = command(args, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let e = stderr.clone();
        let err = child.stderr.take().expect("stderr");
        let (done_tx, err_done) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                if let Ok(mut s) = e.lock() {
                    s.push_str(&l);
                    s.push('\n');
                }
            }
            let _ = done_tx.send(());
        });
        Bg {
            child,
            lines,
            stderr,
            err_done,
            what,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The next stdout line, as JSON.
    fn line(&self) -> Value {
        let l = self.lines.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!(
                "{}: no line on stdout within {WAIT:?}; stderr {:?}",
                self.what,
                self.stderr()
            )
        });
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l:?}", self.what))
    }

    /// The exit code (waiting at most `WAIT`).
    fn exit(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Everything it wrote to stderr, before it is looked at.
                let _ = self.err_done.recv_timeout(WAIT);
                return st.code();
            }
            assert!(
                start.elapsed() < WAIT,
                "{}: did not end within {WAIT:?}; stderr {:?}",
                self.what,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory, removed when the test ends (also when it fails).
struct Scratch(PathBuf);

impl Scratch {
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The proxy's URL for `FEDMCP_URL`.
fn url(p: &Proxy) -> String {
    format!("http://{}", p.addr)
}

/// Waits until `id` is online on `p` (its welcome answer processed).
fn wait_online(p: &Proxy, id: &str) {
    let admin = p.admin_token();
    let start = Instant::now();
    loop {
        let r = p.http("GET", &format!("/v1/servers/{id}"), Some(&admin), None);
        if r.status == 200 && r.json()["state"] == "online" {
            return;
        }
        assert!(start.elapsed() < WAIT, "{id} not online within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A local port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    port
}

/// A federation token for `id` with a `jti` (so it can be revoked).
fn token_with_jti(p: &Proxy, id: &str, jti: &str) -> String {
    let now = now_secs();
    jwt::sign(
        p.secret.as_bytes(),
        &Claims {
            server_id: id.into(),
            token_type: TokenType::Federation,
            iat: now,
            exp: now + 3600,
            nbf: None,
            jti: Some(jti.into()),
        },
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn help_is_usage_on_stdout_and_exit_0() {
    let every = [
        vec!["--help"],
        vec!["-h"],
        vec!["help"],
        vec!["help", "listen"],
        vec!["servers", "--help"],
        vec!["servers", "add", "--help"],
        vec!["servers", "list", "-h"],
        vec!["send", "--help"],
        vec!["listen", "--help"],
        vec!["put", "--help"],
        vec!["get", "--help"],
        vec!["ls", "--help"],
        vec!["rm", "--help"],
        vec!["serve", "--help"],
        vec!["token", "--help"],
        vec!["mcp-stdio", "--help"],
    ];
    for args in every {
        // An unreachable proxy: `--help` must not try to talk to one.
        let o = run(
            &args,
            &[("FEDMCP_URL", &format!("http://127.0.0.1:{}", closed_port()))],
        );
        o.ok();
        assert!(
            o.text().starts_with("usage: fedmcp"),
            "{}: {:?}",
            o.what,
            o.text()
        );
        assert_eq!(o.stderr, "", "{}", o.what);
    }
    // The top-level usage lists every command.
    let top = run(&["--help"], &[]).text();
    for cmd in [
        "fedmcp [serve]",
        "fedmcp token",
        "fedmcp mcp-stdio",
        "fedmcp servers add",
        "fedmcp servers list",
        "show ID",
        "remove ID",
        "fedmcp send",
        "fedmcp listen",
        "fedmcp put",
        "fedmcp get",
        "fedmcp ls",
        "fedmcp rm",
        "--version",
    ] {
        assert!(top.contains(cmd), "fedmcp --help lacks {cmd:?}:\n{top}");
    }
    // Each client command documents the exit codes.
    for cmd in ["servers", "send", "listen", "put", "get", "ls", "rm"] {
        let u = run(&[cmd, "--help"], &[]).text();
        for code in [
            "0 success",
            "1 the proxy answered",
            "2 a bad flag",
            "3 the proxy",
            "4 the proxy refused",
        ] {
            assert!(u.contains(code), "fedmcp {cmd} --help lacks {code:?}:\n{u}");
        }
    }
    // `serve --help` says where the configuration is, and starts nothing.
    let serve = run(&["serve", "--help"], &[("FEDMCP_LISTEN", "127.0.0.1:0")]);
    serve.ok();
    assert!(serve.text().contains("docs/CONFIGURATION.md"));
    assert!(serve.text().contains("FEDMCP_LISTEN"));
    assert!(
        !serve.text().lines().any(|l| l.starts_with("listening on")),
        "{}",
        serve.text()
    );
    let v = run(&["--version"], &[]);
    v.ok();
    assert_eq!(v.text(), format!("fedmcp {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn bad_arguments_and_variables_are_one_line_and_exit_2() {
    let dir = Scratch(scratch_dir("cli-usage"));
    let file = dir.join("f.txt");
    std::fs::write(&file, b"x").expect("write");
    let file = file.to_str().expect("path");
    // A well-formed token and an unreachable proxy: a command that got as far as connecting
    // would end with 3, not 2.
    let tok = "eyJhbGciOiJIUzI1NiJ9.e30.c2ln";
    let unreachable = format!("http://127.0.0.1:{}", closed_port());
    let env = [("FEDMCP_URL", unreachable.as_str()), ("FEDMCP_TOKEN", tok)];
    let cases: Vec<Vec<&str>> = vec![
        vec!["nope"],
        vec!["help", "nope"],
        vec!["serve", "--bogus"],
        vec!["serve", "extra"],
        vec!["token", "--bogus"],
        vec!["token", "--server-id", "a", "--ttl", "5"],
        vec!["token", "--server-id", "a", "--ttl", "59"],
        vec!["token", "--server-id", "a", "--ttl", "31536001"],
        vec!["token", "--server-id", "a", "--ttl", "x"],
        vec!["mcp-stdio", "--bogus"],
        vec!["servers"],
        vec!["servers", "frob"],
        vec!["servers", "add"],
        vec!["servers", "add", "bad id"],
        vec!["servers", "add", "a__b"],
        vec!["servers", "add", "x", "--capabilities", "[1]"],
        vec!["servers", "add", "x", "--capabilities", "{"],
        vec!["servers", "add", "x", "--bogus"],
        vec!["servers", "show"],
        vec!["servers", "show", "a", "b"],
        vec!["servers", "list", "extra"],
        vec!["servers", "remove", "--print-token", "x"],
        vec!["send", "hello"],
        vec!["send", "--to", "bob"],
        vec!["send", "--to", "bob", "a", "b"],
        vec!["send", "--to", "b o b", "x"],
        vec!["send", "--to", "bob", "--ttl", "soon", "x"],
        vec!["send", "--to", "bob", "--timeout", "0", "x"],
        vec!["send", "--to"],
        vec!["send", "--bogus", "--to", "bob", "x"],
        vec!["send", "--queue=yes", "--to", "bob", "x"],
        vec!["listen", "extra"],
        vec!["listen", "--count", "0"],
        vec!["listen", "--count", "-1"],
        vec!["listen", "--reply", "{"],
        vec!["listen", "--reply", "1", "--exec", "cat"],
        vec!["listen", "--capabilities", "3"],
        vec!["listen", "--bogus"],
        vec!["put"],
        vec!["put", ".hidden", file],
        vec!["put", "n", "/nonexistent/file"],
        vec!["put", "n", "/"],
        vec!["put", "n", file, "extra"],
        vec!["put", "n", file, "--readers", "a b"],
        vec!["get"],
        vec!["get", "alice"],
        vec!["get", "alice/.x"],
        vec!["get", "bad id/x"],
        vec!["get", "alice/x", "-o"],
        vec!["ls", "extra"],
        vec!["ls", "--json=1"],
        vec!["rm"],
        vec!["rm", "alice/"],
    ];
    for args in &cases {
        let o = run(args, &env);
        o.fails(2);
        assert_eq!(o.text(), "", "{}: stdout", o.what);
    }
    // Variables: the URL, the token, the CA file.
    let bad_env: Vec<Vec<(&str, &str)>> = vec![
        vec![("FEDMCP_URL", "ftp://x"), ("FEDMCP_TOKEN", tok)],
        vec![("FEDMCP_URL", "127.0.0.1:8443"), ("FEDMCP_TOKEN", tok)],
        vec![("FEDMCP_URL", "http://h/x?y"), ("FEDMCP_TOKEN", tok)],
        vec![("FEDMCP_URL", unreachable.as_str())],
        vec![
            ("FEDMCP_URL", unreachable.as_str()),
            ("FEDMCP_TOKEN", "not-a-token"),
        ],
        vec![
            ("FEDMCP_URL", "https://127.0.0.1:1"),
            ("FEDMCP_TOKEN", tok),
            ("FEDMCP_TRUSTED_CA_FILE", "/nonexistent/ca.pem"),
        ],
    ];
    for env in &bad_env {
        for args in [
            vec!["ls"],
            vec!["servers", "list"],
            vec!["send", "--to", "bob", "x"],
            vec!["listen"],
        ] {
            let o = run(&args, env);
            o.fails(2);
            assert_eq!(o.text(), "");
        }
    }
    // `--url` names itself in the error.
    let o = run(&["ls", "--url", "ftp://x"], &env);
    o.fails(2);
    assert!(o.stderr.starts_with("--url:"), "{}", o.stderr);
}

#[test]
fn token_help_and_ttl_range() {
    let secret = [
        ("FEDMCP_JWT_SECRET", common::SECRET),
        ("FEDMCP_STATE_DIR", ""),
    ];
    let o = run(&["token", "--help"], &secret);
    o.ok();
    assert!(o.text().contains("--ttl SECS"), "{}", o.text());
    for ttl in ["60", "31536000"] {
        // 31536000 is over the default FEDMCP_TOKEN_TTL_SECS: allowed when that is raised.
        let o = run(
            &["token", "--server-id", "a", "--ttl", ttl],
            &[
                ("FEDMCP_JWT_SECRET", common::SECRET),
                ("FEDMCP_STATE_DIR", ""),
                ("FEDMCP_TOKEN_TTL_SECS", "31536000"),
            ],
        );
        o.ok();
        assert_eq!(o.text().trim().split('.').count(), 3);
    }
    run(&["token", "--server-id", "a", "--ttl", "5"], &secret).fails(2);
}

#[test]
fn servers_add_list_show_remove() {
    let p = Proxy::start(&[]);
    let u = url(&p);
    let admin = p.admin_token();
    let env = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", admin.as_str())];
    // add: the answer as one JSON line.
    let o = run(
        &[
            "servers",
            "add",
            "alice",
            "--capabilities",
            r#"{"tools":[]}"#,
        ],
        &env,
    );
    o.ok();
    let a = o.json();
    assert_eq!(a["serverId"], "alice", "{a}");
    assert!(a["token"].is_string() && a["signingKey"].is_string(), "{a}");
    // --print-token: the token alone, usable as one.
    let o = run(
        &[
            "servers",
            "add",
            "bob",
            "--data",
            "https://bob.example/data",
            "--print-token",
        ],
        &env,
    );
    o.ok();
    let bob = o.text();
    assert!(bob.ends_with('\n') && bob.lines().count() == 1, "{bob:?}");
    let bob = bob.trim();
    let r = p.http("POST", "/v1/token", Some(bob), None);
    assert_eq!(r.status, 200, "{}", r.text());
    run(&["ls"], &[("FEDMCP_URL", &u), ("FEDMCP_TOKEN", bob)]).ok();
    // list: one line per entry; --json: the whole answer.
    let o = run(&["servers", "list"], &env);
    o.ok();
    let mut ids: Vec<String> = o
        .json_lines()
        .iter()
        .map(|e| e["serverId"].as_str().unwrap_or("").to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["alice", "bob"]);
    let o = run(&["servers", "list", "--json"], &env);
    o.ok();
    assert_eq!(o.json()["servers"].as_array().map(Vec::len), Some(2));
    // show: the entry; an unknown id is 1 with the proxy's code.
    let o = run(&["servers", "show", "bob"], &env);
    o.ok();
    let e = o.json();
    assert_eq!(e["serverId"], "bob");
    assert_eq!(e["endpoints"]["data"], "https://bob.example/data");
    let o = run(&["servers", "show", "nobody"], &env);
    o.fails(1);
    assert!(o.stderr.contains("404 unknown_server"), "{}", o.stderr);
    assert_eq!(o.text(), "");
    // --url and --token override the variables; a /mcp path (as for mcp-stdio) works too.
    let o = run(
        &[
            "servers",
            "show",
            "alice",
            "--url",
            &format!("{u}/mcp"),
            "--token",
            &admin,
        ],
        &[
            ("FEDMCP_URL", "http://127.0.0.1:1"),
            ("FEDMCP_TOKEN", "x.y.z"),
        ],
    );
    o.ok();
    assert_eq!(o.json()["capabilities"], json!({"tools": []}));
    // remove: nothing printed; then it is gone.
    let o = run(&["servers", "remove", "bob"], &env);
    o.ok();
    assert_eq!(o.text(), "");
    run(&["servers", "show", "bob"], &env).fails(1);
    run(&["servers", "remove", "bob"], &env).fails(1);
    // A federation token on an admin endpoint: 403, exit 4.
    let o = run(
        &["servers", "list"],
        &[
            ("FEDMCP_URL", &u),
            ("FEDMCP_TOKEN", &p.federation_token("alice")),
        ],
    );
    o.fails(4);
    assert!(o.stderr.contains("403"), "{}", o.stderr);
    // An insecure control endpoint is refused by the proxy: 1.
    let o = run(
        &["servers", "add", "carol", "--control", "ws://example.com/c"],
        &env,
    );
    o.fails(1);
    assert!(o.stderr.contains("insecure_endpoint"), "{}", o.stderr);
}

#[test]
fn listen_count_2_receives_two_sends() {
    let p = Proxy::start(&[]);
    let u = url(&p);
    let alice = p.federation_token("alice");
    let bob = p.federation_token("bob");
    let as_alice = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", alice.as_str())];
    let mut listen = Bg::start(
        &[
            "listen",
            "--count",
            "2",
            "--capabilities",
            r#"{"tools":[]}"#,
        ],
        &[("FEDMCP_URL", &u), ("FEDMCP_TOKEN", &bob)],
    );
    wait_online(&p, "bob");
    // The capabilities were declared in the welcome answer.
    let r = p.http("GET", "/v1/servers/bob", Some(&p.admin_token()), None);
    assert_eq!(r.json()["capabilities"], json!({"tools": []}));
    // A JSON message, and a plain word (sent as a JSON string) from stdin.
    let o = run(&["send", "--to", "bob", r#"{"hello": "bob"}"#], &as_alice);
    o.ok();
    let first = o.json();
    assert_eq!(first["status"], "delivered", "{first}");
    assert_eq!(first["reply"], json!({"ok": true}));
    let o = run_with(
        &["send", "--to", "bob", "-"],
        &as_alice,
        Some(b"hello\n".to_vec()),
    );
    o.ok();
    let second = o.json();
    assert_eq!(second["status"], "delivered", "{second}");
    let d1 = listen.line();
    let d2 = listen.line();
    assert_eq!(listen.exit(), Some(0), "stderr {:?}", listen.stderr());
    assert_eq!(d1["msgId"], first["msgId"]);
    assert_eq!(d1["from"], "alice");
    assert_eq!(d1["message"], json!({"hello": "bob"}));
    assert!(d1["sentAt"].is_number(), "{d1}");
    assert_eq!(d2["msgId"], second["msgId"]);
    assert_eq!(d2["message"], "hello");
}

#[test]
fn send_outcomes_queue_broadcast_and_errors() {
    let p = Proxy::start(&[]);
    let u = url(&p);
    let alice = p.federation_token("alice");
    let as_alice = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", alice.as_str())];
    p.register("carol");
    // Offline without --queue: the proxy's error, 1.
    let o = run(&["send", "--to", "carol", "x"], &as_alice);
    o.fails(1);
    assert!(o.stderr.contains("server_offline"), "{}", o.stderr);
    // An unknown server: 1.
    let o = run(&["send", "--to", "nobody", "x"], &as_alice);
    o.fails(1);
    assert!(o.stderr.contains("unknown_server"), "{}", o.stderr);
    // Queued, then delivered when carol listens.
    let o = run(
        &[
            "send", "--to", "carol", "--queue", "--ttl", "60000", "[1,2,3]",
        ],
        &as_alice,
    );
    o.ok();
    let q = o.json();
    assert_eq!(q["status"], "queued", "{q}");
    let carol = p.federation_token("carol");
    let mut listen = Bg::start(
        &["listen", "--count", "1", "--reply", r#"{"thanks": 1}"#],
        &[("FEDMCP_URL", &u), ("FEDMCP_TOKEN", &carol)],
    );
    let d = listen.line();
    assert_eq!(d["msgId"], q["msgId"]);
    assert_eq!(d["message"], json!([1, 2, 3]));
    assert_eq!(listen.exit(), Some(0), "stderr {:?}", listen.stderr());
    // A broadcast reaches every other online member.
    let dave = p.federation_token("dave");
    let mut listen = Bg::start(
        &["listen", "--count", "1"],
        &[("FEDMCP_URL", &u), ("FEDMCP_TOKEN", &dave)],
    );
    wait_online(&p, "dave");
    let o = run(&["send", "--to", "*", "news"], &as_alice);
    o.ok();
    let b = o.json();
    assert_eq!(b["status"], "broadcast", "{b}");
    assert_eq!(b["recipients"], 1);
    assert_eq!(listen.line()["message"], "news");
    assert_eq!(listen.exit(), Some(0));
}

#[test]
fn listen_exec_answers_with_the_commands_output() {
    let p = Proxy::start(&[]);
    let u = url(&p);
    let alice = p.federation_token("alice");
    // One server per listener: a listener that has just ended may still be online for a
    // moment, and a send to it then would not reach the next one.
    let (bob, echo, shell) = (
        p.federation_token("bob"),
        p.federation_token("echo"),
        p.federation_token("shell"),
    );
    let as_alice = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", alice.as_str())];
    let as_bob = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", bob.as_str())];
    let as_echo = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", echo.as_str())];
    let as_shell = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", shell.as_str())];
    // `cat` echoes the message: the reply is the message.
    let mut listen = Bg::start(&["listen", "--exec", "cat", "--count", "1"], &as_bob);
    wait_online(&p, "bob");
    let o = run(
        &["send", "--to", "bob", r#"{"hello":"bob","n":[1,2]}"#],
        &as_alice,
    );
    o.ok();
    let r = o.json();
    assert_eq!(r["status"], "delivered", "{r}");
    assert_eq!(r["reply"], json!({"hello": "bob", "n": [1, 2]}));
    assert_eq!(
        listen.line()["message"],
        json!({"hello": "bob", "n": [1, 2]})
    );
    assert_eq!(listen.exit(), Some(0), "stderr {:?}", listen.stderr());
    // Output that is not JSON is a string; the sender and id are in the environment.
    let mut listen = Bg::start(
        &[
            "listen",
            "--exec",
            "read -r m; echo \"$FEDMCP_MSG_FROM said $m ($FEDMCP_MSG_ID)\"",
            "--count",
            "1",
        ],
        &as_echo,
    );
    wait_online(&p, "echo");
    let o = run(&["send", "--to", "echo", "hi"], &as_alice);
    o.ok();
    let r = o.json();
    assert_eq!(
        r["reply"],
        format!("alice said \"hi\" ({})", r["msgId"].as_str().unwrap_or("?"))
    );
    assert_eq!(listen.exit(), Some(0));
    // A failing command answers an error: the send is rejected, exit 1.
    let mut listen = Bg::start(
        &[
            "listen",
            "--exec",
            "echo 'no such thing' >&2; exit 3",
            "--count",
            "1",
        ],
        &as_shell,
    );
    wait_online(&p, "shell");
    let o = run(&["send", "--to", "shell", "x"], &as_alice);
    o.fails(1);
    let r = o.json();
    assert_eq!(r["status"], "rejected", "{r}");
    assert_eq!(r["error"]["code"], -32000);
    assert_eq!(r["error"]["message"], "no such thing");
    assert_eq!(r["error"]["data"]["exitCode"], 3);
    assert!(o.stderr.contains("no such thing"), "{}", o.stderr);
    assert_eq!(listen.exit(), Some(0));
}

#[test]
fn put_get_ls_rm_stream_resources() {
    let p = Proxy::start(&[]);
    let u = url(&p);
    let alice = p.federation_token("alice");
    let bob = p.federation_token("bob");
    let as_alice = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", alice.as_str())];
    let as_bob = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", bob.as_str())];
    let dir = Scratch(scratch_dir("cli-resources"));
    // 3 MiB of varied bytes.
    let mut data = Vec::with_capacity(3 << 20);
    let mut x: u32 = 0x1234_5678;
    while data.len() < 3 << 20 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let src = dir.join("big.bin");
    std::fs::write(&src, &data).expect("write");
    let o = run(&["put", "big.bin", src.to_str().expect("path")], &as_alice);
    o.ok();
    let a = o.json();
    assert_eq!(a["owner"], "alice");
    assert_eq!(a["name"], "big.bin");
    assert_eq!(a["size"], 3 << 20);
    assert_eq!(a["sha256"], sha256_hex(&data));
    assert_eq!(a["readers"], Value::Null);
    // No progress when stderr is not a terminal.
    assert_eq!(o.stderr, "");
    // get -o FILE and get to stdout: the same bytes.
    let copy = dir.join("copy.bin");
    let o = run(
        &["get", "alice/big.bin", "-o", copy.to_str().expect("path")],
        &as_bob,
    );
    o.ok();
    assert_eq!(o.stderr, "");
    assert_eq!(o.text(), "");
    assert!(
        std::fs::read(&copy).expect("copy") == data,
        "-o copy differs"
    );
    let o = run(&["get", "alice/big.bin"], &as_bob);
    o.ok();
    assert!(
        o.stdout == data,
        "stdout copy differs ({} bytes)",
        o.stdout.len()
    );
    // From stdin (chunked), readable by bob only.
    let o = run_with(
        &["put", "notes.txt", "-", "--readers", "bob"],
        &as_alice,
        Some(b"hello world\n".to_vec()),
    );
    o.ok();
    let n = o.json();
    assert_eq!(n["size"], 12);
    assert_eq!(n["readers"], json!(["bob"]));
    let o = run(&["get", "alice/notes.txt"], &as_bob);
    o.ok();
    assert_eq!(o.text(), "hello world\n");
    // Stdin without `-` (not a terminal), for the owner only: bob gets 404 (1).
    let o = run_with(
        &["put", "secret", "--readers", ""],
        &as_alice,
        Some(b"s".to_vec()),
    );
    o.ok();
    assert_eq!(o.json()["readers"], json!([]));
    let gone = dir.join("never.bin");
    let o = run(
        &["get", "alice/secret", "-o", gone.to_str().expect("path")],
        &as_bob,
    );
    o.fails(1);
    assert!(o.stderr.contains("404"), "{}", o.stderr);
    assert!(!gone.exists(), "a failed get leaves no file");
    // ls: one line per resource the token may read.
    let o = run(&["ls"], &as_bob);
    o.ok();
    let mut names: Vec<String> = o
        .json_lines()
        .iter()
        .map(|r| r["name"].as_str().unwrap_or("").to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["big.bin", "notes.txt"]);
    let o = run(&["ls", "--json"], &as_alice);
    o.ok();
    assert_eq!(o.json()["resources"].as_array().map(Vec::len), Some(3));
    // rm: the owner may; then it is 404 (1) to get and to rm again; bob may not (403: 4).
    let o = run(&["rm", "alice/notes.txt"], &as_bob);
    o.fails(4);
    let o = run(&["rm", "alice/notes.txt"], &as_alice);
    o.ok();
    assert_eq!(o.text(), "");
    run(&["get", "alice/notes.txt"], &as_bob).fails(1);
    run(&["rm", "alice/notes.txt"], &as_alice).fails(1);
}

#[test]
fn a_refused_upload_is_answered_before_the_body() {
    let p = Proxy::start(&[
        ("FEDMCP_RESOURCE_MAX_BYTES", "1024"),
        ("FEDMCP_RESOURCE_QUOTA_BYTES", "1024"),
    ]);
    let u = url(&p);
    let alice = p.federation_token("alice");
    let dir = Scratch(scratch_dir("cli-refused"));
    let src = dir.join("big.bin");
    std::fs::write(&src, vec![7u8; 1 << 20]).expect("write");
    let o = run(
        &["put", "big", src.to_str().expect("path")],
        &[("FEDMCP_URL", &u), ("FEDMCP_TOKEN", &alice)],
    );
    o.fails(1);
    assert!(o.stderr.contains("413"), "{}", o.stderr);
    // The same from stdin (chunked: refused once over the limit).
    let o = run_with(
        &["put", "big", "-"],
        &[("FEDMCP_URL", &u), ("FEDMCP_TOKEN", &alice)],
        Some(vec![7u8; 1 << 20]),
    );
    o.fails(1);
    assert!(o.stderr.contains("413"), "{}", o.stderr);
}

#[test]
fn unreachable_is_3_and_a_refused_token_is_4() {
    let p = Proxy::start(&[]);
    let dir = Scratch(scratch_dir("cli-exit"));
    let file = dir.join("f.txt");
    std::fs::write(&file, b"x").expect("write");
    let file = file.to_str().expect("path");
    let commands: Vec<Vec<&str>> = vec![
        vec!["servers", "list"],
        vec!["servers", "show", "a"],
        vec!["servers", "add", "a"],
        vec!["servers", "remove", "a"],
        vec!["send", "--to", "bob", "x"],
        vec!["listen"],
        vec!["put", "n", file],
        vec!["get", "a/n"],
        vec!["ls"],
        vec!["rm", "a/n"],
    ];
    let closed = format!("http://127.0.0.1:{}", closed_port());
    let tok = p.federation_token("alice");
    for args in &commands {
        let o = run(args, &[("FEDMCP_URL", &closed), ("FEDMCP_TOKEN", &tok)]);
        o.fails(3);
        assert!(o.stderr.contains("cannot reach the proxy"), "{}", o.stderr);
    }
    // A token signed with another secret: 401, exit 4.
    let now = now_secs();
    let forged = jwt::sign(
        b"another-secret-0123456789-abcdefghijklmnop",
        &Claims {
            server_id: "alice".into(),
            token_type: TokenType::Admin,
            iat: now,
            exp: now + 3600,
            nbf: None,
            jti: None,
        },
    );
    for args in &commands {
        let o = run(args, &[("FEDMCP_URL", &url(&p)), ("FEDMCP_TOKEN", &forged)]);
        o.fails(4);
        assert_eq!(o.text(), "");
    }
}

#[test]
fn https_is_verified_against_the_trusted_ca_file() {
    let dir = Scratch(scratch_dir("cli-tls"));
    let path = |n: &str| dir.join(n).to_str().expect("path").to_string();
    std::fs::write(
        path("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write");
    let (ca_key, ca, key, csr, ext, leaf) = (
        path("ca.key"),
        path("ca.pem"),
        path("leaf.key"),
        path("leaf.csr"),
        path("leaf.ext"),
        path("leaf.pem"),
    );
    let curve = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: Vec<Vec<&str>> = vec![
        [
            &["req", "-x509"][..],
            &curve,
            &["-days", "2", "-subj", "/CN=cli-ca"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            &["-keyout", &ca_key, "-out", &ca],
        ]
        .concat(),
        [
            &["req"][..],
            &curve,
            &["-subj", "/CN=leaf", "-keyout", &key, "-out", &csr],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &leaf,
        ],
    ];
    for args in &steps {
        let out = Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("this test needs the openssl CLI: {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A TLS proxy (the harness expects http://, so it is started here).
    let stderr = dir.join("proxy.log");
    let mut child = command(
        &[],
        &[
            ("FEDMCP_LISTEN", "127.0.0.1:0"),
            ("FEDMCP_JWT_SECRET", common::SECRET),
            ("FEDMCP_STATE_DIR", ""),
            ("TMPDIR", dir.path().to_str().expect("path")),
            ("FEDMCP_TLS_CERT", &leaf),
            ("FEDMCP_TLS_KEY", &key),
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::from(std::fs::File::create(&stderr).expect("log")))
    .spawn()
    .expect("start the proxy");
    let out = child.stdout.take().expect("stdout");
    let guard = Bg {
        child,
        lines: mpsc::channel().1,
        stderr: Arc::new(Mutex::new(String::new())),
        err_done: mpsc::channel().1,
        what: "fedmcp (TLS)".into(),
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(WAIT).expect("the TLS proxy's ready line");
    let addr = line
        .trim()
        .strip_prefix("listening on https://")
        .unwrap_or_else(|| panic!("bad ready line {line:?}"))
        .to_string();
    let now = now_secs();
    let admin = jwt::sign(
        common::SECRET.as_bytes(),
        &Claims {
            server_id: "operator".into(),
            token_type: TokenType::Admin,
            iat: now,
            exp: now + 3600,
            nbf: None,
            jti: None,
        },
    );
    let https = format!("https://{addr}");
    let trusted = [
        ("FEDMCP_URL", https.as_str()),
        ("FEDMCP_TOKEN", admin.as_str()),
        ("FEDMCP_TRUSTED_CA_FILE", ca.as_str()),
    ];
    let o = run(&["servers", "add", "tls-member", "--print-token"], &trusted);
    o.ok();
    let member = o.text().trim().to_string();
    let as_member = [
        ("FEDMCP_URL", https.as_str()),
        ("FEDMCP_TOKEN", member.as_str()),
        ("FEDMCP_TRUSTED_CA_FILE", ca.as_str()),
    ];
    let o = run_with(&["put", "r", "-"], &as_member, Some(b"over tls".to_vec()));
    o.ok();
    let o = run(&["get", "tls-member/r"], &as_member);
    o.ok();
    assert_eq!(o.text(), "over tls");
    // Not trusted (the bundled roots do not know this CA): a TLS failure is 3.
    let o = run(&["servers", "list"], &trusted[..2]);
    o.fails(3);
    assert!(o.stderr.contains("TLS"), "{}", o.stderr);
    drop(guard);
}

#[test]
fn listen_reconnects_after_the_proxy_restarts() {
    let port = closed_port();
    let listen_at = format!("127.0.0.1:{port}");
    let first = Proxy::start(&[("FEDMCP_LISTEN", &listen_at)]);
    let u = url(&first);
    let bob = first.federation_token("bob");
    let alice = first.federation_token("alice");
    let as_alice = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", alice.as_str())];
    let mut listen = Bg::start(
        &["listen", "--count", "2"],
        &[("FEDMCP_URL", &u), ("FEDMCP_TOKEN", &bob)],
    );
    wait_online(&first, "bob");
    run(&["send", "--to", "bob", "one"], &as_alice).ok();
    assert_eq!(listen.line()["message"], "one");
    drop(first);
    let second = Proxy::start(&[("FEDMCP_LISTEN", &listen_at)]);
    wait_online(&second, "bob");
    run(&["send", "--to", "bob", "two"], &as_alice).ok();
    assert_eq!(listen.line()["message"], "two");
    assert_eq!(listen.exit(), Some(0), "stderr {:?}", listen.stderr());
    assert!(
        listen.stderr().contains("reconnecting"),
        "{}",
        listen.stderr()
    );
}

#[test]
fn listen_ends_4_when_its_token_is_revoked_and_1_when_replaced() {
    let p = Proxy::start(&[]);
    let u = url(&p);
    let admin = p.admin_token();
    let bob = token_with_jti(&p, "bob", "bob-jti-1");
    let as_bob = [("FEDMCP_URL", u.as_str()), ("FEDMCP_TOKEN", bob.as_str())];
    let mut first = Bg::start(&["listen"], &as_bob);
    wait_online(&p, "bob");
    // A second session of bob replaces the first (4003): the first ends with 1.
    let mut second = Bg::start(&["listen"], &as_bob);
    assert_eq!(first.exit(), Some(1), "stderr {:?}", first.stderr());
    assert!(first.stderr().contains("4003"), "{}", first.stderr());
    wait_online(&p, "bob");
    // Revoking its token closes the session (4001): 4.
    let r = p.http("DELETE", "/v1/tokens/bob-jti-1", Some(&admin), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(second.exit(), Some(4), "stderr {:?}", second.stderr());
    assert!(second.stderr().contains("4001"), "{}", second.stderr());
    // And it cannot join again with it: 4 at the upgrade.
    let o = run(&["listen"], &as_bob);
    o.fails(4);
}
