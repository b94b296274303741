//! `rewind tap`: the cdp-ingest tap, wired to the site through a producer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use rewind_cdp_ingest::journal::{Journal, JournalSink};
use rewind_cdp_ingest::tap::{self, BoxFuture, Committed, LogSink, SinkError, Tap, TapConfig};
use rewind_wire::event::{Event, EventBatch, TimedEvent};
use rewind_wire::rpc::{Request, Response, TapReport};
use tokio::sync::{mpsc, oneshot};

use crate::client::{Client, Producer};
use crate::producer::{AppendLink, ProducerRuntime};

/// The tap's log sink: one ordered producer into one group.
pub struct ProducerSink {
    group: String,
    producer: tokio::sync::Mutex<Producer>,
}

impl ProducerSink {
    /// A sink whose producer is `client_id` in `epoch`: a sync tap's
    /// process, whose first batch fences the batches of its identity's
    /// earlier processes that may still be on their way.
    pub fn in_epoch(client: Client, group: &str, window: usize, client_id: u64, epoch: u32) -> ProducerSink {
        ProducerSink::over(Producer::resume(client, window, client_id, rewind_wire::event::seq_in_epoch(epoch, 1)), group)
    }

    /// A sink over a producer made elsewhere (the simulation's).
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
                .await
                .map_err(|e| SinkError(format!("{e:#}")))?;
            let committed: Committed = Box::pin(async move {
                match rx.await {
                    Ok(Ok(range)) => Ok(range),
                    Ok(Err(e)) => Err(SinkError(format!("{e:#}"))),
                    Err(_) => Err(SinkError("the producer stopped".into())),
                }
            });
            Ok(committed)
        })
    }
}

pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

pub enum TapMode {
    /// Answer a write once the site has committed it. `identity`: the file
    /// that keeps the tap's producer identity and epoch ([`next_identity`]).
    Sync { identity: PathBuf },
    /// Answer once the journal in `journal` holds it; ship behind.
    Async { journal: PathBuf, journal_bytes_max: u64 },
}

pub struct TapOptions {
    pub group: String,
    pub disk: String,
    pub backing: PathBuf,
    pub listen: Listen,
    pub window: usize,
    pub mode: TapMode,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// How long the shipper keeps trying through an outage of the site: as long
/// as the tap runs. The journal holds the writes; back-pressure bounds it.
const SHIP_DEADLINE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// How often an async tap updates its metrics, and reports to the site.
const METRICS_EVERY: Duration = Duration::from_millis(250);
const REPORT_EVERY: Duration = Duration::from_secs(1);

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
    fn next_after(&self, after: u64) -> BoxFuture<'_, anyhow::Result<EventBatch>>;
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

    fn next_after(&self, after: u64) -> BoxFuture<'_, anyhow::Result<EventBatch>> {
        Box::pin(async move { Ok(Journal::next_after(self, after).await?) })
    }

    fn place(&self) -> String {
        self.dir().display().to_string()
    }
}

/// Where the site stands with a producer: the last batch it applied.
pub trait ProducerStates: Send + Sync + 'static {
    /// An error that is a [`crate::client::Refused`] ends the shipper; any
    /// other is retried.
    fn last_seq<'a>(&'a self, group: &'a str, client_id: u64) -> BoxFuture<'a, anyhow::Result<u64>>;
}

impl ProducerStates for Client {
    fn last_seq<'a>(&'a self, group: &'a str, client_id: u64) -> BoxFuture<'a, anyhow::Result<u64>> {
        Box::pin(async move {
            match self.call_leader(&Request::ProducerState { group: group.to_string(), client_id }).await? {
                Response::Producer { last_seq } => Ok(last_seq),
                // Another protocol: retrying will not mend it.
                other => Err(crate::client::Refused { kind: rewind_wire::rpc::ErrorKind::Internal, message: format!("unexpected reply {other:?}") }.into()),
            }
        })
    }
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

/// Ships the journal to the site in order, with the journal's producer
/// identity, and trims it as batches are committed. Returns only on an
/// error that retrying cannot mend.
async fn ship(client: Client, group: String, journal: Journal, window: usize, shipped_lsn: Arc<AtomicU64>, backing: Arc<dyn tap::Backing>) -> anyhow::Result<()> {
    let client = Arc::new(client.with_deadline(SHIP_DEADLINE));
    let runtime = Arc::new(crate::producer::TokioRuntime::default());
    ship_journal(Shipping { journal, group, window, link: client.clone(), states: client, runtime, shipped_lsn, backing }).await
}

/// The shipper over any journal, link and clock: asks the site where the
/// journal's producer stands, trims what the site has, and resends the rest
/// with the same numbers, so a batch shipped before a crash of the tap is
/// applied once.
pub async fn ship_journal<J: ShipJournal>(s: Shipping<J>) -> anyhow::Result<()> {
    let Shipping { journal, group, window, link, states, runtime, shipped_lsn, backing } = s;
    let client_id = journal.client_id();
    let last_seq = loop {
        match states.last_seq(&group, client_id).await {
            Ok(last_seq) => break last_seq,
            Err(e) if e.downcast_ref::<crate::client::Refused>().is_some() => return Err(e.context("ask the site where this tap's journal stands")),
            Err(e) => {
                tracing::warn!("the site does not answer yet: {e:#}; writes stay in the journal");
                runtime.sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let next_seq = journal.next_seq();
    if last_seq >= next_seq {
        bail!(
            "the site has applied batch {last_seq} from this journal's producer {client_id:016x}, but the journal in {} ends before batch {next_seq}: it is not the journal this tap wrote",
            journal.place()
        );
    }
    if let Some((first, _)) = journal.held() {
        if first > last_seq + 1 {
            bail!("the journal in {} starts at batch {first} but the site has only up to batch {last_seq}: batches in between are lost", journal.place());
        }
    }
    journal.trim(last_seq);
    tracing::info!(client_id = format!("{client_id:016x}"), site_has = last_seq, unshipped = journal.held().map_or(0, |(a, b)| b + 1 - a), "shipping the journal");
    let mut producer = Producer::over(link, runtime.clone(), window, client_id, last_seq + 1);
    let (acks, mut acks_rx) = mpsc::channel::<(u64, oneshot::Receiver<anyhow::Result<(u64, u64)>>)>(window.max(1));
    // The waiter notes each batch the site commits, in order; the trimmer
    // syncs the backing file past what is noted, then trims the journal to
    // it (one fdatasync covers every batch committed meanwhile). A batch
    // leaves the journal only once both the site and the backing file hold
    // it, so after a power loss the journal can redo what the backing file
    // lost ([`redo_journal`]).
    let (failed, mut failed_rx) = mpsc::channel::<anyhow::Error>(2);
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
                Ok(Err(e)) => e.context(format!("the site did not take journal batch {seq}")),
                Err(_) => anyhow::anyhow!("the producer stopped"),
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
                        let _ = failed.send(anyhow::anyhow!("fdatasync of the backing file failed: {e}; the journal keeps every batch it could not trim")).await;
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
                    bail!("journal batch {} where {} was due", batch.seq, producer.next_seq());
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
            e = failed_rx.recv() => return Err(e.unwrap_or_else(|| anyhow::anyhow!("the shipper's tasks stopped"))),
        }
    }
    Err(failed_rx.recv().await.unwrap_or_else(|| anyhow::anyhow!("the shipper's tasks stopped")))
}

/// Applies the journal's batches to the backing file in order, then syncs
/// it; run at start, before the tap serves and before the shipper trims
/// anything. After a power loss on the tap's host the backing file may
/// have lost writes the journal holds (the journal keeps a batch until the
/// backing file is synced past it), or kept writes the journal never took
/// (never answered); both come back to what the journal says, so the
/// guest's disk and the log agree again. Returns the batches applied.
pub async fn redo_journal<J: ShipJournal>(journal: &J, backing: &dyn tap::Backing) -> anyhow::Result<u64> {
    let Some((first, last)) = journal.held() else { return Ok(0) };
    for seq in first..=last {
        let batch = journal.next_after(seq - 1).await?;
        if batch.seq != seq {
            bail!("journal batch {} where {seq} was due", batch.seq);
        }
        for e in batch.events {
            let done = match e.event {
                Event::Write { offset, data, .. } => backing.write_at(offset, data).await,
                Event::WriteZeroes { offset, len, .. } => backing.zero(offset, len, false).await,
                Event::Trim { offset, len, .. } => backing.zero(offset, len, true).await,
                _ => Ok(()),
            };
            done.with_context(|| format!("redo journal batch {seq} onto the backing file"))?;
        }
    }
    backing.sync().await.context("fdatasync of the backing file after the redo")?;
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

/// Publishes the journal's state as metrics four times a second, and
/// reports it to the site each second; a report the site does not take in
/// time never holds up the metrics.
async fn report(client: Client, journal: Journal, group: String, disk: String, uri: String, shipped_lsn: Arc<AtomicU64>) {
    let client = client.with_deadline(Duration::from_secs(2));
    let mut sending: Option<tokio::task::JoinHandle<()>> = None;
    let mut reported_at: Option<std::time::Instant> = None;
    loop {
        let s = journal.stats();
        let rpo_ms = s.oldest_time_ns.map_or(0, |t| crate::now_ns().saturating_sub(t) / 1_000_000);
        metrics::gauge!("rewind_tap_rpo_seconds").set(rpo_ms as f64 / 1000.0);
        metrics::gauge!("rewind_tap_journal_bytes").set(s.bytes as f64);
        metrics::gauge!("rewind_tap_journal_bytes_max").set(s.bytes_max as f64);
        metrics::gauge!("rewind_tap_journal_unshipped_batches").set(s.batches as f64);
        metrics::gauge!("rewind_tap_journal_stalls").set(s.stalls as f64);
        metrics::gauge!("rewind_tap_journal_stalled_seconds").set(s.stalled.as_secs_f64());
        let due = reported_at.is_none_or(|t| t.elapsed() >= REPORT_EVERY);
        if due && sending.as_ref().is_none_or(|h| h.is_finished()) {
            reported_at = Some(std::time::Instant::now());
            let report = TapReport {
                group: group.clone(),
                disk: disk.clone(),
                pid: std::process::id(),
                uri: uri.clone(),
                rpo_ms,
                journal_bytes: s.bytes,
                journal_bytes_max: s.bytes_max,
                unshipped_batches: s.batches,
                stalls: s.stalls,
                shipped_lsn: shipped_lsn.load(Ordering::Relaxed),
            };
            let client = client.clone();
            sending = Some(tokio::spawn(async move {
                if let Err(e) = client.call_leader(&Request::TapReport(report)).await {
                    tracing::debug!("tap report not delivered: {e:#}");
                }
            }));
        }
        tokio::time::sleep(METRICS_EVERY).await;
    }
}

const DISK_FILE: &str = "disk";

/// The size of the disk an async tap's journal serves, if it was recorded.
fn remembered_disk(journal: &Path, group: &str, disk: &str) -> anyhow::Result<Option<u64>> {
    let path = journal.join(DISK_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        [g, d, size] if *g == group && *d == disk => Ok(Some(size.parse().with_context(|| format!("{}: bad size {size:?}", path.display()))?)),
        [g, d, _] => bail!("the journal in {} belongs to disk {d} of group {g}, not {disk} of {group}; give another --journal", journal.display()),
        _ => bail!("{} should hold `<group> <disk> <size>`, not {text:?}", path.display()),
    }
}

fn remember_disk(journal: &Path, group: &str, disk: &str, size_bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(journal).with_context(|| format!("create {}", journal.display()))?;
    let tmp = journal.join("disk.tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    writeln!(f, "{group} {disk} {size_bytes}")?;
    f.sync_all().with_context(|| format!("fsync {}", tmp.display()))?;
    std::fs::rename(&tmp, journal.join(DISK_FILE))?;
    std::fs::File::open(journal)?.sync_all().with_context(|| format!("fsync {}", journal.display()))?;
    Ok(())
}

/// A sync tap's producer identity for this start: the client id kept in
/// `path` (a fresh one, from `fresh`, when there is no file) and the epoch
/// after the one kept there. The new epoch is written and fsync'd before it
/// is used, so no two starts share one. Its first batch fences every batch
/// of the earlier epochs that a dead process left on its way to the site
/// (`rewind_wire::event::EventBatch`). Call it holding the backing file's
/// lock. The file is one line: `<16 hex digits> <epoch>`.
pub fn next_identity(path: &Path, fresh: impl FnOnce() -> u64) -> anyhow::Result<(u64, u32)> {
    let (client_id, epoch) = match std::fs::read_to_string(path) {
        Ok(text) => {
            let mut words = text.split_whitespace();
            let id = words.next().and_then(|w| (w.len() == 16).then(|| u64::from_str_radix(w, 16).ok()).flatten());
            let epoch = words.next().and_then(|w| w.parse::<u32>().ok());
            match (id, epoch, words.next()) {
                (Some(id), Some(epoch), None) => (id, epoch),
                _ => bail!(
                    "tap identity file {} holds {:?}, not `<16 hex digits> <epoch>`; move it away to start the tap under a new identity",
                    path.display(),
                    text.chars().take(80).collect::<String>()
                ),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (fresh(), 0),
        Err(e) => return Err(e).with_context(|| format!("read tap identity file {}", path.display())),
    };
    let epoch = epoch.checked_add(1).with_context(|| format!("tap identity file {}: every epoch is used; move it away to start under a new identity", path.display()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{client_id:016x} {epoch}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("write tap identity file {} (epoch {epoch})", path.display()))?;
    Ok((client_id, epoch))
}

/// Opens (or creates, sparse) the backing file; it must hold the whole disk.
fn open_backing(path: &Path, size_bytes: u64) -> anyhow::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open backing file {}", path.display()))?;
    // One tap per backing file: a second would write behind the first's
    // journal. The lock goes with the process, also on SIGKILL.
    use std::os::fd::AsRawFd;
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!("backing file {} is in use by another tap (or another program holding a lock on it)", path.display());
        }
        return Err(e).with_context(|| format!("lock backing file {}", path.display()));
    }
    let len = file.metadata()?.len();
    if len == 0 {
        file.set_len(size_bytes).with_context(|| format!("size backing file {}", path.display()))?;
    } else if len < size_bytes {
        bail!("backing file {} holds {len} bytes, less than the disk's {size_bytes}", path.display());
    }
    Ok(file)
}

/// Runs a tap until SIGINT or SIGTERM. `ready` is called with the address
/// once it listens.
pub async fn run(client: Client, opts: TapOptions, ready: impl FnOnce(&str)) -> anyhow::Result<()> {
    // An async tap remembers its disk's size in its journal folder, so it
    // can serve the guest while the site is down.
    let remembered = match &opts.mode {
        TapMode::Async { journal, .. } => remembered_disk(journal, &opts.group, &opts.disk)?,
        TapMode::Sync { .. } => None,
    };
    let size_bytes = match remembered {
        Some(size) => size,
        None => {
            let group = match client.call_leader(&Request::GroupState { group: opts.group.clone() }).await? {
                Response::Group(g) => g,
                other => bail!("unexpected reply {other:?}"),
            };
            let disk = group.disks.iter().find(|d| d.name == opts.disk).with_context(|| {
                format!(
                    "group {} has no disk {:?} (it has: {})",
                    opts.group,
                    opts.disk,
                    group.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
                )
            })?;
            if let TapMode::Async { journal, .. } = &opts.mode {
                remember_disk(journal, &opts.group, &opts.disk, disk.size_bytes)?;
            }
            disk.size_bytes
        }
    };
    let disk = rewind_wire::rpc::DiskSpec { name: opts.disk.clone(), size_bytes, sector_bytes: 512 };
    let backing: Arc<dyn tap::Backing> = Arc::new(tap::FileBacking(Arc::new(open_backing(&opts.backing, disk.size_bytes)?)));
    if let Some(addr) = opts.metrics_listen {
        if !addr.ip().is_loopback() {
            bail!("--metrics-listen {addr} is not a loopback address (127.0.0.0/8 or ::1)");
        }
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("start the metrics endpoint on {addr}"))?;
    }
    let uri = match &opts.listen {
        Listen::Tcp(addr) => format!("nbd://{addr}/{}", opts.disk),
        Listen::Unix(path) => format!("nbd+unix:///{}?socket={}", opts.disk, path.display()),
    };
    let (sink, mode, shipper, journal): (Arc<dyn LogSink>, _, _, _) = match &opts.mode {
        TapMode::Sync { identity } => {
            let (client_id, epoch) = next_identity(identity, crate::client::fresh_client_id)?;
            tracing::info!(client_id = format!("{client_id:016x}"), epoch, "sync tap producer");
            (Arc::new(ProducerSink::in_epoch(client, &opts.group, opts.window, client_id, epoch)), tap::Mode::Sync, None, None)
        }
        TapMode::Async { journal, journal_bytes_max } => {
            let j = Journal::open(journal, &opts.group, *journal_bytes_max, crate::client::fresh_client_id)
                .with_context(|| format!("open the tap's journal in {}", journal.display()))?;
            let held = j.stats();
            if held.batches > 0 {
                tracing::info!(batches = held.batches, bytes = held.bytes, "the journal holds batches from before: redoing them onto the backing file, then they ship first");
                let redone = redo_journal(&j, backing.as_ref()).await.with_context(|| format!("bring {} up to the journal", opts.backing.display()))?;
                tracing::info!(batches = redone, "backing file redone from the journal");
            }
            let shipped = Arc::new(AtomicU64::new(0));
            let shipper = tokio::spawn(ship(client.clone(), opts.group.clone(), j.clone(), opts.window, shipped.clone(), backing.clone()));
            tokio::spawn(report(client, j.clone(), opts.group.clone(), opts.disk.clone(), uri.clone(), shipped));
            (Arc::new(JournalSink(j.clone())), tap::Mode::Async, Some(shipper), Some(j))
        }
    };
    let config = TapConfig { export: opts.disk.clone(), size_bytes: disk.size_bytes, mode, batch_bytes_max: 1 << 20 };
    let tap = Tap::new(config, backing, sink, Arc::new(tap::SystemClock), Arc::new(tap::TokioSpawner));
    let served = serve(tap, opts.listen, &opts.disk, ready, shipper);
    let r = served.await;
    if let Some(j) = journal {
        let s = j.stats();
        if s.batches > 0 {
            eprintln!(
                "tap: {} batches ({:.1} MiB) are not shipped yet; they stay in {} and ship when the tap starts again",
                s.batches,
                s.bytes as f64 / (1u64 << 20) as f64,
                j.dir().display()
            );
        }
    }
    r
}

/// Accepts NBD clients until SIGINT or SIGTERM, or until the shipper fails.
async fn serve(
    tap: Arc<Tap>,
    listen: Listen,
    disk: &str,
    ready: impl FnOnce(&str),
    shipper: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<()> {
    let shipper_failed = async move {
        match shipper {
            Some(h) => match h.await {
                Ok(Ok(())) => anyhow::anyhow!("the shipper stopped"),
                Ok(Err(e)) => e.context("the journal's shipper failed; the journal keeps every unshipped write"),
                Err(e) => anyhow::anyhow!("the shipper task failed: {e}"),
            },
            None => std::future::pending().await,
        }
    };
    tokio::pin!(shipper_failed);
    let opts_disk = disk.to_string();
    let export: Arc<dyn rewind_cdp_ingest::server::Export> = tap;
    match listen {
        Listen::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                bail!("--listen {addr} is not a loopback address (127.0.0.0/8 or ::1)");
            }
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?;
            let local = listener.local_addr()?;
            ready(&format!("nbd://{local}/{opts_disk}"));
            tokio::select! {
                e = crate::export::accept_tcp(&listener, export) => Err(anyhow::Error::new(e).context("accept an NBD client")),
                r = crate::export::stop_signal() => Ok(r?),
                e = &mut shipper_failed => Err(e),
            }
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("listen on {}", path.display()))?;
            ready(&format!("nbd+unix:///{opts_disk}?socket={}", path.display()));
            let r = tokio::select! {
                e = crate::export::accept_unix(&listener, export) => Err(anyhow::Error::new(e).context("accept an NBD client")),
                r = crate::export::stop_signal() => Ok(r?),
                e = &mut shipper_failed => Err(e),
            };
            let _ = std::fs::remove_file(&path);
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{next_identity, redo_journal};
    use rewind_cdp_ingest::journal::{Journal, JOURNAL_BYTES_MIN};
    use rewind_cdp_ingest::tap::FileBacking;
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

    #[test]
    fn each_start_takes_the_next_epoch_under_one_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d0.raw.tap-id");
        assert_eq!(next_identity(&path, || 0xabc).unwrap(), (0xabc, 1));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0000000000000abc 1\n");
        // The id is kept; a fresh one is never asked for again.
        assert_eq!(next_identity(&path, || unreachable!()).unwrap(), (0xabc, 2));
        assert_eq!(next_identity(&path, || unreachable!()).unwrap(), (0xabc, 3));
        assert!(!dir.path().join("d0.raw.tap-id.tmp").exists());
    }

    #[test]
    fn a_damaged_identity_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        for bad in ["", "xyz 1\n", "0000000000000abc\n", "0000000000000abc one\n", "abc 1\n", "0000000000000abc 1 extra\n"] {
            std::fs::write(&path, bad).unwrap();
            let err = next_identity(&path, || 1).unwrap_err().to_string();
            assert!(err.contains("not `<16 hex digits> <epoch>`") && err.contains("move it away"), "{bad:?}: {err}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), bad);
        }
        std::fs::write(&path, format!("0000000000000abc {}\n", u32::MAX)).unwrap();
        assert!(next_identity(&path, || 1).unwrap_err().to_string().contains("every epoch is used"));
    }
}
