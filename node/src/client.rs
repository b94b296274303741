//! The client side of the site: find the leader, send requests, retry what
//! is safe to retry. Appends carry a producer id and sequence number, so a
//! batch retried after a leader change is applied once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rewind_wire::event::{EventBatch, TimedEvent};
use rewind_wire::limits::PRODUCER_WINDOW_MAX;
use rewind_wire::rpc::{DiskSpec, ErrorKind, NodeStatus, Request, Response};
use tokio::sync::{mpsc, oneshot};

use crate::config::{ClientConfig, NodeAddr};
use crate::raft_net::Network;

/// How long a call keeps trying the site before it gives up.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(30);
/// How long one try waits for a reply.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// An append stream whose oldest batch has had no answer for this long is
/// abandoned, and its batches are sent again on a new one.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Client {
    nodes: Vec<NodeAddr>,
    network: Network,
    leader: Arc<Mutex<Option<SocketAddr>>>,
    deadline: Duration,
}

/// A refusal from the site that retrying will not change.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub kind: ErrorKind,
    pub message: String,
}

impl Client {
    pub fn new(config: &ClientConfig) -> anyhow::Result<Client> {
        let tls = crate::tls::client_config(&config.tls)?;
        let endpoint = crate::transport::client_endpoint(&config.nodes[0].addr, tls)?;
        Ok(Client { nodes: config.nodes.clone(), network: Network::new(endpoint), leader: Arc::default(), deadline: RETRY_DEADLINE })
    }

    pub fn from_file(path: Option<&std::path::Path>) -> anyhow::Result<Client> {
        let path = ClientConfig::locate(path);
        Client::new(&ClientConfig::load(&path)?)
    }

    pub fn with_deadline(mut self, deadline: Duration) -> Client {
        self.deadline = deadline;
        self
    }

    pub fn nodes(&self) -> &[NodeAddr] {
        &self.nodes
    }

    /// The known leader, or else the next node in turn.
    fn pick_node(&self, rotate: &mut usize) -> SocketAddr {
        match *self.leader.lock().expect("leader lock") {
            Some(a) => a,
            None => {
                *rotate += 1;
                self.nodes[*rotate % self.nodes.len()].addr
            }
        }
    }

    /// Sends to one node, no retry.
    pub async fn call_node(&self, addr: SocketAddr, request: &Request) -> anyhow::Result<Response> {
        Ok(self.network.peer(addr).call(request, CALL_TIMEOUT).await?)
    }

    /// Sends to the leader, following redirects and retrying through leader
    /// changes until the deadline. A refusal is returned at once.
    pub async fn call_leader(&self, request: &Request) -> anyhow::Result<Response> {
        let started = Instant::now();
        let mut next = 0usize;
        let mut last_error = anyhow!("no node tried");
        while started.elapsed() < self.deadline {
            let addr = self.pick_node(&mut next);
            match self.call_node(addr, request).await {
                Ok(Response::Error(e)) => match e.kind {
                    ErrorKind::NotLeader => {
                        let hint = e.leader.as_ref().and_then(|m| m.addr.parse().ok());
                        *self.leader.lock().expect("leader lock") = hint;
                        last_error = anyhow!("{e}");
                        if hint.is_none() {
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                    }
                    ErrorKind::Unavailable | ErrorKind::Internal => {
                        *self.leader.lock().expect("leader lock") = None;
                        last_error = anyhow!("node at {addr}: {e}");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    ErrorKind::BadRequest | ErrorKind::Refused => {
                        return Err(Refused { kind: e.kind, message: e.message }.into())
                    }
                },
                Ok(r) => {
                    *self.leader.lock().expect("leader lock") = Some(addr);
                    return Ok(r);
                }
                Err(e) => {
                    *self.leader.lock().expect("leader lock") = None;
                    last_error = e.context(format!("node at {addr}"));
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
        Err(last_error.context(format!("the site did not answer within {:?}", self.deadline)))
    }

    pub async fn create_group(&self, group: &str, disks: Vec<DiskSpec>) -> anyhow::Result<()> {
        let request = Request::CreateGroup { group: group.to_string(), disks, time_ns: crate::now_ns() };
        match self.call_leader(&request).await? {
            Response::Done => Ok(()),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    /// Every node's status; a node that does not answer gets its error.
    pub async fn status_all(&self) -> Vec<(NodeAddr, anyhow::Result<NodeStatus>)> {
        let mut out = Vec::new();
        for n in &self.nodes {
            let r = match self.call_node(n.addr, &Request::Status).await {
                Ok(Response::Status(s)) => Ok(s),
                Ok(other) => Err(anyhow!("unexpected reply {other:?}")),
                Err(e) => Err(e),
            };
            out.push((n.clone(), r));
        }
        out
    }

    /// Waits until the site has a leader that answers, or the deadline.
    pub async fn wait_for_leader(&self, deadline: Duration) -> anyhow::Result<u64> {
        let started = Instant::now();
        loop {
            for (_, s) in self.status_all().await {
                if let Ok(s) = s {
                    if s.shards.iter().any(|sh| sh.role == "leader") {
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

/// One batch waiting for its answer.
struct Submission {
    batch: EventBatch,
    done: oneshot::Sender<anyhow::Result<(u64, u64)>>,
}

/// What an append stream's reader task passes on.
type Reply = Result<Response, crate::transport::TransportError>;

/// An open append stream to one node.
struct Stream {
    addr: SocketAddr,
    send: quinn::SendStream,
    replies: mpsc::Receiver<Reply>,
    reader: tokio::task::JoinHandle<()>,
    /// How many of the pending batches were sent on this stream.
    sent: usize,
    /// When the stream last made progress (opened, or answered a batch).
    answered_at: Instant,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Appends for one producer, pipelined and in order: batches are numbered,
/// sent on one stream to the leader without waiting for each other, and
/// answered in order. After a leader change or a lost connection every
/// unanswered batch is sent again, in order, to the new leader; the site
/// answers a batch it already applied with its first answer, so each is
/// applied exactly once.
pub struct Producer {
    client_id: u64,
    next_seq: u64,
    tx: mpsc::Sender<Submission>,
}

impl Producer {
    /// `window`: batches in flight at most (1 to `PRODUCER_WINDOW_MAX`).
    pub fn new(client: Client, window: usize) -> Producer {
        Producer::resume(client, window, fresh_client_id(), 1)
    }

    /// A producer that goes on with a known identity from `next_seq`: an
    /// async tap's shipper, whose numbers are kept in its journal.
    pub fn resume(client: Client, window: usize, client_id: u64, next_seq: u64) -> Producer {
        let window = window.clamp(1, PRODUCER_WINDOW_MAX);
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(pipeline(client, rx, window));
        Producer { client_id, next_seq, tx }
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// The sequence number the next batch will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Checks and numbers a batch and queues it; waits while the window is
    /// full. The receiver gets the batch's LSN range once it is committed.
    pub async fn submit(
        &mut self,
        group: &str,
        events: Vec<TimedEvent>,
    ) -> anyhow::Result<oneshot::Receiver<anyhow::Result<(u64, u64)>>> {
        let batch = EventBatch { group: group.to_string(), client_id: self.client_id, seq: self.next_seq, events };
        batch.check().context("check the batch")?;
        self.next_seq += 1;
        let (done, rx) = oneshot::channel();
        self.tx.send(Submission { batch, done }).await.map_err(|_| anyhow!("the producer has stopped"))?;
        Ok(rx)
    }

    /// Submits one batch and waits for its LSN range.
    pub async fn append(&mut self, group: &str, events: Vec<TimedEvent>) -> anyhow::Result<(u64, u64)> {
        let rx = self.submit(group, events).await?;
        rx.await.map_err(|_| anyhow!("the producer has stopped"))?
    }
}

async fn open_stream(client: &Client, rotate: &mut usize, window: usize) -> anyhow::Result<Stream> {
    let addr = client.pick_node(rotate);
    let (send, mut recv) = client.network.peer(addr).open().await?;
    let (tx, replies) = mpsc::channel(window + 1);
    let reader = tokio::spawn(async move {
        loop {
            let r = crate::transport::read_frame::<Response>(&mut recv).await;
            let stop = r.is_err();
            if tx.send(r).await.is_err() || stop {
                return;
            }
        }
    });
    Ok(Stream { addr, send, replies, reader, sent: 0, answered_at: Instant::now() })
}

fn fail_all(pending: &mut VecDeque<Submission>, why: &str) {
    for s in pending.drain(..) {
        let _ = s.done.send(Err(anyhow!("{why}")));
    }
}

/// The producer's task: keeps one stream to the leader, sends every pending
/// batch on it in order, and matches replies to batches in order.
async fn pipeline(client: Client, mut input: mpsc::Receiver<Submission>, window: usize) {
    let mut pending: VecDeque<Submission> = VecDeque::new();
    let mut stream: Option<Stream> = None;
    let mut input_open = true;
    let mut progress_at = Instant::now();
    let mut rotate = 0usize;
    let mut last_error = String::from("no node answered");
    let mut broken: Option<String> = None;
    loop {
        if pending.is_empty() {
            progress_at = Instant::now();
            if !input_open {
                return;
            }
        } else if progress_at.elapsed() > client.deadline {
            let why = format!("no progress for {:?}: {last_error}", client.deadline);
            tracing::error!("producer stops: {why}");
            fail_all(&mut pending, &why);
            broken = Some(why);
            stream = None;
        }
        if !pending.is_empty() && stream.is_none() {
            match open_stream(&client, &mut rotate, window).await {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    last_error = format!("{e:#}");
                    *client.leader.lock().expect("leader lock") = None;
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            }
        }
        if let Some(s) = stream.as_mut() {
            while s.sent < pending.len() {
                if s.sent == 0 {
                    // An idle stream: the reply clock starts with this batch.
                    s.answered_at = Instant::now();
                }
                let request = Request::Append { batch: pending[s.sent].batch.clone() };
                if let Err(e) = crate::transport::write_frame(&mut s.send, &request).await {
                    last_error = format!("send to {}: {e}", s.addr);
                    break;
                }
                s.sent += 1;
            }
            if s.sent < pending.len() {
                stream = None;
                *client.leader.lock().expect("leader lock") = None;
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        }
        let waiting_reply = stream.as_ref().is_some_and(|s| s.sent > 0);
        let reply_due = REPLY_TIMEOUT.saturating_sub(stream.as_ref().map_or(Duration::ZERO, |s| s.answered_at.elapsed()));
        tokio::select! {
            sub = input.recv(), if input_open && pending.len() < window => match sub {
                Some(sub) => match &broken {
                    Some(why) => { let _ = sub.done.send(Err(anyhow!("the producer failed earlier: {why}"))); }
                    None => pending.push_back(sub),
                },
                None => input_open = false,
            },
            reply = next_reply(&mut stream), if waiting_reply => {
                let addr = stream.as_ref().map(|s| s.addr);
                match reply {
                    Some(Ok(Response::Appended { lsn_first, lsn_last })) => {
                        let s = pending.pop_front().expect("a reply matches a pending batch");
                        let _ = s.done.send(Ok((lsn_first, lsn_last)));
                        if let Some(st) = stream.as_mut() { st.sent -= 1; st.answered_at = Instant::now(); }
                        *client.leader.lock().expect("leader lock") = addr;
                        progress_at = Instant::now();
                    }
                    Some(Ok(Response::Error(e))) => match e.kind {
                        ErrorKind::Refused => {
                            let s = pending.pop_front().expect("a reply matches a pending batch");
                            let _ = s.done.send(Err(Refused { kind: e.kind, message: e.message }.into()));
                            if let Some(st) = stream.as_mut() { st.sent -= 1; }
                            progress_at = Instant::now();
                        }
                        ErrorKind::BadRequest => {
                            let why = format!("the site refused batch {}: {}", pending[0].batch.seq, e.message);
                            fail_all(&mut pending, &why);
                            broken = Some(why);
                            stream = None;
                        }
                        ErrorKind::NotLeader => {
                            *client.leader.lock().expect("leader lock") = e.leader.as_ref().and_then(|m| m.addr.parse().ok());
                            last_error = e.to_string();
                            stream = None;
                            if e.leader.is_none() { tokio::time::sleep(RETRY_PAUSE).await; }
                        }
                        ErrorKind::Unavailable | ErrorKind::Internal => {
                            last_error = format!("node at {}: {e}", addr.map(|a| a.to_string()).unwrap_or_default());
                            *client.leader.lock().expect("leader lock") = None;
                            stream = None;
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                    },
                    Some(Ok(other)) => {
                        last_error = format!("unexpected reply {other:?}");
                        stream = None;
                    }
                    Some(Err(e)) => {
                        last_error = format!("node at {}: {e}", addr.map(|a| a.to_string()).unwrap_or_default());
                        *client.leader.lock().expect("leader lock") = None;
                        stream = None;
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    None => {
                        stream = None;
                    }
                }
            }
            _ = tokio::time::sleep(reply_due), if waiting_reply => {
                let addr = stream.as_ref().map(|s| s.addr.to_string()).unwrap_or_default();
                last_error = format!("node at {addr} gave no answer for {REPLY_TIMEOUT:?}");
                tracing::warn!("{last_error}; sending the pending batches again");
                *client.leader.lock().expect("leader lock") = None;
                stream = None;
            }
        }
    }
}

async fn next_reply(stream: &mut Option<Stream>) -> Option<Reply> {
    match stream.as_mut() {
        Some(s) => s.replies.recv().await,
        None => std::future::pending().await,
    }
}
