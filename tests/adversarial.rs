//! Hostile HTTP clients against the real binary: the token attack catalogue (docs/PROTOCOL.md §2)
//! on an admin endpoint and on the control upgrade, and WebSocket upgrade requests that break
//! RFC 6455 (§3, §4). Each case asserts the contract's answer; afterwards the proxy must still
//! serve a fresh client.
//!
//! Existing tests cover parts of this one endpoint at a time (`tests/http_api.rs`,
//! `tests/control.rs`); this file runs one catalogue over both kinds of endpoint, through the
//! header and the query parameter, and adds the boundaries (a token of exactly 4096 bytes,
//! truncated signatures, duplicate keys that would change the meaning of a token).
//!
//! Every wait is bounded: socket reads time out and every loop carries a deadline.
mod common;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD as B64};
use common::*;
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
const OTHER_SECRET: &str = "another-secret-0123456789-abcdefghijklmnop";
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// `input` + "." + its HS256 signature under `secret`.
fn sign_input(secret: &str, input: &str) -> String {
    let sig = jwt::hmac_b64(secret.as_bytes(), &[input.as_bytes()]);
    format!("{input}.{sig}")
}

/// A compact token with exactly this header and claims text, HS256-signed with `secret`: only
/// what the test changes differs from a good token.
fn craft(secret: &str, header: &str, claims: &str) -> String {
    sign_input(
        secret,
        &format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes())),
    )
}

/// Claims text for `id` of type `typ` with these times.
fn claims(id: &str, typ: &str, iat: i64, exp: i64) -> String {
    json!({"serverId": id, "type": typ, "iat": iat, "exp": exp}).to_string()
}

/// Valid claims for an hour.
fn good_claims(id: &str, typ: &str) -> String {
    let now = now_secs();
    claims(id, typ, now, now + 3600)
}

/// Percent-encodes everything but the unreserved characters (for `?token=`).
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The proxy's resident set size in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// Sends `req` on a fresh connection and reads exactly one response: its head and its
/// `Content-Length` body (a `101` has none). Bounded by `WAIT`; panics on EOF before a
/// complete response.
fn exchange(p: &Proxy, req: &[u8]) -> Resp {
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s.write_all(req).unwrap();
    let mut buf = Vec::new();
    let t0 = Instant::now();
    loop {
        if let Some((r, _)) = Resp::parse_one(&buf) {
            let want = if r.status == 101 {
                0
            } else {
                r.header("content-length")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0)
            };
            if r.body.len() >= want {
                return r;
            }
        }
        assert!(
            t0.elapsed() < WAIT,
            "no complete response within {WAIT:?}: {:?}",
            String::from_utf8_lossy(&buf)
        );
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk) {
            Ok(0) => panic!(
                "EOF before a complete response: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!(
                "read failed ({e}) after {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
}

/// A `GET /v1/control` upgrade request with `extra` header lines (each ending in CRLF).
fn upgrade_req(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n{extra}\r\n"
    )
}

/// The contract's error body and status; for a 401 also the challenge header.
#[track_caller]
fn assert_refusal(r: &Resp, status: u16, code: &str, what: &str) {
    assert_eq!(
        (r.status, r.code_or_empty()),
        (status, code.to_string()),
        "{what}: wanted {status} {code}, got {} {}",
        r.status,
        r.text()
    );
    let v = r.json();
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(!msg.is_empty(), "{what}: no message in {v}");
    if status == 401 {
        let h = r.header("www-authenticate").unwrap_or("");
        assert_eq!(
            h, r#"Bearer error="invalid_token""#,
            "{what}: WWW-Authenticate on a 401"
        );
    }
}

trait CodeOrEmpty {
    fn code_or_empty(&self) -> String;
}

impl CodeOrEmpty for Resp {
    /// `error.code` when the body is the contract's error JSON, else "".
    fn code_or_empty(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// `GET /healthz` on a fresh connection answers 200 within `within`.
#[track_caller]
fn assert_healthy(p: &Proxy, within: Duration) {
    let t0 = Instant::now();
    let r = p.http("GET", "/healthz", None, None);
    assert_eq!(r.status, 200, "healthz: {}", r.text());
    assert!(
        t0.elapsed() < within,
        "healthz took {:?} (wanted under {within:?})",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// The token catalogue
// ---------------------------------------------------------------------------------------------

/// One hostile token and the contract's answer to it.
struct Case {
    what: String,
    token: String,
    status: u16,
    code: &'static str,
}

fn case(what: impl Into<String>, token: String, status: u16, code: &'static str) -> Case {
    Case {
        what: what.into(),
        token,
        status,
        code,
    }
}

/// A token of exactly `len` bytes, correctly signed, with valid claims of type `typ` (the
/// header's whitespace and a `jti` are the padding).
fn token_of_len(typ: &str, len: usize) -> String {
    let now = now_secs();
    for spaces in 0..4 {
        let header = format!(r#"{{"alg":"HS256",{}"typ":"JWT"}}"#, " ".repeat(spaces));
        for jti in 2900..3200 {
            // An ignored claim pads the token (a jti is at most 64 characters, §2).
            let c = json!({"serverId": "ops", "type": typ, "iat": now, "exp": now + 3600,
                           "pad": "j".repeat(jti)})
            .to_string();
            let t = craft(SECRET, &header, &c);
            if t.len() == len {
                return t;
            }
            if t.len() > len {
                break;
            }
        }
    }
    panic!("no token of exactly {len} bytes");
}

/// The catalogue for an endpoint that wants tokens of type `typ` (`other` is the wrong type).
fn catalogue(typ: &str, other: &str) -> Vec<Case> {
    let s = SECRET;
    let now = now_secs();
    let good = good_claims("ops", typ);
    let good_token = craft(s, HS256, &good);
    let (h_seg, c_seg, sig_seg) = {
        let v: Vec<&str> = good_token.split('.').collect();
        (v[0].to_string(), v[1].to_string(), v[2].to_string())
    };
    let mut v = Vec::new();

    // --- alg: anything but exactly "HS256" (signed with HS256 and the right secret, so only
    // the header's alg differs from a good token).
    for alg in [
        "none", "HS384", "HS512", "RS256", "hs256", "ES256", "HS256 ",
    ] {
        let header = json!({"alg": alg, "typ": "JWT"}).to_string();
        v.push(case(
            format!("alg {alg:?}"),
            craft(s, &header, &good),
            401,
            "unsupported_alg",
        ));
    }
    v.push(case(
        "alg none, empty signature (the classic none attack)",
        format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(good.as_bytes())
        ),
        401,
        "unsupported_alg",
    ));
    for (what, header) in [
        ("alg missing", r#"{"typ":"JWT"}"#),
        ("alg null", r#"{"alg":null,"typ":"JWT"}"#),
        ("alg an array", r#"{"alg":["HS256"],"typ":"JWT"}"#),
    ] {
        v.push(case(what, craft(s, header, &good), 401, "unsupported_alg"));
    }

    // --- the signature.
    v.push(case(
        "tampered claims (other serverId, signature kept)",
        format!(
            "{h_seg}.{}.{sig_seg}",
            b64(good_claims("root", typ).as_bytes())
        ),
        401,
        "bad_signature",
    ));
    v.push(case(
        format!("tampered claims ({other} token's signature over {typ} claims)"),
        {
            let t = craft(s, HS256, &good_claims("ops", other));
            let sig = t.rsplit('.').next().unwrap().to_string();
            format!("{h_seg}.{c_seg}.{sig}")
        },
        401,
        "bad_signature",
    ));
    v.push(case(
        "tampered header (keys reordered, signature kept)",
        format!(
            "{}.{c_seg}.{sig_seg}",
            b64(br#"{"typ":"JWT","alg":"HS256"}"#)
        ),
        401,
        "bad_signature",
    ));
    v.push(case(
        "stripped signature (empty third segment)",
        format!("{h_seg}.{c_seg}."),
        401,
        "bad_signature",
    ));
    // 43 characters carry 32 bytes. 40 characters decode cleanly to 30 bytes: a short MAC,
    // bad_signature. 41 characters cannot be base64: malformed_token. 42 decode to 31 bytes
    // only when the dropped bits happen to be zero (jwt.rs: non-canonical base64url is
    // malformed), so the expected code is computed.
    v.push(case(
        "signature truncated to 40 characters",
        format!("{h_seg}.{c_seg}.{}", &sig_seg[..40]),
        401,
        "bad_signature",
    ));
    v.push(case(
        "signature truncated to 41 characters",
        format!("{h_seg}.{c_seg}.{}", &sig_seg[..41]),
        401,
        "malformed_token",
    ));
    let code42 = if B64.decode(&sig_seg[..42]).is_ok() {
        "bad_signature"
    } else {
        "malformed_token"
    };
    v.push(case(
        "signature truncated to 42 characters",
        format!("{h_seg}.{c_seg}.{}", &sig_seg[..42]),
        401,
        code42,
    ));
    v.push(case(
        "signature truncated to one character",
        format!("{h_seg}.{c_seg}.{}", &sig_seg[..1]),
        401,
        "malformed_token",
    ));
    let flipped = {
        let mut b = sig_seg.clone().into_bytes();
        b[0] = if b[0] == b'A' { b'B' } else { b'A' };
        String::from_utf8(b).unwrap()
    };
    v.push(case(
        "signature with its first character changed",
        format!("{h_seg}.{c_seg}.{flipped}"),
        401,
        "bad_signature",
    ));
    v.push(case(
        "signature doubled (64 bytes)",
        format!(
            "{h_seg}.{c_seg}.{}",
            b64(&[B64.decode(&sig_seg).unwrap(), B64.decode(&sig_seg).unwrap()].concat())
        ),
        401,
        "bad_signature",
    ));
    v.push(case(
        "wrong secret",
        craft(OTHER_SECRET, HS256, &good),
        401,
        "bad_signature",
    ));
    v.push(case(
        "empty secret",
        craft("", HS256, &good),
        401,
        "bad_signature",
    ));
    v.push(case(
        "signed with the secret's prefix (32 bytes)",
        craft(&SECRET[..32], HS256, &good),
        401,
        "bad_signature",
    ));

    // --- encoding.
    let padded = |seg: &str| {
        let mut p = seg.to_string();
        while !p.len().is_multiple_of(4) {
            p.push('=');
        }
        p
    };
    // Pick a header whose encoding needs padding, and sign exactly what is sent.
    let hdr = (0..3)
        .map(|n| format!(r#"{{"alg":"HS256","typ":"JWT"{}}}"#, " ".repeat(n)))
        .find(|h| !h.len().is_multiple_of(3))
        .unwrap();
    v.push(case(
        "padded header segment",
        sign_input(s, &format!("{}.{c_seg}", padded(&b64(hdr.as_bytes())))),
        401,
        "malformed_token",
    ));
    let cl = (0..3)
        .map(|n| {
            json!({"serverId": "ops", "type": typ, "iat": now, "exp": now + 3600,
                   "jti": "j".repeat(n + 1)})
            .to_string()
        })
        .find(|c| !c.len().is_multiple_of(3))
        .unwrap();
    v.push(case(
        "padded claims segment",
        sign_input(s, &format!("{h_seg}.{}", padded(&b64(cl.as_bytes())))),
        401,
        "malformed_token",
    ));
    v.push(case(
        "padded signature segment",
        format!("{good_token}="),
        401,
        "malformed_token",
    ));
    let plus = (0..200)
        .map(|n| {
            json!({"serverId": "ops", "type": typ, "iat": now, "exp": now + 3600,
                   "jti": "?".repeat(n + 1)})
            .to_string()
        })
        .map(|c| STANDARD_NO_PAD.encode(c))
        .find(|e| e.contains(['+', '/']))
        .unwrap();
    v.push(case(
        "standard base64 alphabet in the claims",
        sign_input(s, &format!("{h_seg}.{plus}")),
        401,
        "malformed_token",
    ));
    v.push(case(
        "whitespace inside a segment",
        sign_input(s, &format!("{h_seg}.{} {}", &c_seg[..8], &c_seg[8..])),
        401,
        "malformed_token",
    ));
    v.push(case(
        "two segments",
        format!("{h_seg}.{c_seg}"),
        401,
        "malformed_token",
    ));
    v.push(case(
        "four segments",
        format!("{good_token}.{sig_seg}"),
        401,
        "malformed_token",
    ));
    v.push(case(
        "garbage",
        "not-a-token".into(),
        401,
        "malformed_token",
    ));
    v.push(case(
        "4097 bytes, correctly signed",
        token_of_len(typ, 4097),
        401,
        "malformed_token",
    ));
    v.push(case(
        "10000 bytes, correctly signed",
        craft(
            s,
            HS256,
            &json!({"serverId": "ops", "type": typ, "iat": now, "exp": now + 3600,
                    "jti": "j".repeat(7400)})
            .to_string(),
        ),
        401,
        "malformed_token",
    ));

    // --- header and claims that are not one JSON object, or repeat a key.
    for (what, header) in [
        ("header an array", r#"["HS256"]"#),
        ("header a string", r#""HS256""#),
        ("header not JSON", r#"{"alg":"HS256""#),
        ("header with trailing data", r#"{"alg":"HS256"} {}"#),
        ("header typ not JWT", r#"{"alg":"HS256","typ":"JWS"}"#),
        ("header with crit", r#"{"alg":"HS256","crit":["exp"]}"#),
        (
            "header repeats alg (none, then HS256)",
            r#"{"alg":"none","alg":"HS256"}"#,
        ),
        (
            "header repeats alg (HS256, then none)",
            r#"{"alg":"HS256","alg":"none"}"#,
        ),
        (
            "header repeats alg, the second escaped",
            r#"{"alg":"HS256","\u0061lg":"HS256"}"#,
        ),
        (
            "header repeats typ",
            r#"{"alg":"HS256","typ":"JWT","typ":"JWT"}"#,
        ),
        (
            "header repeats an unknown key",
            r#"{"alg":"HS256","kid":"a","kid":"b"}"#,
        ),
    ] {
        v.push(case(what, craft(s, header, &good), 401, "malformed_token"));
    }
    let other_claims = |text: String| craft(s, HS256, &text);
    for (what, text) in [
        ("claims an array", "[1,2]".to_string()),
        ("claims a string", r#""ops""#.to_string()),
        ("claims a number", "42".to_string()),
        ("claims null", "null".to_string()),
        ("claims not JSON", r#"{"serverId":"ops""#.to_string()),
        ("claims with trailing data", format!("{good} x")),
        (
            "claims missing serverId",
            json!({"type": typ, "iat": now, "exp": now + 60}).to_string(),
        ),
        (
            "claims missing type",
            json!({"serverId": "ops", "iat": now, "exp": now + 60}).to_string(),
        ),
        (
            "claims missing iat",
            json!({"serverId": "ops", "type": typ, "exp": now + 60}).to_string(),
        ),
        (
            "claims missing exp",
            json!({"serverId": "ops", "type": typ, "iat": now}).to_string(),
        ),
        (
            "serverId with a space",
            json!({"serverId": "o ps", "type": typ, "iat": now, "exp": now + 60}).to_string(),
        ),
        (
            "serverId with a slash",
            json!({"serverId": "../ops", "type": typ, "iat": now, "exp": now + 60}).to_string(),
        ),
        (
            "serverId with a NUL",
            json!({"serverId": "ops\u{0}", "type": typ, "iat": now, "exp": now + 60}).to_string(),
        ),
        (
            "serverId empty",
            json!({"serverId": "", "type": typ, "iat": now, "exp": now + 60}).to_string(),
        ),
        (
            "serverId of 65 characters",
            json!({"serverId": "x".repeat(65), "type": typ, "iat": now, "exp": now + 60})
                .to_string(),
        ),
        (
            "serverId a number",
            json!({"serverId": 7, "type": typ, "iat": now, "exp": now + 60}).to_string(),
        ),
        (
            "type unknown",
            json!({"serverId": "ops", "type": "root", "iat": now, "exp": now + 60}).to_string(),
        ),
        (
            "type in capitals",
            json!({"serverId": "ops", "type": typ.to_uppercase(), "iat": now, "exp": now + 60})
                .to_string(),
        ),
        (
            "iat a float",
            format!(
                r#"{{"serverId":"ops","type":"{typ}","iat":{now}.0,"exp":{}}}"#,
                now + 60
            ),
        ),
        (
            "exp in exponent form",
            format!(r#"{{"serverId":"ops","type":"{typ}","iat":{now},"exp":1e12}}"#),
        ),
        (
            "exp a string",
            format!(
                r#"{{"serverId":"ops","type":"{typ}","iat":{now},"exp":"{}"}}"#,
                now + 60
            ),
        ),
        (
            "exp beyond i64",
            format!(
                r#"{{"serverId":"ops","type":"{typ}","iat":{now},"exp":99999999999999999999}}"#
            ),
        ),
        (
            "nbf null",
            format!(
                r#"{{"serverId":"ops","type":"{typ}","iat":{now},"exp":{},"nbf":null}}"#,
                now + 60
            ),
        ),
        (
            "jti a number",
            format!(
                r#"{{"serverId":"ops","type":"{typ}","iat":{now},"exp":{},"jti":5}}"#,
                now + 60
            ),
        ),
        (
            "claims repeat serverId",
            format!(
                r#"{{"serverId":"ops","serverId":"root","type":"{typ}","iat":{now},"exp":{}}}"#,
                now + 60
            ),
        ),
        (
            "claims repeat type (the wrong one last)",
            format!(
                r#"{{"serverId":"ops","type":"{typ}","type":"{other}","iat":{now},"exp":{}}}"#,
                now + 60
            ),
        ),
        (
            "claims repeat exp",
            format!(
                r#"{{"serverId":"ops","type":"{typ}","iat":{now},"exp":{},"exp":{}}}"#,
                now + 60,
                now + 999_999
            ),
        ),
        (
            "claims repeat an ignored key",
            format!(
                r#"{{"serverId":"ops","type":"{typ}","iat":{now},"exp":{},"aud":1,"aud":2}}"#,
                now + 60
            ),
        ),
        (
            "claims repeat serverId, the second escaped",
            format!(
                r#"{{"serverId":"ops","server\u0049d":"root","type":"{typ}","iat":{now},"exp":{}}}"#,
                now + 60
            ),
        ),
    ] {
        v.push(case(what, other_claims(text), 401, "malformed_token"));
    }

    // --- time (default skew 30 s).
    let timed = |iat: i64, exp: i64, nbf: Option<i64>| {
        let mut c = json!({"serverId": "ops", "type": typ, "iat": iat, "exp": exp});
        if let Some(n) = nbf {
            c["nbf"] = json!(n);
        }
        craft(s, HS256, &c.to_string())
    };
    v.push(case(
        "expired an hour ago",
        timed(now - 7200, now - 3600, None),
        401,
        "expired",
    ));
    v.push(case(
        "expired just past the skew",
        timed(now - 7200, now - 35, None),
        401,
        "expired",
    ));
    v.push(case(
        "exp i64::MIN",
        timed(now, i64::MIN, None),
        401,
        "expired",
    ));
    v.push(case(
        "nbf an hour ahead",
        timed(now, now + 7200, Some(now + 3600)),
        401,
        "not_yet_valid",
    ));
    v.push(case(
        "nbf i64::MAX",
        timed(now, now + 7200, Some(i64::MAX)),
        401,
        "not_yet_valid",
    ));
    v.push(case(
        "iat an hour ahead",
        timed(now + 3600, now + 7200, None),
        401,
        "issued_in_future",
    ));
    v.push(case(
        "iat i64::MAX, exp i64::MAX",
        timed(i64::MAX, i64::MAX, None),
        401,
        "issued_in_future",
    ));

    // --- the wrong type, valid in every other way.
    v.push(case(
        format!("a valid {other} token"),
        craft(s, HS256, &good_claims("ops", other)),
        403,
        "wrong_type",
    ));
    v
}

/// The admin endpoint's answer to `token` (Authorization header).
fn admin_list(p: &Proxy, token: &str) -> Resp {
    exchange(
        p,
        format!(
            "GET /v1/servers HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
}

/// The control upgrade's answer to `token`, in the header or in `?token=`.
fn control_upgrade(p: &Proxy, token: &str, in_query: bool) -> Resp {
    let req = if in_query {
        upgrade_req(&format!("/v1/control?token={}", pct(token)), "")
    } else {
        upgrade_req("/v1/control", &format!("Authorization: Bearer {token}\r\n"))
    };
    exchange(p, req.as_bytes())
}

#[test]
fn the_token_catalogue_on_an_admin_endpoint_and_the_control_upgrade() {
    // RUST_LOG=trace: nothing of a token may reach a log even at the most verbose level.
    let p = Proxy::start(&[("RUST_LOG", "trace")]);

    // The crafting is sound: the same construction with nothing changed is accepted, and so
    // is a token of exactly 4096 bytes.
    assert_eq!(
        admin_list(&p, &craft(SECRET, HS256, &good_claims("ops", "admin"))).status,
        200
    );
    assert_eq!(
        admin_list(&p, &token_of_len("admin", 4096)).status,
        200,
        "4096 bytes"
    );
    let ok = control_upgrade(
        &p,
        &craft(SECRET, HS256, &good_claims("ops", "federation")),
        false,
    );
    assert_eq!(ok.status, 101, "{}", ok.text());
    let ok = control_upgrade(&p, &token_of_len("federation", 4096), true);
    assert_eq!(ok.status, 101, "4096 bytes in the query: {}", ok.text());

    let mut seen = Vec::new();
    let admin_cases = catalogue("admin", "federation");
    for c in &admin_cases {
        let r = admin_list(&p, &c.token);
        assert_refusal(&r, c.status, c.code, &format!("admin, {}", c.what));
        seen.push(c.token.clone());
    }
    let fed_cases = catalogue("federation", "admin");
    for c in &fed_cases {
        for in_query in [false, true] {
            let r = control_upgrade(&p, &c.token, in_query);
            let how = if in_query { "?token=" } else { "header" };
            assert_refusal(
                &r,
                c.status,
                c.code,
                &format!("control ({how}), {}", c.what),
            );
        }
        seen.push(c.token.clone());
    }
    assert!(admin_cases.len() > 60, "{} cases", admin_cases.len());

    // Revocation: a removed server's tokens issued before the removal are refused on the
    // upgrade; a token minted afterwards works.
    let old = p.register("victim");
    let del = p.http("DELETE", "/v1/servers/victim", Some(&p.admin_token()), None);
    assert_eq!(del.status, 204, "{}", del.text());
    for in_query in [false, true] {
        assert_refusal(
            &control_upgrade(&p, &old, in_query),
            401,
            "revoked",
            "control, a removed server's old token",
        );
    }
    let fresh = p.register("victim");
    assert_eq!(control_upgrade(&p, &fresh, false).status, 101);

    // No refusal left a session or a registry entry behind for "ops"/"root" beyond the known
    // entry the accepted upgrades made.
    let list = admin_list(&p, &p.admin_token()).json();
    let ids: Vec<&str> = list["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["serverId"].as_str())
        .collect();
    assert!(!ids.contains(&"root"), "a forged serverId got in: {ids:?}");

    // Still serving; and nothing of a token, a signature or the secret is in the log.
    assert_healthy(&p, Duration::from_secs(5));
    let log = p.stderr_text();
    assert!(!log.contains(SECRET), "the secret is in the log");
    for t in &seen {
        assert!(!log.contains(t.as_str()), "a token is in the log: {t}");
        if let Some(sig) = t.rsplit('.').next().filter(|s| s.len() >= 20) {
            assert!(!log.contains(sig), "a signature is in the log: {sig}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket upgrade variants with a valid token
// ---------------------------------------------------------------------------------------------

/// `GET /v1/control` with a valid token and exactly the request lines given.
fn raw_upgrade(p: &Proxy, method: &str, path: &str, lines: &[&str], token: &str) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for l in lines {
        req.push_str(l);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Authorization: Bearer {token}\r\n\r\n"));
    exchange(p, req.as_bytes())
}

#[test]
fn upgrade_requests_that_break_rfc_6455_are_refused() {
    let p = Proxy::start(&[]);
    let token = p.register("alice");
    let upgrade = "Upgrade: websocket";
    let connection = "Connection: Upgrade";
    let v13 = "Sec-WebSocket-Version: 13";
    let key = &format!("Sec-WebSocket-Key: {WS_KEY}") as &str;
    let k15 = &format!(
        "Sec-WebSocket-Key: {}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 15])
    ) as &str;
    let k17 = &format!(
        "Sec-WebSocket-Key: {}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 17])
    ) as &str;

    struct U<'a> {
        what: &'a str,
        method: &'a str,
        path: &'a str,
        lines: Vec<&'a str>,
        status: u16,
    }
    let cases = [
        U {
            what: "missing Sec-WebSocket-Key",
            method: "GET",
            path: "/v1/control",
            lines: vec![upgrade, connection, v13],
            status: 400,
        },
        U {
            what: "empty Sec-WebSocket-Key",
            method: "GET",
            path: "/v1/control",
            lines: vec![upgrade, connection, v13, "Sec-WebSocket-Key: "],
            status: 400,
        },
        U {
            what: "key of 15 bytes",
            method: "GET",
            path: "/v1/control",
            lines: vec![upgrade, connection, v13, k15],
            status: 400,
        },
        U {
            what: "key of 17 bytes",
            method: "GET",
            path: "/v1/control",
            lines: vec![upgrade, connection, v13, k17],
            status: 400,
        },
        U {
            what: "key not base64",
            method: "GET",
            path: "/v1/control",
            lines: vec![
                upgrade,
                connection,
                v13,
                "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!!=",
            ],
            status: 400,
        },
        U {
            what: "version 8",
            method: "GET",
            path: "/v1/control",
            lines: vec![upgrade, connection, "Sec-WebSocket-Version: 8", key],
            status: 426,
        },
        U {
            what: "version missing",
            method: "GET",
            path: "/v1/control",
            lines: vec![upgrade, connection, key],
            status: 426,
        },
        U {
            what: "no Upgrade header",
            method: "GET",
            path: "/v1/control",
            lines: vec![connection, v13, key],
            status: 426,
        },
        U {
            what: "Upgrade: h2c",
            method: "GET",
            path: "/v1/control",
            lines: vec!["Upgrade: h2c", connection, v13, key],
            status: 426,
        },
        U {
            what: "Connection without the upgrade token",
            method: "GET",
            path: "/v1/control",
            lines: vec![upgrade, "Connection: keep-alive", v13, key],
            status: 426,
        },
        U {
            what: "upgrade on an unknown path",
            method: "GET",
            path: "/v1/nope",
            lines: vec![upgrade, connection, v13, key],
            status: 404,
        },
        U {
            what: "upgrade on /v1/control/ (trailing slash)",
            method: "GET",
            path: "/v1/control/",
            lines: vec![upgrade, connection, v13, key],
            status: 404,
        },
        U {
            what: "POST /v1/control",
            method: "POST",
            path: "/v1/control",
            lines: vec![upgrade, connection, v13, key, "Content-Length: 0"],
            status: 405,
        },
        U {
            what: "PUT /v1/control",
            method: "PUT",
            path: "/v1/control",
            lines: vec![upgrade, connection, v13, key, "Content-Length: 0"],
            status: 405,
        },
    ];
    for c in &cases {
        let r = raw_upgrade(&p, c.method, c.path, &c.lines, &token);
        assert_eq!(r.status, c.status, "{}: {} {}", c.what, r.status, r.text());
        assert!(
            !r.code_or_empty().is_empty(),
            "{}: not the contract's error body: {}",
            c.what,
            r.text()
        );
        match c.status {
            426 if c.lines.contains(&upgrade) && c.lines.contains(&connection) => {
                assert_eq!(
                    r.header("sec-websocket-version"),
                    Some("13"),
                    "{}: 426 names the version it speaks",
                    c.what
                );
            }
            426 => {
                let u = r.header("upgrade").unwrap_or("");
                assert!(
                    u.eq_ignore_ascii_case("websocket"),
                    "{}: 426 names the protocol to upgrade to: {u:?}",
                    c.what
                );
            }
            405 => {
                let allow = r.header("allow").unwrap_or("");
                assert!(
                    allow.split(',').any(|m| m.trim() == "GET"),
                    "{}: Allow {allow:?}",
                    c.what
                );
            }
            _ => {}
        }
    }
    // Nothing of that opened a session, and the proxy still serves: a correct upgrade works.
    let r = raw_upgrade(
        &p,
        "GET",
        "/v1/control",
        &[upgrade, connection, v13, key],
        &token,
    );
    assert_eq!(r.status, 101, "{}", r.text());
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "RFC 6455's example key and accept value"
    );
    assert_healthy(&p, Duration::from_secs(5));
}

/// Many refusals in a row do not grow the proxy (each refused token or upgrade is answered and
/// forgotten): 1000 bad tokens, alternating endpoints.
#[test]
fn a_thousand_refused_tokens_leave_memory_flat() {
    let p = Proxy::start(&[]);
    let bad = craft(OTHER_SECRET, HS256, &good_claims("ops", "admin"));
    let bad_fed = craft(OTHER_SECRET, HS256, &good_claims("ops", "federation"));
    // Warm up, then measure.
    for _ in 0..50 {
        assert_eq!(admin_list(&p, &bad).status, 401);
    }
    let before = rss_kib(p.pid());
    let t0 = Instant::now();
    for i in 0..1000 {
        let r = if i % 2 == 0 {
            admin_list(&p, &bad)
        } else {
            control_upgrade(&p, &bad_fed, i % 4 == 1)
        };
        assert_eq!(r.status, 401, "request {i}: {}", r.text());
        assert!(t0.elapsed() < Duration::from_secs(40), "too slow at {i}");
    }
    let after = rss_kib(p.pid());
    assert!(
        after.saturating_sub(before) < 4 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 1000 refusals"
    );
    assert_healthy(&p, Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// TLS: versions below 1.2 and non-TLS bytes
// ---------------------------------------------------------------------------------------------

/// The binary serving TLS with a fresh self-signed certificate (made with the `openssl` CLI,
/// as `tests/tls_startup.rs` does); killed on drop.
struct TlsProxy {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TlsProxy {
    fn start() -> TlsProxy {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let dir = scratch_dir("adv-tls");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
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
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("this test needs the openssl CLI: {e}"));
        assert!(out.status.success(), "openssl req failed");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fedmcp"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FEDMCP_LISTEN", "127.0.0.1:0")
            .env("FEDMCP_JWT_SECRET", SECRET)
            .env("FEDMCP_STATE_DIR", "")
            .env("FEDMCP_TLS_CERT", &cert)
            .env("FEDMCP_TLS_KEY", &key)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fedmcp");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WAIT).expect("a ready line");
        let port = line
            .trim()
            .strip_prefix("listening on https://127.0.0.1:")
            .unwrap_or_else(|| panic!("ready line {line:?}"))
            .parse()
            .expect("port");
        TlsProxy { child, port, dir }
    }

    /// Sends `bytes` and reads what comes back until EOF (bounded by `WAIT`).
    fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    /// Sends `bytes` and returns the first bytes that come back (the connection is left to
    /// the proxy's handshake timeout).
    fn exchange_first(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = vec![0u8; 4096];
        let n = s.read(&mut out).unwrap_or(0);
        out.truncate(n);
        out
    }

    /// `openssl s_client` with `version_flag`: the negotiated protocol line, if any.
    fn s_client(&self, version_flag: &str) -> String {
        use std::process::{Command, Stdio};
        let mut c = Command::new("openssl")
            .args([
                "s_client",
                "-brief",
                version_flag,
                "-servername",
                "localhost",
            ])
            .args(["-connect", &format!("127.0.0.1:{}", self.port)])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl s_client");
        let t0 = Instant::now();
        while c.try_wait().ok().flatten().is_none() {
            if t0.elapsed() > WAIT {
                let _ = c.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = c.wait_with_output().expect("s_client output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            .find(|l| l.starts_with("Protocol version:"))
            .map(|l| l.trim().to_string())
            .unwrap_or_else(|| format!("no handshake: {text}"))
    }
}

/// A ClientHello offering only `version` (0x0301 TLS 1.0, 0x0302 TLS 1.1, 0x0303 TLS 1.2) and
/// no `supported_versions` extension, built by hand (OpenSSL builds often refuse to send the
/// old versions any more). Everything else is what a TLS 1.2 server with a P-256 certificate
/// needs (ECDHE-ECDSA-AES-GCM, P-256, ecdsa_secp256r1_sha256), so that the same hello with
/// 0x0303 is answered with a ServerHello: only the version differs.
fn client_hello(version: u16) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2c]); // ECDHE-ECDSA-AES-GCM
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let exts: Vec<u8> = [
        &[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17][..], // supported_groups: P-256
        &[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00][..],             // ec_point_formats
        &[0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03][..], // sig algs: ECDSA P-256 SHA-256
        &[0x00, 0x17, 0x00, 0x00][..],                         // extended_master_secret
        &[0xff, 0x01, 0x00, 0x01, 0x00][..],                   // renegotiation_info
    ]
    .concat();
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

#[test]
fn tls_below_1_2_and_non_tls_bytes_are_refused_and_the_listener_carries_on() {
    let p = TlsProxy::start();
    // The control: the same hello as TLS 1.2 gets a ServerHello (a handshake record).
    let answer = p.exchange_first(&client_hello(0x0303));
    assert_eq!(
        answer.first(),
        Some(&0x16),
        "TLS 1.2 control hello: {answer:02x?}"
    );
    for (what, version) in [("TLS 1.0", 0x0301u16), ("TLS 1.1", 0x0302)] {
        let answer = p.exchange(&client_hello(version));
        // An alert record (type 21), never a handshake record (a ServerHello, type 22).
        assert!(
            answer.len() == 7 && answer[0] == 0x15,
            "{what}: the answer is not one alert: {answer:02x?}"
        );
        assert!(
            matches!(answer[6], 70 | 40),
            "{what}: alert {answer:02x?} (wanted protocol_version 70 or handshake_failure 40)"
        );
    }
    // Plain HTTP and garbage on the TLS port: refused without a crash.
    for bytes in [
        &b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0u8; 64][..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01][..],
    ] {
        let answer = p.exchange(bytes);
        assert!(
            !answer.starts_with(b"HTTP/1.1 200"),
            "non-TLS bytes were served: {answer:02x?}"
        );
    }
    // TLS 1.2 and 1.3 are served.
    assert_eq!(p.s_client("-tls1_2"), "Protocol version: TLSv1.2");
    assert_eq!(p.s_client("-tls1_3"), "Protocol version: TLSv1.3");
}
