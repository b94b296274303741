//! The NBD server: handshake, option haggling and transmission for any
//! [`Export`]. The tap is one export; a replay of a past point (read-only,
//! or with a copy-on-write overlay) is another.
//!
//! Rules the server keeps for every export:
//! * every request is bounds-checked before the export sees it, and a bad
//!   one gets the NBD error the protocol defines;
//! * a mutation is *ordered* (the export's future resolves) before the next
//!   request of the connection is read, so an export can keep one order;
//!   its reply is sent when the answer future resolves;
//! * writes to a read-only export are refused with EPERM;
//! * with TLS required ([`Tls`]), nothing but STARTTLS (and ABORT) is
//!   answered before the TLS handshake, and the export's name, size and
//!   data travel only inside TLS.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{self as nbd, Request};
pub use crate::BoxFuture;

/// The reply to a mutation: 0, or the NBD error code.
pub type Answer = BoxFuture<'static, u32>;

/// What an NBD export does; the server does the protocol.
pub trait Export: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    /// One line for NBD_INFO_DESCRIPTION.
    fn description(&self) -> &str;
    fn read_only(&self) -> bool;
    /// `len` bytes from `offset` (in range), or an NBD error code.
    fn read(self: Arc<Self>, offset: u64, len: u32) -> BoxFuture<'static, Result<Vec<u8>, u32>>;
    /// Orders a write; the inner future gives the reply.
    fn write(self: Arc<Self>, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'static, Answer>;
    /// Orders WRITE_ZEROES (`trim` false) or TRIM; `punch` says whether the
    /// space may be released.
    fn zero(self: Arc<Self>, offset: u64, len: u64, trim: bool, punch: bool, fua: bool) -> BoxFuture<'static, Answer>;
    /// Answers once every write ordered before it is durable.
    fn flush(self: Arc<Self>) -> Answer;
    /// The smallest block a request may address: offsets and lengths of
    /// reads, writes, zeroes and trims must be multiples of it (EINVAL
    /// otherwise). Advertised in NBD_INFO_BLOCK_SIZE.
    fn block_min(&self) -> u32 {
        1
    }
}

fn transmission_flags(export: &dyn Export) -> u16 {
    let base = nbd::TFLAG_HAS_FLAGS | nbd::TFLAG_SEND_FLUSH | nbd::TFLAG_SEND_FUA | nbd::TFLAG_CAN_MULTI_CONN;
    if export.read_only() {
        base | nbd::TFLAG_READ_ONLY
    } else {
        base | nbd::TFLAG_SEND_TRIM | nbd::TFLAG_SEND_WRITE_ZEROES
    }
}

/// How long a client has from connecting to the end of option haggling.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Requests one connection may have in flight (read, not yet answered); the
/// server stops reading that connection's requests until one is answered.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;
/// Payload bytes one connection may have in flight: write payloads read and
/// not yet answered, and read replies not yet sent. A client that does not
/// read its replies holds at most this much of the server's memory.
pub const BYTES_IN_FLIGHT_MAX: u32 = 64 << 20;

/// Whether a connection must upgrade to TLS (NBD's STARTTLS) before it
/// sees the export.
#[derive(Clone)]
pub enum Tls {
    /// Plaintext only: a Unix socket, or loopback. STARTTLS is refused.
    Off,
    /// TLS required: the server's certificate and the check of the
    /// client's are in the acceptor's configuration.
    Required(tokio_rustls::TlsAcceptor),
}

/// The end of a handshake.
enum Haggled {
    /// The client aborted or asked for an unknown export.
    Closed,
    /// Transmission, with structured replies or not.
    Go(bool),
    /// The client asked for TLS and was told yes: the TLS handshake comes
    /// next, then haggling again inside it.
    StartTls,
}

/// Serves one NBD client until it disconnects.
pub async fn serve<S>(export: Arc<dyn Export>, mut stream: S, peer: String, tls: Tls) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    enum Ready<S> {
        Closed,
        Plain(S, bool),
        Tls(Box<tokio_rustls::server::TlsStream<S>>, bool),
    }
    let handshake = async {
        stream.write_all(&nbd::greeting()).await?;
        let mut flags = [0u8; 4];
        stream.read_exact(&mut flags).await?;
        let client_flags = nbd::parse_client_flags(flags).map_err(proto_err)?;
        let no_zeroes = client_flags & nbd::FLAG_C_NO_ZEROES != 0;
        let acceptor = match &tls {
            Tls::Off => None,
            Tls::Required(a) => Some(a.clone()),
        };
        match haggle(export.as_ref(), &mut stream, no_zeroes, TlsState::from(acceptor.is_some())).await? {
            Haggled::Closed => Ok::<_, std::io::Error>(Ready::Closed),
            Haggled::Go(structured) => Ok(Ready::Plain(stream, structured)),
            Haggled::StartTls => {
                let acceptor = acceptor.expect("STARTTLS is accepted only when TLS is on");
                let mut secure = acceptor.accept(stream).await.map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("TLS handshake: {e}")))?;
                match haggle(export.as_ref(), &mut secure, no_zeroes, TlsState::Active).await? {
                    Haggled::Go(structured) => Ok(Ready::Tls(Box::new(secure), structured)),
                    _ => Ok(Ready::Closed),
                }
            }
        }
    };
    let ready = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(r) => r?,
        Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no handshake within {HANDSHAKE_TIMEOUT:?}"))),
    };
    match ready {
        Ready::Closed => Ok(()),
        Ready::Plain(stream, structured) => {
            tracing::info!(%peer, export = export.name(), structured, "NBD client connected");
            let (rd, wr) = tokio::io::split(stream);
            transmission(export, rd, wr, structured, peer).await
        }
        Ready::Tls(stream, structured) => {
            tracing::info!(%peer, export = export.name(), structured, "NBD client connected over TLS");
            let (rd, wr) = tokio::io::split(*stream);
            transmission(export, rd, wr, structured, peer).await
        }
    }
}

/// Where a connection stands with TLS while it haggles.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TlsState {
    /// Not offered: STARTTLS is refused by policy.
    Off,
    /// Required and not yet started: only STARTTLS and ABORT are served.
    Required,
    /// Inside TLS.
    Active,
}

impl From<bool> for TlsState {
    fn from(required: bool) -> TlsState {
        if required {
            TlsState::Required
        } else {
            TlsState::Off
        }
    }
}

fn proto_err(e: nbd::ProtocolError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Option haggling, on the plain stream or inside TLS.
async fn haggle<S>(export: &dyn Export, io: &mut S, no_zeroes: bool, tls: TlsState) -> std::io::Result<Haggled>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (rd, wr) = (&mut rd, &mut wr);
    let mut structured = false;
    // A bounded number of options: a client that haggles forever is cut off.
    for _ in 0..64 {
        // The replies to the last option leave before the next is read:
        // inside TLS they wait in the session's buffer until flushed.
        wr.flush().await?;
        let mut head = [0u8; nbd::OPTION_HEADER_BYTES];
        rd.read_exact(&mut head).await?;
        let h = nbd::parse_option_header(&head).map_err(proto_err)?;
        let mut data = vec![0u8; h.len as usize];
        rd.read_exact(&mut data).await?;
        let reply = |kind: u32, d: &[u8]| nbd::option_reply(h.option, kind, d);
        if tls == TlsState::Required && h.option != nbd::OPT_STARTTLS && h.option != nbd::OPT_ABORT {
            if h.option == nbd::OPT_EXPORT_NAME {
                // This option has no error reply: the connection is closed.
                tracing::warn!("a client asked for the export without TLS, which this export requires; closing");
                return Ok(Haggled::Closed);
            }
            wr.write_all(&reply(nbd::REP_ERR_TLS_REQD, b"this export requires TLS: start it with NBD_OPT_STARTTLS")).await?;
            continue;
        }
        match h.option {
            nbd::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if name != export.name() && !name.is_empty() {
                    tracing::warn!("client asked for unknown export {name:?}; closing");
                    return Ok(Haggled::Closed);
                }
                wr.write_all(&nbd::export_name_reply(export.size(), transmission_flags(export), no_zeroes)).await?;
                wr.flush().await?;
                return Ok(Haggled::Go(false));
            }
            nbd::OPT_ABORT => {
                wr.write_all(&reply(nbd::REP_ACK, &[])).await?;
                wr.flush().await?;
                return Ok(Haggled::Closed);
            }
            nbd::OPT_LIST => {
                let mut d = (export.name().len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(export.name().as_bytes());
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
                if go.name != export.name() && !go.name.is_empty() {
                    let msg = format!("no export {:?}; this server serves {:?}", go.name, export.name());
                    wr.write_all(&reply(nbd::REP_ERR_UNKNOWN, msg.as_bytes())).await?;
                    continue;
                }
                let mut flags = transmission_flags(export);
                if structured {
                    flags |= nbd::TFLAG_SEND_DF;
                }
                wr.write_all(&reply(nbd::REP_INFO, &nbd::info_export(export.size(), flags))).await?;
                for item in go.info {
                    let d = match item {
                        nbd::INFO_NAME => nbd::info_name(export.name()),
                        nbd::INFO_DESCRIPTION => nbd::info_description(export.description()),
                        nbd::INFO_BLOCK_SIZE => nbd::info_block_size(export.block_min(), nbd::REQUEST_BYTES_MAX),
                        _ => continue,
                    };
                    wr.write_all(&reply(nbd::REP_INFO, &d)).await?;
                }
                wr.write_all(&reply(nbd::REP_ACK, &[])).await?;
                if h.option == nbd::OPT_GO {
                    wr.flush().await?;
                    return Ok(Haggled::Go(structured));
                }
            }
            nbd::OPT_STARTTLS => match tls {
                TlsState::Off => {
                    wr.write_all(&reply(nbd::REP_ERR_POLICY, b"TLS is not offered; the server listens on loopback or a unix socket")).await?;
                }
                TlsState::Active => {
                    wr.write_all(&reply(nbd::REP_ERR_INVALID, b"TLS is already on")).await?;
                }
                TlsState::Required if !data.is_empty() => {
                    wr.write_all(&reply(nbd::REP_ERR_INVALID, b"STARTTLS takes no data")).await?;
                }
                TlsState::Required => {
                    wr.write_all(&reply(nbd::REP_ACK, &[])).await?;
                    wr.flush().await?;
                    return Ok(Haggled::StartTls);
                }
            },
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
        w.write_all(&nbd::structured_error(handle, error, message)).await?;
    } else if structured {
        w.write_all(&nbd::structured_header(nbd::REPLY_FLAG_DONE, nbd::REPLY_TYPE_NONE, handle, 0)).await?;
    } else {
        w.write_all(&nbd::simple_reply_header(error, handle)).await?;
    }
    // Inside TLS a reply waits in the session's buffer until flushed; on
    // a plain socket this costs nothing.
    w.flush().await
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
    w.write_all(data).await?;
    w.flush().await
}

/// A request's share of its connection's bounds, held until its reply is
/// sent.
struct InFlight {
    _request: tokio::sync::OwnedSemaphorePermit,
    _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// One connection's bounds on requests and bytes in flight.
struct Bounds {
    requests: Arc<tokio::sync::Semaphore>,
    bytes: Arc<tokio::sync::Semaphore>,
}

impl Bounds {
    fn new() -> Bounds {
        Bounds { requests: Arc::new(tokio::sync::Semaphore::new(REQUESTS_IN_FLIGHT_MAX)), bytes: Arc::new(tokio::sync::Semaphore::new(BYTES_IN_FLIGHT_MAX as usize)) }
    }

    /// Waits for room for one more request of `bytes` payload bytes (at
    /// most `REQUEST_BYTES_MAX`, which is below the byte bound).
    async fn admit(&self, bytes: u32) -> InFlight {
        let request = self.requests.clone().acquire_owned().await.expect("never closed");
        let bytes = match bytes {
            0 => None,
            n => Some(self.bytes.clone().acquire_many_owned(n).await.expect("never closed")),
        };
        InFlight { _request: request, _bytes: bytes }
    }
}

/// Sends a mutation's reply once its answer resolves.
fn spawn_reply<W: AsyncWrite + Unpin + Send + 'static>(wr: Writer<W>, structured: bool, handle: u64, answer: Answer, what: &'static str, held: InFlight) {
    crate::spawn(async move {
        let error = answer.await;
        if let Err(e) = send_reply(&wr, structured, handle, error, what).await {
            tracing::debug!("reply not delivered: {e}");
        }
        drop(held);
    });
}

async fn transmission<R, W>(export: Arc<dyn Export>, mut rd: R, wr: W, structured: bool, peer: String) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let wr: Writer<W> = Arc::new(tokio::sync::Mutex::new(wr));
    let size = export.size();
    let block_min = u64::from(export.block_min().max(1));
    let bounds = Bounds::new();
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
        let aligned = req.offset.is_multiple_of(block_min) && u64::from(req.len).is_multiple_of(block_min);
        let fua = req.flags & nbd::CMD_FLAG_FUA != 0;
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
                let held = bounds.admit(req.len).await;
                let mut data = vec![0u8; req.len as usize];
                rd.read_exact(&mut data).await?;
                if export.read_only() {
                    send_reply(&wr, structured, req.handle, nbd::EPERM, "the export is read-only").await?;
                    continue;
                }
                if !in_range {
                    tracing::warn!(%peer, offset = req.offset, len = req.len, "write past the end of the disk");
                    send_reply(&wr, structured, req.handle, nbd::ENOSPC, "write past the end of the disk").await?;
                    continue;
                }
                if !aligned {
                    tracing::warn!(%peer, offset = req.offset, len = req.len, block_min, "write not aligned to the disk's block");
                    send_reply(&wr, structured, req.handle, nbd::EINVAL, "write not aligned to the disk's sector size").await?;
                    continue;
                }
                let answer = export.clone().write(req.offset, data, fua).await;
                spawn_reply(wr.clone(), structured, req.handle, answer, "write failed", held);
            }
            nbd::CMD_WRITE_ZEROES | nbd::CMD_TRIM => {
                if export.read_only() {
                    send_reply(&wr, structured, req.handle, nbd::EPERM, "the export is read-only").await?;
                    continue;
                }
                if !in_range {
                    send_reply(&wr, structured, req.handle, nbd::ENOSPC, "range past the end of the disk").await?;
                    continue;
                }
                if !aligned {
                    send_reply(&wr, structured, req.handle, nbd::EINVAL, "range not aligned to the disk's sector size").await?;
                    continue;
                }
                let trim = req.kind == nbd::CMD_TRIM;
                let punch = trim || req.flags & nbd::CMD_FLAG_NO_HOLE == 0;
                let held = bounds.admit(0).await;
                let answer = export.clone().zero(req.offset, u64::from(req.len), trim, punch, fua).await;
                spawn_reply(wr.clone(), structured, req.handle, answer, "zeroing failed", held);
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
                if !aligned {
                    send_reply(&wr, structured, req.handle, nbd::EINVAL, "read not aligned to the disk's sector size").await?;
                    continue;
                }
                // Room first: a client that does not read its replies stops
                // being read here, holding at most the bounds.
                let held = bounds.admit(req.len).await;
                let wr = wr.clone();
                let read = export.clone().read(req.offset, req.len);
                crate::spawn(async move {
                    let r = match read.await {
                        Ok(data) => send_read(&wr, structured, &req, &data).await,
                        Err(code) => send_reply(&wr, structured, req.handle, code, "read failed").await,
                    };
                    if let Err(e) = r {
                        tracing::debug!("reply not delivered: {e}");
                    }
                    drop(held);
                });
            }
            nbd::CMD_FLUSH => {
                let held = bounds.admit(0).await;
                spawn_reply(wr.clone(), structured, req.handle, export.clone().flush(), "flush failed", held);
            }
            other => {
                tracing::warn!(%peer, command = other, "unsupported NBD command");
                send_reply(&wr, structured, req.handle, nbd::EINVAL, "unsupported command").await?;
            }
        }
    }
}
