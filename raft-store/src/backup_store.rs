//! Backups in RocksDB: their records (column family `backups`), and the
//! reads a backup's importer and `rewind points` make.
//!
//! Keys, under the group's prefix: `1 | name` holds a backup's record;
//! `0 | name` exists while that backup is open, so the open ones (which
//! every append to the group checks against) are one short scan.

use rewind_wire::rpc::{BackupInfo, BackupState};
use rocksdb::{Direction, IteratorMode, DB};

use crate::backups::BackupRecord;
use crate::blocks::{BlockHash, Version, VersionIndex};
use crate::db::{cf, decode_opt, group_prefix, BlockReader, CF_BACKUPS};
use crate::io_err;

const OPEN: u8 = 0;
const RECORD: u8 = 1;

pub(crate) fn record_key(group: &str, name: &str) -> Vec<u8> {
    let mut k = group_prefix(group);
    k.push(RECORD);
    k.extend_from_slice(name.as_bytes());
    k
}

pub(crate) fn open_key(group: &str, name: &str) -> Vec<u8> {
    let mut k = group_prefix(group);
    k.push(OPEN);
    k.extend_from_slice(name.as_bytes());
    k
}

/// Names of the group's open backups, as stored.
pub(crate) fn open_names(db: &DB, group: &str) -> std::io::Result<Vec<String>> {
    let mut prefix = group_prefix(group);
    prefix.push(OPEN);
    let mut names = Vec::new();
    for item in db.iterator_cf(cf(db, CF_BACKUPS), IteratorMode::From(&prefix, Direction::Forward)) {
        let (k, _) = item.map_err(io_err)?;
        if !k.starts_with(&prefix) {
            break;
        }
        names.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
    }
    Ok(names)
}

/// One backup's record, as stored.
pub(crate) fn record(db: &DB, group: &str, name: &str) -> std::io::Result<Option<BackupRecord>> {
    decode_opt(db.get_cf(cf(db, CF_BACKUPS), record_key(group, name)).map_err(io_err)?, "backup record")
}

/// Writes a backup's record and its open marker.
pub(crate) fn put(db: &DB, batch: &mut rocksdb::WriteBatch, group: &str, r: &BackupRecord) -> std::io::Result<()> {
    let family = cf(db, CF_BACKUPS);
    batch.put_cf(family, record_key(group, &r.info.name), rewind_wire::frame::encode_record(r).map_err(io_err)?);
    if r.info.state == BackupState::Open {
        batch.put_cf(family, open_key(group, &r.info.name), []);
    } else {
        batch.delete_cf(family, open_key(group, &r.info.name));
    }
    Ok(())
}

/// The group's backups, oldest first by their start, at most `max` (the
/// newest ones).
pub(crate) fn list(db: &DB, group: &str, max: usize) -> std::io::Result<Vec<BackupInfo>> {
    let mut prefix = group_prefix(group);
    prefix.push(RECORD);
    let mut out = Vec::new();
    for item in db.iterator_cf(cf(db, CF_BACKUPS), IteratorMode::From(&prefix, Direction::Forward)) {
        let (k, v) = item.map_err(io_err)?;
        if !k.starts_with(&prefix) {
            break;
        }
        let r: BackupRecord = rewind_wire::frame::decode_record(&v).map_err(|e| crate::corrupt("backup record", e))?;
        out.push(r.info);
    }
    out.sort_by_key(|b| b.begin_lsn);
    let skip = out.len().saturating_sub(max);
    Ok(out.split_off(skip))
}

impl crate::StoreReader {
    /// The group's backups, oldest first by their start, at most `max`
    /// (the newest ones).
    pub fn backups(&self, group: &str, max: usize) -> std::io::Result<Vec<BackupInfo>> {
        list(&self.db, group, max)
    }

    /// The content hash of blocks `first..first + count` of a disk as of
    /// `lsn`, through one snapshot (a block that reads as zeroes has the
    /// zero block's hash). Hashes recorded in the versions are used as
    /// they are; older versions without one are read and hashed.
    pub fn block_hashes(&self, group: &str, disk: &str, lsn: u64, first: u64, count: u64) -> std::io::Result<Vec<BlockHash>> {
        let snap = self.db.snapshot();
        let mut reader = BlockReader::for_read(&self.db, &self.segs, &snap, group, disk)?;
        let mut out = Vec::with_capacity(count as usize);
        for block in first..first + count {
            out.push(hash_at(&mut reader, block, lsn)?);
        }
        Ok(out)
    }
}

/// Block `block`'s content hash as of `lsn`, by the read rules of
/// `blocks::block_or_zero`.
pub fn hash_at<I: VersionIndex>(index: &mut I, block: u64, lsn: u64) -> Result<BlockHash, I::Error> {
    let version = index.version(block, lsn)?;
    let since = version.as_ref().map_or(0, |(l, _)| *l);
    if since < lsn && index.zeroed_by_extent(block, since, lsn)? {
        return Ok(crate::blocks::zero_block_hash());
    }
    Ok(match version {
        None | Some((_, Version::Zero)) => crate::blocks::zero_block_hash(),
        Some((_, Version::Ref { hash: Some(h), .. })) => h,
        Some((_, Version::Data(d))) => crate::blocks::block_hash(&d),
        Some((vlsn, Version::Ref { offset, hash: None })) => crate::blocks::block_hash(&index.write_bytes(vlsn, offset)?),
    })
}
