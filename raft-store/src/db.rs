//! Opening the database and reading the state machine's tables.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, DB};

use crate::apply::{BranchRecord, GroupRecord, ProducerRecord, StoredEvent};
use crate::gc::GcRecord;
use crate::retention::RetentionRecord;
use rewind_wire::dr::DrRecord;
use crate::{corrupt, io_err, LogStore, StateMachine};

pub(crate) const CF_LOG: &str = "log";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_SM: &str = "sm";
pub(crate) const CF_GROUPS: &str = "groups";
pub(crate) const CF_EVENTS: &str = "events";
pub(crate) const CF_TIMES: &str = "times";
pub(crate) const CF_PRODUCERS: &str = "producers";
pub(crate) const CF_BLOCKS: &str = "blocks";
pub(crate) const CF_EXTENTS: &str = "extents";
pub(crate) const CF_MARKS: &str = "marks";
pub(crate) const CF_CHAIN: &str = "chain";
pub(crate) const CF_DR: &str = "dr";
pub(crate) const CF_BRANCHES: &str = "branches";
pub(crate) const CF_RETENTION: &str = "retention";
pub(crate) const CF_GC: &str = "gc";
pub(crate) const CF_CONTENT: &str = "content";
pub(crate) const CF_BACKUPS: &str = "backups";
pub(crate) const CF_SEGREFS: &str = "segrefs";

/// The column families that make up the state machine, in snapshot order.
/// New families go at the end: a snapshot stream names them by position.
/// (`segrefs` names this replica's own segments: a snapshot stream leaves
/// it out and carries the payloads instead.)
pub(crate) const SM_CFS: [&str; 16] =
    [CF_SM, CF_GROUPS, CF_EVENTS, CF_TIMES, CF_PRODUCERS, CF_BLOCKS, CF_EXTENTS, CF_MARKS, CF_CHAIN, CF_DR, CF_BRANCHES, CF_RETENTION, CF_GC, CF_CONTENT, CF_BACKUPS, CF_SEGREFS];

/// The column families a group's keys live in under its prefix.
pub(crate) const GROUP_KEYED_CFS: [&str; 9] = [CF_EVENTS, CF_TIMES, CF_BLOCKS, CF_EXTENTS, CF_MARKS, CF_CHAIN, CF_CONTENT, CF_BACKUPS, CF_SEGREFS];

/// A shard replica's storage: the log store and state machine share one DB.
pub struct Store {
    pub log: LogStore,
    pub state_machine: StateMachine,
    pub reader: StoreReader,
    /// Frees what the groups' windows released (run it on a thread).
    pub collector: crate::gc::Collector,
}

/// Opens (or creates) the store in `dir`, finishing a snapshot install that
/// a crash interrupted.
pub fn open(dir: &Path) -> std::io::Result<Store> {
    std::fs::create_dir_all(dir)?;
    let db = open_db(dir)?;
    crate::format::check_format(&db, dir)?;
    let db = Arc::new(db);
    let snapshot_dir: PathBuf = dir.join("snapshots");
    std::fs::create_dir_all(&snapshot_dir)?;
    let gc_lock = Arc::new(tokio::sync::Mutex::new(()));
    let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let segs = Arc::new(crate::segments::Segments::open(&dir.join("segments"))?);
    let log = LogStore::new(db.clone(), segs.clone());
    log.cut_torn_tail()?;
    let state_machine = StateMachine::open(db.clone(), segs.clone(), snapshot_dir.clone(), gc_lock.clone(), generation.clone())?;
    let collector = crate::gc::Collector::new(db.clone(), segs.clone(), gc_lock, generation);
    Ok(Store { log, state_machine, reader: StoreReader { db, segs, snapshot_dir }, collector })
}

/// Bytes of RocksDB's block cache, shared by every table of a store.
const BLOCK_CACHE_BYTES: usize = 256 << 20;

/// The database with this build's column families and options.
pub(crate) fn open_db(dir: &Path) -> std::io::Result<DB> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_max_total_wal_size(128 << 20);
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
    // Block versions: mostly small references; materialised partial
    // blocks (4 KiB) go to blob files like payloads. Reads are point seeks,
    // so a prefix bloom on (group, disk, block) would not help seek_for_prev;
    // a block cache does.
    let mut blocks = Options::default();
    blocks.set_write_buffer_size(64 << 20);
    blocks.set_enable_blob_files(true);
    blocks.set_min_blob_size(4096);
    blocks.set_enable_blob_gc(true);
    // One block cache for every table: the collector and replays read the
    // index back (flushes and compactions wrote it past the page cache),
    // and a miss costs a read call and often the disk.
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(&cache);
    let cfs = [CF_LOG, CF_META].into_iter().chain(SM_CFS).map(|name| {
        let mut o = match name {
            CF_LOG | CF_EVENTS => payload.clone(),
            CF_BLOCKS => blocks.clone(),
            _ => Options::default(),
        };
        o.set_block_based_table_factory(&table);
        // The collector deletes old events, times, chain links and block
        // versions in runs: a table file dense with deletes is compacted
        // soon, or reads would step over the tombstones for long.
        if matches!(name, CF_EVENTS | CF_TIMES | CF_CHAIN | CF_BLOCKS | CF_MARKS | CF_CONTENT) {
            o.add_compact_on_deletion_collector_factory(128, 32, 0.25);
        }
        ColumnFamilyDescriptor::new(name, o)
    });
    let cfs: Vec<ColumnFamilyDescriptor> = cfs.collect();
    DB::open_cf_descriptors(&opts, dir.join("db"), cfs).map_err(|e| {
        if e.to_string().contains("lock") {
            std::io::Error::other(format!("the store in {} is in use (is its node running? stop it first): {e}", dir.display()))
        } else {
            io_err(e)
        }
    })
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

/// (group, disk): the prefix of a disk's block and extent keys.
pub(crate) fn disk_prefix(group: &str, disk: &str) -> Vec<u8> {
    let mut k = group_prefix(group);
    k.push(disk.len() as u8);
    k.extend_from_slice(disk.as_bytes());
    k
}

pub(crate) fn block_key(group: &str, disk: &str, block: u64, lsn: u64) -> Vec<u8> {
    let mut k = disk_prefix(group, disk);
    k.extend_from_slice(&block.to_be_bytes());
    k.extend_from_slice(&lsn.to_be_bytes());
    k
}

pub(crate) fn extent_key(group: &str, disk: &str, lsn: u64) -> Vec<u8> {
    let mut k = disk_prefix(group, disk);
    k.extend_from_slice(&lsn.to_be_bytes());
    k
}

pub(crate) fn mark_key(group: &str, name: &str, lsn: u64) -> Vec<u8> {
    let mut k = group_prefix(group);
    k.push(name.len() as u8);
    k.extend_from_slice(name.as_bytes());
    k.extend_from_slice(&lsn.to_be_bytes());
    k
}

/// A bookmark as stored: `time_ns | app_consistent`.
pub(crate) fn mark_value(time_ns: u64, app_consistent: bool) -> Vec<u8> {
    let mut v = time_ns.to_le_bytes().to_vec();
    v.push(app_consistent as u8);
    v
}

/// A chain record: the digest after the event, and (since retention) the
/// event's time, payload bytes and shape (`retention::Shape`), which move
/// the window and free the event without reading its payload. A 32-byte
/// record (written before) has only the digest.
pub(crate) fn chain_value_of(digest: &[u8; 32], event: &StoredEvent) -> Vec<u8> {
    let shape = crate::retention::Shape::encode(&event.event);
    let mut v = Vec::with_capacity(48 + shape.len());
    v.extend_from_slice(digest);
    v.extend_from_slice(&event.time_ns.to_le_bytes());
    v.extend_from_slice(&(event.event.payload_bytes() as u64).to_le_bytes());
    v.extend_from_slice(&shape);
    v
}

/// A chain record's digest and, if it has them, (time, payload bytes)
/// and the event's shape.
pub(crate) struct ChainValue {
    pub digest: [u8; 32],
    pub info: Option<(u64, u64)>,
    pub shape: Option<crate::retention::Shape>,
}

pub(crate) fn chain_value(v: &[u8]) -> std::io::Result<ChainValue> {
    let digest: [u8; 32] = v.get(..32).and_then(|d| d.try_into().ok()).ok_or_else(|| corrupt("chain record", format!("{} bytes", v.len())))?;
    if v.len() == 32 {
        return Ok(ChainValue { digest, info: None, shape: None });
    }
    if v.len() < 48 {
        return Err(corrupt("chain record", format!("{} bytes", v.len())));
    }
    let info = Some((u64::from_le_bytes(v[32..40].try_into().expect("8")), u64::from_le_bytes(v[40..48].try_into().expect("8"))));
    let shape = crate::retention::Shape::decode(&v[48..]).map_err(|e| corrupt("chain record", e))?;
    Ok(ChainValue { digest, info, shape: Some(shape) })
}

/// The first key after every key that starts with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

/// A named point in a group's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookmark {
    pub name: String,
    pub lsn: u64,
    pub time_ns: u64,
    pub app_consistent: bool,
}

/// State-machine writes of one `apply` call not yet in the store, so that
/// later events of the same call see earlier ones.
#[derive(Default)]
pub(crate) struct Overlay {
    pub blocks: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    pub extents: std::collections::BTreeMap<Vec<u8>, (u64, u64)>,
    /// Write events by event key, for `Ref` versions.
    pub writes: std::collections::HashMap<Vec<u8>, Arc<StoredEvent>>,
}

/// Reads blocks of one disk as of LSNs, from the store and an overlay.
/// Keeps the last events it decoded, since neighbouring blocks usually come
/// from the same write. A branch group (a failback's kept events) reads
/// what it does not hold from its base group as of the fork.
pub(crate) struct BlockReader<'a> {
    db: &'a DB,
    segs: &'a crate::segments::Segments,
    /// A replay's consistent view: the collector may change the index
    /// between two reads of one block otherwise.
    snap: Option<&'a rocksdb::SnapshotWithThreadMode<'a, DB>>,
    overlay: Option<&'a Overlay>,
    group: &'a str,
    disk: &'a str,
    /// The base group and the LSN it is read at, for a branch.
    base: Option<(String, u64)>,
    recent: std::collections::VecDeque<(u64, Arc<StoredEvent>)>,
    /// Iterators kept across blocks (making one costs more than a seek),
    /// made on first use: indexing an aligned write reads nothing.
    blocks_it: Option<rocksdb::DBRawIteratorWithThreadMode<'a, DB>>,
    extents_it: Option<rocksdb::DBRawIteratorWithThreadMode<'a, DB>>,
}

const RECENT_EVENTS: usize = 8;

/// Decodes a checked record read from the store, if there was one.
pub(crate) fn decode_opt<T: rewind_wire::Decode>(bytes: Option<Vec<u8>>, what: &str) -> std::io::Result<Option<T>> {
    bytes.map(|b| rewind_wire::frame::decode_record(&b).map_err(|e| corrupt(what, e))).transpose()
}

/// A branch's record: the group and LSN it forked from.
pub(crate) fn branch_of(db: &DB, group: &str) -> std::io::Result<Option<BranchRecord>> {
    let bytes = db.get_cf(cf(db, CF_BRANCHES), group.as_bytes()).map_err(io_err)?;
    bytes.map(|b| rewind_wire::frame::decode_record(&b).map_err(|e| corrupt("branch record", e))).transpose()
}

impl<'a> BlockReader<'a> {
    /// A reader for indexing a group's new events: never a branch (a
    /// branch takes no events), so no branch record is looked up.
    pub(crate) fn new(db: &'a DB, segs: &'a crate::segments::Segments, overlay: Option<&'a Overlay>, group: &'a str, disk: &'a str) -> BlockReader<'a> {
        BlockReader { db, segs, snap: None, overlay, group, disk, base: None, recent: Default::default(), blocks_it: None, extents_it: None }
    }

    /// A reader of the applied state as of `snap`, for any group, a
    /// branch included.
    pub(crate) fn for_read(db: &'a DB, segs: &'a crate::segments::Segments, snap: &'a rocksdb::SnapshotWithThreadMode<'a, DB>, group: &'a str, disk: &'a str) -> std::io::Result<BlockReader<'a>> {
        let base = branch_of(db, group)?.map(|b| (b.base, b.base_lsn));
        Ok(BlockReader { base, snap: Some(snap), ..BlockReader::new(db, segs, None, group, disk) })
    }

    fn iterator(&self, family: &str) -> rocksdb::DBRawIteratorWithThreadMode<'a, DB> {
        match self.snap {
            Some(s) => s.raw_iterator_cf(cf(self.db, family)),
            None => self.db.raw_iterator_cf(cf(self.db, family)),
        }
    }

    /// The group whose keys hold LSN `lsn`: the base, for a branch's LSNs
    /// up to its fork.
    fn owner(&self, lsn: u64) -> &str {
        match &self.base {
            Some((base, at)) if lsn <= *at => base,
            _ => self.group,
        }
    }

    /// The newest version of `block` at or below `lsn` in `group`'s keys:
    /// (its LSN, encoded).
    fn seek_version(&mut self, group: &str, block: u64, lsn: u64) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        let key = block_key(group, self.disk, block, lsn);
        let block_prefix = &key[..key.len() - 8];
        if self.blocks_it.is_none() {
            self.blocks_it = Some(self.iterator(CF_BLOCKS));
        }
        let it = self.blocks_it.as_mut().expect("made above");
        it.seek_for_prev(&key);
        let mut found = None;
        if it.valid() {
            let k = it.key().expect("valid");
            if k.len() == key.len() && &k[..block_prefix.len()] == block_prefix {
                found = Some((be_u64(&k[block_prefix.len()..]), it.value().expect("valid").to_vec()));
            }
        } else {
            it.status().map_err(io_err)?;
        }
        if let Some(o) = self.overlay {
            let low = block_key(group, self.disk, block, 0);
            if let Some((k, v)) = o.blocks.range(low..=key.clone()).next_back() {
                let l = be_u64(&k[block_prefix.len()..]);
                if found.as_ref().is_none_or(|(f, _)| l > *f) {
                    found = Some((l, v.clone()));
                }
            }
        }
        Ok(found)
    }

    /// The newest version of `block` at or below `lsn`: (its LSN, encoded).
    fn encoded_version(&mut self, block: u64, lsn: u64) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        let group = self.group;
        if let Some(found) = self.seek_version(group, block, lsn)? {
            return Ok(Some(found));
        }
        match self.base.clone() {
            Some((base, at)) => self.seek_version(&base, block, lsn.min(at)),
            None => Ok(None),
        }
    }

    fn write_event(&mut self, lsn: u64) -> std::io::Result<Arc<StoredEvent>> {
        if let Some((_, e)) = self.recent.iter().find(|(l, _)| *l == lsn) {
            return Ok(e.clone());
        }
        let key = event_key(self.owner(lsn), lsn);
        let event = match self.overlay.and_then(|o| o.writes.get(&key)) {
            Some(e) => e.clone(),
            None => {
                let got = match self.snap {
                    Some(s) => s.get_cf(cf(self.db, CF_EVENTS), &key),
                    None => self.db.get_cf(cf(self.db, CF_EVENTS), &key),
                };
                let bytes = got
                    .map_err(io_err)?
                    .ok_or_else(|| corrupt("block index", format!("block refers to LSN {lsn}, which the store does not hold")))?;
                let e = crate::segments::decode_event(self.segs, &bytes)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("event record at LSN {lsn} of group {}: {e}", self.group)))?;
                Arc::new(e)
            }
        };
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back((lsn, event.clone()));
        Ok(event)
    }

    fn what(&self, block: u64, vlsn: u64) -> String {
        format!("block {block} of disk {} in group {} (version at LSN {vlsn})", self.disk, self.group)
    }

    /// Block `block` of the disk as of `lsn` (BLOCK_BYTES bytes), checked.
    pub(crate) fn block_at(&mut self, block: u64, lsn: u64) -> std::io::Result<Vec<u8>> {
        Ok(crate::blocks::block_or_zero(self, block, lsn)?.unwrap_or_else(|| vec![0u8; crate::blocks::BLOCK_BYTES as usize]))
    }

    /// Whether an extent of `group` with LSN in `after+1..=upto` zeroes `block`.
    fn extent_covers(&mut self, group: &str, block: u64, after: u64, upto: u64) -> std::io::Result<bool> {
        if after >= upto {
            return Ok(false);
        }
        let start = extent_key(group, self.disk, after + 1);
        let end = extent_key(group, self.disk, upto);
        let prefix = &start[..start.len() - 8];
        let covers = |v: &[u8]| {
            let first = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
            let last = u64::from_le_bytes(v[8..16].try_into().expect("8 bytes"));
            (first..last).contains(&block)
        };
        if self.extents_it.is_none() {
            self.extents_it = Some(self.iterator(CF_EXTENTS));
        }
        let it = self.extents_it.as_mut().expect("made above");
        it.seek(&start);
        while it.valid() {
            let k = it.key().expect("valid");
            if k.len() != start.len() || k[..prefix.len()] != prefix[..] || k > &end[..] {
                break;
            }
            let v = it.value().expect("valid");
            if v.len() != 16 {
                return Err(corrupt("extent record", format!("{} bytes", v.len())));
            }
            if covers(v) {
                return Ok(true);
            }
            it.next();
        }
        it.status().map_err(io_err)?;
        if let Some(o) = self.overlay {
            for (_, (first, last)) in o.extents.range(start.clone()..=end) {
                if (*first..*last).contains(&block) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

impl crate::blocks::VersionIndex for BlockReader<'_> {
    type Error = std::io::Error;

    fn version(&mut self, block: u64, lsn: u64) -> std::io::Result<Option<(u64, crate::blocks::Version)>> {
        let Some((vlsn, bytes)) = self.encoded_version(block, lsn)? else { return Ok(None) };
        let version = crate::blocks::Version::decode(&bytes).map_err(|e| corrupt(&self.what(block, vlsn), e))?;
        Ok(Some((vlsn, version)))
    }

    /// Whether an extent with LSN in `after+1..=upto` zeroes `block`: the
    /// group's own, and for a branch its base's up to the fork.
    fn zeroed_by_extent(&mut self, block: u64, after: u64, upto: u64) -> std::io::Result<bool> {
        let group = self.group;
        if self.extent_covers(group, block, after, upto)? {
            return Ok(true);
        }
        match self.base.clone() {
            Some((base, at)) => self.extent_covers(&base, block, after, upto.min(at)),
            None => Ok(false),
        }
    }

    fn write_bytes(&mut self, lsn: u64, offset: u32) -> std::io::Result<Vec<u8>> {
        use crate::blocks::BLOCK_BYTES;
        let event = self.write_event(lsn)?;
        match &event.event {
            rewind_wire::event::Event::Write { data, .. } if (offset as usize) + BLOCK_BYTES as usize <= data.len() => {
                Ok(data[offset as usize..offset as usize + BLOCK_BYTES as usize].to_vec())
            }
            _ => Err(corrupt(&format!("a block of disk {} in group {} (version at LSN {lsn})", self.disk, self.group), "the version refers to bytes its event does not hold")),
        }
    }
}

pub(crate) fn group_prefix(group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + group.len() + 16);
    k.push(group.len() as u8);
    k.extend_from_slice(group.as_bytes());
    k
}

/// Read access to the applied state, for status, tests and replay.
#[derive(Clone)]
pub struct StoreReader {
    pub(crate) db: Arc<DB>,
    pub(crate) segs: Arc<crate::segments::Segments>,
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
            let event = crate::segments::decode_event(&self.segs, &v)?;
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

    /// `len` bytes of `disk` from `offset`, as of `lsn`, as runs of bytes
    /// that may be non-zero: (offset from `offset`, bytes), in order; the
    /// rest reads as zeroes. Each block is checked against its checksum (or
    /// its event's). The caller bounds `len`.
    ///
    /// A point outside what the group keeps (`RetentionRecord::keeps`) is
    /// a `NotFound` error: the check and the reads see one snapshot, so
    /// the collector cannot free what a read is using.
    pub fn read_disk(&self, group: &str, disk: &str, lsn: u64, offset: u64, len: u64) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        let snap = self.db.snapshot();
        let retention = decode_opt::<RetentionRecord>(snap.get_cf(cf(&self.db, CF_RETENTION), group.as_bytes()).map_err(io_err)?, "retention record")?.unwrap_or_default();
        if !retention.keeps(lsn) {
            let last = self.group(group)?.map_or(0, |g| g.last_lsn);
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, retention.outside(group, lsn, last)));
        }
        let mut reader = BlockReader::for_read(&self.db, &self.segs, &snap, group, disk)?;
        let runs = crate::blocks::read_runs(&mut reader, lsn, offset, len);
        drop(reader);
        runs
    }

    /// The group's retention record (the default if it has none).
    pub fn retention(&self, group: &str) -> std::io::Result<RetentionRecord> {
        Ok(decode_opt(self.db.get_cf(cf(&self.db, CF_RETENTION), group.as_bytes()).map_err(io_err)?, "retention record")?.unwrap_or_default())
    }

    /// What the collector has done for the group on this replica.
    pub fn gc(&self, group: &str) -> std::io::Result<GcRecord> {
        Ok(decode_opt(self.db.get_cf(cf(&self.db, CF_GC), group.as_bytes()).map_err(io_err)?, "collector record")?.unwrap_or_default())
    }

    /// The bookmarks of `group`, oldest first (by LSN), at most `max`
    /// (the newest ones).
    pub fn bookmarks(&self, group: &str, max: usize) -> std::io::Result<Vec<Bookmark>> {
        let prefix = group_prefix(group);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(&self.db, CF_MARKS), IteratorMode::From(&prefix, Direction::Forward)) {
            let (k, v) = item.map_err(io_err)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let rest = &k[prefix.len()..];
            let name_len = *rest.first().ok_or_else(|| corrupt("bookmark key", "empty"))? as usize;
            if rest.len() != 1 + name_len + 8 || v.len() != 9 {
                return Err(corrupt("bookmark record", format!("key of {} bytes, value of {}", rest.len(), v.len())));
            }
            out.push(Bookmark {
                name: String::from_utf8_lossy(&rest[1..1 + name_len]).into_owned(),
                lsn: be_u64(&rest[1 + name_len..]),
                time_ns: u64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
                app_consistent: v[8] != 0,
            });
        }
        out.sort_by_key(|b| b.lsn);
        if out.len() > max {
            out.drain(..out.len() - max);
        }
        Ok(out)
    }

    /// The event time of `lsn` in `group`, if the store holds that event.
    pub fn time_of(&self, group: &str, lsn: u64) -> std::io::Result<Option<u64>> {
        Ok(self.events(group, lsn, 1, 1)?.into_iter().find(|e| e.lsn == lsn).map(|e| e.time_ns))
    }

    /// The group's DR state at this site, if it is linked.
    pub fn dr(&self, group: &str) -> std::io::Result<Option<DrRecord>> {
        let bytes = self.db.get_cf(cf(&self.db, CF_DR), group.as_bytes()).map_err(io_err)?;
        bytes.map(|b| rewind_wire::frame::decode_record(&b).map_err(|e| corrupt("DR record", e))).transpose()
    }

    /// Every linked group's DR state at this site.
    pub fn dr_all(&self) -> std::io::Result<Vec<(String, DrRecord)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(&self.db, CF_DR), IteratorMode::Start) {
            let (k, v) = item.map_err(io_err)?;
            let record = rewind_wire::frame::decode_record(&v).map_err(|e| corrupt("DR record", e))?;
            out.push((String::from_utf8_lossy(&k).into_owned(), record));
        }
        Ok(out)
    }

    /// The group's chain digest after `lsn` (all zeroes at LSN 0), if this
    /// replica holds that LSN.
    pub fn digest_at(&self, group: &str, lsn: u64) -> std::io::Result<Option<[u8; 32]>> {
        if lsn == 0 {
            return Ok(Some([0; 32]));
        }
        match self.db.get_cf(cf(&self.db, CF_CHAIN), event_key(group, lsn)).map_err(io_err)? {
            Some(v) => Ok(Some(chain_value(&v)?.digest)),
            None => Ok(None),
        }
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
