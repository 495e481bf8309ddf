//! The MCP facade (contract §9) on arbitrary messages, over Streamable HTTP and WebSocket, with
//! a member that answers every call (`fedmcp::harness::play_mcp`): never panics, every answer
//! is one JSON-RPC message, and deliveries never pile up.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fedmcp::harness::play_mcp(data);
});
