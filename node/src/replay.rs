//! `rewind replay`: a disk as of a point in its group's log, written to a
//! raw image file. The target (LSN, time, bookmark or latest) is resolved
//! on the leader when there is one (a lagging follower would resolve a time
//! or "latest" to an older LSN), and on the serving node otherwise. The
//! serving node must have applied the LSN; a follower that has not yet is
//! waited for, with a bound. The disk is then read through that node's
//! block index in 4 MiB pieces, a few in flight, so the cost grows with the
//! disk's size, not with the length of its history. Every block is checked
//! against its blake3 on the node before it is sent.

use crate::addr::Resolve;
use crate::addr::HostPort;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rewind_replay::{ReplayExport, SourceError};
use rewind_wire::limits::READ_DISK_BYTES_MAX;
use rewind_wire::rpc::{ErrorKind, GroupState, Request, Response, Target};

use crate::client::Client;
use crate::config::NodeAddr;

pub struct ReplayOptions {
    pub group: String,
    pub disk: String,
    pub target: Target,
    /// The image file to write (unused by `serve`).
    pub out: PathBuf,
    /// What to do when `out` exists.
    pub existing: rewind_replay::Existing,
    /// Which node serves the replay; any that answers if none.
    pub node: Option<u64>,
    /// How long to wait for the serving node to apply the target LSN.
    pub wait: Duration,
}

#[derive(Debug)]
pub struct ReplayReport {
    pub node: u64,
    pub lsn: u64,
    pub time_ns: u64,
    pub image_bytes: u64,
    /// Bytes written to the image (the rest is holes: zeroes).
    pub data_bytes: u64,
    pub blake3_hex: String,
    pub elapsed: Duration,
    /// Where the LSN was resolved: "leader (node N)" or "node N".
    pub resolved_on: String,
}

/// Where a writable export's overlay goes unless `--overlay` names a file.
const OVERLAY_DIR: &str = "/var/tmp";

/// Pieces read at once from the serving node.
const READS_IN_FLIGHT: usize = 4;

async fn group_on(client: &Client, addr: &HostPort, group: &str) -> anyhow::Result<GroupState> {
    match client.call_node(addr, &Request::GroupState { group: group.into() }).await? {
        Response::Group(g) => Ok(g),
        Response::Error(e) => bail!("{}", e.message),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// Picks the serving node: the one asked for, or the first that knows the group.
async fn serving_node(client: &Client, group: &str, node: Option<u64>) -> anyhow::Result<(NodeAddr, GroupState)> {
    let candidates: Vec<NodeAddr> = match node {
        Some(id) => vec![client.nodes().iter().find(|n| n.id == id).with_context(|| format!("the client config lists no node {id}"))?.clone()],
        None => client.nodes().to_vec(),
    };
    let mut last_error = None;
    for n in &candidates {
        match group_on(client, &n.addr, group).await {
            Ok(g) => return Ok((n.clone(), g)),
            Err(e) => last_error = Some(e.context(format!("node {} at {}", n.id, n.addr))),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no node to replay from")))
}

/// A refusal from a node, as an error a script can read.
fn node_error(node: u64, e: &rewind_wire::rpc::RpcError) -> anyhow::Error {
    anyhow::anyhow!("node {node}: {}", e.message)
}

/// Resolves the target: on the leader if one answers within a few seconds,
/// else on `node`.
pub async fn resolve(client: &Client, group: &str, target: &Target, node: &NodeAddr) -> anyhow::Result<(u64, u64, String)> {
    let request = Request::Resolve { group: group.into(), target: target.clone(), on_leader: true };
    let quick = client.clone().with_deadline(Duration::from_secs(3));
    match quick.call_leader(&request).await {
        Ok(Response::Resolved { lsn, time_ns }) => return Ok((lsn, time_ns, "the leader".into())),
        Ok(Response::Error(e)) => bail!("{}", e.message),
        Ok(other) => bail!("unexpected reply {other:?}"),
        Err(e @ crate::client::CallError::Refused { .. }) => return Err(e.into()),
        Err(e @ crate::client::CallError::NoAnswer { .. }) => tracing::warn!("no leader answered ({e}); resolving the target on node {}", node.id),
    }
    let request = Request::Resolve { group: group.into(), target: target.clone(), on_leader: false };
    match client.call_node(&node.addr, &request).await? {
        Response::Resolved { lsn, time_ns } => Ok((lsn, time_ns, format!("node {} (no leader answered; it may lag)", node.id))),
        Response::Error(e) => Err(node_error(node.id, &e)),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// Waits until `node` has applied `lsn` of `group`, reporting how far
/// behind it is.
async fn wait_applied(client: &Client, node: &NodeAddr, group: &str, lsn: u64, wait: Duration, mut note: impl FnMut(&str)) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut said = false;
    loop {
        let g = group_on(client, &node.addr, group).await.with_context(|| format!("node {}", node.id))?;
        if g.last_lsn >= lsn {
            return Ok(());
        }
        if started.elapsed() >= wait {
            bail!("node {} has applied group {group} to LSN {}, {} behind the target {lsn}; gave up after {wait:?} (raise --wait, or pick another --node)", node.id, g.last_lsn, lsn - g.last_lsn);
        }
        if !said {
            note(&format!("node {} has applied LSN {} of {group}; waiting up to {wait:?} for LSN {lsn}", node.id, g.last_lsn));
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One disk as of one LSN on one node, read over RPC.
pub struct NodeSource {
    client: Client,
    node: NodeAddr,
    group: String,
    disk: String,
    lsn: u64,
    size: u64,
}

impl rewind_replay::BlockSource for NodeSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn piece_bytes(&self) -> u64 {
        READ_DISK_BYTES_MAX
    }

    fn read(&self, offset: u64, len: u64) -> rewind_replay::BoxFuture<'_, Result<rewind_replay::Piece, SourceError>> {
        Box::pin(async move {
            let request = Request::ReadDisk { group: self.group.clone(), disk: self.disk.clone(), lsn: self.lsn, offset, len };
            let id = self.node.id;
            match self.client.call_node(&self.node.addr, &request).await {
                Ok(Response::DiskPiece { len, runs }) => Ok(rewind_replay::Piece { len, runs }),
                Ok(Response::Error(e)) if e.kind == ErrorKind::Internal => {
                    Err(SourceError::Damaged(format!("{} (other nodes may still hold good copies: try --node)", e.message)))
                }
                Ok(Response::Error(e)) => Err(SourceError::Refused(format!("node {id}: {}", e.message))),
                Ok(other) => Err(SourceError::BadPiece(format!("node {id}: unexpected reply {other:?}"))),
                Err(e) => Err(SourceError::Unreachable(format!("node {id}: {e:#}"))),
            }
        })
    }
}

/// The disk as of the target on the serving node, once that node has
/// applied it; with the target's event time and where it was resolved.
async fn open_source(client: &Client, opts: &ReplayOptions, note: impl FnMut(&str)) -> anyhow::Result<(NodeSource, u64, String)> {
    let (node, group) = serving_node(client, &opts.group, opts.node).await?;
    let disk = group.disks.iter().find(|d| d.name == opts.disk).with_context(|| rewind_service::no_disk(&opts.group, &opts.disk, &group.disks))?;
    let (lsn, time_ns, resolved_on) = resolve(client, &opts.group, &opts.target, &node).await?;
    wait_applied(client, &node, &opts.group, lsn, opts.wait, note).await?;
    let source = NodeSource { client: client.clone(), node, group: opts.group.clone(), disk: opts.disk.clone(), lsn, size: disk.size_bytes };
    Ok((source, time_ns, resolved_on))
}

/// Replays a disk to a file. `progress(bytes_done, bytes_total)` is called
/// as pieces arrive; `note` gets one-line messages for the operator.
pub async fn run(client: &Client, opts: &ReplayOptions, progress: impl FnMut(u64, u64), mut note: impl FnMut(&str)) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let (source, time_ns, resolved_on) = open_source(client, opts, &mut note).await?;
    let image = rewind_replay::write_image(&source, &opts.out, opts.existing, READS_IN_FLIGHT, progress).await?;
    Ok(ReplayReport {
        node: source.node.id,
        lsn: source.lsn,
        time_ns,
        image_bytes: image.image_bytes,
        data_bytes: image.data_bytes,
        blake3_hex: image.blake3_hex,
        elapsed: started.elapsed(),
        resolved_on,
    })
}

/// How `rewind replay --serve` hands the disk over.
pub struct ServeOptions {
    pub listen: HostPort,
    /// Plaintext or NBD-TLS (the client config's certificate).
    pub tls: crate::tls::NbdTlsPolicy,
    /// Accept writes into a copy-on-write overlay.
    pub writable: bool,
    /// The overlay file (default: a new file under /var/tmp).
    pub overlay: Option<PathBuf>,
    /// Keep the overlay (and its map) when the export stops.
    pub keep_overlay: bool,
    /// NBD connections served at once.
    pub connections_max: usize,
}

/// What `serve` tells its caller once the export listens.
pub struct Serving {
    pub uri: String,
    pub node: u64,
    pub lsn: u64,
    pub time_ns: u64,
    pub resolved_on: String,
    /// From the start of the command to the export listening.
    pub ready_after: Duration,
    pub overlay: Option<PathBuf>,
}

/// Serves the disk as of the target over NBD until SIGINT or SIGTERM. The
/// listener is bound first; the overlay (when writable) is a new file, never
/// an existing one, and it is removed on every way out unless kept.
pub async fn serve(client: &Client, opts: &ReplayOptions, serve: &ServeOptions, ready: impl FnOnce(&Serving), mut note: impl FnMut(&str)) -> anyhow::Result<()> {
    let started = Instant::now();
    let tls = crate::tls::nbd_tls(&serve.listen, serve.tls, &client.tls)?;
    let bind = serve.listen.bind_addr()?;
    let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("listen on {} ({bind})", serve.listen))?;
    let scheme = if matches!(tls, rewind_nbd::server::Tls::Required(_)) { "nbds" } else { "nbd" };
    let (source, time_ns, resolved_on) = open_source(client, opts, &mut note).await?;
    let (lsn, node, size) = (source.lsn, source.node.id, source.size);
    let overlay = if serve.writable {
        let made = match &serve.overlay {
            Some(path) => rewind_replay::Overlay::create(path, size).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                    "--overlay {} (or its map {}) exists; an overlay is always a new file: give another path",
                    path.display(),
                    rewind_replay::Overlay::map_path(path).display()
                ),
                _ => anyhow::Error::new(e).context(format!("create the overlay {}", path.display())),
            })?,
            None => {
                let stem = format!("rewind-overlay-{}-{}-{lsn}", opts.group, opts.disk);
                rewind_replay::Overlay::create_in(Path::new(OVERLAY_DIR), &stem, size).with_context(|| format!("create an overlay in {OVERLAY_DIR}"))?
            }
        };
        Some(made)
    } else {
        None
    };
    let overlay_path = overlay.as_ref().map(|o| o.path().to_path_buf());
    let description = format!(
        "rewind replay of disk {} in group {} at LSN {lsn}{}",
        opts.disk,
        opts.group,
        if serve.writable { ", writable: writes go to a local overlay, never to the log" } else { ", read-only" }
    );
    let export = std::sync::Arc::new(ReplayExport::new(&opts.disk, description, source, overlay));
    let stop = rewind_nbd::listen::StopSignal::new().context("catch SIGTERM and SIGINT");
    let served = async {
        let stop = stop?;
        let uri = format!("{scheme}://{}/{}", listener.local_addr()?, opts.disk);
        ready(&Serving { uri, node, lsn, time_ns, resolved_on, ready_after: started.elapsed(), overlay: overlay_path });
        tokio::select! {
            never = rewind_nbd::listen::accept_tcp(&listener, export.clone(), serve.connections_max, tls.clone()) => match never {},
            () = stop.wait() => Ok(()),
        }
    }
    .await;
    drop(listener);
    // Connections still open hold the export; the overlay is synced or
    // removed through whichever handle is last.
    if let Some(o) = export.overlay() {
        if serve.keep_overlay {
            o.sync().with_context(|| format!("sync the overlay {}", o.path().display()))?;
            note(&format!("kept the overlay {} ({} blocks written; map in {})", o.path().display(), o.written_blocks().await, rewind_replay::Overlay::map_path(o.path()).display()));
        } else {
            std::fs::remove_file(o.path()).ok();
            std::fs::remove_file(rewind_replay::Overlay::map_path(o.path())).ok();
            note(&format!("discarded the overlay ({} blocks written)", o.written_blocks().await));
        }
    }
    served
}
