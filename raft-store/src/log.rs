//! openraft's log storage: entries in the `log` column family, made durable
//! by a group-committing syncer thread before openraft is told they are.

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
use crate::{corrupt, fsync_failed, io_err, TypeConfig};

const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"purged";

/// Most flush callbacks one fsync answers; more wait for the next one.
const SYNC_GROUP_MAX: usize = 4096;

/// The Raft log of one shard replica.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: mpsc::Sender<IOFlushed<TypeConfig>>,
    /// A compaction of the purged range is running.
    compacting: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes of entries appended since this store opened.
    appended_bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>) -> LogStore {
        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        // A weak handle: the syncer must not keep the database open after
        // every store handle is gone (RocksDB must close before exit).
        let sync_db = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("log-sync".into())
            .spawn(move || sync_loop(&sync_db, &rx))
            .expect("spawn the log syncer thread");
        LogStore { db, syncer: tx, compacting: Arc::default(), appended_bytes: Arc::default() }
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
fn sync_loop(db: &std::sync::Weak<DB>, rx: &mpsc::Receiver<IOFlushed<TypeConfig>>) {
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

fn decode_entry(key: &[u8], value: &[u8]) -> io::Result<Entry> {
    let entry: rewind_wire::raft::Entry = decode_record(value).map_err(|e| corrupt("log entry", e))?;
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
            let entry = decode_entry(&k, &v)?;
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
                Some(decode_entry(&k, &v)?.log_id)
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
            let record = encode_record(&codec::entry_to_wire(&entry)).map_err(io_err)?;
            self.appended_bytes.fetch_add(record.len() as u64, std::sync::atomic::Ordering::Relaxed);
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
        // The purged entries' payloads lie in blob files that RocksDB drops
        // once compaction has met the range delete; compact it now, on a
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
