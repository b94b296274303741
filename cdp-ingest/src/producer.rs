//! The ordered producer: appends for one producer identity, pipelined and in
//! order, resent after a leader change or a lost connection.
//!
//! The pipeline reaches the site through [`AppendLink`] (QUIC streams in
//! production, implemented by `node`'s client; the simulation's network in
//! `rewind-simulation`) and keeps time and spawns through
//! [`ProducerRuntime`] ([`TokioRuntime`] in production), so the simulation
//! runs this same code.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rewind_wire::event::{seq_epoch, EventBatch, TimedEvent};
use rewind_wire::limits::PRODUCER_WINDOW_MAX;
use rewind_wire::rpc::{ErrorKind, Request, Response};
use tokio::sync::{mpsc, oneshot};

pub use crate::BoxFuture;

/// How long a retry waits after a failed try.
pub const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// An error of the way to the site (a connection, a stream): only shown,
/// never matched, so it keeps whatever type the link had.
pub type LinkError = Box<dyn std::error::Error + Send + Sync>;

/// Why a batch was not appended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProducerError {
    /// The batch breaks a rule of the log (limits, names, ranges); nothing
    /// was sent.
    #[error("check the batch: {0}")]
    Invalid(String),
    /// The producer has used every sequence number of its epoch.
    #[error("producer {client_id:016x} has used every sequence number of its epoch {epoch}; restart it to take the next epoch")]
    EpochUsed { client_id: u64, epoch: u32 },
    /// The site refused this batch for good (an unknown group or disk, a
    /// fenced epoch); later batches go on.
    #[error("{0}")]
    Refused(String),
    /// No progress within the producer's deadline; it gave up, and every
    /// later batch fails too.
    #[error("{0}")]
    GaveUp(String),
    /// The site refused a batch as malformed; every later batch fails too.
    #[error("{0}")]
    Rejected(String),
    /// The producer failed on an earlier batch (the reason given).
    #[error("the producer failed earlier: {0}")]
    FailedEarlier(String),
    /// The producer's task has ended.
    #[error("the producer has stopped")]
    Stopped,
}

/// The answer to one batch: its LSN range once committed.
pub type Appended = Result<(u64, u64), ProducerError>;
/// An append stream whose oldest batch has had no answer for this long is
/// abandoned, and its batches are sent again on a new one.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The way to the site's nodes for append streams.
pub trait AppendLink: Send + Sync + 'static {
    /// Opens an append stream to the leader as far as the link knows it,
    /// or else to the next node in turn (`rotate` counts the turns).
    fn open<'a>(&'a self, rotate: &'a mut usize, window: usize) -> BoxFuture<'a, Result<Box<dyn AppendStream>, LinkError>>;
    /// What the producer learnt of the leader: a node's address (from an
    /// answer, or a NotLeader hint), or None to forget it.
    fn set_leader(&self, addr: Option<&str>);
    /// How long the producer tries without progress before it fails every
    /// pending batch.
    fn deadline(&self) -> Duration;
}

/// One open append stream: requests go out in order, replies come back in
/// the same order.
pub trait AppendStream: Send {
    /// The node at the other end, as [`AppendLink::set_leader`] takes it.
    fn peer(&self) -> String;
    fn send<'a>(&'a mut self, request: &'a Request) -> BoxFuture<'a, Result<(), LinkError>>;
    /// The next reply; None once the stream is closed.
    fn recv(&mut self) -> BoxFuture<'_, Option<Result<Response, LinkError>>>;
}

/// Time and tasks for the producer.
pub trait ProducerRuntime: Send + Sync + 'static {
    /// A monotonic clock.
    fn now(&self) -> Duration;
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()>;
    fn spawn(&self, task: BoxFuture<'static, ()>);
}

/// tokio's clock and tasks.
pub struct TokioRuntime {
    origin: std::time::Instant,
}

impl Default for TokioRuntime {
    #[allow(clippy::disallowed_methods)] // production's clock
    fn default() -> Self {
        TokioRuntime { origin: std::time::Instant::now() }
    }
}

impl ProducerRuntime for TokioRuntime {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(d))
    }

    #[allow(clippy::disallowed_methods)] // the production runtime is where tasks start
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        tokio::spawn(task);
    }
}

/// One batch waiting for its answer.
struct Submission {
    seq: u64,
    /// The request that carries the batch (made once: a resend sends it
    /// again).
    request: Request,
    done: oneshot::Sender<Appended>,
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
    /// Send batches zstd-compressed (`Request::AppendZstd`).
    compress: bool,
    /// Bytes of the requests submitted: payloads, or compressed payloads.
    request_bytes: u64,
}

impl Producer {
    /// A producer over any link and runtime, for identity `client_id`,
    /// whose next batch gets `next_seq`: 1 for a new identity; an async
    /// tap's shipper goes on from the numbers its journal keeps, a sync
    /// tap's process from number 1 of its epoch (see
    /// [`rewind_wire::event::EventBatch`]). `window`: batches in flight at
    /// most (1 to `PRODUCER_WINDOW_MAX`).
    pub fn over(link: Arc<dyn AppendLink>, runtime: Arc<dyn ProducerRuntime>, window: usize, client_id: u64, next_seq: u64) -> Producer {
        let window = window.clamp(1, PRODUCER_WINDOW_MAX);
        let (tx, rx) = mpsc::channel(1);
        runtime.spawn(Box::pin(pipeline(link, runtime.clone(), rx, window)));
        Producer { client_id, next_seq, tx, compress: false, request_bytes: 0 }
    }

    /// Sends each batch from now on compressed with zstd: fewer bytes on
    /// the wire for a little CPU at both ends (a backup over a WAN).
    pub fn set_compress(&mut self, on: bool) {
        self.compress = on;
    }

    /// Bytes of the batches submitted as they go on the wire: their
    /// payload, or their compressed record when compressing.
    pub fn request_bytes(&self) -> u64 {
        self.request_bytes
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
    ) -> Result<oneshot::Receiver<Appended>, ProducerError> {
        let batch = EventBatch { group: group.to_string(), client_id: self.client_id, seq: self.next_seq, events };
        batch.check().map_err(|e| ProducerError::Invalid(e.to_string()))?;
        // A producer in an epoch above 0 is one that restarts under its
        // identity; running into the next epoch would take numbers its next
        // process will use.
        let epoch = seq_epoch(self.next_seq);
        if epoch > 0 && seq_epoch(self.next_seq + 1) != epoch {
            return Err(ProducerError::EpochUsed { client_id: self.client_id, epoch });
        }
        self.next_seq += 1;
        let seq = batch.seq;
        let request = if self.compress {
            let r = rewind_wire::frame::compress_batch(&batch).map_err(ProducerError::Invalid)?;
            if let Request::AppendZstd { data, .. } = &r {
                self.request_bytes += data.len() as u64;
            }
            r
        } else {
            self.request_bytes += batch.payload_bytes() as u64;
            Request::Append { batch }
        };
        let (done, rx) = oneshot::channel();
        self.tx.send(Submission { seq, request, done }).await.map_err(|_| ProducerError::Stopped)?;
        Ok(rx)
    }

    /// Submits one batch and waits for its LSN range.
    pub async fn append(&mut self, group: &str, events: Vec<TimedEvent>) -> Appended {
        let rx = self.submit(group, events).await?;
        rx.await.map_err(|_| ProducerError::Stopped)?
    }
}

/// An open stream and how far it has got.
struct Open {
    stream: Box<dyn AppendStream>,
    /// How many of the pending batches were sent on this stream.
    sent: usize,
    /// When the stream last made progress (opened, or answered a batch).
    answered_at: Duration,
}

fn fail_all(pending: &mut VecDeque<Submission>, why: &ProducerError) {
    for s in pending.drain(..) {
        let _ = s.done.send(Err(why.clone()));
    }
}

/// The producer's task: keeps one stream to the leader, sends every pending
/// batch on it in order, and matches replies to batches in order.
async fn pipeline(link: Arc<dyn AppendLink>, rt: Arc<dyn ProducerRuntime>, mut input: mpsc::Receiver<Submission>, window: usize) {
    let mut pending: VecDeque<Submission> = VecDeque::new();
    let mut open: Option<Open> = None;
    let mut input_open = true;
    let mut progress_at = rt.now();
    let mut rotate = 0usize;
    let mut last_error = String::from("no node answered");
    let mut broken: Option<String> = None;
    let deadline = link.deadline();
    loop {
        if pending.is_empty() {
            progress_at = rt.now();
            if !input_open {
                return;
            }
        } else if rt.now().saturating_sub(progress_at) > deadline {
            let why = ProducerError::GaveUp(format!("no progress for {deadline:?}: {last_error}"));
            tracing::error!("producer stops: {why}");
            fail_all(&mut pending, &why);
            broken = Some(why.to_string());
            open = None;
        }
        if !pending.is_empty() && open.is_none() {
            match link.open(&mut rotate, window).await {
                Ok(stream) => open = Some(Open { stream, sent: 0, answered_at: rt.now() }),
                Err(e) => {
                    last_error = e.to_string();
                    link.set_leader(None);
                    rt.sleep(RETRY_PAUSE).await;
                    continue;
                }
            }
        }
        if let Some(o) = open.as_mut() {
            while o.sent < pending.len() {
                if o.sent == 0 {
                    // An idle stream: the reply clock starts with this batch.
                    o.answered_at = rt.now();
                }
                if let Err(e) = o.stream.send(&pending[o.sent].request).await {
                    last_error = format!("send to {}: {e}", o.stream.peer());
                    break;
                }
                o.sent += 1;
            }
            if o.sent < pending.len() {
                open = None;
                link.set_leader(None);
                rt.sleep(RETRY_PAUSE).await;
                continue;
            }
        }
        let waiting_reply = open.as_ref().is_some_and(|o| o.sent > 0);
        let reply_due = REPLY_TIMEOUT.saturating_sub(open.as_ref().map_or(Duration::ZERO, |o| rt.now().saturating_sub(o.answered_at)));
        // `biased`: the branches are polled in this order, so the producer
        // draws nothing from tokio's generator (the simulation replays it).
        tokio::select! {
            biased;
            reply = next_reply(&mut open), if waiting_reply => {
                let peer = open.as_ref().map(|o| o.stream.peer()).unwrap_or_default();
                match reply {
                    Some(Ok(Response::Appended { lsn_first, lsn_last })) => {
                        let s = pending.pop_front().expect("a reply matches a pending batch");
                        let _ = s.done.send(Ok((lsn_first, lsn_last)));
                        if let Some(o) = open.as_mut() { o.sent -= 1; o.answered_at = rt.now(); }
                        link.set_leader(Some(&peer));
                        progress_at = rt.now();
                    }
                    Some(Ok(Response::Error(e))) => match e.kind {
                        ErrorKind::Refused => {
                            let s = pending.pop_front().expect("a reply matches a pending batch");
                            let _ = s.done.send(Err(ProducerError::Refused(e.message)));
                            if let Some(o) = open.as_mut() { o.sent -= 1; }
                            progress_at = rt.now();
                        }
                        ErrorKind::BadRequest => {
                            let why = ProducerError::Rejected(format!("the site refused batch {}: {}", pending[0].seq, e.message));
                            fail_all(&mut pending, &why);
                            broken = Some(why.to_string());
                            open = None;
                        }
                        ErrorKind::NotLeader => {
                            let hint = e.leader.as_ref().map(|m| m.addr.clone());
                            link.set_leader(hint.as_deref());
                            last_error = e.to_string();
                            open = None;
                            if hint.is_none() { rt.sleep(RETRY_PAUSE).await; }
                        }
                        ErrorKind::Unavailable | ErrorKind::Internal => {
                            last_error = format!("node at {peer}: {e}");
                            link.set_leader(None);
                            open = None;
                            rt.sleep(RETRY_PAUSE).await;
                        }
                    },
                    Some(Ok(other)) => {
                        last_error = format!("unexpected reply {other:?}");
                        open = None;
                    }
                    Some(Err(e)) => {
                        last_error = format!("node at {peer}: {e}");
                        link.set_leader(None);
                        open = None;
                        rt.sleep(RETRY_PAUSE).await;
                    }
                    None => {
                        open = None;
                    }
                }
            }
            sub = input.recv(), if input_open && pending.len() < window => match sub {
                Some(sub) => match &broken {
                    Some(why) => { let _ = sub.done.send(Err(ProducerError::FailedEarlier(why.clone()))); }
                    None => {
                        // The deadline counts from the first batch after an
                        // idle spell, not from before it (a guest may be
                        // idle for hours).
                        if pending.is_empty() { progress_at = rt.now(); }
                        pending.push_back(sub);
                    }
                },
                None => input_open = false,
            },
            _ = rt.sleep(reply_due), if waiting_reply => {
                let peer = open.as_ref().map(|o| o.stream.peer()).unwrap_or_default();
                last_error = format!("node at {peer} gave no answer for {REPLY_TIMEOUT:?}");
                tracing::warn!("{last_error}; sending the pending batches again");
                link.set_leader(None);
                open = None;
            }
        }
    }
}

async fn next_reply(open: &mut Option<Open>) -> Option<Result<Response, LinkError>> {
    match open.as_mut() {
        Some(o) => o.stream.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

    /// A clock the test moves.
    struct Clock(Arc<AtomicU64>);

    impl ProducerRuntime for Clock {
        fn now(&self) -> Duration {
            Duration::from_millis(self.0.load(SeqCst))
        }
        fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
            let clock = self.0.clone();
            Box::pin(async move {
                clock.fetch_add(d.as_millis() as u64, SeqCst);
                tokio::task::yield_now().await;
            })
        }
        #[allow(clippy::disallowed_methods)] // the test's runtime is tokio's
        fn spawn(&self, task: BoxFuture<'static, ()>) {
            tokio::spawn(task);
        }
    }

    /// A site that commits every batch at once.
    struct Site(AtomicU64);

    struct Answering {
        replies: std::collections::VecDeque<Response>,
        next: u64,
    }

    impl AppendStream for Answering {
        fn peer(&self) -> String {
            "n1".into()
        }
        fn send<'a>(&'a mut self, _request: &'a Request) -> BoxFuture<'a, Result<(), LinkError>> {
            self.next += 1;
            self.replies.push_back(Response::Appended { lsn_first: self.next, lsn_last: self.next });
            Box::pin(async { Ok(()) })
        }
        fn recv(&mut self) -> BoxFuture<'_, Option<Result<Response, LinkError>>> {
            let r = self.replies.pop_front();
            Box::pin(async move {
                match r {
                    Some(r) => Some(Ok(r)),
                    None => std::future::pending().await,
                }
            })
        }
    }

    impl AppendLink for Site {
        fn open<'a>(&'a self, _rotate: &'a mut usize, _window: usize) -> BoxFuture<'a, Result<Box<dyn AppendStream>, LinkError>> {
            let next = self.0.load(SeqCst);
            Box::pin(async move { Ok(Box::new(Answering { replies: Default::default(), next }) as Box<dyn AppendStream>) })
        }
        fn set_leader(&self, _addr: Option<&str>) {}
        fn deadline(&self) -> Duration {
            Duration::from_secs(30)
        }
    }

    fn write() -> Vec<TimedEvent> {
        vec![TimedEvent { time_ns: 1, event: rewind_wire::event::Event::Write { disk: "d0".into(), offset: 0, data: vec![1; 512] } }]
    }

    /// A producer idle for longer than its deadline still appends the next
    /// batch: the deadline is for progress while batches wait.
    #[tokio::test]
    async fn an_idle_spell_longer_than_the_deadline_is_not_a_failure() {
        let clock = Arc::new(AtomicU64::new(0));
        let mut p = Producer::over(Arc::new(Site(AtomicU64::new(0))), Arc::new(Clock(clock.clone())), 4, 7, 1);
        assert!(p.append("g", write()).await.is_ok());
        clock.fetch_add(3_600_000, SeqCst);
        let second = p.append("g", write()).await;
        assert!(second.is_ok(), "after an hour idle: {second:?}");
    }
}
