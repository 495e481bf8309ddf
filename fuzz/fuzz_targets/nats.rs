//! The NATS client codec (`proto::nats`): the parser, fed bytes a server could send, never
//! panics, never claims more bytes than it was given, and agrees with itself however the
//! bytes of an op arrive; the encoders, fed fuzz-derived subjects, headers and payloads,
//! write either nothing or one op that a server's echo of it (`MSG`/`HMSG`) parses back to.
#![no_main]
use fedmcp::proto::nats::{Limits, Msg, ServerOp, hpublish, parse, publish, valid_subject};
use libfuzzer_sys::fuzz_target;

const SMALL: Limits = Limits {
    max_control_line: 64,
    max_payload: 256,
};

/// Ops are consumed from the front until the parser wants more bytes or refuses them.
fn consume(data: &[u8], limits: &Limits) {
    let mut rest = data;
    let mut first = true;
    loop {
        match parse(rest, limits) {
            Ok(Some((op, n))) => {
                assert!(n > 0 && n <= rest.len(), "consumed {n} of {}", rest.len());
                if let ServerOp::Msg(m) = &op {
                    assert!(m.payload.len() <= limits.max_payload);
                }
                // The bytes after an op play no part in it.
                assert_eq!(parse(&rest[..n], limits), Ok(Some((op.clone(), n))));
                // Every strict prefix is incomplete (checked on short first ops: quadratic).
                if first && n <= 300 {
                    for k in 0..n {
                        assert_eq!(parse(&rest[..k], limits), Ok(None), "prefix {k} of {n}");
                    }
                }
                first = false;
                rest = &rest[n..];
            }
            Ok(None) => {
                // Incomplete is never said of a control line already over the bound.
                let line = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
                assert!(line <= limits.max_control_line.saturating_add(1));
                break;
            }
            Err(_) => break,
        }
    }
}

/// What a server does with our `PUB`/`HPUB`: check it is one op, and deliver it back on `sid`
/// as `MSG`/`HMSG`.
fn server_echo(frame: &[u8], sid: u64) -> Vec<u8> {
    let nl = frame
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("a control line");
    let line = std::str::from_utf8(&frame[..nl]).expect("UTF-8 control line");
    let fields: Vec<&str> = line.split(' ').collect();
    let (new_op, sizes) = match fields[0] {
        "PUB" => ("MSG", 1),
        "HPUB" => ("HMSG", 2),
        other => panic!("unexpected op {other}"),
    };
    assert!(
        fields.len() == 2 + sizes || fields.len() == 3 + sizes,
        "{line}"
    );
    assert!(
        fields[1..fields.len() - sizes]
            .iter()
            .all(|s| valid_subject(s, false))
    );
    let total: usize = fields[fields.len() - 1].parse().expect("total size");
    // Exactly one op: the line, the payload, its CRLF, nothing more.
    assert_eq!(frame.len(), nl + 2 + total + 2, "{line}");
    assert_eq!(&frame[frame.len() - 2..], b"\r\n");
    let mut echo = format!("{new_op} {} {sid} {}", fields[1], fields[2..].join(" ")).into_bytes();
    echo.extend_from_slice(&frame[nl..]);
    echo
}

fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((&n, rest)) = data.split_first() else {
        return &[];
    };
    let n = usize::from(n % 32).min(rest.len());
    let (a, b) = rest.split_at(n);
    *data = b;
    a
}

fn round_trip(data: &[u8]) {
    let mut d = data;
    let subject = String::from_utf8_lossy(take(&mut d)).into_owned();
    let reply_bytes = take(&mut d);
    let reply = String::from_utf8_lossy(reply_bytes).into_owned();
    let reply = (!reply_bytes.is_empty()).then_some(reply.as_str());
    let mut owned = Vec::new();
    for _ in 0..(d.first().copied().unwrap_or(0) % 5) {
        let name = String::from_utf8_lossy(take(&mut d)).into_owned();
        let value = String::from_utf8_lossy(take(&mut d)).into_owned();
        owned.push((name, value));
    }
    let headers: Vec<(&str, &str)> = owned
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let payload = d;
    let sid = data.len() as u64;
    let valid = valid_subject(&subject, false) && reply.is_none_or(|r| valid_subject(r, false));

    let mut out = Vec::new();
    publish(&mut out, &subject, reply, payload);
    if !valid {
        assert!(out.is_empty());
    } else {
        let echo = server_echo(&out, sid);
        let expect = Msg {
            subject: subject.clone(),
            sid,
            reply: reply.map(str::to_string),
            status: None,
            headers: Vec::new(),
            payload: payload.to_vec(),
        };
        assert_eq!(
            parse(&echo, &Limits::default()),
            Ok(Some((ServerOp::Msg(expect), echo.len())))
        );
    }

    let mut out = Vec::new();
    hpublish(&mut out, &subject, reply, &headers, payload);
    if !valid {
        assert!(out.is_empty());
        return;
    }
    let echo = server_echo(&out, sid);
    // What the encoder promises: names that are not tokens dropped, control bytes in values
    // written as spaces; what the parser does: values trimmed of blanks.
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let ctl = |c: char| (c < ' ' && c != '\t') || c == '\u{7f}';
    let expect_headers: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| !n.is_empty() && n.bytes().all(tchar))
        .map(|(n, v)| {
            let v: String = v.chars().map(|c| if ctl(c) { ' ' } else { c }).collect();
            (n.to_string(), v.trim_matches([' ', '\t']).to_string())
        })
        .collect();
    let expect = Msg {
        subject,
        sid,
        reply: reply.map(str::to_string),
        status: None,
        headers: expect_headers,
        payload: payload.to_vec(),
    };
    assert_eq!(
        parse(&echo, &Limits::default()),
        Ok(Some((ServerOp::Msg(expect), echo.len())))
    );
}

fuzz_target!(|data: &[u8]| {
    consume(data, &SMALL);
    consume(data, &Limits::default());
    round_trip(data);
});
