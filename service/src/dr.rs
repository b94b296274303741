//! Cross-site DR's reads and decisions over any replica's applied state
//! ([`ReadState`]), shared by the node's DR loop and the simulation: a
//! group's DR state and head, the shipment a secondary pulls, and what one
//! round of a link does given both sites' states ([`next_step`]).
//!
//! Invariants kept here:
//! * a shipment holds committed events only (the caller reads on the
//!   leader after a read index), in LSN order from the asked LSN, with the
//!   chain digest after the last of them;
//! * a site adopts a higher epoch it sees at its peer, and never lowers
//!   its own; it pulls only from the primary of its own epoch, or drains a
//!   peer that handed the group to it;
//! * a secondary whose chain does not continue at the primary stops
//!   pulling and says so (its events after the fork need a failback).

use rewind_raft_store::ReadState;
use rewind_wire::dr::{DrInfo, DrRecord, Shipment};

use crate::{no_group, ServiceError};

fn hex(d: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*d).to_hex().to_string()
}

/// A group's DR state and head on this replica; with `digest_at`, also the
/// chain digest at that LSN. `peer` is left empty (the shell knows it).
pub fn dr_info<R: ReadState>(r: &R, group: &str, digest_at: Option<u64>) -> Result<DrInfo, ServiceError> {
    let io = |e: std::io::Error| ServiceError::Internal(e.to_string());
    let g = r.group(group).map_err(io)?.ok_or_else(|| no_group(group))?;
    let dr = r.dr(group).map_err(io)?;
    let last_time_ns = if g.last_lsn == 0 { 0 } else { r.time_of(group, g.last_lsn).map_err(io)?.unwrap_or(g.last_time_ns) };
    let digest_at_hex = match digest_at {
        Some(lsn) if lsn <= g.last_lsn => r.digest_at(group, lsn).map_err(io)?.map(|d| hex(&d)),
        _ => None,
    };
    Ok(DrInfo {
        group: group.to_string(),
        local: dr.as_ref().map(|d| d.local.clone()),
        remote: dr.as_ref().map(|d| d.remote.clone()),
        primary: dr.as_ref().map(|d| d.primary.clone()),
        epoch: dr.as_ref().map_or(0, |d| d.epoch),
        rpo_alarm_ms: dr.as_ref().map_or(0, |d| d.rpo_alarm_ms),
        last_lsn: g.last_lsn,
        last_time_ns,
        first_time_ns: if g.last_lsn == 0 { 0 } else { r.time_of(group, 1).map_err(io)?.unwrap_or(0) },
        payload_bytes: g.payload_bytes,
        digest_hex: hex(&g.digest),
        digest_at_hex,
        peer: None,
    })
}

/// The group's events from `lsn_first` on (bounded by `SHIP_EVENTS_MAX`
/// and `SHIP_BYTES_MAX`), for the other site, with the chain digest after
/// the last of them.
pub fn shipment<R: ReadState>(r: &R, group: &str, lsn_first: u64) -> Result<Shipment, ServiceError> {
    use rewind_wire::limits::{SHIP_BYTES_MAX, SHIP_EVENTS_MAX};
    let io = |e: std::io::Error| ServiceError::Internal(e.to_string());
    if lsn_first == 0 {
        return Err(ServiceError::BadRequest("LSNs start at 1".into()));
    }
    let g = r.group(group).map_err(io)?.ok_or_else(|| no_group(group))?;
    let dr = r.dr(group).map_err(io)?.ok_or_else(|| ServiceError::Refused(format!("group {group:?} is not linked to another site")))?;
    if lsn_first > g.last_lsn + 1 {
        return Err(ServiceError::Refused(format!(
            "group {group:?} ends at LSN {} at site {:?}; a copy that asks from LSN {lsn_first} holds events this site does not (the histories diverged)",
            g.last_lsn, dr.local
        )));
    }
    let first = r.retention(group).map_err(io)?.first();
    if lsn_first < first {
        return Err(ServiceError::Refused(format!(
            "the copy of group {group:?} asks from LSN {lsn_first}, but the retention policy at site {:?} released the history before LSN {first}: the copy cannot catch up; give the group a longer retention and link it again",
            dr.local
        )));
    }
    let events = if lsn_first > g.last_lsn { Vec::new() } else { r.events(group, lsn_first, SHIP_EVENTS_MAX, SHIP_BYTES_MAX).map_err(io)? };
    let upto = events.last().map_or(lsn_first - 1, |e| e.lsn);
    let digest = r
        .digest_at(group, upto)
        .map_err(io)?
        .ok_or_else(|| ServiceError::Refused(format!("group {group:?} has no chain digest for LSN {upto} here (written before this build kept them)")))?;
    Ok(Shipment { events, digest, epoch: dr.epoch, primary: dr.primary, last_lsn: g.last_lsn })
}

/// What one round of a link does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now.
    Idle,
    /// Take the peer's higher epoch and its primary (this record).
    Adopt(DrRecord),
    /// Pull the peer's events from this LSN on.
    Pull { lsn_first: u64 },
    /// This site's history does not continue at the primary: stop.
    Diverged(String),
}

/// The next step of the link of `record` (this site's), from this site's
/// state `mine` and the peer's `theirs` (asked with `digest_at` = this
/// site's last LSN).
pub fn next_step(record: &DrRecord, mine: &DrInfo, theirs: &DrInfo) -> Step {
    let group = &mine.group;
    if theirs.epoch > record.epoch {
        let Some(primary) = theirs.primary.clone() else { return Step::Idle };
        if primary == record.local && theirs.last_lsn > mine.last_lsn {
            // Handed over to this site (a switchover): take the peer's last
            // events first, under the epoch they were written in.
            return Step::Pull { lsn_first: mine.last_lsn + 1 };
        }
        return Step::Adopt(DrRecord { primary, epoch: theirs.epoch, ..record.clone() });
    }
    if record.is_primary() || theirs.epoch < record.epoch || theirs.primary.as_deref() != Some(&record.primary) {
        return Step::Idle;
    }
    let agree = theirs.digest_at_hex.as_ref().map(|d| *d == mine.digest_hex);
    if mine.last_lsn > theirs.last_lsn || agree == Some(false) {
        return Step::Diverged(format!(
            "group {group:?} diverged: this site holds LSN 1..={} and its chain does not continue at site {:?} (LSN 1..={}); \
             run `rewind failback {group}` here to keep this site's own events as a branch and follow the primary",
            mine.last_lsn, record.primary, theirs.last_lsn
        ));
    }
    if theirs.last_lsn == mine.last_lsn {
        return Step::Idle;
    }
    Step::Pull { lsn_first: mine.last_lsn + 1 }
}

/// The fork point of two histories by bisection over chain digests: the
/// last LSN both hold with the same digest. Digests agree up to the fork
/// and never after it (each covers every event before it). Start with the
/// lower of the two heads; feed it `answer` for each `probe`.
#[derive(Debug, Clone)]
pub struct ForkSearch {
    /// Known to agree (LSN 0 always does).
    agree: u64,
    /// Known to differ, or one past the lower head.
    differ: u64,
}

impl ForkSearch {
    pub fn new(lower_head: u64) -> ForkSearch {
        ForkSearch { agree: 0, differ: lower_head + 1 }
    }

    /// The next LSN to compare, or None when the fork is found.
    pub fn probe(&self) -> Option<u64> {
        (self.differ - self.agree > 1).then(|| self.agree + (self.differ - self.agree) / 2)
    }

    pub fn answer(&mut self, lsn: u64, agree: bool) {
        if agree {
            self.agree = self.agree.max(lsn);
        } else {
            self.differ = self.differ.min(lsn);
        }
    }

    pub fn fork(&self) -> u64 {
        #[cfg(feature = "simulation-bugs")]
        if crate::bugs::FORK_ONE_LATE.load(std::sync::atomic::Ordering::Relaxed) {
            return self.agree + 1;
        }
        self.agree
    }
}

/// The name of the branch a failback keeps a group's own events in.
pub fn branch_name(group: &str, epoch: u64) -> String {
    let suffix = format!(".branch-e{epoch}");
    let keep = rewind_wire::limits::NAME_BYTES_MAX.saturating_sub(suffix.len()).min(group.len());
    format!("{}{suffix}", &group[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_finds_the_last_shared_lsn() {
        for head in 0..40u64 {
            for fork in 0..=head {
                let mut s = ForkSearch::new(head);
                let mut probes = 0;
                while let Some(p) = s.probe() {
                    s.answer(p, p <= fork);
                    probes += 1;
                }
                assert_eq!(s.fork(), fork, "head {head}");
                assert!(probes <= 7);
            }
        }
        assert_eq!(branch_name("vm1", 2), "vm1.branch-e2");
        assert_eq!(branch_name(&"x".repeat(64), 12).len(), 64);
    }
}
