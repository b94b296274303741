//! `dr`: cross-site DR over a WAN. Two local 3-node sites; the secondary
//! pulls the primary's log through a user-space relay (`wan.rs`: 40 ms
//! round trip, 0.1% loss, 400 Mbit/s each way, since this kernel has no
//! netem). Measured in one run: shipping under a steady 20 MB/s tap load
//! (fio through a sync tap) and the cross-site RPO it leaves (p50, p99);
//! the catch-up rate after a 10 s cut, as a share of the cap; bytes on the
//! wire per changed byte for a workload that rewrites what was shipped,
//! with new bytes and with bytes the secondary holds (hashes first);
//! RTO from `rewind failover` to the first read the export answers; and a
//! failback's bytes against what diverged and against a full resync.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rewind_node::client::Client;
use rewind_node::config::{ClientConfig, NodeAddr};
use rewind_node::load::{self, LoadSpec};
use rewind_wire::rpc::DiskSpec;

use crate::harness::*;
use crate::wan;
use crate::Cli;

const GROUP: &str = "vm1";
const DISK_BYTES: u64 = 1 << 30;
/// 400 Mbit/s.
const CAP: u64 = 50_000_000;

/// Takes both dev sites down, however the run ends.
struct Sites<'a>(&'a Path, &'a Path);

impl Drop for Sites<'_> {
    fn drop(&mut self) {
        let _ = rewind_node::dev::down(self.0, true);
        let _ = rewind_node::dev::down(self.1, true);
    }
}

async fn write_at(client: &Client, mib: u64, region: u64, seed: u64) -> anyhow::Result<u64> {
    let spec = LoadSpec {
        group: GROUP.into(),
        disk: "d0".into(),
        disk_bytes: region,
        events: (mib << 20) / (64 << 10),
        sizes: vec![64 << 10],
        window: 32,
        batch_bytes: 1 << 20,
        seed,
        time_max: Duration::from_secs(300),
    };
    let r = load::run(client.clone(), &spec, |_, _| {}).await?;
    if !r.errors.is_empty() {
        bail!("{} batches failed: {}", r.errors.len(), r.errors[0]);
    }
    Ok(r.bytes)
}

/// Waits until B holds A's head; returns how long it took.
async fn caught_up(a: &Client, b: &Client, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let (ia, ib) = (rewind_node::dr::state(a, GROUP, None).await?, rewind_node::dr::state(b, GROUP, None).await?);
        if ia.last_lsn == ib.last_lsn && ia.digest_hex == ib.digest_hex {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!("site b did not catch up within {within:?} ({} of {})", ib.last_lsn, ia.last_lsn);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("rewind-bench-dr-").tempdir_in("/var/tmp")?;
    let (da, db) = (work.path().join("a"), work.path().join("b"));
    let exe = rewind_binary()?;
    let ca = rewind_node::dev::up(&rewind_node::dev::UpOptions::new(exe.clone(), 3, da.clone())).await?;
    let _sites = Sites(&da, &db);
    let cb = rewind_node::dev::up(&rewind_node::dev::UpOptions::new(exe.clone(), 3, db.clone())).await?;
    let a = Client::new(&ClientConfig::load(&ca)?)?;
    let b = Client::new(&ClientConfig::load(&cb)?)?;
    a.create_group(GROUP, vec![DiskSpec { name: "d0".into(), size_bytes: DISK_BYTES, sector_bytes: 512 }]).await?;

    // The WAN: a relay in front of each of A's nodes; B reaches A only
    // through them.
    // REWIND_WAN=ONE_WAY_MS,LOSS (e.g. 0,0) changes the link, to see what
    // the WAN itself costs.
    let (one_way_ms, loss) = match std::env::var("REWIND_WAN") {
        Ok(v) => {
            let (d, l) = v.split_once(',').context("REWIND_WAN=ONE_WAY_MS,LOSS")?;
            (d.parse::<u64>()?, l.parse::<f64>()?)
        }
        Err(_) => (20, 0.001),
    };
    let shape = wan::Shape { one_way: Duration::from_millis(one_way_ms), loss, rate: CAP };
    let mut relays = Vec::new();
    let mut nodes = Vec::new();
    for n in rewind_node::dev::DevSite::load(&da)?.nodes {
        let target = format!("127.0.0.1:{}", n.addr.port()).parse()?;
        let r = wan::relay(target, shape, n.id).await?;
        nodes.push(NodeAddr { id: n.id, addr: r.addr.to_string().parse()? });
        relays.push(r);
    }
    let peer_here = ClientConfig { nodes, tls: ClientConfig::load(&da.join("peer.toml"))?.tls };
    let plan = rewind_node::dr::LinkPlan {
        group: GROUP.into(),
        here: "a".into(),
        there: "b".into(),
        to_there: rewind_node::dr::link_from(&ClientConfig::load(&db.join("peer.toml"))?)?,
        to_here: rewind_node::dr::link_from(&peer_here)?,
        rpo_alarm_ms: 0,
        max_rate_bytes: 0,
    };
    rewind_node::dr::link(&a, &b, &plan).await?;
    let wire = |relays: &[wan::Relay]| relays.iter().map(|r| r.bytes.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>();

    // 1. A steady load through a sync tap at A (10 and 20 MB/s); the RPO
    // B is left with.
    let seconds: u64 = if cli.smoke { 5 } else { 30 };
    let backing = work.path().join("vm1.raw");
    let (_tap, uri) = spawn_uri(Command::new(&exe).args(["tap", "--group", GROUP, "--disk", "d0", "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--config", ca.to_str().unwrap()]))?;
    let wire0 = wire(&relays);
    let mut shipped_all = 0u64;
    let mut load_rows = String::new();
    let rates: &[u64] = if cli.smoke { &[20] } else { &[10, 20] };
    for &rate in rates {
        let b_bytes0 = rewind_node::dr::state(&b, GROUP, None).await?.payload_bytes;
        let fio = tokio::task::spawn_blocking({
            let uri = uri.clone();
            move || {
                Command::new("fio")
                    .args(["--name=dr", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=64k", "--iodepth=16", &format!("--rate={rate}m"), "--size=1G", "--time_based", &format!("--runtime={seconds}"), "--output-format=json"])
                    .output()
            }
        });
        let started = Instant::now();
        let mut rpo = Vec::new();
        while !fio.is_finished() && started.elapsed() < Duration::from_secs(seconds + 60) {
            let (ia, ib) = (rewind_node::dr::state(&a, GROUP, None).await?, rewind_node::dr::state(&b, GROUP, None).await?);
            let (_, _, secs) = rewind_node::dr::lag(&ia, (ib.last_lsn, ib.last_time_ns, ib.payload_bytes));
            rpo.push(secs);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let fio_json = fio_report(fio.await.context("fio task")??)?;
        let fio_mb_s = fio_json["jobs"][0]["write"]["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6;
        let load_elapsed = started.elapsed();
        let drain = caught_up(&a, &b, Duration::from_secs(300)).await?;
        let shipped = rewind_node::dr::state(&b, GROUP, None).await?.payload_bytes - b_bytes0;
        shipped_all += shipped;
        let ship_mb_s = shipped as f64 / 1e6 / (load_elapsed + drain).as_secs_f64();
        rpo.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
        let (p50, p99, max) = (pct(&rpo, 0.5), pct(&rpo, 0.99), rpo.last().copied().unwrap_or(0.0));
        out.record(&format!("dr_rpo_p99_s_{rate}mb"), p99);
        load_rows.push_str(&format!(
            "| tap load at site A: fio, nbd engine, 64 KiB random writes, --rate={rate}m, {seconds} s | {fio_mb_s:.1} MB/s; shipped {ship_mb_s:.1} MB/s ({:.0}% of the cap), B caught up {:.2} s after fio ended |\n\
| cross-site RPO under that load, every 200 ms ({} samples) | p50 {p50:.3} s, p99 {p99:.3} s, max {max:.3} s |\n",
            100.0 * ship_mb_s * 1e6 / CAP as f64,
            drain.as_secs_f64(),
            rpo.len()
        ));
    }
    let shipped = shipped_all;

    // 2. The link cut while A takes writes that rewrite a 64 MiB region
    // over and over; then the catch-up rate, and wire bytes per byte.
    let backlog_mib: u64 = if cli.smoke { 32 } else { 256 };
    let b_bytes1 = rewind_node::dr::state(&b, GROUP, None).await?.payload_bytes;
    let wire1 = wire(&relays);
    relays.iter().for_each(|r| r.set_cut(true));
    let cut_started = Instant::now();
    write_at(&a, backlog_mib, 64 << 20, 11).await?;
    let min_cut = Duration::from_secs(if cli.smoke { 2 } else { 10 });
    if let Some(rest) = min_cut.checked_sub(cut_started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    relays.iter().for_each(|r| r.set_cut(false));
    let catch_up = caught_up(&a, &b, Duration::from_secs(600)).await?;
    let backlog = rewind_node::dr::state(&b, GROUP, None).await?.payload_bytes - b_bytes1;
    let catch_mb_s = backlog as f64 / 1e6 / catch_up.as_secs_f64();
    let wire_per_byte = (wire(&relays) - wire1) as f64 / backlog.max(1) as f64;
    let wire_per_byte_tap = (wire1 - wire0) as f64 / shipped.max(1) as f64;
    // 2b. The same writes again (the same seed: the same offsets and
    // bytes), as a restore or a copy inside the guest would: B holds every
    // block, so hashes cross, not blocks.
    let repeat_mib: u64 = if cli.smoke { 16 } else { 64 };
    let (b_bytes2, wire2) = (rewind_node::dr::state(&b, GROUP, None).await?.payload_bytes, wire(&relays));
    write_at(&a, repeat_mib, 64 << 20, 11).await?;
    caught_up(&a, &b, Duration::from_secs(600)).await?;
    let repeated = rewind_node::dr::state(&b, GROUP, None).await?.payload_bytes - b_bytes2;
    let wire_per_byte_repeat = (wire(&relays) - wire2) as f64 / repeated.max(1) as f64;

    // 3. A writes on while cut off (events B never gets); B fails over
    // (forced: A still answers B's... nothing, but B heard of A lately) and
    // serves the disk: RTO to the first read answered.
    relays.iter().for_each(|r| r.set_cut(true));
    let diverged_mib: u64 = if cli.smoke { 4 } else { 32 };
    write_at(&a, diverged_mib, DISK_BYTES, 12).await?;
    drop(_tap);
    let rto_started = Instant::now();
    let (serving, furi) = spawn_uri(Command::new(&exe).args(["failover", GROUP, "--latest", "--force", "--serve", "127.0.0.1:0", "--config", cb.to_str().unwrap()]))?;
    let read = Command::new("qemu-io").args(["-r", "-f", "raw", &furi, "-c", "read 0 4k"]).output().context("qemu-io")?;
    let rto = rto_started.elapsed();
    if !read.status.success() {
        bail!("the failed-over export did not answer a read: {}", String::from_utf8_lossy(&read.stderr));
    }
    drop(serving);
    // B writes its own branch; A, back on the link, fails back.
    let b_written_mib: u64 = if cli.smoke { 4 } else { 32 };
    write_at(&b, b_written_mib, DISK_BYTES, 13).await?;
    relays.iter().for_each(|r| r.set_cut(false));
    let deadline = Instant::now() + Duration::from_secs(60);
    while rewind_node::dr::state(&a, GROUP, None).await?.epoch < 2 {
        if Instant::now() > deadline {
            bail!("site a never heard of the failover");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fb = Command::new(&exe).args(["failback", GROUP, "--config", ca.to_str().unwrap()]).output()?;
    let said = String::from_utf8_lossy(&fb.stdout).to_string();
    if !fb.status.success() {
        bail!("failback: {}", String::from_utf8_lossy(&fb.stderr));
    }
    let received: u64 = said.split("having received ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).context("failback's received bytes")?;
    let full = rewind_node::dr::state(&b, GROUP, None).await?.payload_bytes;

    out.record("dr_catch_up_share_of_cap", catch_mb_s * 1e6 / CAP as f64);
    out.emit(&format!(
        "## dr: cross-site DR over a WAN (user-space relay: 40 ms RTT, 0.1% loss, 400 Mbit/s each way)\n\n\
| figure | value |\n|---|---|\n\
{load_rows}\
| catch-up after a {:.0} s cut with {backlog_mib} MiB written meanwhile | {catch_mb_s:.1} MB/s ({:.0}% of the cap), {:.1} s |\n\
| bytes on the wire per payload byte shipped: tap load (random data) | {wire_per_byte_tap:.3} |\n\
| bytes on the wire per payload byte shipped: rewrites of one 64 MiB region with new random bytes | {wire_per_byte:.3} |\n\
| bytes on the wire per payload byte shipped: {repeat_mib} MiB of those writes again (blocks site B holds: hashes cross) | {wire_per_byte_repeat:.3} |\n\
| RTO: `rewind failover --latest --serve` to the first 4 KiB read answered (qemu-io) | {:.2} s |\n\
| failback: bytes received by the old primary / what the new primary wrote since the fork / a full resync (all payload bytes) | {received} / {} / {full} ({:.1}% of a full resync) |\n\n\
New bytes cost their size on the wire (zstd only helps compressible data); blocks the secondary holds cross as 40-byte hashes. \
The relay is user space on the same two cores as both sites' six nodes, so the figures include its cost.",
        min_cut.as_secs_f64(),
        100.0 * catch_mb_s * 1e6 / CAP as f64,
        catch_up.as_secs_f64(),
        rto.as_secs_f64(),
        b_written_mib << 20,
        100.0 * received as f64 / full.max(1) as f64,
    ));
    Ok(())
}
