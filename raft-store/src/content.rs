//! The content index: which block versions a group holds, by blake3
//! (column family `content`, key `group | blake3 | disk | block | LSN`,
//! empty values). Entries are written, moved and freed with their versions
//! (`sm.rs`, `gc.rs`); these are its keys and its look-ups.

use std::sync::Arc;

use crate::apply::StoredEvent;
use crate::db::{be_u64, block_key, cf, event_key, group_prefix, StoreReader, CF_BLOCKS, CF_CONTENT, CF_EVENTS};
use crate::{corrupt, io_err};

/// Key of a content index entry: the group, the block's blake3, then
/// where the version lies (its block key's disk, block and LSN). The value
/// is empty.
pub(crate) fn content_key(group: &str, hash: &[u8; 32], disk: &str, block: u64, lsn: u64) -> Vec<u8> {
    let mut k = group_prefix(group);
    k.extend_from_slice(hash);
    k.push(disk.len() as u8);
    k.extend_from_slice(disk.as_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k.extend_from_slice(&lsn.to_be_bytes());
    k
}

/// The (disk, block, LSN) of a content key under `prefix` (group | hash).
pub(crate) fn content_location(prefix_len: usize, key: &[u8]) -> Option<(String, u64, u64)> {
    let rest = key.get(prefix_len..)?;
    let (&n, rest) = rest.split_first()?;
    let n = n as usize;
    if rest.len() != n + 16 {
        return None;
    }
    let disk = std::str::from_utf8(&rest[..n]).ok()?.to_string();
    Some((disk, be_u64(&rest[n..n + 8]), be_u64(&rest[n + 8..])))
}

/// Calls `each` with the (disk, block, LSN) of each content entry of
/// `hash` in `group`, in key order, while it returns true.
fn each_entry<D: rocksdb::DBAccess>(
    it: &mut rocksdb::DBRawIteratorWithThreadMode<'_, D>,
    group: &str,
    hash: &crate::blocks::BlockHash,
    mut each: impl FnMut((String, u64, u64)) -> bool,
) -> std::io::Result<()> {
    let mut prefix = group_prefix(group);
    prefix.extend_from_slice(hash);
    it.seek(&prefix);
    while it.valid() {
        let k = it.key().expect("valid");
        if !k.starts_with(&prefix) {
            break;
        }
        if !each(content_location(prefix.len(), k).ok_or_else(|| corrupt("content index", "malformed key"))?) {
            return Ok(());
        }
        it.next();
    }
    it.status().map_err(io_err)
}

impl StoreReader {
    /// For each hash, where `group` holds a block version with that content
    /// written at or after LSN `from` (the newest such entry), from the
    /// content index's keys alone. Versions from `from` on are the same on
    /// every replica (a collector frees only what lies before the window),
    /// so a copy that names one reads the same bytes everywhere.
    pub fn locate_blocks(&self, group: &str, hashes: &[crate::blocks::BlockHash], from: u64) -> std::io::Result<Vec<Option<(String, u64, u64)>>> {
        /// Entries looked at per hash, at most.
        const ENTRIES_MAX: usize = 64;
        let mut it = self.db.raw_iterator_cf(cf(&self.db, CF_CONTENT));
        let mut out = Vec::with_capacity(hashes.len());
        for hash in hashes {
            let mut best: Option<(String, u64, u64)> = None;
            let mut seen = 0;
            each_entry(&mut it, group, hash, |loc| {
                if loc.2 >= from && best.as_ref().is_none_or(|b| loc.2 > b.2) {
                    best = Some(loc);
                }
                seen += 1;
                seen < ENTRIES_MAX
            })?;
            out.push(best);
        }
        Ok(out)
    }

    /// For each hash, whether `group` holds a block version with that
    /// content written before LSN `before` (the content index's keys alone;
    /// no block is read).
    pub fn stored_before(&self, group: &str, hashes: &[crate::blocks::BlockHash], before: u64) -> std::io::Result<Vec<bool>> {
        let mut it = self.db.raw_iterator_cf(cf(&self.db, CF_CONTENT));
        let mut out = Vec::with_capacity(hashes.len());
        for hash in hashes {
            let mut held = false;
            each_entry(&mut it, group, hash, |(_, _, lsn)| {
                held = lsn < before;
                !held
            })?;
            out.push(held);
        }
        Ok(out)
    }

    /// For each hash, a block of `group` with that content, or None when
    /// the group holds no version with it (the content index). Reads
    /// through one snapshot; every block returned is checked against its
    /// hash, so an entry whose version the collector freed, or a corrupt
    /// one, is passed over, never returned.
    pub fn find_blocks(&self, group: &str, hashes: &[crate::blocks::BlockHash]) -> std::io::Result<Vec<Option<Vec<u8>>>> {
        use crate::blocks::{block_hash, Version, BLOCK_BYTES};
        /// Candidates tried per hash before it counts as not held.
        const TRIES_MAX: usize = 4;
        /// Events kept decoded across lookups (a shipment's blocks come
        /// from few events).
        const EVENTS_KEPT: usize = 16;
        let snap = self.db.snapshot();
        let mut events: std::collections::HashMap<u64, Arc<StoredEvent>> = Default::default();
        let mut it = snap.raw_iterator_cf(cf(&self.db, CF_CONTENT));
        let mut out = Vec::with_capacity(hashes.len());
        for hash in hashes {
            let mut candidates = Vec::new();
            each_entry(&mut it, group, hash, |loc| {
                candidates.push(loc);
                candidates.len() < TRIES_MAX
            })?;
            let mut found = None;
            for (disk, block, lsn) in candidates {
                let Some(raw) = snap.get_cf(cf(&self.db, CF_BLOCKS), block_key(group, &disk, block, lsn)).map_err(io_err)? else { continue };
                let bytes = match Version::decode(&raw) {
                    Ok(Version::Data(d)) => d,
                    Ok(Version::Ref { offset, .. }) => {
                        let event = match events.get(&lsn) {
                            Some(e) => e.clone(),
                            None => {
                                let Some(raw) = snap.get_cf(cf(&self.db, CF_EVENTS), event_key(group, lsn)).map_err(io_err)? else { continue };
                                let e = crate::segments::decode_event(&self.segs, &raw).map_err(|e| corrupt(&format!("event record at LSN {lsn} of group {group}"), e))?;
                                if events.len() >= EVENTS_KEPT {
                                    events.clear();
                                }
                                let e = Arc::new(e);
                                events.insert(lsn, e.clone());
                                e
                            }
                        };
                        let at = offset as usize;
                        match &event.event {
                            rewind_wire::event::Event::Write { data, .. } if at + BLOCK_BYTES as usize <= data.len() => data[at..at + BLOCK_BYTES as usize].to_vec(),
                            _ => continue,
                        }
                    }
                    _ => continue,
                };
                if block_hash(&bytes) == *hash {
                    found = Some(bytes);
                    break;
                }
            }
            out.push(found);
        }
        Ok(out)
    }

}
