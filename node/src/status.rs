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
        let groups = shard.reader.groups().map_err(|e| rewind_service::ServiceError::Internal(format!("read groups: {e}")))?;
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
            groups: groups.iter().map(rewind_service::group_state).collect(),
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
