//! The state machine of a simulated node: production's pure apply core
//! (`rewind_raft_store::apply`) and block index (`blocks`: indexing, and
//! the rules that read a block and a range back) over memory, read by
//! production's request service through [`SimState`], its `ReadState`.
//! It is volatile, like production's (which writes without a WAL): a crash
//! loses it, and the node rebuilds it from its snapshot and its log.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rewind_raft_store::apply::{
    apply_batch, apply_replicated, check_not_branch, check_writable, create_group, dr_set, fork_check, BatchOutcome, BranchRecord, GroupRecord, Policy,
    ProducerRecord, StoredEvent,
};
use rewind_raft_store::gc::GcRecord;
use rewind_raft_store::retention::{advance_window, collect_event, delete_check, BlockScan, GcIndex, GcOp, RetentionRecord, Shape};
use rewind_raft_store::blocks::{block_hash, block_or_zero, index_event, BlockHash, read_runs, revert_puts, IndexPut, Version, VersionIndex, BLOCK_BYTES};
use rewind_wire::dr::DrRecord;
use rewind_raft_store::{Bookmark, ReadState};
use rewind_wire::event::{Event, LoggedEvent};
use rewind_wire::raft::{Command, CommandReply};

use crate::disk::{current_snapshot, Disk};
use rewind_raft_store::segments::Loc;
use crate::{world, LogId, SimConfig, Snapshot, StoredMembership};

/// Everything a state machine holds; a snapshot is one of these, shared.
#[derive(Clone, Default)]
pub struct SmImage {
    pub applied: Option<LogId>,
    pub membership: StoredMembership,
    pub groups: BTreeMap<String, GroupRecord>,
    pub producers: BTreeMap<(u64, String), ProducerRecord>,
    /// Each group's events in LSN order (LSN n at index n - 1).
    pub events: BTreeMap<String, Vec<LoggedEvent>>,
    /// (group, disk, block) -> versions by LSN.
    blocks: BTreeMap<(String, String, u64), BTreeMap<u64, Version>>,
    /// (group, disk) -> zeroed extents by LSN.
    extents: BTreeMap<(String, String), BTreeMap<u64, (u64, u64)>>,
    /// Each group's chain digest after each LSN (LSN n at index n - 1).
    pub chain: BTreeMap<String, Vec<[u8; 32]>>,
    /// Each linked group's cross-site state.
    pub dr: BTreeMap<String, DrRecord>,
    /// Branches kept by a failback.
    pub branches: BTreeMap<String, BranchRecord>,
    /// Each group's retention (replicated) and what this replica's
    /// collector has freed. A collected event stays in `events` for the
    /// checker's model, but the index must never read it again.
    pub retention: BTreeMap<String, RetentionRecord>,
    pub gc: BTreeMap<String, GcRecord>,
    /// Each group's backups by name (production: column family `backups`).
    pub backups: BTreeMap<String, BTreeMap<String, rewind_raft_store::backups::BackupRecord>>,
    /// (group, LSN) -> where the write's payload lies in this node's
    /// segments (production: the event record's `Loc`, and `segrefs`).
    /// Reads of the write go there; an event without one holds its bytes
    /// (installed from another node's snapshot, which carries payloads).
    pub payloads: BTreeMap<(String, u64), Loc>,
    /// This node's disk, whose segments `payloads` names.
    pub segs: Option<std::sync::Weak<Mutex<Disk>>>,
}

/// Events one apply lets the simulated collector free (production's runs
/// on its own thread; here it runs between commands).
const GC_EVENTS_PER_COMMAND: u64 = 24;

impl SmImage {
    /// Block `b` of a disk as of LSN `lsn`, read by production's rules.
    pub fn block_at(&self, group: &str, disk: &str, b: u64, lsn: u64) -> io::Result<Vec<u8>> {
        let found = block_or_zero(&mut ImageIndex { image: self, group, disk }, b, lsn)?;
        Ok(found.unwrap_or_else(|| vec![0u8; BLOCK_BYTES as usize]))
    }

    /// The newest LSN of a bookmark named `name` in the group's events.
    fn newest_mark(&self, group: &str, name: &str) -> Option<u64> {
        self.events.get(group)?.iter().rev().find(|e| matches!(&e.event, Event::Bookmark { name: n, .. } if n == name)).map(|e| e.lsn)
    }

    fn policy<'a>(&self, group: &str, events: impl Iterator<Item = &'a Event>) -> Policy {
        let records = self.backups.get(group).cloned().unwrap_or_default();
        let mut policy = Policy {
            retention: self.retention.get(group).cloned().unwrap_or_default(),
            backups: rewind_raft_store::backups::Backups { records, changed: Vec::new() },
            ..Default::default()
        };
        for e in events {
            if let Event::Pin { name, .. } = e {
                if let Some(l) = self.newest_mark(group, name) {
                    policy.marks.insert(name.clone(), l);
                }
            }
        }
        policy
    }

    /// After new events: the window moves as production's does, then the
    /// collector frees a bounded piece.
    fn after_events(&mut self, group: &GroupRecord, policy: Policy) {
        let mut r = policy.retention;
        let hold = rewind_raft_store::backups::hold(&policy.backups);
        let kept = self.backups.entry(group.name.clone()).or_default();
        for name in &policy.backups.changed {
            kept.insert(name.clone(), policy.backups.records[name].clone());
        }
        let events = self.events.get(&group.name).cloned().unwrap_or_default();
        let info = |lsn: u64| -> Result<(u64, u64), ()> {
            let e = events.get(lsn as usize - 1).ok_or(())?;
            Ok((e.time_ns, e.event.payload_bytes() as u64))
        };
        advance_window(&mut r, group, hold, info).expect("the window moves over held events");
        self.retention.insert(group.name.clone(), r);
        if self.collect(&group.name, GC_EVENTS_PER_COMMAND) > 0 {
            self.reclaim_segments();
        }
    }

    /// Production's collector rule (`retention::collect_event`) over
    /// memory: frees up to `max` events before the window.
    pub fn collect(&mut self, group: &str, max: u64) -> u64 {
        let Some(r) = self.retention.get(group).cloned() else { return 0 };
        let mut gc = self.gc.get(group).cloned().unwrap_or_default();
        let (first, pins) = (r.first(), r.pinned_points());
        let mut done = 0;
        let mut lsn = gc.collected_to();
        while lsn < first && done < max {
            let Some(e) = self.events.get(group).and_then(|v| v.get(lsn as usize - 1)).cloned() else { break };
            // Production's shape of the event (what its chain record holds).
            if let Shape::Blocks { disk, blocks, .. } = Shape::of(&e.event) {
                let disk = disk.as_str();
                let ops = collect_event(&mut ImageIndex { image: self, group, disk }, lsn, &blocks, first, &pins).expect("memory reads cannot fail");
                for op in ops {
                    match op {
                        GcOp::Materialise { block, offset } => {
                            gc.rewritten_bytes += BLOCK_BYTES;
                            let data = self.payload_of(group, lsn).expect("a kept write's payload reads back (its segment is named)");
                            let bytes = data[offset as usize..offset as usize + BLOCK_BYTES as usize].to_vec();
                            self.blocks.entry((group.to_string(), disk.to_string(), block)).or_default().insert(lsn, Version::Data(bytes));
                        }
                        GcOp::DeleteVersion { block, lsn, .. } => {
                            if let Some(v) = self.blocks.get_mut(&(group.to_string(), disk.to_string(), block)) {
                                v.remove(&lsn);
                            }
                        }
                    }
                }
            }
            gc.collected_bytes += e.event.payload_bytes() as u64;
            // Its segment reference goes with it.
            self.payloads.remove(&(group.to_string(), lsn));
            lsn += 1;
            done += 1;
        }
        gc.collected_to = lsn;
        self.gc.insert(group.to_string(), gc);
        done
    }

    /// The segments this image's events name.
    pub fn payload_segments(&self) -> std::collections::BTreeSet<u64> {
        self.payloads.values().map(|l| l.seg).collect()
    }

    /// The payload of write `lsn` of `group`: from its segment if it lies
    /// in one (checked there), else the event's own bytes.
    fn payload_of(&self, group: &str, lsn: u64) -> io::Result<Vec<u8>> {
        if let Some(loc) = self.payloads.get(&(group.to_string(), lsn)) {
            let disk = self.segs.as_ref().and_then(|w| w.upgrade()).ok_or_else(|| io::Error::other("the node's disk is gone"))?;
            let got = disk.lock().expect("disk").read_payload(loc);
            return got.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("the payload of LSN {lsn}: {e}")));
        }
        match self.events.get(group).and_then(|e| e.get(lsn as usize - 1)).map(|e| &e.event) {
            Some(Event::Write { data, .. }) => Ok(data.clone()),
            other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("a Ref version at LSN {lsn} points at {other:?}"))),
        }
    }

    /// Records where the writes of an applied command lie (production:
    /// apply stores each write's `Loc` from its log entry, never a copy),
    /// then lets the node's disk delete the segments nothing names.
    pub fn place(&mut self, command: &Command, reply: &CommandReply, locs: &[Loc]) {
        let (group, at) = match (command, reply) {
            (Command::Append(b), CommandReply::Appended { lsn_first, .. }) => {
                (b.group.clone(), rewind_raft_store::segments::placed(b.events.iter().enumerate().map(|(i, t)| (lsn_first + i as u64, &t.event)), locs))
            }
            (Command::Replicate { group, events, .. }, CommandReply::Appended { lsn_first, lsn_last }) => (
                group.clone(),
                rewind_raft_store::segments::placed(events.iter().map(|e| (e.lsn, &e.event)), locs).into_iter().filter(|(l, _)| (*lsn_first..=*lsn_last).contains(l)).collect(),
            ),
            _ => return,
        };
        for (lsn, loc) in at {
            if self.held(&group, lsn) {
                self.payloads.insert((group.clone(), lsn), loc);
            }
        }
    }

    /// Deletes the node's segments that nothing names any more, by
    /// production's rule (with its snapshots' links counted).
    pub fn reclaim_segments(&self) {
        let Some(disk) = self.segs.as_ref().and_then(|w| w.upgrade()) else { return };
        let ignore = world::with(|w| w.is_bug(crate::Bug::ReclaimIgnoresEvents));
        let referenced = if ignore { Default::default() } else { self.payload_segments() };
        let deleted = disk.lock().expect("disk").reclaim(referenced, !ignore);
        if deleted > 0 {
            world::count("segments deleted by the collector");
        }
    }

    /// Whether this replica's index may still read event `lsn` of `group`.
    fn held(&self, group: &str, lsn: u64) -> bool {
        self.gc.get(group).is_none_or(|g| lsn >= g.collected_to())
    }

    pub fn apply_command(&mut self, command: &Command) -> CommandReply {
        match command {
            Command::CreateGroup { group, disks, .. } => match create_group(self.groups.contains_key(group), group, disks) {
                Ok(record) => {
                    self.groups.insert(group.clone(), record);
                    CommandReply::Created
                }
                Err(reason) => CommandReply::Refused { reason },
            },
            Command::Append(b) => {
                let Some(mut group) = self.groups.get(&b.group).cloned() else {
                    return CommandReply::Refused { reason: format!("no consistency group {:?}", b.group) };
                };
                if let Err(reason) = check_writable(&b.group, self.dr.get(&b.group)).and_then(|_| check_not_branch(&b.group, self.branches.get(&b.group))) {
                    return CommandReply::Refused { reason };
                }
                let key = (b.client_id, b.group.clone());
                let mut policy = self.policy(&b.group, b.events.iter().map(|e| &e.event));
                let (outcome, reply) = apply_batch(&mut group, self.producers.get(&key).cloned(), b, &mut policy);
                if let BatchOutcome::Sequenced { events, producer } = outcome {
                    let any = !events.is_empty();
                    self.push_events(&group, events);
                    self.producers.insert(key, producer);
                    if any {
                        self.after_events(&group, policy);
                    }
                    self.groups.insert(b.group.clone(), group);
                }
                reply
            }
            Command::DrSet { group, record } => match dr_set(group, self.groups.contains_key(group), self.dr.get(group), record).and_then(|_| check_not_branch(group, self.branches.get(group))) {
                Ok(()) => {
                    self.dr.insert(group.clone(), record.clone());
                    CommandReply::Created
                }
                Err(reason) => CommandReply::Refused { reason },
            },
            Command::Replicate { group: name, epoch, events, digest } => {
                let Some(mut group) = self.groups.get(name).cloned() else {
                    return CommandReply::Refused { reason: format!("no consistency group {name:?}") };
                };
                let first = group.last_lsn + 1;
                let mut policy = self.policy(name, events.iter().map(|e| &e.event));
                match apply_replicated(&mut group, self.dr.get(name), *epoch, events, digest, &mut policy) {
                    Ok(new) => {
                        let any = !new.is_empty();
                        self.push_events(&group, new);
                        if any {
                            self.after_events(&group, policy);
                        }
                        let reply = CommandReply::Appended { lsn_first: first.min(group.last_lsn + 1), lsn_last: group.last_lsn };
                        self.groups.insert(name.clone(), group);
                        reply
                    }
                    Err(reason) => CommandReply::Refused { reason },
                }
            }
            Command::Fork { group, branch, fork_lsn } => {
                let first = self.retention.get(group).map_or(1, |r| r.first());
                if *fork_lsn + 1 < first {
                    return CommandReply::Refused { reason: format!("the fork point LSN {fork_lsn} of group {group:?} is before its window (LSN {first} on)") };
                }
                let moved = self.backups.get(group).into_iter().flat_map(|b| b.values()).find(|b| b.info.begin_lsn > *fork_lsn || b.info.end_lsn > *fork_lsn);
                if let Some(b) = moved {
                    return CommandReply::Refused { reason: format!("backup {:?} of group {group:?} began or ended after the fork point LSN {fork_lsn}: a failback that moves backups into a branch is not built", b.info.name) };
                }
                self.fork(group, branch, *fork_lsn)
            }
            Command::DeleteGroup { group, time_ns } => {
                if !self.groups.contains_key(group) {
                    return CommandReply::Refused { reason: format!("no consistency group {group:?}") };
                }
                let branches: Vec<String> = self.branches.iter().filter(|(_, b)| b.base == *group).map(|(n, _)| n.clone()).collect();
                if let Err(reason) = delete_check(group, self.retention.get(group), *time_ns, self.dr.contains_key(group), &branches) {
                    return CommandReply::Refused { reason };
                }
                self.groups.remove(group);
                self.events.remove(group);
                self.chain.remove(group);
                self.retention.remove(group);
                self.gc.remove(group);
                self.backups.remove(group);
                self.branches.remove(group);
                self.producers.retain(|(_, g), _| g != group);
                self.blocks.retain(|(g, _, _), _| g != group);
                self.extents.retain(|(g, _), _| g != group);
                self.payloads.retain(|(g, _), _| g != group);
                CommandReply::Created
            }
        }
    }

    /// A failback, modelled whole (production moves the keys of the events
    /// after the fork in bounded steps; `raft-store`'s store test checks
    /// that against this same behaviour): the branch gets the group's whole
    /// history to its head, and the group is cut back to the fork.
    fn fork(&mut self, name: &str, branch: &str, fork_lsn: u64) -> CommandReply {
        let Some(mut g) = self.groups.get(name).cloned() else {
            return CommandReply::Refused { reason: format!("no consistency group {name:?}") };
        };
        let window_first = self.retention.get(name).map_or(1, |r| r.first());
        if let Err(reason) = fork_check(&g, self.dr.get(name), branch, self.branches.get(branch), self.groups.contains_key(branch), fork_lsn, window_first) {
            return CommandReply::Refused { reason };
        }
        let old_last = g.last_lsn;
        if !self.branches.contains_key(branch) {
            self.groups.insert(branch.to_string(), GroupRecord { name: branch.to_string(), ..g.clone() });
            self.branches.insert(branch.to_string(), BranchRecord { base: name.to_string(), base_lsn: fork_lsn, epoch: self.dr.get(name).map_or(0, |d| d.epoch) });
            let events = self.events.get(name).cloned().unwrap_or_default();
            self.events.insert(branch.to_string(), events);
            let chain = self.chain.get(name).cloned().unwrap_or_default();
            self.chain.insert(branch.to_string(), chain);
            let blocks: Vec<_> = self.blocks.iter().filter(|((gr, _, _), _)| gr == name).map(|((_, d, b), v)| ((branch.to_string(), d.clone(), *b), v.clone())).collect();
            self.blocks.extend(blocks);
            let extents: Vec<_> = self.extents.iter().filter(|((gr, _), _)| gr == name).map(|((_, d), v)| ((branch.to_string(), d.clone()), v.clone())).collect();
            self.extents.extend(extents);
            let payloads: Vec<_> = self.payloads.iter().filter(|((gr, _), _)| gr == name).map(|((_, l), loc)| ((branch.to_string(), *l), *loc)).collect();
            self.payloads.extend(payloads);
        }
        let keep = fork_lsn as usize;
        let events = self.events.entry(name.to_string()).or_default();
        for e in events.drain(keep.min(events.len())..) {
            self.payloads.remove(&(name.to_string(), e.lsn));
            g.events -= 1;
            g.payload_bytes -= e.event.payload_bytes() as u64;
        }
        g.last_time_ns = events.last().map_or(0, |e| e.time_ns);
        let chain = self.chain.entry(name.to_string()).or_default();
        chain.truncate(keep);
        g.digest = chain.last().copied().unwrap_or([0; 32]);
        g.last_lsn = fork_lsn;
        for ((gr, _, _), versions) in self.blocks.iter_mut() {
            if gr == name {
                versions.retain(|lsn, _| *lsn <= fork_lsn);
            }
        }
        for ((gr, _), ext) in self.extents.iter_mut() {
            if gr == name {
                ext.retain(|lsn, _| *lsn <= fork_lsn);
            }
        }
        self.groups.insert(name.to_string(), g);
        CommandReply::Appended { lsn_first: fork_lsn + 1, lsn_last: old_last }
    }

    /// Indexes and keeps new events of `group` (its record already advanced).
    fn push_events(&mut self, group: &GroupRecord, events: Vec<(StoredEvent, Vec<u8>)>) {
        let chain = self.chain.entry(group.name.clone()).or_default();
        let mut digest = chain.last().copied().unwrap_or([0; 32]);
        for (_, record) in &events {
            digest = rewind_raft_store::apply::chain(&digest, record);
            chain.push(digest);
        }
        for (event, _record) in events {
            self.index(&group.name, &event);
            self.events.entry(group.name.clone()).or_default().push(event);
        }
    }

    fn index(&mut self, group: &str, event: &LoggedEvent) {
        let Some(disk) = event.event.disk() else { return };
        let disk = disk.to_string();
        let puts = match &event.event {
            Event::Revert { to_lsn, block_first, block_end, .. } => {
                revert_puts(&mut ImageIndex { image: self, group, disk: &disk }, *block_first, *block_end, *to_lsn, event.lsn)
                    .expect("the simulation's index refers only to its own writes")
            }
            Event::Copy { block_first, from_disk, from, .. } => rewind_raft_store::blocks::copy_puts(&mut ImageIndex { image: self, group, disk: from_disk }, *block_first, from)
                .expect("a copy reads only points inside the window"),
            other => index_event(&disk, other, |b| self.block_at(group, &disk, b, event.lsn - 1)).expect("the index reads only what the collector keeps"),
        };
        for put in puts {
            match put {
                IndexPut::Block { block, version } => {
                    self.blocks.entry((group.to_string(), disk.clone(), block)).or_default().insert(event.lsn, version);
                }
                IndexPut::Extent { block_first, block_end } => {
                    self.extents.entry((group.to_string(), disk.clone())).or_default().insert(event.lsn, (block_first, block_end));
                }
            }
        }
    }
}

/// One disk's block index in a state machine image, as production's read
/// rules (`blocks::block_or_zero`) look things up.
struct ImageIndex<'a> {
    image: &'a SmImage,
    group: &'a str,
    disk: &'a str,
}

impl VersionIndex for ImageIndex<'_> {
    type Error = io::Error;

    fn version(&mut self, block: u64, lsn: u64) -> io::Result<Option<(u64, Version)>> {
        let versions = self.image.blocks.get(&(self.group.to_string(), self.disk.to_string(), block));
        Ok(versions.and_then(|v| v.range(..=lsn).next_back()).map(|(l, v)| (*l, v.clone())))
    }

    fn zeroed_by_extent(&mut self, block: u64, after: u64, upto: u64) -> io::Result<bool> {
        let Some(ext) = self.image.extents.get(&(self.group.to_string(), self.disk.to_string())) else { return Ok(false) };
        Ok(after < upto && ext.range(after + 1..=upto).any(|(_, (f, e))| (*f..*e).contains(&block)))
    }

    fn write_bytes(&mut self, lsn: u64, offset: u32) -> io::Result<Vec<u8>> {
        if !self.image.held(self.group, lsn) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a Ref version points at LSN {lsn}, which the collector freed")));
        }
        let data = self.image.payload_of(self.group, lsn)?;
        data.get(offset as usize..offset as usize + BLOCK_BYTES as usize)
            .map(|b| b.to_vec())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("a Ref version at LSN {lsn} points past its write ({} bytes)", data.len())))
    }
}

impl GcIndex for ImageIndex<'_> {
    type Error = io::Error;

    fn scan(&mut self, block: u64, lsn: u64, upto: u64) -> io::Result<BlockScan> {
        let Some(versions) = self.image.blocks.get(&(self.group.to_string(), self.disk.to_string(), block)) else { return Ok(BlockScan::default()) };
        // The simulation keeps no content index: the hash is carried for
        // the shape of production's rule only.
        let hash = |v: &Version| match v {
            Version::Ref { hash, .. } => *hash,
            _ => None,
        };
        Ok(BlockScan {
            older: versions.range(..lsn).map(|(l, v)| (*l, hash(v))).collect(),
            at: versions.get(&lsn).map(|v| (v.clone(), hash(v))),
            next: versions.range(lsn + 1..).next().map(|(l, _)| *l).filter(|l| *l <= upto),
        })
    }

    fn extents(&mut self, after: u64, upto: u64) -> io::Result<Vec<(u64, u64, u64)>> {
        let Some(ext) = self.image.extents.get(&(self.group.to_string(), self.disk.to_string())) else { return Ok(Vec::new()) };
        if after >= upto {
            return Ok(Vec::new());
        }
        Ok(ext.range(after + 1..=upto).map(|(l, (f, e))| (*l, *f, *e)).collect())
    }
}

/// A node's applied state as production's request service reads it.
#[derive(Clone)]
pub struct SimState(pub Arc<Mutex<SmImage>>);

impl SimState {
    fn image(&self) -> std::sync::MutexGuard<'_, SmImage> {
        self.0.lock().expect("sm")
    }
}

impl ReadState for SimState {
    fn group(&self, name: &str) -> io::Result<Option<GroupRecord>> {
        Ok(self.image().groups.get(name).cloned())
    }

    fn producer(&self, client_id: u64, group: &str) -> io::Result<Option<ProducerRecord>> {
        Ok(self.image().producers.get(&(client_id, group.to_string())).cloned())
    }

    fn events(&self, group: &str, lsn_first: u64, count_max: usize, bytes_max: usize) -> io::Result<Vec<StoredEvent>> {
        let image = self.image();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let from = lsn_first.max(image.gc.get(group).map_or(1, |g| g.collected_to()));
        for e in image.events.get(group).into_iter().flatten().skip(from.saturating_sub(1) as usize).take(count_max) {
            bytes += e.event.payload_bytes();
            out.push(e.clone());
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(out)
    }

    fn read_disk(&self, group: &str, disk: &str, lsn: u64, offset: u64, len: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let image = self.image();
        let r = image.retention.get(group).cloned().unwrap_or_default();
        if !r.keeps(lsn) {
            return Err(io::Error::new(io::ErrorKind::NotFound, r.outside(group, lsn, image.groups.get(group).map_or(0, |g| g.last_lsn))));
        }
        read_runs(&mut ImageIndex { image: &image, group, disk }, lsn, offset, len)
    }

    fn retention(&self, group: &str) -> io::Result<RetentionRecord> {
        Ok(self.image().retention.get(group).cloned().unwrap_or_default())
    }

    fn locate_blocks(&self, group: &str, hashes: &[BlockHash], from: u64) -> io::Result<Vec<Option<(String, u64, u64)>>> {
        let image = self.image();
        let mut out: Vec<Option<(String, u64, u64)>> = vec![None; hashes.len()];
        let low = (group.to_string(), String::new(), 0u64);
        for ((g, disk, block), versions) in image.blocks.range(low..) {
            if g != group {
                break;
            }
            for (lsn, v) in versions.range(from..) {
                let hash = match v {
                    Version::Ref { hash: Some(h), .. } => *h,
                    Version::Data(d) => block_hash(d),
                    _ => continue,
                };
                for (i, want) in hashes.iter().enumerate() {
                    if *want == hash && out[i].as_ref().is_none_or(|b| *lsn > b.2) {
                        out[i] = Some((disk.clone(), *block, *lsn));
                    }
                }
            }
        }
        Ok(out)
    }

    fn backups(&self, group: &str, max: usize) -> io::Result<Vec<rewind_wire::rpc::BackupInfo>> {
        let mut out: Vec<_> = self.image().backups.get(group).into_iter().flat_map(|b| b.values()).map(|r| r.info.clone()).collect();
        out.sort_by_key(|b| b.begin_lsn);
        let skip = out.len().saturating_sub(max);
        Ok(out.split_off(skip))
    }

    fn block_hashes(&self, group: &str, disk: &str, lsn: u64, first: u64, count: u64) -> io::Result<Vec<BlockHash>> {
        let image = self.image();
        let mut index = ImageIndex { image: &image, group, disk };
        (first..first + count).map(|b| rewind_raft_store::hash_at(&mut index, b, lsn)).collect()
    }

    fn gc(&self, group: &str) -> io::Result<GcRecord> {
        Ok(self.image().gc.get(group).cloned().unwrap_or_default())
    }

    fn stored_before(&self, group: &str, hashes: &[BlockHash], before: u64) -> io::Result<Vec<bool>> {
        let image = self.image();
        let mut out = vec![false; hashes.len()];
        let low = (group.to_string(), String::new(), 0u64);
        for ((g, _, _), versions) in image.blocks.range(low..) {
            if g != group {
                break;
            }
            for (_, v) in versions.range(..before) {
                let hash = match v {
                    Version::Ref { hash: Some(h), .. } => *h,
                    Version::Data(d) => block_hash(d),
                    _ => continue,
                };
                for (i, want) in hashes.iter().enumerate() {
                    out[i] |= *want == hash;
                }
            }
        }
        Ok(out)
    }

    /// The content index as production defines it: every `Ref` and `Data`
    /// version the group holds, by its blake3; each block returned is
    /// read by production's rules and checked against its hash.
    fn find_blocks(&self, group: &str, hashes: &[BlockHash]) -> io::Result<Vec<Option<Vec<u8>>>> {
        let image = self.image();
        let mut out: Vec<Option<Vec<u8>>> = vec![None; hashes.len()];
        let low = (group.to_string(), String::new(), 0u64);
        for ((g, disk, _), versions) in image.blocks.range(low..) {
            if g != group {
                break;
            }
            for (lsn, v) in versions {
                let bytes = match v {
                    Version::Ref { hash: Some(h), offset } if hashes.contains(h) => ImageIndex { image: &image, group, disk }.write_bytes(*lsn, *offset)?,
                    Version::Data(d) => d.clone(),
                    _ => continue,
                };
                let h = block_hash(&bytes);
                for (i, want) in hashes.iter().enumerate() {
                    if *want == h && out[i].is_none() {
                        out[i] = Some(bytes.clone());
                    }
                }
            }
        }
        Ok(out)
    }

    fn bookmarks(&self, group: &str, max: usize) -> io::Result<Vec<Bookmark>> {
        let image = self.image();
        let mut out: Vec<Bookmark> = image
            .events
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|e| match &e.event {
                // The collector drops a freed bookmark unless it is pinned.
                Event::Bookmark { name, .. }
                    if !image.held(group, e.lsn) && !image.retention.get(group).is_some_and(|r| r.pins.iter().any(|p| p.lsn == e.lsn && p.name == *name)) =>
                {
                    None
                }
                Event::Bookmark { name, app_consistent } => Some(Bookmark { name: name.clone(), lsn: e.lsn, time_ns: e.time_ns, app_consistent: *app_consistent }),
                _ => None,
            })
            .collect();
        if out.len() > max {
            out.drain(..out.len() - max);
        }
        Ok(out)
    }

    fn time_of(&self, group: &str, lsn: u64) -> io::Result<Option<u64>> {
        let image = self.image();
        if !image.held(group, lsn) {
            return Ok(None);
        }
        Ok(image.events.get(group).and_then(|e| e.get(lsn.checked_sub(1)? as usize)).map(|e| e.time_ns))
    }

    fn lsn_at_time(&self, group: &str, time_ns: u64) -> io::Result<Option<u64>> {
        let image = self.image();
        let Some(events) = image.events.get(group) else { return Ok(None) };
        // Event times never go backwards within a group.
        let n = events.partition_point(|e| e.time_ns <= time_ns);
        Ok(n.checked_sub(1).map(|i| events[i].lsn))
    }

    fn dr(&self, group: &str) -> io::Result<Option<DrRecord>> {
        Ok(self.image().dr.get(group).cloned())
    }

    fn digest_at(&self, group: &str, lsn: u64) -> io::Result<Option<[u8; 32]>> {
        if lsn == 0 {
            return Ok(Some([0; 32]));
        }
        Ok(self.image().chain.get(group).and_then(|c| c.get(lsn as usize - 1)).copied())
    }
}

/// One node's state machine.
pub struct SimSm {
    pub state: Arc<Mutex<SmImage>>,
    pub disk: Arc<Mutex<Disk>>,
}

impl SimSm {
    /// A state machine as it is after a (re)start: the disk's snapshot, or
    /// empty.
    pub fn open(disk: Arc<Mutex<Disk>>) -> SimSm {
        let mut image = current_snapshot(&disk).map(|s| (*s.snapshot).clone()).unwrap_or_default();
        image.segs = Some(Arc::downgrade(&disk));
        SimSm { state: Arc::new(Mutex::new(image)), disk }
    }
}

impl RaftSnapshotBuilder<SimConfig> for SimSm {
    type SnapshotData = Arc<SmImage>;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let image = Arc::new(self.state.lock().expect("sm").clone());
        let meta = openraft::alias::SnapshotMetaOf::<SimConfig> {
            last_log_id: image.applied,
            last_membership: image.membership.clone(),
        };
        self.disk.lock().expect("disk").save_snapshot(meta.clone(), image.clone());
        Ok(Snapshot { meta, snapshot: image })
    }
}

impl RaftStateMachine<SimConfig> for SimSm {
    type SnapshotData = Arc<SmImage>;
    type SnapshotBuilder = SimSm;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let s = self.state.lock().expect("sm");
        Ok((s.applied, s.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<SimConfig>>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            // Where the entry's payloads lie, from its log record.
            let locs = {
                let mut d = self.disk.lock().expect("disk");
                let locs = d.current.entries.get(&entry.log_id.index).filter(|s| s.entry.log_id == entry.log_id).map(|s| s.locs.clone()).unwrap_or_default();
                if !world::with(|w| w.is_bug(crate::Bug::ApplyBeforePayloadSynced)) {
                    d.ensure_synced(&locs);
                }
                locs
            };
            let reply = {
                let mut s = self.state.lock().expect("sm");
                s.applied = Some(entry.log_id);
                match &entry.payload {
                    EntryPayload::Blank => CommandReply::Created,
                    EntryPayload::Normal(c) => {
                        let reply = s.apply_command(c);
                        s.place(c, &reply, &locs);
                        reply
                    }
                    EntryPayload::Membership(m) => {
                        s.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        CommandReply::Created
                    }
                }
            };
            if let Some(r) = responder {
                r.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> SimSm {
        SimSm { state: self.state.clone(), disk: self.disk.clone() }
    }

    async fn install_snapshot(&mut self, meta: &openraft::alias::SnapshotMetaOf<SimConfig>, snapshot: Arc<SmImage>) -> io::Result<()> {
        // Production streams a snapshot's payloads whole: the installed
        // events hold their bytes and name none of this node's segments.
        let mut image = (*snapshot).clone();
        image.payloads.clear();
        image.segs = Some(Arc::downgrade(&self.disk));
        *self.state.lock().expect("sm") = image.clone();
        self.disk.lock().expect("disk").save_snapshot(meta.clone(), Arc::new(image));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        Ok(current_snapshot(&self.disk))
    }
}
