//! The client commands of `fedmcp`, for people at a shell (in the spirit of `mosquitto_pub`,
//! `mosquitto_sub` and the `nats` CLI): `servers`, `send`, `listen`, `put`, `get`, `ls`, `rm`.
//!
//! Owns dispatching a command to its module and its exit code. Every command reads the proxy
//! from `--url` or `FEDMCP_URL` (default `http://127.0.0.1:8443`) and the token from `--token`
//! or `FEDMCP_TOKEN`, prints its usage for `-h`/`--help` (exit 0), and ends with one of these
//! exit codes, the same for all:
//!
//! - 0: success;
//! - 1: the proxy answered, and the operation failed (a send `rejected` or answered with an
//!   error, `404` on `servers show`/`get`/`rm`, any other `4xx`/`5xx` but `401`/`403`), with
//!   the proxy's error code and message in one line on stderr;
//! - 2: usage: a bad flag, argument or variable (nothing was sent);
//! - 3: the proxy could not be reached (connection refused, TLS failure, timeout);
//! - 4: the proxy refused the token (`401`/`403`; for `listen`, a session closed `4001` or
//!   `4002`).
//!
//! Every failure is one line on stderr. A stdout closed by its reader (`| head -1`) ends a
//! command quietly, with 0. These commands are clients in their own process
//! (`fedmcp::client`): they never run inside the proxy's loop.

mod common;
mod listen;
mod resources;
mod send;
mod servers;

/// The client commands, for the dispatcher in `main`.
pub const COMMANDS: &[&str] = &["servers", "send", "listen", "put", "get", "ls", "rm"];

/// The usage text of a client command (`None` for another name).
pub fn usage(cmd: &str) -> Option<&'static str> {
    Some(match cmd {
        "servers" => servers::USAGE,
        "send" => send::USAGE,
        "listen" => listen::USAGE,
        "put" => resources::PUT_USAGE,
        "get" => resources::GET_USAGE,
        "ls" => resources::LS_USAGE,
        "rm" => resources::RM_USAGE,
        _ => return None,
    })
}

/// Runs client command `cmd` (one of [`COMMANDS`]) with its arguments; the exit code.
pub fn run(cmd: &str, args: &[String]) -> u8 {
    let outcome = match cmd {
        "servers" => servers::run(args),
        "send" => send::run(args),
        "listen" => listen::run(args),
        "put" => resources::put(args),
        "get" => resources::get(args),
        "ls" => resources::ls(args),
        "rm" => resources::rm(args),
        other => Err(common::Exit::Usage(format!(
            "fedmcp: unknown command {other:?}; see fedmcp --help"
        ))),
    };
    match outcome {
        Ok(()) => 0,
        Err(e) => e.report(),
    }
}
