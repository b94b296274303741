//! Requests and replies between nodes and from clients. One request and one
//! reply travel on one QUIC stream, each as one frame (a snapshot as a
//! header frame followed by chunk frames).

use rkyv::{Archive, Deserialize, Serialize};

use crate::event::{EventBatch, LoggedEvent};
use crate::raft::{
    AppendEntriesRequest, AppendEntriesResponse, Member, NodeId, ShardId, SnapshotMeta, Vote,
    VoteRequest, VoteResponse,
};

/// The protocol version every frame carries. A peer with another version is
/// refused at the first frame.
pub const PROTOCOL_VERSION: u16 = 2;

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub size_bytes: u64,
    pub sector_bytes: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Request {
    // Between nodes: Raft.
    RaftAppend { shard: ShardId, req: AppendEntriesRequest },
    RaftVote { shard: ShardId, req: VoteRequest, pre_vote: bool },
    /// Starts a snapshot transfer; `SnapshotChunk` frames follow on the
    /// same stream until one has `last` set.
    RaftSnapshot { shard: ShardId, vote: Vote, meta: SnapshotMeta, total_bytes: u64 },
    SnapshotChunk { data: Vec<u8>, last: bool },

    // From clients.
    CreateGroup { group: String, disks: Vec<DiskSpec>, time_ns: u64 },
    /// Deletes a group and its history (refused while it is locked).
    DeleteGroup { group: String },
    Append { batch: EventBatch },
    Status,
    GroupState { group: String },
    /// Events of a group from `lsn_first` on, as this node has applied them;
    /// at most `count_max` and the reply's byte limit.
    ReadEvents { group: String, lsn_first: u64, count_max: u32 },
    /// The last sequence number the site has applied from one producer in
    /// one group (0 if none), read linearizably on the leader: where a
    /// restarted async tap resumes shipping its journal.
    ProducerState { group: String, client_id: u64 },
    /// The group's continuous window and bookmarks, as this node holds them.
    /// With `on_leader`, only the leader answers (NotLeader elsewhere), after
    /// a linearizable read: it reflects every acknowledged write.
    Points { group: String, on_leader: bool },
    /// Resolves a replay target to an LSN on this node's applied state;
    /// `on_leader` as for `Points`.
    Resolve { group: String, target: Target, on_leader: bool },
    /// `len` bytes of a disk from `offset` as of `lsn`, which this node must
    /// have applied; at most `READ_DISK_BYTES_MAX`.
    ReadDisk { group: String, disk: String, lsn: u64, offset: u64, len: u64 },
    /// An async tap's periodic report, kept in memory by the node that
    /// receives it and shown by `rewind status`.
    TapReport(TapReport),

    /// A group's DR state and head at this site, after a linearizable read
    /// on the leader; with `digest_at`, also the chain digest at that LSN.
    DrState { group: String, digest_at: Option<u64> },
    /// The primary's committed events of a group from `lsn_first` on, for
    /// the secondary site (bounded by `SHIP_EVENTS_MAX`, `SHIP_BYTES_MAX`).
    Ship { group: String, lsn_first: u64 },
    /// The same events with their whole blocks as hashes
    /// (`dr::HashedShipment`), answered `ShippedHashedZstd`.
    ShipHashed { group: String, lsn_first: u64 },
    /// Blocks of the group's writes by where they lie, for a secondary
    /// that lacks them (at most `SHIP_BLOCKS_MAX`), answered `BlocksZstd`.
    ShipBlocks { group: String, wanted: Vec<crate::dr::BlockAt> },

    // Administration.
    /// Sets a group's DR state at this site (`rewind dr link`).
    DrSet { group: String, record: crate::dr::DrRecord },
    /// Failback, at the old primary: the fork point with the primary's
    /// history (the node asks the other site over its link).
    DrForkPoint { group: String },
    /// Failback: one step of moving this site's events after `fork_lsn`
    /// into `branch` (see `Command::Fork`).
    DrFork { group: String, branch: String, fork_lsn: u64 },
    /// Makes site `to` the group's primary in the next epoch, if the group
    /// is still at `from_epoch` here (`rewind failover`, `dr switchover`).
    DrSwitch { group: String, from_epoch: u64, to: String },
    ClusterInit { members: Vec<Member> },
    AddLearner { member: Member },
    ChangeVoters { voters: Vec<NodeId> },
    /// Removes a learner (a member that receives the log but does not vote).
    RemoveLearner { id: NodeId },

    /// A group's backups (open, committed and aborted), oldest first, at
    /// most `BACKUPS_LISTED_MAX`; `on_leader` as for `Points`.
    Backups { group: String, on_leader: bool },
    /// The blake3 of each 4 KiB block `block_first..block_first + count`
    /// of a disk as of `lsn` (0: the newest LSN, read linearizably on the
    /// leader), at most `BLOCK_HASHES_MAX` blocks: what a backup's importer
    /// compares its source with, so that it sends only blocks that differ.
    BlockHashes { group: String, disk: String, lsn: u64, block_first: u64, count: u32 },
    /// An `Append`'s batch record (`frame::encode_record`) compressed with
    /// zstd, on an append stream (`frame::compress_batch`); `raw_len`
    /// bounds its size decompressed.
    AppendZstd { raw_len: u64, data: Vec<u8> },
    /// For each blake3 (32 bytes each, at most `FIND_BLOCKS_MAX`): where
    /// the group holds a block with that content at an LSN inside its
    /// window, if it does (the content index), as of `lsn` applied.
    FindBlocks { group: String, hashes: Vec<u8>, lsn: u64 },
}

/// A point in a group's log to replay to.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Lsn(u64),
    /// The last LSN whose event time is <= this (ns since the Unix epoch).
    TimeNs(u64),
    /// The newest bookmark of this name.
    Bookmark(String),
    Latest,
    /// The commit of this backup.
    Backup(String),
}

/// Where a backup stands.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupState {
    /// Begun, not yet committed or aborted: not a restore point.
    Open,
    Committed,
    Aborted,
}

/// One backup of a group, as `rewind points` lists it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub name: String,
    pub disk: String,
    /// The committed backup this one is incremental to.
    pub base: Option<String>,
    pub state: BackupState,
    pub begin_lsn: u64,
    pub begin_time_ns: u64,
    /// The commit's or abort's LSN and time (0 while open).
    pub end_lsn: u64,
    pub end_time_ns: u64,
    /// What the commit reported: extents read, bytes in them, and the
    /// blake3 of their blocks' hashes.
    pub extents: u64,
    pub bytes: u64,
    pub digest: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BookmarkInfo {
    pub name: String,
    pub lsn: u64,
    pub time_ns: u64,
    pub app_consistent: bool,
    /// Pinned until then (0: not pinned): kept beyond the window.
    pub keep_until_ns: u64,
}

/// A group's retention policy, lock and the history it holds.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct RetentionInfo {
    /// 0: no limit of that kind.
    pub keep_ns: u64,
    pub keep_bytes: u64,
    /// 0: never locked.
    pub lock_until_ns: u64,
    /// Payload bytes of the events in the window.
    pub window_bytes: u64,
    /// Payload bytes released by the window's moves and not yet freed.
    pub gc_debt_bytes: u64,
    /// Bytes the collector freed and rewrote on this node.
    pub freed_bytes: u64,
    pub rewritten_bytes: u64,
    /// Payload and block bytes this node holds for the group: its writes,
    /// less what the collector freed, plus the copies it keeps.
    pub stored_bytes: u64,
}

/// What can be replayed: the continuous window and the named points in it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PointsInfo {
    pub group: String,
    /// 0 and 0 when the group has no events yet.
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub first_time_ns: u64,
    pub last_time_ns: u64,
    /// Newest first.
    pub bookmarks: Vec<BookmarkInfo>,
    pub disks: Vec<DiskSpec>,
    pub retention: RetentionInfo,
}

impl Request {
    /// The request's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::RaftAppend { .. } => "raft-append",
            Request::RaftVote { .. } => "raft-vote",
            Request::RaftSnapshot { .. } => "raft-snapshot",
            Request::SnapshotChunk { .. } => "snapshot-chunk",
            Request::CreateGroup { .. } => "create-group",
            Request::DeleteGroup { .. } => "delete-group",
            Request::Append { .. } => "append",
            Request::Status => "status",
            Request::GroupState { .. } => "group-state",
            Request::ReadEvents { .. } => "read-events",
            Request::ProducerState { .. } => "producer-state",
            Request::TapReport(_) => "tap-report",
            Request::Points { .. } => "points",
            Request::Resolve { .. } => "resolve",
            Request::ReadDisk { .. } => "read-disk",
            Request::DrState { .. } => "dr-state",
            Request::Ship { .. } => "ship",
            Request::ShipHashed { .. } => "ship-hashed",
            Request::ShipBlocks { .. } => "ship-blocks",
            Request::DrSet { .. } => "dr-set",
            Request::DrSwitch { .. } => "dr-switch",
            Request::DrForkPoint { .. } => "dr-fork-point",
            Request::DrFork { .. } => "dr-fork",
            Request::ClusterInit { .. } => "cluster-init",
            Request::AddLearner { .. } => "add-learner",
            Request::ChangeVoters { .. } => "change-voters",
            Request::RemoveLearner { .. } => "remove-learner",
            Request::Backups { .. } => "backups",
            Request::BlockHashes { .. } => "block-hashes",
            Request::AppendZstd { .. } => "append-zstd",
            Request::FindBlocks { .. } => "find-blocks",
        }
    }
}

/// A node's part in one shard's Raft group.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Candidate,
    Follower,
    Learner,
    ShuttingDown,
}

impl Role {
    /// The word `rewind status` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Candidate => "candidate",
            Role::Follower => "follower",
            Role::Learner => "learner",
            Role::ShuttingDown => "shutting-down",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One node's view of one shard.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    pub shard: ShardId,
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// The log index the newest snapshot covers.
    pub snapshot_index: Option<u64>,
    /// Entries up to this index have been removed from the log.
    pub purged_index: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub members: Vec<Member>,
    /// The groups, as many as fit [`crate::limits::STATUS_GROUPS_BYTES_MAX`].
    pub groups: Vec<GroupState>,
    /// Groups left out to keep the reply in one frame.
    pub groups_omitted: u64,
}

/// A consistency group's state on one replica.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub name: String,
    pub last_lsn: u64,
    /// blake3 chain over every event of the group, in LSN order.
    pub digest_hex: String,
    pub disks: Vec<DiskSpec>,
    pub events: u64,
    pub payload_bytes: u64,
    pub retention: RetentionInfo,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: NodeId,
    pub addr: String,
    pub pid: u32,
    pub shards: Vec<ShardStatus>,
    /// Async taps that reported to this node recently.
    pub taps: Vec<TapStatus>,
}

/// What an async tap tells the site about itself.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TapReport {
    pub group: String,
    pub disk: String,
    pub pid: u32,
    /// Where the tap serves NBD.
    pub uri: String,
    /// Age of the oldest write the site has not committed yet, in ms; 0
    /// when everything is shipped. The recovery point objective right now.
    pub rpo_ms: u64,
    /// Bytes of unshipped batches in the tap's journal, and its bound.
    pub journal_bytes: u64,
    pub journal_bytes_max: u64,
    pub unshipped_batches: u64,
    /// Times the journal was full and the guest had to wait.
    pub stalls: u64,
    /// The newest LSN the site gave a shipped batch.
    pub shipped_lsn: u64,
}

/// A tap report as one node holds it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TapStatus {
    pub report: TapReport,
    /// How long ago the node received it.
    pub age_ms: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request was malformed or broke a limit; retrying will not help.
    BadRequest,
    /// This node does not lead the shard; `leader` says who does, if known.
    NotLeader,
    /// The state machine refused the command (unknown group, out of range).
    Refused,
    /// The cluster could not do it now (no quorum, shutting down); retry.
    Unavailable,
    /// The node failed internally.
    Internal,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub kind: ErrorKind,
    pub message: String,
    pub leader: Option<Member>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Done,
    RaftAppend(AppendEntriesResponse),
    RaftVote(VoteResponse),
    RaftSnapshot { vote: Vote },
    Appended { lsn_first: u64, lsn_last: u64 },
    Status(NodeStatus),
    Group(GroupState),
    Events(Vec<LoggedEvent>),
    Producer { last_seq: u64 },
    Points(PointsInfo),
    Resolved { lsn: u64, time_ns: u64 },
    /// A piece of a disk: its length, and runs (offset in the piece, bytes)
    /// that may be non-zero; everything else reads as zeroes.
    DiskPiece { len: u64, runs: Vec<(u64, Vec<u8>)> },
    Dr(Box<crate::dr::DrInfo>),
    /// The fork point of this site's history and the other site's, and
    /// both heads.
    ForkPoint { lsn: u64, here_last: u64, there_last: u64, epoch: u64 },
    Shipped(Box<crate::dr::Shipment>),
    /// A shipment as the node sends it to the other site: its record
    /// (`frame::encode_record`) compressed with zstd; `raw_len` bounds the
    /// decompressed size.
    ShippedZstd { raw_len: u64, data: Vec<u8> },
    HashedShipment(Box<crate::dr::HashedShipment>),
    /// A `dr::HashedShipment` record compressed with zstd, like `ShippedZstd`.
    ShippedHashedZstd { raw_len: u64, data: Vec<u8> },
    Blocks(crate::dr::ShippedBlocks),
    /// A `dr::ShippedBlocks` record compressed with zstd.
    BlocksZstd { raw_len: u64, data: Vec<u8> },
    Error(RpcError),
    Backups(Vec<BackupInfo>),
    /// 32 bytes per block, as of `lsn`.
    BlockHashes { lsn: u64, hashes: Vec<u8> },
    /// One entry per hash asked: (disk, block, LSN) where it lies.
    Found(Vec<Option<(String, u64, u64)>>),
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)?;
        if let Some(leader) = &self.leader {
            write!(f, " (leader is node {} at {})", leader.id, leader.addr)?;
        }
        Ok(())
    }
}
