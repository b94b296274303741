//! Membership changes through the CLI: a fourth node joins, catches up and
//! votes; then it is removed. Appends work throughout.

mod common;

use std::time::Duration;

use common::*;
use rewind_node::client::Producer;
use rewind_wire::event::{Event, TimedEvent};
use rewind_wire::rpc::DiskSpec;

fn write(offset: u64) -> TimedEvent {
    TimedEvent { time_ns: rewind_node::now_ns(), event: Event::Write { disk: "d0".into(), offset, data: vec![3; 8192] } }
}

/// A site with group "g" (disk "d0") holding `writes` writes, and its producer.
async fn site_with_writes(writes: u64) -> (Site, Producer) {
    let site = Site::up(&[]);
    site.client.create_group("g", vec![DiskSpec { name: "d0".into(), size_bytes: 1 << 24, sector_bytes: 512 }]).await.unwrap();
    let mut producer = rewind_node::client::producer(site.client.clone(), 4);
    for i in 0..writes {
        producer.append("g", vec![write(i * 8192)]).await.unwrap();
    }
    (site, producer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_catches_up_and_leaves() {
    let (site, mut producer) = site_with_writes(50).await;

    // A fourth node: its own certificate from the site's CA, its own config.
    let certs = site.path().join("certs");
    let out = rewind(&["certs", "--dir", certs.to_str().unwrap(), "--name", "node-4", "--role", "node"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let addr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = site.path().join("node-4");
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "id = 4\nlisten = \"{addr}\"\ndata_dir = \"data\"\n[tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/node-4.pem\"\nkey = \"../certs/node-4.key\"\n"
    );
    std::fs::write(dir.join("node.toml"), config).unwrap();
    let log = std::fs::File::create(dir.join("node.log")).unwrap();
    let mut node4 = std::process::Command::new(REWIND)
        .args(["node", "--config", dir.join("node.toml").to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();

    let out = site.cli(&["cluster", "join", "--id", "4", "--addr", &addr.to_string()]);
    assert!(out.status.success(), "join: {}", String::from_utf8_lossy(&out.stderr));
    let leader = site.leader().await;
    let mut voters = leader.shards[0].voters.clone();
    voters.sort();
    assert_eq!(voters, vec![1, 2, 3, 4]);
    for i in 50..60 {
        producer.append("g", vec![write(i * 8192)]).await.unwrap();
    }
    // Node 4 holds the same log as the others.
    let expected = site.converged("g", 60, 3).await[0].1.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = site.client.call_node(&addr.into(), &rewind_wire::rpc::Request::GroupState { group: "g".into() }).await;
        if let Ok(rewind_wire::rpc::Response::Group(g)) = r {
            if g.last_lsn == 60 {
                assert_eq!(g.digest_hex, expected);
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "node 4 did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out = site.cli(&["cluster", "remove", "--id", "4"]);
    assert!(out.status.success(), "remove: {}", String::from_utf8_lossy(&out.stderr));
    let leader = site.leader().await;
    let mut voters = leader.shards[0].voters.clone();
    voters.sort();
    assert_eq!(voters, vec![1, 2, 3]);
    assert!(leader.shards[0].members.iter().all(|m| m.id != 4));
    producer.append("g", vec![write(0)]).await.unwrap();
    site.converged("g", 61, 3).await;

    // Membership commands that used to lie: an address that is no address
    // (the leader retried it forever), a node that is not a member
    // ("removed"), and a learner (it stayed one).
    let out = site.cli(&["cluster", "add-learner", "--id", "9", "--addr", "not-an-address"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected IP:PORT, [IPv6]:PORT or HOST:PORT"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = site.cli(&["cluster", "remove", "--id", "9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node 9 is not a member"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = site.cli(&["cluster", "add-learner", "--id", "4", "--addr", &addr.to_string()]);
    assert!(out.status.success(), "add-learner: {}", String::from_utf8_lossy(&out.stderr));
    assert!(site.leader().await.shards[0].learners.contains(&4));
    let out = site.cli(&["cluster", "remove", "--id", "4"]);
    assert!(out.status.success(), "remove the learner: {}", String::from_utf8_lossy(&out.stderr));
    let leader = site.leader().await;
    assert!(!leader.shards[0].learners.contains(&4) && leader.shards[0].members.iter().all(|m| m.id != 4), "{:?}", leader.shards[0]);
    producer.append("g", vec![write(0)]).await.unwrap();
    site.converged("g", 62, 3).await;
    let _ = node4.kill();
    let _ = node4.wait();

    // A disk added through the CLI is an event in the log, and takes writes.
    let out = site.cli(&["group", "add-disk", "g", "--disk", "d1:1M"]);
    assert!(out.status.success(), "add-disk: {}", String::from_utf8_lossy(&out.stderr));
    let w = TimedEvent { time_ns: rewind_node::now_ns(), event: Event::Write { disk: "d1".into(), offset: 0, data: vec![1; 512] } };
    producer.append("g", vec![w]).await.unwrap();
    let g = site.converged("g", 64, 3).await;
    assert!(g.iter().all(|d| d.1 == g[0].1));
    let out = site.cli(&["group", "add-disk", "g", "--disk", "d1:1M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already has disk"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_prometheus_text() {
    use std::io::{Read, Write};
    let (site, _) = site_with_writes(1).await;
    let leader = site.leader().await;
    let node = site.site().nodes.into_iter().find(|n| n.id == leader.id).unwrap();
    let mut conn = std::net::TcpStream::connect(rewind_node::addr::Resolve::bind_addr(&node.metrics).unwrap()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    for name in ["rewind_commit_latency_seconds", "rewind_ingested_bytes_total", "rewind_apply_lag_entries", "rewind_leader_changes_total"] {
        assert!(body.contains(name), "metrics lack {name}:\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_dev_site_comes_back_with_its_data() {
    let (site, _) = site_with_writes(20).await;
    let before = site.settled("g", 3).await;
    let dir = site.path().to_str().unwrap().to_string();
    let out = rewind(&["dev", "down", "--dir", &dir]);
    assert!(out.status.success());
    let out = rewind(&["dev", "up", "--dir", &dir]);
    assert!(out.status.success(), "dev up again: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(site.settled("g", 3).await, before);
    let mut producer = rewind_node::client::producer(site.client.clone(), 4);
    producer.append("g", vec![write(0)]).await.unwrap();
    assert_eq!(site.settled("g", 3).await.0, before.0 + 1);
}

/// A leader asked to leave the voters hands leadership over first; the CLI
/// follows the hint to the next leader, which makes the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_asked_to_leave_hands_over_first() {
    let (site, mut producer) = site_with_writes(20).await;
    let old = site.leader().await.id;
    let voters: Vec<u64> = [1, 2, 3].into_iter().filter(|v| *v != old).collect();
    // Asked directly, the leader does not remove itself: it hands over and
    // names the next leader.
    let addr = site.site().nodes.into_iter().find(|n| n.id == old).unwrap().addr;
    match site.client.call_node(&addr, &rewind_wire::rpc::Request::ChangeVoters { voters: voters.clone() }).await.unwrap() {
        rewind_wire::rpc::Response::Error(e) => {
            assert_eq!(e.kind, rewind_wire::rpc::ErrorKind::NotLeader, "{e:?}");
            let next = e.leader.expect("a hint names the next leader");
            assert!(voters.contains(&next.id), "handed to {next:?}");
        }
        other => panic!("the leader removed itself: {other:?}"),
    }
    // The CLI follows the hint; the next leader makes the change.
    let out = site.cli(&["cluster", "remove", "--id", &old.to_string()]);
    assert!(out.status.success(), "remove the leader: {}", String::from_utf8_lossy(&out.stderr));
    let leader = site.leader().await;
    assert_ne!(leader.id, old, "the leader that left still leads");
    let mut voters = leader.shards[0].voters.clone();
    voters.sort();
    let expected: Vec<u64> = [1, 2, 3].into_iter().filter(|v| *v != old).collect();
    assert_eq!(voters, expected);
    producer.append("g", vec![write(0)]).await.unwrap();
    let digests = site.converged("g", 21, 2).await;
    assert!(digests.iter().all(|d| d.0 != old && d.1 == digests[0].1), "{digests:?}");
}
