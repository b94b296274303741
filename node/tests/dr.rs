//! Cross-site DR with two real local sites side by side (three node
//! processes each, on loopback): a group linked from site A to site B,
//! written through a tap at A by qemu-io, fio and nbdcopy in phases, pulled
//! by B under the same LSNs, times and digests; B's replays at each phase
//! boundary (by LSN and by time) equal reference copies taken at A. Also:
//! the secondary unreachable for a while (the lag grows, then shrinks to
//! nothing), both leaders SIGKILLed while shipping, a failover at B with A
//! lost (refused while A answers), A fenced once it is back, its diverged
//! events kept as a branch by `failback`, a switchover back, and a test
//! failover that leaves no trace.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rewind_wire::dr::DrInfo;
use rewind_wire::rpc::{DiskSpec, Request, Response};

const GROUP: &str = "vm1";

/// Two sites; group vm1 (one 64 MiB disk) at A, linked to B.
async fn linked_sites() -> (Site, Site, tempfile::TempDir) {
    let a = Site::up(&[]);
    let b = Site::up(&[]);
    a.client.create_group(GROUP, vec![DiskSpec { name: "d0".into(), size_bytes: DISK_BYTES, sector_bytes: 512 }]).await.unwrap();
    let out = a.cli(&[
        "dr",
        "link",
        GROUP,
        "--remote-config",
        b.config().to_str().unwrap(),
        "--peer-identity-there",
        b.path().join("peer.toml").to_str().unwrap(),
        "--peer-identity-here",
        a.path().join("peer.toml").to_str().unwrap(),
        "--name-here",
        "a",
        "--name-there",
        "b",
        "--rpo-alarm",
        "5s",
    ]);
    assert!(out.status.success(), "dr link: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    // A second link of the same group is refused, and says why.
    let again = a.cli(&["dr", "link", GROUP, "--remote-config", b.config().to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("linked already"), "{}", String::from_utf8_lossy(&again.stderr));
    (a, b, tempfile::tempdir().unwrap())
}

async fn info(site: &Site) -> DrInfo {
    rewind_node::dr::state(&site.client, GROUP, None).await.expect("dr state")
}

/// The group's head at a site: (last LSN, time of the last event).
async fn head(site: &Site) -> (u64, u64) {
    match site.client.call_leader(&Request::Points { group: GROUP.into(), on_leader: true }).await.unwrap() {
        Response::Points(p) => (p.last_lsn, p.last_time_ns),
        other => panic!("{other:?}"),
    }
}

/// Waits until B holds exactly A's log (same last LSN, same digest).
async fn caught_up(a: &Site, b: &Site, within: Duration) -> DrInfo {
    let deadline = Instant::now() + within;
    loop {
        let (ia, ib) = (info(a).await, info(b).await);
        if ia.last_lsn == ib.last_lsn && ia.digest_hex == ib.digest_hex {
            return ib;
        }
        assert!(Instant::now() < deadline, "site b did not catch up within {within:?}: a at {} ({}), b at {} ({})", ia.last_lsn, ia.digest_hex, ib.last_lsn, ib.digest_hex);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A phase boundary: the LSN and time at A, and a copy of the tap's
/// backing file (every write acknowledged so far, nothing else).
struct Boundary {
    lsn: u64,
    time_ns: u64,
    reference: PathBuf,
}

async fn boundary(a: &Site, backing: &Path, dir: &Path, n: usize) -> Boundary {
    let (lsn, time_ns) = head(a).await;
    let reference = dir.join(format!("phase{n}.ref"));
    std::fs::copy(backing, &reference).unwrap();
    eprintln!("phase {n}: LSN {lsn}");
    Boundary { lsn, time_ns, reference }
}

fn replay_at(site: &Site, args: &[&str], out: &Path) {
    let mut full = vec!["replay", GROUP, "--disk", "d0", "--out", out.to_str().unwrap()];
    full.extend_from_slice(args);
    let r = site.cli(&full);
    assert!(r.status.success(), "replay {args:?}: {}", String::from_utf8_lossy(&r.stderr));
}

fn set_stopped(site: &Site, stopped: bool) {
    for n in site.site().nodes {
        unsafe { libc::kill(n.pid as i32, if stopped { libc::SIGSTOP } else { libc::SIGCONT }) };
    }
}

fn fio_nbd(uri: &str, seed: u32, io_size: &str) {
    let out = Command::new("fio")
        .args(["--name=w", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bsrange=4k-64k", "--size=64M", &format!("--io_size={io_size}"), "--iodepth=8", &format!("--randseed={seed}")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("err= 0"), "fio:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Issue 15, tests 1-3: phases of real-client writes at A; B's replays at
/// every boundary equal A's references, by LSN and by time; B unreachable
/// for a while, then both leaders SIGKILLed while shipping: B ends with
/// exactly A's events, nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_site_holds_every_phase_through_cuts_and_kills() {
    let (a, b, dir) = linked_sites().await;
    let d = dir.path();
    let backing = d.join("d0.raw");
    let tap = start_tap(&a, GROUP, "d0", &backing);
    let mut boundaries = Vec::new();

    // Phase 1: qemu-io.
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 4096 8192", "-c", "write -z 65536 131072", "-c", "discard 2M 1M", "-c", "write -P 0x33 63M 1M", "-c", "flush"]));
    boundaries.push(boundary(&a, &backing, d, 1).await);
    let ib = caught_up(&a, &b, Duration::from_secs(60)).await;
    assert_eq!(ib.primary.as_deref(), Some("a"));
    assert_eq!(ib.local.as_deref(), Some("b"));

    // Phase 2, with B unreachable (its processes stopped) for a while: A
    // takes writes, the lag A sees grows; then B comes back and catches up.
    // B is unreachable for 30 s (its processes stopped) while A takes
    // three rounds of fio writes; the lag A reports grows with each.
    set_stopped(&b, true);
    let cut = Instant::now();
    let mut lags = Vec::new();
    for round in 0..3u32 {
        fio_nbd(&tap.uri, 7 + round, "6M");
        let during = info(&a).await;
        lags.push(rewind_node::dr::lag_of(&during).expect("a saw b before the cut"));
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    let status = a.cli(&["dr", "status", GROUP]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    eprintln!("during the cut:\n{text}");
    assert!(text.contains("RPO ALARM") && text.contains("problem: site \"b\""), "a 5 s RPO alarm and the unreachable peer should show:\n{text}");
    if let Some(rest) = Duration::from_secs(30).checked_sub(cut.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    set_stopped(&b, false);
    assert!(lags.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1), "the lag did not grow while b was unreachable: {lags:?}");
    let lag_during = *lags.last().expect("three rounds");
    boundaries.push(boundary(&a, &backing, d, 2).await);
    caught_up(&a, &b, Duration::from_secs(120)).await;
    // A sees the lag gone once it has looked again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = info(&a).await;
        if rewind_node::dr::lag_of(&now).is_some_and(|l| l.0 == 0) {
            assert_eq!(now.peer.as_ref().and_then(|p| p.chains_agree), Some(true), "{now:?}");
            break;
        }
        assert!(Instant::now() < deadline, "a never saw b caught up: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("lag while b was unreachable for 30 s: {lags:?} (LSNs, bytes, s); then 0; last {} LSNs", lag_during.0);

    // Phase 3: nbdcopy of a source image, while A's leader and then B's
    // leader are SIGKILLed and restarted.
    let src = d.join("src.raw");
    std::fs::File::create(&src).unwrap().set_len(DISK_BYTES).unwrap();
    run(Command::new("qemu-io").args(["-f", "raw", src.to_str().unwrap(), "-c", "write -P 0xa5 0 6M", "-c", "write -P 0x5a 20M 3M"]));
    let copier = Command::new("nbdcopy").args(["--request-size=65536", "--requests=4", src.to_str().unwrap(), &tap.uri]).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let la = a.leader().await;
    kill9(la.pid);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lb = b.leader().await;
    kill9(lb.pid);
    let out = copier.wait_with_output().unwrap();
    assert!(out.status.success(), "nbdcopy failed");
    rewind_node::dev::start_node(a.path(), la.id).await.unwrap();
    rewind_node::dev::start_node(b.path(), lb.id).await.unwrap();
    boundaries.push(boundary(&a, &backing, d, 3).await);
    caught_up(&a, &b, Duration::from_secs(120)).await;

    // Phase 4: the guest writes 4 MiB of random bytes, then the same bytes
    // elsewhere (a file copied inside the guest). B holds them after the
    // first copy, so the second crosses as hashes: a fraction of its size.
    let random = d.join("random.bin");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let bytes: Vec<u8> = (0..4 << 20).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 24) as u8
    }).collect();
    std::fs::write(&random, &bytes).unwrap();
    let write_random = |at: &str| run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", &format!("write -s {} {at} 4M", random.display()), "-c", "flush"]));
    write_random("32M");
    caught_up(&a, &b, Duration::from_secs(60)).await;
    let (wire, found) = ("rewind_dr_received_wire_bytes_total", "rewind_dr_blocks_found_here_total");
    let before = (site_counter(&b, wire), site_counter(&b, found));
    write_random("40M");
    boundaries.push(boundary(&a, &backing, d, 4).await);
    caught_up(&a, &b, Duration::from_secs(60)).await;
    let after = (site_counter(&b, wire), site_counter(&b, found));
    let (sent, held) = (after.0 - before.0, after.1 - before.1);
    eprintln!("a 4 MiB copy of bytes site b held: {sent} bytes crossed, {held} blocks found at b");
    assert!(held >= 1024.0, "site b found {held} of the copy's 1024 blocks it holds");
    assert!(sent < (4 << 20) as f64 / 20.0, "{sent} bytes crossed for a 4 MiB copy of blocks site b holds");
    drop(tap);

    // B's log is A's, event for event, on every node of B.
    let log_a = log_of(&a, GROUP).await;
    let log_b = log_of(&b, GROUP).await;
    assert!(log_a == log_b, "site b holds a different log ({} events) from site a ({})", log_b.len(), log_a.len());

    // Replays at B at each boundary, by LSN and by time, equal A's copies.
    for (i, bd) in boundaries.iter().enumerate() {
        let by_lsn = d.join(format!("b-lsn-{i}.raw"));
        replay_at(&b, &["--at", &bd.lsn.to_string()], &by_lsn);
        compare(&by_lsn, &bd.reference);
        let by_time = d.join(format!("b-time-{i}.raw"));
        replay_at(&b, &["--at-time", &bd.time_ns.to_string()], &by_time);
        compare(&by_time, &bd.reference);
    }
    // Every DR metric the dashboard draws is exported by a node of a linked
    // site.
    let drawn: Vec<String> = dashboard_metrics("rewind-node").into_iter().filter(|n| n.starts_with("rewind_dr_")).collect();
    assert!(drawn.len() >= 4, "{drawn:?}");
    let bodies: Vec<String> = [&a, &b].iter().flat_map(|s| s.site().nodes).map(|n| scrape(&n.metrics.to_string())).collect();
    for name in &drawn {
        assert!(bodies.iter().any(|body| body.contains(name.as_str())), "the dashboard draws {name}, which no node of either site exports");
    }
    let json = b.cli(&["dr", "status", GROUP, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("dr status --json");
    assert_eq!(v[0]["primary"], "a", "{v}");
    eprintln!("site b: {} events = site a's, {} phases replayed by LSN and by time equal", log_b.len(), boundaries.len());
}

/// Issue 15, tests 4 and 5: a test failover at B leaves no trace; a real
/// one is refused while A answers; A writes on while B is unreachable, then
/// A is lost and B fails over to a time, equal to A's reference; A, back,
/// is fenced and sees that it diverged; `failback` keeps A's own events as
/// a readable branch and makes A follow B; a switchover gives the roles
/// back, and both sites replay the same disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_at_the_second_site_fences_the_first() {
    let (a, b, dir) = linked_sites().await;
    let d = dir.path();
    let backing = d.join("d0.raw");
    let tap = start_tap(&a, GROUP, "d0", &backing);
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 0x41 0 2M", "-c", "flush"]));
    let first = boundary(&a, &backing, d, 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 0x42 1M 2M", "-c", "write -P 0x43 40M 64k", "-c", "flush"]));
    let second = boundary(&a, &backing, d, 2).await;
    caught_up(&a, &b, Duration::from_secs(60)).await;

    // A test failover at B while replication runs: writable, leaves no trace.
    let mut test = spawn_serving(Command::new(REWIND).args(["failover", GROUP, "--latest", "--test", "--serve", "127.0.0.1:0", "--config", b.config().to_str().unwrap()]));
    run(Command::new("qemu-io").args(["-f", "raw", &test.uri, "-c", "write -P 0x77 0 1M", "-c", "read -P 0x77 0 1M", "-c", "read -P 0x43 40M 64k"]));
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 0x44 8M 64k", "-c", "flush"]));
    caught_up(&a, &b, Duration::from_secs(60)).await;
    // A second test of the same group is refused while one runs; --stop ends it.
    let again = b.cli(&["failover", GROUP, "--latest", "--test", "--serve", "127.0.0.1:0"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("runs already"), "{}", String::from_utf8_lossy(&again.stderr));
    let stop = b.cli(&["failover", GROUP, "--test", "--stop"]);
    assert!(stop.status.success(), "--test --stop: {}", String::from_utf8_lossy(&stop.stderr));
    let _ = test.child.wait();
    let none = b.cli(&["failover", GROUP, "--test", "--stop"]);
    assert!(!none.status.success() && String::from_utf8_lossy(&none.stderr).contains("no test failover"), "{}", String::from_utf8_lossy(&none.stderr));
    assert_eq!(info(&b).await.epoch, 1, "a test failover changes no epoch");
    assert!(log_of(&a, GROUP).await == log_of(&b, GROUP).await, "the test branch left a trace in b's log");

    // Not while A answers: that would make two primaries.
    let refused = b.cli(&["failover", GROUP, "--latest", "--out", d.join("no.raw").to_str().unwrap()]);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && why.contains("switchover"), "{why}");

    // A writes on while B is unreachable: events B never gets.
    set_stopped(&b, true);
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 0x45 12M 3M", "-c", "write -P 0x46 0 64k", "-c", "flush"]));
    let diverged = boundary(&a, &backing, d, 3).await;

    // Site A is lost: every node SIGKILLed, the tap gone.
    drop(tap);
    let a_nodes = a.site().nodes;
    for n in &a_nodes {
        kill9(n.pid);
    }
    set_stopped(&b, false);
    tokio::time::sleep(rewind_node::dr::PEER_SILENT + Duration::from_secs(1)).await;
    let image = d.join("failover.raw");
    let started = Instant::now();
    let out = b.cli(&["failover", GROUP, "--at-time", &first.time_ns.to_string(), "--out", image.to_str().unwrap()]);
    assert!(out.status.success(), "failover: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}{}failover to the first boundary took {:.2} s", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout), started.elapsed().as_secs_f64());
    compare(&image, &first.reference);
    let ib = info(&b).await;
    assert_eq!((ib.epoch, ib.primary.as_deref()), (2, Some("b")));
    // B's latest point is the first boundary now; the second stays replayable.
    let latest = d.join("b-latest.raw");
    replay_at(&b, &["--latest"], &latest);
    compare(&latest, &first.reference);
    let old = d.join("b-second.raw");
    replay_at(&b, &["--at", &second.lsn.to_string()], &old);
    compare(&old, &second.reference);

    // B takes writes now, through a tap on the failed-over image.
    let b_backing = d.join("b.raw");
    std::fs::copy(&image, &b_backing).unwrap();
    {
        let tap_b = start_tap(&b, GROUP, "d0", &b_backing);
        run(Command::new("qemu-io").args(["-f", "raw", &tap_b.uri, "-c", "write -P 0x51 4M 1M", "-c", "flush"]));
    }

    // A comes back: it learns epoch 2 and refuses writes; its history
    // diverged (the writes B never got), so it does not follow B yet.
    for n in &a_nodes {
        rewind_node::dev::start_node(a.path(), n.id).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ia = info(&a).await;
        if ia.epoch == 2 && ia.peer.as_ref().is_some_and(|p| p.chains_agree == Some(false)) {
            assert_eq!(ia.primary.as_deref(), Some("b"));
            break;
        }
        assert!(Instant::now() < deadline, "site a never learned epoch 2 or never saw it diverged: {ia:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = a.cli(&["dr", "status", GROUP]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("DIFFER") && text.contains("failback"), "{text}");
    let tap_a = start_tap(&a, GROUP, "d0", &backing);
    let write = Command::new("qemu-io").args(["-f", "raw", &tap_a.uri, "-c", "write -P 0x66 0 4096", "-c", "flush"]).output().unwrap();
    assert!(!write.status.success() || String::from_utf8_lossy(&write.stdout).contains("error"), "a write at the fenced site was accepted: {}", String::from_utf8_lossy(&write.stdout));
    drop(tap_a);
    let refused = Command::new(REWIND).args(["bookmark", GROUP, "x", "--config", a.config().to_str().unwrap()]).output().unwrap();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && why.contains("fenced") && why.contains("epoch 2"), "{why}");
    assert_eq!(head(&a).await.0, diverged.lsn, "the fenced site's log moved");

    // Failback at A: its own events after the fork stay readable as a
    // branch; it follows B, receiving only what B wrote since the fork.
    let out = a.cli(&["failback", GROUP]);
    assert!(out.status.success(), "failback: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{said}");
    assert!(said.contains("vm1.branch-e2"), "{said}");
    let kept = d.join("branch.raw");
    let r = a.cli(&["replay", "vm1.branch-e2", "--disk", "d0", "--at", &diverged.lsn.to_string(), "--out", kept.to_str().unwrap()]);
    assert!(r.status.success(), "replay of the branch: {}", String::from_utf8_lossy(&r.stderr));
    compare(&kept, &diverged.reference);
    caught_up(&b, &a, Duration::from_secs(60)).await;
    assert!(log_of(&a, GROUP).await == log_of(&b, GROUP).await, "after failback site a's log is not site b's");

    // A switchover at B gives the roles back with no loss; A takes writes.
    let out = b.cli(&["dr", "switchover", GROUP]);
    assert!(out.status.success(), "switchover: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let ia = info(&a).await;
    assert_eq!((ia.epoch, ia.primary.as_deref()), (3, Some("a")));
    let a_backing = d.join("a-again.raw");
    replay_at(&a, &["--latest"], &a_backing);
    {
        let tap_a = start_tap(&a, GROUP, "d0", &a_backing);
        run(Command::new("qemu-io").args(["-f", "raw", &tap_a.uri, "-c", "write -P 0x71 2M 1M", "-c", "flush"]));
    }
    caught_up(&a, &b, Duration::from_secs(60)).await;
    let at_a = d.join("a-latest.raw");
    replay_at(&a, &["--latest"], &at_a);
    compare(&at_a, &a_backing);
    let at_b = d.join("b-latest2.raw");
    replay_at(&b, &["--latest"], &at_b);
    compare(&at_a, &at_b);
    eprintln!("failback and switchover: site a primary again in epoch 3, both at LSN {}", head(&b).await.0);
}

/// A failover plan: groups in boot order, each to its point; a typo in the
/// plan is refused before anything changes; a group that fails stops the
/// plan (the rest are listed as skipped) unless --keep-going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_plan_fails_groups_over_in_order() {
    let (a, b, dir) = linked_sites().await;
    let d = dir.path();
    a.client.create_group("app", vec![DiskSpec { name: "d0".into(), size_bytes: DISK_BYTES, sector_bytes: 512 }]).await.unwrap();
    let out = a.cli(&["dr", "link", "app", "--remote-config", b.config().to_str().unwrap(), "--peer-identity-there", b.path().join("peer.toml").to_str().unwrap(), "--name-here", "a", "--name-there", "b"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for g in [GROUP, "app"] {
        let out = a.cli(&["bookmark", g, "ready"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    caught_up(&a, &b, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rewind_node::dr::state(&b.client, "app", None).await.unwrap().last_lsn == 0 {
        assert!(Instant::now() < deadline, "app never reached site b");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in a.site().nodes {
        kill9(n.pid);
    }
    tokio::time::sleep(rewind_node::dr::PEER_SILENT + Duration::from_secs(1)).await;
    let plan = d.join("plan.toml");
    std::fs::write(&plan, "[[group]]\nname = \"vm1\"\nlatst = true\n").unwrap();
    let out = b.cli(&["failover", "--plan", plan.to_str().unwrap()]);
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && why.contains("unknown field `latst`"), "{why}");
    assert_eq!(info(&b).await.epoch, 1, "a bad plan changed something");
    std::fs::write(&plan, "[[group]]\nname = \"vm1\"\nat-bookmark = \"ready\"\n[[group]]\nname = \"nope\"\nlatest = true\n[[group]]\nname = \"app\"\nlatest = true\n").unwrap();
    let out = b.cli(&["failover", "--plan", plan.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert!(!out.status.success() && table.contains("FAILED") && table.contains("app                  skipped"), "{table}");
    assert_eq!(info(&b).await.epoch, 2);
    assert_eq!(rewind_node::dr::state(&b.client, "app", None).await.unwrap().epoch, 1, "the plan went on after a failure");
    let out = b.cli(&["failover", "--plan", plan.to_str().unwrap(), "--keep-going", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
    assert!(!out.status.success(), "a plan with a failed group exits 1");
    assert_eq!(rows.as_array().map(|r| r.len()), Some(3), "{rows}");
    assert_eq!((rows[0]["ok"].as_bool(), rows[1]["ok"].as_bool(), rows[2]["ok"].as_bool()), (Some(false), Some(false), Some(true)), "{rows}");
    assert!(rows[0]["error"].as_str().unwrap_or("").contains("primary of group \"vm1\" already"), "{rows}");
    assert_eq!(rewind_node::dr::state(&b.client, "app", None).await.unwrap().epoch, 2);
}
