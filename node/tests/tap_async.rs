//! The async tap against real failures: the whole site down while fio
//! writes (the journal holds the guest back, then drains), a tap killed
//! with SIGKILL (its journal ships exactly once), and a damaged journal
//! entry (the tap refuses to start and loses nothing). The sync tap and
//! its NBD clients are in `tap.rs`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;
use rewind_wire::event::Event;

/// A free loopback TCP port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One gauge from a Prometheus endpoint.
fn gauge(port: u16, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Waits until the async tap of `group`/`disk` reports an empty journal to
/// the site, as `rewind status` shows it.
async fn drained(site: &Site, group: &str, disk: &str) -> rewind_wire::rpc::TapReport {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let fresh = site
            .statuses()
            .await
            .into_iter()
            .flatten()
            .flat_map(|s| s.taps)
            .filter(|t| t.report.group == group && t.report.disk == disk && t.age_ms < 1500)
            .min_by_key(|t| t.age_ms);
        if let Some(t) = fresh {
            if t.report.unshipped_batches == 0 && t.report.journal_bytes == 0 && t.report.rpo_ms == 0 {
                return t.report;
            }
        }
        assert!(std::time::Instant::now() < deadline, "the async tap's journal did not drain within 120 s");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn site_up_again(site: &Site) {
    let out = rewind(&["dev", "up", "--dir", site.path().to_str().unwrap()]);
    assert!(out.status.success(), "dev up again: {}", String::from_utf8_lossy(&out.stderr));
}

/// Issue 3, test 3: the whole site is down for 10 s while fio writes through
/// an async tap. The tap answers until its journal is full, then holds the
/// guest back; when the site returns the journal drains and the log is the
/// backing file's history, each write once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_tap_rides_out_a_site_outage() {
    let (site, dir, backing) = site_with_disk().await;
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let tap = start_tap_with(&site, "g", "d0", &backing, &["--mode", "async", "--journal-max", "16MiB", "--metrics-listen", &metrics]);
    rewind_node::dev::down(site.path(), false).unwrap();
    let started = std::time::Instant::now();
    // 768 random 64 KiB writes, 48 MiB: three times what the journal holds.
    let mut fio = Command::new("fio")
        .args(["--name=w", "--ioengine=nbd", &format!("--uri={}", tap.uri), "--rw=randwrite", "--bs=64k", "--size=64M", "--io_size=48M", "--iodepth=8", "--randseed=7", "--refill_buffers=1", "--norandommap"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut peak, mut stalls) = (0f64, 0f64);
    while started.elapsed() < std::time::Duration::from_secs(10) {
        peak = peak.max(gauge(port, "rewind_tap_journal_bytes").unwrap_or(0.0));
        stalls = stalls.max(gauge(port, "rewind_tap_journal_stalls").unwrap_or(0.0));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let rpo = gauge(port, "rewind_tap_rpo_seconds").unwrap_or(0.0);
    const MIB: f64 = 1048576.0;
    assert!(fio.try_wait().unwrap().is_none(), "fio finished 48 MiB while the site was down and the journal holds 16 MiB");
    assert!((12.0 * MIB..=16.0 * MIB).contains(&peak), "the journal peaked at {peak} bytes, not near its 16 MiB bound");
    assert!(stalls >= 1.0, "the journal never held the guest back");
    assert!((8.0..=12.0).contains(&rpo), "RPO {rpo} s after 10 s of outage");
    site_up_again(&site);
    let out = fio.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("err= 0"), "fio failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report = drained(&site, "g", "d0").await;
    let events = log_of(&site, "g").await;
    assert_eq!(events.len(), 768, "each of fio's 768 writes once in the log");
    assert_eq!(report.shipped_lsn, 768);
    drop(tap);
    let replayed = dir.path().join("replayed.raw");
    replay_onto(&events, "d0", &replayed);
    compare(&replayed, &backing);
    eprintln!(
        "site down 10 s: journal peaked at {:.1} MiB of 16, {stalls} stalls, RPO {rpo:.1} s; drained after {:.1} s; 768 writes once each",
        peak / 1048576.0,
        started.elapsed().as_secs_f64()
    );
}

/// An async tap killed with SIGKILL and started again ships what its
/// journal holds, exactly once: once while it was shipping, and once with
/// the site down so nothing had been shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_async_tap_ships_its_journal_exactly_once() {
    let (site, dir, backing) = site_with_disk().await;
    let fio = |uri: &str, size: &str, pattern: &str| {
        run(Command::new("fio").args(["--name=w", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=write", "--bs=64k", &format!("--size={size}"), "--iodepth=8", &format!("--buffer_pattern={pattern}")]));
    };
    // Phase 1: the whole disk once, killed as soon as fio is done.
    let tap = start_tap_with(&site, "g", "d0", &backing, &["--mode", "async"]);
    fio(&tap.uri, "64M", "0x11");
    kill9(tap.child.id());
    let at_kill = site.leader().await.shards[0].groups.iter().find(|g| g.name == "g").map_or(0, |g| g.last_lsn);
    drop(tap);
    // Phase 2: the first 16 MiB again with the site down, then killed.
    rewind_node::dev::down(site.path(), false).unwrap();
    let tap = start_tap_with(&site, "g", "d0", &backing, &["--mode", "async"]);
    fio(&tap.uri, "16M", "0x22");
    kill9(tap.child.id());
    drop(tap);
    site_up_again(&site);
    let tap = start_tap_with(&site, "g", "d0", &backing, &["--mode", "async"]);
    drained(&site, "g", "d0").await;
    drop(tap);
    let events = log_of(&site, "g").await;
    assert_eq!(events.len(), 1024 + 256, "1024 + 256 writes of 64 KiB, each once");
    let mut seen = std::collections::BTreeMap::new();
    for e in &events {
        match &e.event {
            Event::Write { offset, data, .. } => *seen.entry((*offset, data[0])).or_insert(0) += 1,
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(seen.values().all(|n| *n == 1), "a write was shipped twice");
    assert_eq!(seen.len(), 1280);
    let replayed = dir.path().join("replayed.raw");
    replay_onto(&events, "d0", &replayed);
    compare(&replayed, &backing);
    eprintln!("killed with {at_kill} of 1024 phase-1 writes committed, then with 256 unshipped: 1280 writes in the log, each once");
}

/// Issue 18, item 1: three async writes, each flushed (so acknowledged)
/// while the site is down, then one byte flipped inside the first entry of
/// the journal. The tap refuses to start, names the segment and the byte,
/// and leaves the journal as it was; once the byte is mended it starts,
/// redoes and ships all three writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_journal_entry_stops_the_tap_and_loses_nothing() {
    let (site, dir, backing) = site_with_disk().await;
    // The tap learns the disk from the site; then the site goes down, so
    // the journal keeps every write.
    let tap = start_tap_with(&site, "g", "d0", &backing, &["--mode", "async"]);
    rewind_node::dev::down(site.path(), false).unwrap();
    for (i, pattern) in ["0x31", "0x32", "0x33"].iter().enumerate() {
        let at = format!("{}", i * 65536);
        run(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P {pattern} {at} 64k"), "-c", "flush", &tap.uri]));
    }
    kill9(tap.child.id());
    drop(tap);
    let journal = PathBuf::from(format!("{}.journal", backing.display()));
    let segment = std::fs::read_dir(&journal).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|x| x == "jnl")).expect("a journal segment");
    let good = std::fs::read(&segment).unwrap();
    let mut bad = good.clone();
    // Inside the first entry's payload: past its 4-byte length and its
    // 16-byte checksum.
    bad[4 + 16 + 1000] ^= 0x01;
    std::fs::write(&segment, &bad).unwrap();
    site_up_again(&site);
    let config = site.config();
    let mut child = Command::new(REWIND)
        .args(["tap", "--group", "g", "--disk", "d0", "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--mode", "async", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the tap started over a damaged journal (it should refuse)");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&segment.display().to_string()) && stderr.contains("damaged at byte 0") && stderr.contains("will not start"), "{stderr}");
    assert_eq!(std::fs::read(&segment).unwrap(), bad, "the journal must be left as it was");
    std::fs::write(&segment, &good).unwrap();
    let tap = start_tap_with(&site, "g", "d0", &backing, &["--mode", "async"]);
    drained(&site, "g", "d0").await;
    drop(tap);
    let events = log_of(&site, "g").await;
    let firsts: Vec<u8> = events.iter().filter_map(|e| match &e.event { Event::Write { data, .. } => Some(data[0]), _ => None }).collect();
    assert_eq!(firsts, vec![0x31, 0x32, 0x33], "all three acknowledged writes, once each, in order");
    let replayed = dir.path().join("replayed.raw");
    replay_onto(&events, "d0", &replayed);
    compare(&replayed, &backing);
}
