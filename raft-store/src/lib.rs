//! Durable Raft storage for rewind on RocksDB: openraft's log store and state
//! machine, in one database per shard replica.
//!
//! Column families:
//! * `log`: Raft entries by index (big-endian), each a checksummed record;
//! * `meta`: the vote and the last purged log id;
//! * `sm`: the state machine's last applied log id and membership;
//! * `groups`: one record per consistency group (last LSN, hash chain, disks);
//! * `events`: every event of every group, keyed by (group, LSN);
//! * `times`: (group, event time, LSN), to resolve "time T" to an LSN;
//! * `producers`: each client's last applied batch per group (idempotency);
//! * `blocks`: the block index, (group, disk, block, LSN) -> version
//!   (`blocks.rs`), so a block as of any LSN is one seek;
//! * `extents`: (group, disk, LSN) -> a large zeroed range of blocks;
//! * `marks`: (group, bookmark name, LSN) -> time, app-consistent flag.
//!
//! Invariants:
//! * entries are fsync'd before openraft's flush callback fires; the vote is
//!   fsync'd before `save_vote` returns; an fsync error aborts the process;
//! * apply assigns each group's LSNs densely from 1 and extends a blake3 hash
//!   chain over its events, so replicas can be compared by digest;
//! * every record read back is checked (checksum, then rkyv validation)
//!   before it is used; a bad record is an error, never data;
//! * snapshots are streamed to and from files in bounded pieces; the whole
//!   state is never held in memory.

pub mod apply;
pub mod backups;
mod backup_store;
pub use backup_store::hash_at;
/// Known bugs the simulation puts back to show it finds them. Built only
/// with the `simulation-bugs` feature; every switch is off unless set.
#[cfg(feature = "simulation-bugs")]
pub mod bugs {
    use std::sync::atomic::AtomicBool;

    /// A site that is not a group's primary takes its appends anyway
    /// (`apply::check_writable` passes everything): after a failover the
    /// old primary keeps writing, two sites lead one group.
    pub static FENCE_IGNORED: AtomicBool = AtomicBool::new(false);
    /// A revert restores only blocks with a newer version, not blocks a
    /// large trim or zero range (an extent) changed after the target.
    pub static REVERT_IGNORES_EXTENTS: AtomicBool = AtomicBool::new(false);
    /// The collector frees the version current at the window's start as
    /// if a newer one replaced it: the oldest retained point reads wrong.
    pub static GC_FREES_LIVE: AtomicBool = AtomicBool::new(false);
    /// The collector ignores pinned bookmarks: the window moves past a
    /// pinned point and frees what it needs.
    pub static GC_IGNORES_PINS: AtomicBool = AtomicBool::new(false);
    /// A point inside an open (or later aborted) backup reads the disk
    /// with the backup's data so far: a half-imported backup shows.
    pub static BACKUP_HALF_VISIBLE: AtomicBool = AtomicBool::new(false);
    /// Any producer may write a disk that a backup is importing into.
    pub static BACKUP_ADMITS_OTHER_WRITERS: AtomicBool = AtomicBool::new(false);
}

/// Whether a bug switch is on (always false without `simulation-bugs`).
#[allow(unused_variables)]
pub(crate) fn bug(which: &str) -> bool {
    #[cfg(feature = "simulation-bugs")]
    {
        use std::sync::atomic::Ordering::Relaxed;
        match which {
            "fence-ignored" => return bugs::FENCE_IGNORED.load(Relaxed),
            "revert-ignores-extents" => return bugs::REVERT_IGNORES_EXTENTS.load(Relaxed),
            "gc-frees-live" => return bugs::GC_FREES_LIVE.load(Relaxed),
            "gc-ignores-pins" => return bugs::GC_IGNORES_PINS.load(Relaxed),
            "backup-half-visible" => return bugs::BACKUP_HALF_VISIBLE.load(Relaxed),
            "backup-admits-other-writers" => return bugs::BACKUP_ADMITS_OTHER_WRITERS.load(Relaxed),
            _ => {}
        }
    }
    false
}
pub mod blocks;
pub mod codec;
mod content;
mod db;
pub mod dr;
mod format;
pub mod gc;
mod log;
pub mod retention;
pub mod read;
pub mod segments;
mod sm;
mod snapshot;

pub use db::{open, Bookmark, Store, StoreReader};
pub use format::{migrate, Found};
pub use log::LogStore;
pub use read::ReadState;
pub use sm::{MigratedGroup, StateMachine};
pub use snapshot::SnapshotFile;

openraft::declare_raft_types!(
    /// The Raft types of a rewind shard.
    pub TypeConfig:
        D = rewind_wire::raft::Command,
        R = rewind_wire::raft::CommandReply,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// Turns any storage error into `io::Error`, keeping its text.
pub(crate) fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// A record on disk failed its checks.
pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

/// The Postgres fsync lesson: after a failed fsync the page cache may have
/// dropped the data, so retrying proves nothing. Stop the process.
pub(crate) fn fsync_failed(what: &str, e: impl std::fmt::Display) -> ! {
    tracing::error!("fsync failed while {what}: {e}; stopping the process");
    eprintln!("rewind: fatal: fsync failed while {what}: {e}");
    std::process::abort()
}

#[cfg(test)]
mod segments_test;
#[cfg(test)]
mod store_test;
#[cfg(test)]
mod suite_test;

/// Whether this node may start a membership change now. A leader that has
/// removed itself from the voters keeps answering as leader for a while;
/// openraft 0.10.0-alpha.34 panics in its core if such a node is asked for
/// another membership change (found by the simulation, seed 37), so the
/// change is refused here and must go to the new leader.
pub fn membership_change_refusal<C>(m: &openraft::RaftMetrics<C>) -> Option<String>
where
    C: openraft::RaftTypeConfig<NodeId = u64>,
{
    let voter = m.membership_config.voter_ids().any(|v| v == m.id);
    (m.state == openraft::ServerState::Leader && !voter).then(|| {
        format!("node {} was removed from the voters and is handing over leadership: send the change to the next leader", m.id)
    })
}

/// A leader asked to drop itself from the voters hands leadership over
/// first, to the returned voter of the new set, and the change goes to
/// that node. A leader that removes itself and crashes before the change
/// commits can leave the site without a leader for good: the others hold
/// the joint configuration, which still needs its vote, while it holds the
/// new one, in which it is no voter and so never stands for election (the
/// simulation found this with one replica lost to corruption).
pub fn self_removal_handover<C>(m: &openraft::RaftMetrics<C>, voters: &std::collections::BTreeSet<u64>) -> Option<u64>
where
    C: openraft::RaftTypeConfig<NodeId = u64>,
{
    if m.state != openraft::ServerState::Leader || voters.contains(&m.id) {
        return None;
    }
    // Prefer a voter that is already one, and so up to date.
    let now: std::collections::BTreeSet<u64> = m.membership_config.voter_ids().collect();
    voters.iter().copied().find(|v| now.contains(v)).or_else(|| voters.iter().copied().next())
}
