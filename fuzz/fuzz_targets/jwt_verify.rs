//! The token verifier on arbitrary input: never panics; anything it accepts re-verifies.
#![no_main]
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"fuzz-secret-0123456789-abcdefghijklmnop";

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(claims) = fedmcp::proto::jwt::verify(token, &[KEY], 1_700_000_000, 30) {
        assert!(fedmcp::proto::jwt::valid_server_id(&claims.server_id));
        let again = fedmcp::proto::jwt::sign(KEY, &claims);
        assert_eq!(
            fedmcp::proto::jwt::verify(&again, &[KEY], 1_700_000_000, 30),
            Ok(claims)
        );
    }
});
