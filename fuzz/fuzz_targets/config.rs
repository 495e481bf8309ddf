//! The configuration parser on arbitrary environment values: never panics; an error is one
//! line that names a FEDMCP_* variable.
#![no_main]
use fedmcp::config::Config;
use libfuzzer_sys::fuzz_target;

const VARS: [&str; 12] = [
    "FEDMCP_LISTEN",
    "FEDMCP_RATE_LIMIT",
    "FEDMCP_MAX_SERVERS",
    "FEDMCP_MAX_MESSAGE_BYTES",
    "FEDMCP_HANDSHAKE_TIMEOUT_MS",
    "FEDMCP_HEARTBEAT_MS",
    "FEDMCP_TOKEN_TTL_SECS",
    "FEDMCP_ALLOW_PLAINTEXT",
    "FEDMCP_RESOURCE_MAX_BYTES",
    "FEDMCP_RESOURCE_QUOTA_BYTES",
    "FEDMCP_STATE_DIR",
    "FEDMCP_JWT_SECRET",
];

fuzz_target!(|data: &[u8]| {
    // Split the input into one value per variable (0xff separates values).
    let text = String::from_utf8_lossy(data);
    let values: Vec<&str> = text.split('\u{fffd}').collect();
    let get = |name: &str| {
        let i = VARS.iter().position(|v| *v == name)?;
        values.get(i).map(|v| v.to_string())
    };
    if let Err(e) = Config::from_lookup(get) {
        let line = e.to_string();
        assert!(line.starts_with("FEDMCP_"), "{line}");
        assert!(!line.contains('\n'), "{line}");
    }
});
