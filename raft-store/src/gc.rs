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
use crate::db::{
    block_key, cf, decode_opt, disk_prefix, event_key, extent_key, mark_key, time_key, CF_BLOCKS, CF_CHAIN, CF_EVENTS, CF_EXTENTS, CF_GC, CF_GROUPS, CF_MARKS,
    CF_RETENTION, CF_TIMES,
};
use crate::retention::{collect_event, GcIndex, GcOp, RetentionRecord};
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
}

/// What one step did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    pub group: Option<String>,
    pub events: u64,
    /// Payload bytes of the events freed.
    pub freed_bytes: u64,
    pub rewritten_bytes: u64,
}

/// The collector of one store.
#[derive(Clone)]
pub struct Collector {
    db: Arc<DB>,
    lock: Arc<tokio::sync::Mutex<()>>,
    pub stats: Arc<GcStats>,
    /// Bytes freed since the freed key ranges were last compacted.
    uncompacted: Arc<AtomicU64>,
}

/// Freed bytes after which the collector compacts the ranges it freed:
/// RocksDB drops a blob file (where payloads lie) only once compaction has
/// met the deletes of every key that referred into it.
const COMPACT_AFTER_BYTES: u64 = 128 << 20;

/// The collector's view of one disk's block index.
struct Index<'a> {
    db: &'a DB,
    group: &'a str,
    disk: &'a str,
}

impl GcIndex for Index<'_> {
    type Error = std::io::Error;

    fn version_at(&mut self, block: u64, lsn: u64) -> std::io::Result<Option<Version>> {
        let v = self.db.get_cf(cf(self.db, CF_BLOCKS), block_key(self.group, self.disk, block, lsn)).map_err(io_err)?;
        v.map(|v| Version::decode(&v).map_err(|e| corrupt("block version", e))).transpose()
    }

    fn next_version(&mut self, block: u64, after: u64, upto: u64) -> std::io::Result<Option<u64>> {
        let from = block_key(self.group, self.disk, block, after + 1);
        let prefix = &from[..from.len() - 8];
        let mut it = self.db.raw_iterator_cf(cf(self.db, CF_BLOCKS));
        it.seek(&from);
        if it.valid() {
            let k = it.key().expect("valid");
            if k.len() == from.len() && k.starts_with(prefix) {
                let l = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
                return Ok((l <= upto).then_some(l));
            }
            return Ok(None);
        }
        it.status().map_err(io_err)?;
        Ok(None)
    }

    fn extents(&mut self, after: u64, upto: u64) -> std::io::Result<Vec<(u64, u64, u64)>> {
        let prefix = disk_prefix(self.group, self.disk);
        let start = extent_key(self.group, self.disk, after + 1);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(self.db, CF_EXTENTS), IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item.map_err(io_err)?;
            if k.len() != prefix.len() + 8 || !k.starts_with(&prefix) {
                break;
            }
            let l = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            if l > upto {
                break;
            }
            if v.len() != 16 {
                return Err(corrupt("extent record", format!("{} bytes", v.len())));
            }
            out.push((l, u64::from_le_bytes(v[..8].try_into().expect("8")), u64::from_le_bytes(v[8..].try_into().expect("8"))));
        }
        Ok(out)
    }

    fn older_versions(&mut self, block: u64, before: u64) -> std::io::Result<Vec<u64>> {
        let from = block_key(self.group, self.disk, block, 0);
        let prefix = &from[..from.len() - 8];
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(self.db, CF_BLOCKS), IteratorMode::From(&from, Direction::Forward)) {
            let (k, _) = item.map_err(io_err)?;
            if k.len() != from.len() || !k.starts_with(prefix) {
                break;
            }
            let l = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            if l >= before {
                break;
            }
            out.push(l);
        }
        Ok(out)
    }
}

impl Collector {
    pub(crate) fn new(db: Arc<DB>, lock: Arc<tokio::sync::Mutex<()>>) -> Collector {
        Collector { db, lock, stats: Arc::default(), uncompacted: Arc::default() }
    }

    fn groups_with_debt(&self) -> std::io::Result<Vec<(GroupRecord, RetentionRecord, GcRecord)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(&self.db, CF_RETENTION), IteratorMode::Start) {
            let (k, v) = item.map_err(io_err)?;
            let r: RetentionRecord = decode_record(&v).map_err(|e| corrupt("retention record", e))?;
            let gc: GcRecord = decode_opt(self.db.get_cf(cf(&self.db, CF_GC), &k).map_err(io_err)?, "collector record")?.unwrap_or_default();
            if gc.collected_to() >= r.first() {
                continue;
            }
            let Some(g) = decode_opt::<GroupRecord>(self.db.get_cf(cf(&self.db, CF_GROUPS), &k).map_err(io_err)?, "group record")? else { continue };
            out.push((g, r, gc));
        }
        Ok(out)
    }

    /// Runs one step (see the module's text) for the group with the most
    /// debt. Returns what it did; `group` is None when nothing is owed.
    pub fn step(&self) -> std::io::Result<Step> {
        let _guard = self.lock.blocking_lock();
        let mut owed = self.groups_with_debt()?;
        owed.sort_by_key(|(_, r, gc)| std::cmp::Reverse(gc.debt(r)));
        let Some((g, r, mut gc)) = owed.into_iter().next() else { return Ok(Step::default()) };
        let name = g.name.as_str();
        let first = r.first();
        let pins = r.pinned_points();
        let mut batch = WriteBatch::default();
        let mut step = Step { group: Some(name.to_string()), ..Default::default() };
        let mut lsn = gc.collected_to();
        while lsn < first && (step.events as usize) < GC_STEP_EVENTS_MAX && step.freed_bytes < GC_STEP_BYTES_MAX {
            let key = event_key(name, lsn);
            let Some(raw) = self.db.get_cf(cf(&self.db, CF_EVENTS), &key).map_err(io_err)? else {
                // Moved to a branch by a failback, or never held: nothing to free.
                lsn += 1;
                continue;
            };
            let e: StoredEvent = decode_record(&raw).map_err(|e| corrupt("event record", e))?;
            if let Some(disk) = e.event.disk() {
                let ops = collect_event(&mut Index { db: &self.db, group: name, disk }, &e, first, &pins)?;
                for op in ops {
                    match op {
                        GcOp::Materialise { block, version } => {
                            batch.put_cf(cf(&self.db, CF_BLOCKS), block_key(name, disk, block, lsn), version.encode());
                            step.rewritten_bytes += BLOCK_BYTES;
                        }
                        GcOp::DeleteVersion { block, lsn } => batch.delete_cf(cf(&self.db, CF_BLOCKS), block_key(name, disk, block, lsn)),
                    }
                }
            }
            if let rewind_wire::event::Event::Bookmark { name: mark, .. } = &e.event {
                if !r.pins.iter().any(|p| p.lsn == lsn && p.name == *mark) {
                    batch.delete_cf(cf(&self.db, CF_MARKS), mark_key(name, mark, lsn));
                }
            }
            batch.delete_cf(cf(&self.db, CF_EVENTS), &key);
            batch.delete_cf(cf(&self.db, CF_TIMES), time_key(name, e.time_ns, lsn));
            if lsn + 1 < first {
                batch.delete_cf(cf(&self.db, CF_CHAIN), &key);
            }
            step.events += 1;
            step.freed_bytes += e.event.payload_bytes() as u64;
            lsn += 1;
        }
        gc.collected_to = lsn;
        gc.collected_bytes += step.freed_bytes;
        gc.rewritten_bytes += step.rewritten_bytes;
        batch.put_cf(cf(&self.db, CF_GC), name.as_bytes(), encode_record(&gc).map_err(io_err)?);
        let mut opts = rocksdb::WriteOptions::default();
        opts.disable_wal(true);
        self.db.write_opt(batch, &opts).map_err(io_err)?;
        self.stats.freed_bytes.fetch_add(step.freed_bytes, Relaxed);
        self.stats.rewritten_bytes.fetch_add(step.rewritten_bytes, Relaxed);
        self.stats.events.fetch_add(step.events, Relaxed);
        self.stats.steps.fetch_add(1, Relaxed);
        if self.uncompacted.fetch_add(step.freed_bytes + step.rewritten_bytes, Relaxed) + step.freed_bytes >= COMPACT_AFTER_BYTES {
            self.uncompacted.store(0, Relaxed);
            drop(_guard);
            self.compact(name, lsn);
        }
        tracing::debug!(group = name, events = step.events, freed = step.freed_bytes, rewritten = step.rewritten_bytes, upto = lsn, "collector step");
        Ok(step)
    }

    /// Compacts the group's freed ranges (events and times below `upto`,
    /// and its block versions), outside the lock: RocksDB compacts
    /// alongside writes.
    fn compact(&self, group: &str, upto: u64) {
        let prefix = crate::db::group_prefix(group);
        let end = event_key(group, upto);
        self.db.compact_range_cf(cf(&self.db, CF_EVENTS), Some(&prefix), Some(&end));
        self.db.compact_range_cf(cf(&self.db, CF_CHAIN), Some(&prefix), Some(&end));
        self.db.compact_range_cf(cf(&self.db, CF_TIMES), Some(&prefix), Some(&crate::db::prefix_end(&prefix)));
        self.db.compact_range_cf(cf(&self.db, CF_BLOCKS), Some(&prefix), Some(&crate::db::prefix_end(&prefix)));
        tracing::debug!(group, upto, "collector compacted the freed ranges");
    }

    /// Payload bytes released by windows and not yet collected here, over
    /// every group.
    pub fn debt(&self) -> std::io::Result<u64> {
        Ok(self.groups_with_debt()?.iter().map(|(_, r, gc)| gc.debt(r)).sum())
    }
}
