//! A real 3-node site: processes, QUIC, RocksDB on disk, fsync.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rewind_wire::rpc::Role;
use rewind_node::load::{self, Acked, LoadSpec};
use rewind_wire::event::{Event, LoggedEvent};
use rewind_wire::rpc::DiskSpec;

const GROUP: &str = "cg1";
const DISK_BYTES: u64 = 1 << 30;

/// 100 events: 1 x 1 MiB, 2 x 64 KiB, 7 x 16 KiB, 40 x 4 KiB, 50 x 512 B.
fn mixed_sizes() -> Vec<usize> {
    let mut v = vec![1 << 20];
    v.extend([64 << 10; 2]);
    v.extend([16 << 10; 7]);
    v.extend([4 << 10; 40]);
    v.extend([512; 50]);
    v
}

fn spec(events: u64, sizes: Vec<usize>, window: usize, seed: u64) -> LoadSpec {
    LoadSpec {
        group: GROUP.into(),
        disk: "d0".into(),
        disk_bytes: DISK_BYTES,
        events,
        sizes,
        window,
        batch_bytes: 1 << 20,
        seed,
        time_max: Duration::from_secs(300),
    }
}

async fn create_group(site: &Site) {
    let disks = vec![DiskSpec { name: "d0".into(), size_bytes: DISK_BYTES, sector_bytes: 512 }];
    site.client.create_group(GROUP, disks).await.expect("create group");
}

/// The acknowledged ranges tile 1..=total with no gap and no overlap.
fn check_dense(acked: &[Acked], total: u64) {
    let mut next = 1;
    for a in acked {
        assert_eq!(a.lsn_first, next, "gap or overlap before LSN {}", a.lsn_first);
        assert_eq!(a.lsn_last - a.lsn_first + 1, a.count, "range size differs from batch size");
        next = a.lsn_last + 1;
    }
    assert_eq!(next - 1, total, "acknowledged events end at LSN {}", next - 1);
}

/// Every acknowledged event is in the log at its LSN with the bytes sent.
fn check_contents(spec: &LoadSpec, acked: &[Acked], events: &[LoggedEvent]) {
    for a in acked {
        for i in 0..a.count {
            let lsn = a.lsn_first + i;
            let index = a.first_index + i;
            let got = &events[(lsn - 1) as usize];
            assert_eq!(got.lsn, lsn);
            let len = spec.sizes[(index as usize) % spec.sizes.len()];
            let want = Event::Write { disk: spec.disk.clone(), offset: load::offset(spec, index, len), data: load::payload(spec.seed, index, len) };
            assert!(got.event == want, "event at LSN {lsn} differs from what was acknowledged");
        }
    }
    assert!(events.windows(2).all(|w| w[0].time_ns <= w[1].time_ns), "event times go backwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_ten_thousand_mixed_events() {
    let site = Site::up(&[]);
    let leader = site.leader().await;
    let statuses = site.statuses().await;
    let roles: Vec<Role> = statuses.iter().flatten().map(|s| s.shards[0].role).collect();
    assert_eq!(roles.iter().filter(|r| **r == Role::Leader).count(), 1, "roles {roles:?}");
    assert_eq!(roles.iter().filter(|r| **r == Role::Follower).count(), 2, "roles {roles:?}");
    // The CLI agrees.
    let out = site.cli(&["status", "--json"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n["pid"].as_u64().unwrap() > 0));
    assert_eq!(nodes.iter().filter(|n| n["role"] == "leader").count(), 1);

    create_group(&site).await;
    let spec = spec(10_000, mixed_sizes(), 8, 11);
    let report = load::run(site.client.clone(), &spec, |_, _| {}).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    check_dense(&report.acked, 10_000);
    let digests = site.converged(GROUP, 10_000, 3).await;
    assert!(digests.iter().all(|d| d.1 == digests[0].1), "replicas disagree: {digests:?}");
    for n in site.site().nodes {
        let events = site.read_all(&n.addr, GROUP, 10_000).await;
        check_contents(&spec, &report.acked, &events);
    }
    eprintln!("leader was node {}; {} bytes appended", leader.id, report.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_stream_loses_and_duplicates_nothing() {
    let site = Site::up(&[]);
    create_group(&site).await;
    let spec = spec(3000, vec![4096, 16384, 65536], 4, 22);
    let client = site.client.clone().with_deadline(Duration::from_secs(60));
    let last_ack = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let max_gap = std::sync::Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let (la, mg) = (last_ack.clone(), max_gap.clone());
    let spec2 = spec.clone();
    let load = rewind_node::spawn(async move {
        load::run(client, &spec2, move |_, _| {
            let mut l = la.lock().unwrap();
            let gap = l.elapsed();
            let mut m = mg.lock().unwrap();
            *m = (*m).max(gap);
            *l = Instant::now();
        })
        .await
    });
    // Let some appends land, then kill the leader.
    let started = Instant::now();
    loop {
        let s = site.leader().await;
        let lsn = s.shards[0].groups.iter().find(|g| g.name == GROUP).map_or(0, |g| g.last_lsn);
        if lsn >= 500 {
            kill9(s.pid);
            eprintln!("killed leader node {} at LSN {lsn}", s.id);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "load made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_at = Instant::now();
    let report = load.await.unwrap().unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    check_dense(&report.acked, 3000);
    let gap = *max_gap.lock().unwrap();
    eprintln!("longest pause between acknowledgements: {gap:?}; load finished {:?} after the kill", killed_at.elapsed());
    assert!(gap < Duration::from_secs(10), "appends stalled for {gap:?} after the leader died");
    // Bring the dead node back: it rejoins with everything.
    let dead = site.site().nodes.into_iter().find(|n| !rewind_node::dev::alive(n.pid)).expect("one node is down");
    rewind_node::dev::start_node(site.path(), dead.id).await.unwrap();
    let digests = site.converged(GROUP, 3000, 3).await;
    assert!(digests.iter().all(|d| d.1 == digests[0].1), "replicas disagree: {digests:?}");
    let events = site.read_all(&dead.addr, GROUP, 3000).await;
    check_contents(&spec, &report.acked, &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_down_during_writes_catches_up_by_snapshot() {
    let mib: u64 = std::env::var("REWIND_TEST_CATCHUP_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let site = Site::up(&["--snapshot-every", "64", "--logs-kept", "16"]);
    create_group(&site).await;
    let leader = site.leader().await;
    let victim = site.site().nodes.into_iter().find(|n| n.id != leader.id).unwrap();
    kill9(victim.pid);
    let events = mib; // 1 MiB each
    let spec = spec(events, vec![1 << 20], 4, 33);
    let report = load::run(site.client.clone(), &spec, |_, _| {}).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    check_dense(&report.acked, events);
    // Wait until the leader has purged its log past where the victim
    // stopped, so the victim can only catch up by snapshot.
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = site.leader().await;
        if s.shards[0].purged_index.unwrap_or(0) > 16 {
            break s;
        }
        assert!(Instant::now() < deadline, "the leader never purged its log: {:?}", s.shards[0]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pid = rewind_node::dev::start_node(site.path(), victim.id).await.unwrap();
    let started = Instant::now();
    let digests = site.converged(GROUP, events, 3).await;
    let took = started.elapsed();
    assert!(digests.iter().all(|d| d.1 == digests[0].1), "replicas disagree: {digests:?}");
    let rss = peak_rss_kib(pid);
    eprintln!("node {} caught up on {mib} MiB in {took:?}; peak RSS {} MiB (leader term {})", victim.id, rss / 1024, s.shards[0].term);
    assert!(rss < 1024 * 1024, "catch-up used {} MiB of memory: not bounded", rss / 1024);
    // The node logs the install just after its data is visible: wait for it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&victim.log).unwrap();
        if log.contains("installed snapshot") {
            break;
        }
        assert!(Instant::now() < deadline, "the node caught up without a snapshot; log:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = site.read_all(&victim.addr, GROUP, events).await;
    check_contents(&spec, &report.acked, &got);
    // The block index came with the snapshot: the caught-up node replays
    // the disk to the same bytes as the leader.
    let dir = tempfile::tempdir().unwrap();
    let blake3_of = |node: u64| {
        let out_path = dir.path().join(format!("r{node}.raw"));
        let out = site.cli(&["replay", GROUP, "--disk", "d0", "--latest", "--node", &node.to_string(), "--out", out_path.to_str().unwrap()]);
        assert!(out.status.success(), "replay from node {node}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace().last().unwrap().to_string()
    };
    assert_eq!(blake3_of(victim.id), blake3_of(leader.id), "the caught-up node replays other bytes than the leader");
}
