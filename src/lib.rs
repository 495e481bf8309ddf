//! fedmcp: a federation proxy for MCP servers, in one thread.
//!
//! Servers register with the proxy (HTTP, admin token), hold a WebSocket control channel to it
//! (federation token), and send each other JSON-RPC messages that the proxy routes with
//! delivery confirmation. The wire contract is `docs/PROTOCOL.md`; `docs/ARCHITECTURE.md` maps
//! each of its sections to the code.
//!
//! # Layers
//!
//! - [`federation`]: the core. Registry, control sessions' protocol state (by `SessionId`),
//!   routing, pending deliveries, queues, the durability policy, dialling decisions, tokens.
//!   It holds no socket, no file and no clock: it is called with what happened (a frame, a
//!   session opened or lost, a request, a commit's outcome) and the turn's time, and answers
//!   with [`federation::action::Action`]s.
//! - [`api`]: the route table (decided on the request head) and the core's HTTP handlers.
//! - [`io`]: the reactor's side. The `mio` loop, the connection slab, TLS, HTTP framing on a
//!   connection, the WebSocket framing in front of a session, resource streaming, dialling
//!   sockets and the resolver thread; it reads the clock once per turn and carries out the
//!   core's actions.
//! - [`proto`]: codecs over byte buffers: HTTP, WebSocket, JSON-RPC, JWT, the client upgrade.
//! - [`store`]: the state dir: the secret, the state log's records and file, resource files.
//! - [`clock`] (the turn's one reading of both clocks), [`random`] (ids), [`timer`] (a
//!   deadline map), [`metrics`], [`audit`], [`config`] (every variable, validated once),
//!   [`logging`].
//! - [`client`]: a blocking client of the proxy (a WebSocket session, an HTTP call) for the
//!   proxy's tools and the examples; [`bridge`]: `fedmcp mcp-stdio`, the MCP facade as a command an MCP host starts (stdio
//!   ↔ `/mcp` over WebSocket); a client in its own process.
//! - Test drivers of the core without sockets: [`sim`] (a seeded simulation of a
//!   federation), [`harness`] (a fuzzed session).
//!
//! # Invariants
//!
//! No peer input can panic the loop or grow memory past a configured bound; the loop never
//! blocks on a socket; an idle proxy sleeps until its nearest deadline.

pub mod api;
pub mod audit;
pub mod bridge;
pub mod client;
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
