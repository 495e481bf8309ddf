//! The resources of the HTTP data channel against the real binary (docs/PROTOCOL.md §3 resources
//! and their limits, §7 resources durable): streamed uploads by `Content-Length` and chunked,
//! downloads with `ETag`, ranges and `If-None-Match`, listing and delete rights, cut-off and
//! refused uploads leaving nothing behind, names that must never become paths, `Expect:
//! 100-continue`, restart, and bounded memory for a 256 MiB transfer.
//!
//! Every test starts its own proxy on loopback port 0 and every wait is bounded. Data is a
//! deterministic xorshift stream, so a failure is reproducible.
mod common;
use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const MIB: usize = 1024 * 1024;
/// The proxy's peak resident memory must stay under this during a large transfer.
const HWM_LIMIT_KIB: u64 = 32 * 1024;

/// xorshift64: a deterministic pseudo-random byte stream.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn data(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    Rng::new(seed).fill(&mut v);
    v
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha_hex(bytes: &[u8]) -> String {
    hex(Sha256::digest(bytes).as_slice())
}

/// A proxy, plus clean-up of what a memory-only proxy leaves in the temp dir.
struct Px {
    p: Proxy,
    memory_only: bool,
}

impl std::ops::Deref for Px {
    type Target = Proxy;
    fn deref(&self) -> &Proxy {
        &self.p
    }
}

impl std::ops::DerefMut for Px {
    fn deref_mut(&mut self) -> &mut Proxy {
        &mut self.p
    }
}

impl Drop for Px {
    fn drop(&mut self) {
        let _ = self.p.child.kill();
        let _ = self.p.child.wait();
        if self.memory_only {
            let _ = std::fs::remove_dir_all(memory_dir(&self.p));
        }
    }
}

/// Where a memory-only proxy keeps its resources: a private directory under its temporary
/// dir (the harness points `TMPDIR` at the proxy's scratch dir), named for the pid and a
/// random suffix, made fresh at start.
fn memory_dir(p: &Proxy) -> PathBuf {
    let prefix = format!("fedmcp-resources-{}-", p.pid());
    std::fs::read_dir(&p.dir)
        .ok()
        .and_then(|rd| {
            rd.filter_map(|e| e.ok())
                .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
        })
        .unwrap_or_else(|| p.dir.join(prefix))
}

/// A memory-only proxy (`FEDMCP_STATE_DIR=`) with `env`.
fn start_mem(env: &[(&str, &str)]) -> Px {
    Px {
        p: Proxy::start(env),
        memory_only: true,
    }
}

/// A proxy with `state` as its state dir, plus `env`.
fn start_with_state(state: &Path, env: &[(&str, &str)]) -> Px {
    let s = state.to_str().unwrap().to_string();
    let mut all: Vec<(&str, &str)> = vec![("FEDMCP_STATE_DIR", &s)];
    all.extend_from_slice(env);
    Px {
        p: Proxy::start(&all),
        memory_only: false,
    }
}

/// A scratch directory removed when dropped (a state dir lives in `<scratch>/state`, so a
/// path escaping the state dir would still land inside the scratch dir).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        Scratch(scratch_dir(tag))
    }
    fn state(&self) -> PathBuf {
        self.0.join("state")
    }
    fn resources(&self) -> PathBuf {
        self.state().join("resources")
    }
    fn tmp(&self) -> PathBuf {
        self.resources().join(".tmp")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn connect(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

/// Reads until the end of a response head is in `buf`; returns the head's length.
#[track_caller]
fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let start = Instant::now();
    let mut tmp = [0u8; 16 * 1024];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return i + 4;
        }
        assert!(
            start.elapsed() < WAIT,
            "no response head within {WAIT:?}: {:?}",
            String::from_utf8_lossy(buf)
        );
        match s.read(&mut tmp) {
            Ok(0) => panic!(
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(buf)
            ),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) => panic!(
                "read failed before a response head ({e}): {:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

/// Reads to EOF (bounded: each read by `WAIT`, the whole by `WAIT`); errors end the read.
fn read_rest(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let start = Instant::now();
    let mut tmp = [0u8; 64 * 1024];
    while start.elapsed() < WAIT {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Reads one complete `Content-Length` response on a keep-alive connection.
#[track_caller]
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Resp {
    let end = read_head(s, buf);
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let start = Instant::now();
    let mut tmp = [0u8; 64 * 1024];
    while buf.len() < end + len {
        assert!(start.elapsed() < WAIT, "body not complete within {WAIT:?}");
        match s.read(&mut tmp) {
            Ok(0) => panic!("closed mid-body"),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) => panic!("read failed mid-body: {e}"),
        }
    }
    let (r, used) = Resp::parse_one(buf).unwrap();
    buf.drain(..used);
    r
}

#[track_caller]
fn parse(raw: &[u8]) -> Resp {
    Resp::parse(raw)
        .unwrap_or_else(|| panic!("unparseable response: {:?}", String::from_utf8_lossy(raw)))
}

/// Writes what it can; a peer that answered and closed early is not an error here.
fn write_lenient(s: &mut TcpStream, bytes: &[u8]) -> bool {
    s.write_all(bytes).is_ok()
}

/// Sends `req` (head and body), ignoring write errors, then reads the answer to EOF.
fn exchange(p: &Proxy, req: &[u8]) -> Vec<u8> {
    let mut s = connect(p);
    write_lenient(&mut s, req);
    let mut out = Vec::new();
    read_rest(&mut s, &mut out);
    out
}

fn put_head(name: &str, token: &str, framing: &str, extra: &str) -> String {
    format!(
        "PUT /v1/resources/{name} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\n{framing}{extra}\r\n"
    )
}

/// `PUT` by `Content-Length`.
fn put(p: &Proxy, token: &str, name: &str, body: &[u8]) -> Resp {
    let mut req = put_head(
        name,
        token,
        &format!("Content-Length: {}\r\n", body.len()),
        "",
    )
    .into_bytes();
    req.extend_from_slice(body);
    parse(&exchange(p, &req))
}

/// A chunked encoding of `body` with chunk sizes cycling through `sizes`; some size lines
/// are upper-case hex, some carry an extension, and `trailer` (if any) ends the body.
fn chunked(body: &[u8], sizes: &[usize], trailer: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at = 0;
    let mut i = 0;
    while at < body.len() {
        let n = sizes[i % sizes.len()].max(1).min(body.len() - at);
        let line = match i % 3 {
            0 => format!("{n:x}\r\n"),
            1 => format!("{n:X}\r\n"),
            _ => format!("{n:x};note=\"chunk {i}\"\r\n"),
        };
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(&body[at..at + n]);
        out.extend_from_slice(b"\r\n");
        at += n;
        i += 1;
    }
    out.extend_from_slice(b"0\r\n");
    out.extend_from_slice(trailer.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

const CHUNK_SIZES: &[usize] = &[1, 7, 4096, 65536, 100_000, 3, 16_384, 250_000, 2];

/// `PUT` with `Transfer-Encoding: chunked`.
fn put_chunked(p: &Proxy, token: &str, name: &str, body: &[u8], sizes: &[usize]) -> Resp {
    let mut req = put_head(name, token, "Transfer-Encoding: chunked\r\n", "").into_bytes();
    req.extend_from_slice(&chunked(body, sizes, ""));
    parse(&exchange(p, &req))
}

/// A request without a body, with extra header lines, on a fresh connection; the raw answer.
fn get_raw(p: &Proxy, method: &str, path: &str, token: Option<&str>, extra: &str) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str(extra);
    req.push_str("\r\n");
    exchange(p, req.as_bytes())
}

fn get(p: &Proxy, path: &str, token: &str, extra: &str) -> Resp {
    parse(&get_raw(p, "GET", path, Some(token), extra))
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// The contract's error response.
#[track_caller]
fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(
        r.status,
        status,
        "wanted {status} {code}, got {} {}",
        r.status,
        r.text()
    );
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "error body: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error body: {v}"
    );
}

/// A `201` for `owner/name` holding `body`.
#[track_caller]
fn assert_created(r: &Resp, owner: &str, name: &str, body: &[u8]) {
    assert_eq!(
        r.status,
        201,
        "upload {owner}/{name}: {} {}",
        r.status,
        r.text()
    );
    let v = r.json();
    assert_eq!(
        keys(&v),
        ["name", "owner", "readers", "sha256", "size"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "{v}"
    );
    assert_eq!(v["owner"], owner, "{v}");
    assert_eq!(v["name"], name, "{v}");
    assert_eq!(v["size"], body.len() as u64, "{v}");
    assert_eq!(v["sha256"], sha_hex(body), "{v}");
}

/// Downloads `owner/name` on a keep-alive connection and checks it is exactly `body`, with
/// the ETag and Accept-Ranges; a request pipelined behind it proves no byte too many was sent.
#[track_caller]
fn assert_download(p: &Proxy, token: &str, owner: &str, name: &str, body: &[u8]) {
    let mut s = connect(p);
    let req = format!(
        "GET /v1/resources/{owner}/{name} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\r\n\
         GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.status, 200, "download {owner}/{name}: {}", r.text());
    assert_eq!(
        r.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert!(
        r.body == body,
        "{owner}/{name}: the bytes differ (size {})",
        body.len()
    );
    assert_eq!(sha_hex(&r.body), sha_hex(body));
    assert_eq!(
        r.header("etag"),
        Some(format!("\"{}\"", sha_hex(body)).as_str())
    );
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    let next = read_response(&mut s, &mut buf);
    assert_eq!(
        (next.status, next.json()),
        (200, json!({"status": "ok"})),
        "the request after the download of {owner}/{name}"
    );
    read_rest(&mut s, &mut buf);
    assert!(buf.is_empty(), "bytes after the last answer: {}", buf.len());
}

/// Downloads `owner/name` with `Connection: close` (or as HTTP/1.0): the whole body, then EOF.
#[track_caller]
fn assert_download_then_close(
    p: &Proxy,
    token: &str,
    owner: &str,
    name: &str,
    body: &[u8],
    version: &str,
) {
    let req = format!(
        "GET /v1/resources/{owner}/{name} {version}\r\nHost: test\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    let raw = exchange(p, req.as_bytes());
    let r = parse(&raw);
    assert_eq!(
        r.status,
        200,
        "{version} download {owner}/{name}: {}",
        r.text()
    );
    assert_eq!(
        r.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    let head_len = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(
        raw.len() - head_len,
        body.len(),
        "{version} Connection: close download of {owner}/{name}: bytes before EOF \
         (Content-Length {})",
        body.len()
    );
    assert!(r.body == body, "{owner}/{name}: the bytes differ");
}

fn list(p: &Proxy, token: &str) -> Value {
    let r = get(p, "/v1/resources", token, "");
    assert_eq!(r.status, 200, "list: {}", r.text());
    let v = r.json();
    assert_eq!(keys(&v), ["resources".to_string()].into(), "{v}");
    v
}

/// The listing as a set of `(owner, name, size, sha256)`.
fn listed(p: &Proxy, token: &str) -> BTreeSet<(String, String, u64, String)> {
    list(p, token)["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(
                keys(e),
                ["name", "owner", "readers", "sha256", "size"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                "{e}"
            );
            (
                e["owner"].as_str().unwrap().to_string(),
                e["name"].as_str().unwrap().to_string(),
                e["size"].as_u64().unwrap(),
                e["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn entry(owner: &str, name: &str, body: &[u8]) -> (String, String, u64, String) {
    (owner.into(), name.into(), body.len() as u64, sha_hex(body))
}

/// Polls `f` every 20 ms until it holds; panics after `WAIT`.
#[track_caller]
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "not within {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Names of the entries in a directory (empty when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Sizes of the files in a directory.
fn sizes_in(dir: &Path) -> Vec<u64> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .collect()
        })
        .unwrap_or_default()
}

/// Every file and directory under `root`, relative, sorted.
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let path = e.path();
            out.insert(path.strip_prefix(root).unwrap().to_string_lossy().into());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// `VmHWM` (peak resident set) of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

// ---------------------------------------------------------------------------------------------
// 1. Round trips
// ---------------------------------------------------------------------------------------------

const SIZES: &[usize] = &[0, 1, 65535, 65536, 65537, 3 * MIB];

#[test]
fn round_trips_by_content_length_and_chunked() {
    let p = start_mem(&[]);
    let alice = p.federation_token("alice");
    let bob = p.federation_token("bob");
    let admin = p.admin_token();
    for (i, &size) in SIZES.iter().enumerate() {
        let body = data(size, 1000 + i as u64);
        let name = format!("len-{size}.bin");
        assert_created(&put(&p, &alice, &name, &body), "alice", &name, &body);
        let cname = format!("chunked-{size}.bin");
        assert_created(
            &put_chunked(&p, &alice, &cname, &body, CHUNK_SIZES),
            "alice",
            &cname,
            &body,
        );
        // Any federation token and an admin token may read.
        assert_download(&p, &alice, "alice", &name, &body);
        assert_download(&p, &bob, "alice", &cname, &body);
        assert_download(&p, &admin, "alice", &name, &body);
        // HEAD: the length and the ETag, no body.
        let raw = get_raw(
            &p,
            "HEAD",
            &format!("/v1/resources/alice/{name}"),
            Some(&alice),
            "",
        );
        let r = parse(&raw);
        assert_eq!(r.status, 200, "HEAD {name}");
        assert_eq!(r.header("content-length"), Some(size.to_string().as_str()));
        assert_eq!(
            r.header("etag"),
            Some(format!("\"{}\"", sha_hex(&body)).as_str())
        );
        assert_eq!(r.header("accept-ranges"), Some("bytes"));
        let head_len = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(raw.len(), head_len, "HEAD {name} sent a body");
    }
    let want: BTreeSet<_> = SIZES
        .iter()
        .enumerate()
        .flat_map(|(i, &size)| {
            let body = data(size, 1000 + i as u64);
            [
                entry("alice", &format!("len-{size}.bin"), &body),
                entry("alice", &format!("chunked-{size}.bin"), &body),
            ]
        })
        .collect();
    assert_eq!(listed(&p, &admin), want);
}

#[test]
fn chunked_framing_split_at_every_byte_and_trailers() {
    let p = start_mem(&[]);
    let alice = p.federation_token("alice");
    let body = data(3000, 7);
    let mut req = put_head("tiny.bin", &alice, "Transfer-Encoding: chunked\r\n", "").into_bytes();
    req.extend_from_slice(&chunked(&body, &[1, 2, 1000, 5], "X-Trailer: yes\r\n"));
    let mut s = connect(&p);
    s.set_nodelay(true).unwrap();
    // The head whole, then the body a few bytes per write.
    let split = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    s.write_all(&req[..split]).unwrap();
    for piece in req[split..].chunks(3) {
        s.write_all(piece).unwrap();
    }
    let mut out = Vec::new();
    read_rest(&mut s, &mut out);
    assert_created(&parse(&out), "alice", "tiny.bin", &body);
    assert_download(&p, &alice, "alice", "tiny.bin", &body);
}

#[test]
fn keep_alive_head_then_get_then_put_on_one_connection() {
    let p = start_mem(&[]);
    let alice = p.federation_token("alice");
    let body = data(70_000, 11);
    assert_created(&put(&p, &alice, "ka.bin", &body), "alice", "ka.bin", &body);
    let mut s = connect(&p);
    let second = data(1234, 12);
    let mut req = format!(
        "HEAD /v1/resources/alice/ka.bin HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {alice}\r\n\r\n\
         GET /v1/resources/alice/ka.bin HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {alice}\r\nRange: bytes=5-9\r\n\r\n\
         PUT /v1/resources/ka2.bin HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {alice}\r\nContent-Length: {}\r\n\r\n",
        second.len()
    )
    .into_bytes();
    req.extend_from_slice(&second);
    req.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(&req).unwrap();
    let mut buf = Vec::new();
    // HEAD's Content-Length describes the resource: its body is not on the wire.
    let end = read_head(&mut s, &mut buf);
    let head = parse(&buf[..end]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("70000"));
    buf.drain(..end);
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.status, 206, "pipelined GET after HEAD: {}", r.text());
    assert_eq!(r.body, &body[5..10]);
    let r = read_response(&mut s, &mut buf);
    assert_created(&r, "alice", "ka2.bin", &second);
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
}

#[test]
fn downloads_with_connection_close_are_complete() {
    let p = start_mem(&[]);
    let alice = p.federation_token("alice");
    for (i, size) in [65_536usize, 262_144, 262_145, 3 * MIB]
        .into_iter()
        .enumerate()
    {
        let body = data(size, 300 + i as u64);
        let name = format!("close-{size}");
        assert_created(&put(&p, &alice, &name, &body), "alice", &name, &body);
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            assert_download_then_close(&p, &alice, "alice", &name, &body, version);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Ranges
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn assert_range(p: &Proxy, token: &str, range: &str, body: &[u8], start: usize, end: usize) {
    let r = get(
        p,
        "/v1/resources/alice/r.bin",
        token,
        &format!("Range: {range}\r\n"),
    );
    assert_eq!(r.status, 206, "{range}: {} {}", r.status, r.text());
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {start}-{end}/{}", body.len()).as_str()),
        "{range}"
    );
    assert_eq!(
        r.header("content-length"),
        Some((end - start + 1).to_string().as_str()),
        "{range}"
    );
    assert_eq!(r.body, &body[start..=end], "{range}");
    assert_eq!(
        r.header("etag"),
        Some(format!("\"{}\"", sha_hex(body)).as_str()),
        "{range}"
    );
}

#[track_caller]
fn assert_416(p: &Proxy, token: &str, path: &str, range: &str, size: usize) {
    let r = get(p, path, token, &format!("Range: {range}\r\n"));
    assert_eq!(r.status, 416, "{range}: {} {}", r.status, r.text());
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{size}").as_str()),
        "{range}"
    );
}

#[test]
fn ranges_at_the_edges() {
    let p = start_mem(&[]);
    let alice = p.federation_token("alice");
    let body = data(100_000, 21);
    let n = body.len();
    assert_created(&put(&p, &alice, "r.bin", &body), "alice", "r.bin", &body);
    assert_range(&p, &alice, "bytes=0-0", &body, 0, 0);
    assert_range(
        &p,
        &alice,
        &format!("bytes={}-{}", n - 1, n - 1),
        &body,
        n - 1,
        n - 1,
    );
    assert_range(&p, &alice, "bytes=-1", &body, n - 1, n - 1);
    assert_range(&p, &alice, "bytes=-100", &body, n - 100, n - 1);
    assert_range(&p, &alice, &format!("bytes=-{}", n + 5000), &body, 0, n - 1);
    assert_range(
        &p,
        &alice,
        &format!("bytes={}-", n - 1),
        &body,
        n - 1,
        n - 1,
    );
    assert_range(&p, &alice, "bytes=10-19", &body, 10, 19);
    assert_range(&p, &alice, "bytes=65530-65545", &body, 65530, 65545);
    assert_range(&p, &alice, "bytes=99990-999999", &body, 99990, n - 1);
    assert_range(&p, &alice, "bytes=0-", &body, 0, n - 1);
    let path = "/v1/resources/alice/r.bin";
    assert_416(&p, &alice, path, &format!("bytes={n}-"), n);
    assert_416(&p, &alice, path, &format!("bytes={}-{}", n, n + 10), n);
    assert_416(&p, &alice, path, &format!("bytes={}-", n + 1_000_000), n);
    // Several ranges: the whole resource, 200.
    for multi in ["bytes=0-1,3-4", "bytes=0-0,-1", "bytes=10-19, 30-39"] {
        let r = get(&p, path, &alice, &format!("Range: {multi}\r\n"));
        assert_eq!(r.status, 200, "{multi}: {}", r.status);
        assert_eq!(r.header("content-range"), None, "{multi}");
        assert!(r.body == body, "{multi}: whole body");
    }
    // If-None-Match with the ETag: 304, no body; another tag: the bytes.
    let etag = format!("\"{}\"", sha_hex(&body));
    let raw = get_raw(
        &p,
        "GET",
        path,
        Some(&alice),
        &format!("If-None-Match: {etag}\r\n"),
    );
    let r = parse(&raw);
    assert_eq!(r.status, 304, "If-None-Match: {}", r.text());
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert!(raw.ends_with(b"\r\n\r\n"), "304 has no body");
    let r = get(
        &p,
        path,
        &alice,
        &format!("If-None-Match: \"0000\", {etag}\r\n"),
    );
    assert_eq!(r.status, 304, "a list holding the ETag");
    let r = get(&p, path, &alice, "If-None-Match: \"0000\"\r\n");
    assert_eq!(r.status, 200);
    assert!(r.body == body);

    // An empty resource has no satisfiable range.
    assert_created(&put(&p, &alice, "empty", b""), "alice", "empty", b"");
    let e = "/v1/resources/alice/empty";
    assert_416(&p, &alice, e, "bytes=0-", 0);
    assert_416(&p, &alice, e, "bytes=0-0", 0);
    assert_416(&p, &alice, e, "bytes=-1", 0);
    let r = get(&p, e, &alice, "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("0"));
    assert_eq!(
        r.header("etag"),
        Some(format!("\"{}\"", sha_hex(b"")).as_str())
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Listing, delete rights, replacement
// ---------------------------------------------------------------------------------------------

#[test]
fn listing_delete_rights_and_replacement() {
    let scratch = Scratch::new("res-list");
    let p = start_with_state(&scratch.state(), &[]);
    let alice = p.federation_token("alice");
    let bob = p.federation_token("bob");
    let admin = p.admin_token();
    assert_eq!(list(&p, &alice), json!({"resources": []}));
    let (a1, a2, b1) = (data(10, 31), data(20_000, 32), data(5, 33));
    assert_created(&put(&p, &alice, "one", &a1), "alice", "one", &a1);
    assert_created(&put(&p, &alice, "two.txt", &a2), "alice", "two.txt", &a2);
    assert_created(&put(&p, &bob, "one", &b1), "bob", "one", &b1);
    let all: BTreeSet<_> = [
        entry("alice", "one", &a1),
        entry("alice", "two.txt", &a2),
        entry("bob", "one", &b1),
    ]
    .into();
    assert_eq!(listed(&p, &alice), all);
    assert_eq!(listed(&p, &bob), all);
    assert_eq!(listed(&p, &admin), all);
    // On disk: <state>/resources/<owner>/<name>.
    assert_eq!(
        std::fs::read(scratch.resources().join("alice").join("two.txt")).unwrap(),
        a2
    );
    // No token: 401; an admin token may not upload (wrong type: 403).
    let r = parse(&get_raw(&p, "GET", "/v1/resources", None, ""));
    assert_error(&r, 401, "missing_token");
    let r = parse(&get_raw(&p, "GET", "/v1/resources/alice/one", None, ""));
    assert_error(&r, 401, "missing_token");
    let r = put(&p, &admin, "by-admin", b"x");
    assert_error(&r, 403, "wrong_type");
    let r = put(&p, "not.a.token", "bad-token", b"x");
    assert_eq!(r.status, 401, "{}", r.text());
    let r = get(&p, "/v1/resources/alice/nothing", &alice, "");
    assert_error(&r, 404, "not_found");
    let r = parse(&get_raw(
        &p,
        "POST",
        "/v1/resources/alice/one",
        Some(&alice),
        "Content-Length: 0\r\n",
    ));
    assert_eq!(r.status, 405, "POST on a resource");
    assert!(r.header("allow").is_some(), "405 without Allow");

    // Delete: another server 403, the owner 204, then 404; an admin 204.
    let del = |tok: &str, path: &str| parse(&get_raw(&p, "DELETE", path, Some(tok), ""));
    assert_error(&del(&bob, "/v1/resources/alice/one"), 403, "forbidden");
    assert_download(&p, &alice, "alice", "one", &a1);
    let r = del(&alice, "/v1/resources/alice/one");
    assert_eq!(r.status, 204, "owner delete: {}", r.text());
    assert!(r.body.is_empty());
    assert!(!scratch.resources().join("alice").join("one").exists());
    assert!(
        !entries(&scratch.resources().join("alice"))
            .iter()
            .any(|e| e.contains("one")),
        "the sidecar went with it: {:?}",
        entries(&scratch.resources().join("alice"))
    );
    assert_error(
        &get(&p, "/v1/resources/alice/one", &alice, ""),
        404,
        "not_found",
    );
    assert_eq!(del(&alice, "/v1/resources/alice/one").status, 404);
    let r = del(&admin, "/v1/resources/bob/one");
    assert_eq!(r.status, 204, "admin delete: {}", r.text());
    assert_eq!(del(&admin, "/v1/resources/bob/one").status, 404);
    assert_eq!(del(&admin, "/v1/resources/nobody/never").status, 404);
    assert_eq!(listed(&p, &admin), [entry("alice", "two.txt", &a2)].into());

    // A second PUT replaces the first: size and sha256 change.
    let newer = data(777, 34);
    let r = put(&p, &alice, "two.txt", &newer);
    assert_created(&r, "alice", "two.txt", &newer);
    assert_ne!(r.json()["sha256"], sha_hex(&a2));
    assert_download(&p, &alice, "alice", "two.txt", &newer);
    assert_eq!(listed(&p, &bob), [entry("alice", "two.txt", &newer)].into());
    // ... also by chunked.
    let newest = data(150_001, 35);
    assert_created(
        &put_chunked(&p, &alice, "two.txt", &newest, &[65536]),
        "alice",
        "two.txt",
        &newest,
    );
    assert_download(&p, &bob, "alice", "two.txt", &newest);
    assert_eq!(
        listed(&p, &bob),
        [entry("alice", "two.txt", &newest)].into()
    );
    assert!(
        entries(&scratch.tmp()).is_empty(),
        "{:?}",
        entries(&scratch.tmp())
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Cut-off uploads
// ---------------------------------------------------------------------------------------------

#[test]
fn cut_off_uploads_leave_nothing() {
    let scratch = Scratch::new("res-cut");
    // Quota 1.5 MiB: a 1 MiB reservation leaked by a cut-off upload would refuse the next.
    let p = start_with_state(
        &scratch.state(),
        &[
            ("FEDMCP_RESOURCE_MAX_BYTES", "1048576"),
            ("FEDMCP_RESOURCE_QUOTA_BYTES", "1572864"),
        ],
    );
    let alice = p.federation_token("alice");
    let keep = data(1000, 41);
    assert_created(&put(&p, &alice, "keep", &keep), "alice", "keep", &keep);
    let before = listed(&p, &alice);
    let body = data(MIB, 42);

    // Content-Length 1 MiB, 100 KiB sent, then closed.
    let mut s = connect(&p);
    s.write_all(put_head("cut.bin", &alice, &format!("Content-Length: {MIB}\r\n"), "").as_bytes())
        .unwrap();
    s.write_all(&body[..100 * 1024]).unwrap();
    // The partial body is streamed to a temporary file meanwhile.
    wait_until("100 KiB in .tmp/", || {
        sizes_in(&scratch.tmp()) == vec![100 * 1024]
    });
    s.shutdown(Shutdown::Both).unwrap();
    drop(s);
    wait_until(".tmp/ empty after the cut", || {
        entries(&scratch.tmp()).is_empty()
    });
    assert!(!scratch.resources().join("alice").join("cut.bin").exists());
    assert!(
        !entries(&scratch.resources().join("alice"))
            .iter()
            .any(|e| e.contains("cut")),
        "{:?}",
        entries(&scratch.resources().join("alice"))
    );
    assert_error(
        &get(&p, "/v1/resources/alice/cut.bin", &alice, ""),
        404,
        "not_found",
    );
    assert_eq!(listed(&p, &alice), before);

    // Chunked, cut off in the middle of a chunk.
    let mut s = connect(&p);
    s.write_all(put_head("cutc.bin", &alice, "Transfer-Encoding: chunked\r\n", "").as_bytes())
        .unwrap();
    let mut sent = 0;
    for _ in 0..3 {
        s.write_all(b"8000\r\n").unwrap();
        s.write_all(&body[sent..sent + 0x8000]).unwrap();
        s.write_all(b"\r\n").unwrap();
        sent += 0x8000;
    }
    s.write_all(b"10000\r\n").unwrap();
    s.write_all(&body[sent..sent + 0x8000]).unwrap();
    sent += 0x8000;
    wait_until("the chunked prefix in .tmp/", || {
        sizes_in(&scratch.tmp()) == vec![sent as u64]
    });
    drop(s);
    wait_until(".tmp/ empty after the chunked cut", || {
        entries(&scratch.tmp()).is_empty()
    });
    assert_error(
        &get(&p, "/v1/resources/alice/cutc.bin", &alice, ""),
        404,
        "not_found",
    );
    assert_eq!(listed(&p, &alice), before);

    // Cut off inside a chunk-size line and inside the head (nothing to leave either way).
    let mut s = connect(&p);
    s.write_all(put_head("cutd.bin", &alice, "Transfer-Encoding: chunked\r\n", "").as_bytes())
        .unwrap();
    s.write_all(b"10\r\n0123456789abcdef\r\n1").unwrap();
    wait_until("16 bytes in .tmp/", || sizes_in(&scratch.tmp()) == vec![16]);
    drop(s);
    let mut s = connect(&p);
    s.write_all(b"PUT /v1/resources/cute.bin HTTP/1.1\r\nContent-Length: 10\r\n")
        .unwrap();
    drop(s);
    wait_until(".tmp/ empty after the last cuts", || {
        entries(&scratch.tmp()).is_empty()
    });
    assert_eq!(listed(&p, &alice), before);

    // No quota was leaked: a whole 1 MiB upload (quota 1.5 MiB) still fits, then the name
    // of the first cut-off upload works.
    assert_created(
        &put(&p, &alice, "cut.bin", &body),
        "alice",
        "cut.bin",
        &body,
    );
    assert_download(&p, &alice, "alice", "cut.bin", &body);
    assert!(entries(&scratch.tmp()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 5. Size limit and quota
// ---------------------------------------------------------------------------------------------

#[test]
fn oversize_content_length_refused_before_the_body() {
    let scratch = Scratch::new("res-big");
    let p = start_with_state(&scratch.state(), &[("FEDMCP_RESOURCE_MAX_BYTES", "100000")]);
    let alice = p.federation_token("alice");
    // At the limit exactly: accepted.
    let body = data(100_000, 51);
    assert_created(&put(&p, &alice, "max", &body), "alice", "max", &body);
    let before = tree(&scratch.0);
    // One over: the answer arrives though not one body byte was written.
    let mut s = connect(&p);
    s.write_all(put_head("big", &alice, "Content-Length: 100001\r\n", "").as_bytes())
        .unwrap();
    let mut buf = Vec::new();
    read_head(&mut s, &mut buf);
    read_rest(&mut s, &mut buf);
    assert_error(&parse(&buf), 413, "payload_too_large");
    // The same with the body sent.
    let r = put(&p, &alice, "big", &data(100_001, 52));
    assert_error(&r, 413, "payload_too_large");
    // A Content-Length far over (and over any u32).
    let r = parse(&exchange(
        &p,
        put_head("huge", &alice, "Content-Length: 99999999999999\r\n", "").as_bytes(),
    ));
    assert_error(&r, 413, "payload_too_large");
    // Replacing an existing resource with an oversize one keeps the old one.
    let r = put(&p, &alice, "max", &data(100_001, 53));
    assert_error(&r, 413, "payload_too_large");
    assert_download(&p, &alice, "alice", "max", &body);
    assert!(entries(&scratch.tmp()).is_empty());
    assert_eq!(listed(&p, &alice), [entry("alice", "max", &body)].into());
    assert_eq!(
        tree(&scratch.0),
        before,
        "nothing left by the refused uploads"
    );
}

#[test]
fn oversize_chunked_refused_and_nothing_left() {
    let scratch = Scratch::new("res-bigc");
    let p = start_with_state(&scratch.state(), &[("FEDMCP_RESOURCE_MAX_BYTES", "100000")]);
    let alice = p.federation_token("alice");
    let body = data(150_000, 53);
    let mut s = connect(&p);
    s.write_all(put_head("bigc", &alice, "Transfer-Encoding: chunked\r\n", "").as_bytes())
        .unwrap();
    // Chunks of 10000 until the proxy answers (it may close while we write).
    let writer = {
        let mut w = s.try_clone().unwrap();
        let body = body.clone();
        std::thread::spawn(move || {
            for c in body.chunks(10_000) {
                let mut framed = format!("{:x}\r\n", c.len()).into_bytes();
                framed.extend_from_slice(c);
                framed.extend_from_slice(b"\r\n");
                if !write_lenient(&mut w, &framed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = w.write_all(b"0\r\n\r\n");
        })
    };
    let mut buf = Vec::new();
    read_head(&mut s, &mut buf);
    read_rest(&mut s, &mut buf);
    writer.join().unwrap();
    assert_error(&parse(&buf), 413, "payload_too_large");
    wait_until(".tmp/ empty after the refused chunked upload", || {
        entries(&scratch.tmp()).is_empty()
    });
    assert_eq!(listed(&p, &alice), BTreeSet::new());
    assert!(!scratch.resources().join("alice").join("bigc").exists());
}

#[test]
fn chunked_upload_up_to_the_limit_is_accepted() {
    let p = start_mem(&[("FEDMCP_RESOURCE_MAX_BYTES", "100000")]);
    let alice = p.federation_token("alice");
    for (name, size) in [("small", 10), ("edge", 100_000)] {
        let body = data(size, 54);
        let r = put_chunked(&p, &alice, name, &body, &[4096]);
        assert_created(&r, "alice", name, &body);
    }
}

#[test]
fn quota_exceeded_and_nothing_left() {
    let scratch = Scratch::new("res-quota");
    let p = start_with_state(
        &scratch.state(),
        &[
            ("FEDMCP_RESOURCE_QUOTA_BYTES", "250000"),
            ("FEDMCP_RESOURCE_MAX_BYTES", "200000"),
        ],
    );
    let alice = p.federation_token("alice");
    let bob = p.federation_token("bob");
    let first = data(150_000, 61);
    assert_created(&put(&p, &alice, "first", &first), "alice", "first", &first);
    let before = tree(&scratch.0);
    // By Content-Length: refused from the head.
    let r = put(&p, &bob, "second", &data(150_000, 62));
    assert_error(&r, 507, "quota_exceeded");
    assert_eq!(tree(&scratch.0), before, "nothing left by the refusal");
    // What fits, fits: 150000 + 100000 = the quota exactly; one byte more does not.
    let fits = data(100_000, 64);
    assert_created(&put(&p, &bob, "fits", &fits), "bob", "fits", &fits);
    assert_error(&put(&p, &bob, "one-more", b"x"), 507, "quota_exceeded");
    // Replacing counts the new size, not both.
    let replace = data(140_000, 65);
    assert_created(
        &put(&p, &alice, "first", &replace),
        "alice",
        "first",
        &replace,
    );
    // Deleting frees quota.
    let r = parse(&get_raw(
        &p,
        "DELETE",
        "/v1/resources/bob/fits",
        Some(&bob),
        "",
    ));
    assert_eq!(r.status, 204);
    let stored = [entry("alice", "first", &replace)].into();
    assert_eq!(listed(&p, &alice), stored);
    let before = tree(&scratch.0);
    // By chunked: refused once it grows past the quota (140000 + 150000 > 250000).
    let r = put_chunked(&p, &bob, "second", &data(150_000, 63), &[10_000]);
    assert_error(&r, 507, "quota_exceeded");
    wait_until(".tmp/ empty after the chunked refusal", || {
        entries(&scratch.tmp()).is_empty()
    });
    assert_eq!(
        tree(&scratch.0),
        before,
        "nothing left by the chunked refusal"
    );
    assert_eq!(listed(&p, &alice), stored);
    // A chunked upload that fits is taken: 140000 + 110000 = the quota exactly.
    let chunk_fits = data(110_000, 66);
    assert_created(
        &put_chunked(&p, &bob, "chunk-fits", &chunk_fits, &[10_000]),
        "bob",
        "chunk-fits",
        &chunk_fits,
    );
}

/// An upload in progress holds its share of the quota; cut off, it gives it back.
#[test]
fn uploads_in_progress_hold_quota_until_cut_off() {
    let scratch = Scratch::new("res-reserve");
    let p = start_with_state(
        &scratch.state(),
        &[
            ("FEDMCP_RESOURCE_QUOTA_BYTES", "250000"),
            ("FEDMCP_RESOURCE_MAX_BYTES", "200000"),
        ],
    );
    let alice = p.federation_token("alice");
    let bob = p.federation_token("bob");
    let a = data(150_000, 69);
    let mut s = connect(&p);
    s.write_all(put_head("a", &alice, "Content-Length: 150000\r\n", "").as_bytes())
        .unwrap();
    s.write_all(&a[..50_000]).unwrap();
    wait_until("the first upload under way", || {
        sizes_in(&scratch.tmp()) == vec![50_000]
    });
    let b = data(150_000, 70);
    assert_error(&put(&p, &bob, "b", &b), 507, "quota_exceeded");
    drop(s);
    wait_until(".tmp/ empty after the cut", || {
        entries(&scratch.tmp()).is_empty()
    });
    assert_created(&put(&p, &bob, "b", &b), "bob", "b", &b);
    assert_eq!(listed(&p, &bob), [entry("bob", "b", &b)].into());
}

/// With a per-resource limit of 1 MiB (so the limit itself is not in the way), a chunked
/// upload that fits what is left of the quota is taken.
#[test]
fn chunked_upload_that_fits_the_quota_is_accepted() {
    let p = start_mem(&[
        ("FEDMCP_RESOURCE_MAX_BYTES", "1048576"),
        ("FEDMCP_RESOURCE_QUOTA_BYTES", "1572864"),
    ]);
    let alice = p.federation_token("alice");
    let big = data(MIB, 67);
    assert_created(&put(&p, &alice, "big", &big), "alice", "big", &big);
    // 1 MiB + 400 KiB <= 1.5 MiB.
    let more = data(400 * 1024, 68);
    assert_created(
        &put_chunked(&p, &alice, "more", &more, &[65_536]),
        "alice",
        "more",
        &more,
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Names
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_names_never_become_files() {
    let scratch = Scratch::new("res-names");
    let p = start_with_state(&scratch.state(), &[]);
    let alice = p.federation_token("alice");
    let ok = data(100, 71);
    assert_created(&put(&p, &alice, "ok.txt", &ok), "alice", "ok.txt", &ok);
    let before = tree(&scratch.0);
    let r = put(&p, &alice, "..%2fx", b"evil");
    assert_error(&r, 400, "invalid_name");
    let long = "a".repeat(200);
    let bad = [
        ".hidden",
        "%2ehidden",
        "%00",
        "a%00b",
        "a%2Fb",
        "a%2fb",
        "a/b",
        "..",
        "%2e%2e",
        ".",
        "%zz",
        "a%2",
        "a%",
        "%252e%252e",
        "a%20b",
        "a%5cb",
        "%c3%a4",
        "",
        long.as_str(),
        &"b".repeat(129),
    ];
    for name in bad {
        let r = put(&p, &alice, name, b"evil");
        assert!(
            (400..500).contains(&r.status),
            "PUT /v1/resources/{name}: {} {}",
            r.status,
            r.text()
        );
        let r = put_chunked(&p, &alice, name, b"evil", &[2]);
        assert!(
            (400..500).contains(&r.status),
            "chunked PUT /v1/resources/{name}: {} {}",
            r.status,
            r.text()
        );
    }
    for name in ["%00", "a%2Fb", "%zz", long.as_str(), ".hidden"] {
        assert_error(&put(&p, &alice, name, b"evil"), 400, "invalid_name");
    }
    assert_eq!(tree(&scratch.0), before, "a bad name left a file");
    assert_eq!(listed(&p, &alice), [entry("alice", "ok.txt", &ok)].into());
    // Outside the scratch dir too: `..%2fx` from resources/ would be <state>/x.
    assert!(!scratch.state().join("x").exists());
    assert!(!scratch.0.join("x").exists());

    // Good names at the edges; a percent-encoded letter is decoded once.
    let max = "N".repeat(128);
    for (raw, name) in [
        (max.as_str(), max.as_str()),
        ("a.b_c-D9", "a.b_c-D9"),
        ("x..y", "x..y"),
        ("%41bc", "Abc"),
        ("-", "-"),
        ("_", "_"),
    ] {
        let r = put(&p, &alice, raw, b"fine");
        assert_created(&r, "alice", name, b"fine");
        assert_download(&p, &alice, "alice", name, b"fine");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Expect: 100-continue
// ---------------------------------------------------------------------------------------------

#[test]
fn expect_continue_only_for_accepted_uploads() {
    let p = start_mem(&[("FEDMCP_RESOURCE_MAX_BYTES", "1048576")]);
    let alice = p.federation_token("alice");
    let body = data(50_000, 81);
    for framing in [
        format!("Content-Length: {}\r\n", body.len()),
        "Transfer-Encoding: chunked\r\n".to_string(),
    ] {
        let mut s = connect(&p);
        s.write_all(put_head("cont", &alice, &framing, "Expect: 100-continue\r\n").as_bytes())
            .unwrap();
        let mut buf = Vec::new();
        let end = read_head(&mut s, &mut buf);
        assert_eq!(
            &buf[..end],
            b"HTTP/1.1 100 Continue\r\n\r\n",
            "{framing}: the interim answer comes first"
        );
        buf.drain(..end);
        if framing.starts_with("Content-Length") {
            s.write_all(&body).unwrap();
        } else {
            s.write_all(&chunked(&body, &[30_000], "")).unwrap();
        }
        read_rest(&mut s, &mut buf);
        assert_created(&parse(&buf), "alice", "cont", &body);
    }
    // Refused: the final status comes, without a 100.
    let refusals = [
        (
            put_head(
                "cont",
                "bad.token.here",
                "Content-Length: 10\r\n",
                "Expect: 100-continue\r\n",
            ),
            401,
        ),
        (
            put_head(
                "cont",
                &p.admin_token(),
                "Content-Length: 10\r\n",
                "Expect: 100-continue\r\n",
            ),
            403,
        ),
        (
            put_head(
                "cont",
                &alice,
                "Content-Length: 1048577\r\n",
                "Expect: 100-continue\r\n",
            ),
            413,
        ),
        (
            put_head(
                ".cont",
                &alice,
                "Content-Length: 10\r\n",
                "Expect: 100-continue\r\n",
            ),
            400,
        ),
    ];
    for (head, status) in refusals {
        let mut s = connect(&p);
        s.write_all(head.as_bytes()).unwrap();
        let mut buf = Vec::new();
        read_head(&mut s, &mut buf);
        read_rest(&mut s, &mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status} ")),
            "wanted {status} first: {text:?}"
        );
        assert!(!text.contains("100 Continue"), "{text:?}");
    }
    assert_download(&p, &alice, "alice", "cont", &body);
}

// ---------------------------------------------------------------------------------------------
// 8. Restart
// ---------------------------------------------------------------------------------------------

#[test]
fn resources_survive_kill_and_restart() {
    let scratch = Scratch::new("res-restart");
    let a = data(3 * MIB + 17, 91);
    let b = data(65_537, 92);
    let want: BTreeSet<_> = [entry("alice", "a.bin", &a), entry("bob", "b.bin", &b)].into();
    {
        let mut p = start_with_state(&scratch.state(), &[]);
        let alice = p.federation_token("alice");
        let bob = p.federation_token("bob");
        assert_created(&put(&p, &alice, "a.bin", &a), "alice", "a.bin", &a);
        assert_created(
            &put_chunked(&p, &bob, "b.bin", &b, CHUNK_SIZES),
            "bob",
            "b.bin",
            &b,
        );
        // An upload in progress when the proxy dies.
        let mut s = connect(&p);
        s.write_all(put_head("partial", &alice, "Content-Length: 500000\r\n", "").as_bytes())
            .unwrap();
        s.write_all(&a[..200_000]).unwrap();
        wait_until("the partial upload in .tmp/", || {
            sizes_in(&scratch.tmp()) == vec![200_000]
        });
        assert_eq!(listed(&p, &alice), want);
        p.child.kill().unwrap(); // SIGKILL
        let _ = p.child.wait();
    }
    let p = start_with_state(&scratch.state(), &[]);
    let alice = p.federation_token("alice");
    assert_eq!(listed(&p, &alice), want);
    assert_download(&p, &alice, "alice", "a.bin", &a);
    assert_download(&p, &alice, "bob", "b.bin", &b);
    assert_error(
        &get(&p, "/v1/resources/alice/partial", &alice, ""),
        404,
        "not_found",
    );
    assert!(
        entries(&scratch.tmp()).is_empty(),
        "{:?}",
        entries(&scratch.tmp())
    );
    // The ETag is the same after the restart.
    let r = get(
        &p,
        "/v1/resources/alice/a.bin",
        &alice,
        &format!("If-None-Match: \"{}\"\r\n", sha_hex(&a)),
    );
    assert_eq!(r.status, 304);
}

#[test]
fn memory_only_resources_are_private_and_gone_after_exit() {
    let mut p = start_mem(&[]);
    let alice = p.federation_token("alice");
    let body = data(1000, 95);
    assert_created(&put(&p, &alice, "m", &body), "alice", "m", &body);
    let dir = memory_dir(&p);
    assert!(
        dir.is_dir(),
        "memory-only resources live in {}",
        dir.display()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is private", dir.display());
    }
    assert_eq!(p.terminate(), Some(0));
    let left = tree(&dir);
    assert!(
        !dir.exists(),
        "a memory-only proxy left its resources behind after a clean exit: {} {left:?}",
        dir.display()
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Memory bound on large transfers
// ---------------------------------------------------------------------------------------------

/// What a control session saw during a transfer.
struct Watch {
    answers: u32,
    /// The slowest answer and when it was asked (since the watch began).
    worst: Duration,
    worst_at: Duration,
    /// Answers slower than 1 s, as (asked at, took).
    slow: Vec<(Duration, Duration)>,
}

/// A control session asks `federation/servers` every 50 ms until `done`.
fn control_watch(mut ws: Ws, done: Arc<AtomicBool>) -> std::thread::JoinHandle<Watch> {
    std::thread::spawn(move || {
        let begin = Instant::now();
        let mut w = Watch {
            answers: 0,
            worst: Duration::ZERO,
            worst_at: Duration::ZERO,
            slow: Vec::new(),
        };
        while !done.load(Ordering::SeqCst) {
            let id = json!(format!("w{}", w.answers));
            let at = begin.elapsed();
            let t = Instant::now();
            ws.send(&json!({"jsonrpc": "2.0", "id": id, "method": "federation/servers"}));
            let r = ws.recv_id(&id);
            let took = t.elapsed();
            assert!(r["result"]["servers"].is_array(), "{r}");
            if took > w.worst {
                (w.worst, w.worst_at) = (took, at);
            }
            if took >= Duration::from_secs(1) {
                w.slow.push((at, took));
            }
            w.answers += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        w
    })
}

/// Uploads then downloads `size` pseudo-random bytes (never all in the test's memory),
/// checking the proxy's peak RSS and a control session's latency during each.
fn big_transfer(size: u64, label: &str) {
    let scratch = Scratch::new("res-mem");
    let p = start_with_state(&scratch.state(), &[]);
    let pid = p.pid();
    let alice = p.federation_token("alice");
    let hwm_start = vm_hwm_kib(pid);

    // Upload by Content-Length, 1 MiB writes.
    let (ws, _) = p.online(&p.federation_token("watcher"), json!({}));
    let done = Arc::new(AtomicBool::new(false));
    let watch = control_watch(ws, done.clone());
    let t = Instant::now();
    let mut s = connect(&p);
    s.write_all(
        put_head(
            "big.bin",
            &alice,
            &format!("Content-Length: {size}\r\n"),
            "",
        )
        .as_bytes(),
    )
    .unwrap();
    let mut rng = Rng::new(0xB16);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; MIB];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB as u64) as usize;
        rng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    let want = hex(hasher.finalize().as_slice());
    let mut out = Vec::new();
    read_head(&mut s, &mut out);
    read_rest(&mut s, &mut out);
    let up_secs = t.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    let up_watch = watch.join().expect("control session during the upload");
    let r = parse(&out);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["size"], size);
    assert_eq!(r.json()["sha256"], want);
    let hwm_up = vm_hwm_kib(pid);

    // Download, read and hashed 1 MiB at a time.
    let (ws, _) = p.online(&p.federation_token("watcher"), json!({}));
    let done = Arc::new(AtomicBool::new(false));
    let watch = control_watch(ws, done.clone());
    let t = Instant::now();
    let mut s = connect(&p);
    s.write_all(
        format!(
            "GET /v1/resources/alice/big.bin HTTP/1.1\r\nHost: t\r\n\
             Authorization: Bearer {alice}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut head = Vec::new();
    let end = read_head(&mut s, &mut head);
    let h = parse(&head[..end]);
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some(size.to_string().as_str()));
    assert_eq!(h.header("etag"), Some(format!("\"{want}\"").as_str()));
    let mut hasher = Sha256::new();
    hasher.update(&head[end..]);
    let mut got = (head.len() - end) as u64;
    while got < size {
        let want = (size - got).min(MIB as u64) as usize;
        match s.read(&mut buf[..want]) {
            Ok(0) => panic!("download ended after {got} of {size} bytes"),
            Ok(n) => {
                hasher.update(&buf[..n]);
                got += n as u64;
            }
            Err(e) => panic!("download read failed after {got} bytes: {e}"),
        }
    }
    let down_secs = t.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    let down_watch = watch.join().expect("control session during the download");
    assert_eq!(got, size, "downloaded bytes");
    assert_eq!(hex(hasher.finalize().as_slice()), want);
    let hwm_down = vm_hwm_kib(pid);
    let mib = size as f64 / MIB as f64;
    eprintln!(
        "{label}: {mib:.0} MiB; proxy VmHWM {hwm_start} KiB at start, {hwm_up} KiB after the \
         upload ({up_secs:.1} s, {:.0} MiB/s; {} control answers, slowest {:?} asked at {:?}), \
         {hwm_down} KiB after the download ({down_secs:.1} s, {:.0} MiB/s; {} control \
         answers, slowest {:?} asked at {:?})",
        mib / up_secs,
        up_watch.answers,
        up_watch.worst,
        up_watch.worst_at,
        mib / down_secs,
        down_watch.answers,
        down_watch.worst,
        down_watch.worst_at,
    );
    assert!(
        up_watch.answers >= 1 && down_watch.answers >= 1,
        "control checks ran"
    );
    assert!(
        hwm_up < HWM_LIMIT_KIB,
        "VmHWM {hwm_up} KiB after the upload"
    );
    assert!(
        hwm_down < HWM_LIMIT_KIB,
        "VmHWM {hwm_down} KiB after the download"
    );
    assert!(
        up_watch.slow.is_empty(),
        "federation/servers took 1 s or more during the upload ({up_secs:.1} s long), \
         as (asked at, took): {:?}",
        up_watch.slow
    );
    assert!(
        down_watch.slow.is_empty(),
        "federation/servers took 1 s or more during the download ({down_secs:.1} s long), \
         as (asked at, took): {:?}",
        down_watch.slow
    );
}

#[test]
fn memory_bounded_for_256_mib_upload_and_download() {
    big_transfer(256 * MIB as u64, "memory_bounded_256mib");
}

/// `make soak`: the same with `FEDMCP_SOAK_BYTES` (default 1 GiB), release build.
#[test]
#[ignore]
fn soak_1gib_upload_and_download() {
    let size = std::env::var("FEDMCP_SOAK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64 << 30);
    big_transfer(size, "soak");
}
