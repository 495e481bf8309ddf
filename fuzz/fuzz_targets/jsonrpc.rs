//! The JSON-RPC envelope parser (single and batch), exactly as a control session runs it:
//! never panics, and every error it reports maps to a contract code.
#![no_main]
use fedmcp::proto::jsonrpc::{Frame, parse_frame, parse_msg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_frame(text) {
        Ok(Frame::Single(t)) => {
            if let Err(inv) = parse_msg(t) {
                assert!(matches!(inv.error.code(), -32700 | -32600));
            }
        }
        Ok(Frame::Batch(items)) => {
            assert!(!items.is_empty() && items.len() <= fedmcp::proto::jsonrpc::MAX_BATCH_LEN);
            for raw in items {
                let _ = parse_msg(raw.get());
            }
        }
        Err(e) => assert!(matches!(e.code(), -32700 | -32600)),
    }
});
