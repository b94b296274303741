//! Conversions between openraft's types and their `wire` mirrors. Everything
//! this crate stores, and everything `node` sends, goes through these.

use std::collections::{BTreeMap, BTreeSet};

use openraft::entry::RaftEntry;
use openraft::{BasicNode, EntryPayload};
use rewind_wire::raft as w;

use crate::TypeConfig;

pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type LeaderId = openraft::alias::LeaderIdOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Membership = openraft::Membership<u64, BasicNode>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;

/// A mirror that does not make a valid openraft value.
#[derive(Debug, thiserror::Error)]
#[error("invalid {what}: {why}")]
pub struct CodecError {
    pub what: &'static str,
    pub why: String,
}

pub fn leader_to_wire(l: &LeaderId) -> w::LeaderId {
    w::LeaderId { term: l.term, node: l.node_id }
}

pub fn leader_from_wire(l: &w::LeaderId) -> LeaderId {
    LeaderId { term: l.term, node_id: l.node }
}

pub fn vote_to_wire(v: &Vote) -> w::Vote {
    w::Vote { leader: leader_to_wire(&v.leader_id), committed: v.committed }
}

pub fn vote_from_wire(v: &w::Vote) -> Vote {
    Vote { leader_id: leader_from_wire(&v.leader), committed: v.committed }
}

pub fn log_id_to_wire(l: &LogId) -> w::LogId {
    w::LogId { leader: leader_to_wire(&l.leader_id), index: l.index }
}

pub fn log_id_from_wire(l: &w::LogId) -> LogId {
    LogId { leader_id: leader_from_wire(&l.leader), index: l.index }
}

pub fn opt_log_id_to_wire(l: &Option<LogId>) -> Option<w::LogId> {
    l.as_ref().map(log_id_to_wire)
}

pub fn opt_log_id_from_wire(l: &Option<w::LogId>) -> Option<LogId> {
    l.as_ref().map(log_id_from_wire)
}

pub fn membership_to_wire(m: &Membership) -> w::Membership {
    w::Membership {
        configs: m.get_joint_config().iter().map(|c| c.iter().copied().collect()).collect(),
        nodes: m.nodes().map(|(id, n)| w::Member { id: *id, addr: n.addr.clone() }).collect(),
    }
}

pub fn membership_from_wire(m: &w::Membership) -> Result<Membership, CodecError> {
    let configs: Vec<BTreeSet<u64>> = m.configs.iter().map(|c| c.iter().copied().collect()).collect();
    let nodes: BTreeMap<u64, BasicNode> =
        m.nodes.iter().map(|n| (n.id, BasicNode { addr: n.addr.clone() })).collect();
    Membership::new(configs, nodes).map_err(|e| CodecError { what: "membership", why: e.to_string() })
}

pub fn entry_to_wire(e: &Entry) -> w::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => w::Payload::Blank,
        EntryPayload::Normal(c) => w::Payload::Normal(c.clone()),
        EntryPayload::Membership(m) => w::Payload::Membership(membership_to_wire(m)),
    };
    w::Entry { log_id: log_id_to_wire(&e.log_id), payload }
}

pub fn entry_from_wire(e: w::Entry) -> Result<Entry, CodecError> {
    let log_id = log_id_from_wire(&e.log_id);
    Ok(match e.payload {
        w::Payload::Blank => Entry::new_blank(log_id),
        w::Payload::Normal(c) => Entry::new_normal(log_id, c),
        w::Payload::Membership(m) => Entry::new_membership(log_id, membership_from_wire(&m)?),
    })
}

pub fn snapshot_meta_to_wire(m: &SnapshotMeta) -> w::SnapshotMeta {
    w::SnapshotMeta {
        last_log_id: opt_log_id_to_wire(&m.last_log_id),
        last_membership_log_id: opt_log_id_to_wire(m.last_membership.log_id()),
        last_membership: membership_to_wire(m.last_membership.membership()),
    }
}

pub fn snapshot_meta_from_wire(m: &w::SnapshotMeta) -> Result<SnapshotMeta, CodecError> {
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from_wire(&m.last_log_id),
        last_membership: StoredMembership::new(
            opt_log_id_from_wire(&m.last_membership_log_id),
            membership_from_wire(&m.last_membership)?,
        ),
    })
}
