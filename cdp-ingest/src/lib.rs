//! The tap: an NBD server in front of a disk's backing file that journals
//! every write into the disk's consistency group, in order (the VAIO I/O
//! filter's role in Veeam CDP).
//!
//! * [`nbd`]: the NBD protocol as pure functions over bytes.
//! * [`tap`]: the server: handshake, transmission, the ordered section that
//!   writes the backing file and queues the event in one order, and the
//!   batcher that hands batches to a [`tap::LogSink`].
//!
//! The tap appends through the [`tap::LogSink`] trait, which `node`
//! implements over QUIC; this crate never sees Raft or the network.
//!
//! Invariants kept here:
//! * every WRITE, WRITE_ZEROES and TRIM is in the backing file and queued
//!   for the log before the next request of any connection is ordered, so
//!   the log's order is the backing file's order;
//! * in sync mode a write is answered only after its event is committed;
//!   FLUSH and FUA are answered only after everything before them is;
//! * every request is bounds-checked before it touches the backing file;
//!   a bad one gets the NBD error the protocol defines.
//!
//! Not built yet: async mode (the local journal and its shipper), the CBT
//! importer.

pub mod nbd;
pub mod tap;
