//! The reactor's side: everything that touches a socket, a file descriptor's readiness or
//! the clock.
//!
//! [`reactor`] is the `mio` loop (accept, readiness, read budgets, the flush, signals, the
//! one clock reading per turn); [`proxy`] holds the connection slab and the
//! [`crate::federation::Federation`] core, turns connections' bytes into calls on the core
//! and the core's actions into writes; [`conn`] is one connection (socket, TLS, output
//! buffer, state enum); [`http`] frames HTTP/1.1 requests and answers on a connection;
//! [`upgrade`] turns `GET /v1/control` into a session; [`data`] streams resources between
//! sockets and files; [`dial`] resolves, connects and upgrades for outbound sessions;
//! [`tls`] loads certificates; [`pool`] lends output buffers to busy connections. Nothing here decides federation semantics: what a message,
//! a registration or a token means is the core's.

pub mod conn;
pub mod data;
pub mod dial;
pub mod disk;
pub mod http;
pub mod nats;
pub mod pool;
pub mod proxy;
pub mod reactor;
pub mod tls;
pub mod upgrade;
