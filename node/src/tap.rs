//! `rewind tap`: the cdp-ingest tap, wired to the site through a producer.

use crate::addr::Resolve;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use rewind_cdp_ingest::identity::next_identity;
use rewind_cdp_ingest::journal::{Journal, JournalSink};
use rewind_cdp_ingest::producer::TokioRuntime;
use rewind_cdp_ingest::shipper::{redo_journal, ship_journal, ProducerSink, ShipError, Shipping};
use rewind_cdp_ingest::tap::{self, LogSink, Tap, TapConfig};
use rewind_wire::rpc::{Request, Response, TapReport};

use crate::addr::HostPort;
use crate::client::Client;
use crate::tls::NbdTlsPolicy;

pub enum Listen {
    /// TCP, in plaintext or NBD-TLS as the policy says.
    Tcp(HostPort, NbdTlsPolicy),
    /// A Unix socket: plaintext, guarded by the file's mode.
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
    pub metrics_listen: Option<HostPort>,
    /// NBD connections served at once.
    pub connections_max: usize,
}

/// How long the shipper keeps trying through an outage of the site: as long
/// as the tap runs. The journal holds the writes; back-pressure bounds it.
const SHIP_DEADLINE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// How often an async tap updates its metrics, and reports to the site.
const METRICS_EVERY: Duration = Duration::from_millis(250);
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Ships the journal to the site in order, with the journal's producer
/// identity, and trims it as batches are committed. Returns only on an
/// error that retrying cannot mend.
async fn ship(client: Client, group: String, journal: Journal, window: usize, shipped_lsn: Arc<AtomicU64>, backing: Arc<dyn tap::Backing>) -> Result<(), ShipError> {
    let client = Arc::new(client.with_deadline(SHIP_DEADLINE));
    let runtime = Arc::new(TokioRuntime::default());
    ship_journal(Shipping { journal, group, window, link: client.clone(), states: client, runtime, shipped_lsn, backing }).await
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
            sending = Some(crate::spawn(async move {
                if let Err(e) = client.call_leader(&Request::TapReport(report)).await {
                    tracing::debug!("tap report not delivered: {e:#}");
                }
            }));
        }
        tokio::time::sleep(METRICS_EVERY).await;
    }
}

const DISK_FILE: &str = "disk";

/// The geometry (size, sector size) of the disk an async tap's journal
/// serves, if it was recorded. A file from before the sector size was kept
/// holds three words; its disks have 512-byte sectors.
fn remembered_disk(journal: &Path, group: &str, disk: &str) -> anyhow::Result<Option<(u64, u32)>> {
    let path = journal.join(DISK_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    let number = |w: &str| w.parse::<u64>().with_context(|| format!("{}: bad number {w:?}", path.display()));
    match words.as_slice() {
        [g, d, size] if *g == group && *d == disk => Ok(Some((number(size)?, 512))),
        [g, d, size, sector] if *g == group && *d == disk => {
            let sector = u32::try_from(number(sector)?).with_context(|| format!("{}: bad sector size {sector:?}", path.display()))?;
            Ok(Some((number(size)?, sector)))
        }
        [g, d, ..] if words.len() <= 4 => bail!("the journal in {} belongs to disk {d} of group {g}, not {disk} of {group}; give another --journal", journal.display()),
        _ => bail!("{} should hold `<group> <disk> <size> <sector size>`, not {text:?}", path.display()),
    }
}

fn remember_disk(journal: &Path, group: &str, disk: &str, size_bytes: u64, sector_bytes: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(journal).with_context(|| format!("create {}", journal.display()))?;
    let tmp = journal.join("disk.tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    writeln!(f, "{group} {disk} {size_bytes} {sector_bytes}")?;
    f.sync_all().with_context(|| format!("fsync {}", tmp.display()))?;
    std::fs::rename(&tmp, journal.join(DISK_FILE))?;
    std::fs::File::open(journal)?.sync_all().with_context(|| format!("fsync {}", journal.display()))?;
    Ok(())
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

/// A listener bound before the tap touches any file.
enum Bound {
    Tcp(tokio::net::TcpListener, rewind_nbd::server::Tls),
    /// The socket, its path, and its inode (the path is removed at exit
    /// only while it is still this socket).
    Unix(tokio::net::UnixListener, PathBuf, u64),
}

/// Checks the listen arguments and binds: a TCP address off loopback
/// needs NBD-TLS (or the operator's --insecure-plaintext); a Unix socket
/// path may replace only a stale socket, never a file of another kind (a
/// backing file, a user's file).
async fn bind(listen: &Listen, tls_files: &crate::config::TlsFiles) -> anyhow::Result<Bound> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match listen {
        Listen::Tcp(addr, policy) => {
            let tls = crate::tls::nbd_tls(addr, *policy, tls_files)?;
            let bind = addr.bind_addr()?;
            let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("listen on {addr} ({bind})"))?;
            Ok(Bound::Tcp(listener, tls))
        }
        Listen::Unix(path) => {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_socket() => {
                    std::fs::remove_file(path).with_context(|| format!("remove the stale socket {}", path.display()))?;
                }
                Ok(_) => bail!("--socket {} exists and is not a socket; a tap never replaces a file (give another path)", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("look at --socket {}", path.display())),
            }
            let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))?;
            let ino = std::fs::symlink_metadata(path).with_context(|| format!("look at {}", path.display()))?.ino();
            Ok(Bound::Unix(listener, path.clone(), ino))
        }
    }
}

impl Bound {
    fn tls(&self) -> bool {
        matches!(self, Bound::Tcp(_, rewind_nbd::server::Tls::Required(_)))
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if let Bound::Unix(_, path, ino) = self {
            if std::fs::symlink_metadata(&*path).is_ok_and(|m| m.file_type().is_socket() && m.ino() == *ino) {
                let _ = std::fs::remove_file(&*path);
            }
        }
    }
}

/// How long a starting tap waits for its group to show on the node it
/// asks: a follower answers group state from what it has applied, and a
/// group created a moment ago may not be there yet.
const GROUP_WAIT: Duration = Duration::from_secs(10);

/// The group's state, waiting up to [`GROUP_WAIT`] for a group that is not
/// there yet.
async fn group_state(client: &Client, group: &str) -> anyhow::Result<rewind_wire::rpc::GroupState> {
    let started = std::time::Instant::now();
    loop {
        match client.call_leader(&Request::GroupState { group: group.to_string() }).await {
            Ok(Response::Group(g)) => return Ok(g),
            Ok(other) => bail!("unexpected reply {other:?}"),
            Err(e @ crate::client::CallError::Refused { .. }) if e.to_string().starts_with("no consistency group") && started.elapsed() < GROUP_WAIT => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs a tap until SIGINT or SIGTERM. `ready` is called with the address
/// once it listens. Arguments are checked and the listener bound before
/// any file is created or changed.
pub async fn run(client: Client, opts: TapOptions, ready: impl FnOnce(&str)) -> anyhow::Result<()> {
    let metrics_addr = opts.metrics_listen.as_ref().map(|m| m.bind_addr()).transpose().context("--metrics-listen")?;
    let bound = bind(&opts.listen, &client.tls).await?;
    // An async tap remembers its disk's size in its journal folder, so it
    // can serve the guest while the site is down.
    let remembered = match &opts.mode {
        TapMode::Async { journal, .. } => remembered_disk(journal, &opts.group, &opts.disk)?,
        TapMode::Sync { .. } => None,
    };
    let (size_bytes, sector_bytes) = match remembered {
        Some(geometry) => geometry,
        None => {
            let group = group_state(&client, &opts.group).await?;
            let disk = group.disks.iter().find(|d| d.name == opts.disk).with_context(|| rewind_service::no_disk(&opts.group, &opts.disk, &group.disks))?;
            if let TapMode::Async { journal, .. } = &opts.mode {
                remember_disk(journal, &opts.group, &opts.disk, disk.size_bytes, disk.sector_bytes)?;
            }
            (disk.size_bytes, disk.sector_bytes)
        }
    };
    let disk = rewind_wire::rpc::DiskSpec { name: opts.disk.clone(), size_bytes, sector_bytes };
    let backing: Arc<dyn tap::Backing> = Arc::new(tap::FileBacking(Arc::new(open_backing(&opts.backing, disk.size_bytes)?)));
    if let Some(addr) = metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("start the metrics endpoint on {addr}"))?;
    }
    let uri = match &opts.listen {
        Listen::Tcp(addr, _) => format!("{}://{addr}/{}", if bound.tls() { "nbds" } else { "nbd" }, opts.disk),
        Listen::Unix(path) => format!("nbd+unix:///{}?socket={}", opts.disk, path.display()),
    };
    let (sink, mode, shipper, journal): (Arc<dyn LogSink>, _, _, _) = match &opts.mode {
        TapMode::Sync { identity } => {
            let (client_id, epoch) = next_identity(identity, crate::client::fresh_client_id)?;
            tracing::info!(client_id = format!("{client_id:016x}"), epoch, "sync tap producer");
            let producer = crate::client::producer_resuming(client, opts.window, client_id, rewind_wire::event::seq_in_epoch(epoch, 1));
            (Arc::new(ProducerSink::over(producer, &opts.group)), tap::Mode::Sync, None, None)
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
            let shipper = crate::spawn(ship(client.clone(), opts.group.clone(), j.clone(), opts.window, shipped.clone(), backing.clone()));
            crate::spawn(report(client, j.clone(), opts.group.clone(), opts.disk.clone(), uri.clone(), shipped));
            (Arc::new(JournalSink(j.clone())), tap::Mode::Async, Some(shipper), Some(j))
        }
    };
    let config = TapConfig { export: opts.disk.clone(), size_bytes: disk.size_bytes, sector_bytes: disk.sector_bytes, mode, batch_bytes_max: 1 << 20 };
    let tap = Tap::new(config, backing, sink, Arc::new(tap::SystemClock), Arc::new(tap::TokioSpawner));
    let served = serve(tap, bound, &opts.disk, opts.connections_max, ready, shipper);
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
    bound: Bound,
    disk: &str,
    connections_max: usize,
    ready: impl FnOnce(&str),
    shipper: Option<tokio::task::JoinHandle<Result<(), ShipError>>>,
) -> anyhow::Result<()> {
    let shipper_failed = async move {
        match shipper {
            Some(h) => match h.await {
                Ok(Ok(())) => anyhow::anyhow!("the shipper stopped"),
                Ok(Err(e)) => anyhow::Error::new(e).context("the journal's shipper failed; the journal keeps every unshipped write"),
                Err(e) => anyhow::anyhow!("the shipper task failed: {e}"),
            },
            None => std::future::pending().await,
        }
    };
    tokio::pin!(shipper_failed);
    let opts_disk = disk.to_string();
    let export: Arc<dyn rewind_nbd::server::Export> = tap;
    let stop = rewind_nbd::listen::StopSignal::new().context("catch SIGTERM and SIGINT")?;
    match &bound {
        Bound::Tcp(listener, tls) => {
            let local = listener.local_addr()?;
            let scheme = if bound.tls() { "nbds" } else { "nbd" };
            ready(&format!("{scheme}://{local}/{opts_disk}"));
            tokio::select! {
                never = rewind_nbd::listen::accept_tcp(listener, export, connections_max, tls.clone()) => match never {},
                () = stop.wait() => Ok(()),
                e = &mut shipper_failed => Err(e),
            }
        }
        Bound::Unix(listener, path, _) => {
            ready(&format!("nbd+unix:///{opts_disk}?socket={}", path.display()));
            tokio::select! {
                never = rewind_nbd::listen::accept_unix(listener, export, connections_max) => match never {},
                () = stop.wait() => Ok(()),
                e = &mut shipper_failed => Err(e),
            }
        }
    }
}

