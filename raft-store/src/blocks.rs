//! The block index: what makes reading block `b` of a disk as of LSN `n` a
//! seek, not a scan of the history.
//!
//! Every event that changes a disk's bytes adds, at its LSN, one version per
//! 4 KiB block it touches (column family `blocks`, key `group | disk |
//! block | lsn`):
//! * `Ref`: the block is wholly inside a write; its bytes are the write's
//!   payload at an offset, read from the event record (whose blake3 checksum
//!   is checked on every read), so the index adds a few bytes per block,
//!   and the block's blake3 (its content hash);
//! * `Data`: a block the event covers only in part; the whole block as it
//!   is after the event, with its blake3;
//! * `Zero`: the block reads as zeroes. A block of zeroes is never stored:
//!   a write of one becomes `Zero`.
//!
//! Every `Ref` and `Data` version also has an entry in the content index
//! (column family `content`, key `group | blake3 | disk | block | lsn`),
//! which answers "does this group hold a block with this hash, and where"
//! (`StoreReader::find_blocks`). Versions written before the content index
//! (`Ref` without a hash, `Data` with a 16-byte checksum) still read.
//!
//! Zero and trim ranges of more than [`ZERO_BLOCKS_INDEXED_MAX`] whole
//! blocks are kept as one extent (column family `extents`, key `group | disk
//! | lsn`) instead, so a discard of a whole disk is one record.
//!
//! Block `b` at LSN `n` is then: the newest version at or below `n` (one
//! `seek_for_prev`), unless an extent newer than that version and not newer
//! than `n` covers it. A block without a version reads as zeroes.
//!
//! Versions of a block are computed from the block as of the LSN before the
//! event, never from "whatever the store holds now", so applying an event a
//! second time after a crash writes the same bytes.

use rewind_wire::event::Event;

/// The index's block size.
pub const BLOCK_BYTES: u64 = 4096;
/// Zero/trim ranges with more whole blocks than this become one extent.
pub const ZERO_BLOCKS_INDEXED_MAX: u64 = 256;

const TAG_REF: u8 = 1;
const TAG_DATA: u8 = 2;
const TAG_ZERO: u8 = 3;
const TAG_REF_HASHED: u8 = 4;
const TAG_DATA_HASHED: u8 = 5;
const CHECKSUM_BYTES: usize = 16;
const HASH_BYTES: usize = 32;

/// A block's content hash (blake3 of its 4 KiB).
pub type BlockHash = [u8; 32];

/// The content hash of `block`.
pub fn block_hash(block: &[u8]) -> BlockHash {
    *blake3::hash(block).as_bytes()
}

/// The content hash of a block of zeroes, which is never stored.
pub fn zero_block_hash() -> BlockHash {
    static ZERO: std::sync::OnceLock<BlockHash> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| block_hash(&[0u8; BLOCK_BYTES as usize]))
}

/// One version of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// Bytes `offset..offset + BLOCK_BYTES` of the payload of the write at
    /// the version's LSN, and their content hash (None: written before the
    /// content index).
    Ref { offset: u32, hash: Option<BlockHash> },
    Data(Vec<u8>),
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("block version record is malformed: {0}")]
    Malformed(String),
    #[error("block checksum mismatch: the stored chunk is corrupt")]
    Checksum,
}

fn checksum(data: &[u8]) -> [u8; CHECKSUM_BYTES] {
    blake3::hash(data).as_bytes()[..CHECKSUM_BYTES].try_into().expect("16 bytes")
}

impl Version {
    pub fn encode(&self) -> Vec<u8> {
        self.encode_hashed().0
    }

    /// The stored record and the content hash it carries (None for `Zero`
    /// and for a `Ref` from before the content index).
    pub fn encode_hashed(&self) -> (Vec<u8>, Option<BlockHash>) {
        match self {
            Version::Ref { offset, hash: None } => {
                let mut v = vec![TAG_REF];
                v.extend_from_slice(&offset.to_le_bytes());
                (v, None)
            }
            Version::Ref { offset, hash: Some(h) } => {
                let mut v = Vec::with_capacity(1 + 4 + HASH_BYTES);
                v.push(TAG_REF_HASHED);
                v.extend_from_slice(&offset.to_le_bytes());
                v.extend_from_slice(h);
                (v, Some(*h))
            }
            Version::Data(bytes) => {
                let h = block_hash(bytes);
                let mut v = Vec::with_capacity(1 + HASH_BYTES + bytes.len());
                v.push(TAG_DATA_HASHED);
                v.extend_from_slice(&h);
                v.extend_from_slice(bytes);
                (v, Some(h))
            }
            Version::Zero => (vec![TAG_ZERO], None),
        }
    }

    /// The content hash a stored record carries, without checking the
    /// block (None: a zero block, a record from before the content index,
    /// or not a version record).
    pub fn stored_hash(bytes: &[u8]) -> Option<BlockHash> {
        match bytes.split_first() {
            Some((&TAG_REF_HASHED, rest)) if rest.len() == 4 + HASH_BYTES => rest[4..].try_into().ok(),
            Some((&TAG_DATA_HASHED, rest)) if rest.len() == HASH_BYTES + BLOCK_BYTES as usize => rest[..HASH_BYTES].try_into().ok(),
            _ => None,
        }
    }

    /// Decodes and checks a stored version.
    pub fn decode(bytes: &[u8]) -> Result<Version, BlockError> {
        match bytes.split_first() {
            Some((&TAG_REF, rest)) if rest.len() == 4 => Ok(Version::Ref { offset: u32::from_le_bytes(rest.try_into().expect("4 bytes")), hash: None }),
            Some((&TAG_REF_HASHED, rest)) if rest.len() == 4 + HASH_BYTES => Ok(Version::Ref {
                offset: u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")),
                hash: Some(rest[4..].try_into().expect("32 bytes")),
            }),
            Some((&TAG_DATA_HASHED, rest)) if rest.len() == HASH_BYTES + BLOCK_BYTES as usize => {
                let (sum, data) = rest.split_at(HASH_BYTES);
                if block_hash(data) != sum {
                    return Err(BlockError::Checksum);
                }
                Ok(Version::Data(data.to_vec()))
            }
            Some((&TAG_DATA, rest)) if rest.len() == CHECKSUM_BYTES + BLOCK_BYTES as usize => {
                let (sum, data) = rest.split_at(CHECKSUM_BYTES);
                if checksum(data) != sum {
                    return Err(BlockError::Checksum);
                }
                Ok(Version::Data(data.to_vec()))
            }
            Some((&TAG_ZERO, [])) => Ok(Version::Zero),
            Some((tag, rest)) => Err(BlockError::Malformed(format!("tag {tag} with {} bytes", rest.len()))),
            None => Err(BlockError::Malformed("empty".into())),
        }
    }
}

/// What indexing one event adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexPut {
    Block { block: u64, version: Version },
    /// A zeroed range of whole blocks: `block_first..block_end`.
    Extent { block_first: u64, block_end: u64 },
}

/// The versions one event adds to `disk`'s index. `before(b)` gives block
/// `b` as it was just before this event (BLOCK_BYTES bytes).
pub fn index_event<E>(disk: &str, event: &Event, mut before: impl FnMut(u64) -> Result<Vec<u8>, E>) -> Result<Vec<IndexPut>, E> {
    let mut puts = Vec::new();
    let (offset, len, data) = match event {
        Event::Write { disk: d, offset, data } if d == disk => (*offset, data.len() as u64, Some(data)),
        Event::WriteZeroes { disk: d, offset, len } | Event::Trim { disk: d, offset, len } if d == disk => (*offset, *len, None),
        _ => return Ok(puts),
    };
    if len == 0 {
        return Ok(puts);
    }
    let end = offset + len;
    let first = offset / BLOCK_BYTES;
    let last = (end - 1) / BLOCK_BYTES;
    // Whole blocks of a large zero range become one extent.
    let whole_first = offset.div_ceil(BLOCK_BYTES);
    let whole_end = end / BLOCK_BYTES;
    let extent = data.is_none() && whole_end > whole_first && whole_end - whole_first > ZERO_BLOCKS_INDEXED_MAX;
    if extent {
        puts.push(IndexPut::Extent { block_first: whole_first, block_end: whole_end });
    }
    for b in first..=last {
        let start = b * BLOCK_BYTES;
        let whole = offset <= start && start + BLOCK_BYTES <= end;
        if whole && extent {
            continue;
        }
        let version = match (data, whole) {
            (Some(d), true) => {
                let at = (start - offset) as usize;
                let hash = block_hash(&d[at..at + BLOCK_BYTES as usize]);
                if hash == zero_block_hash() {
                    Version::Zero
                } else {
                    Version::Ref { offset: at as u32, hash: Some(hash) }
                }
            }
            (None, true) => Version::Zero,
            (_, false) => {
                let mut block = before(b)?;
                let from = offset.max(start);
                let to = end.min(start + BLOCK_BYTES);
                let range = (from - start) as usize..(to - start) as usize;
                match data {
                    Some(d) => block[range].copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize]),
                    None => block[range].fill(0),
                }
                if block.iter().all(|b| *b == 0) {
                    Version::Zero
                } else {
                    Version::Data(block)
                }
            }
        };
        puts.push(IndexPut::Block { block: b, version });
    }
    Ok(puts)
}

/// The disk and the blocks that may hold a version of `event` at its LSN
/// (an extent, if any, is keyed by the LSN alone): a zero or trim range
/// that became an extent has versions only at its partial edge blocks. At
/// most `REVERT_BLOCKS_MAX` or 258 blocks.
/// The blocks a write of `len` bytes at `offset` versions: every block it
/// touches.
pub fn write_blocks(offset: u64, len: u64) -> Vec<u64> {
    if len == 0 {
        return Vec::new();
    }
    (offset / BLOCK_BYTES..=(offset + len - 1) / BLOCK_BYTES).collect()
}

pub fn versioned_blocks(event: &Event) -> Option<(&str, Vec<u64>)> {
    let (disk, offset, len) = match event {
        Event::Revert { disk, block_first, block_end, .. } => return Some((disk, (*block_first..*block_end).collect())),
        Event::Copy { disk, block_first, from, .. } => return Some((disk, (*block_first..*block_first + (from.len() / 2) as u64).collect())),
        Event::Write { disk, offset, data } => (disk, *offset, data.len() as u64),
        Event::WriteZeroes { disk, offset, len } | Event::Trim { disk, offset, len } => (disk, *offset, *len),
        _ => return None,
    };
    if len == 0 {
        return Some((disk, Vec::new()));
    }
    let (first, last) = (offset / BLOCK_BYTES, (offset + len - 1) / BLOCK_BYTES);
    let (whole_first, whole_end) = (offset.div_ceil(BLOCK_BYTES), (offset + len) / BLOCK_BYTES);
    let extent = !matches!(event, Event::Write { .. }) && whole_end > whole_first && whole_end - whole_first > ZERO_BLOCKS_INDEXED_MAX;
    if extent {
        let mut edges = Vec::new();
        if first < whole_first {
            edges.push(first);
        }
        if last >= whole_end && edges.last() != Some(&last) {
            edges.push(last);
        }
        return Some((disk, edges));
    }
    Some((disk, (first..=last).collect()))
}

/// Where the read side finds versions: the store's column families, or a
/// simulated node's memory. [`block_or_zero`] and [`read_runs`] are the
/// rules; an implementation only looks things up.
pub trait VersionIndex {
    type Error;
    /// The newest version of `block` at or below `lsn`, with its LSN.
    fn version(&mut self, block: u64, lsn: u64) -> Result<Option<(u64, Version)>, Self::Error>;
    /// Whether an extent with an LSN in `after + 1..=upto` zeroes `block`.
    fn zeroed_by_extent(&mut self, block: u64, after: u64, upto: u64) -> Result<bool, Self::Error>;
    /// Bytes `offset..offset + BLOCK_BYTES` of the payload of the write at
    /// `lsn`, checked; an error if that event holds no such bytes.
    fn write_bytes(&mut self, lsn: u64, offset: u32) -> Result<Vec<u8>, Self::Error>;
}

/// Block `block` as of `lsn`; None when it reads as zeroes (never written,
/// zeroed or trimmed): the newest version at or below `lsn`, unless an
/// extent newer than that version and not newer than `lsn` covers it.
pub fn block_or_zero<I: VersionIndex>(index: &mut I, block: u64, lsn: u64) -> Result<Option<Vec<u8>>, I::Error> {
    let version = index.version(block, lsn)?;
    let since = version.as_ref().map_or(0, |(l, _)| *l);
    if since < lsn && index.zeroed_by_extent(block, since, lsn)? {
        return Ok(None);
    }
    match version {
        None | Some((_, Version::Zero)) => Ok(None),
        Some((_, Version::Data(d))) => Ok(Some(d)),
        Some((vlsn, Version::Ref { offset, .. })) => index.write_bytes(vlsn, offset).map(Some),
    }
}

/// The versions a revert event at `lsn` adds: every block of
/// `block_first..block_end` that changed after `to_lsn` (a version or an
/// extent in `to_lsn + 1..lsn`) gets the bytes it had as of `to_lsn`, as
/// `Data` or `Zero`. Blocks that did not change get nothing.
pub fn revert_puts<I: VersionIndex>(index: &mut I, block_first: u64, block_end: u64, to_lsn: u64, lsn: u64) -> Result<Vec<IndexPut>, I::Error> {
    let before = lsn - 1;
    let mut puts = Vec::new();
    for block in block_first..block_end {
        let newest = index.version(block, before)?.map_or(0, |(l, _)| l);
        let changed = newest > to_lsn || (!crate::bug("revert-ignores-extents") && index.zeroed_by_extent(block, to_lsn.max(newest), before)?);
        if !changed {
            continue;
        }
        let version = match block_or_zero(index, block, to_lsn)? {
            Some(bytes) if bytes.iter().any(|b| *b != 0) => Version::Data(bytes),
            _ => Version::Zero,
        };
        puts.push(IndexPut::Block { block, version });
    }
    Ok(puts)
}

/// The versions a `Copy` adds: block `block_first + i` becomes block
/// `from[2i]` of the source disk as of LSN `from[2i + 1]`, a copy of its
/// bytes (`Data`), or `Zero`. `index` reads the source disk.
pub fn copy_puts<I: VersionIndex>(index: &mut I, block_first: u64, from: &[u64]) -> Result<Vec<IndexPut>, I::Error> {
    let mut puts = Vec::with_capacity(from.len() / 2);
    for (i, pair) in from.chunks_exact(2).enumerate() {
        let version = match block_or_zero(index, pair[0], pair[1])? {
            Some(bytes) if bytes.iter().any(|b| *b != 0) => Version::Data(bytes),
            _ => Version::Zero,
        };
        puts.push(IndexPut::Block { block: block_first + i as u64, version });
    }
    Ok(puts)
}

/// `len` bytes of a disk from `offset` as of `lsn`, as runs of bytes that
/// may be non-zero: (offset from `offset`, bytes), in order, adjacent runs
/// joined; the rest reads as zeroes.
pub fn read_runs<I: VersionIndex>(index: &mut I, lsn: u64, offset: u64, len: u64) -> Result<Vec<(u64, Vec<u8>)>, I::Error> {
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let b = pos / BLOCK_BYTES;
        let to = (end - b * BLOCK_BYTES).min(BLOCK_BYTES) as usize;
        if let Some(block) = block_or_zero(index, b, lsn)? {
            let from = (pos - b * BLOCK_BYTES) as usize;
            let at = pos - offset;
            match runs.last_mut() {
                Some((start, bytes)) if *start + bytes.len() as u64 == at => bytes.extend_from_slice(&block[from..to]),
                _ => runs.push((at, block[from..to].to_vec())),
            }
        }
        pos = b * BLOCK_BYTES + to as u64;
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The index kept in memory, read the way the store reads it.
    #[derive(Default)]
    struct Mem {
        blocks: BTreeMap<(u64, u64), Version>,
        extents: BTreeMap<u64, (u64, u64)>,
        writes: BTreeMap<u64, Vec<u8>>,
    }

    impl Mem {
        fn block_at(&self, b: u64, n: u64) -> Vec<u8> {
            let found = self.blocks.range((b, 0)..=(b, n)).next_back();
            let since = found.map_or(0, |((_, lsn), _)| *lsn);
            if since < n && self.extents.range(since + 1..=n).any(|(_, (f, e))| (*f..*e).contains(&b)) {
                return vec![0; BLOCK_BYTES as usize];
            }
            match found {
                None | Some((_, Version::Zero)) => vec![0; BLOCK_BYTES as usize],
                Some((_, Version::Data(d))) => d.clone(),
                Some(((_, lsn), Version::Ref { offset, .. })) => {
                    self.writes[lsn][*offset as usize..*offset as usize + BLOCK_BYTES as usize].to_vec()
                }
            }
        }
    }

    #[test]
    fn versions_round_trip_and_corruption_is_caught() {
        let h = block_hash(&[7; 4096]);
        for v in [Version::Ref { offset: 8192, hash: None }, Version::Ref { offset: 4096, hash: Some(h) }, Version::Zero, Version::Data(vec![7; 4096])] {
            let (bytes, hash) = v.encode_hashed();
            assert_eq!(Version::decode(&bytes).unwrap(), v);
            assert_eq!(Version::stored_hash(&bytes), hash);
        }
        assert_eq!(Version::Data(vec![7; 4096]).encode_hashed().1, Some(h));
        let mut bad = Version::Data(vec![7; 4096]).encode();
        bad[100] ^= 1;
        assert_eq!(Version::decode(&bad), Err(BlockError::Checksum));
        // A record from before the content index: a 16-byte checksum.
        let mut old = vec![TAG_DATA];
        old.extend_from_slice(&checksum(&[7; 4096]));
        old.extend_from_slice(&[7; 4096]);
        assert_eq!(Version::decode(&old).unwrap(), Version::Data(vec![7; 4096]));
        assert_eq!(Version::stored_hash(&old), None);
        assert!(matches!(Version::decode(&[9, 1]), Err(BlockError::Malformed(_))));
        assert!(matches!(Version::decode(&[]), Err(BlockError::Malformed(_))));
    }

    fn op() -> impl Strategy<Value = (u8, u64, u64)> {
        (0u8..4, 0u64..(64 * 4096), 1u64..(300 * 4096))
    }

    impl VersionIndex for Mem {
        type Error = ();
        fn version(&mut self, block: u64, lsn: u64) -> Result<Option<(u64, Version)>, ()> {
            Ok(self.blocks.range((block, 0)..=(block, lsn)).next_back().map(|((_, l), v)| (*l, v.clone())))
        }
        fn zeroed_by_extent(&mut self, block: u64, after: u64, upto: u64) -> Result<bool, ()> {
            Ok(after < upto && self.extents.range(after + 1..=upto).any(|(_, (f, e))| (*f..*e).contains(&block)))
        }
        fn write_bytes(&mut self, lsn: u64, offset: u32) -> Result<Vec<u8>, ()> {
            Ok(self.writes[&lsn][offset as usize..offset as usize + BLOCK_BYTES as usize].to_vec())
        }
    }

    proptest! {
        /// Stored bytes of any shape decode to a version or an error.
        #[test]
        fn garbage_versions_never_panic(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Version::decode(&data);
        }

        /// Reading every block at every LSN through the index equals a byte
        /// model that applies the same events.
        #[test]
        fn the_index_equals_a_byte_model(ops in proptest::collection::vec(op(), 1..24)) {
            const DISK: u64 = 400 * 4096;
            let mut mem = Mem::default();
            let mut models: Vec<Vec<u8>> = vec![vec![0; DISK as usize]];
            for (i, (kind, offset, len)) in ops.into_iter().enumerate() {
                let lsn = i as u64 + 1;
                let len = len.min(DISK - offset);
                let event = match kind {
                    0 => Event::Write { disk: "d".into(), offset, data: (0..len).map(|x| (x as u8) ^ (lsn as u8)).collect() },
                    1 => Event::WriteZeroes { disk: "d".into(), offset, len },
                    2 => Event::Trim { disk: "d".into(), offset, len },
                    // A revert of some blocks to an earlier LSN (`offset` picks it).
                    _ => Event::Revert { disk: "d".into(), to_lsn: offset % lsn, block_first: offset / BLOCK_BYTES, block_end: (offset + len).div_ceil(BLOCK_BYTES).min(DISK / BLOCK_BYTES) },
                };
                let mut model = models.last().unwrap().clone();
                match &event {
                    Event::Write { data, .. } => model[offset as usize..(offset + len) as usize].copy_from_slice(data),
                    Event::Revert { to_lsn, block_first, block_end, .. } => {
                        let (from, to) = ((block_first * BLOCK_BYTES) as usize, (block_end * BLOCK_BYTES) as usize);
                        model[from..to].copy_from_slice(&models[*to_lsn as usize][from..to]);
                    }
                    _ => model[offset as usize..(offset + len) as usize].fill(0),
                }
                models.push(model);
                let puts = match &event {
                    Event::Revert { to_lsn, block_first, block_end, .. } => revert_puts(&mut mem, *block_first, *block_end, *to_lsn, lsn).unwrap(),
                    _ => index_event::<()>("d", &event, |b| Ok(mem.block_at(b, lsn - 1))).unwrap(),
                };
                if let Event::Write { data, .. } = &event {
                    mem.writes.insert(lsn, data.clone());
                }
                for p in puts {
                    match p {
                        IndexPut::Block { block, version } => { mem.blocks.insert((block, lsn), version); }
                        IndexPut::Extent { block_first, block_end } => { mem.extents.insert(lsn, (block_first, block_end)); }
                    }
                }
            }
            for (n, model) in models.iter().enumerate() {
                for b in 0..DISK / BLOCK_BYTES {
                    let got = mem.block_at(b, n as u64);
                    prop_assert_eq!(&got[..], &model[(b * BLOCK_BYTES) as usize..((b + 1) * BLOCK_BYTES) as usize], "block {} at LSN {}", b, n);
                }
            }
        }
    }

    proptest! {
        /// The blocks a failback moves for an event are the blocks its
        /// indexing wrote.
        #[test]
        fn versioned_blocks_are_the_indexed_ones(kind in 0u8..3, offset in 0u64..(1 << 22), len in 0u64..(3 << 20)) {
            let event = match kind {
                0 => Event::Write { disk: "d".into(), offset, data: vec![1; len.min(1 << 20) as usize] },
                1 => Event::WriteZeroes { disk: "d".into(), offset, len },
                _ => Event::Trim { disk: "d".into(), offset, len },
            };
            let puts = index_event::<()>("d", &event, |_| Ok(vec![0; 4096])).unwrap();
            let indexed: Vec<u64> = puts.iter().filter_map(|p| match p { IndexPut::Block { block, .. } => Some(*block), _ => None }).collect();
            let (_, listed) = versioned_blocks(&event).unwrap();
            prop_assert_eq!(indexed, listed);
        }
    }

    #[test]
    fn zero_blocks_are_never_stored_and_others_carry_their_hash() {
        let mut data = vec![0u8; 3 * 4096];
        data[2 * 4096 + 9] = 1;
        let e = Event::Write { disk: "d".into(), offset: 4096, data: data.clone() };
        let puts = index_event::<()>("d", &e, |_| unreachable!()).unwrap();
        let want = Version::Ref { offset: 8192, hash: Some(block_hash(&data[8192..])) };
        assert_eq!(puts, vec![
            IndexPut::Block { block: 1, version: Version::Zero },
            IndexPut::Block { block: 2, version: Version::Zero },
            IndexPut::Block { block: 3, version: want },
        ]);
        // A partial write that leaves the block all zeroes is Zero too.
        let e = Event::Write { disk: "d".into(), offset: 512, data: vec![0; 512] };
        let puts = index_event::<()>("d", &e, |_| Ok(vec![0; 4096])).unwrap();
        assert_eq!(puts, vec![IndexPut::Block { block: 0, version: Version::Zero }]);
        assert_eq!(zero_block_hash(), block_hash(&[0; 4096]));
    }

    #[test]
    fn other_disks_and_other_events_add_nothing() {
        let e = Event::Write { disk: "other".into(), offset: 0, data: vec![1; 4096] };
        assert!(index_event::<()>("d", &e, |_| unreachable!()).unwrap().is_empty());
        let e = Event::Bookmark { name: "b".into(), app_consistent: false };
        assert!(index_event::<()>("d", &e, |_| unreachable!()).unwrap().is_empty());
        let big = Event::Trim { disk: "d".into(), offset: 512, len: 1 << 30 };
        let puts = index_event::<()>("d", &big, |_| Ok(vec![5; 4096])).unwrap();
        assert_eq!(puts.len(), 3, "one extent and two partial edge blocks: {:?}", puts.iter().map(std::mem::discriminant).collect::<Vec<_>>());
    }
}
