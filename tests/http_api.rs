//! The HTTP side of the contract against the real binary: tokens over HTTP (docs/PROTOCOL.md §2),
//! the HTTP data channel (§3) and operations (§8: metrics, audit, signals).
//!
//! Every test starts its own proxy on loopback port 0 and every wait is bounded.
mod common;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
const WWW_AUTH: &str = r#"Bearer error="invalid_token""#;

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// A compact token with exactly this header and claims text, HS256-signed with `secret`.
fn craft(secret: &str, header: &str, claims: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    sign_input(secret, &input)
}

/// `input` + "." + its HS256 signature under `secret`.
fn sign_input(secret: &str, input: &str) -> String {
    let sig = jwt::hmac_b64(secret.as_bytes(), &[input.as_bytes()]);
    format!("{input}.{sig}")
}

/// The claims JSON text of a token of `typ` for `id`, valid for an hour.
fn claims_text(id: &str, typ: &str) -> String {
    let now = now_secs();
    json!({"serverId": id, "type": typ, "iat": now, "exp": now + 3600}).to_string()
}

/// The decoded claims (middle segment) of a compact token.
fn claims_of(token: &str) -> Value {
    let mid = token.split('.').nth(1).expect("three segments");
    serde_json::from_slice(&B64.decode(mid).expect("base64url claims")).expect("JSON claims")
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The contract's error response: `status`, JSON `{"error": {"code", "message"}}`.
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
    assert_eq!(keys(&v), set(&["error"]), "error body: {v}");
    assert_eq!(
        keys(&v["error"]),
        set(&["code", "message"]),
        "error body: {v}"
    );
    assert_eq!(v["error"]["code"], code, "error body: {v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(!msg.is_empty(), "empty message: {v}");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "error Content-Type: {:?}",
        r.header("content-type")
    );
}

/// A `401` with the contract's `WWW-Authenticate` challenge and `code`.
#[track_caller]
fn assert_401(r: &Resp, code: &str) {
    assert_error(r, 401, code);
    let h = r.header("www-authenticate").unwrap_or("");
    assert!(
        h.starts_with("Bearer ") && h.contains(r#"error="invalid_token""#),
        "WWW-Authenticate for {code}: {h:?} (want {WWW_AUTH})"
    );
}

/// One request with extra headers on a fresh `Connection: close` connection.
fn request(
    p: &Proxy,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    parse_raw(&p.raw(req.as_bytes()))
}

#[track_caller]
fn parse_raw(raw: &[u8]) -> Resp {
    Resp::parse(raw)
        .unwrap_or_else(|| panic!("unparseable response: {:?}", String::from_utf8_lossy(raw)))
}

fn get_admin(p: &Proxy, path: &str) -> Resp {
    p.http("GET", path, Some(&p.admin_token()), None)
}

/// Registers `id` and returns the status (201 new, 200 update).
fn register_status(p: &Proxy, id: &str) -> u16 {
    let body = json!({ "serverId": id }).to_string();
    p.http("POST", "/v1/servers", Some(&p.admin_token()), Some(&body))
        .status
}

fn post_token(p: &Proxy, token: &str) -> Resp {
    p.http("POST", "/v1/token", Some(token), None)
}

/// Bytes of the first complete response in `buf` (Content-Length framing), if there is one.
fn complete_len(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let (head, _) = Resp::parse_one(&buf[..end])?;
    let len: usize = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (buf.len() >= end + len).then_some(end + len)
}

/// Reads exactly `n` responses from a keep-alive connection (bounded by `WAIT`).
fn read_responses(s: &mut TcpStream, n: usize) -> Vec<Resp> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    while out.len() < n {
        if let Some(k) = complete_len(&buf) {
            out.push(parse_raw(&buf[..k]));
            buf.drain(..k);
            continue;
        }
        assert!(
            start.elapsed() < WAIT,
            "only {} of {n} responses",
            out.len()
        );
        match s.read(&mut chunk) {
            Ok(0) => panic!(
                "connection closed after {} of {n} responses; rest {:?}",
                out.len(),
                String::from_utf8_lossy(&buf)
            ),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) => panic!("read failed after {} of {n} responses: {e}", out.len()),
        }
    }
    assert!(
        buf.is_empty(),
        "extra bytes: {:?}",
        String::from_utf8_lossy(&buf)
    );
    out
}

/// Waits (bounded) for the peer to close; returns how long it took, or panics.
fn wait_eof(s: &mut TcpStream, limit: Duration) -> Duration {
    s.set_read_timeout(Some(limit)).unwrap();
    let start = Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return start.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) => panic!("the connection was not closed within {limit:?}: {e}"),
        }
    }
}

/// The value of one Prometheus series (`name{labels}` exactly as rendered), if present.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn metrics_text(p: &Proxy) -> String {
    let r = p.http("GET", "/metrics", None, None);
    assert_eq!(r.status, 200);
    r.text()
}

/// Polls `f` until it returns `Some` (bounded by `WAIT`).
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parsed lines of a JSON-lines file (each must be a JSON object).
fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("audit line not JSON ({e}): {l}"));
            assert!(v.is_object(), "audit line not an object: {l}");
            v
        })
        .collect()
}

/// Sends `sig` and waits (bounded) for the exit; returns the code and the time it took.
fn signal_and_wait(p: &mut Proxy, sig: &str) -> (Option<i32>, Duration) {
    let start = Instant::now();
    unsafe_kill(p.pid(), sig);
    while start.elapsed() < WAIT {
        if let Ok(Some(st)) = p.child.try_wait() {
            return (st.code(), start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("proxy did not exit within {WAIT:?} of SIG{sig}");
}

// ---------------------------------------------------------------------------------------------
// §2 Tokens over HTTP
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_token_is_401_on_admin_and_federation_endpoints() {
    let p = Proxy::start(&[]);
    assert_401(&p.http("GET", "/v1/servers", None, None), "missing_token");
    assert_401(&p.http("GET", "/v1/servers/x", None, None), "missing_token");
    assert_401(
        &p.http("DELETE", "/v1/servers/x", None, None),
        "missing_token",
    );
    assert_401(
        &p.http("POST", "/v1/servers", None, Some(r#"{"serverId":"x"}"#)),
        "missing_token",
    );
    assert_401(&p.http("POST", "/v1/token", None, None), "missing_token");
    assert_401(
        &p.http(
            "POST",
            "/v1/messages",
            None,
            Some(r#"{"to":"x","message":1}"#),
        ),
        "missing_token",
    );
}

/// Malformed tokens (of the admin or the federation type) for both kinds of endpoint.
fn malformed_tokens(typ: &str) -> Vec<(&'static str, String)> {
    let s = SECRET;
    let now = now_secs();
    let good = claims_text("ops", typ);
    let mut v: Vec<(&'static str, String)> = vec![
        ("garbage", "garbage".into()),
        ("two segments", {
            let t = craft(s, HS256, &good);
            t.rsplit_once('.').unwrap().0.to_string()
        }),
        ("four segments", format!("{}.xyz", craft(s, HS256, &good))),
        (
            "non-base64 claims",
            sign_input(s, &format!("{}.*!*", b64(HS256.as_bytes()))),
        ),
        ("header not an object", craft(s, "[1]", &good)),
        ("header not JSON", craft(s, "{alg", &good)),
        ("claims an array", craft(s, HS256, "[1,2]")),
        ("claims a string", craft(s, HS256, "\"ops\"")),
        ("claims null", craft(s, HS256, "null")),
        ("claims not JSON", craft(s, HS256, "{serverId")),
        (
            "claims missing serverId",
            craft(
                s,
                HS256,
                &json!({"type": typ, "iat": now, "exp": now + 60}).to_string(),
            ),
        ),
        (
            "claims missing type",
            craft(
                s,
                HS256,
                &json!({"serverId": "ops", "iat": now, "exp": now + 60}).to_string(),
            ),
        ),
        (
            "claims missing exp",
            craft(
                s,
                HS256,
                &json!({"serverId": "ops", "type": typ, "iat": now}).to_string(),
            ),
        ),
        (
            "claims missing iat",
            craft(
                s,
                HS256,
                &json!({"serverId": "ops", "type": typ, "exp": now + 60}).to_string(),
            ),
        ),
        (
            "unknown type",
            craft(
                s,
                HS256,
                &json!({"serverId": "ops", "type": "root", "iat": now, "exp": now + 60})
                    .to_string(),
            ),
        ),
        (
            "float iat",
            craft(
                s,
                HS256,
                &format!(
                    r#"{{"serverId":"ops","type":"{typ}","iat":{}.5,"exp":{}}}"#,
                    now,
                    now + 60
                ),
            ),
        ),
        (
            "string exp",
            craft(
                s,
                HS256,
                &format!(
                    r#"{{"serverId":"ops","type":"{typ}","iat":{},"exp":"{}"}}"#,
                    now,
                    now + 60
                ),
            ),
        ),
    ];
    for bad_id in ["a b", "a/b", "", "é", &"x".repeat(65)] {
        v.push((
            "bad serverId",
            craft(
                s,
                HS256,
                &json!({"serverId": bad_id, "type": typ, "iat": now, "exp": now + 60}).to_string(),
            ),
        ));
    }
    // Padded base64url in the claims segment, signed over exactly what is sent.
    let mut jti = String::from("j");
    let padded_claims = loop {
        let c = json!({"serverId": "ops", "type": typ, "iat": now, "exp": now + 60, "jti": jti})
            .to_string();
        if !c.len().is_multiple_of(3) {
            break c;
        }
        jti.push('j');
    };
    let mut seg = b64(padded_claims.as_bytes());
    while !seg.len().is_multiple_of(4) {
        seg.push('=');
    }
    v.push((
        "padded claims",
        sign_input(s, &format!("{}.{seg}", b64(HS256.as_bytes()))),
    ));
    // Padded signature segment (32 bytes is 43 characters unpadded).
    v.push(("padded signature", format!("{}=", craft(s, HS256, &good))));
    // Standard (not url-safe) alphabet is not base64url: force a '+' or '/' into the claims.
    let plus_claims = loop {
        let c = json!({"serverId": "ops", "type": typ, "iat": now, "exp": now + 60, "jti": jti})
            .to_string();
        let std_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&c);
        if std_b64.contains(['+', '/']) {
            break std_b64;
        }
        jti.push('?');
    };
    v.push((
        "standard base64 alphabet",
        sign_input(s, &format!("{}.{plus_claims}", b64(HS256.as_bytes()))),
    ));
    // Correctly signed but over 4096 bytes.
    let big = craft(
        s,
        HS256,
        &json!({"serverId": "ops", "type": typ, "iat": now, "exp": now + 60, "jti": "j".repeat(3200)})
            .to_string(),
    );
    assert!(big.len() > 4096);
    v.push(("over 4096 bytes", big));
    v
}

#[test]
fn malformed_tokens_are_401_malformed_token() {
    let p = Proxy::start(&[]);
    for (what, t) in malformed_tokens("admin") {
        let r = p.http("GET", "/v1/servers", Some(&t), None);
        assert!(
            r.status == 401 && r.code() == "malformed_token",
            "{what}: {} {}",
            r.status,
            r.text()
        );
        assert_401(&r, "malformed_token");
    }
    for (what, t) in malformed_tokens("federation") {
        let r = post_token(&p, &t);
        assert!(
            r.status == 401 && r.code() == "malformed_token",
            "{what}: {} {}",
            r.status,
            r.text()
        );
        assert_401(&r, "malformed_token");
    }
}

#[test]
fn other_algorithms_are_401_unsupported_alg() {
    let p = Proxy::start(&[]);
    for alg in [
        "none", "HS384", "HS512", "RS256", "hs256", "HS256 ", "ES256",
    ] {
        let header = json!({"alg": alg, "typ": "JWT"}).to_string();
        // Signed with HS256 and the right secret: only `alg` differs from a good token.
        let admin = craft(SECRET, &header, &claims_text("ops", "admin"));
        let r = p.http("GET", "/v1/servers", Some(&admin), None);
        assert_eq!(r.status, 401, "alg {alg}: {}", r.text());
        assert_401(&r, "unsupported_alg");
        let fed = craft(SECRET, &header, &claims_text("ops", "federation"));
        assert_401(&post_token(&p, &fed), "unsupported_alg");
    }
    // The same construction with alg HS256 is accepted (the crafting is sound).
    let ok = craft(SECRET, HS256, &claims_text("ops", "admin"));
    assert_eq!(p.http("GET", "/v1/servers", Some(&ok), None).status, 200);
    let ok = craft(
        SECRET,
        r#"{"alg":"HS256"}"#,
        &claims_text("ops", "federation"),
    );
    assert_eq!(post_token(&p, &ok).status, 200, "typ is optional");
}

#[test]
fn typ_other_than_jwt_is_refused_and_unknown_claims_are_ignored() {
    let p = Proxy::start(&[]);
    for typ in ["JWS", "jwt", "at+jwt"] {
        let header = json!({"alg": "HS256", "typ": typ}).to_string();
        let t = craft(SECRET, &header, &claims_text("ops", "admin"));
        let r = p.http("GET", "/v1/servers", Some(&t), None);
        assert_eq!(r.status, 401, "typ {typ}: {}", r.text());
        let code = r.code();
        assert!(
            code == "malformed_token" || code == "unsupported_alg",
            "typ {typ}: {code}"
        );
        assert_401(&r, &code);
    }
    // Optional and unknown claims do not stop a good token.
    let now = now_secs();
    let claims = json!({
        "serverId": "ops", "type": "admin", "iat": now, "exp": now + 600,
        "nbf": now - 5, "jti": "abc", "aud": "x", "extra": {"deep": [1, 2]}
    })
    .to_string();
    let r = p.http(
        "GET",
        "/v1/servers",
        Some(&craft(SECRET, HS256, &claims)),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn wrong_secret_and_tampering_are_401_bad_signature() {
    let p = Proxy::start(&[]);
    let now = now_secs();
    let other = "another-secret-0123456789-abcdefghijklmnop";
    let wrong = jwt::sign(
        other.as_bytes(),
        &Claims {
            server_id: "ops".into(),
            token_type: TokenType::Admin,
            iat: now,
            exp: now + 600,
            nbf: None,
            jti: None,
        },
    );
    assert_401(
        &p.http("GET", "/v1/servers", Some(&wrong), None),
        "bad_signature",
    );
    // Tampered claims: a federation token's claims swapped for admin ones, signature kept.
    let fed = p.federation_token("ops");
    let parts: Vec<&str> = fed.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims_text("ops", "admin").as_bytes()),
        parts[2]
    );
    assert_401(
        &p.http("GET", "/v1/servers", Some(&forged), None),
        "bad_signature",
    );
    // Tampered serverId on the federation endpoint.
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims_text("other", "federation").as_bytes()),
        parts[2]
    );
    assert_401(&post_token(&p, &forged), "bad_signature");
    // A signature segment of another (valid) token.
    let admin = p.admin_token();
    let a: Vec<&str> = admin.split('.').collect();
    let swapped = format!("{}.{}.{}", a[0], a[1], parts[2]);
    assert_401(
        &p.http("GET", "/v1/servers", Some(&swapped), None),
        "bad_signature",
    );
    // The untampered ones work.
    assert_eq!(p.http("GET", "/v1/servers", Some(&admin), None).status, 200);
    assert_eq!(post_token(&p, &fed).status, 200);
}

#[test]
fn time_claims_with_default_skew() {
    let p = Proxy::start(&[]);
    let now = now_secs();
    let skew = 30;
    let mk = |iat: i64, exp: i64, nbf: Option<i64>| {
        jwt::sign(
            SECRET.as_bytes(),
            &Claims {
                server_id: "ops".into(),
                token_type: TokenType::Admin,
                iat,
                exp,
                nbf,
                jti: None,
            },
        )
    };
    let list = |t: &str| p.http("GET", "/v1/servers", Some(t), None);
    assert_401(&list(&mk(now - 3600, now - skew - 5, None)), "expired");
    assert_401(&list(&mk(now - 3600, now - 1000, None)), "expired");
    assert_401(
        &list(&mk(now, now + 3600, Some(now + skew + 60))),
        "not_yet_valid",
    );
    assert_401(
        &list(&mk(now + skew + 60, now + 7200, None)),
        "issued_in_future",
    );
    // Within the skew: accepted.
    assert_eq!(
        list(&mk(now - 3600, now - 10, None)).status,
        200,
        "exp 10 s ago"
    );
    assert_eq!(
        list(&mk(now, now + 3600, Some(now + 10))).status,
        200,
        "nbf in 10 s"
    );
    assert_eq!(
        list(&mk(now + 10, now + 3600, None)).status,
        200,
        "iat in 10 s"
    );
    // The federation endpoint applies the same checks.
    let fed = |iat: i64, exp: i64| p.token_with("ops", TokenType::Federation, iat, exp);
    assert_401(&post_token(&p, &fed(now - 3600, now - skew - 5)), "expired");
    assert_401(
        &post_token(&p, &fed(now + skew + 60, now + 7200)),
        "issued_in_future",
    );
    assert_eq!(post_token(&p, &fed(now - 3600, now - 10)).status, 200);
}

#[test]
fn clock_skew_is_configurable() {
    let p = Proxy::start(&[("FEDMCP_CLOCK_SKEW_SECS", "0")]);
    let now = now_secs();
    let t = p.token_with("ops", TokenType::Admin, now - 3600, now - 10);
    assert_401(&p.http("GET", "/v1/servers", Some(&t), None), "expired");
    let t = p.token_with("ops", TokenType::Admin, now + 20, now + 3600);
    assert_401(
        &p.http("GET", "/v1/servers", Some(&t), None),
        "issued_in_future",
    );
}

#[test]
fn wrong_token_type_is_403_wrong_type() {
    let p = Proxy::start(&[]);
    p.register("alpha");
    let admin = p.admin_token();
    let fed = p.federation_token("alpha");
    assert_error(&post_token(&p, &admin), 403, "wrong_type");
    assert_error(
        &p.http(
            "POST",
            "/v1/messages",
            Some(&admin),
            Some(r#"{"to":"alpha","message":1}"#),
        ),
        403,
        "wrong_type",
    );
    assert_error(
        &p.http("GET", "/v1/servers", Some(&fed), None),
        403,
        "wrong_type",
    );
    assert_error(
        &p.http("GET", "/v1/servers/alpha", Some(&fed), None),
        403,
        "wrong_type",
    );
    assert_error(
        &p.http("DELETE", "/v1/servers/alpha", Some(&fed), None),
        403,
        "wrong_type",
    );
    assert_error(
        &p.http(
            "POST",
            "/v1/servers",
            Some(&fed),
            Some(r#"{"serverId":"beta"}"#),
        ),
        403,
        "wrong_type",
    );
    // Nothing was removed or added by the refused requests.
    let list = get_admin(&p, "/v1/servers").json();
    let ids: Vec<&str> = list["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["serverId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["alpha"]);
}

#[test]
fn removal_revokes_old_tokens_but_not_new_ones() {
    let p = Proxy::start(&[]);
    let old = p.register("rv");
    assert_eq!(post_token(&p, &old).status, 200, "works before removal");
    // A token minted by anyone before the removal.
    let now = now_secs();
    let minted = p.token_with("rv", TokenType::Federation, now - 5, now + 3600);
    let r = p.http("DELETE", "/v1/servers/rv", Some(&p.admin_token()), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_401(&post_token(&p, &old), "revoked");
    assert_401(&post_token(&p, &minted), "revoked");
    assert_401(
        &p.http(
            "POST",
            "/v1/messages",
            Some(&old),
            Some(r#"{"to":"x","message":1}"#),
        ),
        "revoked",
    );
    // Re-registered: the new token works, the old one stays revoked.
    let r = p.http(
        "POST",
        "/v1/servers",
        Some(&p.admin_token()),
        Some(r#"{"serverId":"rv"}"#),
    );
    assert_eq!(r.status, 201, "re-registration is new: {}", r.text());
    let new = r.json()["token"].as_str().unwrap().to_string();
    let r = post_token(&p, &new);
    assert_eq!(r.status, 200, "new token: {}", r.text());
    let fresh = r.json()["token"].as_str().unwrap().to_string();
    assert_eq!(post_token(&p, &fresh).status, 200, "token from /v1/token");
    assert_401(&post_token(&p, &old), "revoked");
    assert_401(&post_token(&p, &minted), "revoked");
    // Another server's tokens are untouched.
    let other = p.register("other");
    assert_eq!(post_token(&p, &other).status, 200);
}

#[test]
fn previous_secret_is_accepted_for_rotation() {
    let old = "previous-secret-0123456789-abcdefghijkl";
    let p = Proxy::start(&[("FEDMCP_JWT_PREVIOUS_SECRET", old)]);
    let now = now_secs();
    let mk = |secret: &str, t: TokenType| {
        jwt::sign(
            secret.as_bytes(),
            &Claims {
                server_id: "ops".into(),
                token_type: t,
                iat: now,
                exp: now + 600,
                nbf: None,
                jti: None,
            },
        )
    };
    let r = p.http("GET", "/v1/servers", Some(&mk(old, TokenType::Admin)), None);
    assert_eq!(
        r.status,
        200,
        "admin token under the previous secret: {}",
        r.text()
    );
    let r = post_token(&p, &mk(old, TokenType::Federation));
    assert_eq!(r.status, 200, "federation token under the previous secret");
    // What the proxy issues is signed with the current secret only.
    let issued = r.json()["token"].as_str().unwrap().to_string();
    assert!(jwt::verify(&issued, &[SECRET.as_bytes()], now_secs(), 30).is_ok());
    assert!(jwt::verify(&issued, &[old.as_bytes()], now_secs(), 30).is_err());
    // A third secret is still refused.
    let third = "third-secret-0123456789-abcdefghijklmnopq";
    assert_401(
        &p.http(
            "GET",
            "/v1/servers",
            Some(&mk(third, TokenType::Admin)),
            None,
        ),
        "bad_signature",
    );
}

#[test]
fn previous_secret_is_not_accepted_without_configuration() {
    let old = "previous-secret-0123456789-abcdefghijkl";
    let p = Proxy::start(&[]);
    let now = now_secs();
    let t = jwt::sign(
        old.as_bytes(),
        &Claims {
            server_id: "ops".into(),
            token_type: TokenType::Admin,
            iat: now,
            exp: now + 600,
            nbf: None,
            jti: None,
        },
    );
    assert_401(
        &p.http("GET", "/v1/servers", Some(&t), None),
        "bad_signature",
    );
}

#[test]
fn query_token_is_ignored_outside_the_control_channel() {
    let p = Proxy::start(&[]);
    p.register("alpha");
    let admin = p.admin_token();
    let fed = p.federation_token("alpha");
    for (m, path) in [
        ("GET", format!("/v1/servers?token={admin}")),
        ("GET", format!("/v1/servers/alpha?token={admin}")),
        ("DELETE", format!("/v1/servers/alpha?token={admin}")),
    ] {
        assert_401(&p.http(m, &path, None, None), "missing_token");
    }
    assert_401(
        &p.http(
            "POST",
            &format!("/v1/servers?token={admin}"),
            None,
            Some(r#"{"serverId":"beta"}"#),
        ),
        "missing_token",
    );
    assert_401(
        &p.http("POST", &format!("/v1/token?token={fed}"), None, None),
        "missing_token",
    );
    // A query string does not stop the header from working.
    let r = p.http("GET", "/v1/servers?x=1", Some(&admin), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get_admin(&p, "/v1/servers/alpha");
    assert_eq!(
        r.status, 200,
        "alpha was not removed by the query-token DELETE"
    );
}

#[test]
fn post_token_issues_a_fresh_working_token() {
    let p = Proxy::start(&[("FEDMCP_TOKEN_TTL_SECS", "600")]);
    let t = p.register("alpha");
    let before = now_secs();
    let r = post_token(&p, &t);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
    );
    let v = r.json();
    assert_eq!(keys(&v), set(&["token", "expiresAt"]), "{v}");
    let token = v["token"].as_str().unwrap();
    let c = claims_of(token);
    assert_eq!(c["serverId"], "alpha");
    assert_eq!(c["type"], "federation");
    let iat = c["iat"].as_i64().unwrap();
    let exp = c["exp"].as_i64().unwrap();
    assert_eq!(exp - iat, 600, "FEDMCP_TOKEN_TTL_SECS: {c}");
    assert!(iat >= before - 1 && iat <= now_secs() + 2, "iat {iat}");
    assert_eq!(
        v["expiresAt"].as_i64(),
        Some(exp * 1000),
        "expiresAt is the token's exp in ms since the epoch"
    );
    // The new token works, on this endpoint and for sending.
    assert_eq!(post_token(&p, token).status, 200);
    let r = p.http(
        "POST",
        "/v1/messages",
        Some(token),
        Some(r#"{"to":"nobody","message":1}"#),
    );
    assert_error(&r, 404, "unknown_server");
}

#[test]
fn auth_failures_are_counted_and_audited_without_secrets() {
    let dir = scratch_dir("audit-auth");
    let audit = dir.join("audit.log");
    let p = Proxy::start(&[
        ("FEDMCP_AUDIT_LOG", audit.to_str().unwrap()),
        ("RUST_LOG", "trace"),
    ]);
    let reasons = [
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
    let series = |r: &str| format!("fedmcp_auth_failures_total{{reason=\"{r}\"}}");
    // Every token and key that crosses the wire in this test, to look for in the logs.
    let mut secrets: Vec<String> = vec![SECRET.to_string()];

    let reg = p.http(
        "POST",
        "/v1/servers",
        Some(&p.admin_token()),
        Some(r#"{"serverId":"gone"}"#),
    );
    let gone = reg.json()["token"].as_str().unwrap().to_string();
    secrets.push(reg.json()["signingKey"].as_str().unwrap().to_string());
    assert_eq!(
        p.http("DELETE", "/v1/servers/gone", Some(&p.admin_token()), None)
            .status,
        204
    );

    let before = metrics_text(&p);
    let now = now_secs();
    let mut sent = Vec::new();
    let mut expired_peer = String::new();
    for reason in reasons {
        let token: Option<String> = match reason {
            "missing_token" => None,
            "malformed_token" => Some("not.a.token".into()),
            "unsupported_alg" => Some(craft(
                SECRET,
                r#"{"alg":"HS512","typ":"JWT"}"#,
                &claims_text("ops", "admin"),
            )),
            "bad_signature" => Some(craft(
                "wrong-secret-0123456789-abcdefghijklmnop",
                HS256,
                &claims_text("ops", "admin"),
            )),
            "expired" => Some(p.token_with("ops", TokenType::Admin, now - 3600, now - 600)),
            "not_yet_valid" => Some(jwt::sign(
                SECRET.as_bytes(),
                &Claims {
                    server_id: "ops".into(),
                    token_type: TokenType::Admin,
                    iat: now,
                    exp: now + 3600,
                    nbf: Some(now + 600),
                    jti: None,
                },
            )),
            "issued_in_future" => {
                Some(p.token_with("ops", TokenType::Admin, now + 600, now + 3600))
            }
            "wrong_type" => Some(p.federation_token("ops")),
            "revoked" => Some(gone.clone()),
            _ => unreachable!(),
        };
        let path = if reason == "revoked" {
            "/v1/token"
        } else {
            "/v1/servers"
        };
        let method = if reason == "revoked" { "POST" } else { "GET" };
        let mut s = TcpStream::connect(p.addr).unwrap();
        let local = s.local_addr().unwrap().to_string();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
        if let Some(t) = &token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
            secrets.push(t.clone());
            if let Some(sig) = t.split('.').nth(2).filter(|s| s.len() > 20) {
                secrets.push(sig.to_string());
            }
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let r = parse_raw(&raw);
        if reason == "wrong_type" {
            assert_error(&r, 403, reason);
        } else {
            assert_401(&r, reason);
        }
        if reason == "expired" {
            expired_peer = local.clone();
        }
        sent.push((reason, local));
    }
    let after = metrics_text(&p);
    for reason in reasons {
        let b = metric(&before, &series(reason)).unwrap_or(0.0);
        let a = metric(&after, &series(reason))
            .unwrap_or_else(|| panic!("no series {} in /metrics", series(reason)));
        assert_eq!(a - b, 1.0, "{} went from {b} to {a}", series(reason));
    }

    // One auth_failed line per failure, with the peer and the reason.
    let lines = eventually("auth_failed lines in the audit log", || {
        let l = json_lines(&audit);
        let n = l.iter().filter(|v| v["event"] == "auth_failed").count();
        (n >= reasons.len()).then_some(l)
    });
    for (reason, peer) in &sent {
        assert!(
            lines.iter().any(|v| v["event"] == "auth_failed"
                && v["reason"] == *reason
                && v["peer"] == peer.as_str()),
            "no auth_failed line for {reason} from {peer}: {lines:?}"
        );
    }
    assert!(!expired_peer.is_empty());
    for v in &lines {
        assert!(v["ts"].is_i64() || v["ts"].is_u64(), "ts: {v}");
        let allowed = set(&["ts", "event", "serverId", "peer", "reason"]);
        assert!(keys(v).is_subset(&allowed), "audit keys: {v}");
    }

    // Also a successful registration, token refresh and send cross the wire.
    let t = p.register("alpha");
    secrets.push(t.clone());
    let r = post_token(&p, &t);
    secrets.push(r.json()["token"].as_str().unwrap().to_string());
    let admin = p.admin_token();
    secrets.push(admin.clone());
    let _ = p.http("GET", "/v1/servers", Some(&admin), None);

    let stderr = p.stderr_text();
    let audit_text = std::fs::read_to_string(&audit).unwrap_or_default();
    for s in &secrets {
        assert!(
            !audit_text.contains(s.as_str()),
            "audit log contains a token, key or secret: {s}"
        );
        assert!(
            !stderr.contains(s.as_str()),
            "stderr log contains a token, key or secret: {s}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn audit_goes_to_stderr_when_no_file_is_set() {
    let p = Proxy::start(&[]);
    assert_401(&p.http("GET", "/v1/servers", None, None), "missing_token");
    eventually("an auth_failed audit line on stderr", || {
        p.stderr_text()
            .lines()
            .any(|l| l.contains("auth_failed") && l.contains("missing_token"))
            .then_some(())
    });
    assert!(!p.stderr_text().contains(SECRET));
}

// ---------------------------------------------------------------------------------------------
// §3 HTTP: health, metrics, registry
// ---------------------------------------------------------------------------------------------

#[test]
fn healthz_readyz_and_metrics() {
    let p = Proxy::start(&[]);
    let r = p.http("GET", "/healthz", None, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
    );
    let r = p.http("GET", "/readyz", None, None);
    assert_eq!(r.status, 200, "{}", r.text());

    let r = p.http("GET", "/metrics", None, None);
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain; version=0.0.4"),
        "metrics Content-Type: {ct:?}"
    );
    let text = r.text();
    // Every sample line is `name{labels} value` with a float value.
    for l in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("line {l:?}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "value in {l:?}"
        );
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name in {l:?}"
        );
    }
    let has_type = |name: &str, kind: &str| {
        text.lines()
            .any(|l| l.trim() == format!("# TYPE {name} {kind}"))
    };
    assert!(has_type("fedmcp_connections", "gauge"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("fedmcp_connections{") && l.contains("state=\"")),
        "fedmcp_connections by state: {text}"
    );
    assert!(has_type("fedmcp_servers_online", "gauge"), "{text}");
    assert_eq!(metric(&text, "fedmcp_servers_online"), Some(0.0));
    assert!(has_type("fedmcp_messages_total", "counter"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("fedmcp_messages_total{") && l.contains("result=\"")),
        "fedmcp_messages_total by result: {text}"
    );
    assert!(has_type("fedmcp_auth_failures_total", "counter"), "{text}");
    assert!(has_type("fedmcp_delivery_seconds", "histogram"), "{text}");
    assert!(
        metric(&text, "fedmcp_delivery_seconds_bucket{le=\"+Inf\"}").is_some(),
        "+Inf bucket: {text}"
    );
    assert!(
        metric(&text, "fedmcp_delivery_seconds_sum").is_some(),
        "{text}"
    );
    assert!(
        metric(&text, "fedmcp_delivery_seconds_count").is_some(),
        "{text}"
    );
    assert!(has_type("fedmcp_queue_messages", "gauge"), "{text}");
    assert_eq!(metric(&text, "fedmcp_queue_messages"), Some(0.0));
    let rss = metric(&text, "fedmcp_resident_memory_bytes").expect("resident memory");
    assert!(rss > 0.0, "fedmcp_resident_memory_bytes {rss}");
}

#[test]
fn registration_201_then_200_with_token_and_signing_key() {
    let p = Proxy::start(&[("FEDMCP_TOKEN_TTL_SECS", "3600")]);
    let admin = p.admin_token();
    let body = json!({
        "serverId": "alpha",
        "endpoints": {"data": "https://alpha.example/data"},
        "capabilities": {"tools": [{"name": "t"}]}
    })
    .to_string();
    let r = p.http("POST", "/v1/servers", Some(&admin), Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
    );
    let v = r.json();
    assert_eq!(
        keys(&v),
        set(&[
            "serverId",
            "token",
            "expiresAt",
            "signingKey",
            "signingKeyEpoch"
        ]),
        "{v}"
    );
    assert_eq!(v["serverId"], "alpha");
    assert_eq!(v["signingKeyEpoch"], 1);
    let expected_key = jwt::hmac_b64(SECRET.as_bytes(), &[b"fedmcp/v1/sign/", b"alpha/1"]);
    assert_eq!(v["signingKey"], expected_key.as_str());
    let token = v["token"].as_str().unwrap();
    let c = claims_of(token);
    assert_eq!(c["serverId"], "alpha");
    assert_eq!(c["type"], "federation");
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    assert_eq!(
        v["expiresAt"].as_i64(),
        Some(c["exp"].as_i64().unwrap() * 1000)
    );
    assert!(jwt::verify(token, &[SECRET.as_bytes()], now_secs(), 30).is_ok());
    assert_eq!(post_token(&p, token).status, 200, "the issued token works");

    let e = get_admin(&p, "/v1/servers/alpha").json();
    assert_eq!(
        e["endpoints"],
        json!({"data": "https://alpha.example/data"})
    );
    assert_eq!(e["capabilities"], json!({"tools": [{"name": "t"}]}));

    // Update: 200, the same signing key, the new capabilities.
    let body = json!({"serverId": "alpha", "capabilities": {"v": 2}}).to_string();
    let r = p.http("POST", "/v1/servers", Some(&admin), Some(&body));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        keys(&v),
        set(&[
            "serverId",
            "token",
            "expiresAt",
            "signingKey",
            "signingKeyEpoch"
        ])
    );
    assert_eq!(v["signingKey"], expected_key.as_str());
    assert_eq!(v["signingKeyEpoch"], 1, "an update keeps the key");
    assert_eq!(
        get_admin(&p, "/v1/servers/alpha").json()["capabilities"],
        json!({"v": 2})
    );
    // Another id: another key.
    let r = p.http(
        "POST",
        "/v1/servers",
        Some(&admin),
        Some(r#"{"serverId":"b.e_t:a-2"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.json()["signingKey"],
        jwt::hmac_b64(SECRET.as_bytes(), &[b"fedmcp/v1/sign/b.e_t:a-2/1"]).as_str()
    );
}

#[test]
fn invalid_registrations_are_400() {
    let p = Proxy::start(&[]);
    let admin = p.admin_token();
    let long = "x".repeat(65);
    let bodies = [
        json!({"serverId": "bad id"}).to_string(),
        json!({"serverId": "a/b"}).to_string(),
        json!({"serverId": ""}).to_string(),
        json!({"serverId": long}).to_string(),
        json!({"serverId": 5}).to_string(),
        json!({}).to_string(),
        json!({"serverId": "x", "endpoints": {"control": "http://x"}}).to_string(),
        json!({"serverId": "x", "endpoints": {"control": "x"}}).to_string(),
        json!({"serverId": "x", "endpoints": {"data": "ws://x"}}).to_string(),
        json!({"serverId": "x", "endpoints": "ws://x"}).to_string(),
        json!({"serverId": "x", "capabilities": []}).to_string(),
        json!({"serverId": "x", "capabilities": "tools"}).to_string(),
        json!({"serverId": "x", "capabilities": 5}).to_string(),
        "{".to_string(),
        "{\"serverId\":\"x\"".to_string(),
        "[]".to_string(),
        "\"x\"".to_string(),
        String::new(),
    ];
    for b in &bodies {
        let r = p.http("POST", "/v1/servers", Some(&admin), Some(b));
        assert_eq!(r.status, 400, "body {b:?}: {} {}", r.status, r.text());
        assert_error(&r, 400, "invalid_request");
    }
    // Nothing got registered.
    assert_eq!(
        get_admin(&p, "/v1/servers").json(),
        json!({"servers": []}),
        "invalid registrations left entries behind"
    );
    // The valid forms of the same fields are accepted.
    let ok = json!({"serverId": "x", "endpoints": {"control": "wss://x.example/c", "data": "http://x.example"}, "capabilities": {}});
    let r = p.http("POST", "/v1/servers", Some(&admin), Some(&ok.to_string()));
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn registry_full_is_507() {
    let p = Proxy::start(&[("FEDMCP_MAX_SERVERS", "2")]);
    let admin = p.admin_token();
    let reg = |id: &str| {
        p.http(
            "POST",
            "/v1/servers",
            Some(&admin),
            Some(&json!({"serverId": id}).to_string()),
        )
    };
    assert_eq!(reg("a").status, 201);
    assert_eq!(reg("b").status, 201);
    assert_error(&reg("c"), 507, "registry_full");
    // Updating an existing entry still works when full.
    assert_eq!(reg("a").status, 200);
    // Removing one makes room.
    assert_eq!(
        p.http("DELETE", "/v1/servers/b", Some(&admin), None).status,
        204
    );
    assert_eq!(reg("c").status, 201);
    assert_eq!(
        get_admin(&p, "/v1/servers").json()["servers"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn registry_entries_have_the_contract_fields_and_follow_the_session() {
    let p = Proxy::start(&[]);
    let t = p.register("alpha");
    let fields = set(&[
        "serverId",
        "state",
        "direction",
        "endpoints",
        "capabilities",
        "connectedAt",
        "lastSeenAt",
        "queued",
        "stats",
    ]);
    let r = get_admin(&p, "/v1/servers");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(keys(&v), set(&["servers"]));
    let list = v["servers"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    let e = &list[0];
    assert_eq!(keys(e), fields, "{e}");
    assert_eq!(e["serverId"], "alpha");
    assert_eq!(e["state"], "offline");
    assert_eq!(e["direction"], Value::Null);
    assert_eq!(e["connectedAt"], Value::Null, "never connected: {e}");
    assert_eq!(e["lastSeenAt"], Value::Null, "never seen: {e}");
    assert_eq!(e["queued"], 0);
    assert_eq!(e["stats"], json!({"sent": 0, "received": 0}));
    let single = get_admin(&p, "/v1/servers/alpha");
    assert_eq!(single.status, 200);
    assert_eq!(
        &single.json(),
        e,
        "GET /v1/servers/{{id}} is the same entry"
    );

    // Upgraded but the welcome not yet answered: connecting.
    let mut pending = p.ws_raw(&t).expect("upgrade");
    let welcome = pending.recv();
    assert_eq!(welcome["method"], "federation/welcome");
    let e = get_admin(&p, "/v1/servers/alpha").json();
    assert_eq!(e["state"], "connecting", "before the welcome answer: {e}");
    let _ = pending.ws.close(None);
    let _ = pending.ws.flush();
    drop(pending);
    eventually("offline after the unanswered session ends", || {
        (get_admin(&p, "/v1/servers/alpha").json()["state"] == "offline").then_some(())
    });

    let before = now_ms();
    let (mut ws, _) = p.online(&t, json!({"tools": []}));
    let e = get_admin(&p, "/v1/servers/alpha").json();
    assert_eq!(keys(&e), fields, "{e}");
    assert_eq!(e["state"], "online", "{e}");
    assert_eq!(e["direction"], "inbound", "{e}");
    assert_eq!(
        e["capabilities"],
        json!({"tools": []}),
        "welcome capabilities"
    );
    let connected = e["connectedAt"].as_i64().expect("connectedAt in ms");
    assert!(
        connected >= before - 2000 && connected <= now_ms() + 2000,
        "connectedAt {connected} (now {before})"
    );
    assert!(e["lastSeenAt"].as_i64().is_some(), "lastSeenAt: {e}");
    let m = metrics_text(&p);
    assert_eq!(metric(&m, "fedmcp_servers_online"), Some(1.0), "{m}");

    // The session ends: offline again, direction null.
    let _ = ws.ws.close(None);
    let _ = ws.ws.flush();
    let e = eventually("offline after the session ends", || {
        let e = get_admin(&p, "/v1/servers/alpha").json();
        (e["state"] == "offline").then_some(e)
    });
    assert_eq!(e["direction"], Value::Null, "{e}");
    assert_eq!(keys(&e), fields);
    assert!(e["lastSeenAt"].as_i64().is_some(), "seen once: {e}");

    assert_error(&get_admin(&p, "/v1/servers/nobody"), 404, "unknown_server");
}

fn now_ms() -> i64 {
    fedmcp::clock::now_ms()
}

#[test]
fn delete_is_204_then_404_and_closes_the_session_with_4001() {
    let p = Proxy::start(&[]);
    let t = p.register("alpha");
    p.register("beta");
    let (mut ws, _) = p.online(&t, json!({}));
    let admin = p.admin_token();
    let r = p.http("DELETE", "/v1/servers/alpha", Some(&admin), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(ws.recv_close(), Some(4001), "session of a removed server");
    assert_error(
        &p.http("DELETE", "/v1/servers/alpha", Some(&admin), None),
        404,
        "unknown_server",
    );
    assert_error(&get_admin(&p, "/v1/servers/alpha"), 404, "unknown_server");
    assert_error(
        &p.http("DELETE", "/v1/servers/never", Some(&admin), None),
        404,
        "unknown_server",
    );
    let list = get_admin(&p, "/v1/servers").json();
    let ids: Vec<&str> = list["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["serverId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["beta"]);
}

#[test]
fn wrong_method_is_405_with_allow_and_unknown_path_404() {
    let p = Proxy::start(&[]);
    let admin = p.admin_token();
    for (m, path, must_allow) in [
        ("DELETE", "/healthz", "GET"),
        ("POST", "/readyz", "GET"),
        ("PUT", "/metrics", "GET"),
        ("GET", "/v1/token", "POST"),
        ("GET", "/v1/messages", "POST"),
        ("PUT", "/v1/servers", "POST"),
        ("PATCH", "/v1/servers/x", "DELETE"),
    ] {
        let r = p.http(m, path, Some(&admin), None);
        assert_error(&r, 405, "method_not_allowed");
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("{m} {path}: no Allow header"));
        assert!(
            allow.split(',').any(|a| a.trim() == must_allow),
            "{m} {path}: Allow {allow:?} lacks {must_allow}"
        );
        assert!(
            !allow.split(',').any(|a| a.trim() == m),
            "{m} {path}: Allow {allow:?} lists the refused method"
        );
    }
    for path in ["/nope", "/v1", "/v1/serverz", "/healthz/x", "/v2/servers"] {
        let r = p.http("GET", path, Some(&admin), None);
        assert_error(&r, 404, "not_found");
    }
}

#[test]
fn every_response_has_date_and_content_length() {
    let p = Proxy::start(&[("FEDMCP_MAX_MESSAGE_BYTES", "2048")]);
    let admin = p.admin_token();
    let fed = p.register("alpha");
    let big = format!(
        r#"{{"serverId":"x","capabilities":{{"p":"{}"}}}}"#,
        "a".repeat(3000)
    );
    let mut responses = vec![
        ("healthz", p.http("GET", "/healthz", None, None)),
        ("readyz", p.http("GET", "/readyz", None, None)),
        ("metrics", p.http("GET", "/metrics", None, None)),
        ("list", p.http("GET", "/v1/servers", Some(&admin), None)),
        (
            "register",
            p.http(
                "POST",
                "/v1/servers",
                Some(&admin),
                Some(r#"{"serverId":"b"}"#),
            ),
        ),
        (
            "400",
            p.http("POST", "/v1/servers", Some(&admin), Some("{")),
        ),
        ("401", p.http("GET", "/v1/servers", None, None)),
        ("403", p.http("GET", "/v1/servers", Some(&fed), None)),
        ("404", p.http("GET", "/nope", None, None)),
        ("405", p.http("DELETE", "/healthz", None, None)),
        (
            "413",
            p.http("POST", "/v1/servers", Some(&admin), Some(&big)),
        ),
        ("token", post_token(&p, &fed)),
        (
            "503",
            p.http(
                "POST",
                "/v1/messages",
                Some(&fed),
                Some(r#"{"to":"b","message":1}"#),
            ),
        ),
    ];
    responses.push((
        "431",
        parse_raw(
            &p.raw(
                format!(
                    "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
                    "a".repeat(17 * 1024)
                )
                .as_bytes(),
            ),
        ),
    ));
    responses.push((
        "501",
        request(
            &p,
            "POST",
            "/v1/servers",
            &[("Transfer-Encoding", "gzip")],
            None,
        ),
    ));
    let del = p.http("DELETE", "/v1/servers/b", Some(&admin), None);
    assert_eq!(del.status, 204);
    assert!(del.header("date").is_some(), "204 without Date");
    for (what, r) in &responses {
        let date = r
            .header("date")
            .unwrap_or_else(|| panic!("{what} ({}): no Date header", r.status));
        // IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT".
        assert!(
            date.len() == 29 && date.ends_with(" GMT") && date.as_bytes()[3] == b',',
            "{what}: Date {date:?}"
        );
        let len = r
            .header("content-length")
            .unwrap_or_else(|| panic!("{what} ({}): no Content-Length", r.status));
        assert_eq!(
            len.parse::<usize>().ok(),
            Some(r.body.len()),
            "{what}: Content-Length {len} vs body {}",
            r.body.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// §3 HTTP: framing, limits, connections
// ---------------------------------------------------------------------------------------------

#[test]
fn head_over_16k_is_431_and_a_large_head_under_it_works() {
    let p = Proxy::start(&[]);
    let r = parse_raw(
        &p.raw(
            format!(
                "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
                "a".repeat(17 * 1024)
            )
            .as_bytes(),
        ),
    );
    assert_error(&r, 431, "header_too_large");
    // Many headers adding up to more than 16 KiB.
    let mut req = String::from("GET /healthz HTTP/1.1\r\nHost: t\r\n");
    for i in 0..400 {
        req.push_str(&format!("X-H{i}: {}\r\n", "b".repeat(40)));
    }
    req.push_str("Connection: close\r\n\r\n");
    assert!(req.len() > 16 * 1024);
    let r = parse_raw(&p.raw(req.as_bytes()));
    assert_error(&r, 431, "header_too_large");
    // 12 KiB of head is fine.
    let r = parse_raw(
        &p.raw(
            format!(
                "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
                "a".repeat(12 * 1024)
            )
            .as_bytes(),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn json_body_over_max_message_bytes_is_413() {
    let p = Proxy::start(&[("FEDMCP_MAX_MESSAGE_BYTES", "2048")]);
    let admin = p.admin_token();
    let body = |n: usize| {
        format!(
            r#"{{"serverId":"x","capabilities":{{"p":"{}"}}}}"#,
            "a".repeat(n)
        )
    };
    let r = p.http("POST", "/v1/servers", Some(&admin), Some(&body(3000)));
    assert_error(&r, 413, "payload_too_large");
    // Just under the limit: accepted.
    let ok = body(1900);
    assert!(ok.len() <= 2048);
    let r = p.http("POST", "/v1/servers", Some(&admin), Some(&ok));
    assert_eq!(r.status, 201, "{}", r.text());
    // Chunked bodies count too.
    let big = body(3000);
    let mut req = format!(
        "POST /v1/servers HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for chunk in big.as_bytes().chunks(500) {
        req.push_str(&format!(
            "{:x}\r\n{}\r\n",
            chunk.len(),
            std::str::from_utf8(chunk).unwrap()
        ));
    }
    req.push_str("0\r\n\r\n");
    let r = parse_raw(&p.raw(req.as_bytes()));
    assert_error(&r, 413, "payload_too_large");
    // And the federation endpoint.
    let fed = p.register("alpha");
    let msg = format!(r#"{{"to":"x","message":"{}"}}"#, "m".repeat(3000));
    let r = p.http("POST", "/v1/messages", Some(&fed), Some(&msg));
    assert_error(&r, 413, "payload_too_large");
}

#[test]
fn ambiguous_or_invalid_framing_is_400_and_unknown_coding_501() {
    let p = Proxy::start(&[]);
    let admin = p.admin_token();
    let auth = format!("Authorization: Bearer {admin}\r\n");
    let body = r#"{"serverId":"smuggled"}"#;
    let n = body.len();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            format!(
                "POST /v1/servers HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {n}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{n:x}\r\n{body}\r\n0\r\n\r\n"
            ),
            400,
            "bad_request",
        ),
        (
            "two differing Content-Lengths",
            format!(
                "POST /v1/servers HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {n}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                n + 1
            ),
            400,
            "bad_request",
        ),
        (
            "differing Content-Lengths in one header",
            format!(
                "POST /v1/servers HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {n}, {}\r\nConnection: close\r\n\r\n{body}",
                n + 1
            ),
            400,
            "bad_request",
        ),
        (
            "Content-Length: abc",
            format!(
                "POST /v1/servers HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: abc\r\nConnection: close\r\n\r\n{body}"
            ),
            400,
            "bad_request",
        ),
        (
            "Content-Length: -1",
            format!(
                "POST /v1/servers HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: -1\r\nConnection: close\r\n\r\n{body}"
            ),
            400,
            "bad_request",
        ),
        (
            "Content-Length: +23",
            format!(
                "POST /v1/servers HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: +{n}\r\nConnection: close\r\n\r\n{body}"
            ),
            400,
            "bad_request",
        ),
        (
            "Transfer-Encoding: gzip",
            format!(
                "POST /v1/servers HTTP/1.1\r\nHost: t\r\n{auth}Transfer-Encoding: gzip\r\nConnection: close\r\n\r\n{body}"
            ),
            501,
            "unsupported_transfer_coding",
        ),
    ];
    for (what, req, status, code) in cases {
        let r = parse_raw(&p.raw(req.as_bytes()));
        assert_eq!(r.status, status, "{what}: {} {}", r.status, r.text());
        assert_error(&r, status, code);
    }
    assert_error(
        &get_admin(&p, "/v1/servers/smuggled"),
        404,
        "unknown_server",
    );
}

#[test]
fn chunked_json_registration_body_works() {
    let p = Proxy::start(&[]);
    let admin = p.admin_token();
    let body = r#"{"serverId":"chunky","capabilities":{"a":[1,2,3]}}"#;
    let (a, rest) = body.split_at(7);
    let (b, c) = rest.split_at(20);
    let req = format!(
        "POST /v1/servers HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:X};ext=1\r\n{b}\r\n{:x}\r\n{c}\r\n0\r\n\r\n",
        a.len(),
        b.len(),
        c.len()
    );
    let r = parse_raw(&p.raw(req.as_bytes()));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["serverId"], "chunky");
    let e = get_admin(&p, "/v1/servers/chunky").json();
    assert_eq!(e["capabilities"], json!({"a": [1, 2, 3]}));
}

#[test]
fn incomplete_head_gets_408_within_the_handshake_timeout() {
    let p = Proxy::start(&[("FEDMCP_HANDSHAKE_TIMEOUT_MS", "300")]);
    // Part of a head, then silence.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let start = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let took = start.elapsed();
    let r = parse_raw(&raw);
    assert_error(&r, 408, "request_timeout");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "408 after {took:?}"
    );
    // A connection that sends nothing at all is also bounded by the handshake timeout.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let start = Instant::now();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "silent connection held {took:?}"
    );
    if !raw.is_empty() {
        assert_eq!(parse_raw(&raw).status, 408);
    }
    // A body that stops short is bounded too.
    let admin = p.admin_token();
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let start = Instant::now();
    s.write_all(
        format!(
            "POST /v1/servers HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {admin}\r\nContent-Length: 100\r\n\r\n{{\"server"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(
        parse_raw(&raw).status,
        408,
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let p = Proxy::start(&[]);
    let admin = p.admin_token();
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let r = read_responses(&mut s, 1).remove(0);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
    std::thread::sleep(Duration::from_millis(50));
    let body = r#"{"serverId":"ka"}"#;
    s.write_all(
        format!(
            "POST /v1/servers HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {admin}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let r = read_responses(&mut s, 1).remove(0);
    assert_eq!(r.status, 201, "{}", r.text());
    // An error answer does not end a keep-alive connection either.
    s.write_all(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_responses(&mut s, 1)[0].status, 404);
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_responses(&mut s, 1)[0].status, 200);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let p = Proxy::start(&[]);
    let admin = p.admin_token();
    let body = r#"{"serverId":"pipe"}"#;
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n\
         POST /v1/servers HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}\
         GET /v1/servers/pipe HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {admin}\r\n\r\n\
         GET /nope HTTP/1.1\r\nHost: t\r\n\r\n\
         GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // One write: all five requests arrive together.
    let raw = p.raw(req.as_bytes());
    let mut rest = &raw[..];
    let mut got = Vec::new();
    while !rest.is_empty() {
        let (r, n) = Resp::parse_one(rest)
            .unwrap_or_else(|| panic!("unparseable: {:?}", String::from_utf8_lossy(rest)));
        got.push(r);
        rest = &rest[n..];
    }
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 201, 200, 404, 200], "in order");
    assert_eq!(got[0].json(), json!({"status": "ok"}));
    assert_eq!(got[1].json()["serverId"], "pipe");
    assert_eq!(got[2].json()["serverId"], "pipe");
}

#[test]
fn connection_close_is_honoured() {
    let p = Proxy::start(&[]);
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let start = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .expect("the proxy closes after the answer");
    assert!(start.elapsed() < Duration::from_secs(5));
    let (r, n) = Resp::parse_one(&raw).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(n, raw.len(), "exactly one response");
    // A request after `Connection: close` on the same connection is not answered.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /readyz HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let (r, n) = Resp::parse_one(&raw).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(n, raw.len(), "nothing after the closing answer");
}

#[test]
fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let p = Proxy::start(&[("FEDMCP_IDLE_TIMEOUT_MS", "300")]);
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_responses(&mut s, 1)[0].status, 200);
    let took = wait_eof(&mut s, Duration::from_secs(5));
    assert!(
        took >= Duration::from_millis(150),
        "closed {took:?} after the answer: not kept alive"
    );
}

#[test]
fn head_healthz_has_content_length_and_no_body() {
    let p = Proxy::start(&[]);
    let get = p.http("GET", "/healthz", None, None);
    let raw = p.raw(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    assert_eq!(
        &raw[end..],
        b"",
        "HEAD answered with a body: {:?}",
        String::from_utf8_lossy(&raw)
    );
    let r = parse_raw(&raw[..end]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(get.body.len().to_string().as_str()),
        "HEAD Content-Length is the GET body's"
    );
    assert!(r.header("date").is_some());
    // HEAD on a keep-alive connection: the next response follows directly.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(
        b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let second = parse_raw(&raw[end..]);
    assert_eq!(second.status, 200, "{:?}", String::from_utf8_lossy(&raw));
    assert_eq!(second.json(), json!({"status": "ok"}));
}

// ---------------------------------------------------------------------------------------------
// §3 POST /v1/messages
// ---------------------------------------------------------------------------------------------

#[test]
fn post_messages_offline_unknown_and_queued() {
    let p = Proxy::start(&[]);
    let fa = p.register("alice");
    p.register("bob");
    p.register("carol");
    let send = |body: &str| p.http("POST", "/v1/messages", Some(&fa), Some(body));
    assert_error(
        &send(r#"{"to":"bob","message":{"x":1}}"#),
        503,
        "server_offline",
    );
    assert_error(
        &send(r#"{"to":"nobody","message":{"x":1}}"#),
        404,
        "unknown_server",
    );
    let r = send(r#"{"to":"carol","message":{"x":1},"queue":true}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(keys(&v), set(&["msgId", "status"]), "{v}");
    assert_eq!(v["status"], "queued");
    assert!(v["msgId"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    let e = get_admin(&p, "/v1/servers/carol").json();
    assert_eq!(e["queued"], 1, "{e}");
    let m = metrics_text(&p);
    assert_eq!(metric(&m, "fedmcp_queue_messages"), Some(1.0), "{m}");
    // Removal drops the queue.
    let admin = p.admin_token();
    assert_eq!(
        p.http("DELETE", "/v1/servers/carol", Some(&admin), None)
            .status,
        204
    );
    assert_eq!(register_status(&p, "carol"), 201);
    let e = get_admin(&p, "/v1/servers/carol").json();
    assert_eq!(e["queued"], 0, "queue kept across removal: {e}");
    let m = metrics_text(&p);
    assert_eq!(metric(&m, "fedmcp_queue_messages"), Some(0.0), "{m}");
    // Not JSON: 400 with the error body.
    let r = send("{not json");
    assert_error(&r, 400, "parse_error");
}

#[test]
fn post_messages_to_an_online_server_returns_its_reply() {
    let p = Proxy::start(&[]);
    let fa = p.register("alice");
    let fb = p.register("bob");
    let (mut bob, _) = p.online(&fb, json!({}));
    let before = metrics_text(&p);
    let answering = std::thread::spawn(move || {
        // The raw text, to see the message exactly as forwarded.
        let raw = loop {
            let t = bob.recv_text();
            if t.contains("federation/deliver") {
                break t;
            }
        };
        let d: Value = serde_json::from_str(&raw).unwrap();
        assert!(
            raw.contains(r#"{"q" : "hi",  "n":1.50}"#),
            "the message is forwarded byte for byte: {raw}"
        );
        bob.answer(&d, json!({"ok": true, "n": 7}));
        let d2 = bob.recv_method("federation/deliver");
        bob.send(
            &json!({"jsonrpc": "2.0", "id": d2["id"], "error": {"code": -1, "message": "no"}}),
        );
        (bob, d)
    });
    // Keep-alive connection: the answers are framed by Content-Length.
    let mut s = TcpStream::connect(p.addr).unwrap();
    let post = |body: &str| {
        format!(
            "POST /v1/messages HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {fa}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    s.write_all(post(r#"{"to":"bob","message":{"q" : "hi",  "n":1.50}}"#).as_bytes())
        .unwrap();
    let r = read_responses(&mut s, 1).remove(0);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "delivered", "{v}");
    assert_eq!(v["reply"], json!({"ok": true, "n": 7}));
    assert!(v["msgId"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    s.write_all(post(r#"{"to":"bob","message":2}"#).as_bytes())
        .unwrap();
    let r2 = read_responses(&mut s, 1).remove(0);
    let (_bob, d) = answering.join().expect("bob thread");
    assert_eq!(d["params"]["from"], "alice");
    assert_eq!(d["params"]["message"], json!({"q": "hi", "n": 1.5}));
    assert_eq!(
        v["msgId"], d["params"]["msgId"],
        "the msgId the recipient saw"
    );
    assert_eq!(r2.status, 200, "{}", r2.text());
    let v2 = r2.json();
    assert_eq!(v2["status"], "rejected", "{v2}");
    assert_eq!(v2["error"]["message"], "no");

    let after = metrics_text(&p);
    let delivered = "fedmcp_messages_total{result=\"delivered\"}";
    assert!(
        metric(&after, delivered).unwrap_or(0.0) > metric(&before, delivered).unwrap_or(0.0),
        "{delivered} did not grow"
    );
    assert!(
        metric(&after, "fedmcp_delivery_seconds_count").unwrap_or(0.0)
            > metric(&before, "fedmcp_delivery_seconds_count").unwrap_or(0.0),
        "fedmcp_delivery_seconds_count did not grow"
    );
    let e = get_admin(&p, "/v1/servers/bob").json();
    assert!(e["stats"]["received"].as_u64().unwrap_or(0) >= 2, "{e}");
}

#[test]
fn post_messages_answer_honours_connection_close() {
    let p = Proxy::start(&[]);
    let fa = p.register("alice");
    let fb = p.register("bob");
    let (mut bob, _) = p.online(&fb, json!({}));
    let answering = std::thread::spawn(move || {
        let d = bob.recv_method("federation/deliver");
        bob.answer(&d, json!("pong"));
        bob
    });
    let body = r#"{"to":"bob","message":"ping"}"#;
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.write_all(
        format!(
            "POST /v1/messages HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {fa}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let r = read_responses(&mut s, 1).remove(0);
    let _bob = answering.join().expect("bob thread");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "delivered");
    assert_eq!(r.json()["reply"], "pong");
    // The answer came after the recipient's reply; the connection must close after it.
    let took = wait_eof(&mut s, Duration::from_secs(3));
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
}

// ---------------------------------------------------------------------------------------------
// §8 Operations: audit events and signals
// ---------------------------------------------------------------------------------------------

#[test]
fn audit_log_records_registry_token_and_session_events() {
    let dir = scratch_dir("audit-events");
    let audit = dir.join("audit.log");
    let p = Proxy::start(&[("FEDMCP_AUDIT_LOG", audit.to_str().unwrap())]);
    let t = p.register("alpha");
    assert_eq!(post_token(&p, &t).status, 200);
    let (mut ws, _) = p.online(&t, json!({}));
    let _ = ws.ws.close(None);
    let _ = ws.ws.flush();
    eventually("offline", || {
        (get_admin(&p, "/v1/servers/alpha").json()["state"] == "offline").then_some(())
    });
    assert_eq!(
        p.http("DELETE", "/v1/servers/alpha", Some(&p.admin_token()), None)
            .status,
        204
    );
    let want = [
        "server_registered",
        "token_issued",
        "session_opened",
        "session_closed",
        "server_removed",
    ];
    let lines = eventually("every audit event", || {
        let l = json_lines(&audit);
        want.iter()
            .all(|w| {
                l.iter()
                    .any(|v| v["event"] == *w && v["serverId"] == "alpha")
            })
            .then_some(l)
    });
    let allowed_events = set(&[
        "auth_failed",
        "session_opened",
        "session_closed",
        "server_registered",
        "server_removed",
        "token_issued",
        "rate_limited",
    ]);
    let now = now_ms();
    for v in &lines {
        let ts = v["ts"].as_i64().unwrap_or_else(|| panic!("ts: {v}"));
        assert!((now - 60_000..=now + 5_000).contains(&ts), "ts in ms: {v}");
        assert!(
            allowed_events.contains(v["event"].as_str().unwrap_or("")),
            "event: {v}"
        );
        assert!(
            keys(v).is_subset(&set(&["ts", "event", "serverId", "peer", "reason"])),
            "keys: {v}"
        );
    }
    let tokens = lines
        .iter()
        .filter(|v| v["event"] == "token_issued" && v["serverId"] == "alpha")
        .count();
    assert!(
        tokens >= 2,
        "registration and /v1/token both issue: {lines:?}"
    );
    // In order: registered before opened before closed before removed.
    let pos = |e: &str| lines.iter().position(|v| v["event"] == e).unwrap();
    assert!(pos("server_registered") < pos("session_opened"));
    assert!(pos("session_opened") < pos("session_closed"));
    assert!(pos("session_closed") < pos("server_removed"));
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains(&t) && !text.contains(SECRET));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_closes_sessions_with_1001_and_exits_0() {
    let mut p = Proxy::start(&[("FEDMCP_SHUTDOWN_GRACE_MS", "3000")]);
    let t = p.register("alpha");
    let (mut ws, _) = p.online(&t, json!({}));
    let closer = std::thread::spawn(move || {
        let code = ws.recv_close();
        // Answer the close (tungstenite queues the reply; reading flushes it) and wait for EOF.
        let _ = ws.ws.flush();
        while ws.ws.read().is_ok() {}
        code
    });
    let (code, took) = signal_and_wait(&mut p, "TERM");
    let close = closer.join().unwrap();
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    assert_eq!(close, Some(1001), "close code on SIGTERM");
    assert!(
        took < Duration::from_millis(3000 + 1500),
        "exit {took:?} after SIGTERM (grace 3 s)"
    );
}

#[test]
fn sigint_exits_0_within_the_grace_even_if_a_session_never_answers() {
    let mut p = Proxy::start(&[("FEDMCP_SHUTDOWN_GRACE_MS", "1000")]);
    let t = p.register("alpha");
    let (mut ws, _) = p.online(&t, json!({}));
    // The session neither reads nor answers the close.
    let (code, took) = signal_and_wait(&mut p, "INT");
    assert_eq!(code, Some(0), "exit code after SIGINT");
    assert!(
        took < Duration::from_millis(1000 + 2000),
        "exit {took:?} after SIGINT with a 1 s grace"
    );
    // The close frame was sent before the exit.
    assert_eq!(ws.recv_close(), Some(1001), "close code on SIGINT");
}

#[test]
fn readyz_is_503_while_draining() {
    let mut p = Proxy::start(&[("FEDMCP_SHUTDOWN_GRACE_MS", "3000")]);
    let t = p.register("alpha");
    // A session that does not answer the close keeps the proxy draining for the grace time.
    let (mut ws, _) = p.online(&t, json!({}));
    // A request in progress when the drain starts: one write holds a complete request and
    // the start of the next; once the first is answered, the proxy holds the second's start.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /readyz HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    assert_eq!(read_responses(&mut s, 1)[0].status, 200);
    unsafe_kill(p.pid(), "TERM");
    // The 1001 close says the drain has begun.
    assert_eq!(ws.recv_close(), Some(1001));
    s.write_all(b"\r\n").unwrap();
    let r = read_responses(&mut s, 1).remove(0);
    assert_error(&r, 503, "draining");
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if let Ok(Some(st)) = p.child.try_wait() {
            assert_eq!(st.code(), Some(0));
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no exit after SIGTERM");
}
