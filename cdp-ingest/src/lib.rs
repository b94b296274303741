//! The tap: an NBD server in front of a disk's backing file that journals
//! every write into the disk's consistency group, in order (the VAIO I/O
//! filter's role in Veeam CDP).
//!
//! * [`tap`]: the tap as an export: the ordered section that
//!   writes the backing file and queues the event in one order, and the
//!   batcher that hands batches to a [`tap::LogSink`].
//! * [`journal`]: async mode's local journal, bounded in bytes, fsync'd
//!   before a write is answered, trimmed as the site commits.
//! * [`producer`]: the ordered, pipelined, idempotent producer that
//!   appends batches for one producer identity, through an
//!   [`producer::AppendLink`] (QUIC in `node`, the simulated network in
//!   `simulation`).
//! * [`shipper`]: the async tap's shipper and its redo at start, and the
//!   sync tap's sink over the producer.
//! * [`identity`]: a sync tap's producer identity and epochs.
//! * [`backup`]: the backup importer: a source's changed blocks, compared
//!   with the site's by blake3, appended as one backup transaction.
//!
//! The tap appends through the [`tap::LogSink`] trait: the producer's sink
//! or the journal's; this crate never sees Raft, QUIC or a socket of its
//! own (the NBD server is `rewind-nbd`'s). It
//! reaches its backing file through [`tap::Backing`] and spawns through
//! [`tap::Spawner`], so the simulation runs the same tap in memory.
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
//! * in async mode a write is answered only once its batch is fsync'd in
//!   the journal; the journal never holds more than its bound;
//! * an fsync error on the journal or the backing file stops the process
//!   ([`fsync_failed`]).

pub mod backup;
pub mod identity;
pub mod journal;
pub mod producer;
pub mod shipper;
pub mod tap;

pub use futures::future::BoxFuture;

/// The Postgres fsync lesson: after a failed fsync the page cache may have
/// dropped the data, so retrying proves nothing and no later write may be
/// acknowledged. The tap's process stops; restarted, an async tap redoes
/// its journal onto the backing file.
pub fn fsync_failed(what: &str, e: std::io::Error) -> ! {
    tracing::error!("fsync of {what} failed: {e}; stopping the tap so no further write is acknowledged");
    eprintln!("rewind tap: fatal: fsync of {what} failed: {e}; stopping");
    std::process::abort();
}
