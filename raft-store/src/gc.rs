//! The collector: frees what the events before a group's window leave
//! behind, on this replica, while ingest runs.
//!
//! A step takes one group whose window has moved past what was collected
//! (`GcRecord::collected_to`), and the next events before the window, at
//! most `GC_STEP_EVENTS_MAX` and `GC_STEP_BYTES_MAX` of payload. For each
//! it asks `retention::collect_event` which of its block versions are
//! live: a live version that refers into the event's payload gets its own
//! copy (rewritten forward); the garbage ones, the event itself, its time
//! key, chain link (all but the one before the window) and an unpinned
//! bookmark are deleted. The whole step is one atomic write, with the
//! group's new `collected_to` in it.
//!
//! Crash safety: the write goes where the state machine's do (no WAL;
//! flushes are atomic across column families), under the same lock as
//! `apply` and snapshot installs, so a crash leaves the step wholly done or
//! wholly undone, and a redone step finds the same answer: the window only
//! moves forward, and the versions a step keeps are the ones the next step
//! sees. Readers use a snapshot (`StoreReader::read_disk`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use rewind_wire::frame::{decode_record, encode_record};
use rewind_wire::limits::{GC_STEP_BYTES_MAX, GC_STEP_EVENTS_MAX};
use rkyv::{Archive, Deserialize, Serialize};
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};

use crate::apply::{GroupRecord, StoredEvent};
use crate::blocks::{Version, BLOCK_BYTES};
use crate::content::content_key;
use crate::db::{
    block_key, cf, chain_value, decode_opt, disk_prefix, event_key, extent_key, mark_key, time_key, CF_BLOCKS, CF_CHAIN, CF_CONTENT, CF_EVENTS, CF_EXTENTS, CF_GC, CF_GROUPS, CF_MARKS,
    CF_RETENTION, CF_SEGREFS, CF_TIMES,
};
use crate::segments::segref_key;
use crate::retention::{collect_event, BlockScan, GcIndex, GcOp, RetentionRecord, Shape};
use crate::{corrupt, io_err};

/// What the collector has done for one group on this replica. Part of
/// the state machine's tables, so a snapshot carries it with the index it
/// describes.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct GcRecord {
    /// Events below this LSN are collected (0 reads as 1: none).
    pub collected_to: u64,
    /// Payload bytes of the collected events.
    pub collected_bytes: u64,
    /// Bytes of live blocks given their own copy.
    pub rewritten_bytes: u64,
    /// Versions before the window freed later, when their block was
    /// written again (counted as 4 KiB each: copies, mostly).
    pub rewritten_freed_bytes: u64,
}

impl GcRecord {
    pub fn collected_to(&self) -> u64 {
        self.collected_to.max(1)
    }

    /// Payload released by the window and not yet collected.
    pub fn debt(&self, r: &RetentionRecord) -> u64 {
        r.released_bytes.saturating_sub(self.collected_bytes)
    }
}

/// Totals since this process started, for metrics.
#[derive(Default, Debug)]
pub struct GcStats {
    pub freed_bytes: AtomicU64,
    pub rewritten_bytes: AtomicU64,
    pub events: AtomicU64,
    pub steps: AtomicU64,
    /// Payload segments deleted, and their bytes.
    pub segments_deleted: AtomicU64,
    pub segment_bytes_freed: AtomicU64,
}

/// What one step did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    pub group: Option<String>,
    pub events: u64,
    /// Payload bytes of the events freed.
    pub freed_bytes: u64,
    pub rewritten_bytes: u64,
    pub rewritten_freed_bytes: u64,
}

/// The collector of one store.
#[derive(Clone)]
pub struct Collector {
    db: Arc<DB>,
    segs: Arc<crate::segments::Segments>,
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Bumped (under the lock) by whatever replaces or removes a group's
    /// tables wholesale: a snapshot install, a group's deletion. A step
    /// planned across a bump is dropped.
    generation: Arc<AtomicU64>,
    pub stats: Arc<GcStats>,
    /// Bytes freed since the freed key ranges were last compacted.
    uncompacted: Arc<AtomicU64>,
}

/// Freed bytes after which the collector compacts the ranges it freed:
/// RocksDB drops a blob file (where payloads lie) only once compaction has
/// met the deletes of every key that referred into it.
const COMPACT_AFTER_BYTES: u64 = 256 << 20;

/// The collector's view of one disk's block index. One iterator serves a
/// whole step (making one costs more than a seek); the step holds the
/// lock, so nothing else writes meanwhile.
struct Index<'a, 'b, 'c> {
    db: &'a DB,
    snap: &'a rocksdb::SnapshotWithThreadMode<'a, DB>,
    group: &'c str,
    disk: &'c str,
    blocks: &'b mut rocksdb::DBRawIteratorWithThreadMode<'a, DB>,
    /// The disk's zero extents after the step's first event, when held.
    extents: Option<&'c [(u64, u64, u64)]>,
}

/// A zero extent: (LSN, first block, end block).
type Extent = (u64, u64, u64);

/// Most zero extents a step holds per disk (24 bytes each).
const EXTENTS_CACHED_MAX: usize = 4096;

impl Index<'_, '_, '_> {
    /// The zero extents with LSN in `after+1..=upto`, or None when there
    /// are more than `max`.
    fn extents_upto(&self, after: u64, upto: u64, max: usize) -> std::io::Result<Option<Vec<(u64, u64, u64)>>> {
        let prefix = disk_prefix(self.group, self.disk);
        let start = extent_key(self.group, self.disk, after + 1);
        let mut out = Vec::new();
        for item in self.snap.iterator_cf(cf(self.db, CF_EXTENTS), IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item.map_err(io_err)?;
            if k.len() != prefix.len() + 8 || !k.starts_with(&prefix) {
                break;
            }
            let l = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            if l > upto {
                break;
            }
            if out.len() == max {
                return Ok(None);
            }
            if v.len() != 16 {
                return Err(corrupt("extent record", format!("{} bytes", v.len())));
            }
            out.push((l, u64::from_le_bytes(v[..8].try_into().expect("8")), u64::from_le_bytes(v[8..].try_into().expect("8"))));
        }
        Ok(Some(out))
    }
}

impl GcIndex for Index<'_, '_, '_> {
    type Error = std::io::Error;

    fn scan(&mut self, block: u64, lsn: u64, upto: u64) -> std::io::Result<BlockScan> {
        let from = block_key(self.group, self.disk, block, 0);
        let prefix = &from[..from.len() - 8];
        let it = &mut *self.blocks;
        let mut scan = BlockScan::default();
        it.seek(&from);
        while it.valid() {
            let k = it.key().expect("valid");
            if k.len() != from.len() || !k.starts_with(prefix) {
                break;
            }
            let l = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            let v = it.value().expect("valid");
            if l < lsn {
                scan.older.push((l, Version::stored_hash(v)));
            } else if l == lsn {
                scan.at = Some((Version::decode(v).map_err(|e| corrupt("block version", e))?, Version::stored_hash(v)));
            } else {
                scan.next = (l <= upto).then_some(l);
                break;
            }
            it.next();
        }
        it.status().map_err(io_err)?;
        Ok(scan)
    }

    fn extents(&mut self, after: u64, upto: u64) -> std::io::Result<Vec<(u64, u64, u64)>> {
        if let Some(held) = self.extents {
            return Ok(held.iter().filter(|(l, _, _)| after < *l && *l <= upto).copied().collect());
        }
        Ok(self.extents_upto(after, upto, usize::MAX)?.expect("no bound"))
    }
}

impl Collector {
    pub(crate) fn new(db: Arc<DB>, segs: Arc<crate::segments::Segments>, lock: Arc<tokio::sync::Mutex<()>>, generation: Arc<AtomicU64>) -> Collector {
        Collector { db, segs, lock, generation, stats: Arc::default(), uncompacted: Arc::default() }
    }

    /// Deletes the payload segments nothing needs any more
    /// (`segments::reclaimable`): the events that named them were freed
    /// (or moved into a snapshot's own copy) and the log was purged past
    /// them. Before deleting, it makes durable what made them unneeded:
    /// the state machine's tables (flushed) and the log's purge (the WAL,
    /// synced), so a crash cannot bring back a record naming a deleted
    /// segment. Returns the bytes freed.
    pub fn reclaim_segments(&self) -> std::io::Result<u64> {
        let _building = self.segs.snapshot_lock();
        let ids = self.segs.ids()?;
        let active = self.segs.active();
        let log_first = crate::log::LogStore::first_segment(&self.db)?;
        let referenced = crate::segments::referenced(&self.db)?;
        let dead = crate::segments::reclaimable(&ids, active, log_first, &referenced);
        if dead.is_empty() {
            return Ok(0);
        }
        crate::db::flush_state_machine(&self.db)?;
        if let Err(e) = self.db.flush_wal(true) {
            crate::fsync_failed("syncing the log before deleting segments", e);
        }
        let freed = self.segs.remove(&dead)?;
        self.stats.segments_deleted.fetch_add(dead.len() as u64, Relaxed);
        self.stats.segment_bytes_freed.fetch_add(freed, Relaxed);
        tracing::debug!(segments = dead.len(), freed, "deleted payload segments");
        Ok(freed)
    }

    /// Bytes the payload segments take on disk.
    pub fn segment_bytes(&self) -> std::io::Result<u64> {
        self.segs.bytes()
    }

    /// The groups whose window passed what was collected, as of `snap`:
    /// a plan must read the window and the events from one view, or it
    /// could meet a window start whose events it cannot see.
    fn groups_with_debt(&self, snap: &rocksdb::SnapshotWithThreadMode<'_, DB>) -> std::io::Result<Vec<(GroupRecord, RetentionRecord, GcRecord)>> {
        let mut out = Vec::new();
        for item in snap.iterator_cf(cf(&self.db, CF_RETENTION), IteratorMode::Start) {
            let (k, v) = item.map_err(io_err)?;
            let r: RetentionRecord = decode_record(&v).map_err(|e| corrupt("retention record", e))?;
            let gc: GcRecord = decode_opt(snap.get_cf(cf(&self.db, CF_GC), &k).map_err(io_err)?, "collector record")?.unwrap_or_default();
            if gc.collected_to() >= r.first() {
                continue;
            }
            let Some(g) = decode_opt::<GroupRecord>(snap.get_cf(cf(&self.db, CF_GROUPS), &k).map_err(io_err)?, "group record")? else { continue };
            out.push((g, r, gc));
        }
        Ok(out)
    }

    /// Runs one step (see the module's text) for the group with the most
    /// debt. Returns what it did; `group` is None when nothing is owed.
    ///
    /// The step reads (from a snapshot) without the lock, so that apply is
    /// never held behind the collector's disk reads, and takes the lock
    /// only to write. Its plan stays right meanwhile: apply adds versions
    /// only at new LSNs, after the window's start; the window and the
    /// collected mark only move forward; pins only go (keeping more is
    /// safe); and a snapshot install or a group's deletion, which would
    /// change what the plan read, bumps the generation, which drops it.
    pub fn step(&self) -> std::io::Result<Step> {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        let snap = self.db.snapshot();
        let mut owed = self.groups_with_debt(&snap)?;
        owed.sort_by_key(|(_, r, gc)| std::cmp::Reverse(gc.debt(r)));
        let Some((g, r, mut gc)) = owed.into_iter().next() else { return Ok(Step::default()) };
        let name = g.name.as_str();
        let first = r.first();
        let pins = r.pinned_points();
        let mut batch = WriteBatch::default();
        let mut step = Step { group: Some(name.to_string()), ..Default::default() };
        let mut lsn = gc.collected_to();
        let start = lsn;
        let mut segs = std::collections::BTreeSet::new();
        let (mut times, mut times_ascend) = (Vec::new(), true);
        let mut blocks_it: Option<rocksdb::DBRawIteratorWithThreadMode<'_, DB>> = None;
        // Each disk's zero extents over the step's range, read once (None:
        // too many to hold; then each event reads its own).
        let mut extents: std::collections::HashMap<String, Option<Vec<Extent>>> = std::collections::HashMap::new();
        // The chain links and event records are read in LSN order, each
        // table by one iterator: a step is one seek and then `next`s.
        let group_keys = crate::db::group_prefix(name);
        let lsn_of = |it: &rocksdb::DBRawIteratorWithThreadMode<'_, DB>| -> Option<u64> {
            let k = it.key()?;
            (k.len() == group_keys.len() + 8 && k.starts_with(&group_keys)).then(|| u64::from_be_bytes(k[group_keys.len()..].try_into().expect("8 bytes")))
        };
        let mut chain_it = snap.raw_iterator_cf(cf(&self.db, CF_CHAIN));
        chain_it.seek(event_key(name, lsn));
        let mut events_it = snap.raw_iterator_cf(cf(&self.db, CF_EVENTS));
        events_it.seek(event_key(name, lsn));
        while lsn < first && (step.events as usize) < GC_STEP_EVENTS_MAX && step.freed_bytes < GC_STEP_BYTES_MAX {
            // The chain record says what the event versioned; its payload
            // is read only for the blocks it keeps. LSNs without one (moved
            // to a branch by a failback, or never held) have nothing to
            // free: the step goes on at the next link.
            match lsn_of(&chain_it) {
                Some(l) if l == lsn => {}
                Some(l) if l > lsn => {
                    lsn = l.min(first);
                    continue;
                }
                _ => {
                    chain_it.status().map_err(io_err)?;
                    lsn = first;
                    break;
                }
            }
            let link = chain_value(chain_it.value().expect("valid"))?;
            chain_it.next();
            // The event's record is small (its payload lies in a
            // segment): read once, for its segment and, when a kept block
            // needs them, its bytes.
            while lsn_of(&events_it).is_some_and(|l| l < lsn) {
                events_it.next();
            }
            events_it.status().map_err(io_err)?;
            let mut record = match lsn_of(&events_it) {
                Some(l) if l == lsn => Some(crate::segments::EventRecord::parse(events_it.value().expect("valid"))?),
                _ => None,
            };
            let seg = record.as_ref().and_then(|r| r.loc).map(|l| l.seg);
            let mut event: Option<StoredEvent> = None;
            let mut read_event = |event: &mut Option<StoredEvent>| -> std::io::Result<()> {
                if event.is_none() {
                    let r = record.take().ok_or_else(|| corrupt("group", format!("{name:?} has no event at LSN {lsn}")))?;
                    *event = Some(r.load(|l| self.segs.read(l))?);
                }
                Ok(())
            };
            let (shape, (time_ns, payload)) = match (link.shape, link.info) {
                (Some(shape), Some(info)) => (shape, info),
                _ => {
                    read_event(&mut event)?;
                    let e = event.as_ref().expect("read above");
                    (Shape::of(&e.event), (e.time_ns, e.event.payload_bytes() as u64))
                }
            };
            match &shape {
                Shape::Blocks { disk, blocks, .. } => {
                    let it = blocks_it.get_or_insert_with(|| snap.raw_iterator_cf(cf(&self.db, CF_BLOCKS)));
                    if !extents.contains_key(disk) {
                        let cached = Index { db: &self.db, snap: &snap, group: name, disk, blocks: it, extents: None }.extents_upto(lsn, first, EXTENTS_CACHED_MAX)?;
                        extents.insert(disk.clone(), cached);
                    }
                    let cached = extents.get(disk).and_then(|c| c.as_deref());
                    let ops = collect_event(&mut Index { db: &self.db, snap: &snap, group: name, disk, blocks: it, extents: cached }, lsn, blocks, first, &pins)?;
                    for op in ops {
                        match op {
                            GcOp::Materialise { block, offset } => {
                                read_event(&mut event)?;
                                let e = event.as_ref().expect("read above");
                                let at = offset as usize;
                                let bytes = match &e.event {
                                    rewind_wire::event::Event::Write { data, .. } => data.get(at..at + BLOCK_BYTES as usize),
                                    _ => None,
                                };
                                let bytes = bytes.ok_or_else(|| corrupt("block index", format!("a version at LSN {lsn} refers to bytes its event does not hold")))?;
                                batch.put_cf(cf(&self.db, CF_BLOCKS), block_key(name, disk, block, lsn), Version::Data(bytes.to_vec()).encode());
                                step.rewritten_bytes += BLOCK_BYTES;
                            }
                            GcOp::DeleteVersion { block, lsn: at, hash } => {
                                if at < lsn {
                                    step.rewritten_freed_bytes += BLOCK_BYTES;
                                }
                                // Its content index entry goes with it.
                                if let Some(h) = hash {
                                    batch.delete_cf(cf(&self.db, CF_CONTENT), content_key(name, &h, disk, block, at));
                                }
                                batch.delete_cf(cf(&self.db, CF_BLOCKS), block_key(name, disk, block, at));
                            }
                        }
                    }
                }
                Shape::Bookmark { name: mark } => {
                    if !r.pins.iter().any(|p| p.lsn == lsn && p.name == *mark) {
                        batch.delete_cf(cf(&self.db, CF_MARKS), mark_key(name, mark, lsn));
                    }
                }
                Shape::Other => {}
            }
            // Its record, segment reference, time key and chain link go
            // with it: by ranges, after the loop.
            if let Some(seg) = seg {
                segs.insert(seg);
            }
            if times.last().is_some_and(|(t, _)| *t > time_ns) {
                times_ascend = false;
            }
            times.push((time_ns, lsn));
            step.events += 1;
            step.freed_bytes += payload;
            lsn += 1;
        }
        if lsn > start {
            // The step's LSNs, start..lsn, are all before the window: each
            // table keyed by LSN loses them as one range (a range
            // tombstone costs ingest one memtable insert, where a key each
            // cost one per event).
            batch.delete_range_cf(cf(&self.db, CF_EVENTS), event_key(name, start), event_key(name, lsn));
            // The chain link before the window stays: the window's first
            // event chains from it. The range starts at 0, so the links an
            // earlier step kept for a window since moved go too.
            let chain_end = lsn.min(first - 1);
            if chain_end > 0 {
                batch.delete_range_cf(cf(&self.db, CF_CHAIN), event_key(name, 0), event_key(name, chain_end));
            }
            for seg in segs {
                batch.delete_range_cf(cf(&self.db, CF_SEGREFS), segref_key(name, seg, start), segref_key(name, seg, lsn));
            }
            // Time keys sort by (time, LSN). Apply never lets a group's
            // time go back, so the step's keys are one range whose ends are
            // its first and last; were they ever out of order, each goes
            // alone.
            match (times.first(), times.last()) {
                (Some(&(t0, l0)), Some(&(t1, l1))) if times_ascend => {
                    batch.delete_range_cf(cf(&self.db, CF_TIMES), time_key(name, t0, l0), time_key(name, t1, l1 + 1));
                }
                _ => {
                    for (t, l) in &times {
                        batch.delete_cf(cf(&self.db, CF_TIMES), time_key(name, *t, *l));
                    }
                }
            }
        }
        let planned = gc.clone();
        gc.collected_to = lsn;
        gc.collected_bytes += step.freed_bytes;
        gc.rewritten_bytes += step.rewritten_bytes;
        gc.rewritten_freed_bytes += step.rewritten_freed_bytes;
        batch.put_cf(cf(&self.db, CF_GC), name.as_bytes(), encode_record(&gc).map_err(io_err)?);
        drop((blocks_it, chain_it, events_it));
        drop(snap);
        let guard = self.lock.blocking_lock();
        let now: GcRecord = decode_opt(self.db.get_cf(cf(&self.db, CF_GC), name.as_bytes()).map_err(io_err)?, "collector record")?.unwrap_or_default();
        if self.generation.load(std::sync::atomic::Ordering::Acquire) != generation || now != planned {
            tracing::debug!(group = name, "a collector step was planned across a snapshot install or a deletion; dropped");
            return Ok(Step { group: Some(name.to_string()), ..Default::default() });
        }
        let mut opts = rocksdb::WriteOptions::default();
        opts.disable_wal(true);
        self.db.write_opt(batch, &opts).map_err(io_err)?;
        drop(guard);
        self.stats.freed_bytes.fetch_add(step.freed_bytes, Relaxed);
        self.stats.rewritten_bytes.fetch_add(step.rewritten_bytes, Relaxed);
        self.stats.events.fetch_add(step.events, Relaxed);
        self.stats.steps.fetch_add(1, Relaxed);
        if self.uncompacted.fetch_add(step.freed_bytes + step.rewritten_bytes, Relaxed) + step.freed_bytes >= COMPACT_AFTER_BYTES {
            self.uncompacted.store(0, Relaxed);
            self.compact(name, lsn);
        }
        tracing::debug!(group = name, events = step.events, freed = step.freed_bytes, rewritten = step.rewritten_bytes, upto = lsn, "collector step");
        Ok(step)
    }

    /// Compacts the group's freed events (below `upto`).
    fn compact(&self, group: &str, upto: u64) {
        let prefix = crate::db::group_prefix(group);
        let end = event_key(group, upto);
        // Not exclusive: RocksDB's own compactions go on meanwhile, or
        // level 0 fills and stalls ingest. Only the payload's table: the
        // others hold small keys their own compactions reclaim.
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_exclusive_manual_compaction(false);
        self.db.compact_range_cf_opt(cf(&self.db, CF_EVENTS), Some(&prefix), Some(&end), &opts);
        tracing::debug!(group, upto, "collector compacted the freed ranges");
    }

    /// Payload bytes released by windows and not yet collected here, over
    /// every group.
    pub fn debt(&self) -> std::io::Result<u64> {
        Ok(self.groups_with_debt(&self.db.snapshot())?.iter().map(|(_, r, gc)| gc.debt(r)).sum())
    }
}
