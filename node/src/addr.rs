//! Resolving the addresses `rewind_wire::addr::HostPort` holds: a
//! listener binds the first address a name resolves to; a client looks a
//! name up again at every new connection and checks the server's
//! certificate against the name it dialled.

use std::net::{SocketAddr, ToSocketAddrs};

pub use rewind_wire::addr::{AddrError, HostPort};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot resolve {addr}: {why}")]
pub struct ResolveError {
    pub addr: String,
    pub why: String,
}

/// Name resolution for a [`HostPort`].
pub trait Resolve {
    /// The socket addresses this names, in the resolver's order (blocking:
    /// for binds at start and for tools, not for async tasks).
    fn resolve_blocking(&self) -> Result<Vec<SocketAddr>, ResolveError>;
    /// The first socket address this names (looked up at every call, so a
    /// moved host is found).
    fn resolve(&self) -> impl std::future::Future<Output = Result<SocketAddr, ResolveError>> + Send;
    /// The one address a listener binds: the first the name resolves to.
    fn bind_addr(&self) -> Result<SocketAddr, ResolveError> {
        Ok(self.resolve_blocking()?[0])
    }
}

impl Resolve for HostPort {
    fn resolve_blocking(&self) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Some(ip) = self.ip() {
            return Ok(vec![SocketAddr::new(ip, self.port())]);
        }
        let err = |why: String| ResolveError { addr: self.to_string(), why };
        let found: Vec<SocketAddr> = (self.tls_name().as_str(), self.port()).to_socket_addrs().map_err(|e| err(e.to_string()))?.collect();
        if found.is_empty() {
            return Err(err("the name has no address".into()));
        }
        Ok(found)
    }

    async fn resolve(&self) -> Result<SocketAddr, ResolveError> {
        if let Some(ip) = self.ip() {
            return Ok(SocketAddr::new(ip, self.port()));
        }
        let err = |why: String| ResolveError { addr: self.to_string(), why };
        let mut found = tokio::net::lookup_host((self.tls_name(), self.port())).await.map_err(|e| err(e.to_string()))?;
        found.next().ok_or_else(|| err("the name has no address".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve() {
        let h = HostPort::parse("localhost:7101").unwrap();
        assert_eq!(h.bind_addr().unwrap().port(), 7101);
        assert!(h.bind_addr().unwrap().ip().is_loopback());
        let ip = HostPort::parse("[::1]:9").unwrap();
        assert_eq!(ip.bind_addr().unwrap(), "[::1]:9".parse::<SocketAddr>().unwrap());
    }
}
