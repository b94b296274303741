//! The async tap's shipper: sends the journal to the site in order, with
//! the journal's producer identity and numbers, and trims it once the site
//! has committed a batch and the backing file is synced past it; and the
//! redo that brings a backing file up to its journal at start. Also the
//! sync tap's sink over the ordered producer.
//!
//! Generic over the journal ([`ShipJournal`]) and the way to the site
//! ([`ProducerStates`], and the producer's `AppendLink` and
//! `ProducerRuntime`), so the simulation runs this same code.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rewind_wire::event::{Event, EventBatch, TimedEvent};
use tokio::sync::{mpsc, oneshot};

use crate::journal::{Journal, JournalError};
use crate::producer::{AppendLink, Appended, Producer, ProducerError, ProducerRuntime};
use crate::tap::{self, Committed, LogSink, SinkError};
use crate::BoxFuture;

/// Why the shipper stopped: each is something retrying cannot mend.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("ask the site where this tap's journal stands: {0}")]
    Asking(String),
    #[error("the site has applied batch {last_seq} from this journal's producer {client_id:016x}, but the journal in {place} ends before batch {next_seq}: it is not the journal this tap wrote")]
    NotThisJournal { last_seq: u64, client_id: u64, place: String, next_seq: u64 },
    #[error("the journal in {place} starts at batch {first} but the site has only up to batch {last_seq}: batches in between are lost")]
    Gap { place: String, first: u64, last_seq: u64 },
    #[error("journal batch {got} where {due} was due")]
    OutOfOrder { got: u64, due: u64 },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("the site did not take journal batch {seq}: {why}")]
    NotTaken { seq: u64, why: ProducerError },
    #[error(transparent)]
    Producer(#[from] ProducerError),
    #[error("fdatasync of the backing file failed: {0}; the journal keeps every batch it could not trim")]
    BackingSync(std::io::Error),
    #[error("redo journal batch {seq} onto the backing file: {source}")]
    Redo { seq: u64, source: std::io::Error },
    #[error("the shipper's tasks stopped")]
    Stopped,
}

/// The tap's log sink: one ordered producer into one group.
pub struct ProducerSink {
    group: String,
    producer: tokio::sync::Mutex<Producer>,
}

impl ProducerSink {
    /// A sink over `producer`. A sync tap's producer starts at number 1 of
    /// its epoch, so its first batch fences the batches of its identity's
    /// earlier processes that may still be on their way.
    pub fn over(producer: Producer, group: &str) -> ProducerSink {
        ProducerSink { group: group.to_string(), producer: tokio::sync::Mutex::new(producer) }
    }
}

impl LogSink for ProducerSink {
    fn submit(&self, events: Vec<TimedEvent>) -> BoxFuture<'_, Result<Committed, SinkError>> {
        Box::pin(async move {
            let rx = self
                .producer
                .lock()
                .await
                .submit(&self.group, events)
                .await?;
            let committed: Committed = Box::pin(async move {
                match rx.await {
                    Ok(Ok(range)) => Ok(range),
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(ProducerError::Stopped.into()),
                }
            });
            Ok(committed)
        })
    }
}

/// The journal as the shipper sees it: [`Journal`] here, an in-memory one
/// in the simulation, which runs [`ship_journal`] itself.
pub trait ShipJournal: Clone + Send + Sync + 'static {
    /// The producer identity its batches carry.
    fn client_id(&self) -> u64;
    /// The sequence number the next batch will get.
    fn next_seq(&self) -> u64;
    /// The sequence numbers still held: (first, last), or None when empty.
    fn held(&self) -> Option<(u64, u64)>;
    /// Forgets every batch up to `seq`: the site has committed them.
    fn trim(&self, seq: u64);
    /// The oldest batch above `after`, once it is durable.
    fn next_after(&self, after: u64) -> BoxFuture<'_, Result<EventBatch, JournalError>>;
    /// Where it lives, for messages.
    fn place(&self) -> String;
}

impl ShipJournal for Journal {
    fn client_id(&self) -> u64 {
        Journal::client_id(self)
    }

    fn next_seq(&self) -> u64 {
        self.stats().next_seq
    }

    fn held(&self) -> Option<(u64, u64)> {
        Journal::held(self)
    }

    fn trim(&self, seq: u64) {
        Journal::trim(self, seq)
    }

    fn next_after(&self, after: u64) -> BoxFuture<'_, Result<EventBatch, JournalError>> {
        Box::pin(Journal::next_after(self, after))
    }

    fn place(&self) -> String {
        self.dir().display().to_string()
    }
}

/// Why the site did not say where a producer stands.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The site refused the question, or answered in another protocol:
    /// asking again will not mend it, and the shipper stops.
    #[error("{0}")]
    Refused(String),
    /// No node answered as the leader yet: the shipper asks again.
    #[error("{0}")]
    Unavailable(String),
}

/// Where the site stands with a producer: the last batch it applied.
pub trait ProducerStates: Send + Sync + 'static {
    fn last_seq<'a>(&'a self, group: &'a str, client_id: u64) -> BoxFuture<'a, Result<u64, StateError>>;
}

/// What a shipper needs: the journal, the way to the site, and its clock.
pub struct Shipping<J> {
    pub journal: J,
    pub group: String,
    pub window: usize,
    pub link: Arc<dyn AppendLink>,
    pub states: Arc<dyn ProducerStates>,
    pub runtime: Arc<dyn ProducerRuntime>,
    /// The site's LSN of the last batch shipped, for reports.
    pub shipped_lsn: Arc<AtomicU64>,
    /// The tap's backing file: synced before the journal is trimmed.
    pub backing: Arc<dyn tap::Backing>,
}

/// The shipper over any journal, link and clock: asks the site where the
/// journal's producer stands, trims what the site has, and resends the rest
/// with the same numbers, so a batch shipped before a crash of the tap is
/// applied once.
pub async fn ship_journal<J: ShipJournal>(s: Shipping<J>) -> Result<(), ShipError> {
    let Shipping { journal, group, window, link, states, runtime, shipped_lsn, backing } = s;
    let client_id = journal.client_id();
    let last_seq = loop {
        match states.last_seq(&group, client_id).await {
            Ok(last_seq) => break last_seq,
            Err(StateError::Refused(why)) => return Err(ShipError::Asking(why)),
            Err(StateError::Unavailable(why)) => {
                tracing::warn!("the site does not answer yet: {why}; writes stay in the journal");
                runtime.sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let next_seq = journal.next_seq();
    if last_seq >= next_seq {
        return Err(ShipError::NotThisJournal { last_seq, client_id, place: journal.place(), next_seq });
    }
    if let Some((first, _)) = journal.held() {
        if first > last_seq + 1 {
            return Err(ShipError::Gap { place: journal.place(), first, last_seq });
        }
    }
    journal.trim(last_seq);
    tracing::info!(client_id = format!("{client_id:016x}"), site_has = last_seq, unshipped = journal.held().map_or(0, |(a, b)| b + 1 - a), "shipping the journal");
    let mut producer = Producer::over(link, runtime.clone(), window, client_id, last_seq + 1);
    let (acks, mut acks_rx) = mpsc::channel::<(u64, oneshot::Receiver<Appended>)>(window.max(1));
    // The waiter notes each batch the site commits, in order; the trimmer
    // syncs the backing file past what is noted, then trims the journal to
    // it (one fdatasync covers every batch committed meanwhile). A batch
    // leaves the journal only once both the site and the backing file hold
    // it, so after a power loss the journal can redo what the backing file
    // lost ([`redo_journal`]).
    let (failed, mut failed_rx) = mpsc::channel::<ShipError>(2);
    let (committed, mut committed_rx) = tokio::sync::watch::channel((last_seq, 0u64));
    let waiter_failed = failed.clone();
    runtime.spawn(Box::pin(async move {
        while let Some((seq, rx)) = acks_rx.recv().await {
            let e = match rx.await {
                Ok(Ok((_, lsn_last))) => {
                    committed.send_replace((seq, lsn_last));
                    metrics::counter!("rewind_tap_shipped_batches_total").increment(1);
                    continue;
                }
                Ok(Err(e)) => ShipError::NotTaken { seq, why: e },
                Err(_) => ShipError::Producer(ProducerError::Stopped),
            };
            let _ = waiter_failed.send(e).await;
            return;
        }
    }));
    let trimmer_journal = journal.clone();
    runtime.spawn(Box::pin(async move {
        let mut trimmed = last_seq;
        loop {
            let (seq, lsn) = *committed_rx.borrow_and_update();
            if seq > trimmed {
                #[cfg(feature = "simulation-bugs")]
                let skip = bugs::TRIM_BEFORE_BACKING_SYNC.load(Ordering::Relaxed);
                #[cfg(not(feature = "simulation-bugs"))]
                let skip = false;
                if !skip {
                    if let Err(e) = backing.sync().await {
                        let _ = failed.send(ShipError::BackingSync(e)).await;
                        return;
                    }
                }
                trimmer_journal.trim(seq);
                shipped_lsn.store(lsn, Ordering::Relaxed);
                trimmed = seq;
                continue;
            }
            if committed_rx.changed().await.is_err() {
                return;
            }
        }
    }));
    let mut cursor = last_seq;
    loop {
        tokio::select! {
            batch = journal.next_after(cursor) => {
                let batch = batch?;
                if batch.seq != producer.next_seq() {
                    return Err(ShipError::OutOfOrder { got: batch.seq, due: producer.next_seq() });
                }
                let rx = producer.submit(&group, batch.events).await?;
                cursor = batch.seq;
                #[cfg(feature = "simulation-bugs")]
                if bugs::TRIM_ON_SEND.load(Ordering::Relaxed) {
                    journal.trim(cursor);
                }
                if acks.send((batch.seq, rx)).await.is_err() {
                    break;
                }
            }
            e = failed_rx.recv() => return Err(e.unwrap_or(ShipError::Stopped)),
        }
    }
    Err(failed_rx.recv().await.unwrap_or(ShipError::Stopped))
}

/// Applies the journal's batches to the backing file in order, then syncs
/// it; run at start, before the tap serves and before the shipper trims
/// anything. After a power loss on the tap's host the backing file may
/// have lost writes the journal holds (the journal keeps a batch until the
/// backing file is synced past it), or kept writes the journal never took
/// (never answered); both come back to what the journal says, so the
/// guest's disk and the log agree again. Returns the batches applied.
pub async fn redo_journal<J: ShipJournal>(journal: &J, backing: &dyn tap::Backing) -> Result<u64, ShipError> {
    let Some((first, last)) = journal.held() else { return Ok(0) };
    for seq in first..=last {
        let batch = journal.next_after(seq - 1).await?;
        if batch.seq != seq {
            return Err(ShipError::OutOfOrder { got: batch.seq, due: seq });
        }
        for e in batch.events {
            let done = match e.event {
                Event::Write { offset, data, .. } => backing.write_at(offset, data).await,
                Event::WriteZeroes { offset, len, .. } => backing.zero(offset, len, false).await,
                Event::Trim { offset, len, .. } => backing.zero(offset, len, true).await,
                _ => Ok(()),
            };
            done.map_err(|source| ShipError::Redo { seq, source })?;
        }
    }
    backing.sync().await.map_err(ShipError::BackingSync)?;
    Ok(last + 1 - first)
}


/// Known bugs the simulation puts back to show it finds them. Built only
/// with the `simulation-bugs` feature; every switch is off unless set.
#[cfg(feature = "simulation-bugs")]
pub mod bugs {
    use std::sync::atomic::AtomicBool;

    /// The shipper trims a batch from the journal once it is sent, before
    /// the site has committed it: a crash of the tap then loses it.
    pub static TRIM_ON_SEND: AtomicBool = AtomicBool::new(false);
    /// The shipper trims a committed batch from the journal without syncing
    /// the backing file first: a power loss on the tap's host can then
    /// lose an answered write from the guest's disk that the log keeps.
    pub static TRIM_BEFORE_BACKING_SYNC: AtomicBool = AtomicBool::new(false);
}

#[cfg(test)]
mod tests {
    use super::redo_journal;
    use crate::journal::{Journal, JOURNAL_BYTES_MIN};
    use crate::tap::FileBacking;
    use rewind_wire::event::{Event, TimedEvent};
    use std::sync::Arc;

    #[tokio::test]
    async fn redo_brings_the_backing_file_up_to_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("journal"), "g", JOURNAL_BYTES_MIN, || 7).unwrap();
        let at = |time_ns, event| TimedEvent { time_ns, event };
        let d = || "d".to_string();
        journal.append(vec![at(1, Event::Write { disk: d(), offset: 0, data: vec![0xaa; 4096] })]).await.unwrap();
        journal.append(vec![at(2, Event::WriteZeroes { disk: d(), offset: 4096, len: 4096 })]).await.unwrap();
        journal.append(vec![at(3, Event::Trim { disk: d(), offset: 8192, len: 4096 }), at(4, Event::Bookmark { name: "b".into(), app_consistent: false })]).await.unwrap();
        journal.append(vec![at(5, Event::Write { disk: d(), offset: 512, data: vec![0xbb; 1024] })]).await.unwrap();
        // The backing file lost every one of those writes, and kept one the
        // journal never took (at 12288, never answered: it stays).
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0x55; 16384]).unwrap();
        let backing = FileBacking(Arc::new(std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap()));
        assert_eq!(redo_journal(&journal, &backing).await.unwrap(), 4);
        let mut want = vec![0xaa; 4096];
        want[512..1536].fill(0xbb);
        want.extend(vec![0; 8192]);
        want.extend(vec![0x55; 4096]);
        assert_eq!(std::fs::read(&path).unwrap(), want);
        // Batches the site and the backing file both hold are not redone.
        journal.trim(3);
        std::fs::write(&path, vec![0x55; 16384]).unwrap();
        assert_eq!(redo_journal(&journal, &backing).await.unwrap(), 1);
        let got = std::fs::read(&path).unwrap();
        assert!(got[512..1536].iter().all(|b| *b == 0xbb) && got[..512].iter().all(|b| *b == 0x55));
        journal.trim(4);
        assert_eq!(redo_journal(&journal, &backing).await.unwrap(), 0);
    }
}
