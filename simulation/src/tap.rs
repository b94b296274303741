//! The tap in the simulated world: production's `cdp-ingest` [`Tap`] (its
//! ordered section, batcher and commit waiters, unchanged), over a
//! simulated backing file, spawning on the simulated executor. In sync mode
//! it ships through a producer that sends batches to the site over the
//! simulated network; in async mode (half the tap seeds) its sink is the
//! journal of `journal.rs`, which production's shipper ships behind. A guest (the VM) sends it writes, zeroes, trims and
//! flushes over one connection, several in flight. The tap's process can
//! crash: its tasks die where they stand, its connection drops, and a new
//! process takes the guest's requests from then on: in sync mode under the
//! tap's producer identity in the next epoch (production keeps both in a
//! file beside the backing file), so its first batch fences the old
//! process's; in async mode over the same journal, whose shipper resumes
//! where the site stands.
//!
//! What is not simulated: the NBD byte protocol (`cdp-ingest/src/nbd.rs` is
//! fuzzed and the real server is tested with qemu-io, nbdcopy and fio in
//! `node/tests`), and the journal's file format (see `journal.rs`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rewind_cdp_ingest::producer::{Producer, ProducerError};
use rewind_cdp_ingest::shipper::ProducerSink;
use rewind_cdp_ingest::tap::{self, Backing, Committed, Export, LogSink, SinkError, Spawner, Tap, TapConfig};
use rewind_cdp_ingest::BoxFuture;
use rewind_wire::event::{seq_epoch, seq_in_epoch, TimedEvent};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::journal::{start_shipper, JournalFile, JournalSink, SimJournal};
use crate::rng::Rng;
use crate::model::{History, Shared, JOURNAL_PRODUCER, PRODUCER_DEADLINE, SECTOR, TAP_ADDR, TAP_DISK, TAP_DISK_BYTES, TAP_GROUP, TAP_NODE, TAP_PRODUCER_BASE};
use crate::{rt, stream, world};

/// Batches the producer has queued or in flight at most.
const WINDOW: usize = 4;
/// Marks the first bytes of every guest write, followed by its op number.
const WRITE_MAGIC: &[u8; 8] = b"guestwr!";

/// One request of the guest, as the checkers see it.
#[derive(Debug, Clone)]
pub struct GuestOp {
    /// The tap process it was sent to.
    pub instance: u64,
    pub kind: OpKind,
    /// The NBD answer; None when the connection dropped first.
    pub answer: Option<u32>,
}

#[derive(Debug, Clone)]
pub enum OpKind {
    Write { offset: u64, len: u64, fua: bool },
    Zero { offset: u64, len: u64, trim: bool },
    Flush,
}

impl OpKind {
    /// The sectors it changes.
    pub fn sectors(&self) -> std::ops::Range<u64> {
        match self {
            OpKind::Write { offset, len, .. } | OpKind::Zero { offset, len, .. } => offset / SECTOR..(offset + len) / SECTOR,
            OpKind::Flush => 0..0,
        }
    }
}

/// The op number a guest write carries in its data, if the data is one.
pub fn write_tag(data: &[u8]) -> Option<u64> {
    (data.len() >= 16 && &data[..8] == WRITE_MAGIC).then(|| u64::from_le_bytes(data[8..16].try_into().expect("8 bytes")))
}

/// The backing file: in the page cache, so a crash of the tap's process
/// keeps every write it made; a power loss on the tap's host keeps only
/// what a sync covered. A process that is gone writes nothing more.
pub struct SimFile {
    pub bytes: Vec<u8>,
    /// What the last sync made durable.
    durable: Vec<u8>,
    /// Tap processes started so far; the first is instance 1.
    started: u64,
    /// The one running now.
    running: Option<u64>,
}

struct SimBacking {
    file: Arc<Mutex<SimFile>>,
    instance: u64,
}

impl SimBacking {
    fn op<T: Send + 'static>(&self, apply: impl FnOnce(&mut SimFile) -> T + Send + 'static) -> BoxFuture<'static, std::io::Result<T>> {
        let file = self.file.clone();
        let instance = self.instance;
        Box::pin(async move {
            let latency = world::with(|w| w.disk_rng.range(10, 200));
            rt::sleep(Duration::from_micros(latency)).await;
            let mut f = file.lock().expect("backing");
            if f.running != Some(instance) {
                return Err(std::io::Error::other("the tap process is gone"));
            }
            Ok(apply(&mut f))
        })
    }
}

impl Backing for SimBacking {
    fn read_at(&self, offset: u64, len: u32) -> BoxFuture<'static, std::io::Result<Vec<u8>>> {
        self.op(move |f| f.bytes[offset as usize..offset as usize + len as usize].to_vec())
    }

    fn write_at(&self, offset: u64, data: Vec<u8>) -> BoxFuture<'static, std::io::Result<()>> {
        self.op(move |f| f.bytes[offset as usize..offset as usize + data.len()].copy_from_slice(&data))
    }

    fn zero(&self, offset: u64, len: u64, _punch: bool) -> BoxFuture<'static, std::io::Result<()>> {
        self.op(move |f| f.bytes[offset as usize..(offset + len) as usize].fill(0))
    }

    fn sync(&self) -> BoxFuture<'static, std::io::Result<()>> {
        self.op(|f| f.durable.clone_from(&f.bytes))
    }
}

struct SimSpawner;

impl Spawner for SimSpawner {
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        // Tagged with the spawning task's node: the tap's process.
        rt::spawn_local(task);
    }
}

struct SimClock;

impl tap::Clock for SimClock {
    fn now_ns(&self) -> u64 {
        rt::local_now_ns()
    }
}

/// Production's sink over production's producer, noting each batch it is
/// given under the sequence number the producer will give it (the
/// producer numbers its batches from its first one up, in the order they
/// are submitted).
struct RecordingSink {
    inner: ProducerSink,
    producer: u64,
    /// The sequence number of the next batch.
    next_seq: std::sync::atomic::AtomicU64,
}

/// The tap process that sent a batch, from its (producer, seq) key.
pub fn process_of((producer, seq): (u64, u64)) -> u64 {
    if producer == JOURNAL_PRODUCER {
        // One journal, one numbering, whichever process shipped it.
        0
    } else if producer == TAP_PRODUCER_BASE {
        u64::from(seq_epoch(seq))
    } else {
        producer - TAP_PRODUCER_BASE
    }
}

impl LogSink for RecordingSink {
    fn submit(&self, events: Vec<TimedEvent>) -> BoxFuture<'_, Result<Committed, SinkError>> {
        let seq = self.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = (self.producer, seq);
        world::with(|w| w.tap_batches.insert(key, events.iter().map(|e| e.event.clone()).collect()));
        let submitted = self.inner.submit(events);
        Box::pin(async move {
            let committed = submitted.await.inspect_err(|e| note_sink_error(key, e))?;
            let watched: Committed = Box::pin(async move { committed.await.inspect_err(|e| note_sink_error(key, e)) });
            Ok(watched)
        })
    }
}

/// A batch the producer could not get committed. Giving up after its
/// deadline without progress is allowed (the tap then refuses writes until
/// it is restarted); any other reason is a failure of the seed.
fn note_sink_error((producer, seq): (u64, u64), why: &SinkError) {
    world::trace(format!("tap producer {producer} seq {seq} failed: {why}"));
    let allowed = matches!(why, SinkError::Producer(ProducerError::GaveUp(_) | ProducerError::FailedEarlier(_)));
    if !allowed {
        world::with(|w| w.tap_errors.push(format!("tap producer {producer} seq {seq}: {why}")));
    }
}

struct Request {
    kind: OpKind,
    data: Vec<u8>,
    answer: oneshot::Sender<u32>,
}

/// The tap's end of the guest's connection: orders requests as they come
/// (the NBD server's order), and answers each once the tap says.
async fn connection(tap: Arc<Tap>, mut requests: mpsc::Receiver<Request>, redone: Option<oneshot::Receiver<()>>) {
    // Async mode serves once the backing file is redone from the journal.
    if let Some(redone) = redone {
        if redone.await.is_err() {
            return;
        }
    }
    while let Some(r) = requests.recv().await {
        let answer: tap::Answer = match r.kind {
            OpKind::Write { offset, fua, .. } => tap.clone().write(offset, r.data, fua).await,
            OpKind::Zero { offset, len, trim } => tap.clone().zero(offset, len, trim, trim, false).await,
            OpKind::Flush => tap.clone().flush(),
        };
        let reply = r.answer;
        rt::spawn_local(async move {
            let _ = reply.send(answer.await);
        });
    }
}

/// The tap's process and the guest's way to it.
pub struct TapSite {
    pub file: Arc<Mutex<SimFile>>,
    /// The connection to the running tap process; None while it is down.
    conn: Option<(u64, mpsc::Sender<Request>)>,
    history: Shared,
    /// Async mode's journal, on the tap's host; None in sync mode.
    pub journal: Option<Arc<Mutex<JournalFile>>>,
}

pub type TapHandle = Rc<RefCell<TapSite>>;

pub fn new_site(history: Shared) -> TapHandle {
    let file = Arc::new(Mutex::new(SimFile { bytes: vec![0; TAP_DISK_BYTES as usize], durable: vec![0; TAP_DISK_BYTES as usize], started: 0, running: None }));
    let journal = world::with(|w| w.plan.tap_async).then(JournalFile::new);
    let site = Rc::new(RefCell::new(TapSite { file, conn: None, history, journal }));
    assert!(start(&site), "a new journal is whole");
    site
}

/// Starts a tap process (the next instance): in sync mode under the tap's
/// producer identity in the next epoch; in async mode over the journal,
/// with a shipper. False when the process refused to start (a damaged
/// journal).
pub fn start(site: &TapHandle) -> bool {
    let mut s = site.borrow_mut();
    if let Some(journal) = &s.journal {
        // Production's open checks the journal before the tap serves.
        if let Err(why) = journal.lock().expect("journal").recover() {
            world::trace(format!("the tap refuses to start: {why}; the journal is left as it is"));
            world::count(crate::model::JOURNAL_REFUSED);
            return false;
        }
    }
    let instance = {
        let mut f = s.file.lock().expect("backing");
        f.started += 1;
        f.running = Some(f.started);
        f.started
    };
    let (producer_id, first_seq) = if world::with(|w| w.is_bug(crate::Bug::TapUnfenced)) {
        (TAP_PRODUCER_BASE + instance, 1)
    } else {
        (TAP_PRODUCER_BASE, seq_in_epoch(instance as u32, 1))
    };
    world::trace(format!("tap process {instance} starts (producer {producer_id}, epoch {})", seq_epoch(first_seq)));
    let (conn, requests) = mpsc::channel(64);
    let file = s.file.clone();
    let journal = s.journal.clone();
    let this = site.clone();
    rt::with_node(Some(TAP_NODE), || {
        let backing: Arc<dyn Backing> = Arc::new(SimBacking { file, instance });
        let mut redone = None;
        let (sink, mode): (Arc<dyn LogSink>, _) = match journal {
            Some(journal) => {
                world::trace(format!("tap process {instance} opens the journal"));
                let j = SimJournal::open(journal, instance).expect("checked above");
                // A failed shipper ends the tap's process, as in production.
                let exit = Box::new(move || {
                    rt::with_node(None, || {
                        rt::spawn_local(async move {
                            if this.borrow().file.lock().expect("backing").running == Some(instance) {
                                world::trace(format!("tap process {instance} exits: its shipper failed"));
                                crash(&this);
                            }
                        })
                    });
                });
                redone = Some(start_shipper(j.clone(), backing.clone(), exit));
                (Arc::new(JournalSink(j)), tap::Mode::Async)
            }
            None => {
                let link = stream::link(TAP_ADDR, PRODUCER_DEADLINE);
                let producer = Producer::over(link, Arc::new(stream::SimProducerRuntime), WINDOW, producer_id, first_seq);
                (Arc::new(RecordingSink { inner: ProducerSink::over(producer, TAP_GROUP), producer: producer_id, next_seq: first_seq.into() }), tap::Mode::Sync)
            }
        };
        let config = TapConfig { export: TAP_DISK.into(), size_bytes: TAP_DISK_BYTES, sector_bytes: SECTOR as u32, mode, batch_bytes_max: 64 << 10 };
        let tap = Tap::new(config, backing, sink, Arc::new(SimClock), Arc::new(SimSpawner));
        rt::spawn_local(connection(tap, requests, redone));
    });
    s.conn = Some((instance, conn));
    true
}

/// Starts the tap, trying again every half second while it refuses (the
/// operator mends what it refused); gives up at `deadline_ns`.
pub async fn start_until_up(site: &TapHandle, deadline_ns: u64) {
    while !start(site) && rt::now_ns() < deadline_ns {
        rt::sleep(Duration::from_millis(500)).await;
    }
}

/// The tap's process dies where it stands; the guest's connection drops.
pub fn crash(site: &TapHandle) {
    let mut s = site.borrow_mut();
    let instance = s.file.lock().expect("backing").running.take();
    s.conn = None;
    rt::kill_node(TAP_NODE);
    if let Some(j) = &s.journal {
        j.lock().expect("journal").close();
    }
    world::trace(format!("tap process {instance:?} crashes"));
}

/// The power fails on the tap's host: its process dies, and the backing
/// file and the journal keep only what a sync covered.
pub fn power_loss(site: &TapHandle) {
    crash(site);
    let s = site.borrow();
    {
        let mut guard = s.file.lock().expect("backing");
        let f = &mut *guard;
        let lost = f.bytes.chunks(SECTOR as usize).zip(f.durable.chunks(SECTOR as usize)).filter(|(a, b)| a != b).count();
        world::trace(format!("the backing file loses {lost} unsynced sectors"));
        f.bytes.clone_from(&f.durable);
    }
    if let Some(j) = &s.journal {
        j.lock().expect("journal").power_loss();
    }
    world::trace("the tap's host loses power: unsynced backing-file writes and journal batches are gone");
}

/// The VM: `ops` requests, up to `depth` in flight, over whatever tap
/// process is up; waits while none is. Ends with a flush that must succeed
/// (unless the deadline passes).
pub async fn guest(site: TapHandle, ops: u64, depth: usize, mut rng: Rng, deadline_ns: u64) {
    let history = site.borrow().history.clone();
    let slots = Arc::new(Semaphore::new(depth));
    // Half the async seeds' guests flush only at the end (drawn apart, so
    // sync-mode seeds keep their histories).
    let lazy = site.borrow().journal.is_some() && Rng::new(world::with(|w| w.seed) ^ 0x6c61_7a79).chance(0.5);
    if lazy {
        world::trace("the guest flushes only at the end");
    }
    let mut n = 0u64;
    loop {
        if rt::now_ns() > deadline_ns {
            world::trace("the guest gives up: deadline");
            return;
        }
        let kind = if n >= ops {
            OpKind::Flush
        } else {
            let pick = rng.range(0, 20);
            // A lazy guest (a VM with a write cache it rarely flushes)
            // writes where another would flush, and never asks for FUA.
            let pick = if lazy && pick >= 18 { 0 } else { pick };
            match pick {
                0..=14 => {
                    let len = rng.range(1, 65) * SECTOR;
                    OpKind::Write { offset: rng.range(0, (TAP_DISK_BYTES - len) / SECTOR + 1) * SECTOR, len, fua: !lazy && rng.chance(0.1) }
                }
                15..=17 => {
                    let len = rng.range(1, 129) * SECTOR;
                    OpKind::Zero { offset: rng.range(0, (TAP_DISK_BYTES - len) / SECTOR + 1) * SECTOR, len, trim: rng.chance(0.5) }
                }
                _ => OpKind::Flush,
            }
        };
        let permit = slots.clone().acquire_owned().await.expect("semaphore open");
        let Some((instance, conn)) = site.borrow().conn.clone() else {
            drop(permit);
            rt::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let data = match &kind {
            OpKind::Write { len, .. } => {
                let index = history.borrow().tap_ops.len() as u64;
                let mut d = vec![0u8; *len as usize];
                for chunk in d.chunks_mut(8) {
                    chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
                }
                d[..8].copy_from_slice(WRITE_MAGIC);
                d[8..16].copy_from_slice(&index.to_le_bytes());
                d
            }
            _ => Vec::new(),
        };
        let (answer, rx) = oneshot::channel();
        if conn.send(Request { kind: kind.clone(), data, answer }).await.is_err() {
            // The process died before it took the request: nothing sent.
            drop(permit);
            continue;
        }
        let index = {
            let mut h = history.borrow_mut();
            h.tap_ops.push(GuestOp { instance, kind: kind.clone(), answer: None });
            h.tap_ops.len() - 1
        };
        let last = n >= ops;
        n += 1;
        let h = history.clone();
        let waiter = rt::spawn_local(async move {
            let answer = rx.await.ok();
            h.borrow_mut().tap_ops[index].answer = answer;
            drop(permit);
            answer
        });
        if last {
            match waiter.await {
                Ok(Some(0)) => break,
                Ok(Some(code)) => {
                    // A tap whose producer gave up refuses every write until
                    // it is restarted: the operator restarts it.
                    world::trace(format!("the guest's final flush: error {code}; the operator restarts the tap"));
                    crash(&site);
                    start_until_up(&site, deadline_ns).await;
                }
                r => world::trace(format!("the guest's final flush: {r:?}; again")),
            }
            rt::sleep(Duration::from_millis(20)).await;
        } else {
            rt::sleep(Duration::from_micros(rng.range(0, 2000))).await;
        }
    }
    // Every request has its answer, or its connection dropped.
    let _ = slots.acquire_many(depth as u32).await;
    world::trace(format!("the guest is done: {} requests, the last a successful flush", history.borrow().tap_ops.len()));
}

/// The tap's faults: its process crashes and a supervisor restarts it.
pub async fn inject(site: TapHandle, mut rng: Rng, end_ns: u64) {
    // A generator of its own, so sync-mode seeds keep their histories.
    let mut power = Rng::new(world::with(|w| w.seed) ^ 0x7461_7070_6f77_6572);
    // And one for journal damage, so the seeds from before it keep theirs
    // where it does not fire.
    let mut rot = Rng::new(world::with(|w| w.seed) ^ 0x6a6e_6c72_6f74_0001);
    while rt::now_ns() < end_ns {
        rt::sleep(Duration::from_millis(rng.range(300, 3000))).await;
        if rt::now_ns() >= end_ns {
            break;
        }
        // In async mode the host's power fails now and then (sync mode's
        // answer to a power loss is not built: see FAULTS.md).
        if site.borrow().journal.is_some() && power.chance(0.3) {
            world::count("tap host power loss");
            power_loss(&site);
        } else {
            world::count("tap crash");
            crash(&site);
        }
        // In async mode an entry the journal holds may rot on the tap
        // host's disk while the process is down; the operator restores it
        // within 0.3-2 s.
        if let Some(journal) = site.borrow().journal.clone() {
            if rot.chance(0.15) {
                let mend_at = rt::now_ns() + rot.range(300, 2000) * 1_000_000;
                if journal.lock().expect("journal").damage(rot.range(0, 1 << 30), mend_at) {
                    world::count("tap journal entry damaged");
                }
            }
        }
        // A supervisor restarts the process at once about a third of the
        // time (within the network's delays: the old process's last
        // batches may still be on the wire), else up to half a second later.
        let pause_us = if rng.chance(0.3) { rng.range(0, 5_000) } else { rng.range(5_000, 500_000) };
        rt::sleep(Duration::from_micros(pause_us)).await;
        start_until_up(&site, u64::MAX).await;
    }
}

/// The tap's share of the checks, on the reference image: its group's log
/// is its producers' batches, whole, each once and in each producer's
/// order; every write the guest was told is done is there (and every write
/// before a successful flush); and the backing file equals the replay of
/// the log, except where a request the guest never heard back about may or
/// may not have reached the log.
pub fn check(history: &History, image: &crate::sm::SmImage, file: &[u8]) -> Vec<String> {
    let mut failures = Vec::new();
    let Some(group) = image.groups.get(TAP_GROUP) else {
        return vec![format!("the tap's group {TAP_GROUP} is missing")];
    };
    let events = image.events.get(TAP_GROUP).cloned().unwrap_or_default();
    // The log as batches: at each point, the next batch of some process
    // (its producer identity and epoch), and never a batch of a process
    // older than one already in the log (the fence).
    let mut streams: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
    for key in history.tap_batches.keys() {
        streams.entry((key.0, process_of(*key))).or_default().push(key.1);
    }
    let mut next: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    let mut newest_process = 0u64;
    let mut logged_writes: BTreeMap<u64, u64> = BTreeMap::new();
    let mut pos = 0usize;
    'log: while pos < events.len() {
        // Processes not older than the newest seen come first, so two
        // processes' identical batches never read as a fence broken.
        let ordered = streams.iter().filter(|(s, _)| s.1 >= newest_process).chain(streams.iter().filter(|(s, _)| s.1 < newest_process));
        for (stream, seqs) in ordered {
            let Some(&seq) = seqs.get(next.get(stream).copied().unwrap_or(0)) else { continue };
            let sent = &history.tap_batches[&(stream.0, seq)];
            let here = &events[pos..(pos + sent.len()).min(events.len())];
            if here.len() == sent.len() && here.iter().zip(sent).all(|(a, b)| a.event == *b) {
                if stream.1 < newest_process {
                    failures.push(format!(
                        "tap log LSN {}: a batch of tap process {} is committed after one of process {newest_process}: a dead process's batch overtook its successor's writes",
                        events[pos].lsn, stream.1
                    ));
                }
                newest_process = newest_process.max(stream.1);
                for e in here {
                    if let rewind_wire::event::Event::Write { data, .. } = &e.event {
                        if let Some(tag) = write_tag(data) {
                            if let Some(at) = logged_writes.insert(tag, e.lsn) {
                                failures.push(format!("guest write {tag} is in the tap's log twice (LSN {at} and {})", e.lsn));
                            }
                        }
                    }
                }
                *next.entry(*stream).or_default() += 1;
                pos += sent.len();
                continue 'log;
            }
        }
        failures.push(format!("tap log LSN {}: no tap process's next batch starts here (phantom, duplicate or reordered)", events[pos].lsn));
        break;
    }
    // Async mode: every batch the journal took reaches the log (the journal
    // has drained; a crash of the tap's process keeps what it wrote).
    let journaled = streams.get(&(JOURNAL_PRODUCER, 0)).map_or(0, |s| s.len());
    let shipped = next.get(&(JOURNAL_PRODUCER, 0)).copied().unwrap_or(0);
    if shipped < journaled {
        failures.push(format!("journal batch {} and those after it ({} in all) were journaled but are not in the log", shipped + 1, journaled - shipped));
    }
    // Acknowledged writes are in the log, and so is every write sent to a
    // process before a flush it answered with success.
    let mut flushed_upto: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, op) in history.tap_ops.iter().enumerate() {
        if matches!(op.kind, OpKind::Flush) && op.answer == Some(0) {
            flushed_upto.insert(op.instance, i);
        }
    }
    for (i, op) in history.tap_ops.iter().enumerate() {
        if !matches!(op.kind, OpKind::Write { .. }) {
            continue;
        }
        let acked = op.answer == Some(0);
        let flushed = flushed_upto.get(&op.instance).is_some_and(|f| *f > i);
        if (acked || flushed) && !logged_writes.contains_key(&(i as u64)) {
            let why = if acked { "was answered as written" } else { "came before a successful flush" };
            failures.push(format!("acknowledged tap write lost: guest write {i} ({:?}) {why} but is not in the log", op.kind));
        }
    }
    // The backing file against the replay, sector by sector, skipping the
    // sectors whose last request never got a success.
    let mut uncertain = vec![false; (TAP_DISK_BYTES / SECTOR) as usize];
    for op in &history.tap_ops {
        for s in op.kind.sectors() {
            uncertain[s as usize] = op.answer != Some(0);
        }
    }
    let mut compared = 0u64;
    for b in 0..TAP_DISK_BYTES / 4096 {
        let block = image.block_at(TAP_GROUP, TAP_DISK, b, group.last_lsn).expect("the tap's group keeps its whole history");
        for s in 0..(4096 / SECTOR) {
            let sector = b * (4096 / SECTOR) + s;
            if uncertain[sector as usize] {
                continue;
            }
            compared += 1;
            let at = (sector * SECTOR) as usize;
            if block[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize] != file[at..at + SECTOR as usize] {
                failures.push(format!("tap disk sector {sector}: the replay at LSN {} differs from the backing file", group.last_lsn));
                // What touched it, for the report: the guest's requests, and the log's events.
                for (i, op) in history.tap_ops.iter().enumerate().filter(|(_, o)| o.kind.sectors().contains(&sector)) {
                    failures.push(format!("  request {i} to tap process {}: {:?}, answer {:?}", op.instance, op.kind, op.answer));
                }
                for e in events.iter().filter(|e| touches(&e.event, sector)) {
                    let tag = match &e.event {
                        rewind_wire::event::Event::Write { data, .. } => write_tag(data).map(|t| format!(" (guest request {t})")).unwrap_or_default(),
                        _ => String::new(),
                    };
                    failures.push(format!("  log LSN {}: {}{tag}", e.lsn, short(&e.event)));
                }
                return failures;
            }
        }
    }
    world::trace(format!(
        "tap checked: {} requests, {} batches in the log, {compared} of {} sectors compared",
        history.tap_ops.len(),
        next.values().sum::<usize>(),
        TAP_DISK_BYTES / SECTOR
    ));
    failures
}

/// Whether an event changes `sector` of the tap's disk.
fn touches(event: &rewind_wire::event::Event, sector: u64) -> bool {
    use rewind_wire::event::Event;
    let (offset, len) = match event {
        Event::Write { offset, data, .. } => (*offset, data.len() as u64),
        Event::WriteZeroes { offset, len, .. } | Event::Trim { offset, len, .. } => (*offset, *len),
        _ => return false,
    };
    (offset / SECTOR..(offset + len).div_ceil(SECTOR)).contains(&sector)
}

fn short(event: &rewind_wire::event::Event) -> String {
    use rewind_wire::event::Event;
    match event {
        Event::Write { offset, data, .. } => format!("write {offset}+{}", data.len()),
        Event::WriteZeroes { offset, len, .. } => format!("zeroes {offset}+{len}"),
        Event::Trim { offset, len, .. } => format!("trim {offset}+{len}"),
        other => format!("{other:?}"),
    }
}
