//! Serving an NBD export on a listener, one task per
//! connection, until the caller stops selecting on it.

use std::sync::Arc;

use crate::server::{serve, Export};

/// Accepts TCP clients for `export` forever; returns only the error that
/// stopped it.
pub async fn accept_tcp(listener: &tokio::net::TcpListener, export: Arc<dyn Export>) -> std::io::Error {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => return e,
        };
        if let Err(e) = stream.set_nodelay(true) {
            return e;
        }
        let export = export.clone();
        crate::spawn(async move {
            if let Err(e) = serve(export, stream, peer.to_string()).await {
                tracing::warn!(%peer, "NBD connection ended: {e}");
            }
        });
    }
}

/// Accepts Unix-socket clients for `export` forever; returns only the
/// error that stopped it.
pub async fn accept_unix(listener: &tokio::net::UnixListener, export: Arc<dyn Export>) -> std::io::Error {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => return e,
        };
        let export = export.clone();
        crate::spawn(async move {
            if let Err(e) = serve(export, stream, "unix".into()).await {
                tracing::warn!("NBD connection ended: {e}");
            }
        });
    }
}

/// Resolves at SIGTERM or SIGINT.
pub async fn stop_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => Ok(()),
        r = tokio::signal::ctrl_c() => r,
    }
}
