//! The NBD protocol and server, one home for every export rewind serves:
//! the tap (`cdp-ingest`), which journals a live disk's writes, and a
//! replayed past point (`replay`), read-only or copy-on-write.
//!
//! * [`protocol`]: the NBD protocol as pure functions over bytes (fixed
//!   newstyle handshake, option haggling, requests, simple and structured
//!   replies); no I/O, and no panic on any input.
//! * [`server`]: serves any [`server::Export`] on one connection:
//!   handshake, bounds checks, read-only refusals, and the rule that a
//!   mutation is ordered before the next request is read.
//! * [`listen`]: accept loops on TCP and Unix sockets (accept errors are
//!   survived, connections capped), and the stop signal.
//! * [`client`]: the client side, for reading a backup's source: URIs,
//!   handshake with meta contexts (`base:allocation`, QEMU dirty bitmaps),
//!   `BLOCK_STATUS` and `READ` with structured replies.
//!
//! Bounds: connections per listener (`--max-connections`), the handshake's
//! time ([`server::HANDSHAKE_TIMEOUT`]), requests and payload bytes in
//! flight per connection ([`server::REQUESTS_IN_FLIGHT_MAX`],
//! [`server::BYTES_IN_FLIGHT_MAX`]), options per handshake, and the size of
//! one request.
//!
//! This crate never knows what an export stores, never sees the log, Raft
//! or QUIC, and never opens a file of its own.

pub mod client;
pub mod listen;
pub mod protocol;
pub mod server;

pub use futures::future::BoxFuture;

/// Starts one of the server's tasks (a connection, a reply). The NBD server
/// runs on tokio only: the simulation drives exports directly, without
/// sockets, so this is the one spawn site and it is tokio's.
#[allow(clippy::disallowed_methods)]
fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(task: F) {
    tokio::spawn(task);
}
