//! The `fedmcp` binary: configuration → proxy → loop. Nothing else lives here.
//!
//! `fedmcp` (or `fedmcp serve`) runs the proxy; `fedmcp token --server-id ID [--admin]
//! [--ttl SECS]` prints a token signed with the configured secret; `fedmcp mcp-stdio` is the
//! MCP stdio bridge (`bridge`). A bad configuration ends
//! the process with exit code 2 and one line on stderr.

use fedmcp::audit::Audit;
use fedmcp::clock::now_secs;
use fedmcp::config::Config;
use fedmcp::io::proxy::Proxy;
use fedmcp::io::reactor::{self, Reactor};
use fedmcp::proto::jwt::{self, Claims, TokenType};
use std::io::Write;
use std::process::ExitCode;

const USAGE: &str = "usage: fedmcp [serve]\n       fedmcp token --server-id ID [--admin] [--ttl SECS]\n       fedmcp mcp-stdio [--url URL] [--token TOKEN]\n\nConfiguration comes from FEDMCP_* environment variables (see docs/CONFIGURATION.md).";

const MCP_STDIO_USAGE: &str = "usage: fedmcp mcp-stdio [--url URL] [--token TOKEN]\n\nRelays MCP (newline-delimited JSON-RPC) between stdin/stdout and the proxy's /mcp over\nWebSocket, so an MCP host can start the federation as a command. URL is the proxy's\n(http://, https://, ws:// or wss://; default path /mcp), TOKEN a federation or admin token.\nDefaults: FEDMCP_URL, FEDMCP_TOKEN. Exit codes: 0 when stdin ends, 2 for a bad URL or a\ntoken the proxy refuses.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("serve") => serve(),
        Some("token") => token(&args[1..]),
        Some("mcp-stdio") => mcp_stdio(&args[1..]),
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("--version" | "-V") => {
            println!("fedmcp {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("fedmcp: unknown command {other:?}\n{USAGE}");
            ExitCode::from(2)
        }
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
        proxy.attach_store(store);
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
                eprintln!("fedmcp mcp-stdio: unknown argument {other:?}\n{MCP_STDIO_USAGE}");
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
                .filter(|v| *v > 0)
            {
                Some(v) => ttl = Some(v),
                None => {
                    eprintln!("fedmcp token: --ttl takes a positive number of seconds");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("fedmcp token: unknown argument {other:?}\n{USAGE}");
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
