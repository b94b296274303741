//! Roles, names and NBD-TLS on a real local site: every certificate `dev
//! up` makes is held to its role's requests, a certificate past its
//! validity is refused at the handshake, a node whose certificate does not
//! name its advertised host will not start, and real NBD clients (qemu-io,
//! qemu-img, nbdinfo, nbdcopy) reach a tap and a replay through NBD's
//! STARTTLS with a certificate from the site's CA, while a plaintext
//! client is refused.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{compare, rewind, run, spawn_serving, Site, REWIND};
use rewind_node::client::Client;
use rewind_node::config::{ClientConfig, TlsFiles};
use rewind_node::transport::{Peer, TransportError};
use rewind_wire::raft::{LeaderId, Vote, VoteRequest};
use rewind_wire::rpc::{ErrorKind, Request, Response};

fn client_for(site: &Site, config: &str) -> (Client, ClientConfig) {
    let c = ClientConfig::load(&site.path().join(config)).expect("client config");
    (Client::new(&c).expect("client"), c)
}

fn denied(r: Response) -> String {
    match r {
        Response::Error(e) if e.kind == ErrorKind::Refused => e.message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn vote() -> Request {
    Request::RaftVote { shard: 1, req: VoteRequest { vote: Vote { leader: LeaderId { term: 999, node: 7 }, committed: false }, last_log_id: None, leadership_transfer: false }, pre_vote: false }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_is_held_to_its_requests() {
    let site = Site::up(&["--tap-groups", "a"]);
    site.client.create_group("a", vec![rewind_wire::rpc::DiskSpec { name: "d".into(), size_bytes: 1 << 20, sector_bytes: 512 }]).await.unwrap();
    site.client.create_group("b", vec![rewind_wire::rpc::DiskSpec { name: "d".into(), size_bytes: 1 << 20, sector_bytes: 512 }]).await.unwrap();
    let leader = site.leader().await;
    let leader_addr = site.site().nodes.iter().find(|n| n.id == leader.id).unwrap().addr.clone();
    let term_before = leader.shards[0].term;

    // A tap certificate sending a Raft vote.
    let (tap, _) = client_for(&site, "tap.toml");
    let e = denied(tap.call_node(&leader_addr, &vote()).await.unwrap());
    assert_eq!(e, "permission denied: role tap cannot do raft-vote");
    // ... and appending to a group its certificate does not name, through
    // the real CLI's producer.
    let mut producer = rewind_node::client::producer(tap.clone(), 4);
    let write = rewind_wire::event::TimedEvent { time_ns: 1, event: rewind_wire::event::Event::Write { disk: "d".into(), offset: 0, data: vec![1; 512] } };
    let e = producer.append("b", vec![write.clone()]).await.unwrap_err().to_string();
    assert!(e.contains("permission denied: role tap cannot do append on group \"b\" (its certificate names the groups a)"), "{e}");
    let mut producer = rewind_node::client::producer(tap.clone(), 4);
    producer.append("a", vec![write]).await.expect("a tap appends to its own group");
    // The CLI says so too.
    let tap_config = site.path().join("tap.toml");
    let out = rewind(&["load", "--group", "b", "--disk", "d", "--events", "3", "--config", tap_config.to_str().unwrap()]);
    assert!(!out.status.success(), "a tap for group a loaded group b");
    assert!(stderr(&out).contains("permission denied: role tap cannot do group-state on group \"b\""), "{}", stderr(&out));
    // Its own group it may write.
    let out = rewind(&["load", "--group", "a", "--disk", "d", "--events", "3", "--config", tap_config.to_str().unwrap()]);
    assert!(out.status.success(), "a tap writing its own group: {}", stderr(&out));
    // Not membership, not group management, not reads.
    let e = denied(tap.call_node(&leader_addr, &Request::ChangeVoters { voters: vec![1] }).await.unwrap());
    assert_eq!(e, "permission denied: role tap cannot do change-voters");

    // A reader reads and resolves, and does nothing else.
    let reader_config = site.path().join("reader.toml");
    let out = rewind(&["points", "a", "--config", reader_config.to_str().unwrap()]);
    assert!(out.status.success(), "a reader's points: {}", stderr(&out));
    let out = rewind(&["group", "create", "c", "--disk", "d:1M", "--config", reader_config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("permission denied: role reader cannot do create-group"), "{}", stderr(&out));
    let out = rewind(&["bookmark", "a", "x", "--config", reader_config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("permission denied: role reader cannot do append"), "{}", stderr(&out));
    let (reader, _) = client_for(&site, "reader.toml");
    assert!(denied(reader.call_node(&leader_addr, &vote()).await.unwrap()).contains("role reader cannot do raft-vote"));

    // A node certificate speaks Raft, and is no client.
    let node_tls = TlsFiles {
        ca: site.path().join("certs/ca.pem"),
        cert: site.path().join("certs/node-2.pem"),
        key: site.path().join("certs/node-2.key"),
    };
    let (_, mut as_node) = client_for(&site, "client.toml");
    as_node.tls = node_tls;
    let as_node = Client::new(&as_node).unwrap();
    let e = denied(as_node.call_node(&leader_addr, &Request::CreateGroup { group: "n".into(), disks: vec![], time_ns: 1 }).await.unwrap());
    assert_eq!(e, "permission denied: role node cannot do create-group");
    assert!(denied(as_node.call_node(&leader_addr, &Request::ReadDisk { group: "a".into(), disk: "d".into(), lsn: 1, offset: 0, len: 512 }).await.unwrap()).contains("role node cannot do read-disk"));

    // The admin may not speak Raft either.
    assert!(denied(site.client.call_node(&leader_addr, &vote()).await.unwrap()).contains("role admin cannot do raft-vote"));

    // None of the refused votes moved the term.
    let after = site.leader().await;
    assert_eq!(after.shards[0].term, term_before, "a refused vote changed the term");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_misnamed_certificates_are_refused() {
    let site = Site::up(&["--nodes", "1"]);
    let node = site.site().nodes[0].clone();
    let certs = site.path().join("certs");

    // A certificate from the site's own CA, past its validity.
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(certs.join("ca.pem")).unwrap(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "old-admin");
    params.distinguished_name.push(rcgen::DnType::OrganizationalUnitName, "role=admin");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(certs.join("old.pem"), cert.pem()).unwrap();
    std::fs::write(certs.join("old.key"), key.serialize_pem()).unwrap();
    let tls = TlsFiles { ca: certs.join("ca.pem"), cert: certs.join("old.pem"), key: certs.join("old.key") };
    let endpoint = rewind_node::transport::client_endpoint(&node.addr, rewind_node::tls::client_config(&tls).unwrap()).unwrap();
    let r = Peer::new(endpoint, node.addr.clone()).call(&Request::Status, Duration::from_secs(5)).await;
    assert!(matches!(r, Err(TransportError::TlsRefused { .. })), "an expired certificate: {r:?}");

    // A client that dials a name the node's certificate does not carry
    // refuses the node: the name is checked, not a fixed `localhost`. A
    // node listening on 127.0.0.2 (loopback, but not in the dev
    // certificates) is refused by a client that dials it there.
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let lone = site.path().join("lone");
    std::fs::create_dir_all(&lone).unwrap();
    std::fs::write(
        lone.join("node.toml"),
        format!(
            "id = 5\nlisten = \"127.0.0.2:{port}\"\nadvertise = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/node-1.pem\"\nkey = \"{0}/node-1.key\"\n",
            certs.display()
        ),
    )
    .unwrap();
    let mut lone_node = Command::new(REWIND).args(["node", "--config", lone.join("node.toml").to_str().unwrap()]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let (_, config) = client_for(&site, "client.toml");
    let dialled: rewind_node::addr::HostPort = format!("127.0.0.2:{port}").parse().unwrap();
    let endpoint = rewind_node::transport::client_endpoint(&dialled, rewind_node::tls::client_config(&config.tls).unwrap()).unwrap();
    let peer = Peer::new(endpoint, dialled);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = peer.call(&Request::Status, Duration::from_secs(2)).await;
        if !matches!(r, Err(TransportError::Timeout { .. }) | Err(TransportError::Unreachable { .. })) || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = lone_node.kill();
    let _ = lone_node.wait();
    match &r {
        Err(TransportError::TlsRefused { why }) => assert!(why.contains("certificate") || why.contains("Name"), "{why}"),
        other => panic!("a node dialled by an address its certificate lacks: {other:?}"),
    }

    // A node whose certificate does not name its advertised host refuses
    // to start, and says which name is missing.
    let dir = site.path().join("misnamed");
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("node.toml");
    std::fs::write(
        &config_path,
        format!(
            "id = 9\nlisten = \"127.0.0.1:0\"\nadvertise = \"node9.example.net:7101\"\ndata_dir = \"data\"\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/node-1.pem\"\nkey = \"{0}/node-1.key\"\n",
            certs.display()
        ),
    )
    .unwrap();
    let out = rewind(&["node", "--config", config_path.to_str().unwrap()]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("does not cover \"node9.example.net\""), "{e}");
    assert!(!dir.join("data").exists(), "the node made its data folder before refusing");

    // `rewind certs` puts the given names and the role in the certificate.
    let pki = site.path().join("pki");
    let out = rewind(&["certs", "--dir", pki.to_str().unwrap(), "--name", "n1", "--role", "node", "--san", "node1.example.net", "--san", "10.0.0.1", "--san", "fd00::1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pem = std::fs::read(pki.join("n1.pem")).unwrap();
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    assert_eq!(rewind_node::tls::names_of(&der).unwrap(), vec!["node1.example.net", "10.0.0.1", "fd00::1"]);
    assert_eq!(rewind_node::tls::access_of(&der).unwrap(), rewind_service::access::Access::Node);
    let out = rewind(&["certs", "--dir", pki.to_str().unwrap(), "--name", "t1", "--role", "tap"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("must name at least one group"), "{}", stderr(&out));
    let out = rewind(&["certs", "--dir", pki.to_str().unwrap(), "--name", "t1", "--role", "admin", "--san", "bad_name"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("neither a host name nor an IP address"), "{}", stderr(&out));
    assert!(!pki.join("t1.pem").exists());
}

/// A folder in GnuTLS's layout (qemu's tls-creds-x509 `dir`, libnbd's
/// `tls-certificates`) holding the site's CA and one client certificate.
fn gnutls_dir(site: &Site, name: &str, into: &Path) {
    let certs = site.path().join("certs");
    std::fs::create_dir_all(into).unwrap();
    std::fs::copy(certs.join("ca.pem"), into.join("ca-cert.pem")).unwrap();
    std::fs::copy(certs.join(format!("{name}.pem")), into.join("client-cert.pem")).unwrap();
    std::fs::copy(certs.join(format!("{name}.key")), into.join("client-key.pem")).unwrap();
}

/// host, port and export of an `nbds://host:port/export` URI.
fn parts(uri: &str) -> (String, String, String) {
    let rest = uri.split_once("://").unwrap().1;
    let (hostport, export) = rest.split_once('/').unwrap();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    (host.to_string(), port.to_string(), export.to_string())
}

fn qemu_tls_opts(uri: &str, dir: &Path) -> (String, String) {
    let (host, port, export) = parts(uri);
    (
        format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", dir.display()),
        format!("driver=raw,file.driver=nbd,file.host={host},file.port={port},file.export={export},file.tls-creds=tls0"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_reach_a_tap_and_a_replay_over_nbd_tls() {
    let site = Site::up(&[]);
    let out = site.cli(&["group", "create", "vm1", "--disk", "disk0:16M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let backing = site.path().join("disk0.raw");
    let tap_config = site.path().join("tap.toml");
    let tap = spawn_serving(Command::new(REWIND).args([
        "tap", "--group", "vm1", "--disk", "disk0", "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--tls", "--config", tap_config.to_str().unwrap(),
    ]));
    assert!(tap.uri.starts_with("nbds://"), "{}", tap.uri);
    let creds = site.path().join("qemu-creds");
    gnutls_dir(&site, "client", &creds);

    // qemu-io writes through TLS.
    let (object, image) = qemu_tls_opts(&tap.uri, &creds);
    run(Command::new("qemu-io").args(["--object", &object, "--image-opts", &image, "-c", "write -P 0x5c 0 1M", "-c", "write -P 0x3e 4M 512k", "-c", "flush"]));
    // nbdcopy writes and nbdinfo reads through libnbd's nbds:// URIs.
    let src = site.path().join("src.raw");
    std::fs::write(&src, vec![0x7fu8; 2 << 20]).unwrap();
    let tls_uri = format!("{}?tls-certificates={}", tap.uri, creds.display());
    run(Command::new("nbdcopy").args([src.to_str().unwrap(), &tls_uri]));
    let info = run(Command::new("nbdinfo").args(["--json", &tls_uri]));
    assert!(info.contains("\"export-size\": 16777216"), "{info}");

    // A plaintext client is refused: the export says TLS is required.
    let plain = tap.uri.replacen("nbds://", "nbd://", 1);
    let out = Command::new("nbdinfo").arg(&plain).output().unwrap();
    assert!(!out.status.success(), "a plaintext client read a TLS-only tap");
    let out = Command::new("qemu-img").args(["info", "-f", "raw", &plain]).output().unwrap();
    assert!(!out.status.success(), "qemu-img read a TLS-only tap without TLS");
    // A client certificate from another CA is refused too.
    let other = tempfile::tempdir().unwrap();
    rewind_node::tls::make_ca(other.path(), "other").unwrap();
    rewind_node::tls::make_leaf(other.path(), "intruder", &rewind_node::tls::LeafSpec::loopback(rewind_service::access::Access::Admin, 1)).unwrap();
    let bad_creds = site.path().join("bad-creds");
    std::fs::create_dir_all(&bad_creds).unwrap();
    std::fs::copy(site.path().join("certs/ca.pem"), bad_creds.join("ca-cert.pem")).unwrap();
    std::fs::copy(other.path().join("intruder.pem"), bad_creds.join("client-cert.pem")).unwrap();
    std::fs::copy(other.path().join("intruder.key"), bad_creds.join("client-key.pem")).unwrap();
    let out = Command::new("nbdinfo").arg(format!("{}?tls-certificates={}", tap.uri, bad_creds.display())).output().unwrap();
    assert!(!out.status.success(), "a client certificate from another CA was let in");

    // Everything written is on the site: a replay served over TLS equals
    // the tap's backing file, as qemu-img compare reads it.
    drop(tap);
    let reader_config = site.path().join("reader.toml");
    let replay = spawn_serving(Command::new(REWIND).args([
        "replay", "vm1", "--disk", "disk0", "--latest", "--serve", "127.0.0.1:0", "--tls", "--config", reader_config.to_str().unwrap(),
    ]));
    assert!(replay.uri.starts_with("nbds://"), "{}", replay.uri);
    let (object, image) = qemu_tls_opts(&replay.uri, &creds);
    let file_image = format!("driver=raw,file.driver=file,file.filename={}", backing.display());
    run(Command::new("qemu-img").args(["compare", "--object", &object, "--image-opts", &image, &file_image]));
    // And the data is what the clients wrote.
    let local = site.path().join("replayed.raw");
    run(Command::new("qemu-img").args(["convert", "--object", &object, "--image-opts", &image, "-O", "raw", local.to_str().unwrap()]));
    let bytes = std::fs::read(&local).unwrap();
    assert!(bytes[..2 << 20].iter().all(|b| *b == 0x7f), "nbdcopy's bytes");
    assert!(bytes[(4 << 20)..(4 << 20) + (512 << 10)].iter().all(|b| *b == 0x3e));
    compare(&local, &backing);
}

/// A one-node site from plain configs at `listen`/`advertise`, reached by a
/// client dialling `advertise`; it takes a group and a write.
async fn one_node_site_at(certs: &Path, dir: &Path, listen: &str, advertise: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("node.toml"),
        format!(
            "id = 1\nlisten = \"{listen}\"\nadvertise = \"{advertise}\"\ndata_dir = \"data\"\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/node-1.pem\"\nkey = \"{0}/node-1.key\"\n",
            certs.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("client.toml"),
        format!("[[nodes]]\nid = 1\naddr = \"{advertise}\"\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/client.pem\"\nkey = \"{0}/client.key\"\n", certs.display()),
    )
    .unwrap();
    let mut node = Command::new(REWIND).args(["node", "--config", dir.join("node.toml").to_str().unwrap()]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let config = dir.join("client.toml");
    let c = config.to_str().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = rewind(&["cluster", "init", "--config", c]);
        if out.status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "init at {advertise}: {}", stderr(&out));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = rewind(&["group", "create", "g", "--disk", "d:1M", "--config", c]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = rewind(&["bookmark", "g", "b", "--config", c]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = run(Command::new(REWIND).args(["status", "--config", c]));
    assert!(status.contains(advertise), "{status}");
    let _ = node.kill();
    let _ = node.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_and_host_name_addresses() {
    // The dev site's certificates name localhost, 127.0.0.1 and ::1.
    let site = Site::up(&["--nodes", "1"]);
    let certs = site.path().join("certs");
    let port = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let p = port();
    one_node_site_at(&certs, &site.path().join("v6"), &format!("[::1]:{p}"), &format!("[::1]:{p}")).await;
    let p = port();
    one_node_site_at(&certs, &site.path().join("named"), &format!("localhost:{p}"), &format!("localhost:{p}")).await;
}
