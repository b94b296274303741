//! Cross-site DR's rules as the state machine applies them, pure like
//! `apply.rs` (which re-exports them): who may take appends, how a group's
//! DR state may change (epochs never go back), when a failback may fork,
//! and how the primary's events are taken under their own LSNs.

use rewind_wire::dr::DrRecord;
use rewind_wire::event::Event;

use crate::apply::{chain, BranchRecord, GroupRecord, Policy, StoredEvent};

/// Refuses an append to a group this site holds as the secondary copy.
pub fn check_writable(group: &str, dr: Option<&DrRecord>) -> Result<(), String> {
    if crate::bug("fence-ignored") {
        return Ok(());
    }
    match dr {
        Some(d) if !d.is_primary() => Err(format!(
            "group {group:?} is fenced at site {:?}: site {:?} is its primary since epoch {}; write at site {:?}",
            d.local, d.primary, d.epoch, d.primary
        )),
        _ => Ok(()),
    }
}

/// Checks a `DrSet` against the group's stored DR state: epochs never go
/// back, one epoch has one primary, and a site keeps its name.
pub fn dr_set(group: &str, exists: bool, stored: Option<&DrRecord>, record: &DrRecord) -> Result<(), String> {
    if !exists {
        return Err(format!("no consistency group {group:?}"));
    }
    record.check().map_err(|e| e.to_string())?;
    let Some(s) = stored else { return Ok(()) };
    if s.local != record.local {
        return Err(format!("group {group:?} is linked as site {:?} here, not {:?}", s.local, record.local));
    }
    if record.epoch < s.epoch {
        return Err(format!("epoch {} is older than group {group:?}'s epoch {} (primary {:?})", record.epoch, s.epoch, s.primary));
    }
    if record.epoch == s.epoch && record.primary != s.primary {
        return Err(format!("epoch {} of group {group:?} already has site {:?} as its primary; a new primary needs a new epoch", s.epoch, s.primary));
    }
    Ok(())
}

/// Checks a failback step (`Command::Fork`): the site must have lost its
/// primary role, the fork be within the log, and the branch be new or this
/// fork's own (`branch`: its record if it exists; `branch_named`: a group
/// of that name exists).
pub fn fork_check(group: &GroupRecord, dr: Option<&DrRecord>, branch_name: &str, branch: Option<&BranchRecord>, branch_named: bool, fork_lsn: u64, window_first: u64) -> Result<(), String> {
    let name = &group.name;
    // The events after the fork move to the branch; those before the
    // window may be freed already (and a collector step planned over
    // them must never meet new events at their LSNs).
    if fork_lsn + 1 < window_first {
        return Err(format!(
            "group {name:?} keeps history from LSN {window_first} on; the events after the fork (LSN {}..) before that are freed by its retention, so they cannot be kept as a branch",
            fork_lsn + 1
        ));
    }
    let dr = dr.ok_or_else(|| format!("group {name:?} is not linked to another site: there is nothing to fail back"))?;
    if dr.is_primary() {
        return Err(format!(
            "site {:?} is the primary of group {name:?} (epoch {}): failback is for the old primary, once it has heard of a failover at site {:?}",
            dr.local, dr.epoch, dr.remote
        ));
    }
    rewind_wire::event::check_name(branch_name).map_err(|e| format!("branch name: {e}"))?;
    match branch {
        Some(b) if b.base != *name || b.base_lsn != fork_lsn => Err(format!(
            "group {branch_name:?} is the branch of group {:?} forked after LSN {}, not of {name:?} after LSN {fork_lsn}",
            b.base, b.base_lsn
        )),
        Some(_) => Ok(()),
        None if branch_named => Err(format!("a group named {branch_name:?} exists already; name the branch otherwise")),
        None if fork_lsn >= group.last_lsn => Err(format!("group {name:?} ends at LSN {}: it holds nothing after LSN {fork_lsn} to keep", group.last_lsn)),
        None => Ok(()),
    }
}

/// Refuses writes to a branch: it is kept as it was, for forensics.
pub fn check_not_branch(group: &str, branch: Option<&BranchRecord>) -> Result<(), String> {
    match branch {
        Some(b) => Err(format!("group {group:?} is a branch of group {:?}, kept from after LSN {} when it failed back; it is read-only", b.base, b.base_lsn)),
        None => Ok(()),
    }
}

/// Applies events the primary site committed to this site's copy: those
/// it holds already are skipped; the rest must follow its last LSN, keep
/// their times, and bring the chain to `digest`, or nothing is applied.
/// Returns the new events with their records; `group` is advanced.
pub fn apply_replicated(
    group: &mut GroupRecord,
    dr: Option<&DrRecord>,
    epoch: u64,
    events: &[StoredEvent],
    digest: &[u8; 32],
    policy: &mut Policy,
) -> Result<Vec<(StoredEvent, Vec<u8>)>, String> {
    let name = group.name.clone();
    let dr = dr.ok_or_else(|| format!("group {name:?} is not linked to another site"))?;
    if dr.is_primary() {
        return Err(format!("site {:?} is the primary of group {name:?} (epoch {}); it takes no replicated events", dr.local, dr.epoch));
    }
    if epoch != dr.epoch {
        return Err(format!("a shipment of epoch {epoch} for group {name:?}, which is at epoch {} here", dr.epoch));
    }
    if events.len() > rewind_wire::limits::SHIP_EVENTS_MAX {
        return Err(format!("a shipment of {} events; {} at most", events.len(), rewind_wire::limits::SHIP_EVENTS_MAX));
    }
    let mut next = group.clone();
    let mut retention = policy.retention.clone();
    let mut marks = policy.marks.clone();
    let mut backups = policy.backups.clone();
    let mut out = Vec::new();
    for e in events.iter().filter(|e| e.lsn > group.last_lsn) {
        if e.lsn != next.last_lsn + 1 {
            return Err(format!("a shipment of group {name:?} skips from LSN {} to {}", next.last_lsn, e.lsn));
        }
        if e.time_ns < next.last_time_ns {
            return Err(format!("LSN {} of group {name:?} goes back in time", e.lsn));
        }
        next.check_replicated(&e.event).map_err(|why| format!("LSN {} of group {name:?}: {why}", e.lsn))?;
        match &e.event {
            Event::Bookmark { name: mark, .. } => {
                marks.insert(mark.clone(), e.lsn);
            }
            p if p.is_policy() => {
                crate::retention::apply_policy(&mut retention, &name, p, e.time_ns, &marks).map_err(|why| format!("LSN {} of group {name:?}: {why}", e.lsn))?
            }
            _ => {}
        }
        crate::backups::apply_event(&mut backups, &name, None, e.lsn, e.time_ns, &e.event).map_err(|why| format!("LSN {} of group {name:?}: {why}", e.lsn))?;
        crate::apply::check_copy_window(&retention, &name, &e.event).map_err(|why| format!("LSN {} of group {name:?}: {why}", e.lsn))?;
        next.absorb(&e.event);
        next.last_lsn = e.lsn;
        next.last_time_ns = e.time_ns;
        let record = rewind_wire::frame::encode_record(e).map_err(|err| format!("LSN {}: {err}", e.lsn))?;
        next.digest = chain(&next.digest, &record);
        next.events += 1;
        next.payload_bytes += e.event.payload_bytes() as u64;
        out.push((e.clone(), record));
    }
    if !out.is_empty() && &next.digest != digest {
        return Err(format!(
            "group {name:?} diverged from its primary: the chains differ at LSN {} (here {}, at the primary {})",
            next.last_lsn,
            blake3::Hash::from_bytes(next.digest).to_hex(),
            blake3::Hash::from_bytes(*digest).to_hex()
        ));
    }
    *group = next;
    policy.retention = retention;
    policy.backups = backups;
    Ok(out)
}
