//! What a node's request handler reads of the applied state, as a trait:
//! [`crate::StoreReader`] implements it over RocksDB, the simulation over
//! its in-memory state machine, and `rewind-service` runs the same request
//! handling over either.

use std::io;

use futures::future::BoxFuture;

use crate::apply::{GroupRecord, ProducerRecord, StoredEvent};
use crate::db::Bookmark;
use rewind_wire::dr::DrRecord;

/// Read access to one shard replica's applied state.
///
/// Rules: every method returns what has been applied on this replica (no
/// more, and nothing older than what an earlier call returned); every
/// record is checked before it is returned, and a bad one is an
/// `InvalidData` error, never data.
pub trait ReadState: Clone + Send + Sync + 'static {
    fn group(&self, name: &str) -> io::Result<Option<GroupRecord>>;
    /// What one producer has had applied in one group.
    fn producer(&self, client_id: u64, group: &str) -> io::Result<Option<ProducerRecord>>;
    /// Events of `group` from `lsn_first` on, in LSN order: at most
    /// `count_max`, and no more once `bytes_max` payload bytes are gathered.
    fn events(&self, group: &str, lsn_first: u64, count_max: usize, bytes_max: usize) -> io::Result<Vec<StoredEvent>>;
    /// `len` bytes of `disk` from `offset` as of `lsn`, as runs of bytes
    /// that may be non-zero (`blocks::read_runs`). The caller checks the
    /// range and that `lsn` is applied.
    fn read_disk(&self, group: &str, disk: &str, lsn: u64, offset: u64, len: u64) -> io::Result<Vec<(u64, Vec<u8>)>>;
    /// The bookmarks of `group`, oldest first (by LSN), at most `max` (the
    /// newest ones).
    fn bookmarks(&self, group: &str, max: usize) -> io::Result<Vec<Bookmark>>;
    /// The event time of `lsn` in `group`, if this replica holds that event.
    fn time_of(&self, group: &str, lsn: u64) -> io::Result<Option<u64>>;
    /// The last LSN of `group` whose event time is <= `time_ns`.
    fn lsn_at_time(&self, group: &str, time_ns: u64) -> io::Result<Option<u64>>;
    /// The group's cross-site state here, if it is linked.
    fn dr(&self, group: &str) -> io::Result<Option<DrRecord>>;
    /// The group's chain digest after `lsn`, if this replica holds it.
    fn digest_at(&self, group: &str, lsn: u64) -> io::Result<Option<[u8; 32]>>;
    /// The group's retention record (the default when it has none).
    fn retention(&self, group: &str) -> io::Result<crate::retention::RetentionRecord>;
    /// What the collector has done for the group on this replica.
    fn gc(&self, group: &str) -> io::Result<crate::gc::GcRecord>;
    /// For each hash, a block of `group` with that content (checked), or
    /// None: the content index.
    fn find_blocks(&self, group: &str, hashes: &[crate::blocks::BlockHash]) -> io::Result<Vec<Option<Vec<u8>>>>;
    /// For each hash, whether `group` holds a block with that content
    /// written before LSN `before`.
    fn stored_before(&self, group: &str, hashes: &[crate::blocks::BlockHash], before: u64) -> io::Result<Vec<bool>>;
    /// For each hash, where `group` holds a block with that content at an
    /// LSN of at least `from`: (disk, block, LSN).
    fn locate_blocks(&self, group: &str, hashes: &[crate::blocks::BlockHash], from: u64) -> io::Result<Vec<Option<(String, u64, u64)>>>;
    /// The group's backups, oldest first, at most `max` (the newest).
    fn backups(&self, group: &str, max: usize) -> io::Result<Vec<rewind_wire::rpc::BackupInfo>>;
    /// The content hash of blocks `first..first + count` of a disk as of
    /// `lsn` (the zero block's hash for a block that reads as zeroes).
    fn block_hashes(&self, group: &str, disk: &str, lsn: u64, first: u64, count: u64) -> io::Result<Vec<crate::blocks::BlockHash>>;
    /// Runs `f`, which reads, where blocking is allowed: inline unless the
    /// implementation reads real disks, which moves it off the async
    /// workers.
    fn run_blocking<T: Send + 'static>(self, f: impl FnOnce(Self) -> T + Send + 'static) -> BoxFuture<'static, io::Result<T>> {
        Box::pin(async move { Ok(f(self)) })
    }
}

impl ReadState for crate::StoreReader {
    fn group(&self, name: &str) -> io::Result<Option<GroupRecord>> {
        crate::StoreReader::group(self, name)
    }

    fn producer(&self, client_id: u64, group: &str) -> io::Result<Option<ProducerRecord>> {
        crate::StoreReader::producer(self, client_id, group)
    }

    fn events(&self, group: &str, lsn_first: u64, count_max: usize, bytes_max: usize) -> io::Result<Vec<StoredEvent>> {
        crate::StoreReader::events(self, group, lsn_first, count_max, bytes_max)
    }

    fn read_disk(&self, group: &str, disk: &str, lsn: u64, offset: u64, len: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
        crate::StoreReader::read_disk(self, group, disk, lsn, offset, len)
    }

    fn bookmarks(&self, group: &str, max: usize) -> io::Result<Vec<Bookmark>> {
        crate::StoreReader::bookmarks(self, group, max)
    }

    fn time_of(&self, group: &str, lsn: u64) -> io::Result<Option<u64>> {
        crate::StoreReader::time_of(self, group, lsn)
    }

    fn lsn_at_time(&self, group: &str, time_ns: u64) -> io::Result<Option<u64>> {
        crate::StoreReader::lsn_at_time(self, group, time_ns)
    }

    fn dr(&self, group: &str) -> io::Result<Option<DrRecord>> {
        crate::StoreReader::dr(self, group)
    }

    fn digest_at(&self, group: &str, lsn: u64) -> io::Result<Option<[u8; 32]>> {
        crate::StoreReader::digest_at(self, group, lsn)
    }

    fn retention(&self, group: &str) -> io::Result<crate::retention::RetentionRecord> {
        crate::StoreReader::retention(self, group)
    }

    fn gc(&self, group: &str) -> io::Result<crate::gc::GcRecord> {
        crate::StoreReader::gc(self, group)
    }

    fn find_blocks(&self, group: &str, hashes: &[crate::blocks::BlockHash]) -> io::Result<Vec<Option<Vec<u8>>>> {
        crate::StoreReader::find_blocks(self, group, hashes)
    }

    fn stored_before(&self, group: &str, hashes: &[crate::blocks::BlockHash], before: u64) -> io::Result<Vec<bool>> {
        crate::StoreReader::stored_before(self, group, hashes, before)
    }

    fn backups(&self, group: &str, max: usize) -> io::Result<Vec<rewind_wire::rpc::BackupInfo>> {
        crate::StoreReader::backups(self, group, max)
    }

    fn locate_blocks(&self, group: &str, hashes: &[crate::blocks::BlockHash], from: u64) -> io::Result<Vec<Option<(String, u64, u64)>>> {
        crate::StoreReader::locate_blocks(self, group, hashes, from)
    }

    fn block_hashes(&self, group: &str, disk: &str, lsn: u64, first: u64, count: u64) -> io::Result<Vec<crate::blocks::BlockHash>> {
        crate::StoreReader::block_hashes(self, group, disk, lsn, first, count)
    }

    fn run_blocking<T: Send + 'static>(self, f: impl FnOnce(Self) -> T + Send + 'static) -> BoxFuture<'static, io::Result<T>> {
        Box::pin(async move { tokio::task::spawn_blocking(move || f(self)).await.map_err(|e| io::Error::other(format!("read task: {e}"))) })
    }
}
