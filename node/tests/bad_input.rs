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
        udp.send_to(&junk, node.addr).unwrap();
    }

    // Malformed frames over a real, authenticated stream.
    let config = ClientConfig::load(&site.config()).unwrap();
    let endpoint = rewind_node::transport::client_endpoint(&node.addr, rewind_node::tls::client_config(&config.tls).unwrap()).unwrap();
    let peer = Peer::new(endpoint, node.addr);
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
    rewind_node::tls::make_leaf(other.path(), "intruder").unwrap();
    let tls = TlsFiles { ca: config.tls.ca.clone(), cert: other.path().join("intruder.pem"), key: other.path().join("intruder.key") };
    let endpoint = rewind_node::transport::client_endpoint(&node.addr, rewind_node::tls::client_config(&tls).unwrap()).unwrap();
    let intruder = Peer::new(endpoint, node.addr);
    let r = intruder.call(&Request::Status, std::time::Duration::from_secs(5)).await;
    assert!(r.is_err(), "a foreign certificate was accepted: {r:?}");

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
