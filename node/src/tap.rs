//! `rewind tap`: the cdp-ingest tap, wired to the site through a producer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rewind_cdp_ingest::tap::{self, BoxFuture, LogSink, SinkError, Tap, TapConfig};
use rewind_wire::event::TimedEvent;
use rewind_wire::rpc::{Request, Response};

use crate::client::{Client, Producer};

/// The tap's log sink: one ordered producer into one group.
pub struct ProducerSink {
    group: String,
    producer: tokio::sync::Mutex<Producer>,
}

impl ProducerSink {
    pub fn new(client: Client, group: &str, window: usize) -> ProducerSink {
        ProducerSink { group: group.to_string(), producer: tokio::sync::Mutex::new(Producer::new(client, window)) }
    }
}

impl LogSink for ProducerSink {
    fn submit(&self, events: Vec<TimedEvent>) -> BoxFuture<'_, Result<BoxFuture<'static, Result<(u64, u64), SinkError>>, SinkError>> {
        Box::pin(async move {
            let rx = self
                .producer
                .lock()
                .await
                .submit(&self.group, events)
                .await
                .map_err(|e| SinkError(format!("{e:#}")))?;
            let committed: BoxFuture<'static, Result<(u64, u64), SinkError>> = Box::pin(async move {
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

pub struct TapOptions {
    pub group: String,
    pub disk: String,
    pub backing: PathBuf,
    pub listen: Listen,
    pub window: usize,
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
    let group = match client.call_leader(&Request::GroupState { group: opts.group.clone() }).await? {
        Response::Group(g) => g,
        other => bail!("unexpected reply {other:?}"),
    };
    let disk = group
        .disks
        .iter()
        .find(|d| d.name == opts.disk)
        .with_context(|| format!("group {} has no disk {:?} (it has: {})", opts.group, opts.disk, group.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")))?;
    let backing = open_backing(&opts.backing, disk.size_bytes)?;
    let sink = Arc::new(ProducerSink::new(client, &opts.group, opts.window));
    let config = TapConfig { export: opts.disk.clone(), size_bytes: disk.size_bytes, mode: tap::Mode::Sync, batch_bytes_max: 1 << 20 };
    let tap = Tap::new(config, backing, sink, Arc::new(tap::SystemClock));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    match opts.listen {
        Listen::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                bail!("--listen {addr} is not a loopback address (127.0.0.0/8 or ::1)");
            }
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?;
            let local = listener.local_addr()?;
            ready(&format!("nbd://{local}/{}", opts.disk));
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let (stream, peer) = accepted?;
                        stream.set_nodelay(true)?;
                        let tap = tap.clone();
                        tokio::spawn(async move {
                            if let Err(e) = rewind_cdp_ingest::tap::serve(tap, stream, peer.to_string()).await {
                                tracing::warn!(%peer, "NBD connection ended: {e}");
                            }
                        });
                    }
                    _ = term.recv() => return Ok(()),
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("listen on {}", path.display()))?;
            ready(&format!("nbd+unix:///{}?socket={}", opts.disk, path.display()));
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let (stream, _) = accepted?;
                        let tap = tap.clone();
                        tokio::spawn(async move {
                            if let Err(e) = rewind_cdp_ingest::tap::serve(tap, stream, "unix".into()).await {
                                tracing::warn!("NBD connection ended: {e}");
                            }
                        });
                    }
                    _ = term.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
            let _ = std::fs::remove_file(&path);
            Ok(())
        }
    }
}
