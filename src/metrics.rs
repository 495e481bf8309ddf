//! Counters, gauges and the delivery-latency histogram, rendered as Prometheus text 0.0.4.
//!
//! Owns only numbers: every label set is a fixed enum, so the metric table has a size known at
//! compile time and no peer can grow it (a peer-chosen string never becomes a label). Gauges
//! that describe live state (connections by state, servers online, queue depth) are computed by
//! the caller at scrape time and passed in, so they can never drift from the truth.
//! It never does I/O except reading `/proc/self/statm` for resident memory.

use std::fmt::Write as _;

/// Outcomes counted in `fedmcp_messages_total{result=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgResult {
    Delivered,
    Rejected,
    Queued,
    Broadcast,
    Forwarded,
    Expired,
    Timeout,
    Offline,
    UnknownServer,
    Overloaded,
    QueueFull,
    BadSignature,
    RateLimited,
    Dropped,
    Invalid,
}

impl MsgResult {
    const ALL: [MsgResult; 15] = [
        MsgResult::Delivered,
        MsgResult::Rejected,
        MsgResult::Queued,
        MsgResult::Broadcast,
        MsgResult::Forwarded,
        MsgResult::Expired,
        MsgResult::Timeout,
        MsgResult::Offline,
        MsgResult::UnknownServer,
        MsgResult::Overloaded,
        MsgResult::QueueFull,
        MsgResult::BadSignature,
        MsgResult::RateLimited,
        MsgResult::Dropped,
        MsgResult::Invalid,
    ];

    fn label(self) -> &'static str {
        match self {
            MsgResult::Delivered => "delivered",
            MsgResult::Rejected => "rejected",
            MsgResult::Queued => "queued",
            MsgResult::Broadcast => "broadcast",
            MsgResult::Forwarded => "forwarded",
            MsgResult::Expired => "expired",
            MsgResult::Timeout => "delivery_timeout",
            MsgResult::Offline => "server_offline",
            MsgResult::UnknownServer => "unknown_server",
            MsgResult::Overloaded => "recipient_overloaded",
            MsgResult::QueueFull => "queue_full",
            MsgResult::BadSignature => "bad_signature",
            MsgResult::RateLimited => "rate_limited",
            MsgResult::Dropped => "dropped",
            MsgResult::Invalid => "invalid",
        }
    }
}

/// The MCP methods counted in `fedmcp_mcp_requests_total{method=...}` (§9); every other
/// method is `other`.
pub const MCP_METHODS: [&str; 5] = ["initialize", "ping", "tools/list", "tools/call", "other"];

/// The reasons counted in `fedmcp_auth_failures_total{reason=...}`: the contract's token codes.
pub const AUTH_REASONS: [&str; 9] = [
    "missing_token",
    "malformed_token",
    "unsupported_alg",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "issued_in_future",
    "wrong_type",
    "revoked",
];

/// Upper bounds (seconds) of the delivery histogram buckets.
const DELIVERY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// Live gauges computed by the caller at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    pub conns_http: usize,
    pub conns_connecting: usize,
    pub conns_online: usize,
    pub conns_closing: usize,
    pub servers_online: usize,
    pub servers_registered: usize,
    pub queue_messages: usize,
    pub pending_deliveries: usize,
    pub ready: bool,
}

#[derive(Debug, Default)]
pub struct Metrics {
    messages: [u64; MsgResult::ALL.len()],
    auth_failures: [u64; AUTH_REASONS.len()],
    /// MCP requests answered, by method and by result (ok, error).
    mcp_requests: [[u64; 2]; MCP_METHODS.len()],
    delivery_counts: [u64; DELIVERY_BUCKETS.len()],
    delivery_sum: f64,
    delivery_count: u64,
    pub accepted_total: u64,
    pub refused_total: u64,
    pub displaced_total: u64,
    pub http_requests_total: u64,
    pub ws_messages_in_total: u64,
    pub notifications_dropped_total: u64,
    pub sessions_opened_total: u64,
    pub rate_limited_total: u64,
    pub storage_failures_total: u64,
    /// Cluster mode (§10): whether `FEDMCP_NATS_URL` is set (the cluster families are
    /// rendered only then).
    pub cluster: bool,
    /// Messages published on NATS.
    pub nats_published_total: u64,
    pub nats_connected: bool,
    /// Live proxies of the cluster, this one included.
    pub cluster_nodes: usize,
    remote_messages: [u64; REMOTE_RESULTS.len()],
}

/// The results counted in `fedmcp_remote_messages_total{result=...}` (§10): sent to another
/// node, taken from another node, and the outcomes of those this node sent.
pub const REMOTE_RESULTS: [&str; 6] = [
    "forwarded",
    "received",
    "delivered",
    "rejected",
    "failed",
    "timeout",
];

impl Metrics {
    pub fn message(&mut self, r: MsgResult) {
        self.messages[r as usize] += 1;
    }

    pub fn messages_of(&self, r: MsgResult) -> u64 {
        self.messages[r as usize]
    }

    /// Counts a cluster message by result (one of [`REMOTE_RESULTS`]).
    pub fn remote_message(&mut self, result: &str) {
        if let Some(i) = REMOTE_RESULTS.iter().position(|r| *r == result) {
            self.remote_messages[i] += 1;
        }
    }

    /// Counts an MCP request answered (`ok`: a result, else a JSON-RPC error).
    pub fn mcp_request(&mut self, method: &str, ok: bool) {
        let i = MCP_METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or(MCP_METHODS.len() - 1);
        self.mcp_requests[i][usize::from(!ok)] += 1;
    }

    /// Counts an authentication failure; an unknown reason is counted as `malformed_token`.
    pub fn auth_failure(&mut self, reason: &str) {
        let i = AUTH_REASONS.iter().position(|r| *r == reason).unwrap_or(1);
        self.auth_failures[i] += 1;
    }

    pub fn observe_delivery(&mut self, seconds: f64) {
        for (i, le) in DELIVERY_BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.delivery_counts[i] += 1;
            }
        }
        self.delivery_sum += seconds;
        self.delivery_count += 1;
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, g: &Gauges) -> String {
        let mut s = String::with_capacity(4096);
        let _ = writeln!(s, "# HELP fedmcp_connections Sockets held, by state.");
        let _ = writeln!(s, "# TYPE fedmcp_connections gauge");
        for (state, v) in [
            ("http", g.conns_http),
            ("connecting", g.conns_connecting),
            ("online", g.conns_online),
            ("closing", g.conns_closing),
        ] {
            let _ = writeln!(s, "fedmcp_connections{{state=\"{state}\"}} {v}");
        }
        gauge(
            &mut s,
            "fedmcp_servers_online",
            "Servers with an online control session.",
            g.servers_online,
        );
        gauge(
            &mut s,
            "fedmcp_servers_registered",
            "Entries in the registry.",
            g.servers_registered,
        );
        gauge(
            &mut s,
            "fedmcp_queue_messages",
            "Messages queued for offline recipients.",
            g.queue_messages,
        );
        gauge(
            &mut s,
            "fedmcp_pending_deliveries",
            "Deliveries awaiting the recipient's answer.",
            g.pending_deliveries,
        );
        gauge(
            &mut s,
            "fedmcp_ready",
            "1 while serving, 0 while draining.",
            usize::from(g.ready),
        );
        gauge(
            &mut s,
            "fedmcp_resident_memory_bytes",
            "Resident set size of the process.",
            resident_memory_bytes(),
        );

        if self.cluster {
            gauge(
                &mut s,
                "fedmcp_cluster_nodes",
                "Live proxies of the cluster, this one included.",
                self.cluster_nodes.max(1),
            );
            gauge(
                &mut s,
                "fedmcp_nats_connected",
                "1 while the NATS connection is up.",
                usize::from(self.nats_connected),
            );
            let _ = writeln!(
                s,
                "# HELP fedmcp_remote_messages_total Messages between proxies of the cluster, by result."
            );
            let _ = writeln!(s, "# TYPE fedmcp_remote_messages_total counter");
            for (r, v) in REMOTE_RESULTS.iter().zip(self.remote_messages.iter()) {
                let _ = writeln!(s, "fedmcp_remote_messages_total{{result=\"{r}\"}} {v}");
            }
            let _ = writeln!(
                s,
                "# HELP fedmcp_nats_published_total Messages published on NATS."
            );
            let _ = writeln!(s, "# TYPE fedmcp_nats_published_total counter");
            let _ = writeln!(
                s,
                "fedmcp_nats_published_total {}",
                self.nats_published_total
            );
        }
        let _ = writeln!(
            s,
            "# HELP fedmcp_mcp_requests_total MCP requests answered, by method and result."
        );
        let _ = writeln!(s, "# TYPE fedmcp_mcp_requests_total counter");
        for (m, counts) in MCP_METHODS.iter().zip(self.mcp_requests.iter()) {
            for (result, v) in ["ok", "error"].iter().zip(counts.iter()) {
                let _ = writeln!(
                    s,
                    "fedmcp_mcp_requests_total{{method=\"{m}\",result=\"{result}\"}} {v}"
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP fedmcp_messages_total Messages handled, by result."
        );
        let _ = writeln!(s, "# TYPE fedmcp_messages_total counter");
        for r in MsgResult::ALL {
            let _ = writeln!(
                s,
                "fedmcp_messages_total{{result=\"{}\"}} {}",
                r.label(),
                self.messages[r as usize]
            );
        }
        let _ = writeln!(
            s,
            "# HELP fedmcp_auth_failures_total Rejected tokens, by reason."
        );
        let _ = writeln!(s, "# TYPE fedmcp_auth_failures_total counter");
        for (i, r) in AUTH_REASONS.iter().enumerate() {
            let _ = writeln!(
                s,
                "fedmcp_auth_failures_total{{reason=\"{r}\"}} {}",
                self.auth_failures[i]
            );
        }
        for (name, help, v) in [
            (
                "fedmcp_connections_accepted_total",
                "Sockets accepted.",
                self.accepted_total,
            ),
            (
                "fedmcp_connections_refused_total",
                "Sockets refused at FEDMCP_MAX_CONNECTIONS.",
                self.refused_total,
            ),
            (
                "fedmcp_connections_displaced_total",
                "Unauthenticated sockets dropped to make room for a new one at FEDMCP_MAX_CONNECTIONS.",
                self.displaced_total,
            ),
            (
                "fedmcp_http_requests_total",
                "HTTP requests answered.",
                self.http_requests_total,
            ),
            (
                "fedmcp_ws_messages_received_total",
                "JSON-RPC messages received on control sessions.",
                self.ws_messages_in_total,
            ),
            (
                "fedmcp_notifications_dropped_total",
                "Notifications dropped over the rate limit.",
                self.notifications_dropped_total,
            ),
            (
                "fedmcp_sessions_opened_total",
                "Control sessions opened.",
                self.sessions_opened_total,
            ),
            (
                "fedmcp_rate_limited_total",
                "Messages refused by the rate limit.",
                self.rate_limited_total,
            ),
            (
                "fedmcp_storage_failures_total",
                "State log writes or fsyncs that failed.",
                self.storage_failures_total,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            let _ = writeln!(s, "{name} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP fedmcp_delivery_seconds Time from a send to the recipient's answer."
        );
        let _ = writeln!(s, "# TYPE fedmcp_delivery_seconds histogram");
        for (i, le) in DELIVERY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "fedmcp_delivery_seconds_bucket{{le=\"{le}\"}} {}",
                self.delivery_counts[i]
            );
        }
        let _ = writeln!(
            s,
            "fedmcp_delivery_seconds_bucket{{le=\"+Inf\"}} {}",
            self.delivery_count
        );
        let _ = writeln!(s, "fedmcp_delivery_seconds_sum {}", self.delivery_sum);
        let _ = writeln!(s, "fedmcp_delivery_seconds_count {}", self.delivery_count);
        s
    }
}

fn gauge(s: &mut String, name: &str, help: &str, v: usize) {
    let _ = writeln!(s, "# HELP {name} {help}");
    let _ = writeln!(s, "# TYPE {name} gauge");
    let _ = writeln!(s, "{name} {v}");
}

/// Resident set size from `/proc/self/statm` (0 where it cannot be read).
pub fn resident_memory_bytes() -> usize {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: usize = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_required_families() {
        let mut m = Metrics::default();
        m.message(MsgResult::Delivered);
        m.auth_failure("expired");
        m.auth_failure("nonsense");
        m.observe_delivery(0.002);
        let text = m.render(&Gauges {
            conns_online: 2,
            ready: true,
            ..Gauges::default()
        });
        for needle in [
            "fedmcp_connections{state=\"online\"} 2",
            "fedmcp_servers_online 0",
            "fedmcp_messages_total{result=\"delivered\"} 1",
            "fedmcp_auth_failures_total{reason=\"expired\"} 1",
            "fedmcp_auth_failures_total{reason=\"malformed_token\"} 1",
            "fedmcp_delivery_seconds_bucket{le=\"0.0025\"} 1",
            "fedmcp_delivery_seconds_bucket{le=\"0.001\"} 0",
            "fedmcp_delivery_seconds_count 1",
            "fedmcp_queue_messages 0",
            "fedmcp_resident_memory_bytes ",
        ] {
            assert!(text.contains(needle), "missing {needle}");
        }
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.split(' ').count(), 2, "bad line {line}");
        }
    }
}
