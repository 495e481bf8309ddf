//! Configuration: every `FEDMCP_*` environment variable (docs/PROTOCOL.md §1 and §6), parsed and
//! validated once at start into a [`Config`] that the rest of the proxy only reads.
//!
//! What this module owns:
//! - the names, defaults, accepted forms and ranges of the variables (written out for
//!   operators in `docs/CONFIGURATION.md`);
//! - the cross-checks between them: TLS certificate and key both or neither, one source of
//!   JWT secret, resource quota not below the largest resource, and the refusal of a plain
//!   listener on a non-loopback address without `FEDMCP_ALLOW_PLAINTEXT=1`;
//! - reading the secret file (at most [`MAX_SECRET_FILE_BYTES`]) and checking that the TLS and
//!   CA files can be opened, so that a bad path ends the process before it listens.
//!
//! Invariants:
//! - A [`Config`] that exists is valid: every number is inside its documented range and every
//!   secret is at least [`MIN_SECRET_BYTES`] long. Nothing downstream re-validates.
//! - The first problem found ends parsing with one [`ConfigError`], whose `Display` is one line
//!   `FEDMCP_X: <problem>; expected <accepted form>` (the caller exits with code 2).
//! - Unset means the default. The empty string is a value, and an invalid one for every
//!   variable except `FEDMCP_STATE_DIR`, where it means "memory only".
//! - Variables are read by name; unknown `FEDMCP_*` variables are ignored.
//!
//! What it must never do: print, log or format a secret (the value of `FEDMCP_JWT_SECRET`,
//! `FEDMCP_JWT_PREVIOUS_SECRET` or the contents of `FEDMCP_JWT_SECRET_FILE`) — not in an error,
//! not in `Debug`; create or write files (the state directory is the store's business); panic
//! on any value.

use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Shortest accepted JWT secret, in bytes (docs/PROTOCOL.md §1).
pub const MIN_SECRET_BYTES: usize = 32;

/// Largest secret file read, in bytes: a secret is tens of bytes, and a path pointing at the
/// wrong (large) file must not be read whole into memory.
pub const MAX_SECRET_FILE_BYTES: u64 = 65_536;

/// How many characters of a bad value an error quotes before cutting it short.
const QUOTE_MAX_CHARS: usize = 64;

/// The validated configuration. `Debug` shows secrets only as their length.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// `FEDMCP_LISTEN`; `localhost` is stored as 127.0.0.1.
    pub listen: SocketAddr,
    /// `FEDMCP_TLS_CERT`; `Some` exactly when `tls_key` is `Some`.
    pub tls_cert: Option<PathBuf>,
    /// `FEDMCP_TLS_KEY`.
    pub tls_key: Option<PathBuf>,
    /// `FEDMCP_ALLOW_PLAINTEXT`.
    pub allow_plaintext: bool,
    /// `FEDMCP_JWT_SECRET` (its bytes) or the contents of `FEDMCP_JWT_SECRET_FILE` (one
    /// trailing `\n` or `\r\n` stripped); `None`: generate one and keep it in the state dir.
    pub jwt_secret: Option<Vec<u8>>,
    /// `FEDMCP_JWT_PREVIOUS_SECRET`, also accepted when verifying (key rotation).
    pub jwt_previous_secret: Option<Vec<u8>>,
    /// `FEDMCP_STATE_DIR`; `None` (the empty string) means memory only.
    pub state_dir: Option<PathBuf>,
    /// `FEDMCP_MAX_SERVERS`.
    pub max_servers: usize,
    /// `FEDMCP_MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// `FEDMCP_MAX_MESSAGE_BYTES`.
    pub max_message_bytes: usize,
    /// `FEDMCP_RATE_LIMIT`, the `N` of `N/s`.
    pub rate_per_sec: u32,
    /// `FEDMCP_RATE_LIMIT`, the `M` of `burst=M` (`N` when absent).
    pub rate_burst: u32,
    /// `FEDMCP_HANDSHAKE_TIMEOUT_MS`.
    pub handshake_timeout: Duration,
    /// `FEDMCP_IDLE_TIMEOUT_MS`.
    pub idle_timeout: Duration,
    /// `FEDMCP_HEARTBEAT_MS`.
    pub heartbeat: Duration,
    /// `FEDMCP_DELIVERY_TIMEOUT_MS`.
    pub delivery_timeout: Duration,
    /// `FEDMCP_TOKEN_TTL_SECS`.
    pub token_ttl_secs: u64,
    /// `FEDMCP_CLOCK_SKEW_SECS`.
    pub clock_skew_secs: u64,
    /// `FEDMCP_QUEUE_MAX_MESSAGES`.
    pub queue_max_messages: usize,
    /// `FEDMCP_QUEUE_MAX_BYTES`: bytes held for one recipient (queued plus delivered and
    /// awaiting its answer).
    pub queue_max_bytes: usize,
    /// `FEDMCP_RESOURCE_MAX_BYTES`.
    pub resource_max_bytes: u64,
    /// `FEDMCP_RESOURCE_QUOTA_BYTES`; never below `resource_max_bytes`.
    pub resource_quota_bytes: u64,
    /// `FEDMCP_RESOURCE_QUOTA_PER_SERVER_BYTES`: the resources of one owner together.
    pub resource_quota_per_server_bytes: u64,
    /// `FEDMCP_MAX_REVOCATIONS`: revoked `jti`s remembered at once.
    pub max_revocations: usize,
    /// `FEDMCP_TRUSTED_CA_FILE`; `None`: the bundled web roots.
    pub trusted_ca_file: Option<PathBuf>,
    /// `FEDMCP_AUDIT_LOG`; `None`: stderr, log target `audit`.
    pub audit_log: Option<PathBuf>,
    /// `FEDMCP_SHUTDOWN_GRACE_MS`.
    pub shutdown_grace: Duration,
    /// `FEDMCP_REQUIRE_SIGNED` (docs/PROTOCOL.md §6).
    pub require_signed: bool,
    /// Cluster mode (docs/PROTOCOL.md §10): `Some` exactly when `FEDMCP_NATS_URL` is set.
    pub cluster: Option<ClusterConfig>,
}

/// The cluster's settings (§10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `FEDMCP_NATS_URL`, in order (never logged whole: it may hold a credential).
    pub urls: Vec<NatsUrl>,
    /// `FEDMCP_CLUSTER`: prefixes every subject, stream and bucket.
    pub name: String,
    /// `FEDMCP_NODE_ID`; `None`: made at first start and kept in the state dir.
    pub node_id: Option<String>,
    /// `FEDMCP_NATS_REPLICAS`.
    pub replicas: u32,
}

/// One NATS server address of `FEDMCP_NATS_URL`.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsUrl {
    /// `tls://`: verified against `FEDMCP_TRUSTED_CA_FILE` or the bundled roots.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `user:password@`.
    pub user: Option<(String, String)>,
    /// `token@`.
    pub token: Option<String>,
}

impl fmt::Debug for NatsUrl {
    /// Never shows a credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for NatsUrl {
    /// The URL without its credential (for logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "tls" } else { "nats" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// The NATS client port when a URL names none.
pub const NATS_DEFAULT_PORT: u16 = 4222;

/// Parses one URL of `FEDMCP_NATS_URL` (also a server's `connect_urls` entry, which has no
/// scheme: `host:port`, taking `tls` from the list it came from).
pub fn parse_nats_url(s: &str) -> Result<NatsUrl, String> {
    let s = s.trim();
    let (tls, rest) = if let Some(r) = s.strip_prefix("nats://") {
        (false, r)
    } else if let Some(r) = s.strip_prefix("tls://") {
        (true, r)
    } else {
        return Err(format!(
            "{} does not start with nats:// or tls://",
            quote(s)
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (host, port) = split_host_port(hostport).ok_or_else(|| {
        "a NATS URL needs a host and an optional port from 1 to 65535".to_string()
    })?;
    let (mut user, mut token) = (None, None);
    match userinfo {
        None => {}
        Some("") => return Err("the credential before @ is empty".to_string()),
        Some(u) => match u.split_once(':') {
            Some((name, pass)) => user = Some((name.to_string(), pass.to_string())),
            None => token = Some(u.to_string()),
        },
    }
    Ok(NatsUrl {
        tls,
        host,
        port,
        user,
        token,
    })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; the host a name or an address without
/// spaces, `/`, `?` or `#`.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(r) = s.strip_prefix('[') {
        let (h, after) = r.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    let port = match port {
        None => NATS_DEFAULT_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0)?,
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    ok.then_some((host, port))
}

/// A cluster or node name: it becomes a subject token and part of stream names.
fn valid_cluster_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One bad variable. `Display` is the single stderr line of docs/PROTOCOL.md §1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The variable's name, e.g. `FEDMCP_LISTEN`.
    pub var: &'static str,
    /// What is wrong; quotes the value, except for secrets.
    pub problem: String,
    /// The accepted form.
    pub expected: &'static str,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values are quoted with escapes already; this also keeps an OS error text on one line.
        let problem: String = self
            .problem
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        write!(f, "{}: {}; expected {}", self.var, problem, self.expected)
    }
}

impl std::error::Error for ConfigError {}

/// A variable's name and the accepted form quoted in its errors.
struct Var {
    name: &'static str,
    expected: &'static str,
}

/// A decimal integer variable with its default and inclusive range.
struct IntVar {
    name: &'static str,
    default: u64,
    min: u64,
    max: u64,
    expected: &'static str,
}

impl IntVar {
    const fn var(&self) -> Var {
        Var {
            name: self.name,
            expected: self.expected,
        }
    }
}

const LISTEN: Var = Var {
    name: "FEDMCP_LISTEN",
    expected: "HOST:PORT with HOST an IPv4 literal, a bracketed IPv6 literal or localhost and PORT 0-65535, e.g. 127.0.0.1:8443 or [::]:8443",
};
const TLS_CERT: Var = Var {
    name: "FEDMCP_TLS_CERT",
    expected: "the path of a readable PEM certificate chain file, set together with FEDMCP_TLS_KEY",
};
const TLS_KEY: Var = Var {
    name: "FEDMCP_TLS_KEY",
    expected: "the path of a readable PEM private key file, set together with FEDMCP_TLS_CERT",
};
const ALLOW_PLAINTEXT: Var = Var {
    name: "FEDMCP_ALLOW_PLAINTEXT",
    expected: "0 or 1 (true or false also accepted)",
};
const JWT_SECRET: Var = Var {
    name: "FEDMCP_JWT_SECRET",
    expected: "a secret of at least 32 bytes, not together with FEDMCP_JWT_SECRET_FILE (unset both to have one generated)",
};
const JWT_SECRET_FILE: Var = Var {
    name: "FEDMCP_JWT_SECRET_FILE",
    expected: "the path of a readable file of at most 65536 bytes holding a secret of at least 32 bytes (one trailing newline is ignored), not together with FEDMCP_JWT_SECRET",
};
const JWT_PREVIOUS_SECRET: Var = Var {
    name: "FEDMCP_JWT_PREVIOUS_SECRET",
    expected: "the previous secret, at least 32 bytes",
};
const STATE_DIR: Var = Var {
    name: "FEDMCP_STATE_DIR",
    expected: "a directory path, or the empty string for memory only",
};
const MAX_SERVERS: IntVar = IntVar {
    name: "FEDMCP_MAX_SERVERS",
    default: 1024,
    min: 1,
    max: 1_000_000,
    expected: "a decimal integer from 1 to 1000000",
};
const MAX_CONNECTIONS: IntVar = IntVar {
    name: "FEDMCP_MAX_CONNECTIONS",
    default: 4096,
    min: 1,
    max: 1_000_000,
    expected: "a decimal integer from 1 to 1000000",
};
const MAX_MESSAGE_BYTES: IntVar = IntVar {
    name: "FEDMCP_MAX_MESSAGE_BYTES",
    default: 1_048_576,
    min: 1024,
    max: 67_108_864,
    expected: "a decimal integer from 1024 to 67108864 (64 MiB)",
};
const RATE_LIMIT: Var = Var {
    name: "FEDMCP_RATE_LIMIT",
    expected: "N/s or N/s,burst=M with N from 1 to 1000000 and M from 1 to 10000000, e.g. 1000/s,burst=2000",
};
const HANDSHAKE_TIMEOUT_MS: IntVar = IntVar {
    name: "FEDMCP_HANDSHAKE_TIMEOUT_MS",
    default: 10_000,
    min: 1,
    max: DAY_MS,
    expected: "a decimal number of milliseconds from 1 to 86400000 (one day)",
};
const IDLE_TIMEOUT_MS: IntVar = IntVar {
    name: "FEDMCP_IDLE_TIMEOUT_MS",
    default: 60_000,
    min: 1,
    max: DAY_MS,
    expected: "a decimal number of milliseconds from 1 to 86400000 (one day)",
};
const HEARTBEAT_MS: IntVar = IntVar {
    name: "FEDMCP_HEARTBEAT_MS",
    default: 15_000,
    min: 100,
    max: DAY_MS,
    expected: "a decimal number of milliseconds from 100 to 86400000 (one day)",
};
const DELIVERY_TIMEOUT_MS: IntVar = IntVar {
    name: "FEDMCP_DELIVERY_TIMEOUT_MS",
    default: 30_000,
    min: 1,
    max: DAY_MS,
    expected: "a decimal number of milliseconds from 1 to 86400000 (one day)",
};
const TOKEN_TTL_SECS: IntVar = IntVar {
    name: "FEDMCP_TOKEN_TTL_SECS",
    default: 86_400,
    min: 60,
    max: 31_536_000,
    expected: "a decimal number of seconds from 60 to 31536000 (365 days)",
};
const CLOCK_SKEW_SECS: IntVar = IntVar {
    name: "FEDMCP_CLOCK_SKEW_SECS",
    default: 30,
    min: 0,
    max: 3600,
    expected: "a decimal number of seconds from 0 to 3600",
};
const QUEUE_MAX_MESSAGES: IntVar = IntVar {
    name: "FEDMCP_QUEUE_MAX_MESSAGES",
    default: 10_000,
    min: 1,
    max: 10_000_000,
    expected: "a decimal integer from 1 to 10000000",
};
const QUEUE_MAX_BYTES: IntVar = IntVar {
    name: "FEDMCP_QUEUE_MAX_BYTES",
    default: 67_108_864,
    min: 1024,
    max: TIB,
    expected: "a decimal number of bytes from 1024 to 1099511627776 (1 TiB)",
};
const RESOURCE_QUOTA_PER_SERVER_BYTES: IntVar = IntVar {
    name: "FEDMCP_RESOURCE_QUOTA_PER_SERVER_BYTES",
    default: 1_073_741_824,
    min: 1,
    max: PIB,
    expected: "a decimal number of bytes from 1 to 1125899906842624 (1 PiB)",
};
const MAX_REVOCATIONS: IntVar = IntVar {
    name: "FEDMCP_MAX_REVOCATIONS",
    default: 65_536,
    min: 1,
    max: 10_000_000,
    expected: "a decimal integer from 1 to 10000000",
};
const RESOURCE_MAX_BYTES: IntVar = IntVar {
    name: "FEDMCP_RESOURCE_MAX_BYTES",
    default: 1_073_741_824,
    min: 1,
    max: TIB,
    expected: "a decimal number of bytes from 1 to 1099511627776 (1 TiB), not above FEDMCP_RESOURCE_QUOTA_BYTES",
};
const RESOURCE_QUOTA_BYTES: IntVar = IntVar {
    name: "FEDMCP_RESOURCE_QUOTA_BYTES",
    default: 10_737_418_240,
    min: 1,
    max: PIB,
    expected: "a decimal number of bytes from 1 to 1125899906842624 (1 PiB), not below FEDMCP_RESOURCE_MAX_BYTES",
};
const TRUSTED_CA_FILE: Var = Var {
    name: "FEDMCP_TRUSTED_CA_FILE",
    expected: "the path of a readable PEM file of CA certificates",
};
const AUDIT_LOG: Var = Var {
    name: "FEDMCP_AUDIT_LOG",
    expected: "the path of a file to append JSON lines to",
};
const SHUTDOWN_GRACE_MS: IntVar = IntVar {
    name: "FEDMCP_SHUTDOWN_GRACE_MS",
    default: 5000,
    min: 0,
    max: DAY_MS,
    expected: "a decimal number of milliseconds from 0 to 86400000 (one day)",
};
const REQUIRE_SIGNED: Var = Var {
    name: "FEDMCP_REQUIRE_SIGNED",
    expected: "0 or 1 (true or false also accepted)",
};

const NATS_URL: Var = Var {
    name: "FEDMCP_NATS_URL",
    expected: "comma-separated nats://[user:password@|token@]host[:port] or tls://... URLs",
};
const CLUSTER: Var = Var {
    name: "FEDMCP_CLUSTER",
    expected: "1 to 32 of A-Z a-z 0-9 - _",
};
const NODE_ID: Var = Var {
    name: "FEDMCP_NODE_ID",
    expected: "1 to 32 of A-Z a-z 0-9 - _",
};
const NATS_REPLICAS: IntVar = IntVar {
    name: "FEDMCP_NATS_REPLICAS",
    default: 1,
    min: 1,
    max: 5,
    expected: "a decimal integer from 1 to 5 (JetStream's limit)",
};
/// The most URLs `FEDMCP_NATS_URL` may list.
const NATS_MAX_URLS: usize = 32;
/// The cluster name when `FEDMCP_CLUSTER` is unset.
pub const DEFAULT_CLUSTER: &str = "fedmcp";

const DAY_MS: u64 = 86_400_000;
const TIB: u64 = 1 << 40;
const PIB: u64 = 1 << 50;

const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8443);
const DEFAULT_STATE_DIR: &str = "./fedmcp-data";
const DEFAULT_RATE_PER_SEC: u32 = 1000;
const DEFAULT_RATE_BURST: u32 = 2000;
const RATE_MAX_PER_SEC: u64 = 1_000_000;
const RATE_MAX_BURST: u64 = 10_000_000;

/// The accepted form quoted when a plain listener is refused.
const PLAINTEXT_EXPECTED: &str = "a loopback address (127.0.0.0/8, [::1] or localhost), or FEDMCP_TLS_CERT and FEDMCP_TLS_KEY, or FEDMCP_ALLOW_PLAINTEXT=1";

/// Every variable read, in the order they are checked: what `from_env` looks up.
const VARIABLES: [&Var; 27] = [
    &LISTEN,
    &TLS_CERT,
    &TLS_KEY,
    &ALLOW_PLAINTEXT,
    &JWT_SECRET,
    &JWT_SECRET_FILE,
    &JWT_PREVIOUS_SECRET,
    &STATE_DIR,
    &MAX_SERVERS.var(),
    &MAX_CONNECTIONS.var(),
    &MAX_MESSAGE_BYTES.var(),
    &RATE_LIMIT,
    &HANDSHAKE_TIMEOUT_MS.var(),
    &IDLE_TIMEOUT_MS.var(),
    &HEARTBEAT_MS.var(),
    &DELIVERY_TIMEOUT_MS.var(),
    &TOKEN_TTL_SECS.var(),
    &CLOCK_SKEW_SECS.var(),
    &QUEUE_MAX_MESSAGES.var(),
    &QUEUE_MAX_BYTES.var(),
    &RESOURCE_MAX_BYTES.var(),
    &RESOURCE_QUOTA_BYTES.var(),
    &RESOURCE_QUOTA_PER_SERVER_BYTES.var(),
    &MAX_REVOCATIONS.var(),
    &TRUSTED_CA_FILE,
    &AUDIT_LOG,
    &SHUTDOWN_GRACE_MS.var(),
];

/// `FEDMCP_REQUIRE_SIGNED` is looked up too; kept apart so the table above matches §1.
const EXTRA_VARIABLES: [&Var; 5] = [
    &REQUIRE_SIGNED,
    &NATS_URL,
    &CLUSTER,
    &NODE_ID,
    &NATS_REPLICAS.var(),
];

impl Config {
    /// Reads the process environment (`std::env::var_os`). A value that is not UTF-8 is an
    /// error naming its variable.
    pub fn from_env() -> Result<Config, ConfigError> {
        let mut values: Vec<(&'static str, String)> = Vec::new();
        for var in VARIABLES.iter().chain(EXTRA_VARIABLES.iter()) {
            if let Some(os) = std::env::var_os(var.name) {
                match os.into_string() {
                    Ok(s) => values.push((var.name, s)),
                    Err(_) => return Err(err(var, "the value is not valid UTF-8".to_string())),
                }
            }
        }
        Config::from_lookup(|name| {
            values
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        })
    }

    /// Parses and validates from `get` (name → value, `None` when unset). For tests, and
    /// the engine of [`Config::from_env`]. Reads the secret file and opens the TLS and CA
    /// files named, nothing else.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |var: &Var| get(var.name);

        let listen = match get(&LISTEN) {
            None => DEFAULT_LISTEN,
            Some(v) => parse_listen(&v).map_err(|p| err(&LISTEN, p))?,
        };

        let tls_cert = get(&TLS_CERT);
        let tls_key = get(&TLS_KEY);
        // An empty value is that variable's mistake, whatever the other one says.
        for (var, v) in [(&TLS_CERT, &tls_cert), (&TLS_KEY, &tls_key)] {
            if v.as_deref() == Some("") {
                return Err(err(var, "the value is empty".to_string()));
            }
        }
        let (tls_cert, tls_key) = match (tls_cert, tls_key) {
            (None, None) => (None, None),
            (Some(_), None) => {
                return Err(err(&TLS_KEY, "not set, but FEDMCP_TLS_CERT is".to_string()));
            }
            (None, Some(_)) => {
                return Err(err(&TLS_CERT, "not set, but FEDMCP_TLS_KEY is".to_string()));
            }
            (Some(cert), Some(key)) => (
                Some(readable_file(&TLS_CERT, &cert)?),
                Some(readable_file(&TLS_KEY, &key)?),
            ),
        };

        let allow_plaintext = bool_var(&ALLOW_PLAINTEXT, get(&ALLOW_PLAINTEXT))?;
        if tls_cert.is_none() && !allow_plaintext && !is_loopback(listen.ip()) {
            return Err(ConfigError {
                var: LISTEN.name,
                problem: format!(
                    "a plain listener on the non-loopback address {listen} needs TLS \
                     (FEDMCP_TLS_CERT and FEDMCP_TLS_KEY) or FEDMCP_ALLOW_PLAINTEXT=1"
                ),
                expected: PLAINTEXT_EXPECTED,
            });
        }

        let jwt_secret = match (get(&JWT_SECRET), get(&JWT_SECRET_FILE)) {
            (Some(_), Some(_)) => {
                return Err(err(
                    &JWT_SECRET_FILE,
                    "set together with FEDMCP_JWT_SECRET; set only one of them".to_string(),
                ));
            }
            (Some(secret), None) => Some(secret_value(&JWT_SECRET, secret.into_bytes())?),
            (None, Some(path)) => Some(read_secret_file(&path)?),
            (None, None) => None,
        };
        let jwt_previous_secret = match get(&JWT_PREVIOUS_SECRET) {
            None => None,
            Some(secret) => Some(secret_value(&JWT_PREVIOUS_SECRET, secret.into_bytes())?),
        };

        let state_dir = match get(&STATE_DIR) {
            None => Some(PathBuf::from(DEFAULT_STATE_DIR)),
            Some(v) if v.is_empty() => None,
            Some(v) => Some(PathBuf::from(v)),
        };

        let max_servers = int_usize(&MAX_SERVERS, get(&MAX_SERVERS.var()))?;
        let max_connections = int_usize(&MAX_CONNECTIONS, get(&MAX_CONNECTIONS.var()))?;
        let max_message_bytes = int_usize(&MAX_MESSAGE_BYTES, get(&MAX_MESSAGE_BYTES.var()))?;

        let (rate_per_sec, rate_burst) = match get(&RATE_LIMIT) {
            None => (DEFAULT_RATE_PER_SEC, DEFAULT_RATE_BURST),
            Some(v) => parse_rate(&v).map_err(|p| err(&RATE_LIMIT, p))?,
        };

        let handshake_timeout = millis(&HANDSHAKE_TIMEOUT_MS, get(&HANDSHAKE_TIMEOUT_MS.var()))?;
        let idle_timeout = millis(&IDLE_TIMEOUT_MS, get(&IDLE_TIMEOUT_MS.var()))?;
        let heartbeat = millis(&HEARTBEAT_MS, get(&HEARTBEAT_MS.var()))?;
        let delivery_timeout = millis(&DELIVERY_TIMEOUT_MS, get(&DELIVERY_TIMEOUT_MS.var()))?;
        let token_ttl_secs = int_var(&TOKEN_TTL_SECS, get(&TOKEN_TTL_SECS.var()))?;
        let clock_skew_secs = int_var(&CLOCK_SKEW_SECS, get(&CLOCK_SKEW_SECS.var()))?;
        let queue_max_messages = int_usize(&QUEUE_MAX_MESSAGES, get(&QUEUE_MAX_MESSAGES.var()))?;
        let queue_max_bytes = int_usize(&QUEUE_MAX_BYTES, get(&QUEUE_MAX_BYTES.var()))?;

        let max_raw = get(&RESOURCE_MAX_BYTES.var());
        let quota_raw = get(&RESOURCE_QUOTA_BYTES.var());
        let quota_was_set = quota_raw.is_some();
        let resource_max_bytes = int_var(&RESOURCE_MAX_BYTES, max_raw)?;
        let resource_quota_bytes = int_var(&RESOURCE_QUOTA_BYTES, quota_raw)?;
        if resource_quota_bytes < resource_max_bytes {
            // Name the variable the operator set: the other one is at its default.
            return Err(if quota_was_set {
                err(
                    &RESOURCE_QUOTA_BYTES.var(),
                    format!(
                        "{resource_quota_bytes} is below FEDMCP_RESOURCE_MAX_BYTES ({resource_max_bytes})"
                    ),
                )
            } else {
                err(
                    &RESOURCE_MAX_BYTES.var(),
                    format!(
                        "{resource_max_bytes} is above FEDMCP_RESOURCE_QUOTA_BYTES \
                         ({resource_quota_bytes}, its default)"
                    ),
                )
            });
        }

        let resource_quota_per_server_bytes = int_var(
            &RESOURCE_QUOTA_PER_SERVER_BYTES,
            get(&RESOURCE_QUOTA_PER_SERVER_BYTES.var()),
        )?;
        let max_revocations = int_usize(&MAX_REVOCATIONS, get(&MAX_REVOCATIONS.var()))?;

        let trusted_ca_file = match get(&TRUSTED_CA_FILE) {
            None => None,
            Some(v) => Some(readable_file(&TRUSTED_CA_FILE, &v)?),
        };
        let audit_log = match get(&AUDIT_LOG) {
            None => None,
            Some(v) if v.is_empty() => {
                return Err(err(&AUDIT_LOG, "the value is empty".to_string()));
            }
            Some(v) => Some(PathBuf::from(v)),
        };
        let shutdown_grace = millis(&SHUTDOWN_GRACE_MS, get(&SHUTDOWN_GRACE_MS.var()))?;
        let require_signed = bool_var(&REQUIRE_SIGNED, get(&REQUIRE_SIGNED))?;
        let cluster = cluster_config(&get)?;

        Ok(Config {
            listen,
            tls_cert,
            tls_key,
            allow_plaintext,
            jwt_secret,
            jwt_previous_secret,
            state_dir,
            max_servers,
            max_connections,
            max_message_bytes,
            rate_per_sec,
            rate_burst,
            handshake_timeout,
            idle_timeout,
            heartbeat,
            delivery_timeout,
            token_ttl_secs,
            clock_skew_secs,
            queue_max_messages,
            queue_max_bytes,
            resource_max_bytes,
            resource_quota_bytes,
            resource_quota_per_server_bytes,
            max_revocations,
            trusted_ca_file,
            audit_log,
            shutdown_grace,
            require_signed,
            cluster,
        })
    }

    /// Every default, except: no state dir (memory only) and a fixed 32-byte secret, so
    /// tests need neither a disk nor randomness.
    pub fn default_for_tests() -> Config {
        Config {
            listen: DEFAULT_LISTEN,
            tls_cert: None,
            tls_key: None,
            allow_plaintext: false,
            jwt_secret: Some(b"fedmcp-test-secret-not-for-prod!".to_vec()),
            jwt_previous_secret: None,
            state_dir: None,
            max_servers: MAX_SERVERS.default as usize,
            max_connections: MAX_CONNECTIONS.default as usize,
            max_message_bytes: MAX_MESSAGE_BYTES.default as usize,
            rate_per_sec: DEFAULT_RATE_PER_SEC,
            rate_burst: DEFAULT_RATE_BURST,
            handshake_timeout: Duration::from_millis(HANDSHAKE_TIMEOUT_MS.default),
            idle_timeout: Duration::from_millis(IDLE_TIMEOUT_MS.default),
            heartbeat: Duration::from_millis(HEARTBEAT_MS.default),
            delivery_timeout: Duration::from_millis(DELIVERY_TIMEOUT_MS.default),
            token_ttl_secs: TOKEN_TTL_SECS.default,
            clock_skew_secs: CLOCK_SKEW_SECS.default,
            queue_max_messages: QUEUE_MAX_MESSAGES.default as usize,
            resource_max_bytes: RESOURCE_MAX_BYTES.default,
            resource_quota_bytes: RESOURCE_QUOTA_BYTES.default,
            queue_max_bytes: QUEUE_MAX_BYTES.default as usize,
            resource_quota_per_server_bytes: RESOURCE_QUOTA_PER_SERVER_BYTES.default,
            max_revocations: MAX_REVOCATIONS.default as usize,
            trusted_ca_file: None,
            audit_log: None,
            shutdown_grace: Duration::from_millis(SHUTDOWN_GRACE_MS.default),
            require_signed: false,
            cluster: None,
        }
    }

    /// True when the listener speaks TLS.
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |s: &Option<Vec<u8>>| match s {
            None => "None".to_string(),
            Some(s) => format!("Some(<redacted, {} bytes>)", s.len()),
        };
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("allow_plaintext", &self.allow_plaintext)
            .field(
                "jwt_secret",
                &format_args!("{}", redacted(&self.jwt_secret)),
            )
            .field(
                "jwt_previous_secret",
                &format_args!("{}", redacted(&self.jwt_previous_secret)),
            )
            .field("state_dir", &self.state_dir)
            .field("max_servers", &self.max_servers)
            .field("max_connections", &self.max_connections)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("rate_per_sec", &self.rate_per_sec)
            .field("rate_burst", &self.rate_burst)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("token_ttl_secs", &self.token_ttl_secs)
            .field("clock_skew_secs", &self.clock_skew_secs)
            .field("queue_max_messages", &self.queue_max_messages)
            .field("resource_max_bytes", &self.resource_max_bytes)
            .field("resource_quota_bytes", &self.resource_quota_bytes)
            .field("queue_max_bytes", &self.queue_max_bytes)
            .field(
                "resource_quota_per_server_bytes",
                &self.resource_quota_per_server_bytes,
            )
            .field("max_revocations", &self.max_revocations)
            .field("trusted_ca_file", &self.trusted_ca_file)
            .field("audit_log", &self.audit_log)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("require_signed", &self.require_signed)
            .field("cluster", &self.cluster)
            .finish()
    }
}

fn err(var: &Var, problem: String) -> ConfigError {
    ConfigError {
        var: var.name,
        problem,
        expected: var.expected,
    }
}

/// `FEDMCP_NATS_URL` and the variables that only mean something with it (§10).
fn cluster_config(
    get: &impl Fn(&Var) -> Option<String>,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let name = match get(&CLUSTER) {
        None => DEFAULT_CLUSTER.to_string(),
        Some(v) if valid_cluster_name(&v) => v,
        Some(v) => return Err(err(&CLUSTER, format!("{} is not a valid name", quote(&v)))),
    };
    let node_id = match get(&NODE_ID) {
        None => None,
        Some(v) if valid_cluster_name(&v) => Some(v),
        Some(v) => return Err(err(&NODE_ID, format!("{} is not a valid name", quote(&v)))),
    };
    let replicas = int_var(&NATS_REPLICAS, get(&NATS_REPLICAS.var()))? as u32;
    let Some(list) = get(&NATS_URL) else {
        return Ok(None);
    };
    let mut urls = Vec::new();
    for part in list.split(',') {
        // The problem never quotes the value: it may hold a password or a token.
        let u = parse_nats_url(part).map_err(|p| {
            let p = if p.contains("does not start") {
                "a URL does not start with nats:// or tls://".to_string()
            } else {
                p
            };
            err(&NATS_URL, p)
        })?;
        urls.push(u);
    }
    if urls.len() > NATS_MAX_URLS {
        return Err(err(&NATS_URL, format!("more than {NATS_MAX_URLS} URLs")));
    }
    Ok(Some(ClusterConfig {
        urls,
        name,
        node_id,
        replicas,
    }))
}

/// The value for an error message: escaped (so it stays on one line), quoted, cut short.
fn quote(v: &str) -> String {
    let mut cut: String = v.chars().take(QUOTE_MAX_CHARS).collect();
    if cut.len() < v.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

/// Plain decimal: ASCII digits only, no sign, spaces or separators (leading zeros are fine).
fn parse_decimal(v: &str) -> Result<u64, String> {
    if v.is_empty() {
        return Err("the value is empty".to_string());
    }
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{} is not a plain decimal integer", quote(v)));
    }
    v.parse::<u64>()
        .map_err(|_| format!("{} is too large", quote(v)))
}

fn int_in_range(v: &str, min: u64, max: u64) -> Result<u64, String> {
    let n = parse_decimal(v)?;
    if n < min {
        Err(format!("{} is below the minimum of {min}", quote(v)))
    } else if n > max {
        Err(format!("{} is above the maximum of {max}", quote(v)))
    } else {
        Ok(n)
    }
}

fn int_var(spec: &IntVar, raw: Option<String>) -> Result<u64, ConfigError> {
    match raw {
        None => Ok(spec.default),
        Some(v) => int_in_range(&v, spec.min, spec.max).map_err(|p| err(&spec.var(), p)),
    }
}

fn int_usize(spec: &IntVar, raw: Option<String>) -> Result<usize, ConfigError> {
    let n = int_var(spec, raw)?;
    usize::try_from(n).map_err(|_| err(&spec.var(), format!("{n} is too large for this platform")))
}

fn millis(spec: &IntVar, raw: Option<String>) -> Result<Duration, ConfigError> {
    int_var(spec, raw).map(Duration::from_millis)
}

/// `0`/`1`, or `false`/`true` in any ASCII case.
fn bool_var(var: &Var, raw: Option<String>) -> Result<bool, ConfigError> {
    match raw.as_deref() {
        None => Ok(false),
        Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(err(var, format!("{} is not 0 or 1", quote(v)))),
    }
}

/// `IPv4:PORT`, `[IPv6]:PORT` or `localhost:PORT` (→ 127.0.0.1). Names are not resolved.
fn parse_listen(v: &str) -> Result<SocketAddr, String> {
    if v.is_empty() {
        return Err("the value is empty".to_string());
    }
    let Some((host, port)) = v.rsplit_once(':') else {
        return Err(format!("{} has no :PORT", quote(v)));
    };
    let port = match parse_decimal(port) {
        Ok(p) => u16::try_from(p).map_err(|_| format!("{} has a port above 65535", quote(v)))?,
        Err(_) => return Err(format!("{} has no valid port", quote(v))),
    };
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        IpAddr::V6(
            inner
                .parse::<Ipv6Addr>()
                .map_err(|_| format!("{} has an invalid IPv6 address", quote(v)))?,
        )
    } else if let Ok(ip4) = host.parse::<Ipv4Addr>() {
        IpAddr::V4(ip4)
    } else if host.contains(':') {
        return Err(format!(
            "{} is not HOST:PORT (an IPv6 address goes in brackets, e.g. [::1]:8443)",
            quote(v)
        ));
    } else {
        return Err(format!(
            "{} does not start with an IP address or localhost (host names are not resolved)",
            quote(v)
        ));
    };
    Ok(SocketAddr::new(ip, port))
}

/// 127.0.0.0/8, ::1, and ::ffff:127.0.0.0/104 (IPv4-mapped loopback).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `N/s` or `N/s,burst=M`; without `burst`, the burst is `N`.
fn parse_rate(v: &str) -> Result<(u32, u32), String> {
    if v.is_empty() {
        return Err("the value is empty".to_string());
    }
    let (rate, burst) = match v.split_once(',') {
        Some((rate, burst)) => (rate, Some(burst)),
        None => (v, None),
    };
    let Some(n) = rate.strip_suffix("/s") else {
        return Err(format!("{} does not start with N/s", quote(v)));
    };
    let n =
        int_in_range(n, 1, RATE_MAX_PER_SEC).map_err(|p| format!("rate in {}: {p}", quote(v)))?;
    let m = match burst {
        None => n,
        Some(b) => {
            let Some(m) = b.strip_prefix("burst=") else {
                return Err(format!("{} has no burst=M after the comma", quote(v)));
            };
            int_in_range(m, 1, RATE_MAX_BURST).map_err(|p| format!("burst in {}: {p}", quote(v)))?
        }
    };
    // Both maxima are far below u32::MAX.
    match (u32::try_from(n), u32::try_from(m)) {
        (Ok(n), Ok(m)) => Ok((n, m)),
        _ => Err(format!("{} is out of range", quote(v))),
    }
}

/// A secret's bytes, at least [`MIN_SECRET_BYTES`]. The problem never shows the secret, nor
/// its length.
fn secret_value(var: &Var, bytes: Vec<u8>) -> Result<Vec<u8>, ConfigError> {
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(err(
            var,
            format!("the secret is shorter than {MIN_SECRET_BYTES} bytes (value not shown)"),
        ));
    }
    Ok(bytes)
}

/// Reads at most [`MAX_SECRET_FILE_BYTES`] (+1 to notice a bigger file) and strips one trailing
/// `\n` or `\r\n`. A FIFO such as bash's `<(...)` works: no regular-file check.
fn read_secret_file(path: &str) -> Result<Vec<u8>, ConfigError> {
    let var = &JWT_SECRET_FILE;
    if path.is_empty() {
        return Err(err(var, "the value is empty".to_string()));
    }
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE_BYTES + 1).read_to_end(&mut bytes));
    if let Err(e) = read {
        return Err(err(var, format!("cannot read {}: {e}", quote(path))));
    }
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(err(
            var,
            format!(
                "{} is larger than {MAX_SECRET_FILE_BYTES} bytes",
                quote(path)
            ),
        ));
    }
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.truncate(bytes.len() - 1);
    }
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(err(
            var,
            format!(
                "the secret in {} is shorter than {MIN_SECRET_BYTES} bytes (value not shown)",
                quote(path)
            ),
        ));
    }
    Ok(bytes)
}

/// A path that opens for reading and is not a directory. The contents are not read here.
fn readable_file(var: &Var, path: &str) -> Result<PathBuf, ConfigError> {
    if path.is_empty() {
        return Err(err(var, "the value is empty".to_string()));
    }
    let p = Path::new(path);
    let meta = std::fs::File::open(p).and_then(|f| f.metadata());
    match meta {
        Err(e) => Err(err(var, format!("cannot open {}: {e}", quote(path)))),
        Ok(m) if m.is_dir() => Err(err(var, format!("{} is a directory", quote(path)))),
        Ok(_) => Ok(p.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const GOOD_SECRET: &str = "s3cr3t-value-that-is-long-enough-XYZ";

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    fn ok(vars: &[(&str, &str)]) -> Config {
        match cfg(vars) {
            Ok(c) => c,
            Err(e) => panic!("{vars:?} should be accepted, got: {e}"),
        }
    }

    /// Expects an error naming `var`; checks the one-line format and that no secret leaks.
    fn bad(vars: &[(&str, &str)], var: &str) -> ConfigError {
        let e = match cfg(vars) {
            Ok(c) => panic!("{vars:?} should be refused, got {c:?}"),
            Err(e) => e,
        };
        assert_eq!(e.var, var, "{vars:?}: {e}");
        let line = e.to_string();
        assert!(line.starts_with(&format!("{var}: ")), "{line}");
        assert!(line.contains("; expected "), "{line}");
        assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
        assert!(!e.expected.is_empty() && !e.problem.is_empty());
        for (k, v) in vars {
            if k.contains("SECRET") && !k.ends_with("_FILE") && !v.is_empty() {
                assert!(!line.contains(v), "secret leaked: {line}");
            }
        }
        e
    }

    /// A temporary file, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &[u8]) -> TempFile {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "fedmcp-config-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn all_defaults() {
        let c = ok(&[]);
        assert_eq!(c.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(c.tls_cert, None);
        assert_eq!(c.tls_key, None);
        assert!(!c.tls_enabled());
        assert!(!c.allow_plaintext);
        assert_eq!(c.jwt_secret, None);
        assert_eq!(c.jwt_previous_secret, None);
        assert_eq!(c.state_dir, Some(PathBuf::from("./fedmcp-data")));
        assert_eq!(c.max_servers, 1024);
        assert_eq!(c.max_connections, 4096);
        assert_eq!(c.max_message_bytes, 1_048_576);
        assert_eq!((c.rate_per_sec, c.rate_burst), (1000, 2000));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.heartbeat, Duration::from_secs(15));
        assert_eq!(c.delivery_timeout, Duration::from_secs(30));
        assert_eq!(c.token_ttl_secs, 86_400);
        assert_eq!(c.clock_skew_secs, 30);
        assert_eq!(c.queue_max_messages, 10_000);
        assert_eq!(c.resource_max_bytes, 1_073_741_824);
        assert_eq!(c.resource_quota_bytes, 10_737_418_240);
        assert_eq!(c.queue_max_bytes, 67_108_864);
        assert_eq!(c.resource_quota_per_server_bytes, 1_073_741_824);
        assert_eq!(c.max_revocations, 65_536);
        assert_eq!(c.trusted_ca_file, None);
        assert_eq!(c.audit_log, None);
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        assert!(!c.require_signed);
    }

    #[test]
    fn default_for_tests_is_defaults_without_disk() {
        let t = Config::default_for_tests();
        assert_eq!(t.jwt_secret.as_ref().map(Vec::len), Some(32));
        assert_eq!(t.state_dir, None);
        let from_env = Config {
            jwt_secret: t.jwt_secret.clone(),
            state_dir: None,
            ..ok(&[])
        };
        assert_eq!(t, from_env);
    }

    #[test]
    fn from_env_matches_lookup() {
        // Whatever the test process's environment holds, both paths agree.
        let lookup = Config::from_lookup(|k| std::env::var(k).ok());
        assert_eq!(Config::from_env(), lookup);
    }

    #[test]
    fn unknown_variables_are_ignored() {
        assert_eq!(
            ok(&[("FEDMCP_MAX_SEVRERS", "x"), ("FEDMCP_FOO", "")]),
            ok(&[])
        );
    }

    // --- FEDMCP_LISTEN ---

    #[test]
    fn listen_good() {
        let l = |v: &str| ok(&[("FEDMCP_LISTEN", v)]).listen;
        assert_eq!(l("127.0.0.1:9000"), "127.0.0.1:9000".parse().unwrap());
        assert_eq!(l("127.1.2.3:0"), "127.1.2.3:0".parse().unwrap());
        assert_eq!(l("[::1]:65535"), "[::1]:65535".parse().unwrap());
        assert_eq!(l("localhost:8080"), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(l("LocalHost:1"), "127.0.0.1:1".parse().unwrap());
        assert_eq!(l("[::ffff:127.0.0.1]:80").port(), 80);
        let plain = |v: &str| ok(&[("FEDMCP_LISTEN", v), ("FEDMCP_ALLOW_PLAINTEXT", "1")]).listen;
        assert_eq!(plain("0.0.0.0:8443"), "0.0.0.0:8443".parse().unwrap());
        assert_eq!(plain("[::]:0"), "[::]:0".parse().unwrap());
        assert_eq!(plain("10.1.2.3:08443").port(), 8443);
    }

    #[test]
    fn listen_bad() {
        for v in [
            "",
            "8443",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:65536",
            "127.0.0.1:-1",
            "127.0.0.1:+80",
            "127.0.0.1: 80",
            " 127.0.0.1:80",
            "127.0.0.1:80 ",
            "::1:8443",
            "[::1:8443",
            "[not-v6]:1",
            "[127.0.0.1]:1",
            "example.com:443",
            "localhost.:80",
            "256.0.0.1:80",
            "127.0.0.1:http",
        ] {
            let e = bad(&[("FEDMCP_LISTEN", v)], "FEDMCP_LISTEN");
            if !v.is_empty() {
                assert!(e.problem.contains(&format!("{v:?}")), "{e}");
            }
        }
    }

    #[test]
    fn plaintext_refused_off_loopback() {
        for v in [
            "0.0.0.0:8443",
            "[::]:8443",
            "192.0.2.1:80",
            "[2001:db8::1]:1",
        ] {
            let e = bad(&[("FEDMCP_LISTEN", v)], "FEDMCP_LISTEN");
            assert!(e.problem.contains("non-loopback"), "{e}");
            assert!(e.problem.contains("FEDMCP_ALLOW_PLAINTEXT=1"), "{e}");
            assert!(e.to_string().contains("needs TLS"), "{e}");
            // "0" is the same as unset.
            bad(
                &[("FEDMCP_LISTEN", v), ("FEDMCP_ALLOW_PLAINTEXT", "0")],
                "FEDMCP_LISTEN",
            );
            assert!(ok(&[("FEDMCP_LISTEN", v), ("FEDMCP_ALLOW_PLAINTEXT", "1")]).allow_plaintext);
        }
        // With TLS a public address is fine.
        let cert = TempFile::new(b"cert");
        let key = TempFile::new(b"key");
        let c = ok(&[
            ("FEDMCP_LISTEN", "0.0.0.0:443"),
            ("FEDMCP_TLS_CERT", cert.path()),
            ("FEDMCP_TLS_KEY", key.path()),
        ]);
        assert!(c.tls_enabled());
    }

    // --- TLS files ---

    #[test]
    fn tls_both_or_neither() {
        let cert = TempFile::new(b"cert");
        let key = TempFile::new(b"key");
        let c = ok(&[
            ("FEDMCP_TLS_CERT", cert.path()),
            ("FEDMCP_TLS_KEY", key.path()),
        ]);
        assert_eq!(c.tls_cert.as_deref(), Some(cert.0.as_path()));
        assert_eq!(c.tls_key.as_deref(), Some(key.0.as_path()));

        let e = bad(&[("FEDMCP_TLS_CERT", cert.path())], "FEDMCP_TLS_KEY");
        assert!(e.problem.contains("FEDMCP_TLS_CERT"));
        let e = bad(&[("FEDMCP_TLS_KEY", key.path())], "FEDMCP_TLS_CERT");
        assert!(e.problem.contains("FEDMCP_TLS_KEY"));
    }

    #[test]
    fn tls_files_must_be_readable() {
        let cert = TempFile::new(b"cert");
        let key = TempFile::new(b"key");
        let missing = "/nonexistent/fedmcp/cert.pem";
        let e = bad(
            &[("FEDMCP_TLS_CERT", missing), ("FEDMCP_TLS_KEY", key.path())],
            "FEDMCP_TLS_CERT",
        );
        assert!(e.problem.contains(missing), "{e}");
        bad(
            &[
                ("FEDMCP_TLS_CERT", cert.path()),
                ("FEDMCP_TLS_KEY", missing),
            ],
            "FEDMCP_TLS_KEY",
        );
        let dir = std::env::temp_dir();
        let dir = dir.to_str().unwrap();
        bad(
            &[("FEDMCP_TLS_CERT", dir), ("FEDMCP_TLS_KEY", key.path())],
            "FEDMCP_TLS_CERT",
        );
        bad(
            &[("FEDMCP_TLS_CERT", ""), ("FEDMCP_TLS_KEY", key.path())],
            "FEDMCP_TLS_CERT",
        );
    }

    // --- booleans ---

    #[test]
    fn booleans() {
        for var in ["FEDMCP_ALLOW_PLAINTEXT", "FEDMCP_REQUIRE_SIGNED"] {
            let get = |c: &Config| {
                if var == "FEDMCP_ALLOW_PLAINTEXT" {
                    c.allow_plaintext
                } else {
                    c.require_signed
                }
            };
            assert!(!get(&ok(&[])));
            for (v, want) in [
                ("1", true),
                ("0", false),
                ("true", true),
                ("TRUE", true),
                ("false", false),
                ("False", false),
            ] {
                assert_eq!(get(&ok(&[(var, v)])), want, "{var}={v}");
            }
            for v in ["", "2", "yes", "no", "on", " 1", "1 ", "01", "-1", "t"] {
                let e = bad(&[(var, v)], var);
                assert!(e.problem.contains(&format!("{v:?}")) || v.is_empty(), "{e}");
            }
        }
    }

    // --- secrets ---

    #[test]
    fn jwt_secret_from_env() {
        let c = ok(&[("FEDMCP_JWT_SECRET", GOOD_SECRET)]);
        assert_eq!(c.jwt_secret.as_deref(), Some(GOOD_SECRET.as_bytes()));
        let exactly = "x".repeat(32);
        assert_eq!(
            ok(&[("FEDMCP_JWT_SECRET", &exactly)])
                .jwt_secret
                .map(|s| s.len()),
            Some(32)
        );
        // Bytes as given: no trimming of the variable's value.
        let spaced = format!(" {GOOD_SECRET}\n");
        assert_eq!(
            ok(&[("FEDMCP_JWT_SECRET", &spaced)]).jwt_secret.as_deref(),
            Some(spaced.as_bytes())
        );
        for v in ["", "short-secret-31-bytes-long-abcd", "tiny"] {
            let e = bad(&[("FEDMCP_JWT_SECRET", v)], "FEDMCP_JWT_SECRET");
            assert!(e.problem.contains("32 bytes"), "{e}");
        }
    }

    #[test]
    fn jwt_previous_secret() {
        let c = ok(&[
            ("FEDMCP_JWT_SECRET", GOOD_SECRET),
            (
                "FEDMCP_JWT_PREVIOUS_SECRET",
                "previous-secret-also-32-bytes-ok!",
            ),
        ]);
        assert_eq!(
            c.jwt_previous_secret.as_deref(),
            Some("previous-secret-also-32-bytes-ok!".as_bytes())
        );
        bad(
            &[("FEDMCP_JWT_PREVIOUS_SECRET", "too-short-previous")],
            "FEDMCP_JWT_PREVIOUS_SECRET",
        );
        bad(
            &[("FEDMCP_JWT_PREVIOUS_SECRET", "")],
            "FEDMCP_JWT_PREVIOUS_SECRET",
        );
    }

    #[test]
    fn jwt_secret_file() {
        let f = TempFile::new(format!("{GOOD_SECRET}\n").as_bytes());
        let c = ok(&[("FEDMCP_JWT_SECRET_FILE", f.path())]);
        assert_eq!(c.jwt_secret.as_deref(), Some(GOOD_SECRET.as_bytes()));

        let crlf = TempFile::new(format!("{GOOD_SECRET}\r\n").as_bytes());
        let c = ok(&[("FEDMCP_JWT_SECRET_FILE", crlf.path())]);
        assert_eq!(c.jwt_secret.as_deref(), Some(GOOD_SECRET.as_bytes()));

        // Only one newline is stripped; binary contents are fine.
        let two = TempFile::new(format!("{GOOD_SECRET}\n\n").as_bytes());
        let c = ok(&[("FEDMCP_JWT_SECRET_FILE", two.path())]);
        assert_eq!(c.jwt_secret.map(|s| s.len()), Some(GOOD_SECRET.len() + 1));
        let binary = TempFile::new(&[0xffu8; 40]);
        assert_eq!(
            ok(&[("FEDMCP_JWT_SECRET_FILE", binary.path())]).jwt_secret,
            Some(vec![0xff; 40])
        );

        // 31 bytes + newline is too short, and the error shows the path, not the contents.
        let short_secret = "abcdefghijklmnopqrstuvwxyz01234";
        let short = TempFile::new(format!("{short_secret}\n").as_bytes());
        let e = bad(
            &[("FEDMCP_JWT_SECRET_FILE", short.path())],
            "FEDMCP_JWT_SECRET_FILE",
        );
        assert!(e.problem.contains(short.path()));
        assert!(!e.to_string().contains(short_secret));

        let e = bad(
            &[("FEDMCP_JWT_SECRET_FILE", "/nonexistent/fedmcp/secret")],
            "FEDMCP_JWT_SECRET_FILE",
        );
        assert!(e.problem.contains("cannot read"), "{e}");
        bad(&[("FEDMCP_JWT_SECRET_FILE", "")], "FEDMCP_JWT_SECRET_FILE");
        let dir = std::env::temp_dir();
        bad(
            &[("FEDMCP_JWT_SECRET_FILE", dir.to_str().unwrap())],
            "FEDMCP_JWT_SECRET_FILE",
        );
        let huge = TempFile::new(&vec![b'a'; MAX_SECRET_FILE_BYTES as usize + 1]);
        let e = bad(
            &[("FEDMCP_JWT_SECRET_FILE", huge.path())],
            "FEDMCP_JWT_SECRET_FILE",
        );
        assert!(e.problem.contains("larger than"), "{e}");
        let at_limit = TempFile::new(&vec![b'a'; MAX_SECRET_FILE_BYTES as usize]);
        ok(&[("FEDMCP_JWT_SECRET_FILE", at_limit.path())]);

        // Both sources at once.
        let e = bad(
            &[
                ("FEDMCP_JWT_SECRET", GOOD_SECRET),
                ("FEDMCP_JWT_SECRET_FILE", f.path()),
            ],
            "FEDMCP_JWT_SECRET_FILE",
        );
        assert!(e.problem.contains("FEDMCP_JWT_SECRET"));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = ok(&[
            ("FEDMCP_JWT_SECRET", GOOD_SECRET),
            (
                "FEDMCP_JWT_PREVIOUS_SECRET",
                "previous-secret-also-32-bytes-ok!",
            ),
        ]);
        let d = format!("{c:?}");
        assert!(
            !d.contains(GOOD_SECRET) && !d.contains("previous-secret"),
            "{d}"
        );
        assert!(d.contains("redacted") && d.contains("max_servers"), "{d}");
    }

    // --- FEDMCP_STATE_DIR, FEDMCP_AUDIT_LOG, FEDMCP_TRUSTED_CA_FILE ---

    #[test]
    fn state_dir() {
        assert_eq!(ok(&[("FEDMCP_STATE_DIR", "")]).state_dir, None);
        assert_eq!(
            ok(&[("FEDMCP_STATE_DIR", "/var/lib/fedmcp")]).state_dir,
            Some(PathBuf::from("/var/lib/fedmcp"))
        );
    }

    #[test]
    fn audit_log() {
        assert_eq!(
            ok(&[("FEDMCP_AUDIT_LOG", "/var/log/fedmcp/audit.jsonl")]).audit_log,
            Some(PathBuf::from("/var/log/fedmcp/audit.jsonl"))
        );
        bad(&[("FEDMCP_AUDIT_LOG", "")], "FEDMCP_AUDIT_LOG");
    }

    #[test]
    fn trusted_ca_file() {
        let f = TempFile::new(b"roots");
        assert_eq!(
            ok(&[("FEDMCP_TRUSTED_CA_FILE", f.path())]).trusted_ca_file,
            Some(f.0.clone())
        );
        bad(
            &[("FEDMCP_TRUSTED_CA_FILE", "/nonexistent/fedmcp/ca.pem")],
            "FEDMCP_TRUSTED_CA_FILE",
        );
        bad(&[("FEDMCP_TRUSTED_CA_FILE", "")], "FEDMCP_TRUSTED_CA_FILE");
    }

    // --- integers ---

    /// Reads one integer field back out of a config.
    type Reader = fn(&Config) -> u64;

    /// (spec, field reader) for every plain integer variable.
    fn int_vars() -> Vec<(&'static IntVar, Reader)> {
        vec![
            (&MAX_SERVERS, |c| c.max_servers as u64),
            (&MAX_CONNECTIONS, |c| c.max_connections as u64),
            (&MAX_MESSAGE_BYTES, |c| c.max_message_bytes as u64),
            (&HANDSHAKE_TIMEOUT_MS, |c| {
                c.handshake_timeout.as_millis() as u64
            }),
            (&IDLE_TIMEOUT_MS, |c| c.idle_timeout.as_millis() as u64),
            (&HEARTBEAT_MS, |c| c.heartbeat.as_millis() as u64),
            (&DELIVERY_TIMEOUT_MS, |c| {
                c.delivery_timeout.as_millis() as u64
            }),
            (&TOKEN_TTL_SECS, |c| c.token_ttl_secs),
            (&CLOCK_SKEW_SECS, |c| c.clock_skew_secs),
            (&QUEUE_MAX_MESSAGES, |c| c.queue_max_messages as u64),
            (&RESOURCE_MAX_BYTES, |c| c.resource_max_bytes),
            (&RESOURCE_QUOTA_BYTES, |c| c.resource_quota_bytes),
            (&QUEUE_MAX_BYTES, |c| c.queue_max_bytes as u64),
            (&RESOURCE_QUOTA_PER_SERVER_BYTES, |c| {
                c.resource_quota_per_server_bytes
            }),
            (&MAX_REVOCATIONS, |c| c.max_revocations as u64),
            (&SHUTDOWN_GRACE_MS, |c| c.shutdown_grace.as_millis() as u64),
        ]
    }

    /// Keeps the quota/max cross-check out of the way of single-variable range tests.
    fn with_room(var: &'static str, v: &str) -> Vec<(&'static str, String)> {
        let mut vars = vec![(var, v.to_string())];
        if var == RESOURCE_MAX_BYTES.name {
            vars.push((RESOURCE_QUOTA_BYTES.name, PIB.to_string()));
        }
        if var == RESOURCE_QUOTA_BYTES.name {
            vars.push((RESOURCE_MAX_BYTES.name, "1".to_string()));
        }
        vars
    }

    fn run(vars: &[(&'static str, String)]) -> Result<Config, ConfigError> {
        let v: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cfg(&v)
    }

    #[test]
    fn integers_default_bounds_and_bad_forms() {
        let defaults = ok(&[]);
        for (spec, read) in int_vars() {
            let name = spec.name;
            assert_eq!(read(&defaults), spec.default, "{name} default");
            assert!(
                spec.min <= spec.default && spec.default <= spec.max,
                "{name}"
            );
            // The accepted form quoted in errors states the real range.
            assert!(
                spec.expected
                    .contains(&format!("from {} to {}", spec.min, spec.max)),
                "{name}"
            );
            for good in [spec.min, spec.max, spec.default] {
                let c = run(&with_room(name, &good.to_string()))
                    .unwrap_or_else(|e| panic!("{name}={good}: {e}"));
                assert_eq!(read(&c), good, "{name}={good}");
            }
            // Leading zeros are still plain decimal.
            let c = run(&with_room(name, &format!("00{}", spec.default))).unwrap();
            assert_eq!(read(&c), spec.default);

            let mut bad_values = vec![
                String::new(),
                " ".to_string(),
                format!(" {}", spec.default),
                format!("{} ", spec.default),
                format!("+{}", spec.default),
                format!("-{}", spec.default),
                "1_000".to_string(),
                "1,000".to_string(),
                "1e3".to_string(),
                "10.0".to_string(),
                "0x10".to_string(),
                "ten".to_string(),
                "١٢".to_string(),
                (spec.max + 1).to_string(),
                "99999999999999999999999".to_string(),
            ];
            if spec.min > 0 {
                bad_values.push((spec.min - 1).to_string());
            }
            for v in bad_values {
                let e = match run(&with_room(name, &v)) {
                    Ok(_) => panic!("{name}={v:?} accepted"),
                    Err(e) => e,
                };
                assert_eq!(e.var, name, "{name}={v:?}: {e}");
                let line = e.to_string();
                assert!(line.starts_with(&format!("{name}: ")), "{line}");
                assert!(line.ends_with(spec.expected), "{line}");
                assert!(!line.contains('\n'));
                if !v.is_empty() {
                    assert!(line.contains(&format!("{v:?}")), "{line}");
                }
            }
        }
    }

    #[test]
    fn integer_messages() {
        let e = bad(&[("FEDMCP_MAX_SERVERS", "0")], "FEDMCP_MAX_SERVERS");
        assert_eq!(
            e.to_string(),
            "FEDMCP_MAX_SERVERS: \"0\" is below the minimum of 1; expected a decimal integer from 1 to 1000000"
        );
        let e = bad(&[("FEDMCP_HEARTBEAT_MS", "99")], "FEDMCP_HEARTBEAT_MS");
        assert!(e.problem.contains("minimum of 100"), "{e}");
        let e = bad(
            &[("FEDMCP_MAX_MESSAGE_BYTES", "1k")],
            "FEDMCP_MAX_MESSAGE_BYTES",
        );
        assert!(e.problem.contains("not a plain decimal"), "{e}");
        let e = bad(
            &[("FEDMCP_CLOCK_SKEW_SECS", "3601")],
            "FEDMCP_CLOCK_SKEW_SECS",
        );
        assert!(e.problem.contains("maximum of 3600"), "{e}");
        // A long bad value is cut short.
        let long = "9".repeat(500);
        let e = bad(
            &[("FEDMCP_QUEUE_MAX_MESSAGES", &long)],
            "FEDMCP_QUEUE_MAX_MESSAGES",
        );
        assert!(e.to_string().len() < 250, "{e}");
        // Control characters are escaped, keeping one line.
        let e = bad(&[("FEDMCP_MAX_SERVERS", "1\n2")], "FEDMCP_MAX_SERVERS");
        assert!(e.to_string().contains("\"1\\n2\""), "{e}");
    }

    #[test]
    fn special_integer_values() {
        assert_eq!(ok(&[("FEDMCP_CLOCK_SKEW_SECS", "0")]).clock_skew_secs, 0);
        assert_eq!(
            ok(&[("FEDMCP_SHUTDOWN_GRACE_MS", "0")]).shutdown_grace,
            Duration::ZERO
        );
        bad(&[("FEDMCP_TOKEN_TTL_SECS", "59")], "FEDMCP_TOKEN_TTL_SECS");
        bad(
            &[("FEDMCP_TOKEN_TTL_SECS", "31536001")],
            "FEDMCP_TOKEN_TTL_SECS",
        );
        bad(
            &[("FEDMCP_MAX_MESSAGE_BYTES", "1023")],
            "FEDMCP_MAX_MESSAGE_BYTES",
        );
        bad(
            &[("FEDMCP_MAX_MESSAGE_BYTES", "67108865")],
            "FEDMCP_MAX_MESSAGE_BYTES",
        );
        bad(
            &[("FEDMCP_IDLE_TIMEOUT_MS", "86400001")],
            "FEDMCP_IDLE_TIMEOUT_MS",
        );
        bad(
            &[("FEDMCP_DELIVERY_TIMEOUT_MS", "0")],
            "FEDMCP_DELIVERY_TIMEOUT_MS",
        );
        bad(
            &[("FEDMCP_HANDSHAKE_TIMEOUT_MS", "0")],
            "FEDMCP_HANDSHAKE_TIMEOUT_MS",
        );
    }

    #[test]
    fn resource_quota_not_below_max() {
        let c = ok(&[
            ("FEDMCP_RESOURCE_MAX_BYTES", "1000"),
            ("FEDMCP_RESOURCE_QUOTA_BYTES", "1000"),
        ]);
        assert_eq!((c.resource_max_bytes, c.resource_quota_bytes), (1000, 1000));
        let e = bad(
            &[
                ("FEDMCP_RESOURCE_MAX_BYTES", "1001"),
                ("FEDMCP_RESOURCE_QUOTA_BYTES", "1000"),
            ],
            "FEDMCP_RESOURCE_QUOTA_BYTES",
        );
        assert!(e.problem.contains("FEDMCP_RESOURCE_MAX_BYTES"), "{e}");
        // Quota left at its default: the error names the variable that was set.
        let e = bad(
            &[("FEDMCP_RESOURCE_MAX_BYTES", "21474836480")],
            "FEDMCP_RESOURCE_MAX_BYTES",
        );
        assert!(e.problem.contains("default"), "{e}");
        bad(
            &[("FEDMCP_RESOURCE_QUOTA_BYTES", "1000")],
            "FEDMCP_RESOURCE_QUOTA_BYTES",
        );
    }

    // --- FEDMCP_RATE_LIMIT ---

    #[test]
    fn rate_limit_good() {
        let r = |v: &str| {
            let c = ok(&[("FEDMCP_RATE_LIMIT", v)]);
            (c.rate_per_sec, c.rate_burst)
        };
        assert_eq!(r("1000/s,burst=2000"), (1000, 2000));
        assert_eq!(r("1/s,burst=1"), (1, 1));
        assert_eq!(r("50/s"), (50, 50));
        assert_eq!(r("100/s,burst=10"), (100, 10));
        assert_eq!(r("1000000/s,burst=10000000"), (1_000_000, 10_000_000));
    }

    #[test]
    fn rate_limit_bad() {
        for v in [
            "",
            "1000",
            "1000/m",
            "1000/s,",
            "1000/s,burst=",
            "1000/s,burst=0",
            "1000/s,burst=-1",
            "1000/s,burst=10000001",
            "1000/s,b=2000",
            "1000/s, burst=2000",
            "1000/s,burst=2000,",
            "1000/s,burst=2000,burst=3",
            "0/s,burst=10",
            "1000001/s",
            "/s,burst=1",
            "1.5/s",
            " 1000/s",
            "1000 /s",
            "1000/sec",
            "burst=2000,1000/s",
        ] {
            let e = bad(&[("FEDMCP_RATE_LIMIT", v)], "FEDMCP_RATE_LIMIT");
            if !v.is_empty() {
                assert!(e.problem.contains(&format!("{v:?}")), "{e}");
            }
        }
    }

    #[test]
    fn an_empty_tls_variable_is_blamed_itself() {
        let e = bad(&[("FEDMCP_TLS_CERT", "")], "FEDMCP_TLS_CERT");
        assert!(e.problem.contains("empty"), "{e}");
        let e = bad(&[("FEDMCP_TLS_KEY", "")], "FEDMCP_TLS_KEY");
        assert!(e.problem.contains("empty"), "{e}");
    }

    // --- cluster mode (§10) ---

    #[test]
    fn cluster_variables() {
        assert!(ok(&[]).cluster.is_none());
        assert!(ok(&[("FEDMCP_CLUSTER", "x")]).cluster.is_none());
        let c = ok(&[(
            "FEDMCP_NATS_URL",
            "nats://127.0.0.1:4222, tls://u:p@nats.example:7422,nats://tok@[::1],nats://h",
        )])
        .cluster
        .unwrap();
        assert_eq!(c.name, "fedmcp");
        assert_eq!(c.replicas, 1);
        assert_eq!(c.node_id, None);
        assert_eq!(c.urls.len(), 4);
        assert_eq!(
            (c.urls[0].host.as_str(), c.urls[0].port, c.urls[0].tls),
            ("127.0.0.1", 4222, false)
        );
        assert_eq!(c.urls[1].user, Some(("u".to_string(), "p".to_string())));
        assert!(c.urls[1].tls);
        assert_eq!(c.urls[2].token.as_deref(), Some("tok"));
        assert_eq!(c.urls[2].host, "::1");
        assert_eq!(c.urls[3].port, 4222);
        // Shown without the credential.
        assert_eq!(c.urls[1].to_string(), "tls://nats.example:7422");
        assert!(!format!("{:?}", c).contains(":p@"));
        let c = ok(&[
            ("FEDMCP_NATS_URL", "nats://a:1"),
            ("FEDMCP_CLUSTER", "prod_1"),
            ("FEDMCP_NODE_ID", "edge-7"),
            ("FEDMCP_NATS_REPLICAS", "3"),
        ])
        .cluster
        .unwrap();
        assert_eq!(
            (c.name.as_str(), c.node_id.as_deref(), c.replicas),
            ("prod_1", Some("edge-7"), 3)
        );
        for v in [
            "",
            "http://a",
            "nats://",
            "nats://a:0",
            "nats://a:99999",
            "nats://@a",
            "nats://a b",
        ] {
            bad(&[("FEDMCP_NATS_URL", v)], "FEDMCP_NATS_URL");
        }
        // A credential in a bad URL is never quoted back.
        let e = bad(
            &[("FEDMCP_NATS_URL", "nats://secretpw@a:0")],
            "FEDMCP_NATS_URL",
        );
        assert!(!e.to_string().contains("secretpw"), "{e}");
        let e = bad(
            &[("FEDMCP_NATS_URL", "ftp://user:secretpw@a")],
            "FEDMCP_NATS_URL",
        );
        assert!(!e.to_string().contains("secretpw"), "{e}");
        for v in ["", "a.b", "a b", &"x".repeat(33)] {
            bad(
                &[("FEDMCP_NATS_URL", "nats://a"), ("FEDMCP_CLUSTER", v)],
                "FEDMCP_CLUSTER",
            );
            bad(
                &[("FEDMCP_NATS_URL", "nats://a"), ("FEDMCP_NODE_ID", v)],
                "FEDMCP_NODE_ID",
            );
        }
        for v in ["0", "6", "x"] {
            bad(&[("FEDMCP_NATS_REPLICAS", v)], "FEDMCP_NATS_REPLICAS");
        }
    }

    // --- the message format, across every variable ---

    #[test]
    fn non_utf8_and_every_variable_is_documented() {
        let docs = include_str!("../docs/CONFIGURATION.md");
        for var in VARIABLES.iter().chain(EXTRA_VARIABLES.iter()) {
            assert!(var.name.starts_with("FEDMCP_"));
            assert!(
                docs.contains(&format!("`{}`", var.name)),
                "{} undocumented",
                var.name
            );
            let e = err(var, "the value is not valid UTF-8".to_string());
            assert_eq!(
                e.to_string(),
                format!(
                    "{}: the value is not valid UTF-8; expected {}",
                    var.name, var.expected
                )
            );
        }
        assert!(docs.contains("`RUST_LOG`"));
    }

    #[test]
    fn display_is_one_line_even_with_control_characters() {
        let e = ConfigError {
            var: "FEDMCP_X",
            problem: "a\nb\r\tc".to_string(),
            expected: "y",
        };
        assert_eq!(e.to_string(), "FEDMCP_X: a b  c; expected y");
    }

    #[test]
    fn first_error_wins_in_table_order() {
        let e = bad(
            &[("FEDMCP_LISTEN", "nope"), ("FEDMCP_MAX_SERVERS", "0")],
            "FEDMCP_LISTEN",
        );
        assert!(e.problem.contains("nope"));
    }
}
