//! Process-level contract (docs/PROTOCOL.md §1, §2 `fedmcp token`): the ready line, configuration
//! errors, the plain-listener guard, the generated secret, and the token command. These spawn
//! the binary directly where the harness's fixed environment does not fit.
mod common;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary with a clean environment (PATH only) plus `env`, later entries winning.
fn command(env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedmcp"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

struct Exit {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Reads a pipe to its end on a thread.
fn drain(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx
}

/// Spawns a process that is expected to exit; waits (bounded) and collects its output.
fn spawn_exit(mut cmd: Command) -> (Child, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut child = cmd.spawn().expect("spawn fedmcp");
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    (child, out, err)
}

fn wait_exit(
    (mut child, out, err): (Child, mpsc::Receiver<String>, mpsc::Receiver<String>),
    started: Instant,
) -> Exit {
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    Exit {
        code,
        stdout: out.recv_timeout(WAIT).unwrap_or_default(),
        stderr: err.recv_timeout(WAIT).unwrap_or_default(),
        took,
    }
}

fn run(env: &[(&str, &str)], args: &[&str]) -> Exit {
    let started = Instant::now();
    wait_exit(spawn_exit(command(env, args)), started)
}

/// A long-running proxy whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

fn spawn_serving(env: &[(&str, &str)], stderr: &Path) -> Running {
    let mut cmd = command(env, &[]);
    cmd.stderr(Stdio::from(std::fs::File::create(stderr).unwrap()));
    let mut child = cmd.spawn().expect("spawn fedmcp");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    Running { child, lines: rx }
}

/// The ready line's address (panics if there is none within `WAIT`).
fn ready_addr(r: &mut Running, stderr: &Path, scheme_host: &str) -> SocketAddr {
    let line = r.lines.recv_timeout(WAIT).unwrap_or_else(|_| {
        let _ = r.child.kill();
        panic!(
            "no ready line; stderr: {}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        )
    });
    let port = line
        .strip_prefix(&format!("listening on http://{scheme_host}:"))
        .unwrap_or_else(|| panic!("ready line {line:?}"));
    let port: u16 = port
        .parse()
        .unwrap_or_else(|_| panic!("port in ready line {line:?}"));
    assert_ne!(port, 0, "the ready line shows the real port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A harness `Proxy` around a process started here (its `Drop` kills it and removes `dir`).
fn serving_proxy(env: &[(&str, &str)], secret: &str) -> (Proxy, mpsc::Receiver<String>) {
    let dir = scratch_dir("startup");
    let stderr = dir.join("stderr.log");
    let mut full = vec![("FEDMCP_LISTEN", "127.0.0.1:0"), ("RUST_LOG", "info")];
    full.extend_from_slice(env);
    let mut r = spawn_serving(&full, &stderr);
    let addr = ready_addr(&mut r, &stderr, "127.0.0.1");
    (
        Proxy {
            child: r.child,
            addr,
            secret: secret.to_string(),
            stderr,
            dir,
        },
        r.lines,
    )
}

fn claims_of(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "compact JWS: {token}");
    serde_json::from_slice(&B64.decode(parts[1]).expect("base64url claims")).expect("JSON claims")
}

fn healthz(addr: SocketAddr) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    Resp::parse(&raw).map_or(0, |r| r.status)
}

fn wait_child(child: &mut Child) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no exit within {WAIT:?}");
}

// ---------------------------------------------------------------------------------------------

#[test]
fn ready_line_is_one_stdout_line_with_the_real_port() {
    let dir = scratch_dir("ready");
    let stderr = dir.join("stderr.log");
    let mut r = spawn_serving(
        &[
            ("FEDMCP_LISTEN", "127.0.0.1:0"),
            ("FEDMCP_JWT_SECRET", SECRET),
            ("FEDMCP_STATE_DIR", ""),
            ("RUST_LOG", "debug"),
        ],
        &stderr,
    );
    let addr = ready_addr(&mut r, &stderr, "127.0.0.1");
    assert_eq!(healthz(addr), 200, "the printed port serves");
    unsafe_kill(r.child.id(), "TERM");
    assert_eq!(wait_child(&mut r.child), Some(0));
    // Everything else went to stderr: stdout had exactly the one line.
    let mut rest = Vec::new();
    while let Ok(l) = r.lines.recv_timeout(WAIT) {
        rest.push(l);
    }
    assert!(rest.is_empty(), "more stdout lines: {rest:?}");
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(!log.contains(SECRET), "the secret reached the log");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Extra environment, the variable the line must name, a value that must not appear.
type BadCase<'a> = (Vec<(&'a str, &'a str)>, &'a str, Option<&'a str>);

#[test]
fn bad_values_exit_2_with_one_stderr_line_naming_the_variable() {
    let dir = scratch_dir("badcfg");
    let short_file = dir.join("short-secret");
    std::fs::write(&short_file, "filesecret\n").unwrap();
    let short_file = short_file.to_str().unwrap().to_string();
    // (extra environment, variable the line must name, value that must not appear)
    let cases: Vec<BadCase> = vec![
        (
            vec![("FEDMCP_MAX_SERVERS", "abc")],
            "FEDMCP_MAX_SERVERS",
            None,
        ),
        (
            vec![("FEDMCP_MAX_SERVERS", "0")],
            "FEDMCP_MAX_SERVERS",
            None,
        ),
        (
            vec![("FEDMCP_RATE_LIMIT", "fast")],
            "FEDMCP_RATE_LIMIT",
            None,
        ),
        (vec![("FEDMCP_LISTEN", "nonsense")], "FEDMCP_LISTEN", None),
        (
            vec![("FEDMCP_LISTEN", "127.0.0.1:99999")],
            "FEDMCP_LISTEN",
            None,
        ),
        (
            vec![("FEDMCP_HANDSHAKE_TIMEOUT_MS", "-5")],
            "FEDMCP_HANDSHAKE_TIMEOUT_MS",
            None,
        ),
        (
            vec![("FEDMCP_ALLOW_PLAINTEXT", "yes")],
            "FEDMCP_ALLOW_PLAINTEXT",
            None,
        ),
        (
            vec![("FEDMCP_MAX_CONNECTIONS", "1k")],
            "FEDMCP_MAX_CONNECTIONS",
            None,
        ),
        (
            vec![("FEDMCP_JWT_SECRET", "shortsecrt")],
            "FEDMCP_JWT_SECRET",
            Some("shortsecrt"),
        ),
        (
            vec![("FEDMCP_JWT_PREVIOUS_SECRET", "shortprev!")],
            "FEDMCP_JWT_PREVIOUS_SECRET",
            Some("shortprev!"),
        ),
        (
            vec![
                ("FEDMCP_JWT_SECRET", ""),
                ("FEDMCP_JWT_SECRET_FILE", short_file.as_str()),
            ],
            "FEDMCP_JWT_SECRET",
            Some("filesecret"),
        ),
        (vec![("FEDMCP_LISTEN", "0.0.0.0:0")], "FEDMCP_LISTEN", None),
    ];
    // Start them all, then wait: bounded, and quick on a loaded machine.
    let started = Instant::now();
    let procs: Vec<_> = cases
        .iter()
        .map(|(extra, _, _)| {
            let mut env = vec![
                ("FEDMCP_LISTEN", "127.0.0.1:0"),
                ("FEDMCP_JWT_SECRET", SECRET),
                ("FEDMCP_STATE_DIR", ""),
                ("RUST_LOG", "info"),
            ];
            env.extend(extra.iter().copied());
            // An empty JWT_SECRET entry means "unset it" for the secret-file case.
            let mut cmd = command(&[], &[]);
            for (k, v) in env {
                if k == "FEDMCP_JWT_SECRET" && v.is_empty() {
                    cmd.env_remove(k);
                } else {
                    cmd.env(k, v);
                }
            }
            spawn_exit(cmd)
        })
        .collect();
    for ((extra, var, hidden), p) in cases.iter().zip(procs) {
        let e = wait_exit(p, started);
        assert_eq!(
            e.code,
            Some(2),
            "{extra:?}: exit code; stderr {:?}",
            e.stderr
        );
        assert!(
            e.took < Duration::from_secs(8),
            "{extra:?}: took {:?}",
            e.took
        );
        assert_eq!(e.stdout, "", "{extra:?}: nothing on stdout");
        let lines: Vec<&str> = e.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{extra:?}: one stderr line, got {:?}",
            e.stderr
        );
        assert!(
            lines[0].contains(var),
            "{extra:?}: the line names {var}: {:?}",
            lines[0]
        );
        if let Some(h) = hidden {
            assert!(
                !lines[0].contains(h),
                "{extra:?}: the secret is in the line {:?}",
                lines[0]
            );
        }
        assert!(
            !lines[0].contains(SECRET),
            "{extra:?}: the configured secret is in the line"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plain_listener_off_loopback_needs_allow_plaintext() {
    let e = run(
        &[
            ("FEDMCP_LISTEN", "0.0.0.0:0"),
            ("FEDMCP_JWT_SECRET", SECRET),
            ("FEDMCP_STATE_DIR", ""),
        ],
        &[],
    );
    assert_eq!(e.code, Some(2), "stderr {:?}", e.stderr);
    assert_eq!(e.stdout, "");
    assert_eq!(e.stderr.lines().count(), 1, "{:?}", e.stderr);
    assert!(e.stderr.contains("FEDMCP_LISTEN"), "{:?}", e.stderr);

    let dir = scratch_dir("plain");
    let stderr = dir.join("stderr.log");
    let mut r = spawn_serving(
        &[
            ("FEDMCP_LISTEN", "0.0.0.0:0"),
            ("FEDMCP_ALLOW_PLAINTEXT", "1"),
            ("FEDMCP_JWT_SECRET", SECRET),
            ("FEDMCP_STATE_DIR", ""),
        ],
        &stderr,
    );
    let addr = ready_addr(&mut r, &stderr, "0.0.0.0");
    assert_eq!(healthz(addr), 200);
    let _ = r.child.kill();
    let _ = r.child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Regular files directly in `dir`: the generated secret should be among them.
fn secret_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    let named: Vec<_> = files
        .iter()
        .filter(|p| {
            let n = p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_ascii_lowercase();
            n.contains("secret") || n.contains("key") || n.contains("jwt")
        })
        .cloned()
        .collect();
    if named.is_empty() { files } else { named }
}

#[test]
fn generated_secret_is_kept_0600_in_the_state_dir_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let state = scratch_dir("state");
    let state_s = state.to_str().unwrap().to_string();
    let env = [("FEDMCP_STATE_DIR", state_s.as_str())];
    let (mut a, _) = serving_proxy(&env, "");
    let files = secret_files(&state);
    assert!(!files.is_empty(), "no secret file in the state dir");
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", f.display());
    }
    let contents: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(
        contents.iter().any(|c| c.len() >= 32),
        "the secret file holds at least 32 bytes"
    );

    // `fedmcp token` with the same state dir signs with the same secret.
    let t = run(&env, &["token", "--server-id", "x", "--admin"]);
    assert_eq!(t.code, Some(0), "token: {}", t.stderr);
    let admin = t.stdout.trim().to_string();
    assert_eq!(t.stdout.lines().count(), 1, "{:?}", t.stdout);
    let r = a.http("GET", "/v1/servers", Some(&admin), None);
    assert_eq!(
        r.status,
        200,
        "CLI token on the running proxy: {}",
        r.text()
    );
    let reg = a.http(
        "POST",
        "/v1/servers",
        Some(&admin),
        Some(r#"{"serverId":"alpha"}"#),
    );
    assert_eq!(reg.status, 201, "{}", reg.text());
    let fed = reg.json()["token"].as_str().unwrap().to_string();
    let log = a.stderr_text();
    for c in &contents {
        let text = String::from_utf8_lossy(c);
        let text = text.trim();
        if text.len() >= 16 {
            assert!(!log.contains(text), "the generated secret reached the log");
        }
    }

    // Restart with the same state dir: same secret file, old tokens still verify.
    assert_eq!(a.terminate(), Some(0));
    drop(a);
    let (b, _) = serving_proxy(&env, "");
    let again: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert_eq!(contents, again, "the secret file was rewritten");
    let r = b.http("GET", "/v1/servers", Some(&admin), None);
    assert_eq!(r.status, 200, "CLI token after restart: {}", r.text());
    let r = b.http("POST", "/v1/token", Some(&fed), None);
    assert_eq!(r.status, 200, "issued token after restart: {}", r.text());
    drop(b);

    // Another state dir makes another secret: the token is refused there.
    let other = scratch_dir("state-other");
    let other_s = other.to_str().unwrap().to_string();
    let (c, _) = serving_proxy(&[("FEDMCP_STATE_DIR", other_s.as_str())], "");
    let r = c.http("GET", "/v1/servers", Some(&admin), None);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.code(), "bad_signature");
    drop(c);
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_dir_all(&other);
}

#[test]
fn token_command_prints_a_signed_token_with_the_right_claims() {
    let base = [("FEDMCP_JWT_SECRET", SECRET), ("FEDMCP_STATE_DIR", "")];
    let check = |args: &[&str], env: &[(&str, &str)], typ: &str, ttl: i64| {
        let mut full = base.to_vec();
        full.extend_from_slice(env);
        let before = now_secs();
        let e = run(&full, args);
        assert_eq!(e.code, Some(0), "{args:?}: {}", e.stderr);
        assert_eq!(e.stdout.lines().count(), 1, "{args:?}: {:?}", e.stdout);
        let token = e.stdout.trim();
        let c = claims_of(token);
        assert_eq!(c["serverId"], "alpha", "{c}");
        assert_eq!(c["type"], typ, "{c}");
        let iat = c["iat"].as_i64().expect("integer iat");
        let exp = c["exp"].as_i64().expect("integer exp");
        assert!(iat >= before - 1 && iat <= now_secs() + 1, "iat {iat}");
        assert_eq!(exp - iat, ttl, "{args:?}: {c}");
        let header: Value =
            serde_json::from_slice(&B64.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["alg"], "HS256");
        assert!(
            jwt::verify(token, &[SECRET.as_bytes()], now_secs(), 30).is_ok(),
            "signed with the configured secret"
        );
        token.to_string()
    };
    let fed = check(&["token", "--server-id", "alpha"], &[], "federation", 86400);
    check(
        &["token", "--server-id", "alpha", "--admin", "--ttl", "120"],
        &[],
        "admin",
        120,
    );
    check(
        &["token", "--admin", "--server-id", "alpha"],
        &[("FEDMCP_TOKEN_TTL_SECS", "600")],
        "admin",
        600,
    );
    // The printed token works against a proxy with that secret.
    let p = Proxy::start(&[]);
    let r = p.http("POST", "/v1/token", Some(&fed), None);
    assert_eq!(r.status, 200, "{}", r.text());
    // A bad server id is refused.
    let e = run(&base, &["token", "--server-id", "a b"]);
    assert_eq!(e.code, Some(2));
    assert_eq!(e.stdout, "");
}
