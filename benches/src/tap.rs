//! `tap`: fio through sync and async taps against qemu-nbd, and the async
//! tap's RPO at a steady rate.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rewind_node::client::Client;
use rewind_node::config::ClientConfig;
use rewind_wire::rpc::DiskSpec;

use crate::harness::*;
use crate::Cli;

/// Starts a tap on disk `disk` of group "bench"; returns it and its URI.
pub(crate) fn start_tap(exe: &Path, client: &Path, disk: &str, backing: &Path, extra: &[&str]) -> anyhow::Result<(Killed, String)> {
    spawn_uri(
        std::process::Command::new(exe)
            .args(["tap", "--group", "bench", "--disk", disk, "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--config", client.to_str().unwrap()])
            .args(extra),
    )
}

/// Waits (at most 10 minutes) until the async tap's journal is empty.
pub(crate) fn wait_drained(port: u16) -> anyhow::Result<()> {
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(1100));
    while gauge(port, "rewind_tap_journal_bytes").unwrap_or(1.0) > 0.0 {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the async tap's journal did not drain within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let seconds = if cli.smoke { 1 } else { 10 };
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let dir = work.path().join("site");
    let exe = rewind_binary()?;
    let opts = rewind_node::dev::UpOptions::new(exe.clone(), 3, dir.clone());
    let client_path = rewind_node::dev::up(&opts).await?;
    let result = async {
        let client = Client::new(&ClientConfig::load(&client_path)?)?;
        let disks = ["sync", "async"].map(|name| DiskSpec { name: name.into(), size_bytes: 1 << 30, sector_bytes: 512 });
        client.create_group("bench", disks.to_vec()).await?;
        let (_sync_tap, sync_uri) = start_tap(&exe, &client_path, "sync", &work.path().join("sync.raw"), &[])?;
        let metrics_port = free_port()?;
        let journal_mib = 256;
        let metrics = format!("127.0.0.1:{metrics_port}");
        let journal_max = format!("{journal_mib}MiB");
        let (_async_tap, async_uri) =
            start_tap(&exe, &client_path, "async", &work.path().join("async.raw"), &["--mode", "async", "--journal-max", &journal_max, "--metrics-listen", &metrics])?;
        let plain = work.path().join("plain.raw");
        std::fs::File::create(&plain)?.set_len(1 << 30)?;
        let port = free_port()?;
        let _qemu_nbd = Killed(
            std::process::Command::new("qemu-nbd")
                .args(["--format=raw", "--export-name=d0", "--bind=127.0.0.1", &format!("--port={port}"), "--persistent", "--shared=8", plain.to_str().unwrap()])
                .spawn()
                .context("start qemu-nbd (install qemu-utils with ops/setup-debian.sh)")?,
        );
        std::thread::sleep(Duration::from_millis(500));
        let peer_uri = format!("nbd://127.0.0.1:{port}/d0");
        let nbd = |uri: &str| vec!["--ioengine=nbd".to_string(), format!("--uri={uri}")];
        let mut lines = vec![
            format!("## tap: fio (nbd engine) for {seconds} s per row through `rewind tap`, sync (answered after commit on 2 of 3 nodes) and async (answered after fsync in the tap's {journal_mib} MiB journal, which starts each row empty), vs qemu-nbd on a plain file (no journaling, no fsync per write)
"),
            "| job | iodepth | sync IOPS | sync MB/s | sync clat p50 / p99 ms | async IOPS | async MB/s | async clat p50 / p99 ms | qemu-nbd IOPS | qemu-nbd MB/s | qemu-nbd clat p50 / p99 ms | sync / qemu-nbd | async / qemu-nbd |".into(),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|".into(),
        ];
        for (rw, bs) in [("randwrite", "4k"), ("write", "64k"), ("write", "1m")] {
            for iodepth in [1u32, 32] {
                eprintln!("tap: {rw} {bs} iodepth {iodepth}");
                let t = fio(&nbd(&sync_uri), rw, bs, iodepth, seconds)?;
                wait_drained(metrics_port)?;
                let a = fio(&nbd(&async_uri), rw, bs, iodepth, seconds)?;
                let q = fio(&nbd(&peer_uri), rw, bs, iodepth, seconds)?;
                out.record(&format!("tap.sync.{bs}.{iodepth}"), t.mb_s);
                out.record(&format!("tap.async.{bs}.{iodepth}"), a.mb_s);
                lines.push(format!(
                    "| {rw} {bs} | {iodepth} | {:.0} | {:.1} | {:.2} / {:.2} | {:.0} | {:.1} | {:.2} / {:.2} | {:.0} | {:.1} | {:.2} / {:.2} | {:.2} | {:.2} |",
                    t.iops, t.mb_s, t.clat_p50_ms, t.clat_p99_ms, a.iops, a.mb_s, a.clat_p50_ms, a.clat_p99_ms, q.iops, q.mb_s, q.clat_p50_ms, q.clat_p99_ms,
                    t.mb_s / q.mb_s.max(1e-9), a.mb_s / q.mb_s.max(1e-9)
                ));
            }
        }
        // RPO of the async tap under a steady 50 MB/s of 64 KiB writes.
        wait_drained(metrics_port)?;
        let rpo_seconds = if cli.smoke { 3 } else { 30 };
        eprintln!("tap: async RPO at 50 MB/s for {rpo_seconds} s");
        let job = std::process::Command::new("fio")
            .args(["--name=rpo", "--rw=write", "--bs=64k", "--iodepth=4", "--size=1G", "--time_based", &format!("--runtime={rpo_seconds}"), "--rate=50m", "--output-format=json"])
            .args(nbd(&async_uri))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("run fio")?;
        let started = Instant::now();
        let (mut rpo, mut fill) = (Vec::new(), Vec::new());
        std::thread::sleep(Duration::from_secs(1));
        while started.elapsed() < Duration::from_secs(rpo_seconds) {
            rpo.push(gauge(metrics_port, "rewind_tap_rpo_seconds").unwrap_or(f64::NAN) * 1000.0);
            fill.push(gauge(metrics_port, "rewind_tap_journal_bytes").unwrap_or(f64::NAN) / 1048576.0);
            std::thread::sleep(Duration::from_millis(250));
        }
        let json = fio_report(job.wait_with_output()?)?;
        let mb_s = json["jobs"][0]["write"]["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6;
        let pick = |v: &[f64], q: f64| {
            let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(((v.len() as f64 - 1.0) * q).round().max(0.0) as usize).copied().unwrap_or(f64::NAN)
        };
        lines.push(String::new());
        lines.push(format!("Async RPO under a steady load: fio 64 KiB sequential writes at --rate=50m for {rpo_seconds} s ({mb_s:.1} MB/s achieved); the tap's RPO gauge (age of the oldest unshipped write, refreshed every 250 ms) sampled every 250 ms, {} samples:", rpo.len()));
        lines.push(String::new());
        lines.push("| RPO p50 ms | RPO p99 ms | RPO max ms | journal fill p50 MiB | journal fill max MiB |".into());
        lines.push("|---|---|---|---|---|".into());
        lines.push(format!("| {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |", pick(&rpo, 0.5), pick(&rpo, 0.99), pick(&rpo, 1.0), pick(&fill, 0.5), pick(&fill, 1.0)));
        Ok::<_, anyhow::Error>(lines.join("\n"))
    }
    .await;
    rewind_node::dev::down(&dir, true)?;
    out.emit(&result?);
    Ok(())
}
