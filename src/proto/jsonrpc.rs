//! JSON-RPC 2.0 envelopes: parsing what a peer sends, and writing what the proxy answers.
//!
//! Sans-io and allocation-light: parsing borrows from the frame's text (`&RawValue` for `id`,
//! `params`, `result` and `error`), so a forwarded value is the exact bytes that arrived and is
//! never re-serialized. Every error the proxy answers with is a [`RpcError`], mapped to its
//! JSON-RPC code, `data.reason` and HTTP status here and nowhere else.
//!
//! Bounds: serde_json's recursion limit (128) bounds nesting depth; [`MAX_BATCH_LEN`] bounds a
//! batch. It must never panic on any input.

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Most entries answered in one batch; a larger batch is one `-32600` error.
pub const MAX_BATCH_LEN: usize = 1000;

/// Deepest nesting of arrays and objects accepted in a frame (as serde_json's own limit);
/// deeper is a parse error. Forwarded values are never built into trees, but recipients may
/// build them, so the proxy refuses what a typical parser would refuse.
pub const MAX_JSON_DEPTH: usize = 128;

/// True when `text` nests arrays/objects deeper than `max` (strings are skipped, escapes
/// honoured). One pass over the bytes, no allocation.
pub fn too_deep(text: &str, max: usize) -> bool {
    // Fast path: nesting deeper than `max` needs more than `max` openers somewhere, and
    // counting them is a branch-free loop the compiler vectorises.
    let openers = text
        .as_bytes()
        .iter()
        .filter(|&&b| b == b'[' || b == b'{')
        .count();
    if openers <= max {
        return false;
    }
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    for &b in text.as_bytes() {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The errors the proxy answers with, in one table (contract §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcError {
    Parse,
    InvalidRequest(&'static str),
    MethodNotFound,
    InvalidParams(String),
    UnknownServer,
    ServerOffline,
    DeliveryTimeout,
    RecipientOverloaded,
    QueueFull,
    BadSignature,
    RateLimited {
        retry_after_ms: u64,
    },
    /// The change could not be made durable (state dir write or fsync failed).
    StorageFailed,
}

impl RpcError {
    pub fn code(&self) -> i64 {
        match self {
            RpcError::Parse => -32700,
            RpcError::InvalidRequest(_) => -32600,
            RpcError::MethodNotFound => -32601,
            RpcError::InvalidParams(_) => -32602,
            RpcError::UnknownServer => -32001,
            RpcError::ServerOffline => -32002,
            RpcError::DeliveryTimeout => -32003,
            RpcError::RecipientOverloaded => -32004,
            RpcError::QueueFull => -32005,
            RpcError::BadSignature => -32006,
            RpcError::RateLimited { .. } => -32029,
            RpcError::StorageFailed => -32603,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            RpcError::Parse => "parse_error",
            RpcError::InvalidRequest(_) => "invalid_request",
            RpcError::MethodNotFound => "method_not_found",
            RpcError::InvalidParams(_) => "invalid_params",
            RpcError::UnknownServer => "unknown_server",
            RpcError::ServerOffline => "server_offline",
            RpcError::DeliveryTimeout => "delivery_timeout",
            RpcError::RecipientOverloaded => "recipient_overloaded",
            RpcError::QueueFull => "queue_full",
            RpcError::BadSignature => "bad_signature",
            RpcError::RateLimited { .. } => "rate_limited",
            RpcError::StorageFailed => "storage_failed",
        }
    }

    /// The HTTP status used when the same error answers `POST /v1/messages`.
    pub fn http_status(&self) -> u16 {
        match self {
            RpcError::Parse | RpcError::InvalidRequest(_) | RpcError::InvalidParams(_) => 400,
            RpcError::BadSignature => 400,
            RpcError::MethodNotFound | RpcError::UnknownServer => 404,
            RpcError::ServerOffline | RpcError::RecipientOverloaded => 503,
            RpcError::DeliveryTimeout => 504,
            RpcError::QueueFull => 507,
            RpcError::RateLimited { .. } => 429,
            RpcError::StorageFailed => 503,
        }
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RpcError::Parse => f.write_str("parse error: the message is not valid JSON"),
            RpcError::InvalidRequest(why) => write!(f, "invalid request: {why}"),
            RpcError::MethodNotFound => f.write_str("method not found"),
            RpcError::InvalidParams(why) => write!(f, "invalid params: {why}"),
            RpcError::UnknownServer => {
                f.write_str("the recipient is not a registered or known server")
            }
            RpcError::ServerOffline => {
                f.write_str("the recipient is not online and queue was not set")
            }
            RpcError::DeliveryTimeout => f.write_str("the recipient did not answer in time"),
            RpcError::RecipientOverloaded => {
                f.write_str("the recipient is not reading fast enough")
            }
            RpcError::QueueFull => f.write_str("the recipient's queue is full"),
            RpcError::BadSignature => f.write_str("the message signature is missing or wrong"),
            RpcError::RateLimited { retry_after_ms } => {
                write!(f, "rate limited; retry after {retry_after_ms} ms")
            }
            RpcError::StorageFailed => {
                f.write_str("the change could not be written to the state dir")
            }
        }
    }
}

/// One parsed message (not a batch).
#[derive(Debug)]
pub enum Msg<'a> {
    Request {
        id: &'a RawValue,
        method: Cow<'a, str>,
        params: Option<&'a RawValue>,
    },
    Notification {
        method: Cow<'a, str>,
        params: Option<&'a RawValue>,
    },
    Response {
        id: &'a RawValue,
        outcome: Result<&'a RawValue, &'a RawValue>,
    },
}

/// What a text frame holds.
#[derive(Debug)]
pub enum Frame<'a> {
    Single(&'a str),
    Batch(Vec<&'a RawValue>),
}

/// Why a message could not be understood, with the id to answer to when one was readable.
#[derive(Debug)]
pub struct Invalid<'a> {
    pub error: RpcError,
    pub id: Option<&'a RawValue>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, borrow)]
    jsonrpc: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    params: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    result: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    error: Option<&'a RawValue>,
}

/// Splits a frame's text into one message or a batch. Invalid JSON is `Parse`; an empty or
/// oversized batch is `InvalidRequest`.
pub fn parse_frame(text: &str) -> Result<Frame<'_>, RpcError> {
    if too_deep(text, MAX_JSON_DEPTH) {
        return Err(RpcError::Parse);
    }
    let trimmed = text.trim_start_matches([' ', '\t', '\n', '\r']);
    if trimmed.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|_| RpcError::Parse)?;
        if items.is_empty() {
            return Err(RpcError::InvalidRequest("empty batch"));
        }
        if items.len() > MAX_BATCH_LEN {
            return Err(RpcError::InvalidRequest("batch too large"));
        }
        Ok(Frame::Batch(items))
    } else {
        // One pass: the envelope parse validates the JSON too (see `parse_msg`).
        Ok(Frame::Single(text))
    }
}

fn valid_id(id: &RawValue) -> bool {
    matches!(
        id.get().as_bytes().first(),
        Some(b'"' | b'-' | b'0'..=b'9' | b'n')
    )
}

/// Parses one message (a frame's text, or a batch entry) as a request, notification or
/// response. Invalid JSON is `Parse`; valid JSON that is not a JSON-RPC message is
/// `InvalidRequest` (told apart by a second, validating pass on the error path only).
pub fn parse_msg(text: &str) -> Result<Msg<'_>, Invalid<'_>> {
    let env: Envelope = match serde_json::from_str(text) {
        Ok(e) => e,
        Err(e) => {
            let valid_json =
                e.is_data() && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
            let error = if valid_json {
                RpcError::InvalidRequest("not a JSON-RPC object")
            } else {
                RpcError::Parse
            };
            return Err(Invalid { error, id: None });
        }
    };
    let id = env.id.filter(|i| valid_id(i));
    if env.id.is_some() && id.is_none() {
        return Err(Invalid {
            error: RpcError::InvalidRequest("id must be a string, number or null"),
            id: None,
        });
    }
    if env.jsonrpc.as_deref() != Some("2.0") {
        return Err(Invalid {
            error: RpcError::InvalidRequest("jsonrpc must be \"2.0\""),
            id,
        });
    }
    if let Some(p) = env.params
        && !matches!(p.get().as_bytes().first(), Some(b'{' | b'['))
    {
        return Err(Invalid {
            error: RpcError::InvalidRequest("params must be an object or array"),
            id,
        });
    }
    match (env.method, env.result, env.error) {
        (Some(method), None, None) => Ok(match id {
            Some(id) => Msg::Request {
                id,
                method,
                params: env.params,
            },
            None => Msg::Notification {
                method,
                params: env.params,
            },
        }),
        (None, Some(result), None) => match id {
            Some(id) => Ok(Msg::Response {
                id,
                outcome: Ok(result),
            }),
            None => Err(Invalid {
                error: RpcError::InvalidRequest("response without id"),
                id: None,
            }),
        },
        (None, None, Some(error)) => match id {
            Some(id) => Ok(Msg::Response {
                id,
                outcome: Err(error),
            }),
            None => Err(Invalid {
                error: RpcError::InvalidRequest("response without id"),
                id: None,
            }),
        },
        _ => Err(Invalid {
            error: RpcError::InvalidRequest("expected method, result or error"),
            id,
        }),
    }
}

/// `{"jsonrpc":"2.0","id":ID,"result":RESULT}` with both parts already JSON text.
pub fn result(id: &str, result: &str) -> String {
    let mut s = String::with_capacity(32 + id.len() + result.len());
    s.push_str("{\"jsonrpc\":\"2.0\",\"id\":");
    s.push_str(id);
    s.push_str(",\"result\":");
    s.push_str(result);
    s.push('}');
    s
}

/// The `error` object of a proxy error: code, message, and `data.reason` (+ `retryAfterMs`).
pub fn error_object(err: &RpcError) -> String {
    let mut s = String::with_capacity(128);
    s.push_str("{\"code\":");
    s.push_str(&err.code().to_string());
    s.push_str(",\"message\":");
    crate::audit::push_json_str(&mut s, &err.to_string());
    s.push_str(",\"data\":{\"reason\":\"");
    s.push_str(err.reason());
    s.push('"');
    if let RpcError::RateLimited { retry_after_ms } = err {
        s.push_str(",\"retryAfterMs\":");
        s.push_str(&retry_after_ms.to_string());
    }
    s.push_str("}}");
    s
}

/// `{"jsonrpc":"2.0","id":ID,"error":{...}}`; `id` is JSON text (`null` when unknown).
pub fn error(id: &str, err: &RpcError) -> String {
    let obj = error_object(err);
    let mut s = String::with_capacity(32 + id.len() + obj.len());
    s.push_str("{\"jsonrpc\":\"2.0\",\"id\":");
    s.push_str(id);
    s.push_str(",\"error\":");
    s.push_str(&obj);
    s.push('}');
    s
}

/// A request or notification from the proxy; `id` is JSON text or `None` for a notification.
pub fn request(id: Option<&str>, method: &str, params: &str) -> String {
    let mut s = String::with_capacity(48 + method.len() + params.len());
    s.push_str("{\"jsonrpc\":\"2.0\",");
    if let Some(id) = id {
        s.push_str("\"id\":");
        s.push_str(id);
        s.push(',');
    }
    s.push_str("\"method\":\"");
    s.push_str(method);
    s.push_str("\",\"params\":");
    s.push_str(params);
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Result<String, RpcError> {
        match parse_frame(text)? {
            Frame::Single(text) => match parse_msg(text) {
                Ok(Msg::Request { id, method, params }) => Ok(format!(
                    "req {} {} {}",
                    id.get(),
                    method,
                    params.map_or("-", |p| p.get())
                )),
                Ok(Msg::Notification { method, .. }) => Ok(format!("note {method}")),
                Ok(Msg::Response { id, outcome: Ok(r) }) => {
                    Ok(format!("ok {} {}", id.get(), r.get()))
                }
                Ok(Msg::Response {
                    id,
                    outcome: Err(e),
                }) => Ok(format!("err {} {}", id.get(), e.get())),
                Err(inv) => Err(inv.error),
            },
            Frame::Batch(b) => Ok(format!("batch {}", b.len())),
        }
    }

    #[test]
    fn classifies_messages() {
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"a":[1, 2]}}"#).unwrap(),
            r#"req 1 m {"a":[1, 2]}"#
        );
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":null,"method":"m"}"#).unwrap(),
            "req null m -"
        );
        assert_eq!(one(r#"{"jsonrpc":"2.0","method":"n"}"#).unwrap(), "note n");
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":"x","result":{"k" : 1}}"#).unwrap(),
            r#"ok "x" {"k" : 1}"#
        );
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":7,"error":{"code":1}}"#).unwrap(),
            r#"err 7 {"code":1}"#
        );
        assert_eq!(one(r#"[1,2,3]"#).unwrap(), "batch 3");
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","method":"m\u0041"}"#).unwrap(),
            "note mA"
        );
    }

    #[test]
    fn rejects_bad_messages_with_the_right_code() {
        assert_eq!(one("{").unwrap_err().code(), -32700);
        assert_eq!(one("").unwrap_err().code(), -32700);
        assert_eq!(one("[]").unwrap_err().code(), -32600);
        // Invalid JSON is a parse error even when a field is also of the wrong type.
        assert_eq!(one(r#"{"method":5, "x": }"#).unwrap_err().code(), -32700);
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","method":"m"} x"#)
                .unwrap_err()
                .code(),
            -32700
        );
        assert_eq!(
            one(r#"[{"jsonrpc":"2.0","method":"m"},]"#)
                .unwrap_err()
                .code(),
            -32700
        );
        assert_eq!(one("5").unwrap_err().code(), -32600);
        assert_eq!(one(r#"{"id":1,"method":"m"}"#).unwrap_err().code(), -32600);
        assert_eq!(
            one(r#"{"jsonrpc":"1.0","id":1,"method":"m"}"#)
                .unwrap_err()
                .code(),
            -32600
        );
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":{},"method":"m"}"#)
                .unwrap_err()
                .code(),
            -32600
        );
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":1,"method":5}"#)
                .unwrap_err()
                .code(),
            -32600
        );
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":1,"method":"m","params":3}"#)
                .unwrap_err()
                .code(),
            -32600
        );
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":1,"method":"m","method":"n"}"#)
                .unwrap_err()
                .code(),
            -32600
        );
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":1}"#).unwrap_err().code(),
            -32600
        );
        let big = format!("[{}]", vec!["1"; MAX_BATCH_LEN + 1].join(","));
        assert_eq!(one(&big).unwrap_err().code(), -32600);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(one(&deep).unwrap_err().code(), -32700);
        let ok = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        assert_eq!(one(&ok).unwrap(), "batch 1");
        assert!(!too_deep(r#"{"a":"[[[[\"[["}"#, 1));
        assert!(too_deep(r#"{"a":[{}]}"#, 2));
    }

    #[test]
    fn writes_errors_with_reason_and_retry() {
        let e = error("null", &RpcError::RateLimited { retry_after_ms: 12 });
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["error"]["code"], -32029);
        assert_eq!(v["error"]["data"]["reason"], "rate_limited");
        assert_eq!(v["error"]["data"]["retryAfterMs"], 12);
        assert_eq!(v["id"], serde_json::Value::Null);
        let r: serde_json::Value = serde_json::from_str(&result("\"a\"", "{}")).unwrap();
        assert_eq!(r["id"], "a");
        let q: serde_json::Value = serde_json::from_str(&request(Some("3"), "x/y", "{}")).unwrap();
        assert_eq!(q["method"], "x/y");
    }
}
