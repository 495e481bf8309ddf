//! NATS servers for the cluster tests (docs/PROTOCOL.md §10): one `nats-server` with JetStream, or a
//! three-node JetStream cluster, on loopback, each node with its own ports, store dir and log
//! under a scratch dir. A node can be killed (`kill -9`) and started again on the same ports
//! and store dir. Every node is killed on drop.
//!
//! Ports are picked below the kernel's ephemeral range when it leaves room (checked free by
//! binding 127.0.0.1), so that a node restarted on its old port cannot find it taken by a
//! socket some other test opened on port 0 or by an outgoing connection meanwhile.
//!
//! Every wait is bounded: a node that does not accept clients and report JetStream ready
//! within [`NATS_READY`] fails the test with the tail of its log.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::{Resp, scratch_dir};

/// How long a node (or the whole cluster, with a JetStream meta leader) may take to be ready.
pub const NATS_READY: Duration = Duration::from_secs(30);

/// The `nats-server` binary: `FEDMCP_TEST_NATS_SERVER` when set, else the one on `PATH`, else
/// the Debian package's path.
pub fn nats_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FEDMCP_TEST_NATS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("/usr/sbin/nats-server")
}

/// A free TCP port on 127.0.0.1, never handed out twice by this process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap();
    let given = given.get_or_insert_with(HashSet::new);
    let low = ephemeral_low();
    // Below the ephemeral range when there is room (see the module doc), else anywhere.
    if low > 12_000 {
        for _ in 0..200 {
            let r = u16::from_le_bytes(fedmcp::random::random_bytes::<2>());
            let port = 10_000 + r % (low - 10_000);
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if given.insert(port) {
            return port;
        }
    }
}

fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// One `nats-server` process and what it needs to be started again the same way.
pub struct NatsNode {
    pub name: String,
    pub port: u16,
    pub monitor_port: u16,
    pub cluster_port: Option<u16>,
    pub store: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(nats_bin())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nats_bin().display()));
        self.child = Some(child);
    }

    /// `kill -9` and reap: the node is gone at once, its clients see their sockets close.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// GET on the monitoring port: (status, body), or None when it does not answer.
    pub fn monitor(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.monitor_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let r = Resp::parse(&raw)?;
        Some((r.status, r.text()))
    }

    /// True when clients are accepted and JetStream says it is healthy (with `cluster`, also
    /// when a meta leader is known).
    fn ready(&self, cluster: bool) -> bool {
        if TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            return false;
        }
        match self.monitor("/healthz") {
            Some((200, _)) => {}
            _ => return false,
        }
        if !cluster {
            return true;
        }
        match self.monitor("/jsz") {
            Some((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["meta_cluster"]["leader"].as_str().map(|l| !l.is_empty()))
                .unwrap_or(false),
            _ => false,
        }
    }
}

/// One NATS node, or a cluster of three; all killed on drop.
pub struct Nats {
    pub nodes: Vec<NatsNode>,
    dir: PathBuf,
}

impl Nats {
    /// One node with JetStream, ready.
    pub fn single() -> Nats {
        Self::make(1, None, "")
    }

    /// One node with JetStream on client port `port`, ready.
    pub fn single_on(port: u16) -> Nats {
        Self::make(1, Some(port), "")
    }

    /// One node with JetStream and `extra` appended to its configuration (e.g. an
    /// `authorization { ... }` block), ready.
    pub fn single_with(extra: &str) -> Nats {
        Self::make(1, None, extra)
    }

    /// A three-node JetStream cluster, every node ready and a meta leader elected.
    pub fn cluster3() -> Nats {
        Self::make(3, None, "")
    }

    fn make(n: usize, first_port: Option<u16>, extra: &str) -> Nats {
        let dir = scratch_dir("nats");
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|i| {
                let port = first_port.filter(|_| i == 0).unwrap_or_else(free_port);
                (port, free_port(), free_port())
            })
            .collect();
        let mut nodes = Vec::new();
        for (i, &(port, monitor_port, cport)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let store = dir.join(format!("{name}-store"));
            std::fs::create_dir_all(&store).unwrap();
            let config = dir.join(format!("{name}.conf"));
            let mut text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n\
                 jetstream {{\n  store_dir: {store:?}\n}}\n"
            );
            let cluster_port = (n > 1).then_some(cport);
            if n > 1 {
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("nats-route://127.0.0.1:{}", p.2))
                    .collect();
                text.push_str(&format!(
                    "cluster {{\n  name: fedmcptest\n  listen: 127.0.0.1:{cport}\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                ));
            }
            text.push_str(extra);
            text.push('\n');
            std::fs::write(&config, text).unwrap();
            nodes.push(NatsNode {
                log: dir.join(format!("{name}.log")),
                name,
                port,
                monitor_port,
                cluster_port,
                store,
                config,
                child: None,
            });
        }
        let mut nats = Nats { nodes, dir };
        for node in &mut nats.nodes {
            node.spawn();
        }
        for i in 0..n {
            nats.wait_ready(i);
        }
        nats
    }

    /// The URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Every node's URL, comma-separated, starting with node `first`.
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|k| self.nodes[(first + k) % n].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `kill -9` of node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again (same ports, config and store dir) and waits until it is ready.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].spawn();
        self.wait_ready(i);
    }

    /// Waits (bounded by [`NATS_READY`]) until node `i` accepts clients with JetStream ready.
    pub fn wait_ready(&self, i: usize) {
        let cluster = self.nodes.len() > 1;
        let t0 = Instant::now();
        while !self.nodes[i].ready(cluster) {
            assert!(
                t0.elapsed() < NATS_READY,
                "NATS node {} not ready within {NATS_READY:?}; log:\n{}",
                self.nodes[i].name,
                self.nodes[i].log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
