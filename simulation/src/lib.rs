//! Deterministic simulation of a whole rewind site in one process.
//!
//! One seed draws a fault plan, then runs nodes (openraft's real core with
//! production's pure apply core and block index, and production's request
//! service, `rewind-service`), clients and a fault
//! injector on a deterministic executor with simulated time (`rt.rs`),
//! network (`net.rs`) and disks (`disk.rs`). Checkers (`check.rs`) run at
//! the end of every seed; then a cross-site DR scenario (`dr.rs`) runs two
//! sites' state machines under link faults and a failover. The trace of
//! everything that happened is hashed,
//! so the same seed must give the same hash. The fault model is written
//! down in `simulation/FAULTS.md`.

pub mod backup;
pub mod check;
pub mod disk;
pub mod dr;
pub mod faults;
pub mod journal;
pub mod model;
pub mod net;
pub mod replay;
pub mod retention;
pub mod rng;
pub mod rt;
pub mod site;
pub mod sm;
pub mod stream;
pub mod tap;
pub mod world;


openraft::declare_raft_types!(
    /// The Raft types of a simulated shard: production's commands and
    /// replies, on the simulated runtime.
    pub SimConfig:
        D = rewind_wire::raft::Command,
        R = rewind_wire::raft::CommandReply,
        NodeId = u64,
        Node = openraft::BasicNode,
        AsyncRuntime = rt::SimRuntime,
);

pub type Raft = openraft::Raft<SimConfig, sm::SimSm>;

/// A simulated node's types for production's request service.
pub struct SimTypes;

impl rewind_service::ServiceTypes for SimTypes {
    type C = SimConfig;
    type SM = sm::SimSm;
    type Read = sm::SimState;

    fn responder() -> (openraft::alias::WriteResponderOf<SimConfig>, rewind_service::WriteReceiver<SimConfig>) {
        openraft::impls::ProgressResponder::complete_only()
    }

    fn wall_ns() -> u64 {
        rt::local_now_ns()
    }
}

/// Production's request handling on one simulated node.
pub type SimService = rewind_service::Service<SimTypes>;

/// The request service of the node whose Raft this is, or why there is
/// none (the node is down).
pub fn service_of(raft: Raft) -> Result<SimService, String> {
    let id = openraft_rt::WatchReceiver::borrow_watched(&raft.metrics()).id;
    let sm = world::with(|w| w.nodes.get(&id).and_then(|n| n.sm.clone())).ok_or_else(|| format!("node {id} is down"))?;
    Ok(rewind_service::Service::new(id, raft, sm::SimState(sm)))
}
pub type Entry = openraft::alias::EntryOf<SimConfig>;
pub type LogId = openraft::alias::LogIdOf<SimConfig>;
pub type Vote = openraft::alias::VoteOf<SimConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<SimConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<SimConfig, std::sync::Arc<sm::SmImage>>;

/// Known bugs the simulation can put back, to show that it finds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum Bug {
    /// The log store tells Raft entries are durable before their fsync.
    AckBeforeFsync,
    /// A failed append to a follower counts as a success: the leader
    /// commits without a majority.
    CommitWithoutMajority,
    /// The node answers a client's write when the leader has taken it, not
    /// when it is committed.
    AckBeforeCommit,
    /// The vote is not fsync'd before it is answered.
    VoteNotSynced,
    /// openraft's default: a restarted leader takes its leadership back
    /// without an election. With entries lost in the crash it writes new
    /// entries under log ids its followers already hold (found here).
    LeaderRestore,
    /// Membership changes skip production's guards (the refusal and the
    /// handover), so a leader that has removed itself is asked for another
    /// change (openraft panics).
    MembershipUnguarded,
    /// The real tap (`cdp-ingest`), in sync mode, answers a write once its
    /// batch is queued for the site rather than once it is committed.
    TapAnswerBeforeCommit,
    /// A leader removes itself from the voters rather than hand leadership
    /// over first (production's `self_removal_handover`); a crash before the
    /// change commits can leave the site without a leader for good.
    LeaderRemovesItself,
    /// A node serves a replay read at an LSN it has not applied yet (the
    /// check production's `ReadDisk` makes is skipped).
    ReplayBeforeApplied,
    /// Each tap process ships under a fresh producer identity (as before
    /// fencing) rather than the next epoch of the tap's identity, so a
    /// batch a dead process left on the wire can commit after the next
    /// process's writes.
    TapUnfenced,
    /// The async tap's shipper trims a batch from its journal once it is
    /// sent rather than once the site has committed it, so a crash of the
    /// tap loses it.
    ShipperTrimsOnSend,
    /// The async tap's shipper trims a committed batch from its journal
    /// without syncing the backing file first, so a power loss on the
    /// tap's host can take an answered write from the guest's disk while
    /// the log keeps it.
    TrimBeforeBackingSync,
    /// Opening the async journal cuts it at a damaged entry (as a torn
    /// tail) rather than refusing: the entry and every one after it, all
    /// acknowledged, are lost.
    CutDamagedJournalEntry,
    /// A site that is not a group's primary takes its appends anyway: after
    /// a failover the old primary keeps writing (two primaries).
    DrFenceIgnored,
    /// A failover's revert restores blocks that have a newer version but
    /// not blocks a large trim (an extent) zeroed after the target.
    DrRevertIgnoresExtents,
    /// The failback's fork search answers one LSN late, so the old
    /// primary keeps its first diverged event and can never follow.
    DrForkOneLate,
    /// DR's hashes-first shipping fills a block the secondary already
    /// holds one sector off, so the shipment no longer matches its chain.
    DrDedupeFillAskew,
    /// The collector frees the block version current at the window's
    /// start as if a newer one had replaced it.
    GcFreesLive,
    /// The collector ignores pinned bookmarks: the window moves past a
    /// pinned point and its blocks are freed.
    GcIgnoresPins,
    /// A point inside an open (or later aborted) backup reads the disk
    /// with the backup's data so far: the backup shows half-imported.
    BackupHalfVisible,
    /// Any producer may write a disk while a backup imports into it.
    BackupAdmitsOtherWriters,
    /// The log's syncer fsyncs its records but not the payload segments:
    /// a crash tears payloads of acknowledged entries.
    SegmentsNotSynced,
    /// Apply records where a write's payload lies without making sure it
    /// is synced (openraft applies entries its log has not synced yet):
    /// a snapshot can name payloads a crash then tears.
    ApplyBeforePayloadSynced,
    /// Segment deletion ignores the events that name a segment (it heeds
    /// only the log): the history's payloads are deleted under it.
    ReclaimIgnoresEvents,
}

pub use site::{run_seed, Outcome};
