//! The README's tour, run exactly as written (issue 13): the shell block between
//! `<!-- tour: begin -->` and `<!-- tour: end -->` is extracted from README.md and run with
//! bash against the real binary (in place of `make run`: a proxy on a free port, with the
//! secret the tour's `fedmcp token` reads), so the README cannot rot.

mod common;

use common::*;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tour's shell block.
fn tour() -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find("<!-- tour: begin -->")
        .expect("README.md has a tour: begin marker");
    let end = readme
        .find("<!-- tour: end -->")
        .expect("README.md has a tour: end marker");
    let block = &readme[start..end];
    let open = block.find("```sh\n").expect("the tour is a ```sh block") + "```sh\n".len();
    let close = block.rfind("```").expect("the tour's block is closed");
    block[open..close].to_string()
}

#[test]
fn the_readme_tour_runs_as_written() {
    let script = tour();
    assert!(
        !script.contains("python"),
        "the tour needs no Python:\n{script}"
    );
    let p = Proxy::start(&[]);
    // The tour's `mktemp -d` lands here, removed at the end.
    let scratch = scratch_dir("tour");
    let repo = env!("CARGO_MANIFEST_DIR");
    let bin_dir = bin()
        .parent()
        .expect("the binary's directory")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(&script)
        .current_dir(repo)
        .env_clear()
        .env("PATH", path)
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .env("TMPDIR", &scratch)
        .env("FEDMCP_URL", format!("http://{}", p.addr))
        // `fedmcp token` signs with the proxy's secret, as after `make run`.
        .env("FEDMCP_JWT_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash runs");
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the tour did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let mut err = String::new();
    let _ = child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    let _ = child.stderr.take().map(|mut s| s.read_to_string(&mut err));
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(
        status.success(),
        "the tour failed ({status}):\n--- stdout\n{out}\n--- stderr\n{err}\n--- proxy\n{}",
        p.stderr_text()
    );
    for expected in [
        r#""status":"delivered""#,
        r#""reply":{"hi":"alice"}"#,
        r#""status":"broadcast""#,
        r#""message":{"hello":"bob"}"#,
        r#""status":"queued""#,
        r#""message":{"while":"you were away"}"#,
        r#""name":"report.bin""#,
        "same bytes",
        r#""serverId":"alice""#,
        "fedmcp_messages_total",
    ] {
        assert!(
            out.contains(expected),
            "the tour's output lacks {expected}:\n--- stdout\n{out}\n--- stderr\n{err}"
        );
    }
}
