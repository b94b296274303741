//! The site's certificates (made with rcgen) and the rustls configurations
//! for QUIC with mutual TLS: every node and client proves itself with a
//! certificate signed by the site's CA.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// The name every node's certificate carries and every client checks.
pub const SERVER_NAME: &str = "localhost";
const ALPN: &[u8] = b"rewind/1";

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

/// Writes a new CA (`ca.pem`, `ca.key`) into `dir`.
pub fn make_ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    let key = KeyPair::generate().context("generate CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params.distinguished_name.push(DnType::CommonName, format!("rewind site CA {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).context("self-sign CA")?;
    write_file(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
    write_file(&dir.join("ca.pem"), &cert.pem(), 0o644)?;
    Ok(())
}

/// Writes `<name>.pem` and `<name>.key`, signed by the CA in `dir`, valid as
/// both server and client on loopback. The name is checked first
/// ([`check_leaf_name`]).
pub fn make_leaf(dir: &Path, name: &str) -> anyhow::Result<()> {
    check_leaf_name(dir, name)?;
    let ca_key_pem = std::fs::read_to_string(dir.join("ca.key")).context("read ca.key")?;
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).context("read ca.pem")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parse ca.key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("parse ca.pem")?;
    let key = KeyPair::generate().context("generate key")?;
    let sans = vec![SERVER_NAME.to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let mut params = CertificateParams::new(sans).context("certificate parameters")?;
    params.distinguished_name.push(DnType::CommonName, name);
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
    Arc::new(t)
}

/// QUIC server side: requires a client certificate from the site's CA.
pub fn server_config(files: &crate::config::TlsFiles) -> anyhow::Result<quinn::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .context("client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .context("server certificate and key")?;
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
