//! Addresses as an operator writes them: `IP:PORT`, `[IPv6]:PORT` or
//! `HOST:PORT`, checked when parsed (a config file, a flag, a member's
//! address in the site's membership). Resolving a name is I/O and lives
//! with the caller (`rewind_node::addr`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// An address to bind or to dial, by IP or by host name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    host: Host,
    port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("address {0:?}: expected IP:PORT, [IPv6]:PORT or HOST:PORT, e.g. 10.0.0.1:7101, [fd00::1]:7101 or node1.example.net:7101")]
    Shape(String),
    #[error("address {addr:?}: {host:?} is not a host name (letters, digits and '-' in dot-separated labels of 1-63, at most 253 in all)")]
    BadHost { addr: String, host: String },
    #[error("address {addr:?}: port {port:?} is not a number from 0 to 65535")]
    BadPort { addr: String, port: String },
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // A last label of digits only is a mistyped IP address, not a name.
        && !s.rsplit('.').next().unwrap_or("").bytes().all(|b| b.is_ascii_digit())
}

impl HostPort {
    pub fn parse(s: &str) -> Result<HostPort, AddrError> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(HostPort::from(a));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| AddrError::Shape(s.to_string()))?;
        let port: u16 = port.parse().map_err(|_| AddrError::BadPort { addr: s.to_string(), port: port.to_string() })?;
        if host.starts_with('[') || host.contains(':') || host.parse::<IpAddr>().is_ok() {
            // A bracketed or bare IPv6 address that did not parse above.
            return Err(AddrError::Shape(s.to_string()));
        }
        if !is_host_name(host) {
            return Err(AddrError::BadHost { addr: s.to_string(), host: host.to_string() });
        }
        Ok(HostPort { host: Host::Name(host.to_ascii_lowercase()), port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The name a server's certificate must carry for this address: the
    /// host name, or the IP address as text.
    pub fn tls_name(&self) -> String {
        match &self.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(n) => n.clone(),
        }
    }

    /// The IP address, if the address is written as one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.host {
            Host::Ip(ip) => Some(ip),
            Host::Name(_) => None,
        }
    }

    /// True for 127.0.0.0/8, ::1 and `localhost`.
    pub fn is_loopback(&self) -> bool {
        match &self.host {
            Host::Ip(ip) => ip.is_loopback(),
            Host::Name(n) => n == "localhost",
        }
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> HostPort {
        HostPort { host: Host::Ip(a.ip()), port: a.port() }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl std::str::FromStr for HostPort {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<HostPort, AddrError> {
        HostPort::parse(s)
    }
}

impl TryFrom<String> for HostPort {
    type Error = AddrError;
    fn try_from(s: String) -> Result<HostPort, AddrError> {
        HostPort::parse(&s)
    }
}

impl From<HostPort> for String {
    fn from(h: HostPort) -> String {
        h.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_operators_write() {
        for (text, shown, name) in [
            ("127.0.0.1:7101", "127.0.0.1:7101", "127.0.0.1"),
            ("[::1]:7101", "[::1]:7101", "::1"),
            ("[fd00::a:1]:80", "[fd00::a:1]:80", "fd00::a:1"),
            ("Node1.Example.net:7101", "node1.example.net:7101", "node1.example.net"),
            ("localhost:0", "localhost:0", "localhost"),
            ("0.0.0.0:7101", "0.0.0.0:7101", "0.0.0.0"),
        ] {
            let h = HostPort::parse(text).unwrap();
            assert_eq!(h.to_string(), shown);
            assert_eq!(h.tls_name(), name);
            assert_eq!(HostPort::parse(&h.to_string()).unwrap(), h);
        }
        assert!(HostPort::parse("localhost:1").unwrap().is_loopback());
        assert!(!HostPort::parse("10.0.0.1:1").unwrap().is_loopback());
    }

    #[test]
    fn refuses_the_rest() {
        for bad in ["", "7101", "host", "host:", "host:99999", "::1:7101", "[::1]", "[::1:7101", "a..b:1", "-a:1", "a_b:1", "a b:1", "1.2.3.4.5:1"] {
            assert!(HostPort::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let e = HostPort::parse("node_1:7101").unwrap_err().to_string();
        assert!(e.contains("not a host name"), "{e}");
    }
}
