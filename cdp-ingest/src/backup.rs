//! The backup importer: reads a disk's changed (or every allocated) block
//! from a source, compares each 4 KiB block with what the site holds for
//! it, and appends only the blocks that differ, as one backup transaction
//! in the disk's group (see `rewind_raft_store::backups`).
//!
//! The planning is pure functions over ranges and bytes ([`block_runs`],
//! [`diff_blocks`], [`zero_blocks`], [`parse_changed_areas`]); [`run`]
//! drives them over a [`Source`] (an NBD export in `node`, memory in the
//! simulation) and a [`Site`], appending through a [`Producer`].
//!
//! Rules:
//! * a block is compared by its blake3 with the same block of the disk as
//!   the site holds it now: the same bytes are not sent (a full backup of
//!   a disk the tap journals sends almost nothing; a resumed backup sends
//!   only what it had not sent);
//! * blocks the source reports as zero (`base:allocation`) are not read;
//!   they, and blocks read as zeroes, become `WriteZeroes`, and only where
//!   the site's block is not zero already;
//! * the commit carries the digest of every block the backup covered, in
//!   order, after every batch before it is committed;
//! * every loop is bounded: extents per answer, blocks per request, bytes
//!   and events per batch, batches in flight.

use std::collections::VecDeque;

use futures::future::BoxFuture;
use rewind_wire::event::{Event, TimedEvent};
use rewind_wire::limits::{BATCH_BYTES_MAX, BATCH_EVENTS_MAX, BLOCK_HASHES_MAX, REVERT_BLOCKS_MAX, WRITE_BYTES_MAX};
use rewind_wire::rpc::{BackupInfo, BackupState, DiskSpec};

use crate::producer::{Appended, Producer};

/// The importer's block size: the site's block index's.
pub const BLOCK: u64 = 4096;
/// Bytes read from the source per request.
pub const READ_BYTES: u64 = 4 << 20;
/// Changed areas one `--changed-areas` file may list.
pub const AREAS_MAX: usize = 1 << 20;
/// Extents asked of the source per block status request (bytes).
const STATUS_BYTES: u64 = 1 << 30;
/// Pieces whose site hashes are asked for ahead of the one being read.
const HASHES_AHEAD: usize = 4;
/// Block status requests per backup at most (each answers at least one
/// extent of at least a byte, so this bounds a hostile source).
const STATUS_REQUESTS_MAX: u64 = 1 << 22;

/// What to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Every allocated extent.
    Full,
    /// The extents dirty in a QEMU dirty bitmap.
    Bitmap(String),
    /// The byte ranges given (VADP's QueryChangedDiskAreas), sorted, merged.
    Areas(Vec<(u64, u64)>),
}

/// The blocks of a disk to cover: read them, or record them as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub end: u64,
    pub read: bool,
}

fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
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
pub fn with_references(events: Vec<Event>, found: &std::collections::BTreeMap<u64, (String, u64, u64)>) -> (Vec<(Event, Option<Event>)>, u64) {
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

/// Where a group holds a block: (disk, block, LSN).
pub type Place = (String, u64, u64);

/// A source's extents: (offset, length, flag).
pub type Extents = Vec<(u64, u64, bool)>;

/// Where a backup reads its disk.
pub trait Source: Send {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Whether the source can say which extents read as zeroes.
    fn knows_zeroes(&self) -> bool;
    /// Whether the source exports the dirty bitmap `name`.
    fn has_bitmap(&self, name: &str) -> bool;
    /// Extents from `offset`, up to `len` bytes (it may answer fewer):
    /// (offset, length, flag) where the flag is "reads as zeroes" for
    /// `bitmap` None, and "dirty" for a bitmap.
    fn extents<'a>(&'a mut self, bitmap: Option<&'a str>, offset: u64, len: u64) -> BoxFuture<'a, Result<Extents, String>>;
    fn read(&mut self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<u8>, String>>;
}

/// What the importer asks the site (the leader, after a linearizable
/// read, so it sees every acknowledged write).
pub trait Site: Send + Sync {
    fn disks<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<DiskSpec>, String>>;
    fn backups<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<BackupInfo>, String>>;
    /// Hashes of blocks `first..first + count` as of `lsn` (0: the newest).
    fn block_hashes<'a>(&'a self, group: &'a str, disk: &'a str, lsn: u64, first: u64, count: u32) -> BoxFuture<'a, Result<Vec<[u8; 32]>, String>>;
    /// Where the group holds a block with each hash inside its window
    /// (the content index), as of `lsn` applied.
    fn find_blocks<'a>(&'a self, group: &'a str, hashes: &'a [[u8; 32]], lsn: u64) -> BoxFuture<'a, Result<Vec<Option<Place>>, String>>;
}

/// A backup to take.
#[derive(Debug, Clone)]
pub struct Spec {
    pub group: String,
    pub disk: String,
    pub mode: Mode,
    /// The backup's name (None: one is made from the time).
    pub name: Option<String>,
    /// Continue the disk's open backup, if it has one.
    pub resume: bool,
    /// For `Mode::Bitmap`: read every allocated extent if the source lacks
    /// the bitmap (it is missing, or qemu refuses it as inconsistent).
    pub fallback_full: bool,
    /// The time for the backup's events, and for a made-up name.
    pub now_ns: u64,
    /// Send the blocks zstd-compressed.
    pub compress: bool,
    /// Send a block the group holds elsewhere as a reference (`Copy`).
    pub references: bool,
}

/// What a backup did.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub name: String,
    pub group: String,
    pub disk: String,
    /// "full", "bitmap", "changed-areas", or "full (bitmap fallback)".
    pub mode: String,
    pub base: Option<String>,
    pub resumed: bool,
    pub begin_lsn: u64,
    pub commit_lsn: u64,
    /// Extents of the source covered, and their bytes.
    pub extents: u64,
    pub bytes_covered: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes the source reported or read as zeroes.
    pub bytes_zero: u64,
    /// Bytes the site held the same already.
    pub bytes_unchanged: u64,
    /// Bytes that differed: sent to the site and stored.
    pub bytes_new: u64,
    /// Payload bytes of the events sent (the site stores these).
    pub bytes_sent: u64,
    /// Bytes of their batches on the wire (compressed, when compressing).
    pub bytes_wire: u64,
    /// Bytes that differed but travelled as references to blocks the
    /// group holds elsewhere (stored again as copies).
    pub bytes_referenced: u64,
    pub events: u64,
    /// Set by the caller, which owns the clock.
    pub seconds: f64,
    pub digest: String,
}

/// How far a backup has got, for a progress line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub extents: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The arguments or the site's state rule the backup out.
    #[error("{0}")]
    Refused(String),
    /// The source does not export the bitmap (exit status 3: scripts may
    /// rerun with --fallback-full).
    #[error("{0}")]
    NoBitmap(String),
    /// Cut off after it began: the backup stays open, not a restore point.
    #[error("{why}; backup {name:?} stays open and is no restore point: rerun with --resume to complete it, or --abort to drop it")]
    Interrupted { name: String, why: String },
}

/// Batches of events, bounded, submitted in order through the producer.
/// A batch with copies keeps the writes they stand for: if the site
/// refuses it, those are sent instead.
struct Sender<'a> {
    producer: &'a mut Producer,
    group: String,
    time_ns: u64,
    batch: Vec<TimedEvent>,
    alts: Vec<Option<Event>>,
    bytes: usize,
    inflight: VecDeque<(tokio::sync::oneshot::Receiver<Appended>, Option<Vec<Event>>)>,
    /// Events of refused batches, to send again as writes.
    redo: Vec<Event>,
    events: u64,
    sent_bytes: u64,
    last_lsn: u64,
}

/// Batches in flight at most.
const WINDOW: usize = 16;

impl Sender<'_> {
    async fn push(&mut self, e: Event, alt: Option<Event>) -> Result<(), String> {
        let n = e.payload_bytes().max(alt.as_ref().map_or(0, |a| a.payload_bytes()));
        if self.batch.len() + 1 > BATCH_EVENTS_MAX || self.bytes + n > BATCH_BYTES_MAX {
            self.submit().await?;
        }
        self.bytes += n;
        self.sent_bytes += e.payload_bytes() as u64;
        self.events += 1;
        self.batch.push(TimedEvent { time_ns: self.time_ns, event: e });
        self.alts.push(alt);
        Ok(())
    }

    async fn submit(&mut self) -> Result<(), String> {
        if self.batch.is_empty() {
            return Ok(());
        }
        while self.inflight.len() >= WINDOW {
            self.wait_one().await?;
        }
        let events = std::mem::take(&mut self.batch);
        let alts = std::mem::take(&mut self.alts);
        let fallback = alts.iter().any(Option::is_some).then(|| events.iter().zip(alts).map(|(e, a)| a.unwrap_or_else(|| e.event.clone())).collect());
        self.bytes = 0;
        let rx = self.producer.submit(&self.group, events).await.map_err(|e| e.to_string())?;
        self.inflight.push_back((rx, fallback));
        Ok(())
    }

    async fn wait_one(&mut self) -> Result<(), String> {
        if let Some((rx, fallback)) = self.inflight.pop_front() {
            match rx.await.map_err(|_| "the producer stopped".to_string())? {
                Ok((_, last)) => self.last_lsn = self.last_lsn.max(last),
                Err(e) => match fallback {
                    Some(events) => {
                        tracing::info!("a batch with copies was refused ({e}); sending its blocks instead");
                        self.redo.extend(events);
                    }
                    None => return Err(e.to_string()),
                },
            }
        }
        Ok(())
    }

    /// Submits what is batched and waits until all of it is committed.
    async fn drain(&mut self) -> Result<u64, String> {
        loop {
            self.submit().await?;
            while !self.inflight.is_empty() {
                self.wait_one().await?;
            }
            if self.redo.is_empty() {
                return Ok(self.last_lsn);
            }
            for e in std::mem::take(&mut self.redo) {
                self.sent_bytes += e.payload_bytes() as u64;
                self.push(e, None).await?;
            }
        }
    }
}

/// Takes one backup: begins it (or takes over the disk's open one), covers
/// the blocks its mode names, and commits it. `progress` is called after
/// each piece (at most `READ_BYTES` of the disk).
pub async fn run<S: Source, T: Site>(source: &mut S, site: &T, producer: &mut Producer, spec: &Spec, mut progress: impl FnMut(&Progress)) -> Result<Report, BackupError> {
    let refused = BackupError::Refused;
    let size = source.size();
    let disks = site.disks(&spec.group).await.map_err(refused)?;
    let existing = disks.iter().find(|d| d.name == spec.disk);
    if let Some(d) = existing {
        if d.size_bytes != size {
            return Err(BackupError::Refused(format!(
                "disk {:?} of group {:?} is {} bytes; the source is {size} (resize one of them first)",
                spec.disk, spec.group, d.size_bytes
            )));
        }
    }
    let backups = site.backups(&spec.group).await.map_err(BackupError::Refused)?;
    let open = backups.iter().find(|b| b.disk == spec.disk && b.state == BackupState::Open);
    let newest = backups.iter().filter(|b| b.disk == spec.disk && b.state == BackupState::Committed).max_by_key(|b| b.end_lsn);
    let mut mode = spec.mode.clone();
    let mut mode_word = match &mode {
        Mode::Full => "full",
        Mode::Bitmap(_) => "bitmap",
        Mode::Areas(_) => "changed-areas",
    }
    .to_string();
    if let Mode::Bitmap(b) = &mode {
        if !source.has_bitmap(b) {
            let why = format!(
                "the source does not export dirty bitmap {b:?}: it is missing, or qemu refused it as inconsistent (a crash while it was in use leaves it so). Serve it with `qemu-nbd -B {b}`; check `qemu-img info` for its flags"
            );
            if !spec.fallback_full {
                return Err(BackupError::NoBitmap(format!("{why}; or rerun with --fallback-full to read every allocated extent and send only the blocks that differ")));
            }
            tracing::warn!("{why}; reading every allocated extent instead (--fallback-full)");
            mode = Mode::Full;
            mode_word = "full (bitmap fallback)".into();
        }
    }
    let (name, base, resumed) = match (open, spec.resume) {
        (Some(o), true) => {
            if spec.name.as_ref().is_some_and(|n| n != &o.name) {
                return Err(BackupError::Refused(format!("disk {:?} has backup {:?} open, not {:?}", spec.disk, o.name, spec.name.as_deref().unwrap_or(""))));
            }
            (o.name.clone(), o.base.clone(), true)
        }
        (Some(o), false) => {
            return Err(BackupError::Refused(format!(
                "disk {:?} of group {:?} has backup {:?} open since LSN {} (an import was cut off): rerun with --resume to complete it, or --abort to drop it",
                spec.disk, spec.group, o.name, o.begin_lsn
            )))
        }
        (None, _) => {
            let base = match (&spec.mode, newest) {
                (Mode::Full, _) => None,
                (_, Some(n)) => Some(n.name.clone()),
                (_, None) => {
                    return Err(BackupError::Refused(format!(
                        "disk {:?} of group {:?} has no committed backup for an incremental to build on: take a --full backup first",
                        spec.disk, spec.group
                    )))
                }
            };
            let taken = |n: &str| backups.iter().any(|b| b.name == n);
            let name = match &spec.name {
                Some(n) if taken(n) => return Err(BackupError::Refused(format!("group {:?} already has a backup named {n:?}", spec.group))),
                Some(n) => n.clone(),
                // A made-up name is the time to the second, and a number
                // after it if a backup took it already.
                None => {
                    let base = made_up_name(&mode_word, spec.now_ns);
                    (1..).map(|i| if i == 1 { base.clone() } else { format!("{base}-{i}") }).find(|n| !taken(n)).expect("a free name")
                }
            };
            rewind_wire::event::check_name(&name).map_err(|e| BackupError::Refused(format!("backup name: {e}")))?;
            (name, base, false)
        }
    };
    // Begin (or take over).
    let mut first_events = Vec::new();
    if existing.is_none() {
        first_events.push(Event::DiskCreate { disk: spec.disk.clone(), size_bytes: size, sector_bytes: 512 });
    }
    first_events.push(Event::BackupBegin { backup: name.clone(), disk: spec.disk.clone(), base: base.clone() });
    let timed = first_events.into_iter().map(|event| TimedEvent { time_ns: spec.now_ns, event }).collect();
    producer.set_compress(spec.compress);
    let (_, took_lsn) = producer.append(&spec.group, timed).await.map_err(|e| BackupError::Refused(format!("begin backup {name:?}: {e}")))?;
    let begin_lsn = if resumed { open.map_or(took_lsn, |o| o.begin_lsn) } else { took_lsn };
    let cut = |why: String| BackupError::Interrupted { name: name.clone(), why };

    // What to cover.
    let wanted = match &mode {
        Mode::Full => vec![(0, size)],
        Mode::Areas(a) => a.clone(),
        Mode::Bitmap(b) => extents_of(source, Some(b), size).await.map_err(&cut)?,
    };
    let zero = if source.knows_zeroes() { extents_of(source, None, size).await.map_err(&cut)? } else { Vec::new() };
    let runs = block_runs(&wanted, &zero, size);
    let total: u64 = runs.iter().map(|r| (r.end * BLOCK).min(size) - r.first * BLOCK).sum();
    let extents = merge(wanted.clone()).len() as u64;

    let mut report = Report {
        name: name.clone(),
        group: spec.group.clone(),
        disk: spec.disk.clone(),
        mode: mode_word,
        base: base.clone(),
        resumed,
        begin_lsn,
        extents,
        bytes_covered: total,
        ..Default::default()
    };
    let mut digest = Digest::default();
    let wire_before = producer.request_bytes();
    let mut sender = Sender {
        producer,
        group: spec.group.clone(),
        time_ns: spec.now_ns,
        batch: Vec::new(),
        alts: Vec::new(),
        bytes: 0,
        inflight: VecDeque::new(),
        redo: Vec::new(),
        events: 0,
        sent_bytes: 0,
        last_lsn: 0,
    };
    let mut p = Progress { bytes_total: total, extents, ..Default::default() };
    // The pieces to cover, in order; the site's hashes for the next few
    // are asked for while one is read. They are read as of the backup's
    // begin (or take-over): from then on only this import writes the disk,
    // and never a block ahead of where it has got.
    let pieces: Vec<(u64, u64, bool)> = runs
        .iter()
        .flat_map(|run| {
            let step = if run.read { READ_BYTES / BLOCK } else { u64::from(BLOCK_HASHES_MAX) };
            (run.first..run.end).step_by(step as usize).map(move |b| (b, step.min(run.end - b), run.read))
        })
        .collect();
    let mut ahead = VecDeque::new();
    let mut next = 0;
    for &(b, n, read) in &pieces {
        while next < pieces.len() && ahead.len() < HASHES_AHEAD {
            let (nb, nn, _) = pieces[next];
            ahead.push_back(site.block_hashes(&spec.group, &spec.disk, took_lsn, nb, nn as u32));
            next += 1;
        }
        let hashes = ahead.pop_front().expect("asked for above");
        let (offset, end) = (b * BLOCK, ((b + n) * BLOCK).min(size));
        let d = if read {
            let (data, site_hashes) = futures::join!(source.read(offset, end - offset), hashes);
            let (data, site_hashes) = (data.map_err(&cut)?, site_hashes.map_err(&cut)?);
            if data.len() as u64 != end - offset {
                return Err(cut(format!("the source answered a read of {} bytes at {offset} with {}", end - offset, data.len())));
            }
            report.bytes_read += data.len() as u64;
            p.bytes_read += data.len() as u64;
            diff_blocks(&spec.disk, b, &data, &site_hashes, &mut digest)
        } else {
            zero_blocks(&spec.disk, b, &hashes.await.map_err(&cut)?, size, &mut digest)
        };
        report.bytes_unchanged += d.same * BLOCK;
        report.bytes_zero += d.zero * BLOCK;
        report.bytes_new += d.new_bytes;
        p.bytes_new += d.new_bytes;
        // Blocks the group holds elsewhere travel as references. A site
        // that cannot say where (an older build) gets them all.
        let mut found = std::collections::BTreeMap::new();
        if spec.references && !d.new_hashes.is_empty() {
            let hashes: Vec<[u8; 32]> = d.new_hashes.iter().map(|(_, h)| *h).collect();
            match site.find_blocks(&spec.group, &hashes, took_lsn).await {
                Ok(places) => {
                    for ((b, _), place) in d.new_hashes.iter().zip(places) {
                        if let Some(place) = place {
                            found.insert(*b, place);
                        }
                    }
                }
                Err(e) => tracing::debug!("no block references: {e}"),
            }
        }
        let (events, referenced) = with_references(d.events, &found);
        report.bytes_referenced += referenced;
        for (e, alt) in events {
            sender.push(e, alt).await.map_err(&cut)?;
        }
        p.bytes_done += end - offset;
        progress(&p);
    }
    sender.drain().await.map_err(&cut)?;
    progress(&p);
    let digest = digest.finish();
    let commit = Event::BackupCommit { backup: name.clone(), extents, bytes: total, digest: digest.to_vec() };
    report.events = sender.events + 1;
    report.bytes_sent = sender.sent_bytes;
    report.bytes_wire = sender.producer.request_bytes() - wire_before;
    let (_, commit_lsn) = sender.producer.append(&spec.group, vec![TimedEvent { time_ns: spec.now_ns, event: commit }]).await.map_err(|e| cut(format!("commit: {e}")))?;
    report.commit_lsn = commit_lsn;
    report.bytes_zero = report.bytes_zero.min(total);
    report.bytes_unchanged = report.bytes_unchanged.min(total);
    report.digest = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(report)
}

/// Drops the disk's open backup: takes it over, reverts every block it
/// changed to the backup's start, then aborts it. Returns its name and
/// the abort's LSN.
pub async fn abort<T: Site>(site: &T, producer: &mut Producer, group: &str, disk: &str, now_ns: u64) -> Result<(String, u64, u64), BackupError> {
    let backups = site.backups(group).await.map_err(BackupError::Refused)?;
    let Some(open) = backups.iter().find(|b| b.disk == disk && b.state == BackupState::Open) else {
        return Err(BackupError::Refused(format!("disk {disk:?} of group {group:?} has no open backup to abort")));
    };
    let disks = site.disks(group).await.map_err(BackupError::Refused)?;
    let size = disks.iter().find(|d| d.name == disk).map(|d| d.size_bytes).ok_or_else(|| BackupError::Refused(format!("group {group:?} has no disk {disk:?}")))?;
    let timed = |event| vec![TimedEvent { time_ns: now_ns, event }];
    let take = Event::BackupBegin { backup: open.name.clone(), disk: disk.to_string(), base: open.base.clone() };
    producer.append(group, timed(take)).await.map_err(|e| BackupError::Refused(format!("take over backup {:?}: {e}", open.name)))?;
    let blocks = size.div_ceil(BLOCK);
    let mut reverted = 0;
    let mut b = 0;
    while b < blocks {
        let n = u64::from(BLOCK_HASHES_MAX).min(blocks - b);
        let then = site.block_hashes(group, disk, open.begin_lsn, b, n as u32).await.map_err(BackupError::Refused)?;
        let now = site.block_hashes(group, disk, 0, b, n as u32).await.map_err(BackupError::Refused)?;
        for e in revert_events(disk, b, &then, &now, open.begin_lsn) {
            if let Event::Revert { block_first, block_end, .. } = &e {
                reverted += block_end - block_first;
            }
            producer.append(group, timed(e)).await.map_err(|e| BackupError::Refused(format!("revert: {e}")))?;
        }
        b += n;
    }
    let (_, lsn) = producer.append(group, timed(Event::BackupAbort { backup: open.name.clone() })).await.map_err(|e| BackupError::Refused(format!("abort: {e}")))?;
    Ok((open.name.clone(), lsn, reverted))
}

fn made_up_name(mode: &str, now_ns: u64) -> String {
    let kind = if mode == "full" { "full" } else { "incr" };
    let t = rewind_wire::timefmt::format_time_ns(now_ns);
    let compact: String = t.chars().filter(|c| c.is_ascii_alphanumeric()).take(15).collect();
    format!("{kind}-{compact}Z")
}

/// The extents of the whole source that are zero (`bitmap` None) or dirty
/// in `bitmap`, merged.
async fn extents_of<S: Source>(source: &mut S, bitmap: Option<&str>, size: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut out = Vec::new();
    let mut at = 0u64;
    let mut requests = 0u64;
    while at < size {
        requests += 1;
        if requests > STATUS_REQUESTS_MAX {
            return Err(format!("the source answered {STATUS_REQUESTS_MAX} block status requests without covering the disk"));
        }
        let got = source.extents(bitmap, at, STATUS_BYTES.min(size - at)).await?;
        let mut next = at;
        for (o, l, flag) in got {
            if o != next || l == 0 || o + l > size {
                return Err(format!("the source's extents do not follow on at byte {next}"));
            }
            if flag {
                out.push((o, o + l));
            }
            next = o + l;
        }
        if next == at {
            return Err(format!("the source answered no extent at byte {at}"));
        }
        at = next;
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
