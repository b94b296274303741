//! The simulated network between nodes: every message may be lost,
//! duplicated or delayed (and so reordered), and links can be cut one way
//! or both. A request is delivered by calling the target's Raft handle.

use std::future::Future;
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, OptionalSend};

use openraft_rt::WatchReceiver;

use crate::{rt, world, Bug, Raft, SimConfig, Snapshot, Vote};

/// Why a message did not get an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undelivered {
    /// Lost, or the link is cut: the sender waits out its timeout.
    Lost,
    /// The target process is down.
    Down,
    /// No answer within the sender's timeout (slow, or paused).
    TimedOut,
    /// The target answered with an error of its own.
    Failed(String),
}

impl std::fmt::Display for Undelivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undelivered::Lost => f.write_str("message lost"),
            Undelivered::Down => f.write_str("node down"),
            Undelivered::TimedOut => f.write_str("no answer in time"),
            Undelivered::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Sends `req` from `from` to `to`, runs `call` on the target, and brings
/// the answer back through the network. A duplicated request is delivered
/// a second time later, its answer dropped. Gives up after `ttl`.
pub async fn deliver<Req, Resp, E, F, Fut>(from: u64, to: u64, what: &str, req: Req, ttl: Duration, call: F) -> Result<Resp, Undelivered>
where
    Req: Clone + 'static,
    Resp: 'static,
    E: std::fmt::Display + 'static,
    F: Fn(Raft, Req) -> Fut + 'static,
    Fut: Future<Output = Result<Resp, E>> + 'static,
{
    let trip = async {
        let Some((delay, dup)) = world::with(|w| w.route(from, to)) else {
            rt::sleep(ttl).await;
            return Err(Undelivered::Lost);
        };
        rt::sleep(delay).await;
        let Some(raft) = world::with(|w| w.raft(to)) else { return Err(Undelivered::Down) };
        if dup {
            let (raft2, req2) = (raft.clone(), req.clone());
            let again = call(raft2, req2);
            let extra = world::with(|w| Duration::from_micros(w.net_rng.range(0, w.plan.delay_max_ms * 2000 + 1)));
            rt::spawn_local(async move {
                rt::sleep(extra).await;
                let _ = again.await;
            });
        }
        let resp = call(raft, req).await.map_err(|e| Undelivered::Failed(e.to_string()))?;
        let Some((delay, _)) = world::with(|w| w.route(to, from)) else {
            rt::sleep(ttl).await;
            return Err(Undelivered::Lost);
        };
        rt::sleep(delay).await;
        Ok(resp)
    };
    let r = match rt::timeout(ttl, trip).await {
        Ok(r) => r,
        Err(_) => Err(Undelivered::TimedOut),
    };
    if let Err(e) = &r {
        world::trace(format!("n{from}->n{to} {what}: {e}"));
    }
    r
}

fn rpc_err(e: Undelivered) -> RPCError<SimConfig> {
    match e {
        Undelivered::Down => RPCError::Unreachable(Unreachable::from_string(e.to_string())),
        e => RPCError::Network(NetworkError::from_string(e.to_string())),
    }
}

/// Makes a node's connections to its peers.
pub struct SimNet {
    pub from: u64,
}

impl RaftNetworkFactory<SimConfig> for SimNet {
    type Network = SimClient;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> SimClient {
        SimClient { from: self.from, to: target }
    }
}

pub struct SimClient {
    from: u64,
    to: u64,
}

fn ttl(option: &RPCOption) -> Duration {
    option.hard_ttl().max(Duration::from_millis(50))
}

impl RaftNetworkV2<SimConfig> for SimClient {
    type SnapshotData = std::sync::Arc<crate::sm::SmImage>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<SimConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<SimConfig>, RPCError<SimConfig>> {
        let r = deliver(self.from, self.to, "append", rpc, ttl(&option), |raft, rpc| async move { raft.append_entries(rpc).await }).await;
        match r {
            // The reintroduced bug: a failed append counted as a success,
            // so the leader commits without hearing from a majority.
            Err(e) if world::with(|w| w.is_bug(Bug::CommitWithoutMajority)) => {
                world::trace(format!("n{}->n{} append: {e}, counted as success (bug)", self.from, self.to));
                Ok(AppendEntriesResponse::Success)
            }
            r => r.map_err(rpc_err),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<SimConfig>, option: RPCOption) -> Result<VoteResponse<SimConfig>, RPCError<SimConfig>> {
        let asked = format!("n{}->n{} vote {} with last log {:?}", self.from, self.to, rpc.vote, rpc.last_log_id.map(|l| l.index));
        let r = deliver(self.from, self.to, "vote", rpc, ttl(&option), |raft, rpc| async move { raft.vote(rpc).await }).await;
        if let Ok(v) = &r {
            world::trace(format!("{asked}: {}", if v.vote_granted { "granted" } else { "refused" }));
        }
        r.map_err(rpc_err)
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<SimConfig>, option: RPCOption) -> Result<VoteResponse<SimConfig>, RPCError<SimConfig>> {
        deliver(self.from, self.to, "pre-vote", rpc, ttl(&option), |raft, rpc| async move { raft.pre_vote(rpc).await })
            .await
            .map_err(rpc_err)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<SimConfig>, StreamingError<SimConfig>> {
        let send = deliver(self.from, self.to, "snapshot", (vote, snapshot), ttl(&option) * 4, |raft, (vote, snapshot)| async move {
            // A snapshot that arrives damaged fails its checksum: the
            // receiver refuses it before changing anything (production
            // checks the stream file's blake3 trailer), and the leader
            // sends it again later.
            let to = raft.metrics().borrow_watched().id;
            if world::with(|w| w.snapshot_misread.remove(&to)) {
                world::count("snapshot corruption");
                world::trace(format!("n{to}: a snapshot arrives corrupt and is refused"));
                return Err("snapshot stream: checksum mismatch; refused".to_string());
            }
            raft.install_full_snapshot(vote, snapshot).await.map_err(|e| e.to_string())
        });
        futures::pin_mut!(send, cancel);
        match futures::future::select(send, cancel).await {
            futures::future::Either::Left((r, _)) => r.map_err(|e| StreamingError::Network(NetworkError::from_string(e.to_string()))),
            futures::future::Either::Right((closed, _)) => Err(StreamingError::Closed(closed)),
        }
    }
}
