//! openraft's log storage: entries in the `log` column family, their
//! payloads in segment files (`segments.rs`), both made durable by a
//! group-committing syncer thread before openraft is told they are.
//!
//! An entry with payloads is stored as `RWL3`, the count of payloads, a
//! `Loc` for each, then the entry without them as a checked record; any
//! other record is the entry whole (as stores wrote before segments).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::mpsc;
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use rewind_wire::frame::{decode_record, encode_record};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use crate::codec::{self, Entry, LogId, Vote};
use crate::db::{cf, CF_LOG, CF_META};
use crate::segments::{self, Loc, Segments};
use crate::{corrupt, fsync_failed, io_err, TypeConfig};

const LOG_MAGIC: &[u8; 4] = b"RWL3";
/// Most payloads one entry may name (a batch's events are bounded lower).
const ENTRY_PAYLOADS_MAX: usize = 1 << 16;

const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"purged";
const KEY_SEGMENTS_SYNCED: &[u8] = b"segments-synced";

/// Most flush callbacks one fsync answers; more wait for the next one.
const SYNC_GROUP_MAX: usize = 4096;

/// The Raft log of one shard replica.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    segs: Arc<Segments>,
    syncer: mpsc::Sender<IOFlushed<TypeConfig>>,
    /// A compaction of the purged range is running.
    compacting: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes of entries appended since this store opened.
    appended_bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>, segs: Arc<Segments>) -> LogStore {
        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        // A weak handle: the syncer must not keep the database open after
        // every store handle is gone (RocksDB must close before exit).
        let sync_db = Arc::downgrade(&db);
        let sync_segs = Arc::downgrade(&segs);
        std::thread::Builder::new()
            .name("log-sync".into())
            .spawn(move || sync_loop(&sync_db, &sync_segs, &rx))
            .expect("spawn the log syncer thread");
        LogStore { db, segs, syncer: tx, compacting: Arc::default(), appended_bytes: Arc::default() }
    }

    /// Cuts the log at its first entry whose payload does not read back
    /// whole (a torn segment tail after a crash). No entry from there on
    /// was reported durable: a segment sync covers every byte written
    /// before it, and entries are written in log order. A payload the last
    /// recorded sync covered that no longer reads back is damage, not a
    /// torn tail: the open is refused rather than drop an acknowledged
    /// entry. Returns the index cut from, if any.
    pub(crate) fn cut_torn_tail(&self) -> io::Result<Option<u64>> {
        let log = cf(&self.db, CF_LOG);
        let synced = match self.db.get_cf(cf(&self.db, CF_META), KEY_SEGMENTS_SYNCED).map_err(io_err)? {
            Some(v) if v.len() == 16 => (u64::from_le_bytes(v[..8].try_into().expect("8")), u64::from_le_bytes(v[8..].try_into().expect("8"))),
            Some(v) => return Err(corrupt("segments-synced record", format!("{} bytes", v.len()))),
            None => (0, 0),
        };
        for item in self.db.iterator_cf(log, IteratorMode::Start) {
            let (k, v) = item.map_err(io_err)?;
            let Some((locs, _)) = split_record(&v)? else { continue };
            if let Some((loc, bad)) = locs.iter().find_map(|l| self.segs.read(l).err().map(|e| (*l, e))) {
                let index = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| corrupt("log key", "not 8 bytes"))?);
                if segments::torn_or_damaged((loc.seg, loc.off + loc.len as u64), synced) == segments::Damage::Damaged {
                    return Err(corrupt(
                        "log",
                        format!("the payload of log entry {index} was synced and no longer reads back ({bad}): the disk damaged it. This replica cannot start on it; remove its data directory and let it catch up from the others"),
                    ));
                }
                tracing::warn!(index, "the log's payload at index {index} does not read back ({bad}); cutting the log there (a torn tail: never acknowledged)");
                let mut opts = WriteOptions::default();
                opts.set_sync(true);
                let mut batch = WriteBatch::default();
                batch.delete_range_cf(log, index_key(index), index_key(u64::MAX));
                batch.delete_cf(log, index_key(u64::MAX));
                if let Err(e) = self.db.write_opt(batch, &opts) {
                    fsync_failed("cutting a torn log tail", e);
                }
                return Ok(Some(index));
            }
        }
        Ok(None)
    }

    /// The first segment the log still needs: that of the first payload
    /// of its first entry with one (None: no entry has a payload).
    pub(crate) fn first_segment(db: &DB) -> io::Result<Option<u64>> {
        for item in db.iterator_cf(cf(db, CF_LOG), IteratorMode::Start) {
            let (_, v) = item.map_err(io_err)?;
            if let Some((locs, _)) = split_record(&v)? {
                if let Some(l) = locs.first() {
                    return Ok(Some(l.seg));
                }
            }
        }
        Ok(None)
    }

    /// The log id and payload locations of the entry at `index`, if it
    /// is stored with its payloads in segments.
    pub(crate) fn locs_at(db: &DB, index: u64) -> io::Result<Option<(rewind_wire::raft::LogId, Vec<Loc>)>> {
        let Some(v) = db.get_cf(cf(db, CF_LOG), index_key(index)).map_err(io_err)? else { return Ok(None) };
        let Some((locs, body)) = split_record(&v)? else { return Ok(None) };
        let entry: rewind_wire::raft::Entry = decode_record(body).map_err(|e| corrupt("log entry", e))?;
        Ok(Some((entry.log_id, locs)))
    }

    /// Bytes of entries appended since the store opened (for a snapshot
    /// policy by size).
    pub fn appended_bytes(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.appended_bytes.clone()
    }

    fn read_meta<T: rewind_wire::Decode>(&self, key: &[u8]) -> io::Result<Option<T>> {
        let bytes = self.db.get_cf(cf(&self.db, CF_META), key).map_err(io_err)?;
        bytes.map(|b| decode_record::<T>(&b).map_err(|e| corrupt("log meta record", e))).transpose()
    }
}

/// Group commit: wait for one append, take every other one already queued,
/// fsync the WAL once, and answer them all. Every callback taken was queued
/// after its entries were written, so the one fsync covers them.
fn sync_loop(db: &std::sync::Weak<DB>, segs: &std::sync::Weak<Segments>, rx: &mpsc::Receiver<IOFlushed<TypeConfig>>) {
    let mut pending = Vec::with_capacity(64);
    while let Ok(first) = rx.recv() {
        pending.push(first);
        while pending.len() < SYNC_GROUP_MAX {
            match rx.try_recv() {
                Ok(cb) => pending.push(cb),
                Err(_) => break,
            }
        }
        // Appends are queued only by live store handles, so the database is
        // still open here unless every handle was dropped mid-append.
        let Some(db) = db.upgrade() else {
            for cb in pending.drain(..) {
                cb.io_completed(Err(io_err("the log store was closed before the append was synced")));
            }
            return;
        };
        // Payloads first: a WAL record must never name bytes a crash can
        // lose (the open-time cut relies on it only for unsynced tails).
        // The position synced is recorded in the same WAL sync, so that an
        // open can tell a torn tail from damage (`segments::torn_or_damaged`).
        if let Some(segs) = segs.upgrade() {
            let (seg, len) = segs.sync();
            let mut pos = seg.to_le_bytes().to_vec();
            pos.extend_from_slice(&len.to_le_bytes());
            if let Err(e) = db.put_cf(cf(&db, CF_META), KEY_SEGMENTS_SYNCED, pos) {
                fsync_failed("recording the payloads synced", e);
            }
        }
        if let Err(e) = db.flush_wal(true) {
            fsync_failed("syncing appended log entries", e);
        }
        drop(db);
        tracing::trace!(callbacks = pending.len(), "log fsync");
        for cb in pending.drain(..) {
            cb.io_completed(Ok(()));
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// A record with payloads in segments: (their locations, the entry
/// without them). None: the entry is whole in the record.
fn split_record(v: &[u8]) -> io::Result<Option<(Vec<Loc>, &[u8])>> {
    let Some(rest) = v.strip_prefix(LOG_MAGIC) else { return Ok(None) };
    let parse = || -> Option<(Vec<Loc>, &[u8])> {
        let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        if n == 0 || n > ENTRY_PAYLOADS_MAX {
            return None;
        }
        let table = rest.get(4..4 + n * Loc::BYTES)?;
        let locs = table.chunks(Loc::BYTES).map(Loc::get).collect::<Option<Vec<_>>>()?;
        let body = &rest[4 + n * Loc::BYTES..];
        decode_record::<rewind_wire::raft::Entry>(body).ok()?;
        Some((locs, body))
    };
    // The magic can begin a whole record's checksum by chance only; then
    // the checks above fail and the record is read whole.
    Ok(parse())
}

/// The record of an entry: its payloads appended to the segments, the rest
/// (with their locations) returned. Also the bytes written for it.
fn encode_entry(segs: &Segments, entry: &Entry) -> io::Result<(Vec<u8>, u64)> {
    if let openraft::EntryPayload::Normal(cmd) = &entry.payload {
        let payloads = segments::payloads(cmd);
        if !payloads.is_empty() {
            let locs = segs.append(&payloads)?;
            let stripped = rewind_wire::raft::Entry { log_id: codec::log_id_to_wire(&entry.log_id), payload: rewind_wire::raft::Payload::Normal(segments::strip(cmd)) };
            let body = encode_record(&stripped).map_err(io_err)?;
            let mut v = Vec::with_capacity(8 + locs.len() * Loc::BYTES + body.len());
            v.extend_from_slice(LOG_MAGIC);
            v.extend_from_slice(&(locs.len() as u32).to_le_bytes());
            for l in &locs {
                l.put(&mut v);
            }
            v.extend_from_slice(&body);
            let bytes = v.len() as u64 + locs.iter().map(|l| l.len as u64 + 8).sum::<u64>();
            return Ok((v, bytes));
        }
    }
    let record = encode_record(&codec::entry_to_wire(entry)).map_err(io_err)?;
    let bytes = record.len() as u64;
    Ok((record, bytes))
}

fn decode_entry(segs: &Segments, key: &[u8], value: &[u8]) -> io::Result<Entry> {
    let entry: rewind_wire::raft::Entry = match split_record(value)? {
        Some((locs, body)) => {
            let mut entry: rewind_wire::raft::Entry = decode_record(body).map_err(|e| corrupt("log entry", e))?;
            let mut data = Vec::with_capacity(locs.len());
            for l in &locs {
                data.push(segs.read(l).map_err(|e| io::Error::new(e.kind(), format!("log entry {}: {e}", entry.log_id.index)))?);
            }
            if let rewind_wire::raft::Payload::Normal(cmd) = &mut entry.payload {
                segments::fill(cmd, data.into_iter()).map_err(|e| corrupt("log entry", e))?;
            } else {
                return Err(corrupt("log entry", "payload locations on an entry without a command"));
            }
            entry
        }
        None => decode_record(value).map_err(|e| corrupt("log entry", e))?,
    };
    let index = u64::from_be_bytes(key.try_into().map_err(|_| corrupt("log key", "not 8 bytes"))?);
    if entry.log_id.index != index {
        return Err(corrupt("log entry", format!("stored under index {index} but says {}", entry.log_id.index)));
    }
    codec::entry_from_wire(entry).map_err(|e| corrupt("log entry", e))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::From(&index_key(start), Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(io_err)?;
            let entry = decode_entry(&self.segs, &k, &v)?;
            if !range.contains(&entry.log_id.index) {
                break;
            }
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        Ok(self.read_meta::<rewind_wire::raft::Vote>(KEY_VOTE)?.map(|v| codec::vote_from_wire(&v)))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last = match self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (k, v) = item.map_err(io_err)?;
                // Only the id: its payloads are not read.
                let body = split_record(&v)?.map_or(&v[..], |(_, body)| body);
                Some(decode_entry(&self.segs, &k, body)?.log_id)
            }
        };
        let purged = self.read_meta::<rewind_wire::raft::LogId>(KEY_PURGED)?.map(|l| codec::log_id_from_wire(&l));
        Ok(LogState { last_purged_log_id: purged, last_log_id: last.or(purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let record = encode_record(&codec::vote_to_wire(vote)).map_err(io_err)?;
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = db.put_cf_opt(cf(&db, CF_META), KEY_VOTE, record, &opts) {
                fsync_failed("saving the vote", e);
            }
        })
        .await
        .map_err(io_err)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let log = cf(&self.db, CF_LOG);
        for entry in entries {
            let (record, bytes) = encode_entry(&self.segs, &entry)?;
            self.appended_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            batch.put_cf(log, index_key(entry.log_id.index), record);
        }
        // Written (readable) now; durable when the syncer's fsync returns.
        self.db.write(batch).map_err(io_err)?;
        self.syncer.send(callback).map_err(|_| io_err("the log syncer thread has stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.db.delete_range_cf(cf(&self.db, CF_LOG), index_key(from), index_key(u64::MAX)).map_err(io_err)?;
        // The last index itself: delete_range's end is exclusive.
        self.db.delete_cf(cf(&self.db, CF_LOG), index_key(u64::MAX)).map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let record = encode_record(&codec::log_id_to_wire(&log_id)).map_err(io_err)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_META), KEY_PURGED, record);
        batch.delete_range_cf(cf(&self.db, CF_LOG), index_key(0), index_key(log_id.index + 1));
        self.db.write(batch).map_err(io_err)?;
        // Payloads stay in their segments (the history may still need
        // them; the collector deletes segments). Older entries, whole in
        // their records, lie in blob files that RocksDB drops once
        // compaction has met the range delete; compact it now, on a
        // thread of its own, one at a time.
        use std::sync::atomic::Ordering::{AcqRel, Release};
        if !self.compacting.swap(true, AcqRel) {
            let (db, flag, end) = (Arc::downgrade(&self.db), self.compacting.clone(), index_key(log_id.index + 1));
            std::thread::Builder::new()
                .name("log-compact".into())
                .spawn(move || {
                    if let Some(db) = db.upgrade() {
                        let mut opts = rocksdb::CompactOptions::default();
                        opts.set_exclusive_manual_compaction(false);
                        db.compact_range_cf_opt(cf(&db, CF_LOG), None::<&[u8]>, Some(&end[..]), &opts);
                    }
                    flag.store(false, Release);
                })
                .map_err(io_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A damaged log record (any bytes, with or without the magic)
        /// parses to locations and an entry, or is read whole and refused
        /// by its checksum: never a panic.
        #[test]
        fn garbage_log_records_never_panic(mut raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), magic in proptest::prelude::any::<bool>(), n in 0u32..4) {
            if magic {
                let mut v = LOG_MAGIC.to_vec();
                v.extend_from_slice(&n.to_le_bytes());
                v.append(&mut raw);
                raw = v;
            }
            let _ = split_record(&raw);
            let dir = tempfile::tempdir().unwrap();
            let segs = Segments::open(dir.path()).unwrap();
            let _ = decode_entry(&segs, &7u64.to_be_bytes(), &raw);
        }
    }
}

