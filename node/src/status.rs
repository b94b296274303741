//! What `rewind status` reports, built from Raft's metrics and the store.

use openraft::async_runtime::WatchReceiver;
use rewind_wire::raft::Member;
use rewind_wire::rpc::{NodeStatus, Role, ShardStatus, TapStatus};

use crate::server::Node;

pub async fn node_status(node: &Node) -> Result<NodeStatus, rewind_service::ServiceError> {
    let mut shards = Vec::new();
    for (id, shard) in &node.shards {
        let m = shard.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership().clone();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let members = membership.nodes().map(|(id, n)| Member { id: *id, addr: n.addr.clone() }).collect();
        let internal = |e: std::io::Error| rewind_service::ServiceError::Internal(format!("read groups: {e}"));
        let mut groups = Vec::new();
        for g in shard.reader.groups().map_err(internal)? {
            let info = rewind_service::retention_info(&g, &shard.reader.retention(&g.name).map_err(internal)?, &shard.reader.gc(&g.name).map_err(internal)?);
            groups.push((g, info));
        }
        shards.push(ShardStatus {
            shard: *id,
            role: match m.state {
                openraft::ServerState::Leader => Role::Leader,
                openraft::ServerState::Candidate => Role::Candidate,
                openraft::ServerState::Follower => Role::Follower,
                openraft::ServerState::Learner => Role::Learner,
                openraft::ServerState::Shutdown => Role::ShuttingDown,
            },
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            committed_index: m.cluster_committed.map(|l| l.index),
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters,
            learners,
            members,
            groups_omitted: (groups.len() - bounded_groups(&groups).len()) as u64,
            groups: bounded_groups(&groups),
        });
    }
    let taps = node
        .taps
        .lock()
        .expect("taps lock")
        .values()
        .filter(|(_, at)| at.elapsed() < crate::server::TAP_REPORT_KEPT)
        .map(|(report, at)| TapStatus { report: report.clone(), age_ms: at.elapsed().as_millis() as u64 })
        .collect();
    Ok(NodeStatus { id: node.id, addr: node.addr.clone(), pid: std::process::id(), shards, taps })
}

/// As many group states as fit `STATUS_GROUPS_BYTES_MAX` (by a generous
/// estimate of their encoded size), so a status reply always fits a frame.
pub fn bounded_groups(groups: &[(rewind_raft_store::apply::GroupRecord, rewind_wire::rpc::RetentionInfo)]) -> Vec<rewind_wire::rpc::GroupState> {
    let mut bytes = 0usize;
    let mut out = Vec::new();
    for (g, info) in groups {
        let state = rewind_service::group_state(g, info.clone());
        // Names, the digest, and each disk's name and numbers, with room
        // for the archive's own headers.
        let size = 256 + state.name.len() + state.digest_hex.len() + state.disks.iter().map(|d| 64 + d.name.len()).sum::<usize>();
        if bytes + size > rewind_wire::limits::STATUS_GROUPS_BYTES_MAX {
            break;
        }
        bytes += size;
        out.push(state);
    }
    out
}

#[cfg(test)]
mod tests {
    use rewind_raft_store::apply::GroupRecord;
    use rewind_wire::rpc::{DiskSpec, NodeStatus, ShardStatus, Role};

    /// Thousands of groups with 256 disks each: the status reply keeps as
    /// many as fit and still encodes as one frame.
    #[test]
    fn a_status_of_many_groups_fits_one_frame() {
        let disks: Vec<DiskSpec> = (0..256).map(|i| DiskSpec { name: format!("disk-with-a-long-name-{i:04}"), size_bytes: 1 << 30, sector_bytes: 512 }).collect();
        let groups: Vec<(GroupRecord, rewind_wire::rpc::RetentionInfo)> =
            (0..1500).map(|i| (GroupRecord::new(&format!("group-{i:05}"), &disks), Default::default())).collect();
        let kept = super::bounded_groups(&groups);
        assert!(!kept.is_empty() && kept.len() < groups.len(), "{} of {}", kept.len(), groups.len());
        let shard = ShardStatus {
            shard: 1,
            role: Role::Leader,
            term: 1,
            leader: Some(1),
            last_log_index: None,
            committed_index: None,
            applied_index: None,
            snapshot_index: None,
            purged_index: None,
            voters: vec![1],
            learners: vec![],
            members: vec![],
            groups_omitted: (groups.len() - kept.len()) as u64,
            groups: kept,
        };
        let status = NodeStatus { id: 1, addr: "127.0.0.1:1".into(), pid: 1, shards: vec![shard], taps: vec![] };
        let frame = rewind_wire::frame::encode_frame(&rewind_wire::rpc::Response::Status(status)).expect("one frame");
        assert!(frame.len() <= rewind_wire::limits::FRAME_BODY_BYTES_MAX + 64);
    }
}
