//! openraft's network over QUIC: Raft messages converted to their `wire`
//! mirrors and sent as frames.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, OptionalSend};
use rewind_raft_store::codec;
use rewind_raft_store::{SnapshotFile, TypeConfig};
use rewind_wire::limits::SNAPSHOT_CHUNK_BYTES_MAX;
use rewind_wire::raft as w;
use rewind_wire::rpc::{Request, Response};

use crate::addr::HostPort;
use crate::transport::{read_frame, write_frame, Peer, TransportError};
use crate::DATA_SHARD;

type Vote = codec::Vote;
type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>;

/// Entries' payload bytes one append request may carry; the rest waits for
/// the next request (reported to openraft as a partial success).
const APPEND_REQUEST_BYTES_MAX: usize = 12 << 20;
/// The slowest replication a request is given time for, in bytes per
/// second (a 12 MiB request gets 12.6 s more than an empty one).
const REPLICATION_BYTES_PER_SEC_MIN: f64 = 1e6;

/// One connection cache per peer address, shared by all Raft clients.
#[derive(Clone)]
pub struct Network {
    endpoint: quinn::Endpoint,
    peers: Arc<Mutex<BTreeMap<HostPort, Arc<Peer>>>>,
}

impl Network {
    pub fn new(endpoint: quinn::Endpoint) -> Network {
        Network { endpoint, peers: Arc::default() }
    }

    pub fn peer(&self, addr: &HostPort) -> Arc<Peer> {
        let mut peers = self.peers.lock().expect("peer map lock");
        peers.entry(addr.clone()).or_insert_with(|| Arc::new(Peer::new(self.endpoint.clone(), addr.clone()))).clone()
    }
}

pub struct RaftClient {
    target: u64,
    peer: Result<Arc<Peer>, String>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = RaftClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> RaftClient {
        let peer = node
            .addr
            .parse::<HostPort>()
            .map(|a| self.peer(&a))
            .map_err(|e| format!("node {target} has a bad address {:?}: {e}", node.addr));
        RaftClient { target, peer }
    }
}

fn rpc_err(e: TransportError) -> RPCError<TypeConfig> {
    match e {
        TransportError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected(target: u64, r: Response) -> RPCError<TypeConfig> {
    let why = match r {
        Response::Error(e) => format!("node {target} answered: {e}"),
        other => format!("node {target} answered with an unexpected {other:?}"),
    };
    RPCError::Network(NetworkError::from_string(why))
}

/// Removes a snapshot's scratch stream file when dropped.
struct ScratchGuard {
    path: std::path::PathBuf,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        self.dropped.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
    }
}

impl RaftClient {
    fn peer(&self) -> Result<&Arc<Peer>, RPCError<TypeConfig>> {
        self.peer.as_ref().map_err(|e| RPCError::Unreachable(Unreachable::from_string(e.clone())))
    }

    /// Sends one Raft RPC carrying `bytes` of entries. Its deadline is
    /// openraft's TTL (at least 200 ms) plus the time `bytes` take at
    /// [`REPLICATION_BYTES_PER_SEC_MIN`]: openraft gives every append the
    /// heartbeat interval, and a request of several MiB on a loaded machine
    /// or a slow link cut off at that, then sent again whole, never gets
    /// through (the nemesis found a site stuck so for 30 s).
    async fn call(&self, req: Request, option: &RPCOption, bytes: usize) -> Result<Response, RPCError<TypeConfig>> {
        let timeout = option.hard_ttl().max(Duration::from_millis(200)) + Duration::from_secs_f64(bytes as f64 / REPLICATION_BYTES_PER_SEC_MIN);
        self.peer()?.call(&req, timeout).await.map_err(rpc_err)
    }

    async fn send_snapshot(&self, vote: Vote, snapshot: Snapshot) -> Result<SnapshotResponse<TypeConfig>, TransportError> {
        let peer = self.peer.as_ref().map_err(|_| TransportError::Closed)?;
        // A checkpoint is written out as a stream file next to it, sent, and removed.
        let scratch = snapshot
            .snapshot
            .path
            .with_file_name(format!("send-{}-{}.sending", self.target, crate::now_ns()));
        // The scratch file goes on every way out, a cancelled send included
        // (openraft drops this future when replication moves on): the
        // nemesis found 18 GB of them left behind by cancelled sends.
        let guard = ScratchGuard { path: scratch.clone(), dropped: Arc::new(std::sync::atomic::AtomicBool::new(false)) };
        let dropped = guard.dropped.clone();
        let source = snapshot.snapshot.clone();
        let scratch2 = scratch.clone();
        let (path, _temporary) = tokio::task::spawn_blocking(move || {
            let made = source.stream_for_send(&scratch2);
            // Written after the send was dropped: nobody will send it.
            if dropped.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = std::fs::remove_file(&scratch2);
            }
            made
        })
        .await
        .map_err(|e| TransportError::Connection { addr: peer.addr.clone(), why: e.to_string() })?
        .map_err(|e| TransportError::Connection { addr: peer.addr.clone(), why: format!("local snapshot unusable: {e}") })?;
        let result = self.send_stream(peer, vote, &snapshot.meta, &path).await;
        drop(guard);
        result
    }

    async fn send_stream(
        &self,
        peer: &Arc<Peer>,
        vote: Vote,
        meta: &rewind_raft_store::codec::SnapshotMeta,
        path: &std::path::Path,
    ) -> Result<SnapshotResponse<TypeConfig>, TransportError> {
        let total_bytes = std::fs::metadata(path).map_err(|_| TransportError::Closed)?.len();
        let (mut send, mut recv) = peer.open().await?;
        let header = Request::RaftSnapshot {
            shard: DATA_SHARD,
            vote: codec::vote_to_wire(&vote),
            meta: codec::snapshot_meta_to_wire(meta),
            total_bytes,
        };
        write_frame(&mut send, &header).await?;
        let mut file = std::fs::File::open(path).map_err(|_| TransportError::Closed)?;
        let mut left = total_bytes;
        let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES_MAX];
        while left > 0 {
            let n = (left as usize).min(buf.len());
            file.read_exact(&mut buf[..n]).map_err(|_| TransportError::Closed)?;
            left -= n as u64;
            write_frame(&mut send, &Request::SnapshotChunk { data: buf[..n].to_vec(), last: left == 0 }).await?;
        }
        let _ = send.finish();
        match read_frame::<Response>(&mut recv).await? {
            Response::RaftSnapshot { vote } => Ok(SnapshotResponse::new(codec::vote_from_wire(&vote))),
            other => Err(TransportError::Connection { addr: peer.addr.clone(), why: format!("snapshot refused: {other:?}") }),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for RaftClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Cut the request by bytes: at least one entry, then as many as fit.
        let mut entries = Vec::with_capacity(rpc.entries.len());
        let mut bytes = 0usize;
        let total = rpc.entries.len();
        for e in &rpc.entries {
            let size = match &e.payload {
                openraft::EntryPayload::Normal(command) => command.payload_bytes() + 256,
                _ => 256,
            };
            if !entries.is_empty() && bytes + size > APPEND_REQUEST_BYTES_MAX {
                break;
            }
            bytes += size;
            entries.push(codec::entry_to_wire(e));
        }
        let cut = entries.len() < total;
        let last_sent = entries.last().map(|e| codec::log_id_from_wire(&e.log_id));
        let req = w::AppendEntriesRequest {
            vote: codec::vote_to_wire(&rpc.vote),
            prev_log_id: codec::opt_log_id_to_wire(&rpc.prev_log_id),
            entries,
            leader_commit: codec::opt_log_id_to_wire(&rpc.leader_commit),
        };
        match self.call(Request::RaftAppend { shard: DATA_SHARD, req }, &option, bytes).await? {
            Response::RaftAppend(r) => Ok(match r {
                w::AppendEntriesResponse::Success if cut => AppendEntriesResponse::PartialSuccess(last_sent),
                w::AppendEntriesResponse::Success => AppendEntriesResponse::Success,
                w::AppendEntriesResponse::PartialSuccess(l) => {
                    AppendEntriesResponse::PartialSuccess(codec::opt_log_id_from_wire(&l))
                }
                w::AppendEntriesResponse::Conflict => AppendEntriesResponse::Conflict,
                w::AppendEntriesResponse::HigherVote(v) => AppendEntriesResponse::HigherVote(codec::vote_from_wire(&v)),
            }),
            other => Err(unexpected(self.target, other)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_rpc(rpc, false, option).await
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_rpc(rpc, true, option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tokio::pin!(cancel);
        tokio::select! {
            closed = &mut cancel => Err(StreamingError::Closed(closed)),
            r = self.send_snapshot(vote, snapshot) => r.map_err(|e| StreamingError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftClient {
    async fn vote_rpc(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        pre_vote: bool,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = w::VoteRequest {
            vote: codec::vote_to_wire(&rpc.vote),
            last_log_id: codec::opt_log_id_to_wire(&rpc.last_log_id),
            leadership_transfer: rpc.leadership_transfer,
        };
        match self.call(Request::RaftVote { shard: DATA_SHARD, req, pre_vote }, &option, 0).await? {
            Response::RaftVote(r) => Ok(VoteResponse {
                vote: codec::vote_from_wire(&r.vote),
                vote_granted: r.vote_granted,
                last_log_id: codec::opt_log_id_from_wire(&r.last_log_id),
            }),
            other => Err(unexpected(self.target, other)),
        }
    }
}
