//! Sans-io HTTP/1.1 for the data channel: request heads in, chunked bodies decoded,
//! responses out. Bytes in, values out; no sockets, no clocks, no threads.
//!
//! What it owns:
//! - [`parse`]: one request head at the start of a buffer → [`RequestHead`] and its length,
//!   or a [`HeadError`] that names its status (`400`, `431`, `501`, `505`) and contract code.
//! - [`chunked`]: an incremental [`ChunkedDecoder`] for `Transfer-Encoding: chunked` bodies,
//!   with a caller-set body limit and a per-call output budget.
//! - [`response`]: status line, `Date`, `Content-Length`, `Connection: close`, and the
//!   contract's JSON error body.
//!
//! Invariants: every parser validates before a value exists, so no accessor can fail; all
//! limits are named constants ([`MAX_HEAD_BYTES`], [`MAX_HEADERS`], [`MAX_CHUNK_LINE`],
//! [`MAX_TRAILER_BYTES`]) or caller-supplied; each call states how much work it may do.
//! A connection drives these in order: `parse_head` until a head (or an error), then the body
//! by `Content-Length` or the decoder, then the next pipelined head from the leftover bytes.
//!
//! What it must never do: panic on any input, perform I/O, read the clock (time is passed in),
//! or buffer a body on its own.

pub mod chunked;
pub mod parse;
pub mod response;

pub use chunked::{ChunkError, ChunkedDecoder, MAX_CHUNK_LINE, MAX_TRAILER_BYTES, Progress};
pub use parse::{
    BodyKind, HeadError, MAX_HEAD_BYTES, MAX_HEADERS, MAX_LEADING_EMPTY_LINES, Method, RequestHead,
    parse_head, percent_decode,
};
pub use response::{error_body, http_date, reason, write_head, write_response};
