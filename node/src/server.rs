//! A running node: the QUIC endpoint, the shard's Raft, and the shell that
//! hands each request to `rewind-service` (client requests, appends) or
//! serves it here (Raft's own RPCs, snapshots, status, tap reports).

use crate::addr::Resolve;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rewind_raft_store::{codec, SnapshotFile, StoreReader, TypeConfig};
use rewind_service::{PendingAppend, Service, ServiceError, ServiceTypes};
use rewind_wire::event::EventBatch;
use rewind_wire::limits::{PRODUCER_WINDOW_MAX, SNAPSHOT_CHUNK_BYTES_MAX};
use rewind_wire::raft::{self as w, ShardId};
use rewind_wire::rpc::{Request, Response};

use rewind_service::access::Access;

use crate::config::NodeConfig;
use crate::raft_net::Network;
use crate::transport::{read_frame, write_frame};
use crate::{spawn, DATA_SHARD};

pub type Raft = openraft::Raft<TypeConfig, rewind_raft_store::StateMachine>;

/// The production types the request service runs over.
pub struct NodeTypes;

impl ServiceTypes for NodeTypes {
    type C = TypeConfig;
    type SM = rewind_raft_store::StateMachine;
    type Read = StoreReader;

    fn responder() -> (openraft::alias::WriteResponderOf<TypeConfig>, rewind_service::WriteReceiver<TypeConfig>) {
        openraft::impls::ProgressResponder::complete_only()
    }

    fn wall_ns() -> u64 {
        crate::now_ns()
    }
}

/// Largest snapshot a node accepts from a peer, 1 TiB.
const SNAPSHOT_BYTES_MAX: u64 = 1 << 40;

/// One Raft group on this node: its Raft, its store and their requests.
pub type Shard = Service<NodeTypes>;

pub struct Node {
    pub id: u64,
    pub addr: String,
    pub shards: BTreeMap<ShardId, Shard>,
    /// The latest report of each async tap, by (group, disk).
    pub taps: std::sync::Mutex<BTreeMap<(String, String), (w_rpc::TapReport, Instant)>>,
    /// One snapshot is received at a time; another sender is told to retry.
    pub snapshot_receiving: tokio::sync::Semaphore,
    /// What this node's DR links last saw of the peer sites.
    pub dr: crate::dr::DrViews,
    /// Where the DR links keep their identity files.
    pub dr_dir: PathBuf,
}

use rewind_wire::rpc as w_rpc;

/// Tap reports older than this are dropped from status.
pub const TAP_REPORT_KEPT: Duration = Duration::from_secs(600);
/// Taps remembered at most; the oldest report goes first.
const TAPS_MAX: usize = 1024;

fn bad_request(message: impl Into<String>) -> Response {
    ServiceError::BadRequest(message.into()).into()
}

fn raft_config(c: &NodeConfig) -> anyhow::Result<Arc<openraft::Config>> {
    let config = openraft::Config {
        cluster_name: "rewind".into(),
        heartbeat_interval: c.raft.heartbeat_ms,
        election_timeout_min: c.raft.election_timeout_min_ms,
        election_timeout_max: c.raft.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.raft.snapshot_every_entries),
        max_in_snapshot_log_to_keep: c.raft.logs_kept_after_snapshot,
        max_payload_entries: 64,
        install_snapshot_timeout: 60_000,
        // No leadership restored at restart without an election. Our state
        // machine is not flushed on apply and the committed index is not
        // persisted, the case openraft's docs warn about; and the
        // simulation found worse: a leader that lost unsynced entries in a
        // crash came back with the same leader id and wrote different
        // entries under the same log ids (seeds 1204, 1942 of
        // rewind-simulation before this setting).
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    Ok(Arc::new(config.validate().context("raft configuration")?))
}

/// Starts a node and serves until SIGTERM or SIGINT.
pub async fn run(config: NodeConfig) -> anyhow::Result<()> {
    let server = crate::tls::server_config(&config.tls)?;
    let client = crate::tls::client_config(&config.tls)?;
    crate::tls::check_covers(&config.tls.cert, config.advertised(), &format!("advertise = \"{}\"", config.advertised()))?;
    let bind = config.listen.bind_addr()?;
    let mut endpoint = quinn::Endpoint::server(server, bind)
        .with_context(|| format!("listen on {} ({bind}, UDP)", config.listen))?;
    endpoint.set_default_client_config(client);
    if let Some(m) = &config.metrics_listen {
        let addr = m.bind_addr()?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("start the metrics endpoint on {addr}"))?;
    }
    let dir: PathBuf = config.data_dir.join(format!("shard-{DATA_SHARD}"));
    let store = rewind_raft_store::open(&dir).with_context(|| format!("open the store in {}", dir.display()))?;
    let pace = crate::collector::GcPace { rate_bytes: config.gc_rate_mib << 20, busy_percent: config.gc_busy_percent, debt_max: config.gc_debt_max_mib << 20 };
    let collector = crate::collector::start(store.collector.clone(), pace);
    let network = Network::new(endpoint.clone());
    let appended = store.log.appended_bytes();
    let raft = Raft::new(config.id, raft_config(&config)?, network, store.log, store.state_machine)
        .await
        .context("start raft")?;
    watch_raft(raft.clone());
    snapshot_by_size(raft.clone(), appended, config.raft.snapshot_every_mib << 20);
    let mut shards = BTreeMap::new();
    shards.insert(DATA_SHARD, Service::new(config.id, raft.clone(), store.reader));
    let node = Arc::new(Node {
        id: config.id,
        addr: config.advertised().to_string(),
        shards,
        taps: Default::default(),
        snapshot_receiving: tokio::sync::Semaphore::new(1),
        dr: Default::default(),
        dr_dir: config.data_dir.join("dr"),
    });
    crate::dr::start(node.clone());
    tracing::info!(id = config.id, listen = %config.listen, advertise = %config.advertised(), data = %config.data_dir.display(), "node started");

    let accept = {
        let endpoint = endpoint.clone();
        let node = node.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                let node = node.clone();
                spawn(serve_connection(node, incoming));
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = accept => {}
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    let _ = raft.shutdown().await;
    collector.stop().await;
    endpoint.close(0u32.into(), b"node stopping");
    Ok(())
}

/// Builds a snapshot once `every` bytes were appended to the log since the
/// last one this task asked for (0: never): with large writes, a count of
/// entries alone lets the log, which holds every payload, grow to
/// gigabytes before it may be purged.
fn snapshot_by_size(raft: Raft, appended: Arc<std::sync::atomic::AtomicU64>, every: u64) {
    if every == 0 {
        return;
    }
    spawn(async move {
        let mut at = 0u64;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let now = appended.load(std::sync::atomic::Ordering::Relaxed);
            if now.saturating_sub(at) >= every {
                at = now;
                if raft.trigger().snapshot().await.is_err() {
                    return;
                }
            }
        }
    });
}

/// Publishes Raft's progress as metrics: apply lag, leader changes, term.
fn watch_raft(raft: Raft) {
    use openraft::async_runtime::WatchReceiver;
    spawn(async move {
        let mut rx = raft.metrics();
        let mut leader = None;
        loop {
            let m = rx.borrow_and_update().clone();
            if m.current_leader != leader {
                leader = m.current_leader;
                metrics::counter!("rewind_leader_changes_total").increment(1);
            }
            let last = m.last_log_index.unwrap_or(0);
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            metrics::gauge!("rewind_apply_lag_entries").set(last.saturating_sub(applied) as f64);
            metrics::gauge!("rewind_raft_term").set(m.current_term as f64);
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

async fn serve_connection(node: Arc<Node>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, "refused connection: {e}");
            return;
        }
    };
    // The peer's role, read once from its certificate (which the TLS
    // handshake has checked against the site's CA and its validity).
    let access: Arc<Result<Access, String>> = Arc::new(peer_access(&conn));
    match access.as_ref() {
        Ok(a) => tracing::debug!(%remote, role = %a, "connection"),
        Err(e) => tracing::warn!(%remote, "a connection's certificate gives no role; its requests are refused: {e}"),
    }
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let node = node.clone();
        spawn(serve_stream(node, remote, access.clone(), send, recv));
    }
}

/// The role in a connection's client certificate.
fn peer_access(conn: &quinn::Connection) -> Result<Access, String> {
    let identity = conn.peer_identity().ok_or("no client certificate")?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "a client identity that is not an X.509 chain".to_string())?;
    let leaf = certs.first().ok_or("an empty certificate chain")?;
    crate::tls::access_of(leaf).map_err(|e| format!("{e:#}"))
}

/// Whether the connection's role allows `request`.
fn permit(access: &Result<Access, String>, request: &Request) -> Result<(), ServiceError> {
    match access {
        Ok(a) => rewind_service::access::check(a, request).map_err(|d| {
            metrics::counter!("rewind_requests_denied_total", "role" => d.role).increment(1);
            ServiceError::from(d)
        }),
        Err(e) => Err(ServiceError::Refused(format!("permission denied: {e}"))),
    }
}

/// How long a stream may take to deliver its first (or only) request.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

async fn serve_stream(node: Arc<Node>, remote: std::net::SocketAddr, access: Arc<Result<Access, String>>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let first = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame::<Request>(&mut recv)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(%remote, "a stream sent no whole request within {REQUEST_READ_TIMEOUT:?}; closed");
            let _ = send.reset(0u32.into());
            return;
        }
    };
    let first = first.and_then(|r| rewind_wire::frame::expand_append(r).map_err(crate::transport::TransportError::Malformed));
    let response = match first.map(|r| (permit(&access, &r), r)) {
        Ok((Err(denied), _)) => {
            tracing::warn!(%remote, "{denied}");
            Response::from(denied)
        }
        Ok((Ok(()), Request::Append { batch })) => return serve_append_stream(node, remote, access, batch, send, recv).await,
        Ok((Ok(()), request)) => node.dispatch(request, &mut recv).await,
        Err(e) => {
            tracing::warn!(%remote, "refused a request: {e}");
            bad_request(e.to_string())
        }
    };
    if let Err(e) = write_frame(&mut send, &response).await {
        tracing::debug!(%remote, "reply not delivered: {e}");
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

impl Node {
    fn shard(&self, id: ShardId) -> Result<&Shard, ServiceError> {
        self.shards.get(&id).ok_or_else(|| ServiceError::BadRequest(format!("node {} has no shard {id}", self.id)))
    }

    pub fn data_shard(&self) -> Result<&Shard, ServiceError> {
        self.shard(crate::DATA_SHARD)
    }

    async fn dispatch(&self, request: Request, recv: &mut quinn::RecvStream) -> Response {
        let result = match request {
            Request::RaftAppend { shard, req } => self.raft_append(shard, req).await,
            Request::RaftVote { shard, req, pre_vote } => self.raft_vote(shard, req, pre_vote).await,
            Request::RaftSnapshot { shard, vote, meta, total_bytes } => self.raft_snapshot(shard, vote, meta, total_bytes, recv).await,
            Request::Status => crate::status::node_status(self).await.map(Response::Status),
            Request::TapReport(report) => self.tap_report(report),
            Request::DrState { group, digest_at } => match self.data_shard() {
                Ok(shard) => Ok(match shard.handle(Request::DrState { group: group.clone(), digest_at }).await {
                    Response::Dr(mut info) => {
                        info.peer = self.dr.peer(&group);
                        Response::Dr(info)
                    }
                    other => other,
                }),
                Err(e) => Err(e),
            },
            Request::DrForkPoint { group } => crate::dr::fork_point(self, &group).await,
            // Shipments cross sites compressed.
            ship @ (Request::Ship { .. } | Request::ShipHashed { .. } | Request::ShipBlocks { .. }) => match self.data_shard() {
                Ok(shard) => Ok(match shard.handle(ship).await {
                    Response::Shipped(s) => crate::dr::compress(&s),
                    Response::HashedShipment(h) => crate::dr::compress_record(&*h, "a hashed shipment", |raw_len, data| Response::ShippedHashedZstd { raw_len, data }),
                    Response::Blocks(b) => crate::dr::compress_record(&b, "shipped blocks", |raw_len, data| Response::BlocksZstd { raw_len, data }),
                    other => other,
                }),
                Err(e) => Err(e),
            },
            other => match self.data_shard() {
                Ok(shard) => Ok(shard.handle(other).await),
                Err(e) => Err(e),
            },
        };
        result.unwrap_or_else(Response::from)
    }

    async fn raft_append(&self, shard: ShardId, req: w::AppendEntriesRequest) -> Result<Response, ServiceError> {
        let raft = &self.shard(shard)?.raft;
        let mut entries = Vec::with_capacity(req.entries.len());
        for e in req.entries {
            entries.push(codec::entry_from_wire(e).map_err(|e| ServiceError::BadRequest(e.to_string()))?);
        }
        let rpc = openraft::raft::AppendEntriesRequest {
            vote: codec::vote_from_wire(&req.vote),
            prev_log_id: codec::opt_log_id_from_wire(&req.prev_log_id),
            entries,
            leader_commit: codec::opt_log_id_from_wire(&req.leader_commit),
        };
        let r = raft.append_entries(rpc).await.map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        use openraft::raft::AppendEntriesResponse as R;
        Ok(Response::RaftAppend(match r {
            R::Success => w::AppendEntriesResponse::Success,
            R::PartialSuccess(l) => w::AppendEntriesResponse::PartialSuccess(codec::opt_log_id_to_wire(&l)),
            R::Conflict => w::AppendEntriesResponse::Conflict,
            R::HigherVote(v) => w::AppendEntriesResponse::HigherVote(codec::vote_to_wire(&v)),
        }))
    }

    async fn raft_vote(&self, shard: ShardId, req: w::VoteRequest, pre_vote: bool) -> Result<Response, ServiceError> {
        let raft = &self.shard(shard)?.raft;
        let rpc = openraft::raft::VoteRequest {
            vote: codec::vote_from_wire(&req.vote),
            last_log_id: codec::opt_log_id_from_wire(&req.last_log_id),
            leadership_transfer: req.leadership_transfer,
        };
        let r = if pre_vote { raft.pre_vote(rpc).await } else { raft.vote(rpc).await };
        let r = r.map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        Ok(Response::RaftVote(w::VoteResponse {
            vote: codec::vote_to_wire(&r.vote),
            vote_granted: r.vote_granted,
            last_log_id: codec::opt_log_id_to_wire(&r.last_log_id),
        }))
    }

    /// Receives a snapshot's chunks into a file (bounded pieces), checks it,
    /// and hands it to Raft.
    async fn raft_snapshot(
        &self,
        shard: ShardId,
        vote: w::Vote,
        meta: w::SnapshotMeta,
        total_bytes: u64,
        recv: &mut quinn::RecvStream,
    ) -> Result<Response, ServiceError> {
        let s = self.shard(shard)?;
        if total_bytes > SNAPSHOT_BYTES_MAX {
            return Err(ServiceError::BadRequest(format!("snapshot of {total_bytes} bytes is over the limit")));
        }
        let Ok(_receiving) = self.snapshot_receiving.try_acquire() else {
            return Err(ServiceError::Unavailable(format!("node {} is receiving another snapshot; retry", self.id)));
        };
        let path = s.reader.incoming_snapshot_path(crate::now_ns());
        // A snapshot that cannot fit is refused before a byte of it is
        // written: the disk also holds the node's log and state.
        let folder = path.parent().unwrap_or(std::path::Path::new("."));
        match free_bytes(folder) {
            Ok(free) if total_bytes.saturating_mul(2) > free => {
                return Err(ServiceError::Unavailable(format!(
                    "node {}: a snapshot of {total_bytes} bytes needs twice that free in {}, and {free} bytes are",
                    self.id,
                    folder.display()
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(ServiceError::Internal(format!("node {}: free space of {}: {e}", self.id, folder.display()))),
        }
        let meta = codec::snapshot_meta_from_wire(&meta).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        let received = receive_file(&path, total_bytes, recv).await;
        if let Err(e) = received {
            let _ = std::fs::remove_file(&path);
            return Err(ServiceError::BadRequest(format!("snapshot transfer failed: {e}")));
        }
        let snapshot = openraft::alias::SnapshotOf::<TypeConfig, SnapshotFile> { meta, snapshot: SnapshotFile { path: path.clone() } };
        let r = s.raft.install_full_snapshot(codec::vote_from_wire(&vote), snapshot).await;
        let _ = std::fs::remove_file(&path);
        let r = r.map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(Response::RaftSnapshot { vote: codec::vote_to_wire(&r.vote) })
    }

    fn tap_report(&self, report: w_rpc::TapReport) -> Result<Response, ServiceError> {
        rewind_wire::event::check_name(&report.group).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        rewind_wire::event::check_name(&report.disk).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        if report.uri.len() > 4096 {
            return Err(ServiceError::BadRequest("tap URI longer than 4096 bytes".into()));
        }
        let mut taps = self.taps.lock().expect("taps lock");
        taps.retain(|_, (_, at)| at.elapsed() < TAP_REPORT_KEPT);
        if taps.len() >= TAPS_MAX && !taps.contains_key(&(report.group.clone(), report.disk.clone())) {
            let oldest = taps.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                taps.remove(&k);
            }
        }
        taps.insert((report.group.clone(), report.disk.clone()), (report, Instant::now()));
        Ok(Response::Done)
    }
}

/// Batches one append stream may have submitted and not yet answered.
const APPEND_STREAM_IN_FLIGHT_MAX: usize = PRODUCER_WINDOW_MAX;

/// A producer's stream of batches: each is submitted to Raft in the order it
/// arrives, and answered in that order once committed and applied. The
/// stream ends when the client finishes it or sends something bad.
async fn serve_append_stream(
    node: Arc<Node>,
    remote: std::net::SocketAddr,
    access: Arc<Result<Access, String>>,
    first: EventBatch,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let shard = match node.data_shard() {
        Ok(s) => s.clone(),
        Err(e) => {
            let _ = write_frame(&mut send, &Response::from(e)).await;
            return;
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<PendingAppend<NodeTypes>>(APPEND_STREAM_IN_FLIGHT_MAX);
    let writer_shard = shard.clone();
    let writer = spawn(async move {
        while let Some(pending) = rx.recv().await {
            let response = writer_shard.finish_append(pending).await;
            if write_frame(&mut send, &response).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
        let _ = send.stopped().await;
    });
    let mut next = Some(first);
    loop {
        let batch = match next.take() {
            Some(b) => b,
            None => match read_frame::<Request>(&mut recv).await.and_then(|r| rewind_wire::frame::expand_append(r).map_err(crate::transport::TransportError::Malformed)).map(|r| (permit(&access, &r), r)) {
                Ok((Err(denied), _)) => {
                    tracing::warn!(%remote, "{denied}");
                    let _ = tx.send(PendingAppend::Ready(Response::from(denied))).await;
                    break;
                }
                Ok((Ok(()), Request::Append { batch })) => batch,
                Ok((Ok(()), other)) => {
                    let _ = tx.send(PendingAppend::Ready(bad_request(format!("an append stream carries only appends, not {}", other.name())))).await;
                    break;
                }
                Err(crate::transport::TransportError::Closed) => break,
                Err(e) => {
                    tracing::warn!(%remote, "refused a request: {e}");
                    let _ = tx.send(PendingAppend::Ready(bad_request(e.to_string()))).await;
                    break;
                }
            },
        };
        let pending = shard.submit_append(batch).await;
        if tx.send(pending).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Bytes free for this process in the filesystem of `path`.
fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs writes into the struct it is given; the path is a
    // valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

async fn receive_file(path: &std::path::Path, total_bytes: u64, recv: &mut quinn::RecvStream) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::create(path).await.context("create the incoming snapshot file")?;
    let mut got = 0u64;
    let deadline = Duration::from_secs(60);
    loop {
        let chunk = tokio::time::timeout(deadline, read_frame::<Request>(recv))
            .await
            .context("no snapshot chunk for 60 s")??;
        let Request::SnapshotChunk { data, last } = chunk else {
            anyhow::bail!("expected a snapshot chunk");
        };
        if data.len() > SNAPSHOT_CHUNK_BYTES_MAX {
            anyhow::bail!("snapshot chunk of {} bytes is over the limit", data.len());
        }
        got += data.len() as u64;
        if got > total_bytes {
            anyhow::bail!("snapshot is longer than the {total_bytes} bytes announced");
        }
        file.write_all(&data).await?;
        if last {
            break;
        }
    }
    if got != total_bytes {
        anyhow::bail!("snapshot ended after {got} of {total_bytes} bytes");
    }
    file.sync_all().await.context("sync the incoming snapshot")?;
    SnapshotFile { path: path.to_path_buf() }.verify().context("check the incoming snapshot")?;
    Ok(())
}
