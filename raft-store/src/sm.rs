//! openraft's state machine: the RocksDB adapter around [`crate::apply`].

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use rewind_wire::frame::{decode_record, encode_record};
use rewind_wire::raft::{Command, CommandReply};
use rocksdb::{WriteBatch, DB};

use crate::apply::{
    apply_batch, apply_replicated, check_not_branch, check_writable, create_group, dr_set, fork_check, BatchOutcome, BranchRecord, GroupRecord, Policy,
    ProducerRecord, StoredEvent,
};
use crate::retention::{advance_window, delete_check, RetentionRecord};
use rewind_wire::dr::DrRecord;
use crate::codec::{self, LogId, SnapshotMeta, StoredMembership};
use crate::blocks::{index_event, IndexPut};
use crate::content::content_key;
use crate::db::{
    block_key, cf, chain_value, chain_value_of, decode_opt, event_key, extent_key, group_prefix, mark_key, mark_value, prefix_end, producer_key, time_key,
    BlockReader, Overlay, CF_BLOCKS, CF_BRANCHES, CF_CONTENT, CF_CHAIN, CF_DR, CF_EVENTS, CF_EXTENTS, CF_GC, CF_GROUPS, CF_MARKS, CF_PRODUCERS, CF_RETENTION, CF_SM,
    CF_TIMES, CF_SEGREFS, GROUP_KEYED_CFS,
};
use crate::segments::{placed, segref_key, Loc};
use crate::snapshot::{SnapshotBuilder, SnapshotFile, Snapshots};
use crate::{corrupt, io_err, TypeConfig};

pub(crate) const KEY_APPLIED: &[u8] = b"applied";
pub(crate) const KEY_MEMBERSHIP: &[u8] = b"membership";

/// The last applied log id and membership, as stored in `sm`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct MembershipRecord {
    pub log_id: Option<rewind_wire::raft::LogId>,
    pub membership: rewind_wire::raft::Membership,
}

/// A shard replica's state machine.
pub struct StateMachine {
    db: Arc<DB>,
    segs: Arc<crate::segments::Segments>,
    snapshots: Snapshots,
    /// Held by `apply`, snapshot installs and each collector step: the
    /// collector never changes the index under an apply that reads it.
    gc_lock: Arc<tokio::sync::Mutex<()>>,
    /// Bumped under `gc_lock` when a snapshot install or a group's
    /// deletion replaces tables wholesale (see `gc::Collector::step`).
    gc_generation: Arc<std::sync::atomic::AtomicU64>,
}

impl StateMachine {
    pub(crate) fn open(
        db: Arc<DB>,
        segs: Arc<crate::segments::Segments>,
        snapshot_dir: PathBuf,
        gc_lock: Arc<tokio::sync::Mutex<()>>,
        gc_generation: Arc<std::sync::atomic::AtomicU64>,
    ) -> io::Result<StateMachine> {
        let snapshots = Snapshots::open(db.clone(), segs.clone(), snapshot_dir)?;
        Ok(StateMachine { db, segs, snapshots, gc_lock, gc_generation })
    }

    fn retention(&self, pending: &Pending, group: &str) -> io::Result<RetentionRecord> {
        if let Some(r) = pending.retention.get(group) {
            return Ok(r.clone());
        }
        if pending.deleted.contains(group) {
            return Ok(RetentionRecord::default());
        }
        Ok(decode_opt(self.db.get_cf(cf(&self.db, CF_RETENTION), group.as_bytes()).map_err(io_err)?, "retention record")?.unwrap_or_default())
    }

    /// The policy a batch's events check against: the retention record and
    /// the newest LSN of each bookmark the batch pins.
    fn policy(&self, pending: &Pending, group: &str, events: &[rewind_wire::event::Event]) -> io::Result<Policy> {
        let mut policy = Policy { retention: self.retention(pending, group)?, ..Default::default() };
        for e in events {
            if let rewind_wire::event::Event::Pin { name, .. } = e {
                if let Some(lsn) = self.newest_mark(pending, group, name)? {
                    policy.marks.insert(name.clone(), lsn);
                }
            }
        }
        policy.backups = self.backups(pending, group, crate::backups::Backups::names_in(events.iter()))?;
        Ok(policy)
    }

    /// The group's open backups and the named ones, as this call sees
    /// them (its own changes over the store's).
    fn backups(&self, pending: &Pending, group: &str, names: Vec<String>) -> io::Result<crate::backups::Backups> {
        use rewind_wire::rpc::BackupState;
        let mut b = crate::backups::Backups::default();
        let stored = if pending.deleted.contains(group) { Vec::new() } else { crate::backup_store::open_names(&self.db, group)? };
        let pending_open = pending.backups.range((group.to_string(), String::new())..).take_while(|((g, _), _)| g == group).filter(|(_, r)| r.info.state == BackupState::Open).map(|((_, n), _)| n.clone());
        let wanted: Vec<String> = stored.into_iter().chain(pending_open).chain(names).collect();
        for name in wanted {
            if b.records.contains_key(&name) {
                continue;
            }
            let r = match pending.backups.get(&(group.to_string(), name.clone())) {
                Some(r) => Some(r.clone()),
                None if pending.deleted.contains(group) => None,
                None => crate::backup_store::record(&self.db, group, &name)?,
            };
            if let Some(r) = r {
                b.records.insert(name, r);
            }
        }
        Ok(b)
    }

    /// Keeps the backup records a batch changed.
    fn keep_backups(pending: &mut Pending, group: &str, b: &crate::backups::Backups) {
        for name in &b.changed {
            if let Some(r) = b.records.get(name) {
                pending.backups.insert((group.to_string(), name.clone()), r.clone());
            }
        }
    }

    fn newest_mark(&self, pending: &Pending, group: &str, name: &str) -> io::Result<Option<u64>> {
        if let Some(l) = pending.marks.get(&(group.to_string(), name.to_string())) {
            return Ok(Some(*l));
        }
        if pending.deleted.contains(group) {
            return Ok(None);
        }
        let probe = mark_key(group, name, u64::MAX);
        let mut it = self.db.raw_iterator_cf(cf(&self.db, CF_MARKS));
        it.seek_for_prev(&probe);
        if it.valid() {
            let k = it.key().expect("valid");
            if k.len() == probe.len() && k[..k.len() - 8] == probe[..probe.len() - 8] {
                return Ok(Some(u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"))));
            }
        } else {
            it.status().map_err(io_err)?;
        }
        Ok(None)
    }

    /// (time, payload bytes) of a group's event, from this call's writes
    /// or its chain record (or the event itself, for a chain record
    /// written before retention).
    fn event_info(&self, pending: &Pending, group: &str, lsn: u64) -> io::Result<(u64, u64)> {
        if let Some(i) = pending.info.get(&(group.to_string(), lsn)) {
            return Ok(*i);
        }
        let key = event_key(group, lsn);
        if let Some(v) = self.db.get_cf(cf(&self.db, CF_CHAIN), &key).map_err(io_err)? {
            if let Some(info) = chain_value(&v)?.info {
                return Ok(info);
            }
        }
        let raw = self.db.get_cf(cf(&self.db, CF_EVENTS), &key).map_err(io_err)?.ok_or_else(|| corrupt("group", format!("{group:?} has no event at LSN {lsn}")))?;
        let e = crate::segments::EventRecord::parse(&raw)?;
        Ok((e.event.time_ns, e.payload_bytes()))
    }

    /// Moves the group's window as its policy allows, after new events.
    /// `before`: the record the batch started from; it is written again
    /// only if the batch or the move changed it (most appends do neither).
    fn move_window(&self, pending: &mut Pending, group: &GroupRecord, mut r: RetentionRecord, before: &RetentionRecord, hold: u64) -> io::Result<()> {
        advance_window(&mut r, group, hold, |lsn| self.event_info(pending, &group.name, lsn))?;
        if r != *before {
            pending.retention.insert(group.name.clone(), r);
        }
        Ok(())
    }

    fn group(&self, name: &str) -> io::Result<Option<GroupRecord>> {
        let bytes = self.db.get_cf(cf(&self.db, CF_GROUPS), name.as_bytes()).map_err(io_err)?;
        bytes.map(|b| decode_record(&b).map_err(|e| corrupt("group record", e))).transpose()
    }

    fn producer(&self, client_id: u64, group: &str) -> io::Result<Option<ProducerRecord>> {
        let bytes = self.db.get_cf(cf(&self.db, CF_PRODUCERS), producer_key(client_id, group)).map_err(io_err)?;
        bytes.map(|b| decode_record(&b).map_err(|e| corrupt("producer record", e))).transpose()
    }

    fn dr(&self, pending: &Pending, group: &str) -> io::Result<Option<DrRecord>> {
        if let Some(d) = pending.dr.get(group) {
            return Ok(Some(d.clone()));
        }
        let bytes = self.db.get_cf(cf(&self.db, CF_DR), group.as_bytes()).map_err(io_err)?;
        bytes.map(|b| decode_record(&b).map_err(|e| corrupt("DR record", e))).transpose()
    }

    fn branch(&self, pending: &Pending, name: &str) -> io::Result<Option<BranchRecord>> {
        match pending.branches.get(name) {
            Some(b) => Ok(Some(b.clone())),
            None => crate::db::branch_of(&self.db, name),
        }
    }

    fn pending_group(&self, pending: &Pending, name: &str) -> io::Result<Option<GroupRecord>> {
        match pending.groups.get(name) {
            Some(g) => Ok(Some(g.clone())),
            None if pending.deleted.contains(name) => Ok(None),
            None => self.group(name),
        }
    }

    /// Writes new events of a group: the event, its time, its chain link
    /// (from `digest`, the group's digest before them) and its block
    /// versions.
    fn put_events(
        &self,
        pending: &mut Pending,
        batch: &mut WriteBatch,
        group: &str,
        mut digest: [u8; 32],
        events: Vec<(StoredEvent, Vec<u8>)>,
        at: &BTreeMap<u64, Loc>,
    ) -> io::Result<()> {
        pending.appended.insert(group.to_string());
        for (event, record) in events {
            let key = event_key(group, event.lsn);
            digest = crate::apply::chain(&digest, &record);
            let info = (event.time_ns, event.event.payload_bytes() as u64);
            batch.put_cf(cf(&self.db, CF_CHAIN), &key, chain_value_of(&digest, &event));
            pending.info.insert((group.to_string(), event.lsn), info);
            // A write whose payload lies in a segment names it; nothing is
            // copied. (The chain above is over the whole record, as every
            // replica and the other site compute it.)
            match at.get(&event.lsn) {
                Some(loc) if event.event.payload_bytes() == loc.len as usize => {
                    batch.put_cf(cf(&self.db, CF_EVENTS), &key, crate::segments::event_value(&event, loc));
                    batch.put_cf(cf(&self.db, CF_SEGREFS), segref_key(group, loc.seg, event.lsn), []);
                }
                _ => batch.put_cf(cf(&self.db, CF_EVENTS), &key, record),
            }
            batch.put_cf(cf(&self.db, CF_TIMES), time_key(group, event.time_ns, event.lsn), []);
            self.index(pending, batch, group, &key, event)?;
        }
        Ok(())
    }
}

/// What `migrate` did to one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigratedGroup {
    pub group: String,
    pub events: u64,
    pub payload_bytes: u64,
}

/// Events rebuilt per write while migrating.
const MIGRATE_EVENTS_PER_WRITE: u64 = 256;

impl StateMachine {
    /// Rebuilds what format 2 derives from each group's events (the block
    /// index, the content index, zero extents, bookmarks, times, chain
    /// links), in LSN order, `MIGRATE_EVENTS_PER_WRITE` events per write,
    /// and checks each group's chain against its record. `progress` hears
    /// of every write (group, events done, of). Idempotent: it starts each
    /// group over from its events.
    pub(crate) fn rebuild_derived(&self, mut progress: impl FnMut(&str, u64, u64)) -> io::Result<Vec<MigratedGroup>> {
        use crate::db::{CF_CONTENT, CF_EXTENTS as EXT};
        let groups: Vec<GroupRecord> = {
            let mut out = Vec::new();
            for item in self.db.iterator_cf(cf(&self.db, CF_GROUPS), rocksdb::IteratorMode::Start) {
                let (_, v) = item.map_err(io_err)?;
                out.push(decode_record::<GroupRecord>(&v).map_err(|e| corrupt("group record", e))?);
            }
            out
        };
        let mut report = Vec::new();
        for g in groups {
            let name = g.name.as_str();
            let prefix = group_prefix(name);
            let end = prefix_end(&prefix);
            for family in [CF_BLOCKS, EXT, CF_CONTENT, CF_MARKS, CF_TIMES, CF_CHAIN] {
                self.db.delete_range_cf(cf(&self.db, family), &prefix, &end).map_err(io_err)?;
            }
            let mut digest = [0u8; 32];
            let mut lsn = 1;
            let mut payload_bytes = 0;
            while lsn <= g.last_lsn {
                let mut pending = Pending::default();
                let mut batch = WriteBatch::default();
                let upto = (lsn + MIGRATE_EVENTS_PER_WRITE - 1).min(g.last_lsn);
                for l in lsn..=upto {
                    let key = event_key(name, l);
                    let raw = self.db.get_cf(cf(&self.db, CF_EVENTS), &key).map_err(io_err)?.ok_or_else(|| corrupt("group", format!("{name:?} has no event at LSN {l} (of 1..={})", g.last_lsn)))?;
                    // Format 1 stores hold events whole; the chain is over
                    // the whole record either way.
                    let event = crate::segments::decode_event(&self.segs, &raw).map_err(|e| corrupt(&format!("event record at LSN {l} of group {name}"), e))?;
                    let whole = if raw.starts_with(crate::segments::EVENT_MAGIC) { encode_record(&event).map_err(io_err)? } else { raw.clone() };
                    digest = crate::apply::chain(&digest, &whole);
                    payload_bytes += event.event.payload_bytes() as u64;
                    batch.put_cf(cf(&self.db, CF_CHAIN), &key, chain_value_of(&digest, &event));
                    batch.put_cf(cf(&self.db, CF_TIMES), time_key(name, event.time_ns, l), []);
                    self.index(&mut pending, &mut batch, name, &key, event)?;
                }
                self.db.write(batch).map_err(io_err)?;
                progress(name, upto, g.last_lsn);
                lsn = upto + 1;
            }
            if digest != g.digest {
                return Err(corrupt(
                    "group",
                    format!("the events of group {name:?} do not hash to its recorded chain digest: the store is damaged, or was not written by rewind"),
                ));
            }
            report.push(MigratedGroup { group: g.name.clone(), events: g.last_lsn, payload_bytes });
        }
        crate::db::flush_state_machine(&self.db)?;
        Ok(report)
    }
}

/// What one call of `apply` changes, gathered before one atomic write.
#[derive(Default)]
struct Pending {
    groups: BTreeMap<String, GroupRecord>,
    producers: BTreeMap<(u64, String), ProducerRecord>,
    dr: BTreeMap<String, DrRecord>,
    branches: BTreeMap<String, BranchRecord>,
    /// Groups that got new events in this call, and groups a failback
    /// step moved events out of: the two never mix in one write (the moves
    /// read the store, which does not show this write's changes yet);
    /// `apply` writes what it has first (`Pending::must_write_before`).
    appended: std::collections::BTreeSet<String>,
    forked: std::collections::BTreeSet<String>,
    overlay: Overlay,
    retention: BTreeMap<String, RetentionRecord>,
    /// (group, LSN) -> (time, payload bytes) of this call's new events.
    info: BTreeMap<(String, u64), (u64, u64)>,
    /// (group, bookmark) -> LSN of this call's new bookmarks.
    marks: BTreeMap<(String, String), u64>,
    /// Groups deleted in this call (a later command may create one again).
    deleted: std::collections::BTreeSet<String>,
    /// (group, backup) -> the backup records this call changed.
    backups: BTreeMap<(String, String), crate::backups::BackupRecord>,
}

impl Pending {
    /// Whether `command` reads the store where this write's changes to the
    /// same group would be missed: then the write goes first. Deciding by
    /// the commands alone keeps every replica's result the same, however
    /// its entries were grouped into `apply` calls.
    fn must_write_before(&self, command: &Command) -> bool {
        match command {
            Command::Fork { group, .. } => self.appended.contains(group),
            Command::Append(b) => self.forked.contains(&b.group),
            Command::Replicate { group, .. } => self.forked.contains(group),
            Command::DeleteGroup { group, .. } => self.appended.contains(group) || self.forked.contains(group),
            _ => false,
        }
    }
}

impl StateMachine {
    /// Where the payloads of the entry `id` lie, from its log record (none
    /// for an entry stored whole, from before segments).
    fn entry_locs(&self, id: &LogId) -> io::Result<Vec<Loc>> {
        match crate::log::LogStore::locs_at(&self.db, id.index)? {
            Some((stored, locs)) if codec::log_id_from_wire(&stored) == *id => {
                self.segs.ensure_synced(&locs);
                Ok(locs)
            }
            Some((stored, _)) => Err(corrupt("log entry", format!("index {} holds {:?} while {:?} is applied", id.index, stored, id))),
            None => Ok(Vec::new()),
        }
    }

    fn apply_command(&self, pending: &mut Pending, batch: &mut WriteBatch, command: &Command, locs: &[Loc]) -> io::Result<CommandReply> {
        match command {
            Command::CreateGroup { group, disks, .. } => {
                let exists = self.pending_group(pending, group)?.is_some();
                let record = match create_group(exists, group, disks) {
                    Ok(record) => record,
                    Err(reason) => return Ok(CommandReply::Refused { reason }),
                };
                pending.groups.insert(group.clone(), record);
                Ok(CommandReply::Created)
            }
            Command::Append(b) => {
                let Some(mut group) = self.pending_group(pending, &b.group)? else {
                    return Ok(CommandReply::Refused { reason: format!("no consistency group {:?}", b.group) });
                };
                let branch = self.branch(pending, &b.group)?;
                if let Err(reason) = check_writable(&b.group, self.dr(pending, &b.group)?.as_ref()).and_then(|_| check_not_branch(&b.group, branch.as_ref())) {
                    return Ok(CommandReply::Refused { reason });
                }
                let pkey = (b.client_id, b.group.clone());
                let producer = match pending.producers.get(&pkey) {
                    Some(p) => Some(p.clone()),
                    None => self.producer(b.client_id, &b.group)?,
                };
                let before = group.digest;
                let first_lsn = group.last_lsn + 1;
                let events: Vec<_> = b.events.iter().map(|e| crate::segments::strip_event(&e.event)).collect();
                let mut policy = self.policy(pending, &b.group, &events)?;
                let before_policy = policy.retention.clone();
                let (outcome, reply) = apply_batch(&mut group, producer, b, &mut policy);
                if let BatchOutcome::Sequenced { events, producer } = outcome {
                    let any = !events.is_empty();
                    let at = placed(b.events.iter().enumerate().map(|(i, t)| (first_lsn + i as u64, &t.event)), locs);
                    self.put_events(pending, batch, &b.group, before, events, &at)?;
                    pending.producers.insert(pkey, producer);
                    if any {
                        Self::keep_backups(pending, &b.group, &policy.backups);
                        let hold = crate::backups::hold(&policy.backups);
                        self.move_window(pending, &group, policy.retention, &before_policy, hold)?;
                    }
                    pending.groups.insert(b.group.clone(), group);
                }
                Ok(reply)
            }
            Command::DrSet { group, record } => {
                let exists = self.pending_group(pending, group)?.is_some();
                let stored = self.dr(pending, group)?;
                let branch = self.branch(pending, group)?;
                if let Err(reason) = dr_set(group, exists, stored.as_ref(), record).and_then(|_| check_not_branch(group, branch.as_ref())) {
                    return Ok(CommandReply::Refused { reason });
                }
                pending.dr.insert(group.clone(), record.clone());
                Ok(CommandReply::Created)
            }
            Command::Replicate { group: name, epoch, events, digest } => {
                let Some(mut group) = self.pending_group(pending, name)? else {
                    return Ok(CommandReply::Refused { reason: format!("no consistency group {name:?}") });
                };
                let before = group.digest;
                let first = group.last_lsn + 1;
                let plain: Vec<_> = events.iter().map(|e| crate::segments::strip_event(&e.event)).collect();
                let mut policy = self.policy(pending, name, &plain)?;
                let before_policy = policy.retention.clone();
                match apply_replicated(&mut group, self.dr(pending, name)?.as_ref(), *epoch, events, digest, &mut policy) {
                    Ok(new) => {
                        let any = !new.is_empty();
                        let at = placed(events.iter().map(|e| (e.lsn, &e.event)), locs);
                        self.put_events(pending, batch, name, before, new, &at)?;
                        if any {
                            Self::keep_backups(pending, name, &policy.backups);
                            let hold = crate::backups::hold(&policy.backups);
                            self.move_window(pending, &group, policy.retention, &before_policy, hold)?;
                        }
                        let reply = CommandReply::Appended { lsn_first: first.min(group.last_lsn + 1), lsn_last: group.last_lsn };
                        pending.groups.insert(name.clone(), group);
                        Ok(reply)
                    }
                    Err(reason) => Ok(CommandReply::Refused { reason }),
                }
            }
            Command::Fork { group: name, branch, fork_lsn } => {
                let first = self.retention(pending, name)?.first();
                if *fork_lsn + 1 < first {
                    return Ok(CommandReply::Refused {
                        reason: format!("the fork point LSN {fork_lsn} of group {name:?} is before its window (LSN {first} on): that history is released; link the group again"),
                    });
                }
                let stored = crate::backup_store::list(&self.db, name, usize::MAX)?;
                let touched = stored.iter().chain(pending.backups.iter().filter(|((g, _), _)| g == name).map(|(_, r)| &r.info)).find(|b| b.begin_lsn > *fork_lsn || b.end_lsn > *fork_lsn);
                if let Some(b) = touched {
                    return Ok(CommandReply::Refused {
                        reason: format!("backup {:?} of group {name:?} began or ended after the fork point LSN {fork_lsn}: a failback that moves backups into a branch is not built", b.name),
                    });
                }
                self.fork(pending, batch, name, branch, *fork_lsn)
            }
            Command::DeleteGroup { group, time_ns } => self.delete_group(pending, batch, group, *time_ns),
        }
    }

    /// Deletes a group, its history and its records, in this same write
    /// (RocksDB's range deletes over the group's key prefix).
    fn delete_group(&self, pending: &mut Pending, batch: &mut WriteBatch, group: &str, time_ns: u64) -> io::Result<CommandReply> {
        if self.pending_group(pending, group)?.is_none() {
            return Ok(CommandReply::Refused { reason: format!("no consistency group {group:?}") });
        }
        let retention = self.retention(pending, group)?;
        let linked = self.dr(pending, group)?.is_some();
        let mut branches = Vec::new();
        for item in self.db.iterator_cf(cf(&self.db, CF_BRANCHES), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(io_err)?;
            let b: BranchRecord = decode_record(&v).map_err(|e| corrupt("branch record", e))?;
            if b.base == group {
                branches.push(String::from_utf8_lossy(&k).into_owned());
            }
        }
        branches.extend(pending.branches.iter().filter(|(_, b)| b.base == group).map(|(n, _)| n.clone()));
        if let Err(reason) = delete_check(group, Some(&retention), time_ns, linked, &branches) {
            return Ok(CommandReply::Refused { reason });
        }
        let prefix = group_prefix(group);
        for family in GROUP_KEYED_CFS {
            batch.delete_range_cf(cf(&self.db, family), &prefix, &prefix_end(&prefix));
        }
        for family in [CF_GROUPS, CF_RETENTION, CF_GC, CF_BRANCHES] {
            batch.delete_cf(cf(&self.db, family), group.as_bytes());
        }
        for item in self.db.iterator_cf(cf(&self.db, CF_PRODUCERS), rocksdb::IteratorMode::Start) {
            let (k, _) = item.map_err(io_err)?;
            if k.len() == 8 + group.len() && &k[8..] == group.as_bytes() {
                batch.delete_cf(cf(&self.db, CF_PRODUCERS), &k);
            }
        }
        pending.groups.remove(group);
        pending.retention.remove(group);
        pending.branches.remove(group);
        pending.producers.retain(|(_, g), _| g != group);
        pending.backups.retain(|(g, _), _| g != group);
        pending.deleted.insert(group.to_string());
        self.gc_generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(CommandReply::Created)
    }

    /// One failback step: moves the group's newest events after the fork
    /// (a bounded piece) into the branch, keys and all, newest first.
    fn fork(&self, pending: &mut Pending, batch: &mut WriteBatch, name: &str, branch: &str, fork_lsn: u64) -> io::Result<CommandReply> {
        use rewind_wire::event::Event;
        use rewind_wire::limits::{FORK_BLOCKS_MAX, FORK_BYTES_MAX, FORK_EVENTS_MAX};
        let Some(mut g) = self.pending_group(pending, name)? else {
            return Ok(CommandReply::Refused { reason: format!("no consistency group {name:?}") });
        };
        let record = self.branch(pending, branch)?;
        let named = self.pending_group(pending, branch)?.is_some();
        let dr = self.dr(pending, name)?;
        let window_first = self.retention(pending, name)?.first();
        if let Err(reason) = fork_check(&g, dr.as_ref(), branch, record.as_ref(), named, fork_lsn, window_first) {
            return Ok(CommandReply::Refused { reason });
        }
        // The events to move, newest first, within this step's bounds.
        let mut take = Vec::new();
        let (mut bytes, mut blocks) = (0u64, 0u64);
        let mut lsn = g.last_lsn;
        while lsn > fork_lsn && (take.len() as u64) < FORK_EVENTS_MAX && bytes < FORK_BYTES_MAX && blocks < FORK_BLOCKS_MAX {
            let key = event_key(name, lsn);
            let raw = self.db.get_cf(cf(&self.db, CF_EVENTS), &key).map_err(io_err)?.ok_or_else(|| corrupt("group", format!("{name:?} has no event at LSN {lsn}")))?;
            let rec = crate::segments::EventRecord::parse(&raw)?;
            let loc = rec.loc;
            let event = rec.load(|l| self.segs.read(l))?;
            if let Event::DiskCreate { disk, .. } | Event::DiskResize { disk, .. } = &event.event {
                return Ok(CommandReply::Refused {
                    reason: format!("LSN {lsn} of group {name:?}, after the fork, changes disk {disk:?}; a failback over disk changes is not built"),
                });
            }
            bytes += event.event.payload_bytes() as u64;
            blocks += crate::blocks::versioned_blocks(&event.event).map_or(1, |(_, b)| b.len() as u64 + 1);
            take.push((event, raw, loc));
            lsn -= 1;
        }
        if record.is_none() {
            let b = GroupRecord { name: branch.to_string(), ..g.clone() };
            pending.groups.insert(branch.to_string(), b);
            let epoch = dr.as_ref().map_or(0, |d| d.epoch);
            pending.branches.insert(branch.to_string(), BranchRecord { base: name.to_string(), base_lsn: fork_lsn, epoch });
        }
        let old_last = g.last_lsn;
        let mv = |batch: &mut WriteBatch, family: &str, from: Vec<u8>, to: Vec<u8>| -> io::Result<()> {
            if let Some(v) = self.db.get_cf(cf(&self.db, family), &from).map_err(io_err)? {
                batch.delete_cf(cf(&self.db, family), &from);
                batch.put_cf(cf(&self.db, family), &to, v);
            }
            Ok(())
        };
        for (event, raw, loc) in &take {
            let lsn = event.lsn;
            batch.delete_cf(cf(&self.db, CF_EVENTS), event_key(name, lsn));
            batch.put_cf(cf(&self.db, CF_EVENTS), event_key(branch, lsn), raw);
            if let Some(loc) = loc {
                batch.delete_cf(cf(&self.db, CF_SEGREFS), segref_key(name, loc.seg, lsn));
                batch.put_cf(cf(&self.db, CF_SEGREFS), segref_key(branch, loc.seg, lsn), []);
            }
            batch.delete_cf(cf(&self.db, CF_TIMES), time_key(name, event.time_ns, lsn));
            batch.put_cf(cf(&self.db, CF_TIMES), time_key(branch, event.time_ns, lsn), []);
            mv(batch, CF_CHAIN, event_key(name, lsn), event_key(branch, lsn))?;
            if let Event::Bookmark { name: mark, .. } = &event.event {
                mv(batch, CF_MARKS, mark_key(name, mark, lsn), mark_key(branch, mark, lsn))?;
            }
            if let Some((disk, range)) = crate::blocks::versioned_blocks(&event.event) {
                for block in range.iter().copied() {
                    let from = block_key(name, disk, block, lsn);
                    if let Some(h) = self.db.get_cf(cf(&self.db, CF_BLOCKS), &from).map_err(io_err)?.and_then(|v| crate::blocks::Version::stored_hash(&v)) {
                        batch.delete_cf(cf(&self.db, CF_CONTENT), content_key(name, &h, disk, block, lsn));
                        batch.put_cf(cf(&self.db, CF_CONTENT), content_key(branch, &h, disk, block, lsn), []);
                    }
                    mv(batch, CF_BLOCKS, from, block_key(branch, disk, block, lsn))?;
                }
                mv(batch, CF_EXTENTS, extent_key(name, disk, lsn), extent_key(branch, disk, lsn))?;
            }
            g.events -= 1;
            g.payload_bytes -= event.event.payload_bytes() as u64;
        }
        g.last_lsn = lsn;
        g.digest = if lsn == 0 {
            [0; 32]
        } else {
            let d = self.db.get_cf(cf(&self.db, CF_CHAIN), event_key(name, lsn)).map_err(io_err)?;
            d.and_then(|d| chain_value(&d).ok().map(|c| c.digest))
                .ok_or_else(|| corrupt("chain", format!("group {name:?} has no chain digest at LSN {lsn} (written before this build kept them)")))?
        };
        if lsn > 0 {
            let raw = self.db.get_cf(cf(&self.db, CF_EVENTS), event_key(name, lsn)).map_err(io_err)?.ok_or_else(|| corrupt("group", format!("{name:?} has no event at LSN {lsn}")))?;
            g.last_time_ns = crate::segments::EventRecord::parse(&raw)?.event.time_ns;
        }
        pending.groups.insert(name.to_string(), g);
        pending.forked.insert(name.to_string());
        Ok(CommandReply::Appended { lsn_first: lsn + 1, lsn_last: old_last })
    }
}

impl StateMachine {
    /// Adds what one event changes to the block index and bookmarks. Each
    /// block version is computed from the block as of the previous LSN, so
    /// applying the same event again writes the same bytes.
    fn index(&self, pending: &mut Pending, batch: &mut WriteBatch, group: &str, key: &[u8], event: crate::apply::StoredEvent) -> io::Result<()> {
        use rewind_wire::event::Event;
        let lsn = event.lsn;
        match &event.event {
            Event::Bookmark { name, app_consistent } => {
                batch.put_cf(cf(&self.db, CF_MARKS), mark_key(group, name, lsn), mark_value(event.time_ns, *app_consistent));
                pending.marks.insert((group.to_string(), name.clone()), lsn);
            }
            Event::Write { disk, .. } | Event::WriteZeroes { disk, .. } | Event::Trim { disk, .. } | Event::Revert { disk, .. } | Event::Copy { disk, .. } => {
                let puts = {
                    let mut reader = BlockReader::new(&self.db, &self.segs, Some(&pending.overlay), group, disk);
                    match &event.event {
                        Event::Revert { to_lsn, block_first, block_end, .. } => {
                            crate::blocks::revert_puts(&mut reader, *block_first, *block_end, *to_lsn, lsn)?
                        }
                        Event::Copy { block_first, from_disk, from, .. } => {
                            let mut source = BlockReader::new(&self.db, &self.segs, Some(&pending.overlay), group, from_disk);
                            crate::blocks::copy_puts(&mut source, *block_first, from)?
                        }
                        other => index_event(disk, other, |b| reader.block_at(b, lsn - 1))?,
                    }
                };
                for p in puts {
                    match p {
                        IndexPut::Block { block, version } => {
                            let k = block_key(group, disk, block, lsn);
                            let (v, hash) = version.encode_hashed();
                            batch.put_cf(cf(&self.db, CF_BLOCKS), &k, &v);
                            if let Some(h) = hash {
                                batch.put_cf(cf(&self.db, CF_CONTENT), content_key(group, &h, disk, block, lsn), []);
                            }
                            pending.overlay.blocks.insert(k, v);
                        }
                        IndexPut::Extent { block_first, block_end } => {
                            let k = extent_key(group, disk, lsn);
                            let mut v = block_first.to_le_bytes().to_vec();
                            v.extend_from_slice(&block_end.to_le_bytes());
                            batch.put_cf(cf(&self.db, CF_EXTENTS), &k, v);
                            pending.overlay.extents.insert(k, (block_first, block_end));
                        }
                    }
                }
                if matches!(event.event, Event::Write { .. }) {
                    pending.overlay.writes.insert(key.to_vec(), Arc::new(event));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The applied log id and membership records as stored in `sm` (or in a
/// checkpoint of it), checked but not converted.
pub(crate) fn read_applied_records(db: &DB) -> io::Result<(Option<rewind_wire::raft::LogId>, Option<MembershipRecord>)> {
    let sm = cf(db, CF_SM);
    let applied = db
        .get_cf(sm, KEY_APPLIED)
        .map_err(io_err)?
        .map(|b| decode_record::<rewind_wire::raft::LogId>(&b).map_err(|e| corrupt("applied record", e)))
        .transpose()?;
    let membership = db
        .get_cf(sm, KEY_MEMBERSHIP)
        .map_err(io_err)?
        .map(|b| decode_record::<MembershipRecord>(&b).map_err(|e| corrupt("membership record", e)))
        .transpose()?;
    Ok((applied, membership))
}

pub(crate) fn read_applied(db: &DB) -> io::Result<(Option<LogId>, StoredMembership)> {
    let (applied, membership) = read_applied_records(db)?;
    let membership = match membership {
        None => StoredMembership::default(),
        Some(rec) => {
            let m = codec::membership_from_wire(&rec.membership).map_err(|e| corrupt("membership record", e))?;
            StoredMembership::new(codec::opt_log_id_from_wire(&rec.log_id), m)
        }
    };
    Ok((applied.map(|l| codec::log_id_from_wire(&l)), membership))
}

impl StateMachine {
    /// Writes what applying the entries up to `last_applied` changed, with
    /// the applied index, in one batch.
    fn write(&self, mut batch: WriteBatch, pending: &Pending, last_applied: &Option<LogId>, last_membership: &Option<MembershipRecord>) -> io::Result<()> {
        let sm = cf(&self.db, CF_SM);
        for (name, group) in &pending.groups {
            batch.put_cf(cf(&self.db, CF_GROUPS), name.as_bytes(), encode_record(group).map_err(io_err)?);
        }
        for (group, r) in &pending.retention {
            batch.put_cf(cf(&self.db, CF_RETENTION), group.as_bytes(), encode_record(r).map_err(io_err)?);
        }
        for (group, b) in &pending.branches {
            batch.put_cf(cf(&self.db, CF_BRANCHES), group.as_bytes(), encode_record(b).map_err(io_err)?);
        }
        for (group, d) in &pending.dr {
            batch.put_cf(cf(&self.db, CF_DR), group.as_bytes(), encode_record(d).map_err(io_err)?);
        }
        for ((client, group), p) in &pending.producers {
            batch.put_cf(cf(&self.db, CF_PRODUCERS), producer_key(*client, group), encode_record(p).map_err(io_err)?);
        }
        for ((group, _), r) in &pending.backups {
            crate::backup_store::put(&self.db, &mut batch, group, r)?;
        }
        if let Some(l) = &last_applied {
            batch.put_cf(sm, KEY_APPLIED, encode_record(&codec::log_id_to_wire(l)).map_err(io_err)?);
        }
        if let Some(m) = &last_membership {
            batch.put_cf(sm, KEY_MEMBERSHIP, encode_record(m).map_err(io_err)?);
        }
        // No WAL and no fsync: the entries are durable in the Raft log. A
        // crash loses this write and the applied index with it (flushes are
        // atomic across column families), and openraft applies the entries
        // again from the log, which is purged only behind a snapshot that
        // flushed these tables first (`flush_state_machine`).
        let mut opts = rocksdb::WriteOptions::default();
        opts.disable_wal(true);
        self.db.write_opt(batch, &opts).map_err(io_err)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        read_applied(&self.db)
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let _gc = self.gc_lock.clone().lock_owned().await;
        let mut batch = WriteBatch::default();
        let mut pending = Pending::default();
        let mut last_applied = None;
        let mut last_membership = None;
        let mut replies = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let reply = match &entry.payload {
                EntryPayload::Blank => None,
                EntryPayload::Normal(command) => {
                    if pending.must_write_before(command) {
                        self.write(std::mem::take(&mut batch), &std::mem::take(&mut pending), &last_applied, &last_membership)?;
                    }
                    let locs = self.entry_locs(&entry.log_id)?;
                    Some(self.apply_command(&mut pending, &mut batch, command, &locs)?)
                }
                EntryPayload::Membership(m) => {
                    last_membership = Some(MembershipRecord {
                        log_id: Some(codec::log_id_to_wire(&entry.log_id)),
                        membership: codec::membership_to_wire(m),
                    });
                    None
                }
            };
            last_applied = Some(entry.log_id);
            if let Some(responder) = responder {
                replies.push((responder, reply.unwrap_or(CommandReply::Created)));
            }
        }
        self.write(batch, &pending, &last_applied, &last_membership)?;
        for (responder, reply) in replies {
            responder.send(reply);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots.builder()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> io::Result<()> {
        let _gc = self.gc_lock.clone().lock_owned().await;
        self.gc_generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.snapshots.install(meta, snapshot).await
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>>> {
        self.snapshots.current()
    }
}
