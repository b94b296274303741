//! Bad input gets a clear error and changes nothing.

mod common;

use common::*;
use rewind_node::config::{ClientConfig, TlsFiles};
use rewind_node::transport::{read_frame, Peer};
use rewind_wire::event::{Event, TimedEvent};
use rewind_wire::frame::{encode_frame, FRAME_HEADER_BYTES};
use rewind_wire::rpc::{DiskSpec, ErrorKind, Request, Response};

async fn raw_call(peer: &Peer, bytes: &[u8]) -> Response {
    let (mut send, mut recv) = peer.open().await.expect("open stream");
    send.write_all(bytes).await.expect("write");
    send.finish().expect("finish");
    read_frame::<Response>(&mut recv).await.expect("a reply frame")
}

fn check_bad_request(r: Response, mention: &str) {
    match r {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
            assert!(e.message.contains(mention), "error {:?} should mention {mention:?}", e.message);
        }
        other => panic!("expected an error mentioning {mention:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_certificates_and_configs_are_refused() {
    let site = Site::up(&["--nodes", "3"]);
    let disks = vec![DiskSpec { name: "d0".into(), size_bytes: 1 << 20, sector_bytes: 512 }];
    site.client.create_group("g", disks).await.unwrap();
    let mut producer = rewind_node::client::producer(site.client.clone(), 4);
    let write = |offset| TimedEvent { time_ns: 1, event: Event::Write { disk: "d0".into(), offset, data: vec![7; 4096] } };
    producer.append("g", vec![write(0), write(4096)]).await.unwrap();
    let before = site.converged("g", 2, 3).await;
    let node = site.site().nodes[0].clone();

    // Raw UDP garbage at the QUIC port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 1200 + 1)).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
        udp.send_to(&junk, rewind_node::addr::Resolve::bind_addr(&node.addr).unwrap()).unwrap();
    }

    // Malformed frames over a real, authenticated stream.
    let config = ClientConfig::load(&site.config()).unwrap();
    let endpoint = rewind_node::transport::client_endpoint(&node.addr, rewind_node::tls::client_config(&config.tls).unwrap()).unwrap();
    let peer = Peer::new(endpoint, node.addr.clone());
    check_bad_request(raw_call(&peer, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nxxxxxxxxxxxxx").await, "not a rewind frame");
    let good = encode_frame(&Request::Status).unwrap();
    check_bad_request(raw_call(&peer, &good[..good.len() - 3]).await, "stream ended");
    let mut oversized = good.clone();
    oversized[8..12].copy_from_slice(&(200u32 << 20).to_le_bytes());
    check_bad_request(raw_call(&peer, &oversized[..FRAME_HEADER_BYTES]).await, "exceeds the limit");
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 0x55;
    check_bad_request(raw_call(&peer, &flipped).await, "checksum");
    let mut version = good.clone();
    version[4] = 99;
    check_bad_request(raw_call(&peer, &version).await, "protocol version 99");
    // A well-formed append that breaks a limit.
    let big = TimedEvent { time_ns: 1, event: Event::Write { disk: "d0".into(), offset: 0, data: vec![0; 2 << 20] } };
    let batch = rewind_wire::event::EventBatch { group: "g".into(), client_id: 99, seq: 1, events: vec![big] };
    check_bad_request(raw_call(&peer, &encode_frame(&Request::Append { batch }).unwrap()).await, "exceeds the per-event limit");
    // Past the end of the disk: refused by the state machine on every replica.
    let err = producer.append("g", vec![write((1 << 20) - 512)]).await.unwrap_err();
    assert!(format!("{err:#}").contains("past the end of disk"), "{err:#}");

    // A client whose certificate comes from another CA cannot connect.
    let other = tempfile::tempdir().unwrap();
    rewind_node::tls::make_ca(other.path(), "other").unwrap();
    let spec = rewind_node::tls::LeafSpec { names: vec!["localhost".into()], access: rewind_service::access::Access::Admin, days: 30 };
    rewind_node::tls::make_leaf(other.path(), "intruder", &spec).unwrap();
    let tls = TlsFiles { ca: config.tls.ca.clone(), cert: other.path().join("intruder.pem"), key: other.path().join("intruder.key") };
    let endpoint = rewind_node::transport::client_endpoint(&node.addr, rewind_node::tls::client_config(&tls).unwrap()).unwrap();
    let intruder = Peer::new(endpoint, node.addr.clone());
    let r = intruder.call(&Request::Status, std::time::Duration::from_secs(5)).await;
    assert!(matches!(r, Err(rewind_node::transport::TransportError::TlsRefused { .. })), "a foreign certificate: {r:?}");
    // The CLI names the refusal at once, rather than retrying for 30 s.
    let mut foreign = config.clone();
    foreign.tls = tls.clone();
    let foreign_path = other.path().join("client.toml");
    std::fs::write(&foreign_path, toml::to_string(&foreign).unwrap()).unwrap();
    let started = std::time::Instant::now();
    let out = rewind(&["group", "create", "x", "--disk", "d:1M", "--config", foreign_path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TLS refused") && stderr.contains("client config"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "took {:?}", started.elapsed());

    // A node config with a typo: refused at start with the key named.
    let cfg = std::fs::read_to_string(&node.config).unwrap().replace("data_dir", "data_dri");
    let bad = site.path().join("bad.toml");
    std::fs::write(&bad, cfg).unwrap();
    let out = rewind(&["node", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `data_dri`"), "{stderr}");
    // Bad usage exits 2; a bad disk spec exits 1 with the reason.
    assert_eq!(site.cli(&["group", "create", "g2"]).status.code(), Some(2));
    let out = site.cli(&["group", "create", "g2", "--disk", "d:1000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a positive multiple"));

    // Nothing changed, and the site still takes writes.
    let after = site.converged("g", 2, 3).await;
    assert_eq!(before, after);
    producer.append("g", vec![write(8192)]).await.unwrap();
    site.converged("g", 3, 3).await;
}

/// Runs `rewind ARGS` (with the site's config) that must fail with exit 1
/// and a message containing `mention`.
fn refused(site: &Site, args: &[&str], mention: &str) {
    expect_refusal(site.cli(args), args, mention);
}

fn expect_refusal(out: std::process::Output, args: &[&str], mention: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail with exit 1: {stderr}");
    assert!(stderr.contains(mention), "{args:?}: {stderr:?} should mention {mention:?}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Paths that point at files the user or a running tap owns: each command
/// is refused with the reason, and every file is left as it was; the tap's
/// acknowledged writes are still in the log and on its disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_at_users_files_are_refused_and_nothing_is_touched() {
    let site = Site::up(&["--nodes", "3"]);
    let disks = vec![DiskSpec { name: "d0".into(), size_bytes: 4 << 20, sector_bytes: 512 }];
    site.client.create_group("g", disks).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let backing = work.path().join("disk.raw");
    let tap = start_tap_with(&site, "g", "d0", &backing, &[]);
    run(std::process::Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush", &tap.uri]));
    let disk_before = std::fs::read(&backing).unwrap();
    // What rewind creates is its operator's alone.
    assert_eq!(mode(&backing), 0o600, "the backing file the tap created");
    assert_eq!(mode(&work.path().join("disk.raw.tap-id")), 0o600, "the tap's identity file");
    assert_eq!(mode(&site.path().join("node-1")), 0o700, "a node's folder");
    assert_eq!(mode(&site.path().join("node-1").join("data")), 0o700, "a node's data folder");
    // Migrating a running node's store, or a folder that holds none, is
    // refused and touches nothing.
    let data = site.path().join("node-1").join("data");
    let out = std::process::Command::new(REWIND).args(["store", "migrate", "--data-dir", data.to_str().unwrap()]).output().unwrap();
    expect_refusal(out, &["store", "migrate"], "is in use (is its node running? stop it first)");
    let out = std::process::Command::new(REWIND).args(["store", "migrate", "--data-dir", work.path().to_str().unwrap()]).output().unwrap();
    expect_refusal(out, &["store", "migrate"], "no store in");
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 2, "the folder holds the backing file and its identity, nothing more");
    let (lsn, _) = site.settled("g", 3).await;
    assert!(lsn >= 1);
    let b = backing.to_str().unwrap();

    // replay --out at the running tap's backing file: refused, even with --force.
    refused(&site, &["replay", "g", "--disk", "d0", "--at", "1", "--out", b], "locked by another program");
    refused(&site, &["replay", "g", "--disk", "d0", "--at", "1", "--out", b, "--force"], "locked by another program");
    // At a user's file: refused without --force; nothing beside it.
    let user = work.path().join("notes.txt");
    std::fs::write(&user, b"my notes").unwrap();
    refused(&site, &["replay", "g", "--disk", "d0", "--latest", "--out", user.to_str().unwrap()], "--force");
    assert_eq!(std::fs::read(&user).unwrap(), b"my notes");
    // A failed replay (a target outside the window) leaves no file.
    let fresh = work.path().join("fresh.raw");
    refused(&site, &["replay", "g", "--disk", "d0", "--at", "999999", "--out", fresh.to_str().unwrap()], "beyond the log");
    assert!(!fresh.exists());
    // With --force a user's file is replaced by the whole image, mode 0600.
    let out = site.cli(&["replay", "g", "--disk", "d0", "--latest", "--out", user.to_str().unwrap(), "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&user).unwrap(), disk_before);
    assert_eq!(mode(&user), 0o600);

    // tap --socket at a regular file (here the live backing file): refused.
    refused(&site, &["tap", "--group", "g", "--disk", "d0", "--backing", work.path().join("other.raw").to_str().unwrap(), "--socket", b], "is not a socket");
    // tap --listen off loopback with a certificate that does not name the
    // address (NBD-TLS could not be verified): refused before any file is
    // made.
    let never = work.path().join("never.raw");
    refused(&site, &["tap", "--group", "g", "--disk", "d0", "--backing", never.to_str().unwrap(), "--listen", "192.0.2.1:10809"], "does not cover \"192.0.2.1\"");
    assert!(!never.exists() && !work.path().join("never.raw.tap-id").exists());

    // replay --serve --writable --overlay at an existing file: refused.
    refused(
        &site,
        &["replay", "g", "--disk", "d0", "--latest", "--serve", "127.0.0.1:0", "--writable", "--overlay", user.to_str().unwrap()],
        "an overlay is always a new file",
    );
    assert_eq!(std::fs::read(&user).unwrap(), disk_before);
    // A new overlay is made with mode 0600, and removed at the end.
    let overlay = work.path().join("ov.raw");
    let config = site.config();
    {
        let serving = spawn_serving(std::process::Command::new(REWIND).args([
            "replay", "g", "--disk", "d0", "--latest", "--serve", "127.0.0.1:0", "--writable", "--overlay", overlay.to_str().unwrap(), "--config", config.to_str().unwrap(),
        ]));
        assert_eq!((mode(&overlay), mode(&work.path().join("ov.raw.map"))), (0o600, 0o600));
        drop(serving);
    }
    assert!(!overlay.exists() && !work.path().join("ov.raw.map").exists());

    // certs: the CA's name, a path out of the folder, an existing name.
    let certs = site.path().join("certs");
    let ca_before = std::fs::read(certs.join("ca.pem")).unwrap();
    let d = certs.to_str().unwrap();
    for (name, mention) in [("ca", "site CA's"), ("../x", "certificate name"), ("client", "never overwritten")] {
        let args = ["certs", "--dir", d, "--name", name, "--role", "admin"];
        expect_refusal(rewind(&args), &args, mention);
    }
    assert_eq!(std::fs::read(certs.join("ca.pem")).unwrap(), ca_before);
    assert!(!site.path().join("x.pem").exists());
    let out = rewind(&["certs", "--dir", d, "--name", "backup-1", "--role", "reader"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(&certs.join("backup-1.key")), 0o600);

    // --at-time: overflow, a multi-byte character, a day that does not exist.
    for (t, mention) in [("2600-01-01T00:00:00Z", "after 2554"), ("2026-11-22T05:09:40\u{e9}Z", "expected RFC 3339"), ("2026-02-31T00:00:00Z", "has no day 31")] {
        refused(&site, &["replay", "g", "--disk", "d0", "--at-time", t, "--out", fresh.to_str().unwrap()], mention);
    }

    // Groups: a disk named twice, a sector size that does not fit 32 bits.
    refused(&site, &["group", "create", "g3", "--disk", "a:1M", "--disk", "a:1M"], "named twice");
    refused(&site, &["group", "create", "g3", "--disk", "d:1M:4294967808"], "is not 512, 1024, 2048 or 4096");

    // load with tiny writes: batches are cut by count as well as bytes.
    site.client.create_group("l", vec![DiskSpec { name: "d0".into(), size_bytes: 1 << 20, sector_bytes: 512 }]).await.unwrap();
    let out = site.cli(&["load", "--group", "l", "--disk", "d0", "--events", "40000", "--sizes", "32", "--batch", "4M"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("appended 40000 events"), "{}", String::from_utf8_lossy(&out.stdout));

    // The tap served on; its disk and the log agree.
    assert_eq!(std::fs::read(&backing).unwrap(), disk_before);
    let replayed = work.path().join("check.raw");
    let out = site.cli(&["replay", "g", "--disk", "d0", "--latest", "--out", replayed.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    compare(&replayed, &backing);
    drop(tap);

    // status with every node down: each node's error, and exit 1.
    rewind_node::dev::down(site.path(), false).unwrap();
    let started = std::time::Instant::now();
    refused(&site, &["status"], "no node of the site answered");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "status took {:?} with the site down", started.elapsed());
}

/// Issue 18, item 8: a certificate holder opens 200 streams, each
/// announcing a 15 MiB frame and sending 1 KiB of it. The node holds
/// little for them (a frame grows as its bytes arrive), keeps answering,
/// and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_announce_big_frames_and_stall_cost_the_node_little() {
    let site = Site::up(&["--nodes", "3"]);
    let disks = vec![DiskSpec { name: "d0".into(), size_bytes: 1 << 20, sector_bytes: 512 }];
    site.client.create_group("g", disks).await.unwrap();
    let mut producer = rewind_node::client::producer(site.client.clone(), 4);
    let write = |offset| TimedEvent { time_ns: 1, event: Event::Write { disk: "d0".into(), offset, data: vec![7; 4096] } };
    producer.append("g", vec![write(0)]).await.unwrap();
    let node = site.site().nodes[0].clone();
    let config = ClientConfig::load(&site.config()).unwrap();
    let endpoint = rewind_node::transport::client_endpoint(&node.addr, rewind_node::tls::client_config(&config.tls).unwrap()).unwrap();
    let peer = Peer::new(endpoint, node.addr.clone());
    let big = TimedEvent { time_ns: 1, event: Event::Write { disk: "d0".into(), offset: 0, data: vec![1; 1 << 20] } };
    let batch = rewind_wire::event::EventBatch { group: "g".into(), client_id: 77, seq: 1, events: vec![big; 15] };
    let frame = encode_frame(&Request::Append { batch }).unwrap();
    assert!(frame.len() > 15 << 20);
    let before = peak_rss_kib(node.pid);
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let (mut send, recv) = peer.open().await.expect("open a stream");
        send.write_all(&frame[..FRAME_HEADER_BYTES + 1024]).await.unwrap();
        stalled.push((send, recv));
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let r = peer.call(&Request::Status, std::time::Duration::from_secs(10)).await;
    assert!(matches!(r, Ok(Response::Status(_))), "the node stopped answering: {r:?}");
    producer.append("g", vec![write(4096)]).await.unwrap();
    let after = peak_rss_kib(node.pid);
    assert!(after < before + (100 << 10), "the node's peak memory grew from {before} KiB to {after} KiB for 200 stalled frames");
    drop(stalled);
    site.converged("g", 2, 3).await;
    eprintln!("peak RSS {before} KiB before, {after} KiB with 200 stalled 15 MiB frames");
}
