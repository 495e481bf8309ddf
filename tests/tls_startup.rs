//! TLS at start (docs/PROTOCOL.md §1): the `https://` ready line, the one-line exit-2 errors for a
//! missing, junk or mismatched certificate or key, "both or neither", and the plain-listener
//! guard not applying when TLS is on. Certificates are made with the `openssl` CLI; the
//! binary is spawned directly with a clean environment, and every wait is bounded.
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long any single wait may take.
const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "tls-startup-secret-0123456789-abcdefghij";

/// A fresh scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!(
            "fedmcp-tls-startup-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed P-256 certificate for localhost and 127.0.0.1 with subject CN `name`, and
/// its key, made with the `openssl` CLI: (cert path, key path).
fn make_pair(dir: &Scratch, name: &str) -> (String, String) {
    let cert = dir.path(&format!("{name}.cert.pem"));
    let key = dir.path(&format!("{name}.key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("these tests need the openssl CLI to make certificates: {e}"));
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    )
}

/// The binary with a clean environment (PATH only, memory-only state, a fixed secret) plus
/// `env`, later entries winning.
fn command(env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedmcp"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FEDMCP_LISTEN", "127.0.0.1:0")
        .env("FEDMCP_JWT_SECRET", SECRET)
        .env("FEDMCP_STATE_DIR", "")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
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

struct Exit {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs a process that is expected to exit (`command(env)`): bounded wait, collected output.
fn run_to_exit(env: &[(&str, &str)]) -> Exit {
    exit_of(command(env))
}

/// Spawns `cmd`, waits (bounded) for it to exit, and collects its output.
fn exit_of(mut cmd: Command) -> Exit {
    let mut child = cmd.spawn().expect("spawn fedmcp");
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let started = Instant::now();
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the process did not exit within {WAIT:?}; stderr {:?}",
                err.recv_timeout(Duration::from_secs(1)).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Exit {
        code,
        stdout: out.recv_timeout(WAIT).unwrap_or_default(),
        stderr: err.recv_timeout(WAIT).unwrap_or_default(),
    }
}

/// A serving proxy, killed when dropped.
struct Serving {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serving {
    fn start(env: &[(&str, &str)], stderr: PathBuf) -> Serving {
        let mut cmd = command(env);
        cmd.stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()));
        let mut child = cmd.spawn().expect("spawn fedmcp");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(l) = line else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Serving {
            child,
            lines: rx,
            stderr,
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The port of a `listening on https://{host}:PORT` ready line (bounded wait).
    fn ready_port(&mut self, host: &str) -> u16 {
        let line = match self.lines.recv_timeout(WAIT) {
            Ok(l) => l,
            Err(_) => {
                let _ = self.child.kill();
                panic!(
                    "no ready line within {WAIT:?}; exit {:?}; stderr: {}",
                    self.child.wait().ok().and_then(|s| s.code()),
                    self.stderr_text()
                );
            }
        };
        let port = line
            .strip_prefix(&format!("listening on https://{host}:"))
            .unwrap_or_else(|| panic!("ready line {line:?}, expected https://{host}:PORT"));
        let port: u16 = port
            .parse()
            .unwrap_or_else(|_| panic!("port in ready line {line:?}"));
        assert_ne!(port, 0, "the ready line shows the real port");
        port
    }
}

/// Panics unless `curl` is on PATH: the HTTPS checks need a real client, and a missing one
/// must fail the run rather than skip them. `make test` installs curl (target `test-tools`).
#[track_caller]
fn require_curl() {
    let ok = Command::new("curl")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "curl is required for the HTTPS checks but `curl --version` did not run; \
         install it (e.g. `apt-get install curl`) or run `make test`, which installs it"
    );
}

/// `GET /healthz` over HTTPS with curl, trusting `cafile`: (exit code, body, stderr).
fn curl_healthz(port: u16, cafile: &str) -> (Option<i32>, String, String) {
    let out = Command::new("curl")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .args(["--silent", "--show-error", "--fail", "--noproxy", "*"])
        .args(["--max-time", &WAIT.as_secs().to_string()])
        .args(["--cacert", cafile])
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("https://localhost:{port}/healthz"))
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------

#[test]
fn tls_ready_line_is_https_and_serves_healthz() {
    let dir = Scratch::new("ready");
    let (cert, key) = make_pair(&dir, "localhost");
    let mut p = Serving::start(
        &[("FEDMCP_TLS_CERT", &cert), ("FEDMCP_TLS_KEY", &key)],
        dir.path("stderr.log"),
    );
    let port = p.ready_port("127.0.0.1");
    require_curl();
    let (code, body, err) = curl_healthz(port, &cert);
    assert_eq!(
        code,
        Some(0),
        "curl https /healthz failed: {err}; proxy stderr: {}",
        p.stderr_text()
    );
    assert_eq!(body.trim(), r#"{"status":"ok"}"#);
    // The ready line was the only stdout line so far.
    assert!(
        p.lines.try_recv().is_err(),
        "more than one stdout line at start"
    );
}

/// Extra environment, and the variable the one stderr line must start with.
type BadCase = (&'static str, Vec<(&'static str, String)>, &'static str);

#[test]
fn bad_tls_configuration_exits_2_with_one_line_naming_the_variable() {
    let dir = Scratch::new("bad");
    let (cert, key) = make_pair(&dir, "one");
    let (_cert2, key2) = make_pair(&dir, "two");
    let junk = dir.path("junk.pem");
    std::fs::write(&junk, "this is not PEM at all\n").unwrap();
    let junk = junk.to_str().unwrap().to_string();
    let empty = dir.path("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap().to_string();
    let missing = dir.path("no-such-file.pem").to_str().unwrap().to_string();

    let cases: Vec<BadCase> = vec![
        (
            "missing certificate file",
            vec![
                ("FEDMCP_TLS_CERT", missing.clone()),
                ("FEDMCP_TLS_KEY", key.clone()),
            ],
            "FEDMCP_TLS_CERT",
        ),
        (
            "junk certificate file",
            vec![
                ("FEDMCP_TLS_CERT", junk.clone()),
                ("FEDMCP_TLS_KEY", key.clone()),
            ],
            "FEDMCP_TLS_CERT",
        ),
        (
            "empty certificate file",
            vec![
                ("FEDMCP_TLS_CERT", empty.clone()),
                ("FEDMCP_TLS_KEY", key.clone()),
            ],
            "FEDMCP_TLS_CERT",
        ),
        (
            "a key where the certificate should be",
            vec![
                ("FEDMCP_TLS_CERT", key.clone()),
                ("FEDMCP_TLS_KEY", key.clone()),
            ],
            "FEDMCP_TLS_CERT",
        ),
        (
            "missing key file",
            vec![
                ("FEDMCP_TLS_CERT", cert.clone()),
                ("FEDMCP_TLS_KEY", missing.clone()),
            ],
            "FEDMCP_TLS_KEY",
        ),
        (
            "junk key file",
            vec![
                ("FEDMCP_TLS_CERT", cert.clone()),
                ("FEDMCP_TLS_KEY", junk.clone()),
            ],
            "FEDMCP_TLS_KEY",
        ),
        (
            "a certificate where the key should be",
            vec![
                ("FEDMCP_TLS_CERT", cert.clone()),
                ("FEDMCP_TLS_KEY", cert.clone()),
            ],
            "FEDMCP_TLS_KEY",
        ),
        (
            "key of another certificate",
            vec![
                ("FEDMCP_TLS_CERT", cert.clone()),
                ("FEDMCP_TLS_KEY", key2.clone()),
            ],
            "FEDMCP_TLS_KEY",
        ),
        (
            "only the certificate set",
            vec![("FEDMCP_TLS_CERT", cert.clone())],
            "FEDMCP_TLS_KEY",
        ),
        (
            "only the key set",
            vec![("FEDMCP_TLS_KEY", key.clone())],
            "FEDMCP_TLS_CERT",
        ),
    ];
    let mut failures = Vec::new();
    for (what, extra, var) in &cases {
        let env: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let e = run_to_exit(&env);
        let lines: Vec<&str> = e.stderr.lines().collect();
        let ok = e.code == Some(2)
            && e.stdout.is_empty()
            && lines.len() == 1
            && lines[0].starts_with(&format!("{var}:"));
        if !ok {
            failures.push(format!(
                "{what}: expected exit 2, no stdout and one stderr line starting with {var}:; \
                 got exit {:?}, stdout {:?}, stderr {:?}",
                e.code, e.stdout, e.stderr
            ));
        }
        assert!(
            !e.stderr.contains(SECRET),
            "{what}: the secret reached stderr"
        );
        // The private key's PEM body never reaches the error line.
        let key_pem = std::fs::read_to_string(&key).unwrap();
        let key_body = key_pem.lines().nth(1).unwrap_or("-");
        assert!(
            !e.stderr.contains(key_body),
            "{what}: key material reached stderr"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tls_listener_on_any_address_needs_no_allow_plaintext() {
    let dir = Scratch::new("any");
    let (cert, key) = make_pair(&dir, "localhost");
    let mut p = Serving::start(
        &[
            ("FEDMCP_LISTEN", "0.0.0.0:0"),
            ("FEDMCP_TLS_CERT", &cert),
            ("FEDMCP_TLS_KEY", &key),
        ],
        dir.path("stderr.log"),
    );
    let port = p.ready_port("0.0.0.0");
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "the proxy exited after its ready line: {}",
        p.stderr_text()
    );
    require_curl();
    let (code, body, err) = curl_healthz(port, &cert);
    assert_eq!(code, Some(0), "curl https /healthz failed: {err}");
    assert_eq!(body.trim(), r#"{"status":"ok"}"#);
}

#[test]
fn ca_signed_chain_is_served_and_verifies_through_the_ca() {
    let dir = Scratch::new("chain");
    let ca_cert = dir.path("ca.cert.pem");
    let ca_key = dir.path("ca.key.pem");
    let leaf_key = dir.path("leaf.key.pem");
    let csr = dir.path("leaf.csr");
    let leaf_cert = dir.path("leaf.cert.pem");
    let ext = dir.path("leaf.ext");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let steps: Vec<Vec<String>> = vec![
        [
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=fedmcp-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &p(&ca_key),
            "-out",
            &p(&ca_cert),
        ]
        .map(String::from)
        .to_vec(),
        [
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=leaf",
            "-keyout",
            &p(&leaf_key),
            "-out",
            &p(&csr),
        ]
        .map(String::from)
        .to_vec(),
        [
            "x509",
            "-req",
            "-in",
            &p(&csr),
            "-CA",
            &p(&ca_cert),
            "-CAkey",
            &p(&ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p(&ext),
            "-out",
            &p(&leaf_cert),
        ]
        .map(String::from)
        .to_vec(),
    ];
    for args in &steps {
        let out = Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The chain file: the leaf, then the CA.
    let chain = dir.path("chain.pem");
    let mut pem = std::fs::read_to_string(&leaf_cert).unwrap();
    pem.push_str(&std::fs::read_to_string(&ca_cert).unwrap());
    std::fs::write(&chain, pem).unwrap();
    let mut s = Serving::start(
        &[
            ("FEDMCP_TLS_CERT", &p(&chain)),
            ("FEDMCP_TLS_KEY", &p(&leaf_key)),
        ],
        dir.path("stderr.log"),
    );
    let port = s.ready_port("127.0.0.1");
    require_curl();
    let (code, body, err) = curl_healthz(port, &p(&ca_cert));
    assert_eq!(code, Some(0), "curl trusting only the CA failed: {err}");
    assert_eq!(body.trim(), r#"{"status":"ok"}"#);
}

#[test]
fn bad_tls_file_is_one_stderr_line_also_with_a_generated_secret() {
    // No FEDMCP_JWT_SECRET and a memory-only state dir: the proxy would make a random secret,
    // but a bad certificate must still end it with exactly one stderr line (§1).
    let dir = Scratch::new("gensecret");
    let (cert, _key) = make_pair(&dir, "one");
    let (_cert2, key2) = make_pair(&dir, "two");
    let mut cmd = command(&[("FEDMCP_TLS_CERT", &cert), ("FEDMCP_TLS_KEY", &key2)]);
    cmd.env_remove("FEDMCP_JWT_SECRET");
    let Exit {
        code,
        stdout,
        stderr,
    } = exit_of(cmd);
    assert_eq!(code, Some(2), "stderr {stderr:?}");
    assert_eq!(stdout, "");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one stderr line naming FEDMCP_TLS_KEY, got {stderr:?}"
    );
    assert!(lines[0].starts_with("FEDMCP_TLS_KEY:"), "{stderr:?}");
}
