//! A node's simulated disk and the Raft log store on it.
//!
//! The disk keeps two images: what a read sees now (`current`, the page
//! cache) and what survives a crash (`durable`). Every change is an
//! operation; an fsync makes the operations issued before it durable. A
//! crash keeps the durable image plus a random prefix of the operations not
//! yet synced (a write-ahead log torn at some point: the torn record fails
//! its checksum and is cut, so only whole records survive).
//!
//! Payloads lie in segments, as production's (`raft_store::segments`):
//! an entry keeps a `Loc` per payload, the bytes go to the active segment,
//! and an fsync covers them before the log's records (and records the
//! position synced with them). A crash keeps each segment's synced bytes
//! plus a random prefix of the rest, torn anywhere; opening the log cuts
//! it at the first entry whose payload does not read back past that
//! position (a torn tail) and refuses to start on one within it (damage).
//! The state machine's events name the same payloads, and the collector's
//! segment deletion runs production's rule (`segments::reclaimable`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use crate::rng::Rng;
use crate::sm::SmImage;
use crate::{rt, world, Bug, Entry, LogId, SimConfig, Snapshot, Vote};
use rewind_raft_store::segments::Loc;

/// One stored log entry. `corrupt`: a later read finds its checksum wrong.
/// `locs`: where its payloads lie in the segments.
#[derive(Clone)]
pub struct Stored {
    pub entry: Arc<Entry>,
    pub corrupt: bool,
    pub locs: Vec<Loc>,
}

#[derive(Clone, Default)]
pub struct Image {
    pub vote: Option<Vote>,
    pub entries: BTreeMap<u64, Stored>,
    pub purged: Option<LogId>,
    /// The newest snapshot: its meta and the state it holds.
    pub snapshot: Option<(openraft::alias::SnapshotMetaOf<SimConfig>, Arc<SmImage>)>,
    /// The segment position the last recorded sync covered.
    pub seg_synced: (u64, u64),
}

/// Bytes after which the simulated log begins a new segment (production:
/// 64 MiB; small here, so that segments come and go within a seed).
const SEGMENT_BYTES: usize = 24 << 10;

/// One payload segment: its bytes (what a read sees), and how many of
/// them an fsync made durable.
#[derive(Clone, Default)]
pub struct SegFile {
    pub bytes: Vec<u8>,
    pub synced: usize,
}

#[derive(Clone)]
enum Op {
    Vote(Vote),
    /// Entries with their payloads' locations, and the segment position
    /// after them (what an fsync of this operation covers).
    Append(Vec<(Arc<Entry>, Vec<Loc>)>, (u64, u64)),
    TruncateAfter(u64),
    Purge(LogId),
    /// A record that reads back wrong (its write went elsewhere).
    Rot(u64),
}

impl Image {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Vote(v) => self.vote = Some(*v),
            Op::Append(es, _) => {
                for (e, locs) in es {
                    self.entries.insert(e.log_id.index, Stored { entry: e.clone(), corrupt: false, locs: locs.clone() });
                }
            }
            Op::TruncateAfter(from) => {
                self.entries.split_off(from);
            }
            Op::Purge(id) => {
                self.purged = Some(*id);
                self.entries = self.entries.split_off(&(id.index + 1));
            }
            Op::Rot(k) => {
                if let Some(s) = self.entries.get_mut(k) {
                    s.corrupt = true;
                }
            }
        }
    }
}

pub struct Disk {
    pub node: u64,
    pub current: Image,
    pub durable: Image,
    unsynced: VecDeque<(u64, Op)>,
    next_op: u64,
    /// When the newest fsync issued completes: fsyncs complete in order.
    sync_done_ns: u64,
    /// The payload segments, and the one being written.
    pub segs: BTreeMap<u64, SegFile>,
    active: u64,
    /// Segments deleted (for the trace).
    pub segs_deleted: u64,
    tears: Rng,
}

/// How a node's open of its log went.
pub enum Opened {
    Ready,
    /// Cut at this index: a torn tail.
    Cut(u64),
    /// Refused: this entry fails its checksum, or its synced payload does.
    Refused(String),
}

impl Disk {
    pub fn new(node: u64) -> Disk {
        Disk {
            node,
            current: Image::default(),
            durable: Image::default(),
            unsynced: VecDeque::new(),
            next_op: 1,
            sync_done_ns: 0,
            segs: BTreeMap::from([(1, SegFile::default())]),
            active: 1,
            segs_deleted: 0,
            tears: Rng::new(0x7EA2_5E6D ^ node.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        }
    }

    /// Appends payloads to the active segment; where each lies.
    fn write_payloads(&mut self, payloads: &[&[u8]]) -> Vec<Loc> {
        let mut locs = Vec::with_capacity(payloads.len());
        for p in payloads {
            let len = self.segs[&self.active].bytes.len();
            if len > 0 && len + 8 + p.len() > SEGMENT_BYTES {
                self.active += 1;
                self.segs.insert(self.active, SegFile::default());
            }
            let seg = self.segs.get_mut(&self.active).expect("active segment");
            seg.bytes.extend_from_slice(&(p.len() as u32).to_le_bytes());
            seg.bytes.extend_from_slice(&rewind_raft_store::segments::checksum(p).to_le_bytes());
            let off = seg.bytes.len() as u64;
            seg.bytes.extend_from_slice(p);
            locs.push(Loc { seg: self.active, off, len: p.len() as u32, crc: rewind_raft_store::segments::checksum(p) });
        }
        locs
    }

    /// Production's `Segments::ensure_synced`, called by apply: an fsync
    /// of every segment written so far if the last one did not cover
    /// `locs` (instant here; production's apply waits on it).
    pub fn ensure_synced(&mut self, locs: &[Loc]) {
        let unsynced = locs.iter().any(|l| self.segs.get(&l.seg).is_some_and(|s| (s.synced as u64) < l.off + l.len as u64));
        if unsynced {
            for seg in self.segs.values_mut() {
                seg.synced = seg.bytes.len();
            }
        }
    }

    fn position(&self) -> (u64, u64) {
        (self.active, self.segs[&self.active].bytes.len() as u64)
    }

    /// The payload at `loc`, checked as production reads it.
    pub fn read_payload(&self, loc: &Loc) -> Result<Vec<u8>, String> {
        let seg = self.segs.get(&loc.seg).ok_or_else(|| format!("segment {} is gone", loc.seg))?;
        let end = loc.off as usize + loc.len as usize;
        let bytes = seg.bytes.get(loc.off as usize..end).ok_or_else(|| format!("segment {} ends before the payload at offset {}", loc.seg, loc.off))?;
        if rewind_raft_store::segments::checksum(bytes) != loc.crc {
            return Err(format!("the payload at offset {} of segment {} fails its checksum", loc.off, loc.seg));
        }
        Ok(bytes.to_vec())
    }

    /// Production's open of the log (`LogStore::cut_torn_tail`): a log
    /// entry that fails its checksum refuses the start; the first entry
    /// whose payload does not read back is a torn tail (cut) past the
    /// position the last sync recorded, and damage (refused) within it.
    pub fn open_log(&mut self) -> Opened {
        if let Some(k) = self.first_corrupt() {
            return Opened::Refused(format!("log entry {k} fails its checksum"));
        }
        let bad = self.current.entries.iter().find_map(|(k, s)| s.locs.iter().find(|l| self.read_payload(l).is_err()).map(|l| (*k, *l)));
        let Some((k, loc)) = bad else { return Opened::Ready };
        use rewind_raft_store::segments::{torn_or_damaged, Damage};
        if torn_or_damaged((loc.seg, loc.off + loc.len as u64), self.current.seg_synced) == Damage::Damaged {
            return Opened::Refused(format!("the synced payload of log entry {k} fails its checksum"));
        }
        for img in [&mut self.current, &mut self.durable] {
            img.entries.split_off(&k);
        }
        Opened::Cut(k)
    }

    /// Flips a byte of a synced payload of a durable entry (rot under a
    /// stopped node). Returns the entry's index.
    pub fn rot_payload(&mut self, rng: &mut Rng) -> Option<u64> {
        let with: Vec<(u64, Loc)> = self.durable.entries.iter().filter_map(|(k, s)| s.locs.first().map(|l| (*k, *l))).filter(|(_, l)| self.segs.get(&l.seg).is_some_and(|s| s.synced as u64 >= l.off + l.len as u64 && l.len > 0)).collect();
        if with.is_empty() {
            return None;
        }
        let (k, loc) = with[rng.range(0, with.len() as u64) as usize];
        let at = (loc.off + rng.range(0, loc.len as u64)) as usize;
        let seg = self.segs.get_mut(&loc.seg).expect("checked");
        seg.bytes[at] ^= 0x40;
        Some(k)
    }

    /// Deletes the segments production's rule lets go: below the active
    /// one and the log's first payload, named by no event of the state
    /// machine (`referenced`) or of the durable snapshot (its links).
    /// (The durable snapshot stands for production's flushed state
    /// machine, which `segrefs` also covers: `events` false ignores both,
    /// as a deletion that forgot `segrefs` would.)
    pub fn reclaim(&mut self, mut referenced: std::collections::BTreeSet<u64>, events: bool) -> usize {
        if events {
            if let Some((_, img)) = &self.durable.snapshot {
                referenced.extend(img.payload_segments());
            }
            if let Some((_, img)) = &self.current.snapshot {
                referenced.extend(img.payload_segments());
            }
        }
        let log_first = self.current.entries.values().chain(self.durable.entries.values()).filter_map(|s| s.locs.first()).map(|l| l.seg).min();
        let ids: Vec<u64> = self.segs.keys().copied().collect();
        let dead = rewind_raft_store::segments::reclaimable(&ids, self.active, log_first, &referenced);
        for id in &dead {
            self.segs.remove(id);
        }
        self.segs_deleted += dead.len() as u64;
        dead.len()
    }

    fn push(&mut self, op: Op) -> u64 {
        self.current.apply(&op);
        let seq = self.next_op;
        self.next_op += 1;
        self.unsynced.push_back((seq, op));
        seq
    }

    /// Makes every operation up to `seq` durable: the payload segments
    /// first, then the log's records, with the position synced.
    fn sync_to(&mut self, seq: u64, forget: bool) {
        while let Some((s, _)) = self.unsynced.front() {
            if *s > seq {
                break;
            }
            let (_, op) = self.unsynced.pop_front().expect("front");
            if let Op::Append(_, pos) = &op {
                if !forget {
                    for (id, seg) in self.segs.range_mut(..=pos.0) {
                        seg.synced = if *id < pos.0 { seg.bytes.len() } else { seg.synced.max(pos.1 as usize) };
                    }
                    for img in [&mut self.current, &mut self.durable] {
                        img.seg_synced = img.seg_synced.max(*pos);
                    }
                }
            }
            self.durable.apply(&op);
        }
    }

    /// A crash: the durable image plus a random prefix of what was not
    /// synced; each segment keeps its synced bytes and a random prefix of
    /// the rest (torn anywhere). Returns (kept, lost) operation counts.
    pub fn crash(&mut self, rng: &mut Rng, torn: bool) -> (usize, usize) {
        let n = self.unsynced.len();
        let keep = rng.range(0, n as u64 + 1) as usize;
        for (_, op) in self.unsynced.drain(..).take(keep) {
            self.durable.apply(&op);
        }
        // Tears draw from the disk's own generator, so the rest of the
        // world's draws are as they were before segments.
        for seg in self.segs.values_mut() {
            let kept = if torn { seg.synced + self.tears.range(0, (seg.bytes.len() - seg.synced) as u64 + 1) as usize } else { seg.bytes.len() };
            seg.bytes.truncate(kept);
            seg.synced = kept;
        }
        // The next open writes a new segment (production never appends
        // to one a crash may have torn).
        self.active = self.segs.keys().next_back().map_or(1, |k| k + 1);
        self.segs.insert(self.active, SegFile::default());
        self.current = self.durable.clone();
        (keep, n - keep)
    }

    /// Snapshots are written to a file of their own and fsync'd before they
    /// count, in both images at once.
    pub fn save_snapshot(&mut self, meta: openraft::alias::SnapshotMetaOf<SimConfig>, image: Arc<SmImage>) {
        self.current.snapshot = Some((meta.clone(), image.clone()));
        self.durable.snapshot = Some((meta, image));
    }

    /// Flips a bit in one durable entry (a misdirected or rotten write):
    /// the next read of it fails its checksum. Returns the entry's index.
    pub fn corrupt_one(&mut self, rng: &mut Rng) -> Option<u64> {
        let keys: Vec<u64> = self.durable.entries.keys().copied().collect();
        if keys.is_empty() {
            return None;
        }
        let k = keys[rng.range(0, keys.len() as u64) as usize];
        for img in [&mut self.durable, &mut self.current] {
            if let Some(s) = img.entries.get_mut(&k) {
                s.corrupt = true;
            }
        }
        Some(k)
    }

    /// The first corrupt entry, which a node finds when it opens its log.
    pub fn first_corrupt(&self) -> Option<u64> {
        self.current.entries.iter().find(|(_, s)| s.corrupt).map(|(k, _)| *k)
    }
}

/// Waits for one simulated fsync of `disk` covering operation `seq`. An
/// armed fsync fault fails it: the node must stop (the Postgres fsync
/// lesson), so this marks the node dead and never returns.
async fn fsync(disk: &Arc<Mutex<Disk>>, seq: u64) {
    let node = disk.lock().expect("disk").node;
    let now = rt::now_ns();
    let latency = world::with(|w| {
        let factor = w.slow.get(&node).filter(|(until, _)| *until > now).map_or(1, |(_, f)| *f);
        Duration::from_micros(w.disk_rng.range(100, 3000) * factor)
    });
    let (node, done_at) = {
        let mut d = disk.lock().expect("disk");
        d.sync_done_ns = (d.sync_done_ns + 1).max(rt::now_ns() + latency.as_nanos() as u64);
        (d.node, d.sync_done_ns)
    };
    rt::Sleep::until_global(done_at).await;
    let fail = world::with(|w| w.fsync_fail.remove(&node));
    if fail {
        world::die(node, "fsync failed");
        std::future::pending::<()>().await;
    }
    let forget = world::with(|w| w.is_bug(Bug::SegmentsNotSynced));
    disk.lock().expect("disk").sync_to(seq, forget);
    if world::with(|w| w.crash_at_io.remove(&node)) {
        // The data is durable; the process dies before it hears so.
        world::die(node, "crash as an fsync completes");
        std::future::pending::<()>().await;
    }
}

/// The Raft log store of one node on its simulated disk.
#[derive(Clone)]
pub struct SimLog {
    pub disk: Arc<Mutex<Disk>>,
}

fn corrupt_err(node: u64, index: u64) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("n{node}: log entry {index} fails its checksum"))
}

impl RaftLogReader<SimConfig> for SimLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(&mut self, range: RB) -> io::Result<Vec<Entry>> {
        let (node, found) = {
            let d = self.disk.lock().expect("disk");
            let mut out = Vec::new();
            let mut bad = None;
            for (k, s) in d.current.entries.range(range) {
                // Production reads each payload back from its segment and
                // checks it.
                if s.corrupt || s.locs.iter().any(|l| d.read_payload(l).is_err()) {
                    bad = Some(*k);
                    break;
                }
                out.push((*s.entry).clone());
            }
            let mut found = bad.map_or(Ok(out), Err);
            // A misread: the bytes come back wrong this once.
            if let Ok(entries) = &found {
                if let Some(first) = entries.first().map(|e| e.log_id.index) {
                    if world::with(|w| w.misread.remove(&d.node)) {
                        found = Err(first);
                    }
                }
            }
            (d.node, found)
        };
        match found {
            Ok(out) => Ok(out),
            Err(k) => {
                world::die(node, &format!("log entry {k} fails its checksum"));
                Err(corrupt_err(node, k))
            }
        }
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        Ok(self.disk.lock().expect("disk").current.vote)
    }
}

impl RaftLogStorage<SimConfig> for SimLog {
    type LogReader = SimLog;

    async fn get_log_state(&mut self) -> io::Result<LogState<SimConfig>> {
        let d = self.disk.lock().expect("disk");
        let last = d.current.entries.values().next_back().map(|s| s.entry.log_id);
        Ok(LogState { last_purged_log_id: d.current.purged, last_log_id: last.or(d.current.purged) })
    }

    async fn get_log_reader(&mut self) -> SimLog {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let seq = self.disk.lock().expect("disk").push(Op::Vote(*vote));
        if !world::with(|w| w.is_bug(Bug::VoteNotSynced)) {
            fsync(&self.disk, seq).await;
        }
        let node = self.disk.lock().expect("disk").node;
        if world::with(|w| w.crash_at_vote.remove(&node)) {
            world::die(node, "crash as it saves its vote");
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<SimConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
    {
        let entries: Vec<Arc<Entry>> = entries.into_iter().map(Arc::new).collect();
        let first = entries.first().map(|e| e.log_id.index);
        let (mut seq, node) = {
            let mut d = self.disk.lock().expect("disk");
            let placed: Vec<(Arc<Entry>, Vec<Loc>)> = entries
                .into_iter()
                .map(|e| {
                    let locs = match &e.payload {
                        openraft::EntryPayload::Normal(c) => d.write_payloads(&rewind_raft_store::segments::payloads(c)),
                        _ => Vec::new(),
                    };
                    (e, locs)
                })
                .collect();
            let pos = d.position();
            (d.push(Op::Append(placed, pos)), d.node)
        };
        if let Some(first) = first.filter(|_| world::with(|w| w.misdirect.remove(&node))) {
            // A misdirected write: the record lands over an older one, so
            // both read back wrong.
            let mut d = self.disk.lock().expect("disk");
            let victim = d.current.entries.keys().next().copied().unwrap_or(first);
            seq = d.push(Op::Rot(first));
            seq = seq.max(d.push(Op::Rot(victim)));
            drop(d);
            world::trace(format!("n{node}: the write of entry {first} lands over entry {victim}"));
        }
        if world::with(|w| w.is_bug(Bug::AckBeforeFsync)) {
            callback.io_completed(Ok(()));
            let disk = self.disk.clone();
            rt::spawn_local(async move { fsync(&disk, seq).await });
            return Ok(());
        }
        let disk = self.disk.clone();
        rt::spawn_local(async move {
            fsync(&disk, seq).await;
            callback.io_completed(Ok(()));
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.disk.lock().expect("disk").push(Op::TruncateAfter(from));
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        self.disk.lock().expect("disk").push(Op::Purge(log_id));
        Ok(())
    }
}

/// The current snapshot on a disk, as openraft wants it.
pub fn current_snapshot(disk: &Arc<Mutex<Disk>>) -> Option<Snapshot> {
    let d = disk.lock().expect("disk");
    d.current.snapshot.as_ref().map(|(meta, image)| Snapshot { meta: meta.clone(), snapshot: image.clone() })
}
