//! The `rewind` node and its clients: configuration, QUIC transport with
//! mutual TLS, openraft wiring, the admin and client RPCs, metrics, and the
//! local dev site.
//!
//! Business logic lives in the library crates (`raft-store`'s apply core,
//! `wire`'s validation); this crate wires them to sockets, files and clocks.
//!
//! Invariants kept here:
//! * every connection, node to node or client to node, is mutual TLS from the
//!   site's CA; plaintext is not offered; every request is checked against
//!   the role in the sender's certificate (`rewind_service::access`), and a
//!   client checks the node's certificate against the name it dialled;
//! * every frame read from a socket is bounded, checksummed and validated by
//!   `wire` before use; a bad one gets an error reply and changes nothing;
//! * a client append is answered only after its entry is committed (durable
//!   on a majority) and applied, with the LSN range it got;
//! * routing carries a shard id everywhere; one data shard runs today.

pub mod addr;
pub mod backup;
pub mod client;
mod collector;
pub mod config;
pub mod dev;
pub mod dr;
pub mod load;
pub mod raft_net;
pub mod replay;
pub mod server;
pub mod status;
pub mod tap;
pub mod tls;
pub mod transport;

/// The one data shard a site runs today. Every RPC and address carries the
/// shard id so that several Raft groups per node can come without a rewrite.
pub const DATA_SHARD: rewind_wire::raft::ShardId = 1;

/// Starts a task on tokio: the one place the node's tasks begin.
#[allow(clippy::disallowed_methods)]
pub fn spawn<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(task)
}

/// Nanoseconds since the Unix epoch, from the system clock.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
