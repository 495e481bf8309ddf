//! HS256 JSON Web Tokens: minting and verifying the proxy's own tokens (docs/PROTOCOL.md §2), and
//! the HMAC-SHA256 primitives that message signing (§6) shares with them.
//!
//! What this module owns:
//! - the compact JWS format restricted to `HS256`: [`sign`] mints, [`verify`] checks;
//! - the claim set the proxy understands ([`Claims`]): `serverId`, `type`, `iat`, `exp` and the
//!   optional `nbf`, `jti`; every other claim is ignored;
//! - the `serverId` syntax ([`valid_server_id`]) and base64url HMAC helpers ([`hmac_b64`],
//!   [`hmac_verify_b64`]).
//!
//! Invariants:
//! - [`verify`] does its work in a fixed order and stops at the first failure: size bound
//!   ([`MAX_TOKEN_BYTES`]), three unpadded base64url segments, header (a JSON object, `alg`
//!   exactly `"HS256"`, `typ` absent or `"JWT"`, no `crit`), then the signature, compared in
//!   constant time, and only then the claims and the clock. Nothing in the claims segment is
//!   parsed before the signature has been checked.
//! - Every JSON object read here (header and claims) is rejected when it repeats a key, any
//!   key, not only the ones read: RFC 7515 §4 lets a parser either reject duplicates or take the
//!   last one, and rejecting leaves no doubt about which value was meant.
//! - All work is bounded by [`MAX_TOKEN_BYTES`]: the JSON texts are shorter than the token, and
//!   serde_json's recursion limit bounds nesting inside ignored claims.
//! - Time is passed in (`now`, unix seconds); this module never reads a clock.
//!
//! What it must never do: log anything (a token, a secret or a signature must never reach a
//! log, and this module has nothing else to say), panic on any input, or compare a MAC with
//! `==`.

use std::collections::BTreeSet;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Longest token accepted, in bytes (docs/PROTOCOL.md §2). Bounds all parsing work per token.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Longest `serverId`, in characters (docs/PROTOCOL.md §2).
const MAX_SERVER_ID_CHARS: usize = 64;

/// SHA-256 works on 64-byte blocks; HMAC keys are brought to this size (RFC 2104 §2).
const SHA256_BLOCK_BYTES: usize = 64;

/// The header of every token we mint, before base64url.
const HEADER_JSON: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

type HmacSha256 = Hmac<Sha256>;

/// What a token is for: talking as a federated server, or administering the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Federation,
    Admin,
}

impl TokenType {
    /// The value of the `type` claim.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::Federation => "federation",
            TokenType::Admin => "admin",
        }
    }

    fn from_claim(s: &str) -> Option<TokenType> {
        match s {
            "federation" => Some(TokenType::Federation),
            "admin" => Some(TokenType::Admin),
            _ => None,
        }
    }
}

/// The claims the proxy reads from a token and writes into the ones it mints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// JSON claim `serverId`; always satisfies [`valid_server_id`] after [`verify`].
    pub server_id: String,
    /// JSON claim `type`.
    pub token_type: TokenType,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Not before, unix seconds.
    pub nbf: Option<i64>,
    /// Token id.
    pub jti: Option<String>,
}

/// Why a token was refused. [`JwtError::code`] gives the `code` of the 401 body (§2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// Too long, not three unpadded base64url segments, a header or claims that are not a JSON
    /// object (or repeat a key), a `typ` other than `"JWT"`, a `crit` header, or a required claim
    /// missing or of the wrong form.
    Malformed,
    /// The header's `alg` is missing, not a string, or not exactly `"HS256"`.
    UnsupportedAlg,
    /// The signature does not match under any of the secrets.
    BadSignature,
    /// `exp <= now - skew`.
    Expired,
    /// `nbf > now + skew`.
    NotYetValid,
    /// `iat > now + skew`.
    IssuedInFuture,
}

impl JwtError {
    /// The contract's error code for this failure (docs/PROTOCOL.md §2).
    pub fn code(self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed_token",
            JwtError::UnsupportedAlg => "unsupported_alg",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::IssuedInFuture => "issued_in_future",
        }
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JwtError::Malformed => "the token is malformed",
            JwtError::UnsupportedAlg => "the token is not signed with HS256",
            JwtError::BadSignature => "the token's signature does not match",
            JwtError::Expired => "the token has expired",
            JwtError::NotYetValid => "the token is not valid yet",
            JwtError::IssuedInFuture => "the token was issued in the future",
        })
    }
}

impl std::error::Error for JwtError {}

/// Mints a compact HS256 token: header `{"alg":"HS256","typ":"JWT"}`, claims in the order
/// `serverId`, `type`, `iat`, `exp`, then `nbf` and `jti` when present.
///
/// The caller is responsible for `claims.server_id` being valid; an invalid one is still
/// encoded correctly (JSON-escaped) but [`verify`] will refuse the token.
pub fn sign(secret: &[u8], claims: &Claims) -> String {
    // `Value::String`'s Display escapes the string as JSON and cannot fail.
    let mut json = format!(
        "{{\"serverId\":{},\"type\":\"{}\",\"iat\":{},\"exp\":{}",
        Value::String(claims.server_id.clone()),
        claims.token_type.as_str(),
        claims.iat,
        claims.exp
    );
    if let Some(nbf) = claims.nbf {
        json.push_str(&format!(",\"nbf\":{nbf}"));
    }
    if let Some(jti) = &claims.jti {
        json.push_str(&format!(",\"jti\":{}", Value::String(jti.clone())));
    }
    json.push('}');

    let mut token = URL_SAFE_NO_PAD.encode(HEADER_JSON);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(json));
    let sig = hmac_b64(secret, &[token.as_bytes()]);
    token.push('.');
    token.push_str(&sig);
    token
}

/// Verifies `token` against each of `secrets` in order (current, then previous for rotation)
/// and returns its claims.
///
/// `now` is unix seconds; `skew` is the leeway in seconds on `exp`, `nbf` and `iat` (a
/// negative `skew` counts as 0). Work is bounded by [`MAX_TOKEN_BYTES`] and one HMAC per
/// secret. See the module doc for the order of checks.
pub fn verify(token: &str, secrets: &[&[u8]], now: i64, skew: i64) -> Result<Claims, JwtError> {
    let parts = Parts::parse(token)?;
    if !parts.signature_matches(secrets) {
        return Err(JwtError::BadSignature);
    }
    let claims = parse_claims(&parts.claims)?;
    check_times(&claims, now, skew)?;
    Ok(claims)
}

/// True when `s` is 1 to 64 characters, each one of `A-Z a-z 0-9 . _ : -`.
pub fn valid_server_id(s: &str) -> bool {
    s.len() <= MAX_SERVER_ID_CHARS
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && !s.contains("__")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The longest `jti` accepted.
pub const MAX_JTI_CHARS: usize = 64;

/// A `jti` (contract §2): 1 to 64 printable ASCII characters (space through `~`).
pub fn valid_jti(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_JTI_CHARS && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// A fresh random `jti` for a token the proxy issues: 128 bits, hex.
pub fn new_jti() -> String {
    crate::random::hex(&crate::random::random_bytes::<16>())
}

/// base64url (no padding) of HMAC-SHA256(`key`, the concatenation of `data`).
pub fn hmac_b64(key: &[u8], data: &[&[u8]]) -> String {
    URL_SAFE_NO_PAD.encode(hmac_raw(key, data))
}

/// True when `sig_b64` is the unpadded base64url HMAC-SHA256 of the concatenated `data` under
/// `key`. The MAC comparison is constant time; a `sig_b64` that is not canonical unpadded
/// base64url is simply false.
pub fn hmac_verify_b64(key: &[u8], data: &[&[u8]], sig_b64: &str) -> bool {
    match URL_SAFE_NO_PAD.decode(sig_b64) {
        Ok(sig) => mac_matches(key, data, &sig),
        Err(_) => false,
    }
}

/// An HMAC-SHA256 instance keyed with `key`.
///
/// The key is brought to block size here exactly as RFC 2104 §2 does it (hashed when longer
/// than a block, then zero-padded), so that construction goes through the infallible
/// fixed-size `KeyInit::new` and no error path exists.
fn keyed_mac(key: &[u8]) -> HmacSha256 {
    let mut block = [0u8; SHA256_BLOCK_BYTES];
    if key.len() > SHA256_BLOCK_BYTES {
        let digest = Sha256::digest(key);
        block[..digest.len()].copy_from_slice(&digest);
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    HmacSha256::new(&block.into())
}

fn hmac_raw(key: &[u8], data: &[&[u8]]) -> [u8; 32] {
    let mut mac = keyed_mac(key);
    for part in data {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time check of `sig` (raw bytes) against the MAC of `data`; a wrong length is false.
fn mac_matches(key: &[u8], data: &[&[u8]], sig: &[u8]) -> bool {
    let mut mac = keyed_mac(key);
    for part in data {
        mac.update(part);
    }
    mac.verify_slice(sig).is_ok()
}

/// A token split and decoded up to (not including) its claims, with a header that passed.
struct Parts<'a> {
    /// `<seg1>.<seg2>` exactly as received: what the signature covers.
    signing_input: &'a str,
    /// Decoded claims segment, not yet parsed.
    claims: Vec<u8>,
    /// Decoded signature segment.
    signature: Vec<u8>,
}

impl<'a> Parts<'a> {
    /// Size, segments, base64url, header. Does not look inside the claims.
    fn parse(token: &'a str) -> Result<Parts<'a>, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed);
        }
        let mut segments = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(JwtError::Malformed);
        };
        // URL_SAFE_NO_PAD refuses '=', '+', '/', whitespace and non-canonical trailing bits.
        let header = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| JwtError::Malformed)?;
        let claims = URL_SAFE_NO_PAD
            .decode(claims_b64)
            .map_err(|_| JwtError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| JwtError::Malformed)?;
        check_header(&header)?;
        Ok(Parts {
            signing_input: &token[..header_b64.len() + 1 + claims_b64.len()],
            claims,
            signature,
        })
    }

    fn signature_matches(&self, secrets: &[&[u8]]) -> bool {
        secrets
            .iter()
            .any(|secret| mac_matches(secret, &[self.signing_input.as_bytes()], &self.signature))
    }
}

/// The header must be a JSON object without repeated keys; `alg` exactly `"HS256"` (a missing
/// or non-string `alg` is [`JwtError::UnsupportedAlg`] too: the token names no algorithm we
/// support); `typ` absent or `"JWT"`; no `crit` (RFC 7515 §4.1.11: we understand no extension,
/// so a token that makes one critical must be refused).
fn check_header(json: &[u8]) -> Result<(), JwtError> {
    let [alg, typ, crit] = read_object(json, ["alg", "typ", "crit"])?;
    match alg {
        Some(Value::String(alg)) if alg == "HS256" => {}
        _ => return Err(JwtError::UnsupportedAlg),
    }
    match typ {
        None => {}
        Some(Value::String(typ)) if typ == "JWT" => {}
        Some(_) => return Err(JwtError::Malformed),
    }
    if crit.is_some() {
        return Err(JwtError::Malformed);
    }
    Ok(())
}

/// Claims must be a JSON object without repeated keys. Required: `serverId` (a string that
/// passes [`valid_server_id`]), `type` (`"federation"` or `"admin"`), `iat` and `exp` (JSON
/// integers that fit i64; `1.0`, `1e3` and `"1"` are refused). Optional: `nbf` (integer) and
/// `jti` (string); present with any other type, `null` included, they are refused.
fn parse_claims(json: &[u8]) -> Result<Claims, JwtError> {
    let [server_id, token_type, iat, exp, nbf, jti] =
        read_object(json, ["serverId", "type", "iat", "exp", "nbf", "jti"])?;
    let server_id = match server_id {
        Some(Value::String(s)) if valid_server_id(&s) => s,
        _ => return Err(JwtError::Malformed),
    };
    let token_type = match token_type {
        Some(Value::String(s)) => TokenType::from_claim(&s).ok_or(JwtError::Malformed)?,
        _ => return Err(JwtError::Malformed),
    };
    let iat = int_claim(iat.as_ref())?;
    let exp = int_claim(exp.as_ref())?;
    let nbf = match nbf {
        None => None,
        Some(v) => Some(int_claim(Some(&v))?),
    };
    let jti = match jti {
        None => None,
        Some(Value::String(s)) if valid_jti(&s) => Some(s),
        Some(_) => return Err(JwtError::Malformed),
    };
    Ok(Claims {
        server_id,
        token_type,
        iat,
        exp,
        nbf,
        jti,
    })
}

/// A JSON integer that fits i64. Floats (even `1.0`) and integers beyond i64 are refused.
fn int_claim(v: Option<&Value>) -> Result<i64, JwtError> {
    match v {
        Some(Value::Number(n)) if !n.is_f64() => n.as_i64().ok_or(JwtError::Malformed),
        _ => Err(JwtError::Malformed),
    }
}

fn check_times(claims: &Claims, now: i64, skew: i64) -> Result<(), JwtError> {
    let skew = skew.max(0);
    if claims.exp <= now.saturating_sub(skew) {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = claims.nbf
        && nbf > now.saturating_add(skew)
    {
        return Err(JwtError::NotYetValid);
    }
    if claims.iat > now.saturating_add(skew) {
        return Err(JwtError::IssuedInFuture);
    }
    Ok(())
}

/// Parses `json` as one JSON object and returns the values of the `wanted` keys, in order.
/// Refuses (as [`JwtError::Malformed`]) invalid JSON, anything but an object (serde would
/// otherwise let a derived struct be read from an array), trailing data, and any key that
/// appears twice (compared after unescaping, so `"alg"` and `"\u0061lg"` are the same key).
fn read_object<const N: usize>(
    json: &[u8],
    wanted: [&'static str; N],
) -> Result<[Option<Value>; N], JwtError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let values = ObjectSeed { wanted }
        .deserialize(&mut de)
        .map_err(|_| JwtError::Malformed)?;
    de.end().map_err(|_| JwtError::Malformed)?;
    Ok(values)
}

struct ObjectSeed<const N: usize> {
    wanted: [&'static str; N],
}

impl<'de, const N: usize> DeserializeSeed<'de> for ObjectSeed<N> {
    type Value = [Option<Value>; N];

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for ObjectSeed<N> {
    type Value = [Option<Value>; N];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values: [Option<Value>; N] = std::array::from_fn(|_| None);
        let mut seen = BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let slot = self.wanted.iter().position(|w| *w == key);
            if !seen.insert(key) {
                return Err(de::Error::custom("duplicate key"));
            }
            match slot {
                Some(i) => values[i] = Some(map.next_value::<Value>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OLD_SECRET: &[u8] = b"fedcba9876543210fedcba9876543210";
    const NOW: i64 = 1_700_000_000;
    const SKEW: i64 = 30;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn claims() -> Claims {
        Claims {
            server_id: "srv-1".to_string(),
            token_type: TokenType::Federation,
            iat: NOW,
            exp: NOW + 3600,
            nbf: None,
            jti: None,
        }
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    /// A token with arbitrary header and claims JSON, correctly signed with `SECRET`.
    fn raw_token(header: &str, claims: &str) -> String {
        let input = format!("{}.{}", b64(header), b64(claims));
        let sig = hmac_b64(SECRET, &[input.as_bytes()]);
        format!("{input}.{sig}")
    }

    fn hs256(claims: &str) -> String {
        raw_token(HEADER_JSON, claims)
    }

    fn check(token: &str) -> Result<Claims, JwtError> {
        verify(token, &[SECRET], NOW, SKEW)
    }

    // --- RFC 4231 HMAC-SHA256 test cases 1 to 7 ---

    #[test]
    fn rfc4231_vectors() {
        let key4: Vec<u8> = (1u8..=25).collect();
        let cases: [(Vec<u8>, Vec<u8>, &str); 7] = [
            (
                vec![0x0b; 20],
                b"Hi There".to_vec(),
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?".to_vec(),
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                vec![0xaa; 20],
                vec![0xdd; 50],
                "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
            ),
            (
                key4,
                vec![0xcd; 50],
                "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
            ),
            // Test case 5 is truncated to 128 bits in the RFC.
            (
                vec![0x0c; 20],
                b"Test With Truncation".to_vec(),
                "a3b6167473100ee06e0c796c2955552b",
            ),
            (
                vec![0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
            (
                vec![0xaa; 131],
                b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.".to_vec(),
                "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            ),
        ];
        for (n, (key, data, expected)) in cases.iter().enumerate() {
            let expected = hex(expected);
            let raw = hmac_raw(key, &[data]);
            assert_eq!(&raw[..expected.len()], &expected[..], "case {}", n + 1);
            if expected.len() == 32 {
                assert_eq!(hmac_b64(key, &[data]), URL_SAFE_NO_PAD.encode(&expected));
                assert!(hmac_verify_b64(
                    key,
                    &[data],
                    &URL_SAFE_NO_PAD.encode(&expected)
                ));
            }
            // Split input gives the same MAC as the concatenation.
            let (a, b) = data.split_at(data.len() / 2);
            assert_eq!(hmac_raw(key, &[a, b]), raw, "case {} split", n + 1);
        }
    }

    #[test]
    fn hmac_verify_rejects_wrong_and_noncanonical() {
        let sig = hmac_b64(SECRET, &[b"a", b"b"]);
        assert!(hmac_verify_b64(SECRET, &[b"ab"], &sig));
        assert!(!hmac_verify_b64(SECRET, &[b"abc"], &sig));
        assert!(!hmac_verify_b64(OLD_SECRET, &[b"ab"], &sig));
        assert!(!hmac_verify_b64(SECRET, &[b"ab"], &format!("{sig}=")));
        assert!(!hmac_verify_b64(SECRET, &[b"ab"], &sig[..sig.len() - 1]));
        assert!(!hmac_verify_b64(SECRET, &[b"ab"], &sig[..40]));
        assert!(!hmac_verify_b64(SECRET, &[b"ab"], ""));
        assert!(!hmac_verify_b64(SECRET, &[b"ab"], "!!!"));
    }

    // --- RFC 7515 Appendix A.1 ---

    const RFC7515_KEY: &str =
        "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow";
    const RFC7515_TOKEN: &str = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

    #[test]
    fn rfc7515_a1_signature_verifies() {
        let key = URL_SAFE_NO_PAD.decode(RFC7515_KEY).unwrap();
        let parts = Parts::parse(RFC7515_TOKEN).unwrap();
        assert!(parts.signature_matches(&[&key]));
        assert!(!parts.signature_matches(&[SECRET]));
        assert_eq!(
            parts.claims,
            b"{\"iss\":\"joe\",\r\n \"exp\":1300819380,\r\n \"http://example.com/is_root\":true}"
        );
        // Its claims are not ours: the signature passes, then the claims are malformed.
        assert_eq!(
            verify(RFC7515_TOKEN, &[&key], 1_300_000_000, 0),
            Err(JwtError::Malformed)
        );
        assert_eq!(
            verify(RFC7515_TOKEN, &[SECRET], 1_300_000_000, 0),
            Err(JwtError::BadSignature)
        );
    }

    // --- happy paths ---

    #[test]
    fn sign_verify_round_trip() {
        let c = claims();
        assert_eq!(check(&sign(SECRET, &c)), Ok(c.clone()));
        let full = Claims {
            server_id: "a.b_c:d-E9".to_string(),
            token_type: TokenType::Admin,
            nbf: Some(NOW - 5),
            jti: Some("id \"with\" quotes ~".to_string()),
            ..c
        };
        let token = sign(SECRET, &full);
        assert_eq!(check(&token), Ok(full.clone()));
        // A jti is 1 to 64 printable ASCII: a control character, an empty or a long one is
        // malformed.
        for bad in ["", "a\n", "é", &"j".repeat(65)] {
            let t = sign(
                SECRET,
                &Claims {
                    jti: Some(bad.to_string()),
                    ..full.clone()
                },
            );
            assert_eq!(check(&t), Err(JwtError::Malformed), "{bad:?}");
        }
        assert!(token.len() < MAX_TOKEN_BYTES);
        assert!(!token.contains('='));
    }

    #[test]
    fn signed_layout_is_as_documented() {
        let c = Claims {
            nbf: Some(7),
            jti: Some("j".to_string()),
            ..claims()
        };
        let token = sign(SECRET, &c);
        let mut it = token.split('.');
        let header = URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap();
        let body = URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap();
        assert_eq!(header, HEADER_JSON.as_bytes());
        assert_eq!(
            String::from_utf8(body).unwrap(),
            format!(
                r#"{{"serverId":"srv-1","type":"federation","iat":{NOW},"exp":{},"nbf":7,"jti":"j"}}"#,
                NOW + 3600
            )
        );
    }

    #[test]
    fn rotation_accepts_previous_secret() {
        let old = sign(OLD_SECRET, &claims());
        let new = sign(SECRET, &claims());
        let both: [&[u8]; 2] = [SECRET, OLD_SECRET];
        assert_eq!(verify(&old, &both, NOW, SKEW), Ok(claims()));
        assert_eq!(verify(&new, &both, NOW, SKEW), Ok(claims()));
        assert_eq!(
            verify(&old, &[SECRET], NOW, SKEW),
            Err(JwtError::BadSignature)
        );
        assert_eq!(verify(&new, &[], NOW, SKEW), Err(JwtError::BadSignature));
    }

    #[test]
    fn extra_claims_and_header_fields_are_ignored() {
        let t = raw_token(
            r#"{"alg":"HS256","kid":"k1","x":[1,{"y":2}]}"#,
            &format!(
                r#"{{"serverId":"s","type":"admin","iat":{NOW},"exp":{},"aud":["x"],"n":null}}"#,
                NOW + 10
            ),
        );
        assert_eq!(check(&t).unwrap().token_type, TokenType::Admin);
    }

    // --- algorithm and header ---

    #[test]
    fn other_algorithms_are_unsupported() {
        let body = format!(
            r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{}}}"#,
            NOW + 10
        );
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"HS384","typ":"JWT"}"#,
            r#"{"alg":"HS512","typ":"JWT"}"#,
            r#"{"alg":"RS256","typ":"JWT"}"#,
            r#"{"alg":"hs256","typ":"JWT"}"#,
            r#"{"alg":"HS256 ","typ":"JWT"}"#,
            r#"{"typ":"JWT"}"#,
            r#"{"alg":null}"#,
            r#"{"alg":256}"#,
            r#"{"alg":["HS256"]}"#,
        ] {
            assert_eq!(
                check(&raw_token(header, &body)),
                Err(JwtError::UnsupportedAlg),
                "{header}"
            );
        }
        // Unsecured JWT ("alg":"none" with an empty signature) too.
        let unsecured = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(&body));
        assert_eq!(check(&unsecured), Err(JwtError::UnsupportedAlg));
    }

    #[test]
    fn header_shape() {
        let body = format!(
            r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{}}}"#,
            NOW + 10
        );
        assert!(check(&raw_token(r#"{"alg":"HS256"}"#, &body)).is_ok());
        assert!(check(&raw_token(r#" {"typ":"JWT","alg":"HS256"} "#, &body)).is_ok());
        for header in [
            r#"{"alg":"HS256","typ":"JWS"}"#,
            r#"{"alg":"HS256","typ":"jwt"}"#,
            r#"{"alg":"HS256","typ":null}"#,
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            r#"{"alg":"HS256","alg":"HS256"}"#,
            r#"{"alg":"HS256","\u0061lg":"none"}"#,
            r#"{"alg":"HS256","kid":1,"kid":2}"#,
            r#"["HS256"]"#,
            r#""HS256""#,
            r#"{"alg":"HS256"} x"#,
            r#"{"alg":"HS256""#,
            "",
        ] {
            assert_eq!(
                check(&raw_token(header, &body)),
                Err(JwtError::Malformed),
                "{header}"
            );
        }
    }

    // --- segments and encoding ---

    #[test]
    fn segment_and_encoding_errors() {
        let good = sign(SECRET, &claims());
        assert!(check(&good).is_ok());
        let (h, rest) = good.split_once('.').unwrap();
        let (c, s) = rest.split_once('.').unwrap();
        let bad = [
            String::new(),
            ".".to_string(),
            "..".to_string(),
            h.to_string(),
            format!("{h}.{c}"),
            format!("{h}.{c}.{s}."),
            format!("{h}.{c}.{s}.{s}"),
            format!("{h}=.{c}.{s}"),
            format!("{h}.{c}=.{s}"),
            format!("{h}.{c}.{s}="),
            format!("{h}.{c}.{s}=="),
            format!(" {good}"),
            format!("{good}\n"),
            format!("{h}.{c}. {s}"),
            format!("{h}.{c}.{}", s.replace('-', "+").replace('_', "/")),
            format!("{h}.{c}.+{}", &s[1..]),
            format!("{h}.{c}./{}", &s[1..]),
            format!("{h}.{c}.\u{e9}{}", &s[2..]),
            format!(
                "{}.{c}.{s}",
                URL_SAFE_NO_PAD.encode(HEADER_JSON.replace('"', "'"))
            ),
        ];
        for t in &bad {
            assert_eq!(check(t), Err(JwtError::Malformed), "{t:?}");
        }
    }

    #[test]
    fn non_canonical_trailing_bits_are_malformed() {
        let good = sign(SECRET, &claims());
        let (input, s) = good.rsplit_once('.').unwrap();
        // 43 chars encode 32 bytes: the last char carries 2 spare bits that must be zero.
        let last = s.as_bytes()[42];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet.iter().position(|&b| b == last).unwrap();
        let twisted = alphabet[idx ^ 1] as char;
        let t = format!("{input}.{}{twisted}", &s[..42]);
        assert_eq!(check(&t), Err(JwtError::Malformed));
    }

    #[test]
    fn truncated_signature() {
        let good = sign(SECRET, &claims());
        let (input, s) = good.rsplit_once('.').unwrap();
        // 40 chars is valid base64url of 30 bytes: a signature of the wrong length.
        assert_eq!(
            check(&format!("{input}.{}", &s[..40])),
            Err(JwtError::BadSignature)
        );
        assert_eq!(check(&format!("{input}.")), Err(JwtError::BadSignature));
        // 41 chars cannot be base64 at all.
        assert_eq!(
            check(&format!("{input}.{}", &s[..41])),
            Err(JwtError::Malformed)
        );
    }

    #[test]
    fn wrong_secret_and_tampering() {
        let good = sign(SECRET, &claims());
        assert_eq!(
            verify(&good, &[OLD_SECRET], NOW, SKEW),
            Err(JwtError::BadSignature)
        );
        // Swap the claims for admin ones, keep the signature.
        let admin = sign(
            SECRET,
            &Claims {
                token_type: TokenType::Admin,
                ..claims()
            },
        );
        let (h, rest) = good.split_once('.').unwrap();
        let (_, s) = rest.split_once('.').unwrap();
        let admin_claims = admin.split('.').nth(1).unwrap();
        assert_eq!(
            check(&format!("{h}.{admin_claims}.{s}")),
            Err(JwtError::BadSignature)
        );
        // Flip one bit of the signature.
        let mut sig = URL_SAFE_NO_PAD.decode(s).unwrap();
        sig[0] ^= 1;
        assert_eq!(
            check(&format!(
                "{h}.{}.{}",
                rest.split_once('.').unwrap().0,
                URL_SAFE_NO_PAD.encode(sig)
            )),
            Err(JwtError::BadSignature)
        );
        // Garbage claims with a bad signature are BadSignature: claims are not read first.
        let garbage = format!("{h}.{}.{s}", b64("not json"));
        assert_eq!(check(&garbage), Err(JwtError::BadSignature));
    }

    #[test]
    fn oversize_token() {
        let pad = "x".repeat(MAX_TOKEN_BYTES);
        let big = hs256(&format!(
            r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{},"pad":"{pad}"}}"#,
            NOW + 10
        ));
        assert!(big.len() > MAX_TOKEN_BYTES);
        assert_eq!(check(&big), Err(JwtError::Malformed));

        // Exactly at the limit is still accepted.
        let base = hs256(&format!(
            r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{},"pad":""}}"#,
            NOW + 10
        ));
        // Each 3 bytes of padding adds 4 base64 chars.
        let room = (MAX_TOKEN_BYTES - base.len()) / 4 * 3;
        let fit = hs256(&format!(
            r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{},"pad":"{}"}}"#,
            NOW + 10,
            "x".repeat(room)
        ));
        assert!(fit.len() <= MAX_TOKEN_BYTES && fit.len() > MAX_TOKEN_BYTES - 4);
        assert!(check(&fit).is_ok());
    }

    // --- claims ---

    #[test]
    fn malformed_claims() {
        let exp = NOW + 10;
        let cases = [
            format!(r#"{{"type":"federation","iat":{NOW},"exp":{exp}}}"#),
            format!(r#"{{"serverId":"","type":"federation","iat":{NOW},"exp":{exp}}}"#),
            format!(r#"{{"serverId":"a b","type":"federation","iat":{NOW},"exp":{exp}}}"#),
            format!(r#"{{"serverId":"a/b","type":"federation","iat":{NOW},"exp":{exp}}}"#),
            format!(r#"{{"serverId":"é","type":"federation","iat":{NOW},"exp":{exp}}}"#),
            format!(
                r#"{{"serverId":"{}","type":"federation","iat":{NOW},"exp":{exp}}}"#,
                "a".repeat(65)
            ),
            format!(r#"{{"serverId":7,"type":"federation","iat":{NOW},"exp":{exp}}}"#),
            format!(r#"{{"serverId":"s","iat":{NOW},"exp":{exp}}}"#),
            format!(r#"{{"serverId":"s","type":"Federation","iat":{NOW},"exp":{exp}}}"#),
            format!(r#"{{"serverId":"s","type":"user","iat":{NOW},"exp":{exp}}}"#),
            format!(r#"{{"serverId":"s","type":null,"iat":{NOW},"exp":{exp}}}"#),
            format!(r#"{{"serverId":"s","type":"federation","exp":{exp}}}"#),
            format!(r#"{{"serverId":"s","type":"federation","iat":{NOW}}}"#),
            format!(r#"{{"serverId":"s","type":"federation","iat":{NOW}.0,"exp":{exp}}}"#),
            format!(r#"{{"serverId":"s","type":"federation","iat":1.7e9,"exp":{exp}}}"#),
            format!(r#"{{"serverId":"s","type":"federation","iat":"{NOW}","exp":{exp}}}"#),
            format!(r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{exp}.5}}"#),
            format!(
                r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":18446744073709551615}}"#
            ),
            format!(r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{exp},"nbf":null}}"#),
            format!(r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{exp},"nbf":1.5}}"#),
            format!(r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{exp},"jti":5}}"#),
            // duplicate keys, read or ignored
            format!(
                r#"{{"serverId":"s","serverId":"t","type":"federation","iat":{NOW},"exp":{exp}}}"#
            ),
            format!(
                r#"{{"serverId":"s","type":"admin","type":"federation","iat":{NOW},"exp":{exp}}}"#
            ),
            format!(
                r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{exp},"exp":{exp}}}"#
            ),
            format!(
                r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{exp},"a":1,"a":2}}"#
            ),
            format!(
                r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{exp},"\u0065xp":{exp}}}"#
            ),
            // not an object
            "[]".to_string(),
            format!(r#"["s","federation",{NOW},{exp},null,null]"#),
            "null".to_string(),
            "42".to_string(),
            "\"s\"".to_string(),
            "{".to_string(),
            String::new(),
            format!(r#"{{"serverId":"s","type":"federation","iat":{NOW},"exp":{exp}}} {{}}"#),
        ];
        for body in &cases {
            assert_eq!(check(&hs256(body)), Err(JwtError::Malformed), "{body}");
        }
        // 64 characters is the longest valid serverId.
        let max_id = "Z".repeat(64);
        let ok =
            format!(r#"{{"serverId":"{max_id}","type":"federation","iat":{NOW},"exp":{exp}}}"#);
        assert_eq!(check(&hs256(&ok)).unwrap().server_id, max_id);
    }

    #[test]
    fn valid_server_ids() {
        assert!(valid_server_id("a"));
        assert!(valid_server_id("A-z_0.9:x"));
        assert!(valid_server_id(&"a".repeat(64)));
        assert!(!valid_server_id(""));
        assert!(!valid_server_id(&"a".repeat(65)));
        assert!(valid_server_id("a_b"));
        assert!(valid_server_id("0.x"));
        // v1.1: the first character is a letter or digit, and `__` never appears, so an id
        // is never `.`, `..` or a hidden name, and splits cleanly out of an MCP tool name.
        for bad in [
            "a b", "a/b", "a\0", "é", "a*", "a\n", "a+b", "a@b", ".", "..", ".tmp", "-a", "_a",
            ":a", "a__b", "__", "a___",
        ] {
            assert!(!valid_server_id(bad), "{bad:?}");
        }
    }

    // --- time ---

    fn timed(iat: i64, exp: i64, nbf: Option<i64>) -> String {
        sign(
            SECRET,
            &Claims {
                iat,
                exp,
                nbf,
                ..claims()
            },
        )
    }

    #[test]
    fn expiry_boundary_with_skew() {
        // exp <= now - skew is expired.
        assert_eq!(
            check(&timed(NOW - 100, NOW - SKEW, None)),
            Err(JwtError::Expired)
        );
        assert!(check(&timed(NOW - 100, NOW - SKEW + 1, None)).is_ok());
        assert_eq!(
            verify(&timed(NOW - 100, NOW, None), &[SECRET], NOW, 0),
            Err(JwtError::Expired)
        );
        assert!(verify(&timed(NOW - 100, NOW + 1, None), &[SECRET], NOW, 0).is_ok());
        // Negative skew counts as none.
        assert!(verify(&timed(NOW - 100, NOW + 1, None), &[SECRET], NOW, -50).is_ok());
    }

    #[test]
    fn nbf_boundary_with_skew() {
        assert!(check(&timed(NOW, NOW + 999, Some(NOW + SKEW))).is_ok());
        assert_eq!(
            check(&timed(NOW, NOW + 999, Some(NOW + SKEW + 1))),
            Err(JwtError::NotYetValid)
        );
    }

    #[test]
    fn iat_boundary_with_skew() {
        assert!(check(&timed(NOW + SKEW, NOW + 999, None)).is_ok());
        assert_eq!(
            check(&timed(NOW + SKEW + 1, NOW + 999, None)),
            Err(JwtError::IssuedInFuture)
        );
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        assert!(
            verify(
                &timed(i64::MIN, i64::MAX, Some(i64::MIN)),
                &[SECRET],
                i64::MAX,
                i64::MAX
            )
            .is_ok()
        );
        assert_eq!(
            verify(&timed(0, i64::MIN, None), &[SECRET], i64::MIN, i64::MAX),
            Err(JwtError::Expired)
        );
        assert_eq!(
            verify(&timed(i64::MAX, i64::MAX, None), &[SECRET], i64::MIN, 0),
            Err(JwtError::IssuedInFuture)
        );
    }

    #[test]
    fn error_codes_and_messages() {
        let all = [
            (JwtError::Malformed, "malformed_token"),
            (JwtError::UnsupportedAlg, "unsupported_alg"),
            (JwtError::BadSignature, "bad_signature"),
            (JwtError::Expired, "expired"),
            (JwtError::NotYetValid, "not_yet_valid"),
            (JwtError::IssuedInFuture, "issued_in_future"),
        ];
        for (e, code) in all {
            assert_eq!(e.code(), code);
            let msg = e.to_string();
            assert!(!msg.is_empty() && !msg.contains('\n'));
        }
        assert_eq!(TokenType::Federation.as_str(), "federation");
        assert_eq!(TokenType::Admin.as_str(), "admin");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep over mutations of a valid token.
        let good = sign(SECRET, &claims());
        let bytes = good.as_bytes();
        for i in 0..bytes.len() {
            for repl in [b'.', b'A', b'_', b'-', b'=', b' '] {
                let mut m = bytes.to_vec();
                m[i] = repl;
                if let Ok(s) = std::str::from_utf8(&m) {
                    let _ = check(s);
                }
            }
            let _ = check(&good[..i]);
        }
    }
}
