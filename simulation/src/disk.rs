//! A node's simulated disk and the Raft log store on it.
//!
//! The disk keeps two images: what a read sees now (`current`, the page
//! cache) and what survives a crash (`durable`). Every change is an
//! operation; an fsync makes the operations issued before it durable. A
//! crash keeps the durable image plus a random prefix of the operations not
//! yet synced (a write-ahead log torn at some point: the torn record fails
//! its checksum and is cut, so only whole records survive).

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

/// One stored log entry. `corrupt`: a later read finds its checksum wrong.
#[derive(Clone)]
pub struct Stored {
    pub entry: Arc<Entry>,
    pub corrupt: bool,
}

#[derive(Clone, Default)]
pub struct Image {
    pub vote: Option<Vote>,
    pub entries: BTreeMap<u64, Stored>,
    pub purged: Option<LogId>,
    /// The newest snapshot: its meta and the state it holds.
    pub snapshot: Option<(openraft::alias::SnapshotMetaOf<SimConfig>, Arc<SmImage>)>,
}

#[derive(Clone)]
enum Op {
    Vote(Vote),
    Append(Vec<Arc<Entry>>),
    TruncateAfter(u64),
    Purge(LogId),
    /// A record that reads back wrong (its write went elsewhere).
    Rot(u64),
}

impl Image {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Vote(v) => self.vote = Some(*v),
            Op::Append(es) => {
                for e in es {
                    self.entries.insert(e.log_id.index, Stored { entry: e.clone(), corrupt: false });
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
}

impl Disk {
    pub fn new(node: u64) -> Disk {
        Disk { node, current: Image::default(), durable: Image::default(), unsynced: VecDeque::new(), next_op: 1, sync_done_ns: 0 }
    }

    fn push(&mut self, op: Op) -> u64 {
        self.current.apply(&op);
        let seq = self.next_op;
        self.next_op += 1;
        self.unsynced.push_back((seq, op));
        seq
    }

    /// Makes every operation up to `seq` durable.
    fn sync_to(&mut self, seq: u64) {
        while let Some((s, _)) = self.unsynced.front() {
            if *s > seq {
                break;
            }
            let (_, op) = self.unsynced.pop_front().expect("front");
            self.durable.apply(&op);
        }
    }

    /// A crash: the durable image plus a random prefix of what was not
    /// synced. Returns (kept, lost) operation counts.
    pub fn crash(&mut self, rng: &mut Rng) -> (usize, usize) {
        let n = self.unsynced.len();
        let keep = rng.range(0, n as u64 + 1) as usize;
        for (_, op) in self.unsynced.drain(..).take(keep) {
            self.durable.apply(&op);
        }
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
    disk.lock().expect("disk").sync_to(seq);
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
                if s.corrupt {
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
            (d.push(Op::Append(entries)), d.node)
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
