//! The tap's NBD server.

use std::collections::BTreeSet;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use rewind_wire::event::{split_write, Event, TimedEvent};
use rewind_wire::limits::{BATCH_BYTES_MAX, BATCH_EVENTS_MAX};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::nbd::{self, Request};

/// A boxed future, as the sink returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the log did not take a batch.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where the tap's batches go: a consistency group's log.
///
/// Rules: `submit` is called in log order and must keep it (a batch
/// submitted later never commits before one submitted earlier); it returns
/// once the batch is queued, waiting while the sink's window is full (that
/// wait is the back-pressure on the guest); the future it returns resolves
/// once the batch is committed, with its LSN range.
pub trait LogSink: Send + Sync + 'static {
    fn submit(&self, events: Vec<TimedEvent>) -> BoxFuture<'_, Result<BoxFuture<'static, Result<(u64, u64), SinkError>>, SinkError>>;
}

/// The tap's clock: event times in nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A write is answered after its event is committed on the site (RPO 0).
    Sync,
    /// A write is answered once it is durable in the tap's local journal; a
    /// shipper sends the journal to the site behind the guest's back.
    Async,
}

pub struct TapConfig {
    /// The export's name: the disk's name.
    pub export: String,
    /// The disk's size in bytes.
    pub size_bytes: u64,
    pub mode: Mode,
    /// Bytes of events the batcher puts in one batch at most.
    pub batch_bytes_max: usize,
}

/// What the ordered section hands the batcher: events and who waits on them.
struct Queued {
    events: Vec<TimedEvent>,
    bytes: usize,
    ticket: u64,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// Writes that were ordered but are not committed yet, by ticket.
#[derive(Default)]
struct Inflight {
    tickets: BTreeSet<u64>,
    /// The first failure; once set, the tap refuses further writes.
    failed: Option<String>,
}

pub struct Tap {
    config: TapConfig,
    backing: Arc<std::fs::File>,
    clock: Arc<dyn Clock>,
    /// The ordered section: backing-file write and queueing happen under it.
    order: tokio::sync::Mutex<u64>,
    queue: mpsc::Sender<Queued>,
    inflight: Arc<Mutex<Inflight>>,
    settled: Arc<Notify>,
}

/// Queued events the batcher holds at most (back-pressure beyond this).
const QUEUE_DEPTH_MAX: usize = 1024;

impl Tap {
    pub fn new(config: TapConfig, backing: std::fs::File, sink: Arc<dyn LogSink>, clock: Arc<dyn Clock>) -> Arc<Tap> {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH_MAX);
        let inflight: Arc<Mutex<Inflight>> = Arc::default();
        let settled = Arc::new(Notify::new());
        let batch_bytes_max = config.batch_bytes_max.clamp(1, BATCH_BYTES_MAX);
        tokio::spawn(batcher(rx, sink, batch_bytes_max, inflight.clone(), settled.clone()));
        Arc::new(Tap { config, backing: Arc::new(backing), clock, order: tokio::sync::Mutex::new(0), queue, inflight, settled })
    }

    pub fn export(&self) -> &str {
        &self.config.export
    }

    fn transmission_flags(&self) -> u16 {
        nbd::TFLAG_HAS_FLAGS
            | nbd::TFLAG_SEND_FLUSH
            | nbd::TFLAG_SEND_FUA
            | nbd::TFLAG_SEND_TRIM
            | nbd::TFLAG_SEND_WRITE_ZEROES
            | nbd::TFLAG_CAN_MULTI_CONN
    }

    /// The ordered step of a mutation: apply it to the backing file and queue
    /// its events, under one lock. Returns a receiver that fires once the
    /// events are committed.
    async fn order_mutation(
        &self,
        apply: impl FnOnce(&std::fs::File) -> std::io::Result<()> + Send + 'static,
        events: Vec<Event>,
    ) -> Result<oneshot::Receiver<Result<(), String>>, u32> {
        let mut ticket = self.order.lock().await;
        if let Some(why) = &self.inflight.lock().expect("inflight lock").failed {
            tracing::error!("refusing a write: the log failed earlier: {why}");
            return Err(nbd::EIO);
        }
        // The file write runs off the async workers (a 32 MiB write would
        // stall them), still inside the ordered section.
        let backing = self.backing.clone();
        let applied = tokio::task::spawn_blocking(move || apply(&backing))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = applied {
            tracing::error!("backing file write failed: {e}");
            return Err(if e.raw_os_error() == Some(libc::ENOSPC) { nbd::ENOSPC } else { nbd::EIO });
        }
        let time_ns = self.clock.now_ns();
        let timed: Vec<TimedEvent> = events.into_iter().map(|event| TimedEvent { time_ns, event }).collect();
        *ticket += 1;
        let (done, rx) = oneshot::channel();
        self.inflight.lock().expect("inflight lock").tickets.insert(*ticket);
        // Split into pieces the batcher can take whole; the last carries the waiter.
        let mut pieces: Vec<Vec<TimedEvent>> = vec![Vec::new()];
        let mut bytes = 0usize;
        for e in timed {
            let b = e.event.payload_bytes();
            let last = pieces.last_mut().expect("one piece");
            if !last.is_empty() && (bytes + b > self.config.batch_bytes_max || last.len() >= BATCH_EVENTS_MAX) {
                pieces.push(Vec::new());
                bytes = 0;
            }
            bytes += b;
            pieces.last_mut().expect("one piece").push(e);
        }
        let count = pieces.len();
        let mut done = Some(done);
        for (i, events) in pieces.into_iter().enumerate() {
            let bytes = events.iter().map(|e| e.event.payload_bytes()).sum();
            let done = if i + 1 == count { done.take() } else { None };
            // Pieces before the last share the ticket; only the last settles it.
            let queued = Queued { events, bytes, ticket: if i + 1 == count { *ticket } else { 0 }, done };
            if self.queue.send(queued).await.is_err() {
                return Err(nbd::ESHUTDOWN);
            }
        }
        Ok(rx)
    }

    /// Waits until every write ordered before this call is committed.
    async fn barrier(&self) -> Result<(), u32> {
        let upto = *self.order.lock().await;
        loop {
            let notified = self.settled.notified();
            {
                let inflight = self.inflight.lock().expect("inflight lock");
                if inflight.failed.is_some() {
                    return Err(nbd::EIO);
                }
                if inflight.tickets.first().is_none_or(|t| *t > upto) {
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

/// Takes queued events, puts as many as are waiting (up to the byte limit)
/// into one batch, submits it in order, and settles each waiter once its
/// batch is committed.
async fn batcher(mut rx: mpsc::Receiver<Queued>, sink: Arc<dyn LogSink>, bytes_max: usize, inflight: Arc<Mutex<Inflight>>, settled: Arc<Notify>) {
    let mut carry: Option<Queued> = None;
    loop {
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut events = first.events;
        let mut bytes = first.bytes;
        let mut waiters = vec![(first.ticket, first.done)];
        while let Ok(q) = rx.try_recv() {
            if bytes + q.bytes > bytes_max || events.len() + q.events.len() > BATCH_EVENTS_MAX {
                carry = Some(q);
                break;
            }
            bytes += q.bytes;
            events.extend(q.events);
            waiters.push((q.ticket, q.done));
        }
        let settle = {
            let inflight = inflight.clone();
            let settled = settled.clone();
            move |result: Result<(), String>, waiters: Vec<(u64, Option<oneshot::Sender<Result<(), String>>>)>| {
                {
                    let mut i = inflight.lock().expect("inflight lock");
                    if let Err(e) = &result {
                        i.failed.get_or_insert_with(|| e.clone());
                    }
                    for (ticket, _) in &waiters {
                        i.tickets.remove(ticket);
                    }
                }
                for (_, done) in waiters {
                    if let Some(d) = done {
                        let _ = d.send(result.clone());
                    }
                }
                settled.notify_waiters();
            }
        };
        match sink.submit(events).await {
            Ok(committed) => {
                tokio::spawn(async move {
                    let result = committed.await.map(|_| ()).map_err(|e| e.0);
                    settle(result, waiters);
                });
            }
            Err(e) => settle(Err(e.0), waiters),
        }
    }
}

/// Serves one NBD client until it disconnects.
pub async fn serve<S>(tap: Arc<Tap>, stream: S, peer: String) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    wr.write_all(&nbd::greeting()).await?;
    let mut flags = [0u8; 4];
    rd.read_exact(&mut flags).await?;
    let client_flags = nbd::parse_client_flags(flags).map_err(proto_err)?;
    let no_zeroes = client_flags & nbd::FLAG_C_NO_ZEROES != 0;
    let Some(structured) = haggle(&tap, &mut rd, &mut wr, no_zeroes).await? else {
        return Ok(());
    };
    tracing::info!(%peer, export = tap.export(), structured, "NBD client connected");
    transmission(tap, rd, wr, structured, peer).await
}

fn proto_err(e: nbd::ProtocolError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Option haggling. Returns whether structured replies were negotiated, or
/// None if the client aborted.
async fn haggle<R, W>(tap: &Tap, rd: &mut R, wr: &mut W, no_zeroes: bool) -> std::io::Result<Option<bool>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut structured = false;
    // A bounded number of options: a client that haggles forever is cut off.
    for _ in 0..64 {
        let mut head = [0u8; nbd::OPTION_HEADER_BYTES];
        rd.read_exact(&mut head).await?;
        let h = nbd::parse_option_header(&head).map_err(proto_err)?;
        let mut data = vec![0u8; h.len as usize];
        rd.read_exact(&mut data).await?;
        let reply = |kind: u32, d: &[u8]| nbd::option_reply(h.option, kind, d);
        match h.option {
            nbd::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if name != tap.export() && !name.is_empty() {
                    tracing::warn!("client asked for unknown export {name:?}; closing");
                    return Ok(None);
                }
                wr.write_all(&nbd::export_name_reply(tap.config.size_bytes, tap.transmission_flags(), no_zeroes)).await?;
                return Ok(Some(false));
            }
            nbd::OPT_ABORT => {
                wr.write_all(&reply(nbd::REP_ACK, &[])).await?;
                return Ok(None);
            }
            nbd::OPT_LIST => {
                let mut d = (tap.export().len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(tap.export().as_bytes());
                wr.write_all(&reply(nbd::REP_SERVER, &d)).await?;
                wr.write_all(&reply(nbd::REP_ACK, &[])).await?;
            }
            nbd::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    wr.write_all(&reply(nbd::REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")).await?;
                } else {
                    structured = true;
                    wr.write_all(&reply(nbd::REP_ACK, &[])).await?;
                }
            }
            nbd::OPT_INFO | nbd::OPT_GO => {
                let go = match nbd::parse_go(&data) {
                    Ok(g) => g,
                    Err(e) => {
                        wr.write_all(&reply(nbd::REP_ERR_INVALID, e.to_string().as_bytes())).await?;
                        continue;
                    }
                };
                if go.name != tap.export() && !go.name.is_empty() {
                    let msg = format!("no export {:?}; this tap serves {:?}", go.name, tap.export());
                    wr.write_all(&reply(nbd::REP_ERR_UNKNOWN, msg.as_bytes())).await?;
                    continue;
                }
                let mut flags = tap.transmission_flags();
                if structured {
                    flags |= nbd::TFLAG_SEND_DF;
                }
                wr.write_all(&reply(nbd::REP_INFO, &nbd::info_export(tap.config.size_bytes, flags))).await?;
                for item in go.info {
                    let d = match item {
                        nbd::INFO_NAME => nbd::info_name(tap.export()),
                        nbd::INFO_DESCRIPTION => nbd::info_description(match tap.config.mode {
                            Mode::Sync => "rewind CDP tap (sync): a write is answered once the site has committed it",
                            Mode::Async => "rewind CDP tap (async): a write is answered once the tap's journal holds it",
                        }),
                        nbd::INFO_BLOCK_SIZE => nbd::info_block_size(nbd::REQUEST_BYTES_MAX),
                        _ => continue,
                    };
                    wr.write_all(&reply(nbd::REP_INFO, &d)).await?;
                }
                wr.write_all(&reply(nbd::REP_ACK, &[])).await?;
                if h.option == nbd::OPT_GO {
                    return Ok(Some(structured));
                }
            }
            nbd::OPT_STARTTLS => {
                wr.write_all(&reply(nbd::REP_ERR_POLICY, b"TLS is not offered on the tap; it listens on loopback or a unix socket")).await?;
            }
            _ => {
                wr.write_all(&reply(nbd::REP_ERR_UNSUP, &[])).await?;
            }
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "too many options"))
}

type Writer<W> = Arc<tokio::sync::Mutex<W>>;

async fn send_reply<W: AsyncWrite + Unpin>(wr: &Writer<W>, structured: bool, handle: u64, error: u32, message: &str) -> std::io::Result<()> {
    let mut w = wr.lock().await;
    if structured && error != 0 {
        w.write_all(&nbd::structured_error(handle, error, message)).await
    } else if structured {
        w.write_all(&nbd::structured_header(nbd::REPLY_FLAG_DONE, nbd::REPLY_TYPE_NONE, handle, 0)).await
    } else {
        w.write_all(&nbd::simple_reply_header(error, handle)).await
    }
}

async fn send_read<W: AsyncWrite + Unpin>(wr: &Writer<W>, structured: bool, req: &Request, data: &[u8]) -> std::io::Result<()> {
    let mut w = wr.lock().await;
    if structured {
        let head = nbd::structured_header(nbd::REPLY_FLAG_DONE, nbd::REPLY_TYPE_OFFSET_DATA, req.handle, 8 + data.len() as u32);
        w.write_all(&head).await?;
        w.write_all(&req.offset.to_be_bytes()).await?;
    } else {
        w.write_all(&nbd::simple_reply_header(0, req.handle)).await?;
    }
    w.write_all(data).await
}

/// Writes `len` zero bytes at `offset`, releasing the space where it can.
fn zero_range(file: &std::fs::File, offset: u64, len: u64, punch: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mode = if punch { libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE } else { libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE };
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    // Filesystems without fallocate modes: write zeroes in bounded pieces.
    let zeroes = vec![0u8; (len as usize).min(1 << 20)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

async fn transmission<R, W>(tap: Arc<Tap>, mut rd: R, wr: W, structured: bool, peer: String) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let wr: Writer<W> = Arc::new(tokio::sync::Mutex::new(wr));
    let size = tap.config.size_bytes;
    loop {
        let mut head = [0u8; nbd::REQUEST_HEADER_BYTES];
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::info!(%peer, "NBD client went away");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let req = nbd::parse_request(&head).map_err(proto_err)?;
        let in_range = req.offset.checked_add(u64::from(req.len)).is_some_and(|end| end <= size);
        match req.kind {
            nbd::CMD_DISC => {
                tracing::info!(%peer, "NBD client disconnected");
                return Ok(());
            }
            nbd::CMD_WRITE => {
                if req.len > nbd::REQUEST_BYTES_MAX {
                    // The payload cannot be skipped safely: refuse and close.
                    tracing::warn!(%peer, len = req.len, "write larger than the limit; closing the connection");
                    send_reply(&wr, structured, req.handle, nbd::EOVERFLOW, "write larger than 32 MiB").await?;
                    return Ok(());
                }
                let mut data = vec![0u8; req.len as usize];
                rd.read_exact(&mut data).await?;
                if !in_range {
                    tracing::warn!(%peer, offset = req.offset, len = req.len, "write past the end of the disk");
                    send_reply(&wr, structured, req.handle, nbd::ENOSPC, "write past the end of the disk").await?;
                    continue;
                }
                let offset = req.offset;
                let events = split_write(&tap.config.export, offset, &data);
                let ordered = tap.order_mutation(move |f| f.write_all_at(&data, offset), events).await;
                spawn_answer(tap.clone(), wr.clone(), structured, req, ordered);
            }
            nbd::CMD_WRITE_ZEROES | nbd::CMD_TRIM => {
                if !in_range {
                    send_reply(&wr, structured, req.handle, nbd::ENOSPC, "range past the end of the disk").await?;
                    continue;
                }
                let (offset, len) = (req.offset, u64::from(req.len));
                let disk = tap.config.export.clone();
                let (punch, event) = if req.kind == nbd::CMD_TRIM {
                    (true, Event::Trim { disk, offset, len })
                } else {
                    (req.flags & nbd::CMD_FLAG_NO_HOLE == 0, Event::WriteZeroes { disk, offset, len })
                };
                let ordered = tap.order_mutation(move |f| zero_range(f, offset, len, punch), vec![event]).await;
                spawn_answer(tap.clone(), wr.clone(), structured, req, ordered);
            }
            nbd::CMD_READ => {
                if req.len > nbd::REQUEST_BYTES_MAX {
                    send_reply(&wr, structured, req.handle, nbd::EOVERFLOW, "read larger than 32 MiB").await?;
                    continue;
                }
                if !in_range {
                    send_reply(&wr, structured, req.handle, nbd::EINVAL, "read past the end of the disk").await?;
                    continue;
                }
                let backing = tap.backing.clone();
                let wr = wr.clone();
                tokio::spawn(async move {
                    let mut data = vec![0u8; req.len as usize];
                    let read = tokio::task::spawn_blocking(move || backing.read_exact_at(&mut data, req.offset).map(|_| data)).await;
                    let r = match read {
                        Ok(Ok(data)) => send_read(&wr, structured, &req, &data).await,
                        _ => send_reply(&wr, structured, req.handle, nbd::EIO, "backing file read failed").await,
                    };
                    if let Err(e) = r {
                        tracing::debug!("reply not delivered: {e}");
                    }
                });
            }
            nbd::CMD_FLUSH => {
                let tap = tap.clone();
                let wr = wr.clone();
                tokio::spawn(async move {
                    let synced = {
                        let backing = tap.backing.clone();
                        tokio::task::spawn_blocking(move || backing.sync_data()).await
                    };
                    let error = match (synced, tap.barrier().await) {
                        (Ok(Ok(())), Ok(())) => 0,
                        (Ok(Ok(())), Err(e)) => e,
                        _ => nbd::EIO,
                    };
                    let _ = send_reply(&wr, structured, req.handle, error, "flush failed").await;
                });
            }
            other => {
                tracing::warn!(%peer, command = other, "unsupported NBD command");
                send_reply(&wr, structured, req.handle, nbd::EINVAL, "unsupported command").await?;
            }
        }
    }
}

/// Answers a mutation once it is committed (sync mode); FUA adds an
/// fdatasync of the backing file and waits for everything before it.
fn spawn_answer<W: AsyncWrite + Unpin + Send + 'static>(
    tap: Arc<Tap>,
    wr: Writer<W>,
    structured: bool,
    req: Request,
    ordered: Result<oneshot::Receiver<Result<(), String>>, u32>,
) {
    tokio::spawn(async move {
        let error = match ordered {
            Err(e) => e,
            Ok(rx) => match rx.await {
                Ok(Ok(())) => {
                    if req.flags & nbd::CMD_FLAG_FUA != 0 {
                        let backing = tap.backing.clone();
                        let synced = tokio::task::spawn_blocking(move || backing.sync_data()).await;
                        match (synced, tap.barrier().await) {
                            (Ok(Ok(())), Ok(())) => 0,
                            _ => nbd::EIO,
                        }
                    } else {
                        0
                    }
                }
                Ok(Err(why)) => {
                    tracing::error!("write not journaled: {why}");
                    nbd::EIO
                }
                Err(_) => nbd::ESHUTDOWN,
            },
        };
        if let Err(e) = send_reply(&wr, structured, req.handle, error, "write not journaled").await {
            tracing::debug!("reply not delivered: {e}");
        }
    });
}
