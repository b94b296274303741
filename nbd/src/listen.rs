//! Serving an NBD export on a listener, one task per connection, until the
//! caller stops selecting on it.
//!
//! An accept error (a full file table, a connection reset before it was
//! taken) is logged and the loop backs off and goes on: one local process
//! that floods the listener cannot end the tap or the export. Connections
//! beyond `connections_max` are closed as soon as they are accepted, and a
//! connection that has not finished its handshake within
//! [`crate::server::HANDSHAKE_TIMEOUT`] is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::server::{serve, Export, Tls};

/// Connections served at once by default (`--max-connections`).
pub const CONNECTIONS_MAX_DEFAULT: usize = 64;
/// How long the accept loop waits after an accept error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Whether an accept error is worth a warning (resource exhaustion) or just
/// a connection that went away before it was taken.
fn log_accept_error(e: &std::io::Error) {
    // EMFILE and ENFILE: this process's or the system's file table is full.
    match e.raw_os_error() {
        Some(24 | 23) => {
            tracing::warn!("accept: {e}: too many open files; new NBD clients wait until some close");
        }
        _ => tracing::info!("accept: {e}; going on"),
    }
}

/// Accepts TCP clients for `export` forever, at most `connections_max` at
/// once, each in plaintext or made to start TLS first, as `tls` says.
pub async fn accept_tcp(listener: &tokio::net::TcpListener, export: Arc<dyn Export>, connections_max: usize, tls: Tls) -> Infallible {
    let accept = || async {
        let (stream, peer) = listener.accept().await?;
        stream.set_nodelay(true)?;
        Ok((stream, peer.to_string()))
    };
    accept_loop(accept, export, connections_max, tls).await
}

/// Accepts Unix-socket clients for `export` forever, at most
/// `connections_max` at once.
pub async fn accept_unix(listener: &tokio::net::UnixListener, export: Arc<dyn Export>, connections_max: usize) -> Infallible {
    let accept = || async { Ok((listener.accept().await?.0, "unix".to_string())) };
    accept_loop(accept, export, connections_max, Tls::Off).await
}

/// The accept loop of either kind of listener: an error is logged and
/// backed off, a connection past the cap is closed, each other one is
/// served on a task of its own.
async fn accept_loop<S, F, Fut>(mut accept: F, export: Arc<dyn Export>, connections_max: usize, tls: Tls) -> Infallible
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<(S, String)>>,
{
    let slots = Arc::new(Semaphore::new(connections_max.max(1)));
    loop {
        let (stream, peer) = match accept().await {
            Ok(a) => a,
            Err(e) => {
                log_accept_error(&e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, connections_max, "NBD connection refused: the export serves {connections_max} connections at most");
            continue;
        };
        let export = export.clone();
        let tls = tls.clone();
        crate::spawn(async move {
            if let Err(e) = serve(export, stream, peer.clone(), tls).await {
                tracing::warn!(%peer, "NBD connection ended: {e}");
            }
            drop(slot);
        });
    }
}

/// SIGTERM and SIGINT, caught from the moment this is made: make it
/// before telling anyone the export is ready, so a stop that comes at once
/// still cleans up.
pub struct StopSignal {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignal {
    pub fn new() -> std::io::Result<StopSignal> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignal { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Resolves at SIGTERM or SIGINT.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
