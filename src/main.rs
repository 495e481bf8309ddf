//! The `fedmcp` binary: the command line's dispatch and usage texts, then configuration →
//! proxy → loop for `serve`. Nothing else lives here.
//!
//! `fedmcp` (or `fedmcp serve`) runs the proxy; `fedmcp token --server-id ID [--admin]
//! [--ttl SECS]` prints a token signed with the configured secret; `fedmcp mcp-stdio` is the
//! MCP stdio bridge (`bridge`); `servers`, `send`, `listen`, `put`, `get`, `ls` and `rm` are
//! the client commands for people (`cli`, with their own exit codes: 0 ok, 1 failed, 2 usage,
//! 3 unreachable, 4 token refused). `--help` on any command prints its usage on stdout (exit
//! 0); a bad argument or configuration ends the process with exit code 2 and one line on
//! stderr, before anything is started.

mod cli;

use fedmcp::audit::Audit;
use fedmcp::clock::now_secs;
use fedmcp::config::Config;
use fedmcp::io::proxy::Proxy;
use fedmcp::io::reactor::{self, Reactor};
use fedmcp::proto::jwt::{self, Claims, TokenType};
use std::io::Write;
use std::process::ExitCode;

const USAGE: &str = "usage: fedmcp [COMMAND] [ARGUMENTS]

The proxy:
  fedmcp [serve]                      run the proxy (configured by FEDMCP_* variables;
                                      fedmcp serve --help lists them)
  fedmcp token --server-id ID [--admin] [--ttl SECS]
                                      print a token signed with the proxy's secret
  fedmcp mcp-stdio [--url URL] [--token TOKEN]
                                      the MCP facade as a stdio MCP server, for MCP hosts

Clients of a running proxy (FEDMCP_URL, default http://127.0.0.1:8443, and FEDMCP_TOKEN,
or --url URL and --token TOKEN):
  fedmcp servers add ID [--control URL] [--data URL] [--capabilities JSON] [--print-token]
  fedmcp servers list [--json] | show ID | remove ID
                                      the registry (admin token)
  fedmcp send --to ID|'*' [--queue] [--ttl MS] [--timeout SECS] MESSAGE|-
                                      send a message and print the result
  fedmcp listen [--reply JSON | --exec CMD] [--count N] [--capabilities JSON]
                                      join as a member and print what is delivered
  fedmcp put NAME [FILE|-] [--readers ID,ID]
                                      store a resource
  fedmcp get OWNER/NAME [-o FILE]     fetch a resource
  fedmcp ls [--json]                  list the resources the token may read
  fedmcp rm OWNER/NAME                remove a resource

  fedmcp --version                    print the version
  fedmcp --help | help [COMMAND]      print this text, or a command's

Each command takes --help. The clients exit with 0 on success, 1 when the proxy answered
that the operation failed, 2 for a bad argument or variable, 3 when the proxy could not be
reached, 4 when it refused the token. Configuration: docs/CONFIGURATION.md.";

const SERVE_USAGE: &str = "usage: fedmcp [serve]

Runs the proxy in the foreground until SIGTERM or SIGINT (a graceful drain). It takes no
arguments: its configuration comes from FEDMCP_* environment variables, read once at start;
a bad value is one line on stderr naming the variable, and exit code 2, before it listens.
Once listening it prints one line on stdout: listening on http://HOST:PORT (or https://).
Every variable, with its accepted form and range, is in docs/CONFIGURATION.md; in brief
(defaults in brackets):
  listener   FEDMCP_LISTEN [127.0.0.1:8443; port 0 picks one], FEDMCP_TLS_CERT and
             FEDMCP_TLS_KEY [unset: plain], FEDMCP_ALLOW_PLAINTEXT [0]
  tokens     FEDMCP_JWT_SECRET or FEDMCP_JWT_SECRET_FILE [made and kept in the state dir],
             FEDMCP_JWT_PREVIOUS_SECRET, FEDMCP_TOKEN_TTL_SECS [86400],
             FEDMCP_CLOCK_SKEW_SECS [30], FEDMCP_MAX_REVOCATIONS [65536]
  state      FEDMCP_STATE_DIR [./fedmcp-data; empty: memory only]
  limits     FEDMCP_MAX_SERVERS [1024], FEDMCP_MAX_CONNECTIONS [4096],
             FEDMCP_MAX_MESSAGE_BYTES [1048576], FEDMCP_RATE_LIMIT [1000/s,burst=2000],
             FEDMCP_QUEUE_MAX_MESSAGES [10000], FEDMCP_QUEUE_MAX_BYTES [67108864]
  timing     FEDMCP_HANDSHAKE_TIMEOUT_MS [10000], FEDMCP_IDLE_TIMEOUT_MS [60000],
             FEDMCP_HEARTBEAT_MS [15000], FEDMCP_DELIVERY_TIMEOUT_MS [30000],
             FEDMCP_SHUTDOWN_GRACE_MS [5000]
  resources  FEDMCP_RESOURCE_MAX_BYTES [1 GiB], FEDMCP_RESOURCE_QUOTA_BYTES [10 GiB],
             FEDMCP_RESOURCE_QUOTA_PER_SERVER_BYTES [1 GiB]
  security   FEDMCP_REQUIRE_SIGNED [0], FEDMCP_TRUSTED_CA_FILE [the bundled web roots]
  logs       FEDMCP_AUDIT_LOG [stderr], RUST_LOG [info]
  cluster    FEDMCP_NATS_URL [unset: alone], FEDMCP_CLUSTER [fedmcp], FEDMCP_NODE_ID
             [made at first start], FEDMCP_NATS_REPLICAS [1]
Signals: SIGTERM or SIGINT drain and stop; SIGHUP reloads the TLS certificate and key.
Exit codes: 0 stopped; 1 the event loop failed; 2 a bad argument or configuration.";

const TOKEN_USAGE: &str = "usage: fedmcp token --server-id ID [--admin] [--ttl SECS]

Prints a token (an HS256 JWT with a random jti) for server ID, signed with the proxy's
secret: FEDMCP_JWT_SECRET, FEDMCP_JWT_SECRET_FILE, or the one kept in FEDMCP_STATE_DIR. It
talks to no proxy: it is for bootstrapping (an admin token) without the HTTP API.
  --server-id ID  1 to 64 of A-Z a-z 0-9 . _ : -, starting with a letter or digit, without __
  --admin         an admin token (default: a federation token)
  --ttl SECS      its lifetime, 60 to 31536000 and at most FEDMCP_TOKEN_TTL_SECS
                  (default FEDMCP_TOKEN_TTL_SECS, 86400 unless set)
  -h, --help      print this text
Exit codes: 0 printed; 2 a bad argument or variable (one line on stderr).";

/// The range of `fedmcp token --ttl`: that of `FEDMCP_TOKEN_TTL_SECS` (`config.rs`,
/// `TOKEN_TTL_SECS`: a minute to 365 days).
const TOKEN_TTL_RANGE: std::ops::RangeInclusive<u64> = 60..=31_536_000;

const MCP_STDIO_USAGE: &str = "usage: fedmcp mcp-stdio [--url URL] [--token TOKEN]\n\nRelays MCP (newline-delimited JSON-RPC) between stdin/stdout and the proxy's /mcp over\nWebSocket, so an MCP host can start the federation as a command. URL is the proxy's\n(http://, https://, ws:// or wss://; default path /mcp), TOKEN a federation or admin token.\nDefaults: FEDMCP_URL, FEDMCP_TOKEN. Exit codes: 0 when stdin ends, 2 for a bad URL or a\ntoken the proxy refuses.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => serve(),
        Some("serve") => match args.get(1).map(String::as_str) {
            None => serve(),
            Some("--help" | "-h") => {
                println!("{SERVE_USAGE}");
                ExitCode::SUCCESS
            }
            Some(other) => {
                eprintln!(
                    "fedmcp serve: unknown argument {other:?}; the proxy takes no arguments, only FEDMCP_* variables (see fedmcp serve --help)"
                );
                ExitCode::from(2)
            }
        },
        Some("token") => token(&args[1..]),
        Some("mcp-stdio") => mcp_stdio(&args[1..]),
        Some(cmd) if cli::COMMANDS.contains(&cmd) => ExitCode::from(cli::run(cmd, &args[1..])),
        Some("--help" | "-h" | "help") => match args.get(1).map(String::as_str) {
            None => {
                println!("{USAGE}");
                ExitCode::SUCCESS
            }
            Some(cmd) => match command_usage(cmd) {
                Some(u) => {
                    println!("{u}");
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("fedmcp help: unknown command {cmd:?}; see fedmcp --help");
                    ExitCode::from(2)
                }
            },
        },
        Some("--version" | "-V") => {
            println!("fedmcp {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("fedmcp: unknown command {other:?}; see fedmcp --help");
            ExitCode::from(2)
        }
    }
}

/// The usage text of any command, for `fedmcp help COMMAND`.
fn command_usage(cmd: &str) -> Option<&'static str> {
    match cmd {
        "serve" => Some(SERVE_USAGE),
        "token" => Some(TOKEN_USAGE),
        "mcp-stdio" => Some(MCP_STDIO_USAGE),
        other => cli::usage(other),
    }
}

fn config() -> Result<Config, ExitCode> {
    Config::from_env().map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// The signing secret: configured, or generated and kept in the state dir.
fn secret(cfg: &Config) -> Result<Vec<u8>, ExitCode> {
    if let Some(s) = &cfg.jwt_secret {
        return Ok(s.clone());
    }
    match &cfg.state_dir {
        Some(dir) => fedmcp::store::load_or_create_secret(dir).map_err(|e| {
            eprintln!("FEDMCP_STATE_DIR: cannot keep the generated secret in {}: {e}; expected a writable directory", dir.display());
            ExitCode::from(2)
        }),
        None => {
            let mut raw = [0u8; 32];
            if getrandom::fill(&mut raw).is_err() {
                eprintln!("FEDMCP_JWT_SECRET: no secret is set and the OS gave no randomness; expected a secret of at least 32 bytes");
                return Err(ExitCode::from(2));
            }
            Ok(fedmcp::random::hex(&raw).into_bytes())
        }
    }
}

fn serve() -> ExitCode {
    // A filter that would silently drop every line is a bad value like any other (§1).
    if let Err(e) = fedmcp::logging::init() {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    // A file-size limit (RLIMIT_FSIZE) must fail the write (and be reported, with nothing
    // acknowledged), not kill the process with SIGXFSZ.
    let _ = signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let cfg = match config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    // TLS first: a bad pair must end the start before anything is created or logged.
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => match fedmcp::io::tls::load(cert, key) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    // A configured CA file is checked now (exit 2 if bad); the bundled web roots cost
    // ~600 KiB of memory, so they are loaded only when a wss:// server is first dialled.
    let tls_client = match cfg.trusted_ca_file.as_deref() {
        Some(path) => match fedmcp::io::tls::client_config(Some(path)) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let secret = match secret(&cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let audit = match Audit::open(cfg.audit_log.as_deref()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "FEDMCP_AUDIT_LOG: cannot open for append: {e}; expected a writable file path"
            );
            return ExitCode::from(2);
        }
    };
    let listener = match reactor::bind(cfg.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "FEDMCP_LISTEN: cannot listen on {}: {e}; expected a free local address:port",
                cfg.listen
            );
            return ExitCode::from(2);
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("FEDMCP_LISTEN: {e}");
            return ExitCode::from(2);
        }
    };
    let mut reactor = match Reactor::new(listener) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fedmcp: cannot start the event loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let store = match cfg.state_dir.as_deref() {
        Some(dir) => match fedmcp::store::state::Store::open(dir) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!(
                    "FEDMCP_STATE_DIR: cannot open the state log in {}: {e}; expected a writable directory",
                    dir.display()
                );
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    // Resources live under the state dir; memory-only proxies keep them in a private
    // temporary directory (bodies never go to memory).
    let (blob_root, private_blobs) = match cfg.state_dir.as_deref() {
        Some(dir) => (dir.join("resources"), false),
        None => {
            // A fresh, unpredictable, private directory (created, never reused), removed at exit.
            let dir = std::env::temp_dir().join(format!(
                "fedmcp-resources-{}-{}",
                std::process::id(),
                fedmcp::random::hex(&fedmcp::random::random_bytes::<8>())
            ));
            let made = {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new().mode(0o700).create(&dir)
                }
                #[cfg(not(unix))]
                {
                    std::fs::create_dir(&dir)
                }
            };
            if let Err(e) = made {
                eprintln!(
                    "FEDMCP_STATE_DIR: cannot make a private resources directory {}: {e}; expected a writable temporary directory",
                    dir.display()
                );
                return ExitCode::from(2);
            }
            (dir, true)
        }
    };
    let blobs = match fedmcp::store::blobs::Blobs::open(&blob_root) {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "FEDMCP_STATE_DIR: cannot open the resources in {}: {e}; expected a writable directory",
                blob_root.display()
            );
            return ExitCode::from(2);
        }
    };
    // Cluster mode (§10): this proxy's name, the core's cluster state and the NATS link.
    let cluster = match cfg.cluster.as_ref() {
        None => None,
        Some(cc) => {
            let node = match (&cc.node_id, cfg.state_dir.as_deref()) {
                (Some(n), _) => n.clone(),
                (None, Some(dir)) => match fedmcp::store::load_or_create_node_id(dir) {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!(
                            "FEDMCP_NODE_ID: not set, and no node id could be kept in {}: {e}; expected 1 to 32 of A-Z a-z 0-9 - _",
                            dir.display()
                        );
                        return ExitCode::from(2);
                    }
                },
                (None, None) => format!(
                    "n{}",
                    fedmcp::random::hex(&fedmcp::random::random_bytes::<4>())
                ),
            };
            if cfg.jwt_secret.is_none() {
                log::warn!(
                    "cluster mode with a generated secret: proxies of a cluster must share FEDMCP_JWT_SECRET, or tokens of one are refused by the others"
                );
            }
            Some((cc.clone(), node))
        }
    };
    let trusted_ca = cfg.trusted_ca_file.clone();
    // Said once the start can no longer fail (one line per failed start, none of them this).
    let ephemeral_secret = cfg.jwt_secret.is_none() && cfg.state_dir.is_none();
    let max_message_bytes = cfg.max_message_bytes;
    let mut proxy = Proxy::new(cfg, secret, audit, fedmcp::clock::Now::read());
    if let Some((cc, node)) = cluster {
        log::info!(
            "cluster {} as node {node}: NATS at {}",
            cc.name,
            cc.urls
                .iter()
                .map(|u| u.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let now = proxy.fed.now.at;
        reactor.nats = Some(fedmcp::io::nats::NatsLink::new(
            &cc,
            &node,
            max_message_bytes,
            trusted_ca,
            now,
        ));
        proxy.fed.cluster = Some(fedmcp::federation::cluster::Cluster::new(
            cc.name.clone(),
            node,
            cc.replicas,
        ));
        proxy.fed.metrics.cluster = true;
        proxy.fed.metrics.cluster_nodes = 1;
    }
    proxy.fed.resources = blobs.1;
    proxy.blobs = Some(blobs.0);
    if let Some((store, replay)) = store {
        if let Err(e) = proxy.attach_store(store, reactor.waker()) {
            eprintln!("fedmcp: cannot start the disk thread: {e}");
            return ExitCode::FAILURE;
        }
        proxy.fed.restore(replay);
        proxy.apply();
    }
    proxy.tls = tls;
    proxy.tls_client = tls_client;
    if ephemeral_secret {
        log::warn!("no secret configured and no state dir: tokens will not survive a restart");
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {scheme}://{addr}");
        let _ = out.flush();
    }
    log::info!("fedmcp {} serving on {addr}", env!("CARGO_PKG_VERSION"));
    let result = reactor.run(&mut proxy);
    // What the last turns changed reaches the disk before the process ends.
    proxy.close_disk();
    if private_blobs {
        let _ = std::fs::remove_dir_all(&blob_root);
    }
    match result {
        Ok(()) => {
            proxy.fed.audit.flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn mcp_stdio(args: &[String]) -> ExitCode {
    let mut url = std::env::var("FEDMCP_URL").ok();
    let mut token = std::env::var("FEDMCP_TOKEN").ok();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--url" => url = it.next().cloned(),
            "--token" => token = it.next().cloned(),
            "--help" | "-h" => {
                println!("{MCP_STDIO_USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!(
                    "fedmcp mcp-stdio: unknown argument {other:?}; see fedmcp mcp-stdio --help"
                );
                return ExitCode::from(2);
            }
        }
    }
    match fedmcp::bridge::target(url, token) {
        Ok(t) => ExitCode::from(fedmcp::bridge::run(t)),
        Err(fedmcp::bridge::Usage(why)) => {
            eprintln!("{why}");
            ExitCode::from(2)
        }
    }
}

fn token(args: &[String]) -> ExitCode {
    let mut server_id = None;
    let mut admin = false;
    let mut ttl = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--server-id" => server_id = it.next().cloned(),
            "--admin" => admin = true,
            "--ttl" => match it
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| TOKEN_TTL_RANGE.contains(v))
            {
                Some(v) => ttl = Some(v),
                None => {
                    eprintln!(
                        "fedmcp token: --ttl takes a number of seconds from {} to {} (the range of FEDMCP_TOKEN_TTL_SECS)",
                        TOKEN_TTL_RANGE.start(),
                        TOKEN_TTL_RANGE.end()
                    );
                    return ExitCode::from(2);
                }
            },
            "--help" | "-h" => {
                println!("{TOKEN_USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("fedmcp token: unknown argument {other:?}; see fedmcp token --help");
                return ExitCode::from(2);
            }
        }
    }
    let Some(server_id) = server_id.filter(|s| jwt::valid_server_id(s)) else {
        eprintln!(
            "fedmcp token: --server-id takes 1 to 64 of A-Z a-z 0-9 . _ : -, starting with a letter or digit, without __"
        );
        return ExitCode::from(2);
    };
    let cfg = match config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cfg.jwt_secret.is_none() && cfg.state_dir.is_none() {
        eprintln!(
            "FEDMCP_JWT_SECRET: fedmcp token needs the proxy's secret; expected FEDMCP_JWT_SECRET, FEDMCP_JWT_SECRET_FILE or a state dir"
        );
        return ExitCode::from(2);
    }
    // A token outlives neither the proxy's own (FEDMCP_TOKEN_TTL_SECS): a revocation of an
    // id never seen in use is remembered that long (contract §2), so no token it could
    // cover may last longer.
    if let Some(t) = ttl
        && t > cfg.token_ttl_secs
    {
        eprintln!(
            "fedmcp token: --ttl {t} is over FEDMCP_TOKEN_TTL_SECS ({}); expected 1 to {} seconds",
            cfg.token_ttl_secs, cfg.token_ttl_secs
        );
        return ExitCode::from(2);
    }
    let secret = match secret(&cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let iat = now_secs();
    let claims = Claims {
        server_id,
        token_type: if admin {
            TokenType::Admin
        } else {
            TokenType::Federation
        },
        iat,
        exp: iat + ttl.unwrap_or(cfg.token_ttl_secs) as i64,
        nbf: None,
        jti: Some(jwt::new_jti()),
    };
    println!("{}", jwt::sign(&secret, &claims));
    ExitCode::SUCCESS
}
