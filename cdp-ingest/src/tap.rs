//! The tap: an NBD export whose every mutation is written to the backing
//! file and queued for the log in one order, batched, and answered once
//! the sink has it (committed on the site, or durable in the journal).

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use rewind_wire::event::{split_write, Event, TimedEvent};
use rewind_wire::limits::{BATCH_BYTES_MAX, BATCH_EVENTS_MAX};
use tokio::sync::{mpsc, oneshot, Notify};

use rewind_nbd::protocol as nbd;
pub use rewind_nbd::server::{serve, Answer, Export};
pub use crate::BoxFuture;

/// Why the log did not take a batch.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Sync mode: the producer did not get the batch committed.
    #[error(transparent)]
    Producer(#[from] crate::producer::ProducerError),
    /// Async mode: the journal did not make the batch durable.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

/// Where the tap's batches go: a consistency group's log.
///
/// Rules: `submit` is called in log order and must keep it (a batch
/// submitted later never commits before one submitted earlier); it returns
/// once the batch is queued, waiting while the sink's window is full (that
/// wait is the back-pressure on the guest); the future it returns resolves
/// once the batch is committed, with its LSN range.
pub trait LogSink: Send + Sync + 'static {
    fn submit(&self, events: Vec<TimedEvent>) -> BoxFuture<'_, Result<Committed, SinkError>>;
}

/// Resolves once a submitted batch is committed (or durable, for the
/// journal), with its LSN range.
pub type Committed = BoxFuture<'static, Result<(u64, u64), SinkError>>;

/// Who waits on a queued piece of a write, and for which ticket.
type Waiter = (u64, Option<oneshot::Sender<Result<(), String>>>);

/// The tap's clock: event times in nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // production's clock
    fn now_ns(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A write is answered after its event is committed on the site (RPO 0).
    Sync,
    /// A write is answered once it is durable in the tap's local journal; a
    /// shipper sends the journal to the site behind the guest's back.
    Async,
}

pub struct TapConfig {
    /// The export's name: the disk's name.
    pub export: String,
    /// The disk's size in bytes.
    pub size_bytes: u64,
    /// The disk's sector size: the smallest block a guest may address.
    pub sector_bytes: u32,
    pub mode: Mode,
    /// Bytes of events the batcher puts in one batch at most.
    pub batch_bytes_max: usize,
}

/// What the ordered section hands the batcher: events and who waits on them.
struct Queued {
    events: Vec<TimedEvent>,
    bytes: usize,
    ticket: u64,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// The disk's current bytes, which the tap reads from and writes through
/// to: the backing file, or the simulation's in-memory file. Each call
/// does its work when the future is polled, not before.
pub trait Backing: Send + Sync + 'static {
    fn read_at(&self, offset: u64, len: u32) -> BoxFuture<'static, io::Result<Vec<u8>>>;
    fn write_at(&self, offset: u64, data: Vec<u8>) -> BoxFuture<'static, io::Result<()>>;
    /// Writes `len` zero bytes at `offset`; `punch` may release the space.
    fn zero(&self, offset: u64, len: u64, punch: bool) -> BoxFuture<'static, io::Result<()>>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> BoxFuture<'static, io::Result<()>>;
}

/// A backing file, its calls run off the async workers (a 32 MiB write
/// would stall them).
pub struct FileBacking(pub Arc<std::fs::File>);

impl FileBacking {
    fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&std::fs::File) -> io::Result<T> + Send + 'static) -> BoxFuture<'static, io::Result<T>> {
        let file = self.0.clone();
        Box::pin(async move { tokio::task::spawn_blocking(move || f(&file)).await.unwrap_or_else(|e| Err(io::Error::other(e.to_string()))) })
    }
}

impl Backing for FileBacking {
    fn read_at(&self, offset: u64, len: u32) -> BoxFuture<'static, io::Result<Vec<u8>>> {
        self.blocking(move |f| {
            let mut data = vec![0u8; len as usize];
            f.read_exact_at(&mut data, offset).map(|_| data)
        })
    }

    fn write_at(&self, offset: u64, data: Vec<u8>) -> BoxFuture<'static, io::Result<()>> {
        self.blocking(move |f| f.write_all_at(&data, offset))
    }

    fn zero(&self, offset: u64, len: u64, punch: bool) -> BoxFuture<'static, io::Result<()>> {
        self.blocking(move |f| zero_range(f, offset, len, punch))
    }

    /// An fdatasync error stops the process ([`crate::fsync_failed`]): it
    /// never reaches the guest as an EIO it could retry past.
    fn sync(&self) -> BoxFuture<'static, io::Result<()>> {
        self.blocking(|f| match f.sync_data() {
            Ok(()) => Ok(()),
            Err(e) => crate::fsync_failed("the backing file", e),
        })
    }
}

/// Runs the tap's background tasks (the batcher, the commit waiters): on
/// tokio in production, on the simulation's executor there.
pub trait Spawner: Send + Sync + 'static {
    fn spawn(&self, task: BoxFuture<'static, ()>);
}

pub struct TokioSpawner;

impl Spawner for TokioSpawner {
    #[allow(clippy::disallowed_methods)] // production's spawner
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        tokio::spawn(task);
    }
}

/// Switches that put known bugs back, for the simulation to show that it
/// finds them. Built only with the `simulation-bugs` feature; every switch
/// is off unless the simulation turns it on.
#[cfg(feature = "simulation-bugs")]
pub mod bugs {
    use std::sync::atomic::AtomicBool;

    /// Answer a write once its batch is queued at the sink, before the site
    /// has committed it (breaks sync mode's RPO 0).
    pub static ANSWER_BEFORE_COMMIT: AtomicBool = AtomicBool::new(false);
}

/// A mutation of the backing file, applied inside the ordered section.
enum Mutation {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64, punch: bool },
}

/// Writes that were ordered but are not committed yet, by ticket.
#[derive(Default)]
struct Inflight {
    tickets: BTreeSet<u64>,
    /// The first failure; once set, the tap refuses further writes.
    failed: Option<String>,
}

pub struct Tap {
    config: TapConfig,
    backing: Arc<dyn Backing>,
    clock: Arc<dyn Clock>,
    /// The ordered section: backing-file write and queueing happen under it.
    order: tokio::sync::Mutex<u64>,
    queue: mpsc::Sender<Queued>,
    inflight: Arc<Mutex<Inflight>>,
    settled: Arc<Notify>,
}

/// Queued events the batcher holds at most (back-pressure beyond this).
const QUEUE_DEPTH_MAX: usize = 1024;

impl Tap {
    /// A tap over `backing` whose background tasks run on `spawner`.
    pub fn new(config: TapConfig, backing: Arc<dyn Backing>, sink: Arc<dyn LogSink>, clock: Arc<dyn Clock>, spawner: Arc<dyn Spawner>) -> Arc<Tap> {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH_MAX);
        let inflight: Arc<Mutex<Inflight>> = Arc::default();
        let settled = Arc::new(Notify::new());
        let batch_bytes_max = config.batch_bytes_max.clamp(1, BATCH_BYTES_MAX);
        spawner.spawn(Box::pin(batcher(rx, sink, batch_bytes_max, inflight.clone(), settled.clone(), spawner.clone())));
        Arc::new(Tap { config, backing, clock, order: tokio::sync::Mutex::new(0), queue, inflight, settled })
    }

    pub fn export(&self) -> &str {
        &self.config.export
    }

    /// The ordered step of a mutation: apply it to the backing file and queue
    /// its events, under one lock. Returns a receiver that fires once the
    /// events are committed.
    async fn order_mutation(&self, mutation: Mutation, events: Vec<Event>) -> Result<oneshot::Receiver<Result<(), String>>, u32> {
        let mut ticket = self.order.lock().await;
        if let Some(why) = &self.inflight.lock().expect("inflight lock").failed {
            tracing::error!("refusing a write: the log failed earlier: {why}");
            return Err(nbd::EIO);
        }
        let applied = match mutation {
            Mutation::Write { offset, data } => self.backing.write_at(offset, data).await,
            Mutation::Zero { offset, len, punch } => self.backing.zero(offset, len, punch).await,
        };
        if let Err(e) = applied {
            tracing::error!("backing file write failed: {e}");
            return Err(if e.raw_os_error() == Some(libc::ENOSPC) { nbd::ENOSPC } else { nbd::EIO });
        }
        let time_ns = self.clock.now_ns();
        let timed: Vec<TimedEvent> = events.into_iter().map(|event| TimedEvent { time_ns, event }).collect();
        *ticket += 1;
        let (done, rx) = oneshot::channel();
        self.inflight.lock().expect("inflight lock").tickets.insert(*ticket);
        // Split into pieces the batcher can take whole; the last carries the waiter.
        let mut pieces: Vec<Vec<TimedEvent>> = vec![Vec::new()];
        let mut bytes = 0usize;
        for e in timed {
            let b = e.event.payload_bytes();
            let last = pieces.last_mut().expect("one piece");
            if !last.is_empty() && (bytes + b > self.config.batch_bytes_max || last.len() >= BATCH_EVENTS_MAX) {
                pieces.push(Vec::new());
                bytes = 0;
            }
            bytes += b;
            pieces.last_mut().expect("one piece").push(e);
        }
        let count = pieces.len();
        let mut done = Some(done);
        for (i, events) in pieces.into_iter().enumerate() {
            let bytes = events.iter().map(|e| e.event.payload_bytes()).sum();
            let done = if i + 1 == count { done.take() } else { None };
            // Pieces before the last share the ticket; only the last settles it.
            let queued = Queued { events, bytes, ticket: if i + 1 == count { *ticket } else { 0 }, done };
            if self.queue.send(queued).await.is_err() {
                return Err(nbd::ESHUTDOWN);
            }
        }
        Ok(rx)
    }

    /// Waits until every write ordered before this call is committed.
    async fn barrier(&self) -> Result<(), u32> {
        let upto = *self.order.lock().await;
        loop {
            let notified = self.settled.notified();
            {
                let inflight = self.inflight.lock().expect("inflight lock");
                if inflight.failed.is_some() {
                    return Err(nbd::EIO);
                }
                if inflight.tickets.first().is_none_or(|t| *t > upto) {
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

/// Takes queued events, puts as many as are waiting (up to the byte limit)
/// into one batch, submits it in order, and settles each waiter once its
/// batch is committed.
async fn batcher(
    mut rx: mpsc::Receiver<Queued>,
    sink: Arc<dyn LogSink>,
    bytes_max: usize,
    inflight: Arc<Mutex<Inflight>>,
    settled: Arc<Notify>,
    spawner: Arc<dyn Spawner>,
) {
    let mut carry: Option<Queued> = None;
    loop {
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut events = first.events;
        let mut bytes = first.bytes;
        let mut waiters = vec![(first.ticket, first.done)];
        while let Ok(q) = rx.try_recv() {
            if bytes + q.bytes > bytes_max || events.len() + q.events.len() > BATCH_EVENTS_MAX {
                carry = Some(q);
                break;
            }
            bytes += q.bytes;
            events.extend(q.events);
            waiters.push((q.ticket, q.done));
        }
        let settle = {
            let inflight = inflight.clone();
            let settled = settled.clone();
            move |result: Result<(), String>, waiters: Vec<Waiter>| {
                {
                    let mut i = inflight.lock().expect("inflight lock");
                    if let Err(e) = &result {
                        i.failed.get_or_insert_with(|| e.clone());
                    }
                    for (ticket, _) in &waiters {
                        i.tickets.remove(ticket);
                    }
                }
                for (_, done) in waiters {
                    if let Some(d) = done {
                        let _ = d.send(result.clone());
                    }
                }
                settled.notify_waiters();
            }
        };
        match sink.submit(events).await {
            #[cfg(feature = "simulation-bugs")]
            Ok(committed) if bugs::ANSWER_BEFORE_COMMIT.load(std::sync::atomic::Ordering::Relaxed) => {
                settle(Ok(()), waiters);
                spawner.spawn(Box::pin(async move {
                    let _ = committed.await;
                }));
            }
            Ok(committed) => {
                spawner.spawn(Box::pin(async move {
                    let result = committed.await.map(|_| ()).map_err(|e| e.to_string());
                    settle(result, waiters);
                }));
            }
            Err(e) => settle(Err(e.to_string()), waiters),
        }
    }
}

/// Waits for a mutation's sink, then for FUA makes the backing file and
/// everything ordered before it durable; gives the NBD reply code.
async fn answer(tap: Arc<Tap>, ordered: Result<oneshot::Receiver<Result<(), String>>, u32>, fua: bool) -> u32 {
    let rx = match ordered {
        Err(e) => return e,
        Ok(rx) => rx,
    };
    match rx.await {
        Ok(Ok(())) if fua => {
            let synced = tap.backing.sync().await;
            match (synced, tap.barrier().await) {
                (Ok(()), Ok(())) => 0,
                _ => nbd::EIO,
            }
        }
        Ok(Ok(())) => 0,
        Ok(Err(why)) => {
            tracing::error!("write not journaled: {why}");
            nbd::EIO
        }
        Err(_) => nbd::ESHUTDOWN,
    }
}

// `write` and `zero` return a future of a future on purpose: the outer one
// is the ordering step, the inner one the reply (see `server::Export`).
#[allow(clippy::async_yields_async)]
impl Export for Tap {
    fn name(&self) -> &str {
        &self.config.export
    }

    fn size(&self) -> u64 {
        self.config.size_bytes
    }

    fn block_min(&self) -> u32 {
        self.config.sector_bytes
    }

    fn description(&self) -> &str {
        match self.config.mode {
            Mode::Sync => "rewind CDP tap (sync): a write is answered once the site has committed it",
            Mode::Async => "rewind CDP tap (async): a write is answered once the tap's journal holds it",
        }
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(self: Arc<Self>, offset: u64, len: u32) -> BoxFuture<'static, Result<Vec<u8>, u32>> {
        Box::pin(async move {
            self.backing.read_at(offset, len).await.map_err(|e| {
                tracing::error!("backing file read failed: {e}");
                nbd::EIO
            })
        })
    }

    fn write(self: Arc<Self>, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'static, Answer> {
        Box::pin(async move {
            let events = split_write(&self.config.export, offset, &data);
            let ordered = self.order_mutation(Mutation::Write { offset, data }, events).await;
            let answer: Answer = Box::pin(answer(self, ordered, fua));
            answer
        })
    }

    fn zero(self: Arc<Self>, offset: u64, len: u64, trim: bool, punch: bool, fua: bool) -> BoxFuture<'static, Answer> {
        Box::pin(async move {
            let disk = self.config.export.clone();
            let event = if trim { Event::Trim { disk, offset, len } } else { Event::WriteZeroes { disk, offset, len } };
            let ordered = self.order_mutation(Mutation::Zero { offset, len, punch }, vec![event]).await;
            let answer: Answer = Box::pin(answer(self, ordered, fua));
            answer
        })
    }

    fn flush(self: Arc<Self>) -> Answer {
        Box::pin(async move {
            match (self.backing.sync().await, self.barrier().await) {
                (Ok(()), Ok(())) => 0,
                (Ok(()), Err(e)) => e,
                (Err(e), _) => {
                    tracing::error!("backing file sync failed: {e}");
                    nbd::EIO
                }
            }
        })
    }
}

/// Writes `len` zero bytes at `offset`, releasing the space where it can.
fn zero_range(file: &std::fs::File, offset: u64, len: u64, punch: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mode = if punch { libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE } else { libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE };
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    // Filesystems without fallocate modes: write zeroes in bounded pieces.
    let zeroes = vec![0u8; (len as usize).min(1 << 20)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "REWIND_TEST_BACKING_SYNC_CHILD";

    /// A failed fdatasync of the backing file stops the process rather than
    /// answering EIO and serving on. The failing sync runs in a child copy
    /// of this test binary: fdatasync on a pipe fails with EINVAL.
    #[test]
    fn a_failed_backing_sync_stops_the_process() {
        if std::env::var_os(CHILD).is_some() {
            let mut fds = [0i32; 2];
            // SAFETY: pipe fills two descriptors this test then owns.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let r = rt.block_on(FileBacking(Arc::new(file)).sync());
            println!("the sync returned {r:?} and the process went on");
            std::process::exit(0);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tap::tests::a_failed_backing_sync_stops_the_process", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "the child should abort: {:?}\n{stderr}", out.status);
        assert!(stderr.contains("fatal: fsync of the backing file failed"), "{stderr}");
    }
}
