//! A backup's plan, as pure functions over ranges and bytes: which
//! blocks to cover ([`block_runs`]), what comparing a piece of the source
//! with the site's hashes gives ([`diff_blocks`], [`zero_blocks`]), blocks
//! held elsewhere as copies ([`with_references`]), an abort's reverts
//! ([`revert_events`]), and a `--changed-areas` file
//! ([`parse_changed_areas`]). No I/O: `super` drives them.

use rewind_wire::event::Event;
use rewind_wire::limits::{REVERT_BLOCKS_MAX, WRITE_BYTES_MAX};

/// The importer's block size: the site's block index's.
pub const BLOCK: u64 = 4096;
/// Changed areas one `--changed-areas` file may list.
pub const AREAS_MAX: usize = 1 << 20;

/// Where a group holds a block: (disk, block, LSN).
pub type Place = (String, u64, u64);

/// The blocks of a disk to cover: read them, or record them as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub end: u64,
    pub read: bool,
}

/// Byte ranges sorted, empty ones dropped, overlapping ones joined.
pub(super) fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|(a, b)| b > a);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some((_, e)) if a <= *e => *e = (*e).max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The blocks to cover: `wanted` byte ranges rounded out to whole 4 KiB
/// blocks of a disk of `disk_bytes`, split into runs to read and runs that
/// `zero` byte ranges (the source's zero extents) cover whole, which are
/// not read.
pub fn block_runs(wanted: &[(u64, u64)], zero: &[(u64, u64)], disk_bytes: u64) -> Vec<Run> {
    let blocks = disk_bytes.div_ceil(BLOCK);
    let want = merge(wanted.iter().map(|(s, e)| (s / BLOCK, e.div_ceil(BLOCK).min(blocks))).collect());
    // A zero range covers a block only whole; the disk's last block is
    // whole if the range reaches the disk's end.
    let zero = merge(
        zero.iter()
            .map(|(s, e)| (s.div_ceil(BLOCK), if *e >= disk_bytes { blocks } else { e / BLOCK }))
            .collect(),
    );
    let mut out = Vec::new();
    let mut z = 0;
    for (a, b) in want {
        let mut at = a;
        while at < b {
            while z < zero.len() && zero[z].1 <= at {
                z += 1;
            }
            let (read, end) = match zero.get(z) {
                Some(&(zs, ze)) if zs <= at => (false, ze.min(b)),
                Some(&(zs, _)) => (true, zs.min(b)),
                None => (true, b),
            };
            match out.last_mut() {
                Some(Run { end: e, read: r, .. }) if *e == at && *r == read => *e = end,
                _ => out.push(Run { first: at, end, read }),
            }
            at = end;
        }
    }
    out
}

/// The digest a backup commits: blake3 over (block number, block hash) of
/// every block it covered, in order.
#[derive(Clone, Default)]
pub struct Digest(blake3::Hasher);

impl Digest {
    pub fn add(&mut self, block: u64, hash: &[u8; 32]) {
        self.0.update(&block.to_le_bytes());
        self.0.update(hash);
    }

    pub fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// The blake3 of a block of zeroes.
pub fn zero_hash() -> [u8; 32] {
    static ZERO: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| *blake3::hash(&[0u8; BLOCK as usize]).as_bytes())
}

/// The hash of a block as the site computes it: a short last block of the
/// disk is hashed as if padded with zeroes.
pub fn block_hash(bytes: &[u8]) -> [u8; 32] {
    if bytes.len() as u64 == BLOCK {
        return *blake3::hash(bytes).as_bytes();
    }
    let mut b = bytes.to_vec();
    b.resize(BLOCK as usize, 0);
    *blake3::hash(&b).as_bytes()
}

/// What comparing a piece of the source with the site gave.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    pub events: Vec<Event>,
    /// Blocks the site holds the same already, blocks of zeroes, and
    /// blocks that differ (sent).
    pub same: u64,
    pub zero: u64,
    pub new: u64,
    /// Payload bytes of the events.
    pub new_bytes: u64,
    /// The blocks that differ, with their hashes, in order.
    pub new_hashes: Vec<(u64, [u8; 32])>,
}

enum Pending {
    None,
    Data { offset: u64, bytes: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

impl Diff {
    fn flush(&mut self, disk: &str, p: &mut Pending) {
        match std::mem::replace(p, Pending::None) {
            Pending::None => {}
            Pending::Data { offset, bytes } => {
                self.new_bytes += bytes.len() as u64;
                self.events.push(Event::Write { disk: disk.to_string(), offset, data: bytes });
            }
            Pending::Zero { offset, len } => self.events.push(Event::WriteZeroes { disk: disk.to_string(), offset, len }),
        }
    }

    fn data(&mut self, disk: &str, p: &mut Pending, offset: u64, block: &[u8]) {
        match p {
            Pending::Data { offset: o, bytes } if *o + bytes.len() as u64 == offset && bytes.len() + block.len() <= WRITE_BYTES_MAX => bytes.extend_from_slice(block),
            _ => {
                self.flush(disk, p);
                *p = Pending::Data { offset, bytes: block.to_vec() };
            }
        }
    }

    fn zeroes(&mut self, disk: &str, p: &mut Pending, offset: u64, len: u64) {
        match p {
            Pending::Zero { offset: o, len: l } if *o + *l == offset => *l += len,
            _ => {
                self.flush(disk, p);
                *p = Pending::Zero { offset, len };
            }
        }
    }
}

/// Compares `data`, read from the source at block `first` (whole blocks,
/// but for the disk's last, which may be short), with the site's hashes of
/// the same blocks: the writes and zero ranges that make the site's blocks
/// equal the source's. Adds every block to `digest`.
pub fn diff_blocks(disk: &str, first: u64, data: &[u8], site: &[[u8; 32]], digest: &mut Digest) -> Diff {
    let mut d = Diff::default();
    let mut p = Pending::None;
    for (i, block) in data.chunks(BLOCK as usize).enumerate() {
        let b = first + i as u64;
        let h = block_hash(block);
        digest.add(b, &h);
        let offset = b * BLOCK;
        if site.get(i) == Some(&h) {
            d.same += 1;
            d.flush(disk, &mut p);
        } else if h == zero_hash() {
            d.zero += 1;
            d.zeroes(disk, &mut p, offset, block.len() as u64);
        } else {
            d.new += 1;
            d.new_hashes.push((b, h));
            d.data(disk, &mut p, offset, block);
        }
    }
    d.flush(disk, &mut p);
    d
}

/// Blocks `first..first + site.len()` that the source reports as zero:
/// zero ranges where the site's block is not zero already (a disk of
/// `disk_bytes`: the last block may be short). Adds them to `digest`.
pub fn zero_blocks(disk: &str, first: u64, site: &[[u8; 32]], disk_bytes: u64, digest: &mut Digest) -> Diff {
    let mut d = Diff::default();
    let mut p = Pending::None;
    let zero = zero_hash();
    for (i, h) in site.iter().enumerate() {
        let b = first + i as u64;
        digest.add(b, &zero);
        d.zero += 1;
        if *h == zero {
            d.flush(disk, &mut p);
            continue;
        }
        let offset = b * BLOCK;
        d.zeroes(disk, &mut p, offset, BLOCK.min(disk_bytes - offset));
    }
    d.flush(disk, &mut p);
    d
}

/// Rewrites a piece's events so that each written block the group holds
/// elsewhere (`found`: block -> where it lies) travels as a `Copy` of it;
/// the rest stay writes. Each copy comes with the write it stands for, to
/// send instead if the site refuses it (the window moved past its source).
/// Returns the events and the bytes referenced.
pub fn with_references(events: Vec<Event>, found: &std::collections::BTreeMap<u64, Place>) -> (Vec<(Event, Option<Event>)>, u64) {
    type Run = (Option<String>, u64, Vec<u8>, Vec<u64>);
    let mut out = Vec::with_capacity(events.len());
    let mut referenced = 0u64;
    for e in events {
        let Event::Write { disk, offset, data } = e else {
            out.push((e, None));
            continue;
        };
        let first = offset / BLOCK;
        let flush = |run: Option<Run>, out: &mut Vec<(Event, Option<Event>)>| match run {
            Some((None, b, bytes, _)) => out.push((Event::Write { disk: disk.clone(), offset: b * BLOCK, data: bytes }, None)),
            Some((Some(from_disk), b, bytes, from)) => out.push((
                Event::Copy { disk: disk.clone(), block_first: b, from_disk, from },
                Some(Event::Write { disk: disk.clone(), offset: b * BLOCK, data: bytes }),
            )),
            None => {}
        };
        let mut run: Option<Run> = None;
        for (i, block) in data.chunks(BLOCK as usize).enumerate() {
            let b = first + i as u64;
            // A short last block is written: a copy is of whole blocks.
            let place = found.get(&b).filter(|_| block.len() as u64 == BLOCK);
            let kind = place.map(|(d, _, _)| d.clone());
            let same = run.as_ref().is_some_and(|(k, start, bytes, from)| {
                *k == kind && *start + bytes.len().div_ceil(BLOCK as usize) as u64 == b && from.len() / 2 < rewind_wire::limits::COPY_BLOCKS_MAX
            });
            if !same {
                flush(run.take(), &mut out);
                run = Some((kind, b, Vec::new(), Vec::new()));
            }
            let r = run.as_mut().expect("set above");
            r.2.extend_from_slice(block);
            if let Some((_, fb, fl)) = place {
                r.3.extend_from_slice(&[*fb, *fl]);
                referenced += BLOCK;
            }
        }
        flush(run.take(), &mut out);
    }
    (out, referenced)
}

/// The revert events that bring blocks `first..first + now.len()` back to
/// their hashes `then`, as of LSN `to_lsn` (an abort's undo).
pub fn revert_events(disk: &str, first: u64, then: &[[u8; 32]], now: &[[u8; 32]], to_lsn: u64) -> Vec<Event> {
    let mut out = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    let push = |out: &mut Vec<Event>, (a, b): (u64, u64)| out.push(Event::Revert { disk: disk.to_string(), to_lsn, block_first: a, block_end: b });
    for (i, (t, n)) in then.iter().zip(now).enumerate() {
        let b = first + i as u64;
        if t == n {
            if let Some(r) = run.take() {
                push(&mut out, r);
            }
            continue;
        }
        run = match run {
            Some((a, e)) if e == b && e - a < REVERT_BLOCKS_MAX => Some((a, b + 1)),
            Some(r) => {
                push(&mut out, r);
                Some((b, b + 1))
            }
            None => Some((b, b + 1)),
        };
    }
    if let Some(r) = run {
        push(&mut out, r);
    }
    out
}

/// Parses a `--changed-areas` file: a JSON list of `{"start": N,
/// "length": N}` (bytes), or an object with such a list under
/// `changedArea`, as VADP's QueryChangedDiskAreas returns it. The areas
/// must lie inside a disk of `disk_bytes`; they come back sorted, merged.
pub fn parse_changed_areas(text: &str, disk_bytes: u64) -> Result<Vec<(u64, u64)>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Area {
        start: u64,
        length: u64,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum File {
        List(Vec<Area>),
        Vadp {
            #[serde(rename = "changedArea")]
            changed_area: Vec<Area>,
        },
    }
    let file: File = serde_json::from_str(text).map_err(|e| format!("not a list of {{\"start\": N, \"length\": N}} (or an object with one under \"changedArea\"): {e}"))?;
    let areas = match file {
        File::List(a) | File::Vadp { changed_area: a } => a,
    };
    if areas.len() > AREAS_MAX {
        return Err(format!("{} areas; {AREAS_MAX} at most", areas.len()));
    }
    let mut out = Vec::with_capacity(areas.len());
    for (i, a) in areas.iter().enumerate() {
        let end = a.start.checked_add(a.length).filter(|e| *e <= disk_bytes);
        match end {
            Some(e) => out.push((a.start, e)),
            None => return Err(format!("area {i} ({} + {} bytes) runs past the disk's end ({disk_bytes} bytes)", a.start, a.length)),
        }
    }
    Ok(merge(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_round_out_the_wanted_and_in_the_zero() {
        let size = 10 * BLOCK;
        // Wanted: bytes 100..5000 (blocks 0, 1) and block 5..8; zero: 4096..
        // 20480 covers blocks 1..5 whole.
        let runs = block_runs(&[(100, 5000), (5 * BLOCK, 8 * BLOCK)], &[(4096, 20480)], size);
        assert_eq!(runs, vec![Run { first: 0, end: 1, read: true }, Run { first: 1, end: 2, read: false }, Run { first: 5, end: 8, read: true }]);
        // A zero range that covers a block only in part does not skip it.
        assert_eq!(block_runs(&[(0, size)], &[(100, 8192)], size), vec![Run { first: 0, end: 1, read: true }, Run { first: 1, end: 2, read: false }, Run { first: 2, end: 10, read: true }]);
        // A short last block is whole when the zero range reaches the end.
        let odd = 3 * BLOCK + 512;
        assert_eq!(block_runs(&[(0, odd)], &[(3 * BLOCK, odd)], odd), vec![Run { first: 0, end: 3, read: true }, Run { first: 3, end: 4, read: false }]);
        assert!(block_runs(&[], &[(0, size)], size).is_empty());
    }

    #[test]
    fn only_blocks_that_differ_are_sent() {
        let a = [1u8; 4096];
        let b = [2u8; 4096];
        let z = [0u8; 4096];
        let data: Vec<u8> = [a, b, b, z, a, z].concat();
        let site = [block_hash(&a), block_hash(&a), zero_hash(), block_hash(&a), block_hash(&a), zero_hash()];
        let mut digest = Digest::default();
        let d = diff_blocks("d", 10, &data, &site, &mut digest);
        assert_eq!((d.same, d.zero, d.new, d.new_bytes), (3, 1, 2, 8192));
        assert_eq!(
            d.events,
            vec![Event::Write { disk: "d".into(), offset: 11 * BLOCK, data: [b, b].concat() }, Event::WriteZeroes { disk: "d".into(), offset: 13 * BLOCK, len: BLOCK }]
        );
        // The digest covers every block, sent or not.
        let mut other = Digest::default();
        diff_blocks("d", 10, &data, &[[0; 32]; 6], &mut other);
        assert_eq!(digest.finish(), other.finish());
        // Zero extents zero only what is not zero at the site.
        let mut digest = Digest::default();
        let d = zero_blocks("d", 0, &[zero_hash(), block_hash(&a), block_hash(&a), zero_hash()], 3 * BLOCK + 100, &mut digest);
        assert_eq!(d.events, vec![Event::WriteZeroes { disk: "d".into(), offset: BLOCK, len: 2 * BLOCK }]);
        let d = zero_blocks("d", 3, &[block_hash(&a)], 3 * BLOCK + 100, &mut digest);
        assert_eq!(d.events, vec![Event::WriteZeroes { disk: "d".into(), offset: 3 * BLOCK, len: 100 }]);
    }

    #[test]
    fn writes_are_split_at_the_event_limit() {
        let n = WRITE_BYTES_MAX / 4096 + 3;
        let data: Vec<u8> = (0..n * 4096).map(|i| (i / 4096 % 200 + 1) as u8).collect();
        let d = diff_blocks("d", 0, &data, &[], &mut Digest::default());
        assert_eq!(d.events.len(), 2);
        assert!(d.events.iter().all(|e| e.payload_bytes() <= WRITE_BYTES_MAX));
    }

    #[test]
    fn blocks_held_elsewhere_become_copies_and_keep_their_writes() {
        let data: Vec<u8> = (0..5 * BLOCK as usize + 100).map(|i| (i / 4096) as u8 + 1).collect();
        let found: std::collections::BTreeMap<u64, (String, u64, u64)> =
            [(11, ("a".to_string(), 7, 3)), (12, ("a".to_string(), 9, 4)), (14, ("b".to_string(), 1, 5)), (15, ("a".to_string(), 2, 2))].into();
        let (events, referenced) = with_references(vec![Event::Write { disk: "d".into(), offset: 10 * BLOCK, data: data.clone() }], &found);
        assert_eq!(referenced, 3 * BLOCK, "blocks 11, 12 and 14; block 15 is short, so it is written");
        let shapes: Vec<String> = events
            .iter()
            .map(|(e, alt)| match (e, alt) {
                (Event::Write { offset, data, .. }, None) => format!("w{}+{}", offset / BLOCK, data.len()),
                (Event::Copy { block_first, from_disk, from, .. }, Some(Event::Write { offset, data, .. })) => {
                    assert_eq!((*offset / BLOCK, data.len() as u64), (*block_first, from.len() as u64 / 2 * BLOCK));
                    format!("c{block_first}<{from_disk}{from:?}")
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(shapes, vec!["w10+4096", "c11<a[7, 3, 9, 4]", "w13+4096", "c14<b[1, 5]", "w15+100"]);
    }

    #[test]
    fn reverts_cover_the_blocks_that_changed() {
        let (x, y) = ([1u8; 32], [2u8; 32]);
        let then = [x, x, x, x, x];
        let now = [x, y, y, x, y];
        assert_eq!(
            revert_events("d", 4, &then, &now, 9),
            vec![
                Event::Revert { disk: "d".into(), to_lsn: 9, block_first: 5, block_end: 7 },
                Event::Revert { disk: "d".into(), to_lsn: 9, block_first: 8, block_end: 9 }
            ]
        );
    }

    #[test]
    fn changed_areas_come_in_both_shapes_and_are_checked() {
        assert_eq!(parse_changed_areas(r#"[{"start": 4096, "length": 100}, {"start": 0, "length": 4096}]"#, 1 << 20).unwrap(), vec![(0, 4196)]);
        assert_eq!(parse_changed_areas(r#"{"changedArea": [{"start": 8192, "length": 8192}]}"#, 1 << 20).unwrap(), vec![(8192, 16384)]);
        assert!(parse_changed_areas(r#"[{"start": 0, "length": 4096}]"#, 1024).unwrap_err().contains("past the disk's end"));
        assert!(parse_changed_areas(r#"[{"start": 0, "lenght": 4096}]"#, 1 << 20).is_err());
        assert!(parse_changed_areas(r#"[{"start": 18446744073709551615, "length": 2}]"#, u64::MAX).is_err());
        assert!(parse_changed_areas("nonsense", 1 << 20).is_err());
    }
}
