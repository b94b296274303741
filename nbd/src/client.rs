//! An NBD client, what a backup reads its source with: fixed newstyle
//! handshake, structured replies, `NBD_OPT_SET_META_CONTEXT` (for
//! `base:allocation`, and `qemu:dirty-bitmap:NAME` as `qemu-nbd -B NAME`
//! exposes a bitmap), `NBD_OPT_GO`, then `BLOCK_STATUS` and `READ`.
//!
//! The protocol is pure functions over bytes ([`parse_uri`],
//! [`parse_option_reply_header`], [`parse_chunk_header`], [`parse_chunk`],
//! [`parse_export_info`]): no I/O, no panic on any input, every length
//! checked against a bound before anything is allocated. [`Client`] runs
//! them over a TCP or Unix socket.
//!
//! `nbds://` sources upgrade with `NBD_OPT_STARTTLS` before any other
//! option, through the caller's [`tokio_rustls::TlsConnector`] (which
//! certificates to trust and present is the caller's to say).
//!
//! A read goes out as several requests in flight (`READS_IN_FLIGHT`),
//! their replies matched by cookie in whatever order the server sends them.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::*;

/// `NBD_OPT_SET_META_CONTEXT`, its reply, and the structured reply chunks
/// the server's side does not use.
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const REP_META_CONTEXT: u32 = 4;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
/// `base:allocation` flags: the extent is a hole, reads as zeroes.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1;

/// Largest option reply data the client accepts (a meta context's name is
/// at most 4 KiB; an info reply is a few bytes).
pub const OPTION_REPLY_BYTES_MAX: u32 = 64 << 10;
/// Largest structured reply chunk: a READ of `REQUEST_BYTES_MAX` and its
/// offset, or a block status reply of as many extents.
pub const CHUNK_BYTES_MAX: u32 = REQUEST_BYTES_MAX + 64;
/// READ requests the client has in flight at most, and the bytes each
/// asks for.
pub const READS_IN_FLIGHT: usize = 8;
pub const READ_PIECE_BYTES: u64 = 1 << 20;
/// Meta contexts a client asks for at most.
pub const META_CONTEXTS_MAX: usize = 8;
/// Option replies read per option before the client gives up (a server
/// that sends contexts forever).
pub const OPTION_REPLIES_MAX: usize = 64;
/// Chunks of one reply before the client gives up.
pub const CHUNKS_MAX: usize = 1 << 16;
/// How long the handshake, and any one reply, may take.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

pub const DEFAULT_PORT: u16 = 10809;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD URI {uri:?}: {why}")]
    BadUri { uri: String, why: String },
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("the NBD server refused {what}: {why}")]
    Refused { what: String, why: String },
    #[error("the NBD server answered a request with error {code} ({message})")]
    Request { code: u32, message: String },
    #[error("the NBD server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD-TLS handshake: {0}")]
    Tls(String),
}

fn bad(why: impl Into<String>) -> ClientError {
    ClientError::Protocol(why.into())
}

/// Where an NBD source is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp { host: String, port: u16 },
    Unix { path: std::path::PathBuf },
}

/// An `nbd://`, `nbd+unix://` or `nbds://` URI (the NBD URI standard's
/// forms; `nbds` asks for TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub target: Target,
    pub export: String,
    pub tls: bool,
}

/// Parses an NBD URI: `nbd://HOST[:PORT][/EXPORT]`, `nbds://...`,
/// `nbd+unix:///[EXPORT]?socket=PATH`. IPv6 hosts in brackets.
pub fn parse_uri(uri: &str) -> Result<NbdUri, ClientError> {
    let err = |why: &str| ClientError::BadUri { uri: uri.to_string(), why: why.to_string() };
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| err("expected nbd://, nbds:// or nbd+unix://"))?;
    let (authority, path_query) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_query, None),
    };
    let export = percent_decode(path).ok_or_else(|| err("the export name is not valid percent-encoded UTF-8"))?;
    if export.len() > 4096 {
        return Err(err("the export name is over 4096 bytes"));
    }
    match scheme {
        "nbd" | "nbds" => {
            if query.is_some() {
                return Err(err("a TCP URI takes no query"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, after) = v6.split_once(']').ok_or_else(|| err("an IPv6 host needs its closing ]"))?;
                (h.to_string(), after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            if host.is_empty() {
                return Err(err("no host"));
            }
            let port = match port {
                Some(p) => p.parse::<u16>().map_err(|_| err("the port is not a number from 1 to 65535"))?,
                None => DEFAULT_PORT,
            };
            if port == 0 {
                return Err(err("the port is not a number from 1 to 65535"));
            }
            Ok(NbdUri { target: Target::Tcp { host, port }, export, tls: scheme == "nbds" })
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(err("a Unix socket URI has no host: nbd+unix:///EXPORT?socket=PATH"));
            }
            let socket = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("socket="))).ok_or_else(|| err("no ?socket=PATH"))?;
            let socket = percent_decode(socket).ok_or_else(|| err("the socket path is not valid percent-encoded UTF-8"))?;
            if socket.is_empty() {
                return Err(err("an empty socket path"));
            }
            Ok(NbdUri { target: Target::Unix { path: socket.into() }, export, tls: false })
        }
        "nbds+unix" => Err(err("TLS over a Unix socket (nbds+unix) is not supported")),
        _ => Err(err("expected nbd://, nbds:// or nbd+unix://")),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// An option as the client sends it.
pub fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_BYTES + data.len());
    out.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_OPT_SET_META_CONTEXT`'s data: the export, and the contexts asked for.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// `NBD_OPT_GO`'s data: the export, and no particular information asked.
pub fn go_data(export: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// An option reply's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub kind: u32,
    pub len: u32,
}

pub const OPTION_REPLY_HEADER_BYTES: usize = 20;

pub fn parse_option_reply_header(b: &[u8; OPTION_REPLY_HEADER_BYTES]) -> Result<OptionReplyHeader, ClientError> {
    let magic = u64::from_be_bytes(b[..8].try_into().expect("8"));
    if magic != OPT_REPLY_MAGIC {
        return Err(bad(format!("bad option reply magic {magic:#x}")));
    }
    let h = OptionReplyHeader {
        option: u32::from_be_bytes(b[8..12].try_into().expect("4")),
        kind: u32::from_be_bytes(b[12..16].try_into().expect("4")),
        len: u32::from_be_bytes(b[16..20].try_into().expect("4")),
    };
    if h.len > OPTION_REPLY_BYTES_MAX {
        return Err(bad(format!("an option reply of {} bytes (at most {OPTION_REPLY_BYTES_MAX})", h.len)));
    }
    Ok(h)
}

/// `NBD_REP_META_CONTEXT`'s data: the context's id and name.
pub fn parse_meta_context(data: &[u8]) -> Result<(u32, String), ClientError> {
    if data.len() < 4 {
        return Err(bad("a meta context reply under 4 bytes"));
    }
    let id = u32::from_be_bytes(data[..4].try_into().expect("4"));
    let name = std::str::from_utf8(&data[4..]).map_err(|_| bad("a meta context name that is not UTF-8"))?;
    Ok((id, name.to_string()))
}

/// `NBD_INFO_EXPORT` in an `NBD_REP_INFO`: the export's size and
/// transmission flags; None for another kind of information.
pub fn parse_export_info(data: &[u8]) -> Result<Option<(u64, u16)>, ClientError> {
    if data.len() < 2 {
        return Err(bad("an info reply under 2 bytes"));
    }
    if u16::from_be_bytes(data[..2].try_into().expect("2")) != INFO_EXPORT {
        return Ok(None);
    }
    if data.len() != 12 {
        return Err(bad(format!("NBD_INFO_EXPORT of {} bytes (12 expected)", data.len())));
    }
    Ok(Some((u64::from_be_bytes(data[2..10].try_into().expect("8")), u16::from_be_bytes(data[10..12].try_into().expect("2")))))
}

/// A request as the client sends it.
pub fn request_bytes(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_HEADER_BYTES] {
    let mut out = [0u8; REQUEST_HEADER_BYTES];
    out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..28].copy_from_slice(&len.to_be_bytes());
    out
}

/// A structured reply chunk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

pub const CHUNK_HEADER_BYTES: usize = 20;

pub fn parse_chunk_header(b: &[u8; CHUNK_HEADER_BYTES]) -> Result<ChunkHeader, ClientError> {
    let magic = u32::from_be_bytes(b[..4].try_into().expect("4"));
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(bad(format!("bad structured reply magic {magic:#x}")));
    }
    let h = ChunkHeader {
        flags: u16::from_be_bytes(b[4..6].try_into().expect("2")),
        kind: u16::from_be_bytes(b[6..8].try_into().expect("2")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8")),
        len: u32::from_be_bytes(b[16..20].try_into().expect("4")),
    };
    if h.len > CHUNK_BYTES_MAX {
        return Err(bad(format!("a reply chunk of {} bytes (at most {CHUNK_BYTES_MAX})", h.len)));
    }
    Ok(h)
}

/// One extent of a block status reply: its length and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

/// A structured reply chunk's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    Data { offset: u64, data: Vec<u8> },
    Hole { offset: u64, len: u32 },
    Status { context: u32, extents: Vec<Extent> },
    Error { code: u32, message: String },
}

pub fn parse_chunk(kind: u16, p: &[u8]) -> Result<Chunk, ClientError> {
    let u64_at = |i: usize| p.get(i..i + 8).map(|b| u64::from_be_bytes(b.try_into().expect("8")));
    let u32_at = |i: usize| p.get(i..i + 4).map(|b| u32::from_be_bytes(b.try_into().expect("4")));
    match kind {
        REPLY_TYPE_NONE if p.is_empty() => Ok(Chunk::None),
        REPLY_TYPE_OFFSET_DATA => {
            let offset = u64_at(0).ok_or_else(|| bad("a data chunk under 8 bytes"))?;
            Ok(Chunk::Data { offset, data: p[8..].to_vec() })
        }
        REPLY_TYPE_OFFSET_HOLE if p.len() == 12 => Ok(Chunk::Hole { offset: u64_at(0).expect("12 bytes"), len: u32_at(8).expect("12 bytes") }),
        REPLY_TYPE_BLOCK_STATUS if p.len() >= 4 && (p.len() - 4).is_multiple_of(8) => {
            let extents = p[4..].chunks_exact(8).map(|e| Extent { len: u32::from_be_bytes(e[..4].try_into().expect("4")), flags: u32::from_be_bytes(e[4..].try_into().expect("4")) }).collect();
            Ok(Chunk::Status { context: u32_at(0).expect("4 bytes"), extents })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let code = u32_at(0).ok_or_else(|| bad("an error chunk under 6 bytes"))?;
            let n = p.get(4..6).map(|b| u16::from_be_bytes(b.try_into().expect("2")) as usize).ok_or_else(|| bad("an error chunk under 6 bytes"))?;
            let message = p.get(6..6 + n).ok_or_else(|| bad("an error chunk's message runs past it"))?;
            Ok(Chunk::Error { code, message: String::from_utf8_lossy(message).into_owned() })
        }
        other => Err(bad(format!("a reply chunk of type {other} with {} bytes", p.len()))),
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection to an NBD export, after the handshake.
pub struct Client {
    io: Box<dyn Stream>,
    pub size: u64,
    pub flags: u16,
    /// The meta contexts the server agreed to: (id, name).
    pub contexts: Vec<(u32, String)>,
    cookie: u64,
}

/// One extent of a block status answer, placed on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

async fn timed<T>(f: impl std::future::Future<Output = Result<T, ClientError>>) -> Result<T, ClientError> {
    tokio::time::timeout(CLIENT_TIMEOUT, f).await.map_err(|_| ClientError::Timeout(CLIENT_TIMEOUT))?
}

impl Client {
    /// Connects, haggles (structured replies, the meta contexts asked
    /// for), and opens the export. A context the server does not know is
    /// left out of `contexts`: the caller decides whether that is fatal.
    pub async fn connect(uri: &NbdUri, meta: &[&str], tls: Option<&tokio_rustls::TlsConnector>) -> Result<Client, ClientError> {
        let tls = match (uri.tls, tls) {
            (true, None) => return Err(ClientError::BadUri { uri: format!("{uri:?}"), why: "nbds:// needs TLS settings (a CA to trust)".into() }),
            (true, Some(c)) => {
                let Target::Tcp { host, .. } = &uri.target else { unreachable!("nbds:// is always TCP") };
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
                    .map_err(|e| ClientError::BadUri { uri: format!("{uri:?}"), why: format!("host {host:?} is no TLS server name: {e}") })?;
                Some((c.clone(), name))
            }
            (false, _) => None,
        };
        if meta.len() > META_CONTEXTS_MAX {
            return Err(bad(format!("{} meta contexts asked for; {META_CONTEXTS_MAX} at most", meta.len())));
        }
        let io: Box<dyn Stream> = match &uri.target {
            Target::Tcp { host, port } => {
                let s = timed(async { Ok(tokio::net::TcpStream::connect((host.as_str(), *port)).await?) }).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Target::Unix { path } => Box::new(timed(async { Ok(tokio::net::UnixStream::connect(path).await?) }).await?),
        };
        timed(Client::handshake(io, &uri.export, meta, tls)).await
    }

    async fn handshake(
        mut io: Box<dyn Stream>,
        export: &str,
        meta: &[&str],
        tls: Option<(tokio_rustls::TlsConnector, tokio_rustls::rustls::pki_types::ServerName<'static>)>,
    ) -> Result<Client, ClientError> {
        let mut greeting = [0u8; 18];
        io.read_exact(&mut greeting).await?;
        if u64::from_be_bytes(greeting[..8].try_into().expect("8")) != INIT_PASSWD || u64::from_be_bytes(greeting[8..16].try_into().expect("8")) != OPTS_MAGIC {
            return Err(bad("not an NBD newstyle server (bad greeting)"));
        }
        let flags = u16::from_be_bytes(greeting[16..].try_into().expect("2"));
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("the server does not speak fixed newstyle"));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        io.write_all(&client_flags.to_be_bytes()).await?;
        if let Some((connector, name)) = tls {
            io.write_all(&option_bytes(OPT_STARTTLS, &[])).await?;
            let (h, data) = read_option_reply(&mut io, OPT_STARTTLS).await?;
            if h.kind != REP_ACK {
                return Err(refusal("TLS (STARTTLS)", h.kind, &data));
            }
            let secure = connector.connect(name, io).await.map_err(|e| ClientError::Tls(e.to_string()))?;
            io = Box::new(secure);
        }
        io.write_all(&option_bytes(OPT_STRUCTURED_REPLY, &[])).await?;
        let (h, data) = read_option_reply(&mut io, OPT_STRUCTURED_REPLY).await?;
        if h.kind != REP_ACK {
            return Err(refusal("structured replies", h.kind, &data));
        }
        let mut contexts = Vec::new();
        if !meta.is_empty() {
            io.write_all(&option_bytes(OPT_SET_META_CONTEXT, &meta_context_data(export, meta))).await?;
            for _ in 0..OPTION_REPLIES_MAX {
                let (h, data) = read_option_reply(&mut io, OPT_SET_META_CONTEXT).await?;
                match h.kind {
                    REP_META_CONTEXT => contexts.push(parse_meta_context(&data)?),
                    REP_ACK => break,
                    other => return Err(refusal("the meta contexts", other, &data)),
                }
            }
        }
        io.write_all(&option_bytes(OPT_GO, &go_data(export))).await?;
        let mut export_info = None;
        for _ in 0..OPTION_REPLIES_MAX {
            let (h, data) = read_option_reply(&mut io, OPT_GO).await?;
            match h.kind {
                REP_INFO => {
                    if let Some(i) = parse_export_info(&data)? {
                        export_info = Some(i);
                    }
                }
                REP_ACK => {
                    let (size, flags) = export_info.ok_or_else(|| bad("NBD_OPT_GO ended without the export's size"))?;
                    return Ok(Client { io, size, flags, contexts, cookie: 0 });
                }
                other => return Err(refusal(&format!("export {export:?}"), other, &data)),
            }
        }
        Err(bad(format!("more than {OPTION_REPLIES_MAX} replies to one option")))
    }

    /// The id of a meta context the server agreed to.
    pub fn context(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|(_, n)| n == name).map(|(id, _)| *id)
    }

    async fn send(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> Result<u64, ClientError> {
        self.cookie += 1;
        self.io.write_all(&request_bytes(kind, flags, self.cookie, offset, len)).await?;
        Ok(self.cookie)
    }

    /// The chunks of the reply to `cookie`, each passed to `each`, until
    /// the one marked done. An error chunk ends it with that error.
    async fn chunks(&mut self, cookie: u64, mut each: impl FnMut(Chunk) -> Result<(), ClientError>) -> Result<(), ClientError> {
        for _ in 0..CHUNKS_MAX {
            let mut head = [0u8; CHUNK_HEADER_BYTES];
            self.io.read_exact(&mut head).await?;
            let h = parse_chunk_header(&head)?;
            if h.cookie != cookie {
                return Err(bad(format!("a reply to request {} while {cookie} is the only one sent", h.cookie)));
            }
            let mut payload = vec![0u8; h.len as usize];
            self.io.read_exact(&mut payload).await?;
            match parse_chunk(h.kind, &payload)? {
                Chunk::Error { code, message } => return Err(ClientError::Request { code, message }),
                c => each(c)?,
            }
            if h.flags & REPLY_FLAG_DONE != 0 {
                return Ok(());
            }
        }
        Err(bad(format!("more than {CHUNKS_MAX} chunks in one reply")))
    }

    /// `len` bytes from `offset` (at most `REQUEST_BYTES_MAX`); holes read
    /// as zeroes. Asked for as up to `READS_IN_FLIGHT` requests of at most
    /// `READ_PIECE_BYTES`, all sent before the first reply is read; the
    /// server may answer them in any order, their chunks interleaved.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        if len > REQUEST_BYTES_MAX || offset.checked_add(len as u64).is_none_or(|end| end > self.size) {
            return Err(bad(format!("a read of {len} bytes at {offset} is outside the export ({} bytes) or over {REQUEST_BYTES_MAX}", self.size)));
        }
        let mut out = vec![0u8; len as usize];
        let end = offset + len as u64;
        let mut at = offset;
        while at < end {
            // One round: up to READS_IN_FLIGHT requests, then their replies.
            let mut pending: Vec<(u64, u64, u64, u64)> = Vec::new(); // cookie, from, to, covered
            while at < end && pending.len() < READS_IN_FLIGHT {
                let n = (end - at).min(READ_PIECE_BYTES);
                let cookie = timed(self.send(CMD_READ, 0, at, n as u32)).await?;
                pending.push((cookie, at, at + n, 0));
                at += n;
            }
            let mut open = pending.len();
            let mut chunks = 0usize;
            while open > 0 {
                chunks += 1;
                if chunks > CHUNKS_MAX {
                    return Err(bad(format!("more than {CHUNKS_MAX} chunks in one round of reads")));
                }
                let (h, c) = timed(self.next_chunk()).await?;
                let Some(p) = pending.iter_mut().find(|p| p.0 == h.cookie) else {
                    return Err(bad(format!("a reply to request {}, which is not waiting for one", h.cookie)));
                };
                if p.3 == u64::MAX {
                    return Err(bad(format!("a chunk for request {} after its last", h.cookie)));
                }
                let (from, to) = (p.1, p.2);
                let n = match c {
                    Chunk::Data { offset: o, data } => {
                        let n = data.len() as u64;
                        if o < from || o.saturating_add(n) > to {
                            return Err(bad("a data chunk outside its read"));
                        }
                        out[(o - offset) as usize..(o - offset + n) as usize].copy_from_slice(&data);
                        n
                    }
                    // Holes read as zeroes, which `out` holds already.
                    Chunk::Hole { offset: o, len } => {
                        if o < from || o.saturating_add(len as u64) > to {
                            return Err(bad("a hole chunk outside its read"));
                        }
                        len as u64
                    }
                    Chunk::None => 0,
                    Chunk::Error { code, message } => return Err(ClientError::Request { code, message }),
                    other => return Err(bad(format!("{other:?} in a read's reply"))),
                };
                p.3 += n;
                if h.flags & REPLY_FLAG_DONE != 0 {
                    if p.3 != to - from {
                        return Err(bad(format!("a read of {} bytes answered with {}", to - from, p.3)));
                    }
                    p.3 = u64::MAX;
                    open -= 1;
                }
            }
        }
        Ok(out)
    }

    /// The next reply chunk, whichever request it answers.
    async fn next_chunk(&mut self) -> Result<(ChunkHeader, Chunk), ClientError> {
        let mut head = [0u8; CHUNK_HEADER_BYTES];
        self.io.read_exact(&mut head).await?;
        let h = parse_chunk_header(&head)?;
        let mut payload = vec![0u8; h.len as usize];
        self.io.read_exact(&mut payload).await?;
        let c = parse_chunk(h.kind, &payload)?;
        Ok((h, c))
    }

    /// The extents of `context` from `offset` for up to `len` bytes (the
    /// server may answer fewer; the caller asks again from where they end).
    pub async fn block_status(&mut self, context: u32, offset: u64, len: u32) -> Result<Vec<Placed>, ClientError> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let len = len.min((self.size - offset).min(u32::MAX as u64) as u32);
        let cookie = timed(self.send(CMD_BLOCK_STATUS, 0, offset, len)).await?;
        let mut out = Vec::new();
        let mut at = offset;
        let size = self.size;
        timed(self.chunks(cookie, |c| {
            match c {
                Chunk::Status { context: id, extents } if id == context => {
                    for e in extents {
                        if e.len == 0 || at.saturating_add(e.len as u64) > size {
                            return Err(bad("a block status extent of length 0 or past the export's end"));
                        }
                        out.push(Placed { offset: at, len: e.len as u64, flags: e.flags });
                        at += e.len as u64;
                    }
                }
                // Other contexts' extents are not asked for here.
                Chunk::Status { .. } | Chunk::None => {}
                other => return Err(bad(format!("{other:?} in a block status reply"))),
            }
            Ok(())
        }))
        .await?;
        if out.is_empty() {
            return Err(bad(format!("a block status reply for context {context} with no extent")));
        }
        Ok(out)
    }

    /// Tells the server the client is done, and closes.
    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        self.send(CMD_DISC, 0, 0, 0).await?;
        self.io.shutdown().await?;
        Ok(())
    }
}

async fn read_option_reply(io: &mut Box<dyn Stream>, option: u32) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
    let mut head = [0u8; OPTION_REPLY_HEADER_BYTES];
    io.read_exact(&mut head).await?;
    let h = parse_option_reply_header(&head)?;
    if h.option != option {
        return Err(bad(format!("a reply to option {} while {option} was asked", h.option)));
    }
    let mut data = vec![0u8; h.len as usize];
    io.read_exact(&mut data).await?;
    Ok((h, data))
}

fn refusal(what: &str, kind: u32, data: &[u8]) -> ClientError {
    let why = match kind {
        REP_ERR_UNSUP => "not supported".to_string(),
        REP_ERR_POLICY => "forbidden by policy".to_string(),
        REP_ERR_INVALID => "invalid".to_string(),
        REP_ERR_TLS_REQD => "TLS is required (use nbds://)".to_string(),
        REP_ERR_UNKNOWN => "no such export".to_string(),
        REP_ERR_TOO_BIG => "too big".to_string(),
        other => format!("reply type {other:#x}"),
    };
    let text = String::from_utf8_lossy(data);
    ClientError::Refused { what: what.to_string(), why: if text.is_empty() { why } else { format!("{why}: {text}") } }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Replies to reads in flight come back in any order, a read's data in
    /// several chunks: each lands where its request asked.
    #[tokio::test]
    async fn reads_in_flight_are_matched_by_cookie() {
        let (ours, mut theirs) = tokio::io::duplex(8 << 20);
        let size = 3 * READ_PIECE_BYTES;
        let mut c = Client { io: Box::new(ours), size, flags: 0, contexts: Vec::new(), cookie: 0 };
        let server = async move {
            let mut asked = Vec::new();
            for _ in 0..3 {
                let mut h = [0u8; REQUEST_HEADER_BYTES];
                theirs.read_exact(&mut h).await.unwrap();
                let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
                let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
                let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as u64;
                asked.push((cookie, offset, len));
            }
            // Backwards, each in two chunks: data, then a hole.
            for (cookie, offset, len) in asked.into_iter().rev() {
                let half = len / 2;
                let data: Vec<u8> = (0..half).map(|i| ((offset + i) / 4096) as u8 | 1).collect();
                let mut p = offset.to_be_bytes().to_vec();
                p.extend_from_slice(&data);
                theirs.write_all(&structured_header(0, REPLY_TYPE_OFFSET_DATA, cookie, p.len() as u32)).await.unwrap();
                theirs.write_all(&p).await.unwrap();
                let mut hole = (offset + half).to_be_bytes().to_vec();
                hole.extend_from_slice(&((len - half) as u32).to_be_bytes());
                theirs.write_all(&structured_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, cookie, 12)).await.unwrap();
                theirs.write_all(&hole).await.unwrap();
            }
        };
        let (got, ()) = tokio::join!(c.read(0, size as u32), server);
        let got = got.unwrap();
        for (i, b) in got.iter().enumerate() {
            let (piece, at) = (i as u64 / READ_PIECE_BYTES, i as u64 % READ_PIECE_BYTES);
            let want = if at < READ_PIECE_BYTES / 2 { ((piece * READ_PIECE_BYTES + at) / 4096) as u8 | 1 } else { 0 };
            assert_eq!(*b, want, "byte {i}");
        }
    }

    #[test]
    fn uris_of_every_form_parse_and_bad_ones_say_why() {
        let tcp = |host: &str, port, export: &str, tls| NbdUri { target: Target::Tcp { host: host.into(), port }, export: export.into(), tls };
        assert_eq!(parse_uri("nbd://localhost").unwrap(), tcp("localhost", 10809, "", false));
        assert_eq!(parse_uri("nbd://10.0.0.1:10900/disk%200").unwrap(), tcp("10.0.0.1", 10900, "disk 0", false));
        assert_eq!(parse_uri("nbds://[::1]:7/e").unwrap(), tcp("::1", 7, "e", true));
        let unix = parse_uri("nbd+unix:///exp?socket=/run/q.sock").unwrap();
        assert_eq!(unix, NbdUri { target: Target::Unix { path: "/run/q.sock".into() }, export: "exp".into(), tls: false });
        for (bad, why) in [
            ("http://x", "expected nbd://"),
            ("nbd://", "no host"),
            ("nbd://h:0/e", "port"),
            ("nbd://h:99999/e", "port"),
            ("nbd+unix:///e", "no ?socket"),
            ("nbd+unix://host/e?socket=/s", "has no host"),
            ("nbd://[::1/e", "closing ]"),
            ("nbd://h/%zz", "percent-encoded"),
            ("nbds+unix:///e?socket=/s", "not supported"),
        ] {
            let e = parse_uri(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn chunks_parse_and_malformed_ones_are_refused() {
        let mut status = 7u32.to_be_bytes().to_vec();
        for (len, flags) in [(4096u32, 0u32), (8192, 3)] {
            status.extend_from_slice(&len.to_be_bytes());
            status.extend_from_slice(&flags.to_be_bytes());
        }
        assert_eq!(parse_chunk(REPLY_TYPE_BLOCK_STATUS, &status).unwrap(), Chunk::Status { context: 7, extents: vec![Extent { len: 4096, flags: 0 }, Extent { len: 8192, flags: 3 }] });
        assert!(parse_chunk(REPLY_TYPE_BLOCK_STATUS, &status[..9]).is_err());
        let mut hole = 4096u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_chunk(REPLY_TYPE_OFFSET_HOLE, &hole).unwrap(), Chunk::Hole { offset: 4096, len: 512 });
        let mut err = 5u32.to_be_bytes().to_vec();
        err.extend_from_slice(&3u16.to_be_bytes());
        err.extend_from_slice(b"bad");
        assert_eq!(parse_chunk(REPLY_TYPE_ERROR, &err).unwrap(), Chunk::Error { code: 5, message: "bad".into() });
        assert!(parse_chunk(REPLY_TYPE_ERROR, &err[..7]).is_err());
        assert!(parse_chunk(99, &[]).is_err());
        let mut head = [0u8; CHUNK_HEADER_BYTES];
        head[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        head[16..].copy_from_slice(&(CHUNK_BYTES_MAX + 1).to_be_bytes());
        assert!(parse_chunk_header(&head).unwrap_err().to_string().contains("at most"));
    }

    proptest! {
        /// Any bytes a server sends: a value or a typed error, never a panic.
        #[test]
        fn garbage_replies_never_panic(kind in any::<u16>(), data in proptest::collection::vec(any::<u8>(), 0..64), uri in ".{0,40}") {
            let _ = parse_chunk(kind, &data);
            let _ = parse_export_info(&data);
            let _ = parse_meta_context(&data);
            let _ = parse_uri(&uri);
            if let Ok(h) = data.get(..20).map(|b| <[u8; 20]>::try_from(b).expect("20")).ok_or(()) {
                let _ = parse_chunk_header(&h);
                let _ = parse_option_reply_header(&h);
            }
        }
    }
}
