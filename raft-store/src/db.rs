//! Opening the database and reading the state machine's tables.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, DB};

use crate::apply::{GroupRecord, ProducerRecord, StoredEvent};
use crate::{corrupt, io_err, LogStore, StateMachine};

pub(crate) const CF_LOG: &str = "log";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_SM: &str = "sm";
pub(crate) const CF_GROUPS: &str = "groups";
pub(crate) const CF_EVENTS: &str = "events";
pub(crate) const CF_TIMES: &str = "times";
pub(crate) const CF_PRODUCERS: &str = "producers";

/// The column families that make up the state machine, in snapshot order.
pub(crate) const SM_CFS: [&str; 5] = [CF_SM, CF_GROUPS, CF_EVENTS, CF_TIMES, CF_PRODUCERS];

/// A shard replica's storage: the log store and state machine share one DB.
pub struct Store {
    pub log: LogStore,
    pub state_machine: StateMachine,
    pub reader: StoreReader,
}

/// Opens (or creates) the store in `dir`, finishing a snapshot install that
/// a crash interrupted.
pub fn open(dir: &Path) -> std::io::Result<Store> {
    std::fs::create_dir_all(dir)?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_max_total_wal_size(512 << 20);
    // The state machine writes without the WAL (the Raft log already holds
    // every payload); flushing all column families together keeps what a
    // crash leaves on disk consistent across them.
    opts.set_atomic_flush(true);
    // Flushes and compactions bypass the page cache: it saves a copy of
    // every byte written, and nothing reads those files back soon.
    opts.set_use_direct_io_for_flush_and_compaction(true);
    // Payloads (log entries and events) go to blob files when a memtable is
    // flushed, so compaction moves only keys, never payload bytes; blobs of
    // purged entries are dropped as compaction meets them.
    let mut payload = Options::default();
    payload.set_write_buffer_size(64 << 20);
    payload.set_enable_blob_files(true);
    payload.set_min_blob_size(4096);
    payload.set_enable_blob_gc(true);
    let cfs = [CF_LOG, CF_META, CF_SM, CF_GROUPS, CF_EVENTS, CF_TIMES, CF_PRODUCERS].map(|name| {
        let o = match name {
            CF_LOG | CF_EVENTS => payload.clone(),
            _ => Options::default(),
        };
        ColumnFamilyDescriptor::new(name, o)
    });
    let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs).map_err(io_err)?;
    let db = Arc::new(db);
    let snapshot_dir: PathBuf = dir.join("snapshots");
    std::fs::create_dir_all(&snapshot_dir)?;
    let state_machine = StateMachine::open(db.clone(), snapshot_dir.clone())?;
    Ok(Store { log: LogStore::new(db.clone()), state_machine, reader: StoreReader { db, snapshot_dir } })
}

/// Makes the state machine's tables durable: flushes their memtables (all
/// column families at once) and waits. Called before a snapshot is reported,
/// so the log behind it may be purged.
pub(crate) fn flush_state_machine(db: &DB) -> std::io::Result<()> {
    let cfs: Vec<&rocksdb::ColumnFamily> = SM_CFS.iter().map(|n| cf(db, n)).collect();
    let mut opts = rocksdb::FlushOptions::default();
    opts.set_wait(true);
    db.flush_cfs_opt(&cfs, &opts).map_err(io_err)
}

pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} is created at open"))
}

/// Key of an event: (group, LSN), groups kept apart by a length prefix.
pub(crate) fn event_key(group: &str, lsn: u64) -> Vec<u8> {
    let mut k = group_prefix(group);
    k.extend_from_slice(&lsn.to_be_bytes());
    k
}

pub(crate) fn time_key(group: &str, time_ns: u64, lsn: u64) -> Vec<u8> {
    let mut k = group_prefix(group);
    k.extend_from_slice(&time_ns.to_be_bytes());
    k.extend_from_slice(&lsn.to_be_bytes());
    k
}

pub(crate) fn producer_key(client_id: u64, group: &str) -> Vec<u8> {
    let mut k = client_id.to_be_bytes().to_vec();
    k.extend_from_slice(group.as_bytes());
    k
}

fn group_prefix(group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + group.len() + 16);
    k.push(group.len() as u8);
    k.extend_from_slice(group.as_bytes());
    k
}

/// Read access to the applied state, for status, tests and replay.
#[derive(Clone)]
pub struct StoreReader {
    pub(crate) db: Arc<DB>,
    snapshot_dir: PathBuf,
}

impl StoreReader {
    /// A fresh path in the snapshot directory for a snapshot being received.
    pub fn incoming_snapshot_path(&self, tag: u64) -> PathBuf {
        self.snapshot_dir.join(format!("incoming-{tag:016x}.tmp"))
    }

    pub fn group(&self, name: &str) -> std::io::Result<Option<GroupRecord>> {
        let bytes = self.db.get_cf(cf(&self.db, CF_GROUPS), name.as_bytes()).map_err(io_err)?;
        bytes.map(|b| rewind_wire::frame::decode_record(&b).map_err(|e| corrupt("group record", e))).transpose()
    }

    /// What one producer has had applied in one group.
    pub fn producer(&self, client_id: u64, group: &str) -> std::io::Result<Option<ProducerRecord>> {
        let bytes = self.db.get_cf(cf(&self.db, CF_PRODUCERS), producer_key(client_id, group)).map_err(io_err)?;
        bytes.map(|b| rewind_wire::frame::decode_record(&b).map_err(|e| corrupt("producer record", e))).transpose()
    }

    pub fn groups(&self) -> std::io::Result<Vec<GroupRecord>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(&self.db, CF_GROUPS), IteratorMode::Start) {
            let (_, v) = item.map_err(io_err)?;
            out.push(rewind_wire::frame::decode_record(&v).map_err(|e| corrupt("group record", e))?);
        }
        Ok(out)
    }

    /// Events of `group` from `lsn_first` on, in LSN order, each checked
    /// against its checksum: at most `count_max`, and no more once
    /// `bytes_max` payload bytes are gathered.
    pub fn events(&self, group: &str, lsn_first: u64, count_max: usize, bytes_max: usize) -> std::io::Result<Vec<StoredEvent>> {
        let start = event_key(group, lsn_first);
        let prefix_len = 1 + group.len();
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(cf(&self.db, CF_EVENTS), IteratorMode::From(&start, Direction::Forward));
        let mut bytes = 0usize;
        for item in iter.take(count_max) {
            let (k, v) = item.map_err(io_err)?;
            if k.len() != prefix_len + 8 || k[..prefix_len] != start[..prefix_len] {
                break;
            }
            let event: StoredEvent = rewind_wire::frame::decode_record(&v).map_err(|e| corrupt("event record", e))?;
            let lsn = u64::from_be_bytes(k[prefix_len..].try_into().expect("8 bytes"));
            if event.lsn != lsn {
                return Err(corrupt("event record", format!("key says LSN {lsn}, record says {}", event.lsn)));
            }
            bytes += event.event.payload_bytes();
            out.push(event);
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(out)
    }

    /// The last LSN of `group` whose event time is <= `time_ns`.
    pub fn lsn_at_time(&self, group: &str, time_ns: u64) -> std::io::Result<Option<u64>> {
        let probe = time_key(group, time_ns, u64::MAX);
        let prefix_len = 1 + group.len();
        let mut iter = self.db.iterator_cf(cf(&self.db, CF_TIMES), IteratorMode::From(&probe, Direction::Reverse));
        match iter.next() {
            Some(item) => {
                let (k, _) = item.map_err(io_err)?;
                if k.len() != prefix_len + 16 || k[..prefix_len] != probe[..prefix_len] {
                    return Ok(None);
                }
                Ok(Some(u64::from_be_bytes(k[prefix_len + 8..].try_into().expect("8 bytes"))))
            }
            None => Ok(None),
        }
    }
}
