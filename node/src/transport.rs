//! Frames over QUIC streams, and a cached connection to one peer. One
//! request and its reply use one bidirectional stream.

use crate::addr::Resolve;
use std::net::SocketAddr;

use crate::addr::HostPort;
use std::time::Duration;

use rewind_wire::frame::{decode_body, decode_header, encode_frame, FrameError, FRAME_HEADER_BYTES};
use rewind_wire::rpc::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach {addr}: {why}")]
    Unreachable { addr: HostPort, why: String },
    #[error("connection to {addr} failed: {why}")]
    Connection { addr: HostPort, why: String },
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("no answer from {addr} within {after:?}")]
    Timeout { addr: HostPort, after: Duration },
    #[error("stream ended before a whole frame arrived")]
    Closed,
    /// The TLS handshake failed: the node refused this client's
    /// certificate, or this client refused the node's. Retrying will not
    /// mend it.
    #[error("TLS refused ({why}): check the cert, key and ca files named in the client config, and that both sides' certificates come from this site's CA")]
    TlsRefused { why: String },
    #[error("connection lost: {0}")]
    Lost(String),
    /// A frame that decoded but whose contents do not (a compressed append
    /// that does not decompress).
    #[error("malformed request: {0}")]
    Malformed(String),
}

/// A connection error as the caller should see it: a TLS alert (QUIC
/// crypto error codes 0x100-0x1ff) is a refusal of a certificate, not a
/// network hiccup.
fn connection_error(e: &quinn::ConnectionError) -> TransportError {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => Some(u64::from(t.code)),
        quinn::ConnectionError::ConnectionClosed(c) => Some(u64::from(c.error_code)),
        _ => None,
    };
    match code {
        Some(c) if (0x100..0x200).contains(&c) => TransportError::TlsRefused { why: e.to_string() },
        _ => TransportError::Lost(e.to_string()),
    }
}

fn read_error(e: quinn::ReadExactError) -> TransportError {
    match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => connection_error(&c),
        _ => TransportError::Closed,
    }
}

fn write_error(e: quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::ConnectionLost(c) => connection_error(&c),
        _ => TransportError::Closed,
    }
}

pub async fn write_frame<T: rewind_wire::Encode>(send: &mut quinn::SendStream, value: &T) -> Result<(), TransportError> {
    let bytes = encode_frame(value)?;
    send.write_all(&bytes).await.map_err(write_error)
}

/// Bytes a frame's body grows by as it arrives: a peer that announces a
/// large frame and sends little of it holds little memory.
const FRAME_READ_PIECE_BYTES: usize = 64 << 10;

/// Reads one frame. The header is checked (magic, version, length limit)
/// before the body is read, so an oversized frame costs nothing, and the
/// body's buffer grows with the bytes that arrive, not with the length the
/// header announces.
pub async fn read_frame<T: rewind_wire::Decode>(recv: &mut quinn::RecvStream) -> Result<T, TransportError> {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    recv.read_exact(&mut head).await.map_err(read_error)?;
    let header = decode_header(&head)?;
    // One allocation, no copies: the capacity costs address space only;
    // pages are touched as pieces are filled.
    let mut body = Vec::with_capacity(header.body_len);
    while body.len() < header.body_len {
        let have = body.len();
        let piece = (header.body_len - have).min(FRAME_READ_PIECE_BYTES);
        body.resize(have + piece, 0);
        recv.read_exact(&mut body[have..]).await.map_err(read_error)?;
    }
    Ok(decode_body(&header, &body)?)
}

/// A peer's address and a cached connection to it.
pub struct Peer {
    endpoint: quinn::Endpoint,
    pub addr: HostPort,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
}

impl Peer {
    pub fn new(endpoint: quinn::Endpoint, addr: HostPort) -> Peer {
        Peer { endpoint, addr, conn: tokio::sync::Mutex::new(None) }
    }

    async fn connection(&self) -> Result<quinn::Connection, TransportError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let unreachable = |why: String| TransportError::Unreachable { addr: self.addr.clone(), why };
        // The name is looked up at every new connection, and the node's
        // certificate must carry the name (or IP address) dialled.
        let socket = self.addr.resolve().await.map_err(|e| unreachable(e.to_string()))?;
        let connecting =
            self.endpoint.connect(socket, &self.addr.tls_name()).map_err(|e| unreachable(e.to_string()))?;
        let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| unreachable("handshake timed out".into()))?
            .map_err(|e| match connection_error(&e) {
                refused @ TransportError::TlsRefused { .. } => refused,
                _ => unreachable(e.to_string()),
            })?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Opens a stream for a request of several frames (a snapshot).
    pub async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        let conn = self.connection().await?;
        conn.open_bi().await.map_err(|e| match connection_error(&e) {
            refused @ TransportError::TlsRefused { .. } => refused,
            _ => TransportError::Connection { addr: self.addr.clone(), why: e.to_string() },
        })
    }

    /// Sends one request and waits at most `timeout` for its reply.
    pub async fn call(&self, request: &Request, timeout: Duration) -> Result<Response, TransportError> {
        let work = async {
            let (mut send, mut recv) = self.open().await?;
            write_frame(&mut send, request).await?;
            let _ = send.finish();
            read_frame::<Response>(&mut recv).await
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout { addr: self.addr.clone(), after: timeout }),
        }
    }
}

/// A client endpoint for `addr`'s address family, on an address the
/// system picks (loopback when the site is on loopback).
pub fn client_endpoint(addr: &HostPort, config: quinn::ClientConfig) -> anyhow::Result<quinn::Endpoint> {
    let target = addr.resolve_blocking().ok().and_then(|a| a.first().copied());
    let v6 = target.is_some_and(|a| a.is_ipv6());
    let loopback = target.is_some_and(|a| a.ip().is_loopback());
    let bind: SocketAddr = match (v6, loopback) {
        (true, true) => "[::1]:0".parse()?,
        (true, false) => "[::]:0".parse()?,
        (false, true) => "127.0.0.1:0".parse()?,
        (false, false) => "0.0.0.0:0".parse()?,
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}
