//! A running node: the QUIC endpoint, the shard's Raft, and the dispatch of
//! every request that arrives.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::async_runtime::WatchReceiver;
use openraft::BasicNode;
use rewind_raft_store::{codec, SnapshotFile, StoreReader, TypeConfig};
use rewind_wire::event::EventBatch;
use rewind_wire::limits::{PRODUCER_WINDOW_MAX, SNAPSHOT_CHUNK_BYTES_MAX};
use rewind_wire::raft::{self as w, Command, CommandReply, ShardId};
use rewind_wire::raft::Member;
use rewind_wire::rpc::{ErrorKind, Request, Response, RpcError};

use crate::config::NodeConfig;
use crate::raft_net::Network;
use crate::transport::{read_frame, write_frame};
use crate::DATA_SHARD;

pub type Raft = openraft::Raft<TypeConfig, rewind_raft_store::StateMachine>;

/// Largest snapshot a node accepts from a peer, 1 TiB.
const SNAPSHOT_BYTES_MAX: u64 = 1 << 40;

/// One Raft group on this node.
pub struct Shard {
    pub raft: Raft,
    pub reader: StoreReader,
}

pub struct Node {
    pub id: u64,
    pub addr: String,
    pub shards: BTreeMap<ShardId, Shard>,
    /// The latest report of each async tap, by (group, disk).
    pub taps: std::sync::Mutex<BTreeMap<(String, String), (w_rpc::TapReport, Instant)>>,
}

use rewind_wire::rpc as w_rpc;

/// Tap reports older than this are dropped from status.
pub const TAP_REPORT_KEPT: Duration = Duration::from_secs(600);
/// Taps remembered at most; the oldest report goes first.
const TAPS_MAX: usize = 1024;

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error(RpcError { kind, message: message.into(), leader: None })
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
    let mut endpoint = quinn::Endpoint::server(server, config.listen)
        .with_context(|| format!("listen on {} (UDP)", config.listen))?;
    endpoint.set_default_client_config(client);
    if let Some(addr) = config.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("start the metrics endpoint on {addr}"))?;
    }
    let dir: PathBuf = config.data_dir.join(format!("shard-{DATA_SHARD}"));
    let store = rewind_raft_store::open(&dir).with_context(|| format!("open the store in {}", dir.display()))?;
    let network = Network::new(endpoint.clone());
    let raft = Raft::new(config.id, raft_config(&config)?, network, store.log, store.state_machine)
        .await
        .context("start raft")?;
    watch_raft(raft.clone());
    let mut shards = BTreeMap::new();
    shards.insert(DATA_SHARD, Shard { raft: raft.clone(), reader: store.reader });
    let node = Arc::new(Node { id: config.id, addr: config.listen.to_string(), shards, taps: Default::default() });
    tracing::info!(id = config.id, listen = %config.listen, data = %config.data_dir.display(), "node started");

    let accept = {
        let endpoint = endpoint.clone();
        let node = node.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                let node = node.clone();
                tokio::spawn(async move { serve_connection(node, incoming).await });
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
    endpoint.close(0u32.into(), b"node stopping");
    Ok(())
}

/// Publishes Raft's progress as metrics: apply lag, leader changes, term.
fn watch_raft(raft: Raft) {
    tokio::spawn(async move {
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
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let node = node.clone();
        tokio::spawn(async move { serve_stream(node, remote, send, recv).await });
    }
}

async fn serve_stream(node: Arc<Node>, remote: std::net::SocketAddr, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let response = match read_frame::<Request>(&mut recv).await {
        Ok(Request::Append { batch }) => return serve_append_stream(node, remote, batch, send, recv).await,
        Ok(request) => node.dispatch(request, &mut recv).await,
        Err(e) => {
            tracing::warn!(%remote, "refused a request: {e}");
            error(ErrorKind::BadRequest, e.to_string())
        }
    };
    if let Err(e) = write_frame(&mut send, &response).await {
        tracing::debug!(%remote, "reply not delivered: {e}");
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

impl Node {
    fn shard(&self, id: ShardId) -> Result<&Shard, Response> {
        self.shards.get(&id).ok_or_else(|| error(ErrorKind::BadRequest, format!("node {} has no shard {id}", self.id)))
    }

    async fn dispatch(&self, request: Request, recv: &mut quinn::RecvStream) -> Response {
        let result = match request {
            Request::RaftAppend { shard, req } => self.raft_append(shard, req).await,
            Request::RaftVote { shard, req, pre_vote } => self.raft_vote(shard, req, pre_vote).await,
            Request::RaftSnapshot { shard, vote, meta, total_bytes } => {
                self.raft_snapshot(shard, vote, meta, total_bytes, recv).await
            }
            Request::SnapshotChunk { .. } => Err(error(ErrorKind::BadRequest, "snapshot chunk without a snapshot header")),
            Request::CreateGroup { group, disks, time_ns } => {
                self.write(Command::CreateGroup { group, disks, time_ns }).await
            }
            Request::Append { .. } => Err(error(ErrorKind::BadRequest, "appends travel on their own stream")),
            Request::Status => crate::status::node_status(self).await.map(Response::Status),
            Request::GroupState { group } => self.group_state(&group),
            Request::ReadEvents { group, lsn_first, count_max } => self.read_events(&group, lsn_first, count_max),
            Request::ProducerState { group, client_id } => self.producer_state(&group, client_id).await,
            Request::TapReport(report) => self.tap_report(report),
            Request::Points { group, on_leader } => match self.leader_read(on_leader).await {
                Ok(()) => self.points(group).await,
                Err(e) => Err(e),
            },
            Request::Resolve { group, target, on_leader } => match self.leader_read(on_leader).await {
                Ok(()) => self.resolve(group, target).await,
                Err(e) => Err(e),
            },
            Request::ReadDisk { group, disk, lsn, offset, len } => self.read_disk(group, disk, lsn, offset, len).await,
            Request::ClusterInit { members } => self.init(members).await,
            Request::AddLearner { member } => self.add_learner(member).await,
            Request::ChangeVoters { voters } => self.change_voters(voters).await,
        };
        result.unwrap_or_else(|e| e)
    }

    async fn raft_append(&self, shard: ShardId, req: w::AppendEntriesRequest) -> Result<Response, Response> {
        let raft = &self.shard(shard)?.raft;
        let mut entries = Vec::with_capacity(req.entries.len());
        for e in req.entries {
            entries.push(codec::entry_from_wire(e).map_err(|e| error(ErrorKind::BadRequest, e.to_string()))?);
        }
        let rpc = openraft::raft::AppendEntriesRequest {
            vote: codec::vote_from_wire(&req.vote),
            prev_log_id: codec::opt_log_id_from_wire(&req.prev_log_id),
            entries,
            leader_commit: codec::opt_log_id_from_wire(&req.leader_commit),
        };
        let r = raft.append_entries(rpc).await.map_err(|e| error(ErrorKind::Unavailable, e.to_string()))?;
        use openraft::raft::AppendEntriesResponse as R;
        Ok(Response::RaftAppend(match r {
            R::Success => w::AppendEntriesResponse::Success,
            R::PartialSuccess(l) => w::AppendEntriesResponse::PartialSuccess(codec::opt_log_id_to_wire(&l)),
            R::Conflict => w::AppendEntriesResponse::Conflict,
            R::HigherVote(v) => w::AppendEntriesResponse::HigherVote(codec::vote_to_wire(&v)),
        }))
    }

    async fn raft_vote(&self, shard: ShardId, req: w::VoteRequest, pre_vote: bool) -> Result<Response, Response> {
        let raft = &self.shard(shard)?.raft;
        let rpc = openraft::raft::VoteRequest {
            vote: codec::vote_from_wire(&req.vote),
            last_log_id: codec::opt_log_id_from_wire(&req.last_log_id),
            leadership_transfer: req.leadership_transfer,
        };
        let r = if pre_vote { raft.pre_vote(rpc).await } else { raft.vote(rpc).await };
        let r = r.map_err(|e| error(ErrorKind::Unavailable, e.to_string()))?;
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
    ) -> Result<Response, Response> {
        let s = self.shard(shard)?;
        if total_bytes > SNAPSHOT_BYTES_MAX {
            return Err(error(ErrorKind::BadRequest, format!("snapshot of {total_bytes} bytes is over the limit")));
        }
        let meta = codec::snapshot_meta_from_wire(&meta).map_err(|e| error(ErrorKind::BadRequest, e.to_string()))?;
        let path = s.reader.incoming_snapshot_path(crate::now_ns());
        let received = receive_file(&path, total_bytes, recv).await;
        if let Err(e) = received {
            let _ = std::fs::remove_file(&path);
            return Err(error(ErrorKind::BadRequest, format!("snapshot transfer failed: {e}")));
        }
        let snapshot = openraft::alias::SnapshotOf::<TypeConfig, SnapshotFile> { meta, snapshot: SnapshotFile { path: path.clone() } };
        let r = s.raft.install_full_snapshot(codec::vote_from_wire(&vote), snapshot).await;
        let _ = std::fs::remove_file(&path);
        let r = r.map_err(|e| error(ErrorKind::Internal, e.to_string()))?;
        Ok(Response::RaftSnapshot { vote: codec::vote_to_wire(&r.vote) })
    }

    fn leader_hint(&self, raft: &Raft, leader: Option<u64>) -> Option<Member> {
        let leader = leader?;
        let m = raft.metrics().borrow_watched().membership_config.clone();
        m.membership().get_node(&leader).map(|n| Member { id: leader, addr: n.addr.clone() })
    }

    fn map_write_error<E>(&self, raft: &Raft, e: RaftError<TypeConfig, E>) -> Response
    where
        E: std::fmt::Display + std::fmt::Debug + openraft::TryAsRef<openraft::errors::ForwardToLeader<TypeConfig>>,
    {
        if let Some(f) = e.forward_to_leader() {
            return Response::Error(RpcError {
                kind: ErrorKind::NotLeader,
                message: format!("node {} is not the leader", self.id),
                leader: self.leader_hint(raft, f.leader_id),
            });
        }
        match e {
            RaftError::APIError(e) => error(ErrorKind::Unavailable, e.to_string()),
            RaftError::Fatal(e) => error(ErrorKind::Internal, e.to_string()),
        }
    }

    async fn write(&self, command: Command) -> Result<Response, Response> {
        let raft = &self.shard(crate::DATA_SHARD)?.raft;
        let r = raft.client_write(command).await.map_err(|e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>| self.map_write_error(raft, e))?;
        Ok(reply_response(r.data))
    }

    /// Validates a batch and hands it to Raft without waiting for the commit.
    /// Called in stream order, so a producer's batches enter the log in order.
    async fn submit_append(&self, batch: EventBatch) -> PendingReply {
        if let Err(e) = batch.check() {
            return PendingReply::Ready(error(ErrorKind::BadRequest, e.to_string()));
        }
        let raft = match self.shard(crate::DATA_SHARD) {
            Ok(s) => s.raft.clone(),
            Err(r) => return PendingReply::Ready(r),
        };
        let bytes = batch.payload_bytes() as u64;
        let (responder, rx) = openraft::impls::ProgressResponder::complete_only();
        match raft.client_write_ff(Command::Append(batch), Some(responder)).await {
            Ok(()) => PendingReply::Waiting { rx, raft, started: Instant::now(), bytes },
            Err(fatal) => PendingReply::Ready(error(ErrorKind::Internal, fatal.to_string())),
        }
    }

    /// The reply to one submitted batch, once Raft has answered.
    async fn finish_append(&self, pending: PendingReply) -> Response {
        let (rx, raft, started, bytes) = match pending {
            PendingReply::Ready(r) => return r,
            PendingReply::Waiting { rx, raft, started, bytes } => (rx, raft, started, bytes),
        };
        let result = match rx.await {
            Ok(r) => r,
            Err(_) => return error(ErrorKind::Unavailable, "raft stopped before answering; resend"),
        };
        match result {
            Ok(r) => {
                let response = reply_response(r.data);
                if matches!(response, Response::Appended { .. }) {
                    metrics::histogram!("rewind_commit_latency_seconds").record(started.elapsed().as_secs_f64());
                    metrics::counter!("rewind_ingested_bytes_total").increment(bytes);
                }
                response
            }
            Err(e) => self.map_write_error(&raft, RaftError::APIError(e)),
        }
    }

    fn group_state(&self, group: &str) -> Result<Response, Response> {
        let s = self.shard(crate::DATA_SHARD)?;
        match s.reader.group(group) {
            Ok(Some(g)) => Ok(Response::Group(crate::status::group_state(&g))),
            Ok(None) => Err(error(ErrorKind::Refused, format!("no consistency group {group:?}"))),
            Err(e) => Err(error(ErrorKind::Internal, format!("read group {group:?}: {e}"))),
        }
    }

    fn read_events(&self, group: &str, lsn_first: u64, count_max: u32) -> Result<Response, Response> {
        use rewind_wire::limits::{READ_EVENTS_BYTES_MAX, READ_EVENTS_MAX};
        let s = self.shard(crate::DATA_SHARD)?;
        let count = (count_max as usize).clamp(1, READ_EVENTS_MAX);
        match s.reader.events(group, lsn_first, count, READ_EVENTS_BYTES_MAX) {
            Ok(events) => Ok(Response::Events(events)),
            Err(e) => Err(error(ErrorKind::Internal, format!("read events of {group:?}: {e}"))),
        }
    }

    async fn producer_state(&self, group: &str, client_id: u64) -> Result<Response, Response> {
        self.leader_read(true).await?;
        let s = self.shard(crate::DATA_SHARD)?;
        match s.reader.producer(client_id, group) {
            Ok(p) => Ok(Response::Producer { last_seq: p.map_or(0, |p| p.last_seq) }),
            Err(e) => Err(error(ErrorKind::Internal, format!("read producer {client_id:x} of {group:?}: {e}"))),
        }
    }

    /// Runs a blocking read of the store off the async workers.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(StoreReader) -> Result<T, Response> + Send + 'static) -> Result<T, Response> {
        let reader = self.shard(crate::DATA_SHARD)?.reader.clone();
        tokio::task::spawn_blocking(move || f(reader)).await.map_err(|e| error(ErrorKind::Internal, format!("read task: {e}")))?
    }

    /// For a read that must reflect every acknowledged write: refuses on a
    /// follower (with the leader's address), and on the leader waits until
    /// everything committed before the read is applied.
    async fn leader_read(&self, on_leader: bool) -> Result<(), Response> {
        if !on_leader {
            return Ok(());
        }
        let raft = &self.shard(crate::DATA_SHARD)?.raft;
        raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex).await.map_err(|e| self.map_write_error(raft, e))?;
        Ok(())
    }

    async fn points(&self, group: String) -> Result<Response, Response> {
        let id = self.id;
        self.blocking(move |r| {
            let internal = |e: std::io::Error| error(ErrorKind::Internal, format!("node {id}: read group {group:?}: {e}"));
            let g = r.group(&group).map_err(internal)?.ok_or_else(|| error(ErrorKind::Refused, format!("no consistency group {group:?}")))?;
            let (first_lsn, first_time_ns, last_time_ns) = if g.last_lsn == 0 {
                (0, 0, 0)
            } else {
                (1, r.time_of(&group, 1).map_err(internal)?.unwrap_or(0), r.time_of(&group, g.last_lsn).map_err(internal)?.unwrap_or(0))
            };
            let mut bookmarks: Vec<w_rpc::BookmarkInfo> = r
                .bookmarks(&group, rewind_wire::limits::POINTS_BOOKMARKS_MAX)
                .map_err(internal)?
                .into_iter()
                .map(|b| w_rpc::BookmarkInfo { name: b.name, lsn: b.lsn, time_ns: b.time_ns, app_consistent: b.app_consistent })
                .collect();
            bookmarks.reverse();
            Ok(Response::Points(w_rpc::PointsInfo { group, first_lsn, last_lsn: g.last_lsn, first_time_ns, last_time_ns, bookmarks, disks: g.disks }))
        })
        .await
    }

    async fn resolve(&self, group: String, target: w_rpc::Target) -> Result<Response, Response> {
        let id = self.id;
        let leads = self.shard(crate::DATA_SHARD)?.raft.metrics().borrow_watched().current_leader == Some(id);
        self.blocking(move |r| {
            let internal = |e: std::io::Error| error(ErrorKind::Internal, format!("node {id}: {e}"));
            let g = r.group(&group).map_err(internal)?.ok_or_else(|| error(ErrorKind::Refused, format!("no consistency group {group:?}")))?;
            let window = if g.last_lsn == 0 { "it has no events yet".to_string() } else { format!("its window is LSN 1..={}", g.last_lsn) };
            let lsn = match &target {
                w_rpc::Target::Latest if g.last_lsn == 0 => return Err(error(ErrorKind::Refused, format!("group {group:?} has no events yet"))),
                w_rpc::Target::Latest => g.last_lsn,
                w_rpc::Target::Lsn(0) => return Err(error(ErrorKind::Refused, format!("LSNs start at 1; {window}"))),
                w_rpc::Target::Lsn(n) if *n > g.last_lsn && leads => {
                    return Err(error(ErrorKind::Refused, format!("LSN {n} is beyond the log of group {group:?} ({window})")))
                }
                w_rpc::Target::Lsn(n) if *n > g.last_lsn => {
                    return Err(error(ErrorKind::Unavailable, format!("LSN {n} is beyond what node {id} has applied of group {group:?} ({window})")))
                }
                w_rpc::Target::Lsn(n) => *n,
                w_rpc::Target::TimeNs(t) => match r.lsn_at_time(&group, *t).map_err(internal)? {
                    Some(l) => l,
                    None => {
                        let first = if g.last_lsn > 0 { r.time_of(&group, 1).map_err(internal)? } else { None };
                        let msg = match first {
                            Some(f) => format!(
                                "time {} is before the window of group {group:?}: its first event is at {} ({window})",
                                crate::timefmt::format_time_ns(*t),
                                crate::timefmt::format_time_ns(f)
                            ),
                            None => format!("group {group:?} has no events yet"),
                        };
                        return Err(error(ErrorKind::Refused, msg));
                    }
                },
                w_rpc::Target::Bookmark(name) => {
                    let marks = r.bookmarks(&group, usize::MAX).map_err(internal)?;
                    match marks.iter().rev().find(|b| &b.name == name) {
                        Some(b) => b.lsn,
                        None => return Err(error(ErrorKind::Refused, format!("group {group:?} has no bookmark {name:?} ({} bookmarks; see `rewind points {group}`)", marks.len()))),
                    }
                }
            };
            let time_ns = r.time_of(&group, lsn).map_err(internal)?.unwrap_or(0);
            Ok(Response::Resolved { lsn, time_ns })
        })
        .await
    }

    async fn read_disk(&self, group: String, disk: String, lsn: u64, offset: u64, len: u64) -> Result<Response, Response> {
        use rewind_wire::limits::READ_DISK_BYTES_MAX;
        if len == 0 || len > READ_DISK_BYTES_MAX {
            return Err(error(ErrorKind::BadRequest, format!("read of {len} bytes; 1..={READ_DISK_BYTES_MAX} per request")));
        }
        let id = self.id;
        self.blocking(move |r| {
            let internal = |e: std::io::Error| error(ErrorKind::Internal, format!("node {id}: {e}"));
            let g = r.group(&group).map_err(internal)?.ok_or_else(|| error(ErrorKind::Refused, format!("no consistency group {group:?}")))?;
            let spec = g.disks.iter().find(|d| d.name == disk).ok_or_else(|| {
                error(ErrorKind::Refused, format!("group {group:?} has no disk {disk:?} (it has: {})", g.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")))
            })?;
            if lsn > g.last_lsn {
                return Err(error(ErrorKind::Unavailable, format!("node {id} has applied group {group:?} to LSN {}, not yet {lsn}", g.last_lsn)));
            }
            if offset.checked_add(len).is_none_or(|end| end > spec.size_bytes) {
                return Err(error(ErrorKind::BadRequest, format!("range {offset}+{len} is past the end of disk {disk:?} ({} bytes)", spec.size_bytes)));
            }
            let runs = r.read_disk(&group, &disk, lsn, offset, len).map_err(|e| {
                tracing::error!("read of disk {disk:?} in group {group:?} at LSN {lsn} failed: {e}");
                internal(e)
            })?;
            Ok(Response::DiskPiece { len, runs })
        })
        .await
    }

    fn tap_report(&self, report: w_rpc::TapReport) -> Result<Response, Response> {
        rewind_wire::event::check_name(&report.group).map_err(|e| error(ErrorKind::BadRequest, e.to_string()))?;
        rewind_wire::event::check_name(&report.disk).map_err(|e| error(ErrorKind::BadRequest, e.to_string()))?;
        if report.uri.len() > 4096 {
            return Err(error(ErrorKind::BadRequest, "tap URI longer than 4096 bytes"));
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

    async fn init(&self, members: Vec<Member>) -> Result<Response, Response> {
        let raft = &self.shard(crate::DATA_SHARD)?.raft;
        let nodes: BTreeMap<u64, BasicNode> = members.iter().map(|m| (m.id, BasicNode { addr: m.addr.clone() })).collect();
        raft.initialize(nodes).await.map_err(|e| error(ErrorKind::Refused, format!("initialize: {e}")))?;
        Ok(Response::Done)
    }

    /// Refuses a membership change this node must not start now.
    fn membership_guard(&self, raft: &Raft) -> Result<(), Response> {
        let m = raft.metrics().borrow_watched().clone();
        match rewind_raft_store::membership_change_refusal(&m) {
            Some(why) => Err(Response::Error(RpcError { kind: ErrorKind::NotLeader, message: why, leader: None })),
            None => Ok(()),
        }
    }

    async fn add_learner(&self, member: Member) -> Result<Response, Response> {
        let raft = &self.shard(crate::DATA_SHARD)?.raft;
        self.membership_guard(raft)?;
        raft.add_learner(member.id, BasicNode { addr: member.addr }, true).await.map_err(|e| self.map_write_error(raft, e))?;
        Ok(Response::Done)
    }

    async fn change_voters(&self, voters: Vec<u64>) -> Result<Response, Response> {
        let raft = &self.shard(crate::DATA_SHARD)?.raft;
        if voters.is_empty() {
            return Err(error(ErrorKind::BadRequest, "a site needs at least one voter"));
        }
        let voters: BTreeSet<u64> = voters.into_iter().collect();
        self.membership_guard(raft)?;
        let m = raft.metrics().borrow_watched().clone();
        if let Some(to) = rewind_raft_store::self_removal_handover(&m, &voters) {
            // Hand leadership over first; the client follows the hint and
            // the next leader makes the change.
            raft.trigger().transfer_leader(to).await.map_err(|e| error(ErrorKind::Internal, e.to_string()))?;
            return Err(Response::Error(RpcError {
                kind: ErrorKind::NotLeader,
                message: format!("node {} leads and is leaving the voters: it hands leadership to node {to}, which makes the change", self.id),
                leader: self.leader_hint(raft, Some(to)),
            }));
        }
        raft.change_membership(voters, false).await.map_err(|e| self.map_write_error(raft, e))?;
        Ok(Response::Done)
    }
}

/// The client's answer for a state machine's reply.
pub fn reply_response(reply: CommandReply) -> Response {
    match reply {
        CommandReply::Created => Response::Done,
        CommandReply::Appended { lsn_first, lsn_last } => Response::Appended { lsn_first, lsn_last },
        CommandReply::Refused { reason } => error(ErrorKind::Refused, reason),
        CommandReply::OutOfOrder { expected_seq } => {
            error(ErrorKind::Unavailable, format!("out of order: resend from sequence {expected_seq}"))
        }
    }
}

/// A batch handed to Raft, or an answer known at once.
enum PendingReply {
    Ready(Response),
    Waiting {
        rx: openraft::alias::OneshotReceiverOf<TypeConfig, openraft::raft::ClientWriteResult<TypeConfig>>,
        raft: Raft,
        started: Instant,
        bytes: u64,
    },
}

/// Batches one append stream may have submitted and not yet answered.
const APPEND_STREAM_IN_FLIGHT_MAX: usize = PRODUCER_WINDOW_MAX;

/// A producer's stream of batches: each is submitted to Raft in the order it
/// arrives, and answered in that order once committed and applied. The
/// stream ends when the client finishes it or sends something bad.
async fn serve_append_stream(
    node: Arc<Node>,
    remote: std::net::SocketAddr,
    first: EventBatch,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<PendingReply>(APPEND_STREAM_IN_FLIGHT_MAX);
    let writer_node = node.clone();
    let writer = tokio::spawn(async move {
        while let Some(pending) = rx.recv().await {
            let response = writer_node.finish_append(pending).await;
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
            None => match read_frame::<Request>(&mut recv).await {
                Ok(Request::Append { batch }) => batch,
                Ok(other) => {
                    let _ = tx.send(PendingReply::Ready(error(ErrorKind::BadRequest, format!("an append stream carries only appends, not {}", request_name(&other))))).await;
                    break;
                }
                Err(crate::transport::TransportError::Closed) => break,
                Err(e) => {
                    tracing::warn!(%remote, "refused a request: {e}");
                    let _ = tx.send(PendingReply::Ready(error(ErrorKind::BadRequest, e.to_string()))).await;
                    break;
                }
            },
        };
        let pending = node.submit_append(batch).await;
        if tx.send(pending).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::RaftAppend { .. } => "raft-append",
        Request::RaftVote { .. } => "raft-vote",
        Request::RaftSnapshot { .. } => "raft-snapshot",
        Request::SnapshotChunk { .. } => "snapshot-chunk",
        Request::CreateGroup { .. } => "create-group",
        Request::Append { .. } => "append",
        Request::Status => "status",
        Request::GroupState { .. } => "group-state",
        Request::ReadEvents { .. } => "read-events",
        Request::ProducerState { .. } => "producer-state",
        Request::TapReport(_) => "tap-report",
        Request::Points { .. } => "points",
        Request::Resolve { .. } => "resolve",
        Request::ReadDisk { .. } => "read-disk",
        Request::ClusterInit { .. } => "cluster-init",
        Request::AddLearner { .. } => "add-learner",
        Request::ChangeVoters { .. } => "change-voters",
    }
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
