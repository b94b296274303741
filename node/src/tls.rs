//! The site's certificates (made with rcgen) and the rustls configurations
//! for QUIC with mutual TLS: every node and client proves itself with a
//! certificate signed by the site's CA. A certificate carries the names and
//! addresses of its host (checked by whoever dials it) and one role
//! (`rewind_service::access`), in its subject's organizational unit, which
//! the node reads from every connection's client certificate.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rewind_service::access::Access;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;

use crate::addr::HostPort;

/// The names a certificate carries when `rewind certs` is given none: the
/// loopback names, for a site on one machine.
pub const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
const ALPN: &[u8] = b"rewind/1";
/// How long a site's CA is valid.
const CA_DAYS: i64 = 3650;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Names the CA's files take: a leaf may not use them.
const RESERVED_NAMES: [&str; 1] = ["ca"];

/// Refuses a certificate name that could write outside its folder, over
/// the CA, or over an existing certificate: 1-64 of [A-Za-z0-9._-], not
/// starting with a dot, not `ca`, and no `NAME.pem` or `NAME.key` in `dir`.
pub fn check_leaf_name(dir: &Path, name: &str) -> anyhow::Result<()> {
    let shape_ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !shape_ok {
        return Err(anyhow!("certificate name {name:?}: use 1-64 of A-Z a-z 0-9 . _ -, not starting with a dot"));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(anyhow!("certificate name {name:?} is the site CA's; pick another name"));
    }
    for ext in ["pem", "key"] {
        let path = dir.join(format!("{name}.{ext}"));
        if std::fs::symlink_metadata(&path).is_ok() {
            return Err(anyhow!("{} exists; a certificate is never overwritten (remove it first to reissue {name:?})", path.display()));
        }
    }
    Ok(())
}

/// Validity from an hour ago (clocks differ a little) to `days` from now.
fn set_validity(params: &mut CertificateParams, days: i64) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::from_unix_timestamp((crate::now_ns() / 1_000_000_000) as i64).context("the clock")?;
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
    Ok(())
}

/// Writes a new CA (`ca.pem`, `ca.key`) into `dir`.
pub fn make_ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    let key = KeyPair::generate().context("generate CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    set_validity(&mut params, CA_DAYS)?;
    params.distinguished_name.push(DnType::CommonName, format!("rewind site CA {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).context("self-sign CA")?;
    write_file(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
    write_file(&dir.join("ca.pem"), &cert.pem(), 0o644)?;
    Ok(())
}

/// What a leaf certificate says of its holder.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Host names and IP addresses the holder is reached at (server side).
    pub names: Vec<String>,
    pub access: Access,
    pub days: i64,
}

impl LeafSpec {
    /// A certificate for a site on one machine: the loopback names.
    pub fn loopback(access: Access, days: i64) -> LeafSpec {
        LeafSpec { names: LOOPBACK_NAMES.iter().map(|s| s.to_string()).collect(), access, days }
    }

    /// Checks the names: each a host name or an IP address.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.names.is_empty() {
            return Err(anyhow!("a certificate needs at least one name (--san)"));
        }
        for n in &self.names {
            if n.parse::<std::net::IpAddr>().is_err() && HostPort::parse(&format!("{n}:1")).is_err() {
                return Err(anyhow!("--san {n:?} is neither a host name nor an IP address"));
            }
        }
        if !(1..=36500).contains(&self.days) {
            return Err(anyhow!("--days {} is not between 1 and 36500", self.days));
        }
        Ok(())
    }
}

/// Writes `<name>.pem` and `<name>.key`, signed by the CA in `dir`, valid as
/// both server and client for `spec`'s names, carrying its role. The name
/// is checked first ([`check_leaf_name`]).
pub fn make_leaf(dir: &Path, name: &str, spec: &LeafSpec) -> anyhow::Result<()> {
    check_leaf_name(dir, name)?;
    spec.check()?;
    let ca_key_pem = std::fs::read_to_string(dir.join("ca.key")).context("read ca.key")?;
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).context("read ca.pem")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parse ca.key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("parse ca.pem")?;
    let key = KeyPair::generate().context("generate key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("certificate parameters")?;
    for n in &spec.names {
        params.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.to_ascii_lowercase().try_into().with_context(|| format!("--san {n:?}"))?),
        });
    }
    set_validity(&mut params, spec.days)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationalUnitName, spec.access.to_text());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).context("sign certificate")?;
    write_file(&dir.join(format!("{name}.key")), &key.serialize_pem(), 0o600)?;
    write_file(&dir.join(format!("{name}.pem")), &cert.pem(), 0o644)?;
    Ok(())
}

/// Writes `text` to `path` with `mode`, atomically: a new temporary file
/// beside it (created exclusively, with the mode from the start), fsync'd,
/// renamed over `path`, and the folder fsync'd. A key is never readable by
/// others, not even for a moment, and never half written.
fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().create_new(true).write(true).mode(mode).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
    .with_context(|| format!("write {}", path.display()))
}

/// The role a certificate carries, from its subject's organizational unit.
pub fn access_of(cert: &CertificateDer<'_>) -> anyhow::Result<Access> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| anyhow!("unreadable certificate: {e}"))?;
    let subject = parsed.subject();
    let mut units = subject.iter_organizational_unit();
    let unit = units.next().ok_or_else(|| anyhow!("certificate {subject} carries no rewind role; reissue it with `rewind certs --role`"))?;
    if units.next().is_some() {
        return Err(anyhow!("certificate {subject} carries more than one role"));
    }
    let text = unit.as_str().map_err(|e| anyhow!("certificate {subject}: role is not text: {e}"))?;
    Access::parse(text).map_err(|e| anyhow!("certificate {subject}: {e}"))
}

/// The role of the certificate in the PEM file at `path`.
pub fn access_of_file(path: &Path) -> anyhow::Result<Access> {
    access_of(&load_certs(path)?[0])
}

/// Refuses to go on unless the certificate at `path` carries `addr`'s
/// host: what peers and clients dial must be what they can verify.
/// `given_as` names where the address came from (`advertise = "..."`).
pub fn check_covers(path: &Path, addr: &HostPort, given_as: &str) -> anyhow::Result<()> {
    let certs = load_certs(path)?;
    let parsed = rustls::server::ParsedCertificate::try_from(&certs[0]).map_err(|e| anyhow!("certificate {}: {e}", path.display()))?;
    let name = ServerName::try_from(addr.tls_name()).map_err(|e| anyhow!("advertise address {addr}: {e}"))?;
    if rustls::client::verify_server_name(&parsed, &name).is_err() {
        let names = names_of(&certs[0]).unwrap_or_default();
        return Err(anyhow!(
            "certificate {} does not cover {:?}, the host clients dial ({given_as}); it names {}. Reissue it with `rewind certs --san {}`, or use one of its names",
            path.display(),
            addr.tls_name(),
            if names.is_empty() { "nothing".to_string() } else { names.join(", ") },
            addr.tls_name()
        ));
    }
    Ok(())
}

/// The DNS names and IP addresses a certificate names.
pub fn names_of(cert: &CertificateDer<'_>) -> anyhow::Result<Vec<String>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| anyhow!("unreadable certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes")).to_string()),
                    16 => names.push(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes")).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(names)
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("read certificate {}", path.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile_certs(&pem);
    let certs = certs.with_context(|| format!("parse certificate {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem).collect()
}

fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_file(path).map_err(|e| anyhow!("read private key {}: {e}", path.display()))
}

fn roots(ca: &Path) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).with_context(|| format!("add CA {}", ca.display()))?;
    }
    Ok(Arc::new(roots))
}

/// Bidirectional streams one QUIC peer may have open at once.
pub const STREAMS_PER_PEER_MAX: u32 = 256;

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // A peer that stops answering (a killed process) is given up on after
    // 3 s, so clients and Raft move to the new leader quickly.
    t.max_idle_timeout(Some(std::time::Duration::from_secs(3).try_into().expect("3 s is a valid idle timeout")));
    t.keep_alive_interval(Some(std::time::Duration::from_millis(500)));
    t.stream_receive_window((32u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    // Streams a peer may have open at once: Raft's calls, the append
    // streams of its producers, a snapshot. Each buffers at most what the
    // windows above let in, and its frame grows as bytes arrive.
    t.max_concurrent_bidi_streams(STREAMS_PER_PEER_MAX.into());
    // BBR paces by the measured bottleneck rate and round trip rather than
    // halving at each loss: on a long link with a little random loss (a
    // WAN between sites, 40 ms and 0.1%) a loss-driven controller holds a
    // connection near MSS/RTT * 1.2/sqrt(loss), about 1.2 MB/s there.
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    Arc::new(t)
}

/// A TLS server presenting `files`' certificate that requires a client
/// certificate from the site's CA: the QUIC endpoint's and NBD-TLS's.
fn server_tls(files: &crate::config::TlsFiles, versions: &[&'static rustls::SupportedProtocolVersion]) -> anyhow::Result<rustls::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .context("client certificate verifier")?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .context("server certificate and key")
}

/// QUIC server side: requires a client certificate from the site's CA.
pub fn server_config(files: &crate::config::TlsFiles) -> anyhow::Result<quinn::ServerConfig> {
    let mut tls = server_tls(files, &[&rustls::version::TLS13])?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("QUIC server TLS")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// QUIC client side: checks the node against the CA and presents our own
/// certificate.
pub fn client_config(files: &crate::config::TlsFiles) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .context("client certificate and key")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC client TLS")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// An NBD-TLS client (a backup's `nbds://` source): trusts `ca`, and
/// presents `cert` and `key` if given (a server may demand a client
/// certificate: a rewind export always does, `qemu-nbd` with
/// `verify-peer=on`).
pub fn nbd_client_tls(ca: &Path, cert_key: Option<(&Path, &Path)>) -> anyhow::Result<tokio_rustls::TlsConnector> {
    // GnuTLS servers (qemu-nbd, nbdkit) may speak TLS 1.2 or 1.3.
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .context("TLS versions")?
        .with_root_certificates(roots(ca)?);
    let config = match cert_key {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?).context("client certificate and key")?,
        None => builder.with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// When an NBD export (a tap, a replay's `--serve`) requires TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdTlsPolicy {
    /// Plaintext on loopback, TLS required on any other address.
    Auto,
    /// TLS required, loopback too (`--tls`).
    Always,
    /// Plaintext on any address (`--insecure-plaintext`): anyone who can
    /// reach the port can read the disk, and a tap's too write it.
    InsecurePlaintext,
}

/// The NBD server's TLS for an export listening on `listen`: its
/// certificate is `files`' (which must carry `listen`'s host, unless it
/// binds every address), and a client must present a certificate from the
/// site's CA.
pub fn nbd_tls(listen: &HostPort, policy: NbdTlsPolicy, files: &crate::config::TlsFiles) -> anyhow::Result<rewind_nbd::server::Tls> {
    let required = match policy {
        NbdTlsPolicy::Auto => !listen.is_loopback(),
        NbdTlsPolicy::Always => true,
        NbdTlsPolicy::InsecurePlaintext => false,
    };
    if !required {
        if !listen.is_loopback() {
            tracing::warn!(%listen, "serving NBD in plaintext on a non-loopback address (--insecure-plaintext): anyone who reaches it reads the disk");
        }
        return Ok(rewind_nbd::server::Tls::Off);
    }
    if listen.ip().is_some_and(|ip| ip.is_unspecified()) {
        let names = names_of(&load_certs(&files.cert)?[0]).unwrap_or_default();
        tracing::info!(%listen, "NBD-TLS on every address: clients must dial one of the certificate's names: {}", names.join(", "));
    } else {
        check_covers(&files.cert, listen, &format!("the NBD export's address {listen}"))
            .context("NBD-TLS is required off loopback, with the client config's [tls] certificate (or give --insecure-plaintext)")?;
    }
    // GnuTLS clients (qemu, libnbd) may offer TLS 1.2 as well as 1.3.
    let tls = server_tls(files, rustls::DEFAULT_VERSIONS)?;
    Ok(rewind_nbd::server::Tls::Required(tokio_rustls::TlsAcceptor::from(Arc::new(tls))))
}
