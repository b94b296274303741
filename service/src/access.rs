//! Who may ask a node what. Every certificate of a site carries one role
//! (and a tap's, the groups it may write); the node's shell reads it from
//! the peer's certificate once per connection and asks [`check`] before
//! each request. The rules:
//!
//! * `node`: Raft's own RPCs (append entries, vote, snapshot) and status;
//!   nothing else a client may send;
//! * `admin`: every client request (membership, groups, bookmarks, appends,
//!   reads, status), never a Raft RPC;
//! * `tap`: append, producer state, group state and tap reports, for the
//!   groups its certificate names only;
//! * `reader`: points, resolve, disk reads, group state, events, DR state
//!   and status;
//! * `peer`: another site's nodes on a DR link: DR state, shipping (pulling
//!   the log), group state and status; never a write.
//!
//! The role travels in the certificate as text, `role=tap groups=a,b`
//! ([`Access::to_text`], [`Access::parse`]).

use std::fmt;

use rewind_wire::rpc::Request;

/// A certificate's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Node,
    Admin,
    Tap { groups: Vec<String> },
    Reader,
    Peer,
}

/// Longest role text a certificate may carry.
pub const ACCESS_TEXT_MAX: usize = 16 << 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("role text {0:?}: expected `role=node`, `role=admin`, `role=reader`, `role=peer` or `role=tap groups=A,B`")]
    Shape(String),
    #[error("unknown role {0:?} (roles: node, admin, tap, reader, peer)")]
    UnknownRole(String),
    #[error("a tap's role must name at least one group (`--group`)")]
    TapWithoutGroups,
    #[error("only a tap's role names groups, not {0}'s")]
    GroupsOnNonTap(String),
    #[error("group name {name:?} in a role: {why}")]
    BadGroup { name: String, why: String },
    #[error("role text of {0} bytes is over the limit")]
    TooLong(usize),
}

impl Access {
    pub fn name(&self) -> &'static str {
        match self {
            Access::Node => "node",
            Access::Admin => "admin",
            Access::Tap { .. } => "tap",
            Access::Reader => "reader",
            Access::Peer => "peer",
        }
    }

    /// A role from its name and, for a tap, its groups (as `rewind certs`
    /// takes them).
    pub fn from_parts(role: &str, groups: &[String]) -> Result<Access, AccessError> {
        let access = match role {
            "node" => Access::Node,
            "admin" => Access::Admin,
            "reader" => Access::Reader,
            "peer" => Access::Peer,
            "tap" => Access::Tap { groups: groups.to_vec() },
            other => return Err(AccessError::UnknownRole(other.to_string())),
        };
        match &access {
            Access::Tap { groups } if groups.is_empty() => return Err(AccessError::TapWithoutGroups),
            Access::Tap { groups } => {
                for g in groups {
                    rewind_wire::event::check_name(g).map_err(|e| AccessError::BadGroup { name: g.clone(), why: e.to_string() })?;
                }
            }
            other if !groups.is_empty() => return Err(AccessError::GroupsOnNonTap(other.name().to_string())),
            _ => {}
        }
        Ok(access)
    }

    pub fn to_text(&self) -> String {
        match self {
            Access::Tap { groups } => format!("role=tap groups={}", groups.join(",")),
            other => format!("role={}", other.name()),
        }
    }

    pub fn parse(text: &str) -> Result<Access, AccessError> {
        if text.len() > ACCESS_TEXT_MAX {
            return Err(AccessError::TooLong(text.len()));
        }
        let mut words = text.split(' ');
        let role = words.next().and_then(|w| w.strip_prefix("role=")).ok_or_else(|| AccessError::Shape(text.to_string()))?;
        let groups: Vec<String> = match words.next() {
            None => Vec::new(),
            Some(w) => {
                let list = w.strip_prefix("groups=").ok_or_else(|| AccessError::Shape(text.to_string()))?;
                list.split(',').map(str::to_string).collect()
            }
        };
        if words.next().is_some() {
            return Err(AccessError::Shape(text.to_string()));
        }
        Access::from_parts(role, &groups)
    }

    fn may_touch(&self, group: &str) -> bool {
        match self {
            Access::Tap { groups } => groups.iter().any(|g| g == group),
            _ => true,
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// A request its sender's role does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission denied: role {role} cannot do {what}{why}")]
pub struct Denied {
    pub role: &'static str,
    pub what: String,
    why: String,
}

/// The group a request is about, if it is about one.
fn group_of(request: &Request) -> Option<&str> {
    match request {
        Request::Append { batch } => Some(&batch.group),
        Request::CreateGroup { group, .. }
        | Request::GroupState { group }
        | Request::ReadEvents { group, .. }
        | Request::ProducerState { group, .. }
        | Request::Points { group, .. }
        | Request::Resolve { group, .. }
        | Request::ReadDisk { group, .. }
        | Request::DrState { group, .. }
        | Request::Ship { group, .. }
        | Request::ShipHashed { group, .. }
        | Request::ShipBlocks { group, .. }
        | Request::DrSet { group, .. }
        | Request::DrSwitch { group, .. }
        | Request::DrForkPoint { group }
        | Request::DrFork { group, .. }
        | Request::Backups { group, .. }
        | Request::BlockHashes { group, .. }
        | Request::FindBlocks { group, .. } => Some(group),
        Request::TapReport(r) => Some(&r.group),
        _ => None,
    }
}

/// Whether `access` may send `request`.
pub fn check(access: &Access, request: &Request) -> Result<(), Denied> {
    use Request as R;
    let allowed = match (access, request) {
        (Access::Node, R::RaftAppend { .. } | R::RaftVote { .. } | R::RaftSnapshot { .. } | R::SnapshotChunk { .. } | R::Status) => true,
        (Access::Node, _) => false,
        (Access::Admin, R::RaftAppend { .. } | R::RaftVote { .. } | R::RaftSnapshot { .. } | R::SnapshotChunk { .. }) => false,
        (Access::Admin, _) => true,
        // A backup's importer holds a tap's certificate for its group.
        (Access::Tap { .. }, R::Append { .. } | R::ProducerState { .. } | R::GroupState { .. } | R::TapReport(_) | R::Backups { .. } | R::BlockHashes { .. } | R::FindBlocks { .. }) => true,
        (Access::Tap { .. }, _) => false,
        (
            Access::Reader,
            R::Points { .. }
                | R::Resolve { .. }
                | R::ReadDisk { .. }
                | R::GroupState { .. }
                | R::ReadEvents { .. }
                | R::DrState { .. }
                | R::Status
                | R::Backups { .. }
                | R::BlockHashes { .. }
                | R::FindBlocks { .. },
        ) => true,
        (Access::Reader, _) => false,
        (Access::Peer, R::DrState { .. } | R::Ship { .. } | R::ShipHashed { .. } | R::ShipBlocks { .. } | R::GroupState { .. } | R::Status) => true,
        (Access::Peer, _) => false,
    };
    if !allowed {
        return Err(Denied { role: access.name(), what: request.name().to_string(), why: String::new() });
    }
    if let (Access::Tap { .. }, R::Append { batch }) = (access, request) {
        if batch.events.iter().any(|e| e.event.is_policy()) {
            return Err(Denied { role: access.name(), what: "a retention, lock or pin event".into(), why: " (an admin's)".into() });
        }
    }
    if let Some(group) = group_of(request) {
        if !access.may_touch(group) {
            let Access::Tap { groups } = access else { unreachable!("only a tap is limited to groups") };
            return Err(Denied {
                role: access.name(),
                what: format!("{} on group {group:?}", request.name()),
                why: format!(" (its certificate names the groups {})", groups.join(", ")),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_wire::event::EventBatch;
    use rewind_wire::raft::{LeaderId, Vote, VoteRequest};

    fn vote() -> Request {
        Request::RaftVote { shard: 1, req: VoteRequest { vote: Vote { leader: LeaderId { term: 1, node: 1 }, committed: false }, last_log_id: None, leadership_transfer: false }, pre_vote: false }
    }

    fn append(group: &str) -> Request {
        Request::Append { batch: EventBatch { group: group.into(), client_id: 1, seq: 1, events: vec![] } }
    }

    /// A tap writes its group's data, never what the group keeps: a
    /// stolen tap certificate cannot shorten retention or unpin.
    #[test]
    fn only_an_admin_appends_retention_lock_and_pin_events() {
        use rewind_wire::event::{Event, TimedEvent};
        let tap = Access::Tap { groups: vec!["a".into()] };
        for e in [Event::Retain { keep_ns: 1, keep_bytes: 0 }, Event::Lock { until_ns: 1 }, Event::Pin { name: "m".into(), until_ns: 0 }] {
            let r = Request::Append { batch: EventBatch { group: "a".into(), client_id: 1, seq: 1, events: vec![TimedEvent { time_ns: 1, event: e }] } };
            let denied = check(&tap, &r).unwrap_err();
            assert!(denied.to_string().contains("retention, lock or pin"), "{denied}");
            assert!(check(&Access::Admin, &r).is_ok());
        }
        let mark = Event::Bookmark { name: "m".into(), app_consistent: false };
        let r = Request::Append { batch: EventBatch { group: "a".into(), client_id: 1, seq: 1, events: vec![TimedEvent { time_ns: 1, event: mark }] } };
        assert!(check(&tap, &r).is_ok());
    }

    #[test]
    fn roles_round_trip_as_text() {
        for a in [Access::Node, Access::Admin, Access::Reader, Access::Peer, Access::Tap { groups: vec!["vm1".into(), "db-2".into()] }] {
            assert_eq!(Access::parse(&a.to_text()).unwrap(), a);
        }
        for bad in ["", "role=", "role=root", "role=tap", "role=tap groups=", "role=admin groups=a", "role=node x", "role=tap groups=a b", "groups=a"] {
            assert!(Access::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn each_role_is_held_to_its_requests() {
        let tap = Access::Tap { groups: vec!["a".into()] };
        let e = check(&tap, &vote()).unwrap_err().to_string();
        assert_eq!(e, "permission denied: role tap cannot do raft-vote");
        let e = check(&tap, &append("b")).unwrap_err().to_string();
        assert_eq!(e, "permission denied: role tap cannot do append on group \"b\" (its certificate names the groups a)");
        assert!(check(&tap, &append("a")).is_ok());
        assert!(check(&tap, &Request::ProducerState { group: "a".into(), client_id: 1 }).is_ok());
        assert!(check(&tap, &Request::CreateGroup { group: "a".into(), disks: vec![], time_ns: 0 }).is_err());
        assert!(check(&tap, &Request::Status).is_err());

        assert!(check(&Access::Node, &vote()).is_ok());
        assert!(check(&Access::Node, &append("a")).is_err());
        assert!(check(&Access::Node, &Request::ChangeVoters { voters: vec![1] }).is_err());

        assert!(check(&Access::Admin, &vote()).is_err());
        assert!(check(&Access::Admin, &Request::ChangeVoters { voters: vec![1] }).is_ok());
        assert!(check(&Access::Admin, &append("any")).is_ok());

        let read = Request::ReadDisk { group: "a".into(), disk: "d".into(), lsn: 1, offset: 0, len: 1 };
        assert!(check(&Access::Reader, &read).is_ok());
        assert!(check(&Access::Reader, &append("a")).is_err());
        assert!(check(&Access::Reader, &Request::RemoveLearner { id: 2 }).is_err());
        assert!(check(&Access::Reader, &vote()).is_err());

        // Another site pulls the log and reads DR state; it writes nothing.
        assert!(check(&Access::Peer, &Request::Ship { group: "a".into(), lsn_first: 1 }).is_ok());
        assert!(check(&Access::Peer, &Request::DrState { group: "a".into(), digest_at: None }).is_ok());
        assert!(check(&Access::Peer, &append("a")).is_err());
        assert!(check(&Access::Peer, &read).is_err());
        assert!(check(&Access::Reader, &Request::Ship { group: "a".into(), lsn_first: 1 }).is_err());
        let e = check(&Access::Reader, &Request::DrSet { group: "a".into(), record: record() }).unwrap_err().to_string();
        assert_eq!(e, "permission denied: role reader cannot do dr-set");
        assert!(check(&Access::Admin, &Request::DrSet { group: "a".into(), record: record() }).is_ok());
    }

    fn record() -> rewind_wire::dr::DrRecord {
        rewind_wire::dr::DrRecord {
            local: "a".into(),
            remote: "b".into(),
            primary: "a".into(),
            epoch: 1,
            rpo_alarm_ms: 0, max_rate_bytes: 0,
            link: rewind_wire::dr::SiteLink { addrs: vec!["127.0.0.1:1".into()], ca_pem: String::new(), cert_pem: String::new(), key_pem: String::new() },
        }
    }
}
