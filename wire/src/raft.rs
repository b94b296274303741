//! Plain mirrors of the Raft messages. `node` converts between these and the
//! consensus library's types; `raft-store` stores them on disk.

use rkyv::{Archive, Deserialize, Serialize};

use crate::event::EventBatch;
use crate::rpc::DiskSpec;

/// Which Raft group (shard) a message belongs to.
pub type ShardId = u32;
/// A node's id within a site.
pub type NodeId = u64;

/// A leader's identity: the term and the node that won it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderId {
    pub term: u64,
    pub node: NodeId,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vote {
    pub leader: LeaderId,
    pub committed: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogId {
    pub leader: LeaderId,
    pub index: u64,
}

/// A node as members know it: its id and the address of its QUIC endpoint.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub addr: String,
}

/// A (possibly joint) configuration: the voter sets and every known node.
/// A node listed in `nodes` and in no voter set is a learner.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    pub configs: Vec<Vec<NodeId>>,
    pub nodes: Vec<Member>,
}

/// What a state machine is asked to do by one Raft entry.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Create a consistency group with its disks.
    CreateGroup { group: String, disks: Vec<DiskSpec>, time_ns: u64 },
    /// Append a batch of events to a group.
    Append(EventBatch),
    /// Set a group's cross-site state (link, failover, a higher epoch
    /// learned from the peer). Never lowers the epoch.
    DrSet { group: String, record: crate::dr::DrRecord },
    /// Events the primary site committed, pulled by this (secondary) site:
    /// they keep their LSNs and times, and the chain must reach `digest`.
    /// Events this site holds already are skipped, so a resend is harmless.
    Replicate { group: String, epoch: u64, events: Vec<crate::event::LoggedEvent>, digest: [u8; 32] },
    /// Failback at a site whose history diverged from the new primary's:
    /// moves its newest events after `fork_lsn` into the read-only group
    /// `branch` (made by the first such command), a bounded piece per
    /// command, until the group ends at the fork and can follow the primary.
    Fork { group: String, branch: String, fork_lsn: u64 },
    /// Deletes a group and its whole history. `time_ns` is the leader's
    /// clock when it proposed the command (a retention lock is checked
    /// against it, never against a client's clock).
    DeleteGroup { group: String, time_ns: u64 },
}

impl Command {
    /// Payload bytes the command carries (what dominates its size on the
    /// wire and in the log).
    pub fn payload_bytes(&self) -> usize {
        match self {
            Command::Append(b) => b.payload_bytes(),
            Command::Replicate { events, .. } => events.iter().map(|e| e.event.payload_bytes()).sum(),
            Command::CreateGroup { .. } | Command::DrSet { .. } | Command::Fork { .. } | Command::DeleteGroup { .. } => 0,
        }
    }
}

/// What applying a [`Command`] answered.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum CommandReply {
    /// The group exists now.
    Created,
    /// The batch's events hold LSNs `lsn_first..=lsn_last` of `group`.
    Appended { lsn_first: u64, lsn_last: u64 },
    /// The command was refused by the state machine, deterministically on
    /// every replica (unknown group or disk, write past the end of a disk...).
    Refused { reason: String },
    /// The batch's sequence number skips one the producer has not sent (or
    /// that was lost); the producer must resend from `expected_seq`.
    OutOfOrder { expected_seq: u64 },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Blank,
    Normal(Command),
    Membership(Membership),
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub log_id: LogId,
    pub payload: Payload,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AppendEntriesRequest {
    pub vote: Vote,
    pub prev_log_id: Option<LogId>,
    pub entries: Vec<Entry>,
    pub leader_commit: Option<LogId>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum AppendEntriesResponse {
    Success,
    PartialSuccess(Option<LogId>),
    Conflict,
    HigherVote(Vote),
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VoteRequest {
    pub vote: Vote,
    pub last_log_id: Option<LogId>,
    pub leadership_transfer: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VoteResponse {
    pub vote: Vote,
    pub vote_granted: bool,
    pub last_log_id: Option<LogId>,
}

/// The metadata of a snapshot: what it covers.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub last_log_id: Option<LogId>,
    pub last_membership_log_id: Option<LogId>,
    pub last_membership: Membership,
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::CreateGroup { group, disks, .. } => write!(f, "create-group {group} ({} disks)", disks.len()),
            Command::DrSet { group, record } => {
                write!(f, "dr-set {group}: primary {} epoch {} (this site {})", record.primary, record.epoch, record.local)
            }
            Command::Replicate { group, epoch, events, .. } => write!(
                f,
                "replicate {} events of {group} (epoch {epoch}) from LSN {}",
                events.len(),
                events.first().map_or(0, |e| e.lsn)
            ),
            Command::Fork { group, branch, fork_lsn } => write!(f, "fork {group} after LSN {fork_lsn} into {branch}"),
            Command::DeleteGroup { group, .. } => write!(f, "delete-group {group}"),
            Command::Append(batch) => write!(
                f,
                "append {} events ({} bytes) to {} from client {} seq {}",
                batch.events.len(),
                batch.payload_bytes(),
                batch.group,
                batch.client_id,
                batch.seq
            ),
        }
    }
}
