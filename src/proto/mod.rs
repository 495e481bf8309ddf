//! The protocols the proxy speaks, as codecs over byte buffers: no socket, no clock (time is
//! passed in), each with unit tests beside its parser and a fuzz target.
//!
//! [`http`] (request heads, chunked bodies, responses), [`ws`] (tungstenite over our
//! buffers, the read step of a session), [`jsonrpc`] (envelopes, batches, the error table),
//! [`jwt`] (HS256 tokens, signatures, the id rules), [`upgrade`] (the WebSocket client
//! upgrade the proxy sends when it dials a server).

pub mod http;
pub mod jsonrpc;
pub mod jwt;
pub mod nats;
pub mod upgrade;
pub mod ws;
