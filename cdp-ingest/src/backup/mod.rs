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
//!
//! The plan's pure functions are in [`plan`]; this module drives them.

use std::collections::VecDeque;

use futures::future::BoxFuture;
use rewind_wire::event::{Event, TimedEvent};
use rewind_wire::limits::{BATCH_BYTES_MAX, BATCH_EVENTS_MAX, BLOCK_HASHES_MAX};
use rewind_wire::rpc::{BackupInfo, BackupState, DiskSpec};

use crate::producer::{Appended, Producer};

mod plan;
pub use plan::*;

/// Bytes read from the source per request.
pub const READ_BYTES: u64 = 4 << 20;
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
    let extents = plan::merge(wanted.clone()).len() as u64;

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
    Ok(plan::merge(out))
}
