//! HTTP/1.1 response serialization: status line, the headers every response carries, and the
//! contract's JSON error body. Sans-io: everything is appended to a caller's `Vec<u8>`, and the
//! time is passed in as Unix seconds.
//!
//! What it owns: [`Resp`] (an answer before it is framed: status, headers, body), the framing
//! headers of responses (`Date`, `Content-Length`, `Connection: close`), reason phrases, the
//! IMF-fixdate format, and the error body `{"error":{"code":…,"message":…}}` of contract §3.
//!
//! Invariants:
//! - A response is framed by `Content-Length`, except 1xx, 204 and 304, which never carry
//!   `Content-Length` or a body (RFC 9110 §8.6, §15.3.5). A HEAD answer keeps the length of
//!   the body it omits (RFC 9110 §9.3.2).
//! - Callers put everything else in `extra`, and never `Date`, `Content-Length` or
//!   `Connection: close` there (these functions write them). `extra` is written as given,
//!   except that a name that is not a token is dropped and a control byte in a value is
//!   replaced by a space, each with a warning: no caller mistake can split a response.
//! - A status outside 100..=599 is written as 500, with a warning.
//!
//! What it must never do: panic, perform I/O, read a clock, or emit bytes that a client could
//! parse as more than one response.

const WEEKDAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The standard reason phrase for `status`, `"Unknown"` for codes the proxy does not use.
/// An answer to one request.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Resp {
        Resp {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body: body.into(),
        }
    }

    pub fn error(status: u16, code: &str, message: &str) -> Resp {
        Resp::json(status, error_body(code, message))
    }

    pub fn no_content() -> Resp {
        Resp {
            status: 204,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn method_not_allowed(allow: &str) -> Resp {
        let mut r = Resp::error(
            405,
            "method_not_allowed",
            "this path does not take that method",
        );
        r.headers.push(("Allow", allow.into()));
        r
    }
}

/// The interim answer to `Expect: 100-continue`, sent only once a request is authorised.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// 1xx, 204 and 304 responses have neither `Content-Length` nor a body (a 304's length would
/// have to be the resource's, RFC 9110 §8.6: it is left out).
fn bodiless(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

/// Append a complete response to `out`: status line, `Date` (from `unix_secs`),
/// `Content-Length: body.len()` (not for 1xx/204), `Connection: close` when `!keep_alive`,
/// the `extra` headers in order, the blank line, and `body` unless `head_only` or the status
/// has no body.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    extra: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
    keep_alive: bool,
    unix_secs: u64,
) {
    let status = checked_status(status);
    write_head(
        out,
        status,
        extra,
        Some(body.len() as u64),
        keep_alive,
        unix_secs,
    );
    if !head_only && !bodiless(status) {
        out.extend_from_slice(body);
    }
}

/// Append only a response head, announcing `content_length` when given (not for 1xx/204).
/// For a streamed body, or a `101` upgrade, whose headers come in `extra`.
pub fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    extra: &[(&str, &str)],
    content_length: Option<u64>,
    keep_alive: bool,
    unix_secs: u64,
) {
    let status = checked_status(status);
    push(out, "HTTP/1.1 ");
    push(out, &status.to_string());
    push(out, " ");
    push(out, reason(status));
    push(out, "\r\nDate: ");
    push(out, &http_date(unix_secs));
    push(out, "\r\n");
    if let Some(length) = content_length
        && !bodiless(status)
    {
        push(out, "Content-Length: ");
        push(out, &length.to_string());
        push(out, "\r\n");
    }
    if !keep_alive {
        push(out, "Connection: close\r\n");
    }
    for &(name, value) in extra {
        write_field(out, name, value);
    }
    push(out, "\r\n");
}

fn push(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
}

fn checked_status(status: u16) -> u16 {
    if (100..=599).contains(&status) {
        status
    } else {
        log::warn!("response status {status} is not a valid HTTP status; sending 500");
        500
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One `name: value` line, refusing anything that could end the line early.
fn write_field(out: &mut Vec<u8>, name: &str, value: &str) {
    if name.is_empty() || !name.bytes().all(is_tchar) {
        log::warn!("dropping response header with invalid name {name:?}");
        return;
    }
    push(out, name);
    push(out, ": ");
    let is_ctl = |b: u8| (b < 0x20 && b != b'\t') || b == 0x7f;
    if value.bytes().any(is_ctl) {
        log::warn!("response header {name}: control bytes in the value replaced by spaces");
        out.extend(value.bytes().map(|b| if is_ctl(b) { b' ' } else { b }));
    } else {
        push(out, value);
    }
    push(out, "\r\n");
}

/// IMF-fixdate (RFC 9110 §5.6.7) for `unix_secs`, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
/// Years past 9999 print with more digits rather than fail.
pub fn http_date(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    let weekday = WEEKDAYS[((days + 4) % 7) as usize];
    let month = MONTHS[((month + 11) % 12) as usize];
    format!(
        "{weekday}, {day:02} {month} {year:04} {:02}:{:02}:{:02} GMT",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Howard Hinnant's `civil_from_days` for days since 1970-01-01 (never negative here, so
/// unsigned throughout): returns (year, month 1..=12, day 1..=31).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z - era * 146_097; // [0, 146096]
    // [0, 399]
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    // [0, 365], from March 1
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_month = (5 * day_of_year + 2) / 153; // [0, 11], March = 0
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The contract's error body: `{"error":{"code":CODE,"message":MESSAGE}}`, both strings
/// JSON-escaped.
pub fn error_body(code: &str, message: &str) -> Vec<u8> {
    let mut s = String::with_capacity(32 + code.len() + message.len());
    s.push_str("{\"error\":{\"code\":");
    push_json_string(&mut s, code);
    s.push_str(",\"message\":");
    push_json_string(&mut s, message);
    s.push_str("}}");
    s.into_bytes()
}

/// A JSON string literal (RFC 8259 §7): quote, backslash and C0 controls escaped.
fn push_json_string(s: &mut String, text: &str) {
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            c if c < ' ' => s.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => s.push(c),
        }
    }
    s.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap_or("<not utf-8>")
    }

    #[test]
    fn full_response() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            200,
            &[("Content-Type", "application/json")],
            b"{\"status\":\"ok\"}",
            false,
            true,
            784_111_777,
        );
        assert_eq!(
            text(&out),
            "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 15\r\n\
             Content-Type: application/json\r\n\r\n{\"status\":\"ok\"}"
        );
    }

    #[test]
    fn close_head_and_bodiless() {
        let mut out = Vec::new();
        write_response(&mut out, 404, &[], b"nope", false, false, 0);
        assert_eq!(
            text(&out),
            "HTTP/1.1 404 Not Found\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
             Content-Length: 4\r\nConnection: close\r\n\r\nnope"
        );

        let mut out = Vec::new();
        write_response(
            &mut out,
            200,
            &[("ETag", "\"ab\"")],
            b"12345",
            true,
            true,
            0,
        );
        assert_eq!(
            text(&out),
            "HTTP/1.1 200 OK\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
             Content-Length: 5\r\nETag: \"ab\"\r\n\r\n"
        );

        let mut out = Vec::new();
        write_response(&mut out, 204, &[], b"ignored", false, true, 0);
        assert_eq!(
            text(&out),
            "HTTP/1.1 204 No Content\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n"
        );

        let mut out = Vec::new();
        write_response(&mut out, 100, &[], b"", false, true, 0);
        assert!(text(&out).starts_with("HTTP/1.1 100 Continue\r\n"));
        assert!(!text(&out).contains("Content-Length"));
    }

    #[test]
    fn heads_only() {
        let mut out = Vec::new();
        write_head(
            &mut out,
            101,
            &[("Upgrade", "websocket"), ("Connection", "Upgrade")],
            Some(3),
            true,
            0,
        );
        assert_eq!(
            text(&out),
            "HTTP/1.1 101 Switching Protocols\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        );

        let mut out = Vec::new();
        write_head(&mut out, 200, &[], Some(1 << 40), true, 0);
        assert!(text(&out).contains("\r\nContent-Length: 1099511627776\r\n"));
        assert!(text(&out).ends_with("\r\n\r\n"));

        let mut out = Vec::new();
        write_head(&mut out, 206, &[], None, false, 0);
        assert_eq!(
            text(&out),
            "HTTP/1.1 206 Partial Content\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
             Connection: close\r\n\r\n"
        );
    }

    #[test]
    fn extra_headers_cannot_split_the_response() {
        let mut out = Vec::new();
        write_head(
            &mut out,
            302,
            &[
                ("Location", "/a\r\n\r\nHTTP/1.1 200 OK"),
                ("Bad Name", "x"),
                ("", "y"),
                ("X-Tab", "a\tb"),
            ],
            Some(0),
            true,
            0,
        );
        assert_eq!(
            text(&out),
            "HTTP/1.1 302 Unknown\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
             Content-Length: 0\r\nLocation: /a    HTTP/1.1 200 OK\r\nX-Tab: a\tb\r\n\r\n"
        );

        let mut out = Vec::new();
        write_response(&mut out, 42, &[], b"", false, true, 0);
        assert!(text(&out).starts_with("HTTP/1.1 500 Internal Server Error\r\n"));
    }

    #[test]
    fn reasons() {
        let known = [
            100, 101, 200, 201, 202, 204, 206, 400, 401, 403, 404, 405, 408, 409, 411, 413, 416,
            417, 426, 429, 431, 500, 501, 503, 505, 507,
        ];
        for status in known {
            assert_ne!(reason(status), "Unknown", "{status}");
        }
        assert_eq!(reason(431), "Request Header Fields Too Large");
        assert_eq!(reason(418), "Unknown");
        assert_eq!(reason(0), "Unknown");
    }

    #[test]
    fn dates() {
        let cases = [
            (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (784_111_777, "Sun, 06 Nov 1994 08:49:37 GMT"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
            (1_709_164_800, "Thu, 29 Feb 2024 00:00:00 GMT"),
            (1_709_251_199, "Thu, 29 Feb 2024 23:59:59 GMT"),
            (1_709_251_200, "Fri, 01 Mar 2024 00:00:00 GMT"),
            (1_234_567_890, "Fri, 13 Feb 2009 23:31:30 GMT"),
            (4_107_542_399, "Sun, 28 Feb 2100 23:59:59 GMT"),
            (4_107_542_400, "Mon, 01 Mar 2100 00:00:00 GMT"),
            (253_402_300_799, "Fri, 31 Dec 9999 23:59:59 GMT"),
        ];
        for (secs, expected) in cases {
            assert_eq!(http_date(secs), expected, "{secs}");
        }
        // No overflow or panic at the far end.
        assert!(http_date(u64::MAX).ends_with(" GMT"));
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            text(&error_body("not_found", "no such path")),
            r#"{"error":{"code":"not_found","message":"no such path"}}"#
        );
        assert_eq!(
            text(&error_body(
                "x",
                "say \"hi\" \\ back\n\r\t\u{8}\u{c}\u{1}\u{1f}é"
            )),
            r#"{"error":{"code":"x","message":"say \"hi\" \\ back\n\r\t\b\f\u0001\u001fé"}}"#
        );
        assert_eq!(
            text(&error_body("", "")),
            r#"{"error":{"code":"","message":""}}"#
        );
    }
}
