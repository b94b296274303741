//! Append streams over the simulated network, for production's ordered
//! producer (`rewind_cdp_ingest::producer`): the tap's batches reach the site
//! through the same pipelining, resending and leader-following code as in
//! production.
//!
//! A stream is reliable and ordered, like a QUIC stream: a lost frame is
//! sent again 100-300 ms later (five tries), a cut link or a dead node
//! breaks the stream, and frames arrive in the order they were sent, each
//! after the network's delay. The node's end runs production's request
//! service (`rewind_service`): it submits each batch to Raft in the order it
//! arrives, and answers in that order once each is committed and applied.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rewind_cdp_ingest::producer::{AppendLink, AppendStream, LinkError, ProducerRuntime};
use rewind_cdp_ingest::BoxFuture;
use rewind_service::{PendingAppend, ServiceError};
use rewind_wire::rpc::{Request, Response};
use tokio::sync::mpsc;

use crate::model::NODES;
use crate::{rt, service_of, world, SimService, SimTypes};

/// Tries of one frame on a lossy link before the stream breaks.
const FRAME_TRIES: u32 = 5;

/// When a frame sent now from `from` reaches `to`, after `after` (the
/// previous frame's arrival: a stream keeps order), and whether it needed
/// a retransmission (which only a live sender makes); None when the stream
/// breaks (a cut link, or every try lost).
fn frame_arrival(from: u64, to: u64, after: u64) -> Option<(u64, bool)> {
    let mut extra = 0u64;
    for _ in 0..FRAME_TRIES {
        if world::with(|w| w.blocked.contains(&(from, to))) {
            return None;
        }
        match world::with(|w| w.route(from, to)) {
            // Strictly after the previous frame, so two never arrive at once.
            Some((delay, _)) => {
                // A stalled frame is on its way already: it arrives even if
                // its sender dies meanwhile.
                let stall = world::with(|w| {
                    if w.plan.stalled_frames && w.net_rng.chance(0.02) {
                        *w.faults.entry("frame stalled").or_default() += 1;
                        w.net_rng.range(50, 500) * 1_000_000
                    } else {
                        0
                    }
                });
                return Some(((rt::now_ns() + extra + stall + delay.as_nanos() as u64).max(after + 1), extra > 0));
            }
            None => extra += world::with(|w| w.net_rng.range(100, 300)) * 1_000_000,
        }
    }
    None
}

/// The producer's way to the simulated site.
pub struct SimLink {
    /// The client's network address.
    pub from: u64,
    pub leader: Mutex<Option<u64>>,
    pub deadline: Duration,
}

/// A frame on its way up: when it arrives, and, if it needed a
/// retransmission, the sender's liveness (a dead sender resends nothing).
type UpFrame = (u64, Option<std::sync::Weak<()>>, Request);

struct SimStream {
    from: u64,
    to: u64,
    up: mpsc::UnboundedSender<UpFrame>,
    /// Alive while the stream's sender is: its process holds the stream.
    alive: Arc<()>,
    /// When the last frame sent up arrives.
    up_at: u64,
    replies: mpsc::Receiver<Result<Response, LinkError>>,
    broken: bool,
}

impl AppendLink for SimLink {
    fn open<'a>(&'a self, rotate: &'a mut usize, window: usize) -> BoxFuture<'a, Result<Box<dyn AppendStream>, LinkError>> {
        let to = match *self.leader.lock().expect("leader") {
            Some(l) => l,
            None => {
                *rotate += 1;
                NODES[*rotate % NODES.len()]
            }
        };
        let from = self.from;
        // The handshake: one round trip.
        let there = frame_arrival(from, to, 0);
        let back = there.and_then(|(t, _)| frame_arrival(to, from, t)).map(|(t, _)| t);
        Box::pin(async move {
            let Some(back) = back else {
                rt::sleep(Duration::from_secs(1)).await;
                return Err(format!("connect to n{to}: timed out").into());
            };
            rt::Sleep::until_global(back).await;
            if world::with(|w| w.raft(to)).is_none() {
                return Err(format!("connect to n{to}: refused (the node is down)").into());
            }
            let (up, requests) = mpsc::unbounded_channel();
            let (reply_tx, replies) = mpsc::channel(window + 1);
            rt::with_node(Some(to), || rt::spawn_local(serve(to, from, requests, reply_tx)));
            let stream: Box<dyn AppendStream> = Box::new(SimStream { from, to, up, alive: Arc::new(()), up_at: 0, replies, broken: false });
            Ok(stream)
        })
    }

    fn set_leader(&self, addr: Option<&str>) {
        *self.leader.lock().expect("leader") = addr.and_then(|a| a.strip_prefix('n')).and_then(|n| n.parse().ok());
    }

    fn deadline(&self) -> Duration {
        self.deadline
    }
}

impl AppendStream for SimStream {
    fn peer(&self) -> String {
        format!("n{}", self.to)
    }

    fn send<'a>(&'a mut self, request: &'a Request) -> BoxFuture<'a, Result<(), LinkError>> {
        Box::pin(async move {
            match frame_arrival(self.from, self.to, self.up_at) {
                Some((at, resent)) if !self.broken => {
                    self.up_at = at;
                    let sender = resent.then(|| Arc::downgrade(&self.alive));
                    self.up.send((at, sender, request.clone())).map_err(|_| format!("stream to n{} closed", self.to).into())
                }
                _ => {
                    // The node never gets it; the producer learns when no
                    // reply comes.
                    self.broken = true;
                    Ok(())
                }
            }
        })
    }

    fn recv(&mut self) -> BoxFuture<'_, Option<Result<Response, LinkError>>> {
        Box::pin(async move {
            if self.broken {
                // A connection that lost a frame for good times out.
                rt::sleep(Duration::from_secs(1)).await;
                return Some(Err(format!("connection to n{} lost", self.to).into()));
            }
            self.replies.recv().await
        })
    }
}

/// A batch handed to Raft by the node's service, or an answer known at once.
enum Pending {
    Ready(Response),
    Submitted(SimService, PendingAppend<SimTypes>),
}

/// The node's end of one stream, run as the node's task (a crash of the
/// node ends it): submits in arrival order, answers in that order.
async fn serve(node: u64, client: u64, mut requests: mpsc::UnboundedReceiver<UpFrame>, replies: mpsc::Sender<Result<Response, LinkError>>) {
    let (pending_tx, mut pending_rx) = mpsc::channel::<Pending>(rewind_wire::limits::PRODUCER_WINDOW_MAX);
    rt::spawn_local(async move {
        let mut down_at = 0u64;
        while let Some(p) = pending_rx.recv().await {
            let response = match p {
                Pending::Ready(r) => r,
                Pending::Submitted(service, pending) => service.finish_append(pending).await,
            };
            let Some((at, _)) = frame_arrival(node, client, down_at) else {
                return;
            };
            down_at = at;
            let replies = replies.clone();
            // The reply travels while the next one is made; order is kept
            // by the arrival times.
            rt::spawn_local(async move {
                rt::Sleep::until_global(at).await;
                let _ = replies.send(Ok(response)).await;
            });
        }
    });
    while let Some((at, sender, request)) = requests.recv().await {
        rt::Sleep::until_global(at).await;
        if sender.is_some_and(|s| s.upgrade().is_none()) {
            // Its first copy was lost and the sender died before resending:
            // it never arrives, and neither does anything after it.
            return;
        }
        let pending = match (rewind_wire::frame::expand_append(request), world::with(|w| w.raft(node)).map(service_of)) {
            (Err(e), _) => Pending::Ready(ServiceError::BadRequest(e).into()),
            (Ok(Request::Append { batch }), Some(Ok(service))) => {
                let submitted = service.submit_append(batch).await;
                Pending::Submitted(service, submitted)
            }
            (Ok(Request::Append { .. }), _) => Pending::Ready(ServiceError::Unavailable(format!("node {node} is down")).into()),
            (Ok(other), _) => Pending::Ready(ServiceError::BadRequest(format!("an append stream carries only appends, not {}", other.name())).into()),
        };
        if pending_tx.send(pending).await.is_err() {
            return;
        }
    }
}

/// The producer's clock and tasks on the simulated executor.
pub struct SimProducerRuntime;

impl ProducerRuntime for SimProducerRuntime {
    fn now(&self) -> Duration {
        Duration::from_nanos(rt::local_now_ns())
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(rt::sleep(d))
    }

    fn spawn(&self, task: BoxFuture<'static, ()>) {
        rt::spawn_local(task);
    }
}

/// A link from network address `from`, with no leader known yet.
pub fn link(from: u64, deadline: Duration) -> Arc<SimLink> {
    Arc::new(SimLink { from, leader: Mutex::new(None), deadline })
}
