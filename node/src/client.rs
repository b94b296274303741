//! The client side of the site: find the leader, send requests, retry what
//! is safe to retry. Appends carry a producer id and sequence number, so a
//! batch retried after a leader change is applied once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rewind_cdp_ingest::producer::{AppendLink, AppendStream, LinkError, TokioRuntime, RETRY_PAUSE};
pub use rewind_cdp_ingest::producer::{Producer, ProducerError};
use rewind_cdp_ingest::shipper::{ProducerStates, StateError};
use rewind_cdp_ingest::BoxFuture;
use rewind_wire::rpc::{DiskSpec, ErrorKind, NodeStatus, Request, Response};
use tokio::sync::mpsc;

use crate::addr::HostPort;
use crate::config::{ClientConfig, NodeAddr};
use crate::raft_net::Network;
use crate::transport::TransportError;

/// How long a call keeps trying the site before it gives up.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(30);
/// How long one try waits for a reply.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `status` waits for each node (all are asked at once).
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Client {
    nodes: Vec<NodeAddr>,
    /// The certificate, key and CA this client presents and trusts (an
    /// NBD export it serves uses them too).
    pub tls: crate::config::TlsFiles,
    network: Network,
    leader: Arc<Mutex<Option<HostPort>>>,
    deadline: Duration,
    /// Dial only the configured addresses: a leader hint's address is
    /// ignored (another site's nodes may be reached through NAT or a relay
    /// under other addresses than they advertise).
    fixed: bool,
}

/// Why a call to the site's leader failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The site refused the request; retrying will not change that.
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },
    /// No node answered as the leader before the deadline.
    #[error("the site did not answer within {deadline:?}: {last}")]
    NoAnswer { deadline: Duration, last: String },
}

impl Client {
    pub fn new(config: &ClientConfig) -> anyhow::Result<Client> {
        let tls = crate::tls::client_config(&config.tls)?;
        let endpoint = crate::transport::client_endpoint(&config.nodes[0].addr, tls)?;
        Ok(Client { nodes: config.nodes.clone(), tls: config.tls.clone(), network: Network::new(endpoint), leader: Arc::default(), deadline: RETRY_DEADLINE, fixed: false })
    }

    pub fn from_file(path: Option<&std::path::Path>) -> anyhow::Result<Client> {
        let path = ClientConfig::locate(path);
        Client::new(&ClientConfig::load(&path)?)
    }

    pub fn with_deadline(mut self, deadline: Duration) -> Client {
        self.deadline = deadline;
        self
    }

    /// A client that dials only its configured addresses, trying the next
    /// one when a node is not the leader, whatever address it names.
    pub fn with_fixed_addresses(mut self) -> Client {
        self.fixed = true;
        self
    }

    pub fn nodes(&self) -> &[NodeAddr] {
        &self.nodes
    }

    /// The known leader, or else the next node in turn.
    fn pick_node(&self, rotate: &mut usize) -> HostPort {
        match &*self.leader.lock().expect("leader lock") {
            Some(a) => a.clone(),
            None => {
                *rotate += 1;
                self.nodes[*rotate % self.nodes.len()].addr.clone()
            }
        }
    }

    /// Sends to one node, no retry.
    pub async fn call_node(&self, addr: &HostPort, request: &Request) -> Result<Response, TransportError> {
        self.network.peer(addr).call(request, CALL_TIMEOUT).await
    }

    /// Sends to the leader, following redirects and retrying through leader
    /// changes until the deadline. A refusal is returned at once.
    pub async fn call_leader(&self, request: &Request) -> Result<Response, CallError> {
        let started = Instant::now();
        let mut next = 0usize;
        let mut last_error = anyhow!("no node tried");
        while started.elapsed() < self.deadline {
            let addr = self.pick_node(&mut next);
            match self.call_node(&addr, request).await {
                Ok(Response::Error(e)) => match e.kind {
                    ErrorKind::NotLeader => {
                        let hint = e.leader.as_ref().filter(|_| !self.fixed).and_then(|m| m.addr.parse().ok());
                        *self.leader.lock().expect("leader lock") = hint.clone();
                        last_error = anyhow!("{e}");
                        // With fixed addresses, a node that names a leader
                        // sends us on to the next address at once.
                        if hint.is_none() && !(self.fixed && e.leader.is_some()) {
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                    }
                    ErrorKind::Unavailable | ErrorKind::Internal => {
                        *self.leader.lock().expect("leader lock") = None;
                        last_error = anyhow!("node at {addr}: {e}");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    ErrorKind::BadRequest | ErrorKind::Refused => {
                        return Err(CallError::Refused { kind: e.kind, message: e.message })
                    }
                },
                Ok(r) => {
                    *self.leader.lock().expect("leader lock") = Some(addr);
                    return Ok(r);
                }
                Err(TransportError::TlsRefused { why }) => {
                    return Err(CallError::Refused { kind: ErrorKind::Refused, message: format!("node at {addr}: {}", TransportError::TlsRefused { why }) });
                }
                Err(e) => {
                    *self.leader.lock().expect("leader lock") = None;
                    last_error = anyhow::Error::new(e).context(format!("node at {addr}"));
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
        Err(CallError::NoAnswer { deadline: self.deadline, last: format!("{last_error:#}") })
    }

    pub async fn create_group(&self, group: &str, disks: Vec<DiskSpec>) -> anyhow::Result<()> {
        let request = Request::CreateGroup { group: group.to_string(), disks, time_ns: crate::now_ns() };
        match self.call_leader(&request).await? {
            Response::Done => Ok(()),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    /// Every node's status, asked of all nodes at once; a node that does not
    /// answer within `STATUS_TIMEOUT` gets its error.
    pub async fn status_all(&self) -> Vec<(NodeAddr, anyhow::Result<NodeStatus>)> {
        let asks = self.nodes.iter().map(|n| async move {
            let r = match tokio::time::timeout(STATUS_TIMEOUT, self.call_node(&n.addr, &Request::Status)).await {
                Ok(Ok(Response::Status(s))) => Ok(s),
                Ok(Ok(other)) => Err(anyhow!("unexpected reply {other:?}")),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(anyhow!("no answer within {STATUS_TIMEOUT:?}")),
            };
            (n.clone(), r)
        });
        futures::future::join_all(asks).await
    }

    /// Waits until the site has a leader that answers, or the deadline.
    pub async fn wait_for_leader(&self, deadline: Duration) -> anyhow::Result<u64> {
        let started = Instant::now();
        loop {
            for (_, s) in self.status_all().await {
                if let Ok(s) = s {
                    if s.shards.iter().any(|sh| sh.role == rewind_wire::rpc::Role::Leader) {
                        return Ok(s.id);
                    }
                }
            }
            if started.elapsed() > deadline {
                bail!("no leader after {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A producer identity no other producer has: a hash of the host, the
/// process, the time and a counter.
pub fn fresh_client_id() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&crate::now_ns().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes());
    if let Ok(host) = std::fs::read("/etc/machine-id") {
        h.update(&host);
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// An append stream over QUIC: a reader task passes the replies on.
struct QuicAppendStream {
    addr: HostPort,
    send: quinn::SendStream,
    replies: mpsc::Receiver<Result<Response, crate::transport::TransportError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for QuicAppendStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl AppendStream for QuicAppendStream {
    fn peer(&self) -> String {
        self.addr.to_string()
    }

    fn send<'a>(&'a mut self, request: &'a Request) -> BoxFuture<'a, Result<(), LinkError>> {
        Box::pin(async move { Ok(crate::transport::write_frame(&mut self.send, request).await?) })
    }

    fn recv(&mut self) -> BoxFuture<'_, Option<Result<Response, LinkError>>> {
        Box::pin(async move { self.replies.recv().await.map(|r| r.map_err(LinkError::from)) })
    }
}

impl AppendLink for Client {
    fn open<'a>(&'a self, rotate: &'a mut usize, window: usize) -> BoxFuture<'a, Result<Box<dyn AppendStream>, LinkError>> {
        Box::pin(async move {
            let addr = self.pick_node(rotate);
            let (send, mut recv) = self.network.peer(&addr).open().await?;
            let (tx, replies) = mpsc::channel(window + 1);
            let reader = crate::spawn(async move {
                loop {
                    let r = crate::transport::read_frame::<Response>(&mut recv).await;
                    let stop = r.is_err();
                    if tx.send(r).await.is_err() || stop {
                        return;
                    }
                }
            });
            let stream: Box<dyn AppendStream> = Box::new(QuicAppendStream { addr, send, replies, reader });
            Ok(stream)
        })
    }

    fn set_leader(&self, addr: Option<&str>) {
        *self.leader.lock().expect("leader lock") = addr.and_then(|a| a.parse().ok());
    }

    fn deadline(&self) -> Duration {
        self.deadline
    }
}

impl ProducerStates for Client {
    fn last_seq<'a>(&'a self, group: &'a str, client_id: u64) -> BoxFuture<'a, Result<u64, StateError>> {
        Box::pin(async move {
            match self.call_leader(&Request::ProducerState { group: group.to_string(), client_id }).await {
                Ok(Response::Producer { last_seq }) => Ok(last_seq),
                // Another protocol: retrying will not mend it.
                Ok(other) => Err(StateError::Refused(format!("unexpected reply {other:?}"))),
                Err(e @ CallError::Refused { .. }) => Err(StateError::Refused(e.to_string())),
                Err(e @ CallError::NoAnswer { .. }) => Err(StateError::Unavailable(e.to_string())),
            }
        })
    }
}

/// A producer with a fresh identity over this client, on tokio.
pub fn producer(client: Client, window: usize) -> Producer {
    producer_resuming(client, window, fresh_client_id(), 1)
}

/// A producer that goes on under a known identity from `next_seq`.
pub fn producer_resuming(client: Client, window: usize, client_id: u64, next_seq: u64) -> Producer {
    Producer::over(Arc::new(client), Arc::new(TokioRuntime::default()), window, client_id, next_seq)
}
