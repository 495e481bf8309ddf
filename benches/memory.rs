//! Memory benchmark: the proxy's resident memory idle and with many idle control sessions.
//!
//! Starts the release binary (memory-only state, `FEDMCP_HEARTBEAT_MS=600000` so sessions
//! that never read are not pinged or dropped during the run), measures `VmRSS` right after the
//! ready line and again after `settle` seconds (idle RSS), registers `sessions` servers over
//! HTTP (RSS again: the registry's share), opens one control session per server and answers
//! each welcome, proves every session is past its welcome (a round trip), waits `settle`
//! seconds, and measures RSS with all sessions held open. Prints one machine-readable line:
//! `bytes_per_session = (RSS_sessions - RSS_idle) / sessions` (the contract's figure) and the
//! share without registration (`bytes_per_session_only`).
//!
//! Needs about `sessions` + 50 file descriptors in this process (and as many in the proxy):
//! run 1,000 sessions under `ulimit -n 4096`.
//!
//! Options (`--name=value` or `MEMBENCH_NAME`): sessions (1000), settle seconds (1),
//! max-bytes-per-session and max-idle-kib (bars: exit 1 above them; 0 = no bar), label.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn rss(pid: u32) -> u64 {
    status_kib(pid, "VmRSS").expect("VmRSS of the proxy")
}

fn main() {
    let o = Opts::new("MEMBENCH");
    let sessions: usize = o.parse("sessions", 1000);
    let settle: f64 = o.parse("settle", 1.0);
    let bar: f64 = o.parse("max-bytes-per-session", 0.0);
    let idle_bar: u64 = o.parse("max-idle-kib", 0);
    let label = o.get("label").unwrap_or_default();
    let settle = Duration::from_secs_f64(settle);

    let mut env = vec![("FEDMCP_HEARTBEAT_MS", "600000".to_string())];
    // The registry is allocated at start for FEDMCP_MAX_SERVERS (default 1024): only raise it
    // when the run needs more, so the idle figure is the default configuration's.
    if sessions > 1000 {
        env.push(("FEDMCP_MAX_SERVERS", (sessions + 24).to_string()));
        env.push(("FEDMCP_MAX_CONNECTIONS", (sessions + 96).to_string()));
    }
    let mut proxy = ProxyProc::spawn(&env);
    let pid = proxy.pid;
    let rss_start = rss(pid);
    std::thread::sleep(settle);
    let rss_idle = rss(pid);

    let admin = proxy.admin_token();
    let tokens: Vec<String> = (0..sessions)
        .map(|i| proxy.register(&admin, &format!("mem-{i}")))
        .collect();
    std::thread::sleep(settle);
    let rss_registered = rss(pid);

    let t = Instant::now();
    let mut rng = Rng::seeded();
    let mut open = Vec::with_capacity(sessions);
    for (i, tok) in tokens.iter().enumerate() {
        let s = Session::open(proxy.addr, tok, rng.next_u32() as u64).unwrap_or_else(|e| {
            panic!(
                "session {i}: {e} (file descriptors: run under `ulimit -n 4096`); proxy stderr: {}",
                proxy.stderr_tail(5)
            )
        });
        open.push(s);
    }
    // A round trip on each: every welcome answer has been processed (all sessions online).
    for (i, s) in open.iter_mut().enumerate() {
        s.sync().unwrap_or_else(|e| panic!("session {i}: {e}"));
    }
    let open_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(settle);
    let rss_sessions = rss(pid);
    let hwm = status_kib(pid, "VmHWM").unwrap_or(0);

    // After the measurement: the proxy agrees that they are all online, and none was dropped.
    let online = {
        let s = &mut open[0];
        s.send_text(
            "{\"jsonrpc\":\"2.0\",\"id\":\"bench-count\",\"method\":\"federation/servers\"}",
        )
        .expect("servers request");
        let m = loop {
            let m = s.recv_text().expect("servers answer");
            if m.contains("\"bench-count\"") {
                break m;
            }
        };
        let v: serde_json::Value = serde_json::from_str(&m).expect("JSON");
        v["result"]["servers"].as_array().map_or(0, |a| a.len())
    };
    assert!(proxy.is_running(), "the proxy exited");

    let n = sessions.max(1) as f64;
    let per = (rss_sessions as f64 - rss_idle as f64) * 1024.0 / n;
    let per_only = (rss_sessions as f64 - rss_registered as f64) * 1024.0 / n;
    println!(
        "memory{} sessions={sessions} online={online} idle_rss_start_kib={rss_start} idle_rss_kib={rss_idle} registered_rss_kib={rss_registered} sessions_rss_kib={rss_sessions} hwm_kib={hwm} bytes_per_session={per:.0} bytes_per_session_only={per_only:.0} open_secs={open_secs:.2}",
        if label.is_empty() {
            String::new()
        } else {
            format!(" label={label}")
        },
    );
    let mut fail = false;
    if online != sessions {
        eprintln!("memory: {online} servers online, expected {sessions}");
        fail = true;
    }
    if idle_bar > 0 && rss_idle > idle_bar {
        eprintln!("memory: idle RSS {rss_idle} KiB is above the bar of {idle_bar} KiB");
        fail = true;
    }
    if bar > 0.0 && per > bar {
        eprintln!("memory: {per:.0} bytes per session is above the bar of {bar:.0}");
        fail = true;
    }
    drop(open);
    drop(proxy);
    if fail {
        std::process::exit(1);
    }
}
