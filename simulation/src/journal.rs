//! The async tap's journal in the simulated world, and production's shipper
//! over it.
//!
//! The journal here keeps production's rules (`cdp-ingest/src/journal.rs`)
//! on an in-memory file: appends are journaled in the order the tap gives
//! them, a writer takes what is queued as one round, "writes" it (the page
//! cache: a crash of the tap's process keeps it, a power loss on its host
//! keeps only what a sync covered; the open after a crash syncs, as
//! production's does), syncs once, and only then
//! answers the round's appends and lets the shipper see them; the bytes not
//! yet committed on the site are bounded, and a full journal holds the
//! writer (and so the guest) until the shipper trims. What is not modelled
//! is the file format (segments, checksums, a torn tail cut at open): that
//! is tested on real files (`journal.rs`'s unit tests and proptest, and
//! `node/tests/tap.rs`'s SIGKILL tests).
//!
//! Each tap process first runs production's [`redo_journal`] (the journal's
//! batches onto the backing file), then production's [`ship_journal`]: it
//! asks a node where the journal's producer stands (a linearizable read on
//! the leader, as production's `ProducerState`), trims, and ships the rest
//! through production's `Producer` over the simulated append streams,
//! trimming each batch once the site has committed it and the backing file
//! is synced past it.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rewind_cdp_ingest::journal::{recovery, BadEntry, JournalError, Recovery};
use rewind_cdp_ingest::shipper::{redo_journal, ship_journal, ProducerStates, ShipJournal, Shipping, StateError};
use rewind_cdp_ingest::tap::{Backing, Committed, LogSink, SinkError};
use rewind_cdp_ingest::BoxFuture;
use rewind_wire::event::{EventBatch, TimedEvent};
use rewind_wire::rpc::{Request, Response};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::model::{JOURNAL_BYTES_MAX, JOURNAL_FULL, JOURNAL_PRODUCER, NODES, PRODUCER_DEADLINE, SHIPPER_ADDR, TAP_GROUP, TAP_NODE};
use crate::net::deliver;
use crate::{rt, service_of, stream, world, Raft};

/// Appends queued for the writer at most.
const WRITE_QUEUE_MAX: usize = 16;
/// Batches the shipper's producer has in flight at most.
const WINDOW: usize = 4;

/// The journal's file, outliving the tap's processes.
pub struct JournalFile {
    /// Written batches not yet trimmed, in sequence order.
    entries: VecDeque<(EventBatch, u64)>,
    /// Bytes of those batches.
    bytes: u64,
    /// The sequence number the next batch gets.
    next_seq: u64,
    /// The last batch on the disk for good, which the shipper may see: a
    /// sync covered it, or the open after a crash did (production syncs the
    /// newest segment at open, so what a crash left in the page cache counts).
    synced: u64,
    /// The process that has the journal open.
    owner: Option<u64>,
    /// A held batch whose entry rotted on the tap host's disk, and when the
    /// operator restores it (from a copy of the journal).
    damaged: Option<(u64, u64)>,
}

impl JournalFile {
    pub fn new() -> Arc<Mutex<JournalFile>> {
        Arc::new(Mutex::new(JournalFile { entries: VecDeque::new(), bytes: 0, next_seq: 1, synced: 0, owner: None, damaged: None }))
    }

    /// The process that had it open is gone.
    pub fn close(&mut self) {
        self.owner = None;
    }

    /// The power fails on the tap's host: batches no sync covered are gone,
    /// and their numbers will be given again.
    pub fn power_loss(&mut self) {
        self.owner = None;
        let durable = self.synced;
        while self.entries.back().is_some_and(|(b, _)| b.seq > durable) {
            let (b, n) = self.entries.pop_back().expect("checked");
            self.bytes -= n;
            world::with(|w| w.tap_batches.remove(&(JOURNAL_PRODUCER, b.seq)));
        }
        if self.next_seq > durable + 1 {
            world::trace(format!("the journal loses batches {}..={} (never synced)", durable + 1, self.next_seq - 1));
        }
        self.next_seq = durable + 1;
    }

    /// Batches not yet committed on the site.
    pub fn held(&self) -> usize {
        self.entries.len()
    }

    /// One held, synced entry rots on the tap host's disk (the process is
    /// down); the operator restores it at `mend_at_ns`. False when nothing
    /// synced is held.
    pub fn damage(&mut self, pick: u64, mend_at_ns: u64) -> bool {
        let synced: Vec<u64> = self.entries.iter().map(|(b, _)| b.seq).filter(|s| *s <= self.synced).collect();
        if synced.is_empty() {
            return false;
        }
        let seq = synced[(pick % synced.len() as u64) as usize];
        world::trace(format!("journal batch {seq} rots on the tap host's disk (restored {} ms from now)", (mend_at_ns.saturating_sub(rt::now_ns())) / 1_000_000));
        self.damaged = Some((seq, mend_at_ns));
        true
    }

    /// What opening finds: production's rule (`journal::recovery`) decides
    /// about a damaged entry. Err: the open is refused.
    pub fn recover(&mut self) -> Result<(), String> {
        let Some((seq, mend_at)) = self.damaged else { return Ok(()) };
        if rt::now_ns() >= mend_at {
            world::trace(format!("the operator restored journal batch {seq}"));
            self.damaged = None;
            return Ok(());
        }
        let bad = BadEntry::Damaged(format!("batch {seq} fails its checksum"));
        match recovery(&bad, true) {
            Recovery::Refuse => Err(format!("journal batch {seq} fails its checksum")),
            Recovery::Cut => {
                // Everything from the bad entry on is dropped, and its
                // numbers are given again.
                while self.entries.back().is_some_and(|(b, _)| b.seq >= seq) {
                    let (b, n) = self.entries.pop_back().expect("checked");
                    self.bytes -= n;
                    world::with(|w| w.tap_batches.remove(&(JOURNAL_PRODUCER, b.seq)));
                }
                world::trace(format!("the journal is cut at batch {seq}: batches {seq}..={} are gone", self.next_seq - 1));
                self.next_seq = seq;
                self.synced = self.synced.min(seq - 1);
                self.damaged = None;
                Ok(())
            }
        }
    }
}

/// One tap process's handle on the journal.
#[derive(Clone)]
pub struct SimJournal {
    file: Arc<Mutex<JournalFile>>,
    instance: u64,
    /// Woken when a round is synced, and when a trim makes room.
    changed: Arc<Notify>,
    writer: mpsc::Sender<(Vec<TimedEvent>, oneshot::Sender<u64>)>,
}

fn batch_bytes(events: &[TimedEvent]) -> u64 {
    // The record's size, near enough: payloads plus a header per event.
    events.iter().map(|e| e.event.payload_bytes() as u64 + 64).sum::<u64>() + 64
}

impl SimJournal {
    /// Opens the journal for tap process `instance` and starts its writer
    /// (a task of the tap's process); refused over a damaged entry.
    pub fn open(file: Arc<Mutex<JournalFile>>, instance: u64) -> Result<SimJournal, String> {
        {
            let mut f = file.lock().expect("journal");
            f.recover()?;
            f.owner = Some(instance);
            f.synced = f.next_seq - 1;
        }
        let (writer, rx) = mpsc::channel(WRITE_QUEUE_MAX);
        let j = SimJournal { file, instance, changed: Arc::new(Notify::new()), writer };
        rt::spawn_local(j.clone().write(rx));
        Ok(j)
    }

    fn mine(&self) -> bool {
        self.file.lock().expect("journal").owner == Some(self.instance)
    }

    /// The writer: a round is whatever is queued; each batch waits for room
    /// and is written, then one sync covers the round and its appends are
    /// answered.
    async fn write(self, mut rx: mpsc::Receiver<(Vec<TimedEvent>, oneshot::Sender<u64>)>) {
        while let Some(first) = rx.recv().await {
            let mut round = vec![first];
            while let Ok(next) = rx.try_recv() {
                round.push(next);
            }
            let mut answers = Vec::new();
            for (events, done) in round {
                let need = batch_bytes(&events);
                let mut stalled = false;
                loop {
                    let changed = self.changed.notified();
                    let (fits, unsynced) = {
                        let f = self.file.lock().expect("journal");
                        (f.bytes + need <= JOURNAL_BYTES_MAX || f.entries.is_empty(), f.next_seq - 1 > f.synced)
                    };
                    if fits {
                        break;
                    }
                    if unsynced {
                        // Publish what is written first, so the shipper can make room.
                        self.sync(&mut answers).await;
                        continue;
                    }
                    if !stalled {
                        stalled = true;
                        world::count(JOURNAL_FULL);
                    }
                    changed.await;
                }
                let latency = world::with(|w| w.disk_rng.range(10, 100));
                rt::sleep(Duration::from_micros(latency)).await;
                let seq = {
                    let mut f = self.file.lock().expect("journal");
                    let seq = f.next_seq;
                    f.next_seq += 1;
                    f.bytes += need;
                    let batch = EventBatch { group: TAP_GROUP.into(), client_id: JOURNAL_PRODUCER, seq, events };
                    world::with(|w| w.tap_batches.insert((JOURNAL_PRODUCER, seq), batch.events.iter().map(|e| e.event.clone()).collect()));
                    f.entries.push_back((batch, need));
                    seq
                };
                answers.push((seq, done));
            }
            self.sync(&mut answers).await;
        }
    }

    /// fdatasync: afterwards the written batches are durable, visible to the
    /// shipper, and answered.
    async fn sync(&self, answers: &mut Vec<(u64, oneshot::Sender<u64>)>) {
        let latency = world::with(|w| w.disk_rng.range(100, 2000));
        rt::sleep(Duration::from_micros(latency)).await;
        {
            let mut f = self.file.lock().expect("journal");
            if f.owner != Some(self.instance) {
                return;
            }
            f.synced = f.next_seq - 1;
        }
        self.changed.notify_waiters();
        for (seq, done) in answers.drain(..) {
            let _ = done.send(seq);
        }
    }
}

/// The tap's sink in async mode: a batch is done once the journal holds it.
pub struct JournalSink(pub SimJournal);

impl LogSink for JournalSink {
    fn submit(&self, events: Vec<TimedEvent>) -> BoxFuture<'_, Result<Committed, SinkError>> {
        Box::pin(async move {
            let (done, rx) = oneshot::channel();
            self.0.writer.send((events, done)).await.map_err(|_| SinkError::Journal(JournalError::WriterStopped))?;
            let durable: Committed = Box::pin(async move { rx.await.map(|seq| (seq, seq)).map_err(|_| SinkError::Journal(JournalError::WriterStopped)) });
            Ok(durable)
        })
    }
}

impl ShipJournal for SimJournal {
    fn client_id(&self) -> u64 {
        JOURNAL_PRODUCER
    }

    fn next_seq(&self) -> u64 {
        self.file.lock().expect("journal").next_seq
    }

    fn held(&self) -> Option<(u64, u64)> {
        let f = self.file.lock().expect("journal");
        Some((f.entries.front()?.0.seq, f.entries.back()?.0.seq))
    }

    fn trim(&self, seq: u64) {
        if !self.mine() {
            return;
        }
        let mut f = self.file.lock().expect("journal");
        while f.entries.front().is_some_and(|(b, _)| b.seq <= seq) {
            let (_, n) = f.entries.pop_front().expect("checked");
            f.bytes -= n;
        }
        drop(f);
        self.changed.notify_waiters();
    }

    fn next_after(&self, after: u64) -> BoxFuture<'_, Result<EventBatch, JournalError>> {
        Box::pin(async move {
            loop {
                let changed = self.changed.notified();
                {
                    let f = self.file.lock().expect("journal");
                    if f.owner != Some(self.instance) {
                        return Err(JournalError::Closed);
                    }
                    if let Some((b, _)) = f.entries.iter().find(|(b, _)| b.seq > after && b.seq <= f.synced) {
                        return Ok(b.clone());
                    }
                }
                changed.await;
            }
        })
    }

    fn place(&self) -> String {
        "the simulated tap host".into()
    }
}

/// Where the site says the journal's producer stands: production's
/// request service answers `ProducerState` (on the leader, after a
/// linearizable read).
async fn producer_state(raft: Raft, (group, client_id): (String, u64)) -> Result<u64, String> {
    let service = service_of(raft)?;
    match service.handle(Request::ProducerState { group, client_id }).await {
        Response::Producer { last_seq } => Ok(last_seq),
        Response::Error(e) => Err(format!("node {}: {}", service.id, e.message)),
        other => Err(format!("node {}: unexpected reply {other:?}", service.id)),
    }
}

/// The shipper's way to ask the site: each node in turn until one answers
/// as the leader.
struct SimStates;

impl ProducerStates for SimStates {
    fn last_seq<'a>(&'a self, group: &'a str, client_id: u64) -> BoxFuture<'a, Result<u64, StateError>> {
        let asks: Vec<_> = NODES
            .iter()
            .map(|node| {
                let node = *node;
                (node, deliver(SHIPPER_ADDR, node, "producer-state", (group.to_string(), client_id), Duration::from_secs(2), producer_state))
            })
            .collect();
        // The network's futures stay on the executor's thread; the shipper
        // gets a handle it can hold anywhere.
        let answer = rt::spawn_local(async move {
            let mut why = Vec::new();
            for (node, ask) in asks {
                match ask.await {
                    Ok(last) => return Ok(last),
                    Err(e) => why.push(format!("n{node}: {e}")),
                }
            }
            Err(why.join("; "))
        });
        Box::pin(async move {
            match answer.await {
                Ok(Ok(last)) => Ok(last),
                Ok(Err(e)) => Err(StateError::Unavailable(format!("no node answered as the leader: {e}"))),
                Err(e) => Err(StateError::Unavailable(e.to_string())),
            }
        })
    }
}

/// Starts production's shipper for tap process `journal.instance`, as a
/// task of the tap's process. The shipper gives up only on what retrying
/// cannot mend, so its error is a failure of the seed; then `failed` runs
/// (production's tap process exits). It first redoes the journal onto the
/// backing file; the receiver resolves once that is done.
pub fn start_shipper(journal: SimJournal, backing: Arc<dyn Backing>, failed: Box<dyn FnOnce()>) -> oneshot::Receiver<()> {
    let instance = journal.instance;
    let (redone_tx, redone) = oneshot::channel();
    let held = journal.clone();
    let redo_backing = backing.clone();
    let shipping = Shipping {
        journal,
        group: TAP_GROUP.into(),
        window: WINDOW,
        link: stream::link(SHIPPER_ADDR, PRODUCER_DEADLINE * 1000),
        states: Arc::new(SimStates),
        runtime: Arc::new(stream::SimProducerRuntime),
        shipped_lsn: Arc::new(AtomicU64::new(0)),
        backing,
    };
    rt::with_node(Some(TAP_NODE), || {
        rt::spawn_local(async move {
            // As production's `run`: the backing file is brought up to the
            // journal before the tap serves or the shipper trims.
            let r = match redo_journal(&held, redo_backing.as_ref()).await {
                Ok(n) => {
                    world::trace(format!("tap process {instance} redid {n} journal batches onto the backing file"));
                    let _ = redone_tx.send(());
                    ship_journal(shipping).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                let why = format!("the shipper of tap process {instance} failed: {e:#}");
                world::trace(why.clone());
                world::with(|w| w.tap_errors.push(why));
                failed();
            }
        })
    });
    redone
}
