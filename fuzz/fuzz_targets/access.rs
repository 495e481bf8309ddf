//! The peer-controlled inputs of access control (contract v1.1 §2, §3): a resource's
//! `?readers=` list (`resources::parse_readers`), and revocation ids with the table that
//! remembers them (`jwt::valid_jti`, `revocations::Revocations`).
//!
//! Input: the first byte picks the part. `readers`: the rest is the (decoded) query value;
//! an accepted list holds only valid, distinct serverIds, at most `MAX_READERS`, and its JSON
//! form parses back to the same list. `revocations`: the rest is a sequence of operations
//! (revoke / saw / prune / lookup) on a small table with times from the input; the table
//! never holds more than its capacity and never forgets a revocation whose tokens can still
//! be presented; `valid_jti` agrees with the contract's "1 to 64 printable ASCII".
#![no_main]
use fedmcp::federation::resources::{MAX_READERS, parse_readers, readers_json};
use fedmcp::federation::revocations::Revocations;
use fedmcp::proto::jwt::{valid_jti, valid_server_id};
use libfuzzer_sys::fuzz_target;

fn readers(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some(ids)) = parse_readers(Some(text)) {
        assert!(ids.len() <= MAX_READERS);
        for (i, id) in ids.iter().enumerate() {
            assert!(valid_server_id(id), "{id:?}");
            assert!(!ids[..i].contains(id), "repeated {id:?}");
        }
        let back: Vec<String> =
            serde_json::from_str(&readers_json(&Some(ids.clone()))).expect("readers JSON parses");
        assert_eq!(back, ids);
    }
}

fn jti(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let contract =
            !text.is_empty() && text.len() <= 64 && text.chars().all(|c| (' '..='~').contains(&c));
        assert_eq!(valid_jti(text), contract, "{text:?}");
    }
}

fn revocations(data: &[u8]) {
    const CAP: usize = 4;
    let mut table = Revocations::new(CAP);
    // What must still be held: jti → until, for revocations accepted.
    let mut model: Vec<(String, i64)> = Vec::new();
    let mut now: i64 = 1_000;
    let skew = 30;
    for op in data.chunks(4) {
        let [kind, a, b, c] = [
            op[0],
            *op.get(1).unwrap_or(&0),
            *op.get(2).unwrap_or(&0),
            *op.get(3).unwrap_or(&0),
        ];
        let jti = String::from_utf8_lossy(&[b'a' + (a % 6)]).into_owned();
        let t = now + i64::from(b) - 64;
        match kind % 4 {
            0 => {
                if let Ok(until) = table.revoke(&jti, t, now, skew) {
                    assert!(until >= t);
                    model.retain(|(j, _)| j != &jti);
                    model.push((jti.clone(), until));
                }
            }
            1 if table.saw(&jti, t) => {
                for m in model.iter_mut().filter(|(j, _)| j == &jti) {
                    m.1 = m.1.max(t);
                }
            }
            1 => {}
            2 => {
                now += i64::from(c);
                table.prune(now, skew);
            }
            _ => {}
        }
        assert!(table.len() <= CAP);
        // Every revocation whose tokens can still be presented is held.
        for (j, until) in &model {
            if until + skew > now {
                assert!(table.is_revoked(j), "{j} forgotten before {until}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((k, rest)) if k % 3 == 0 => readers(rest),
        Some((k, rest)) if k % 3 == 1 => revocations(rest),
        Some((_, rest)) => jti(rest),
        None => {}
    }
});
