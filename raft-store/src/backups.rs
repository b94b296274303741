//! Backups as transactions in a group's log: the pure rules.
//!
//! A backup of a disk begins (`BackupBegin`), carries its data as ordinary
//! `Write`, `WriteZeroes` and `Revert` events on that disk, and ends with
//! `BackupCommit` (a restore point) or `BackupAbort`. While it is open:
//! * only the producer that began it (or took it over to resume it) may
//!   change the disk, so its window holds nothing but the backup's data;
//! * a point inside the window reads the disk as of the backup's start
//!   ([`read_lsn`]): a half-imported backup is never visible;
//! * the retention window does not pass its start ([`hold`]), so that
//!   start stays readable, and an abort can revert to it.
//!
//! An abort's importer reverts the disk to the backup's start (`Revert`
//! events) before it appends `BackupAbort`, so the points after the abort
//! read as before the backup. The records here are checked and changed
//! identically on every replica.

use std::collections::BTreeMap;

use rewind_wire::event::Event;
use rewind_wire::rpc::{BackupInfo, BackupState};
use rkyv::{Archive, Deserialize, Serialize};

/// One backup as the store keeps it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BackupRecord {
    pub info: BackupInfo,
    /// The producer (client id) that may write the disk while it is open
    /// (0: any; a backup a secondary site received from its primary).
    pub owner: u64,
}

/// The backups a batch's events check against and change: every open
/// backup of the group, and each backup the events name (begin, base,
/// commit or abort), when the group has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backups {
    pub records: BTreeMap<String, BackupRecord>,
    /// Names of records this batch changed (to be written).
    pub changed: Vec<String>,
}

impl Backups {
    /// The open backup of `disk`, if there is one.
    pub fn open_on(&self, disk: &str) -> Option<&BackupRecord> {
        self.records.values().find(|r| r.info.state == BackupState::Open && r.info.disk == disk)
    }

    fn put(&mut self, r: BackupRecord) {
        if !self.changed.contains(&r.info.name) {
            self.changed.push(r.info.name.clone());
        }
        self.records.insert(r.info.name.clone(), r);
    }

    /// The names a batch's events refer to: what the store loads besides
    /// the open backups.
    pub fn names_in<'a>(events: impl Iterator<Item = &'a Event>) -> Vec<String> {
        let mut names = Vec::new();
        for e in events {
            match e {
                Event::BackupBegin { backup, base, .. } => {
                    names.push(backup.clone());
                    names.extend(base.iter().cloned());
                }
                Event::BackupCommit { backup, .. } | Event::BackupAbort { backup } => names.push(backup.clone()),
                _ => {}
            }
        }
        names
    }
}

/// The disk an event changes the bytes or the size of, if any.
fn changes_disk(event: &Event) -> Option<&str> {
    match event {
        Event::Write { disk, .. }
        | Event::WriteZeroes { disk, .. }
        | Event::Trim { disk, .. }
        | Event::Revert { disk, .. }
        | Event::Copy { disk, .. }
        | Event::DiskResize { disk, .. } => Some(disk),
        _ => None,
    }
}

/// Checks and applies one event at (`lsn`, `time_ns`) to the backups.
/// `client`: the producer that sent it, or None for an event replicated
/// from the primary site (which checked it already).
pub fn apply_event(b: &mut Backups, group: &str, client: Option<u64>, lsn: u64, time_ns: u64, event: &Event) -> Result<(), String> {
    if let (Some(disk), Some(c)) = (changes_disk(event), client) {
        if let Some(open) = b.open_on(disk) {
            if open.owner != 0 && open.owner != c && !crate::bug("backup-admits-other-writers") {
                return Err(format!(
                    "disk {disk:?} of group {group:?} is taking backup {:?} (open since LSN {}); only its importer writes the disk until it commits or aborts",
                    open.info.name, open.info.begin_lsn
                ));
            }
        }
    }
    match event {
        Event::BackupBegin { backup, disk, base } => {
            if let Some(r) = b.records.get(backup) {
                return match r.info.state {
                    BackupState::Open if &r.info.disk == disk && &r.info.base == base => {
                        // Taken over: a resumed import continues it.
                        let mut r = r.clone();
                        r.owner = client.unwrap_or(0);
                        b.put(r);
                        Ok(())
                    }
                    BackupState::Open => Err(format!("backup {backup:?} of group {group:?} is open on disk {:?} with base {:?}; resume it as it began", r.info.disk, r.info.base)),
                    BackupState::Committed | BackupState::Aborted => Err(format!("group {group:?} already has a backup named {backup:?}")),
                };
            }
            if let Some(open) = b.open_on(disk) {
                return Err(format!(
                    "disk {disk:?} of group {group:?} has backup {:?} open (since LSN {}): resume it (rewind backup --resume) or abort it (rewind backup --abort) first",
                    open.info.name, open.info.begin_lsn
                ));
            }
            if let Some(base) = base {
                match b.records.get(base) {
                    Some(p) if p.info.state == BackupState::Committed && &p.info.disk == disk => {}
                    Some(p) if p.info.state != BackupState::Committed => {
                        return Err(format!("base backup {base:?} of group {group:?} is not committed, so it is no restore point to build on"))
                    }
                    Some(p) => return Err(format!("base backup {base:?} is of disk {:?}, not {disk:?}", p.info.disk)),
                    None => return Err(format!("group {group:?} has no backup {base:?} to be incremental to")),
                }
            }
            b.put(BackupRecord {
                info: BackupInfo {
                    name: backup.clone(),
                    disk: disk.clone(),
                    base: base.clone(),
                    state: BackupState::Open,
                    begin_lsn: lsn,
                    begin_time_ns: time_ns,
                    end_lsn: 0,
                    end_time_ns: 0,
                    extents: 0,
                    bytes: 0,
                    digest: Vec::new(),
                },
                owner: client.unwrap_or(0),
            });
            Ok(())
        }
        Event::BackupCommit { backup, extents, bytes, digest } => {
            let mut r = open_record(b, group, backup, client)?;
            r.info.state = BackupState::Committed;
            (r.info.end_lsn, r.info.end_time_ns) = (lsn, time_ns);
            (r.info.extents, r.info.bytes, r.info.digest) = (*extents, *bytes, digest.clone());
            b.put(r);
            Ok(())
        }
        Event::BackupAbort { backup } => {
            let mut r = open_record(b, group, backup, client)?;
            r.info.state = BackupState::Aborted;
            (r.info.end_lsn, r.info.end_time_ns) = (lsn, time_ns);
            b.put(r);
            Ok(())
        }
        _ => Ok(()),
    }
}

fn open_record(b: &Backups, group: &str, backup: &str, client: Option<u64>) -> Result<BackupRecord, String> {
    let r = b.records.get(backup).ok_or_else(|| format!("group {group:?} has no backup {backup:?}"))?;
    if r.info.state != BackupState::Open {
        return Err(format!("backup {backup:?} of group {group:?} is {} already", state_word(r.info.state)));
    }
    if let Some(c) = client {
        if r.owner != 0 && r.owner != c {
            return Err(format!("backup {backup:?} of group {group:?} was taken over by another importer"));
        }
    }
    Ok(r.clone())
}

pub fn state_word(s: BackupState) -> &'static str {
    match s {
        BackupState::Open => "open",
        BackupState::Committed => "committed",
        BackupState::Aborted => "aborted",
    }
}

/// The LSN at which `disk` is read for a point at `lsn`: a point inside
/// a backup of the disk (after its begin, before its commit or abort)
/// reads the disk as of the backup's start.
pub fn read_lsn(backups: &[BackupInfo], disk: &str, lsn: u64) -> u64 {
    if crate::bug("backup-half-visible") {
        return lsn;
    }
    backups
        .iter()
        .filter(|b| b.disk == disk && b.begin_lsn < lsn && (b.state == BackupState::Open || lsn < b.end_lsn))
        .map(|b| b.begin_lsn)
        .min()
        .unwrap_or(lsn)
}

/// The furthest the retention window's start may move: the start of the
/// oldest open backup (u64::MAX when none is open).
pub fn hold(b: &Backups) -> u64 {
    b.records.values().filter(|r| r.info.state == BackupState::Open).map(|r| r.info.begin_lsn).min().unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(name: &str, disk: &str, base: Option<&str>) -> Event {
        Event::BackupBegin { backup: name.into(), disk: disk.into(), base: base.map(String::from) }
    }

    fn commit(name: &str) -> Event {
        Event::BackupCommit { backup: name.into(), extents: 1, bytes: 4096, digest: vec![0; 32] }
    }

    fn write(disk: &str) -> Event {
        Event::Write { disk: disk.into(), offset: 0, data: vec![1; 4096] }
    }

    #[test]
    fn a_backup_owns_its_disk_until_it_commits() {
        let mut b = Backups::default();
        apply_event(&mut b, "g", Some(7), 10, 1, &begin("full", "d", None)).unwrap();
        apply_event(&mut b, "g", Some(7), 11, 1, &write("d")).unwrap();
        let e = apply_event(&mut b, "g", Some(8), 12, 1, &write("d")).unwrap_err();
        assert!(e.contains("taking backup \"full\""), "{e}");
        apply_event(&mut b, "g", Some(8), 12, 1, &write("other")).unwrap();
        assert!(apply_event(&mut b, "g", Some(8), 12, 1, &begin("b2", "d", None)).unwrap_err().contains("resume it"));
        assert_eq!(hold(&b), 10);
        // Taken over by a resumed import, then committed by it.
        apply_event(&mut b, "g", Some(9), 13, 1, &begin("full", "d", None)).unwrap();
        assert!(apply_event(&mut b, "g", Some(7), 14, 1, &commit("full")).unwrap_err().contains("taken over"));
        apply_event(&mut b, "g", Some(9), 14, 2, &commit("full")).unwrap();
        assert_eq!(hold(&b), u64::MAX);
        apply_event(&mut b, "g", Some(8), 15, 2, &write("d")).unwrap();
        assert!(apply_event(&mut b, "g", Some(8), 16, 2, &commit("full")).unwrap_err().contains("committed already"));
        assert!(apply_event(&mut b, "g", Some(8), 16, 2, &begin("full", "d", None)).unwrap_err().contains("already has"));
        // Incrementals name a committed base of the same disk.
        assert!(apply_event(&mut b, "g", Some(8), 16, 2, &begin("i1", "d", Some("nope"))).unwrap_err().contains("no backup"));
        assert!(apply_event(&mut b, "g", Some(8), 16, 2, &begin("i1", "e", Some("full"))).unwrap_err().contains("not \"e\""));
        apply_event(&mut b, "g", Some(8), 16, 3, &begin("i1", "d", Some("full"))).unwrap();
        assert!(apply_event(&mut b, "g", Some(8), 17, 3, &begin("i2", "d", Some("i1"))).is_err());
        apply_event(&mut b, "g", Some(8), 17, 3, &Event::BackupAbort { backup: "i1".into() }).unwrap();
        assert!(apply_event(&mut b, "g", Some(8), 18, 3, &begin("i2", "d", Some("i1"))).unwrap_err().contains("not committed"));
        let infos: Vec<BackupInfo> = b.records.values().map(|r| r.info.clone()).collect();
        // Points inside a backup read the disk as of its start.
        for (lsn, want) in [(10, 10), (11, 10), (13, 10), (14, 14), (15, 15), (16, 16), (17, 17), (18, 18)] {
            assert_eq!(read_lsn(&infos, "d", lsn), want, "LSN {lsn}");
        }
        assert_eq!(read_lsn(&infos, "other", 12), 12);
    }

    #[test]
    fn replicated_events_skip_the_owner_check() {
        let mut b = Backups::default();
        apply_event(&mut b, "g", None, 1, 1, &begin("full", "d", None)).unwrap();
        apply_event(&mut b, "g", None, 2, 1, &write("d")).unwrap();
        apply_event(&mut b, "g", Some(3), 3, 1, &write("d")).unwrap();
        apply_event(&mut b, "g", None, 4, 1, &commit("full")).unwrap();
        assert_eq!(b.changed, vec!["full".to_string()]);
    }
}
