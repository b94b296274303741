//! Point-in-time replay with real clients: a workload in phases through the
//! tap, a reference copy after each phase, and replays to every phase
//! boundary by LSN, by time and by bookmark, from the leader and from
//! followers, compared with `qemu-img compare`. Then a stored chunk is
//! corrupted on one node: that node refuses, the others replay correctly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rewind_wire::rpc::DiskSpec;

const DISK_BYTES: u64 = 64 << 20;

fn zeroed(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

/// The group's last LSN, from `rewind points --json` (on the leader).
fn last_lsn(site: &Site, group: &str) -> u64 {
    let out = site.cli(&["points", group, "--json"]);
    assert!(out.status.success(), "points: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["window"]["last_lsn"].as_u64().unwrap()
}

fn now_rfc3339() -> String {
    rewind_wire::timefmt::format_time_ns(rewind_node::now_ns())
}

/// Replays `disk` of `group` with `target` from `node` and checks the image
/// against `reference`.
fn replay_equals(site: &Site, dir: &Path, group: &str, target: &[&str], node: u64, reference: &Path) {
    let out_path = dir.join(format!("replay-{node}.raw"));
    let node_s = node.to_string();
    let mut args = vec!["replay", group, "--disk", "d0", "--node", &node_s, "--out", out_path.to_str().unwrap(), "--force"];
    args.extend_from_slice(target);
    let out = site.cli(&args);
    assert!(out.status.success(), "replay {target:?} from node {node}: {}", String::from_utf8_lossy(&out.stderr));
    compare(&out_path, reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phase_replays_by_lsn_time_and_bookmark_from_any_node() {
    let site = Site::up(&[]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    site.client.create_group("g", vec![DiskSpec { name: "d0".into(), size_bytes: DISK_BYTES, sector_bytes: 512 }]).await.unwrap();
    let backing = d.join("d0.raw");
    let tap = start_tap_with(&site, "g", "d0", &backing, &[]);
    let port = tap.uri.trim_start_matches("nbd://127.0.0.1:").split('/').next().unwrap().to_string();

    let source = d.join("source.raw");
    zeroed(&source, DISK_BYTES);
    run(Command::new("qemu-io").args(["-f", "raw", source.to_str().unwrap(), "-c", "write -P 0xa5 0 5M", "-c", "write -P 0x5a 20M 3M", "-c", "write -P 0x01 63M 512k"]));
    let window = d.join("window.raw");
    zeroed(&window, 2 << 20);
    run(Command::new("qemu-io").args(["-f", "raw", window.to_str().unwrap(), "-c", "write -P 0xc3 0 1M", "-c", "write -P 0x3c 1536k 512k"]));
    let window_target = format!("driver=raw,offset={},size={},file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export=d0", 30 << 20, 2 << 20);

    type Phase<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let phases: Vec<Phase> = vec![
        ("nbdcopy", Box::new(|| {
            run(Command::new("nbdcopy").args(["--request-size=1048576", source.to_str().unwrap(), &tap.uri]));
        })),
        ("fio", Box::new(|| {
            run(Command::new("fio").args([
                "--name=w", "--ioengine=nbd", &format!("--uri={}", tap.uri), "--rw=randwrite", "--bs=4k", "--size=64M", "--io_size=8M",
                "--iodepth=16", "--randseed=42", "--refill_buffers=1", "--norandommap",
            ]));
        })),
        ("qemu-img", Box::new(|| {
            run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", window.to_str().unwrap(), "--target-image-opts", &window_target]));
        })),
        ("qemu-io", Box::new(|| {
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "raw", &tap.uri]);
            for c in ["write -P 0x11 1000 70000", "write -P 0x22 4096 8192", "write -P 0x33 1001 3000", "write -z 65536 131072", "write -z 5000 100", "discard 2M 1M", "write -P 0x44 2560k 4097", "write -z 8M 16M", "write -P 0x77 -f 63M 1M"] {
                cmd.args(["-c", c]);
            }
            run(&mut cmd);
        })),
    ];
    let mut points = Vec::new();
    for (i, (name, phase)) in phases.iter().enumerate() {
        phase();
        let reference = d.join(format!("ref-{i}.raw"));
        std::fs::copy(&backing, &reference).unwrap();
        let lsn = last_lsn(&site, "g");
        let time = now_rfc3339();
        let bookmark = format!("after-{name}");
        let out = site.cli(&["bookmark", "g", &bookmark]);
        assert!(out.status.success(), "bookmark: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(std::time::Duration::from_millis(20));
        eprintln!("phase {i} ({name}): LSN {lsn}, time {time}");
        points.push((reference, lsn, time, bookmark));
    }
    drop(phases);
    drop(tap);

    let leader = site.leader().await.id;
    let followers: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    for (reference, lsn, time, bookmark) in &points {
        let lsn = lsn.to_string();
        replay_equals(&site, d, "g", &["--at", &lsn], leader, reference);
        replay_equals(&site, d, "g", &["--at-time", time], followers[0], reference);
        replay_equals(&site, d, "g", &["--at-bookmark", bookmark], followers[1], reference);
    }
    replay_equals(&site, d, "g", &["--latest"], followers[0], &points.last().unwrap().0);
    // Instant access: the fio phase served over NBD, read-only, then writable.
    let (reference, _, _, bookmark) = &points[1];
    {
        let export = serve(&site, &["--at-bookmark", bookmark, "--node", &followers[0].to_string()]);
        compare_uri(&export.uri, reference);
        let refused = Command::new("qemu-io").args(["-f", "raw", &export.uri, "-c", "write -P 1 0 4096"]).output().unwrap();
        assert!(!refused.status.success(), "a read-only export took a write");
    }
    {
        let overlay = d.join("overlay.raw");
        let export = serve(&site, &["--at-bookmark", bookmark, "--writable", "--overlay", overlay.to_str().unwrap()]);
        let changes = ["write -P 0x66 1000 9000", "write -z 65536 1M", "write -P 0x67 63M 512k"];
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &export.uri]);
        for c in changes {
            cmd.args(["-c", c]);
        }
        run(&mut cmd);
        let changed = d.join("changed.raw");
        std::fs::copy(reference, &changed).unwrap();
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", changed.to_str().unwrap()]);
        for c in changes {
            cmd.args(["-c", c]);
        }
        run(&mut cmd);
        compare_uri(&export.uri, &changed);
        drop(export);
        assert!(!overlay.exists(), "the overlay is thrown away unless --keep-overlay");
    }
    // The log's history is unchanged by the writable export.
    replay_equals(&site, d, "g", &["--at-bookmark", bookmark], leader, reference);

    // The phases really differ, so the comparisons above could have failed.
    let differs = Command::new("qemu-img").args(["compare", "-q", "-f", "raw", "-F", "raw", points[0].0.to_str().unwrap(), points[1].0.to_str().unwrap()]).status().unwrap();
    assert_eq!(differs.code(), Some(1));
    eprintln!("{} phases replayed by LSN (node {leader}), time (node {}) and bookmark (node {}): all equal their references", points.len(), followers[0], followers[1]);
}

fn serve(site: &Site, extra: &[&str]) -> TapProcess {
    let config = site.config();
    spawn_serving(Command::new(REWIND).args(["replay", "g", "--disk", "d0", "--serve", "127.0.0.1:0", "--config", config.to_str().unwrap()]).args(extra))
}

fn compare_uri(uri: &str, reference: &Path) {
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", uri, reference.to_str().unwrap()]));
}

/// Positions of every run of `run_len` bytes of `byte` in `data`.
fn runs_of(data: &[u8], byte: u8, run_len: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + run_len <= data.len() {
        if data[i] == byte && data[i..i + run_len].iter().all(|b| *b == byte) {
            out.push(i);
            i += run_len;
        } else {
            i += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_on_one_node_is_an_error_there_and_the_others_replay() {
    // Frequent snapshots purge the log, so the distinctive write is named
    // only by the history (a damaged payload the log still names would
    // stop the node at open instead).
    let site = Site::up(&["--snapshot-every", "32", "--logs-kept", "8"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    site.client.create_group("g", vec![DiskSpec { name: "d0".into(), size_bytes: DISK_BYTES, sector_bytes: 512 }]).await.unwrap();
    let backing = d.join("d0.raw");
    {
        let tap = start_tap_with(&site, "g", "d0", &backing, &[]);
        // A distinctive 1 MiB, then plenty of other writes so snapshots pass it.
        run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 0xc7 8M 1M", "-c", "flush"]));
        run(Command::new("fio").args(["--name=w", "--ioengine=nbd", &format!("--uri={}", tap.uri), "--rw=randwrite", "--bs=64k", "--offset=16M", "--size=32M", "--io_size=16M", "--iodepth=8", "--randseed=9"]));
    }
    let leader = site.leader().await;
    let (lsn, _) = site.settled("g", 3).await;
    // Wait until every node has a snapshot past the distinctive write.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let ok = site.statuses().await.into_iter().flatten().all(|s| s.shards[0].snapshot_index.unwrap_or(0) > 40);
        if ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no snapshot on every node within 60 s");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let victim = (1..=3u64).find(|n| *n != leader.id).unwrap();
    // Stop the victim while its files are edited: a running node's blob
    // garbage collection may delete or rewrite a blob file under the test.
    let victim_pid = site.site().nodes.iter().find(|n| n.id == victim).unwrap().pid;
    kill9(victim_pid);
    // Payloads lie in segment files (and, for stores from before them,
    // in RocksDB's blob files): flip a byte of every copy of the write.
    let shard = site.path().join(format!("node-{victim}")).join("data").join("shard-1");
    let db = shard.join("segments");
    let mut flipped = 0;
    let files = std::fs::read_dir(&db).unwrap().chain(std::fs::read_dir(shard.join("db")).unwrap());
    for entry in files {
        let path: PathBuf = entry.unwrap().path();
        if !matches!(path.extension().and_then(|e| e.to_str()), Some("blob" | "seg")) {
            continue;
        }
        let mut data = std::fs::read(&path).unwrap();
        let runs = runs_of(&data, 0xc7, 64 << 10);
        for r in &runs {
            data[r + 1000] ^= 0x01;
            flipped += 1;
        }
        if !runs.is_empty() {
            std::fs::write(&path, &data).unwrap();
        }
    }
    assert!(flipped > 0, "no copy of the distinctive write found in node {victim}'s segments under {}", db.display());
    rewind_node::dev::start_node(site.path(), victim).await.unwrap();
    // The corrupt node refuses, naming the problem; it never hands out wrong bytes.
    let bad = d.join("bad.raw");
    let out = site.cli(&["replay", "g", "--disk", "d0", "--at", &lsn.to_string(), "--node", &victim.to_string(), "--out", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert_eq!(out.status.code(), Some(1), "replay from the corrupt node did not fail: {err}");
    assert!(err.contains("checksum") || err.contains("corrupt"), "{err}");
    // The other nodes replay the right bytes.
    for n in (1..=3u64).filter(|n| *n != victim) {
        replay_equals(&site, d, "g", &["--at", &lsn.to_string()], n, &backing);
    }
    eprintln!("flipped {flipped} bytes in node {victim}'s payload files: it refused ({}); the others replayed correctly", err.lines().last().unwrap_or(""));
}
