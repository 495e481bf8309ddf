//! fedmcp: a federation proxy for MCP servers, in one thread.
//!
//! Servers register with the proxy (HTTP, admin token), hold a WebSocket control channel to it
//! (federation token), and send each other JSON-RPC messages that the proxy routes with
//! delivery confirmation. The wire contract is `PROTOCOL.md`; `docs/ARCHITECTURE.md` maps
//! each of its sections to the code.
//!
//! # Layers
//!
//! - [`reactor`]: the `mio` loop. Accept, readiness, per-connection read budgets, the single
//!   deadline structure ([`timer`]), one flush per connection per turn, signals, the clock;
//!   [`dial`]: its side of outbound sessions (resolver thread, sockets).
//! - [`conn`]: a connection's socket, readiness, output buffer and state enum
//!   (`Http` → `Ws` on upgrade → `Closing`).
//! - Protocol, all sans-io (bytes in, bytes out, time passed in):
//!   [`http`] (request heads, chunked bodies, responses), [`ws`] (tungstenite over our
//!   buffers), [`jsonrpc`] (envelopes and the error table), [`jwt`] (HS256).
//! - Semantics, as `impl Proxy` blocks over the shared state in [`proxy`]:
//!   [`api`] (the route table, HTTP framing, one module per group of endpoints),
//!   [`data`] (resources), [`control`] (control sessions), [`router`] (send, deliver,
//!   answer, queue, broadcast), [`outbound`] (dialling decisions), [`durable`] (what is
//!   persisted, the group commit, restore).
//! - State: [`registry`] (fixed-capacity server table), [`session`], [`revocations`],
//!   [`metrics`], [`audit`], [`store`] (the state dir), [`config`] (every variable,
//!   validated once). [`clock`]: the turn's one reading of the clocks, taken by the reactor.
//! - Test drivers: [`sim`] (a seeded simulation of a federation), [`harness`] (one fuzzed
//!   session).
//!
//! # Invariants
//!
//! No peer input can panic the loop or grow memory past a configured bound; the loop never
//! blocks on a socket; an idle proxy sleeps until its nearest deadline.

pub mod api;
pub mod audit;
pub mod clock;
pub mod config;
pub mod federation;
pub mod harness;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod proto;
pub mod random;
pub mod sim;
pub mod store;
pub mod timer;
