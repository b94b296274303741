//! `replay`: a 1 GiB disk replayed to a file and served over NBD after
//! growing histories, against restic restore and qemu-img convert.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rewind_node::client::Client;
use rewind_node::config::ClientConfig;
use rewind_node::load::{self, LoadSpec};

use crate::harness::*;
use crate::Cli;

/// Replay cost as the history grows: the same 1 GiB disk after more and
/// more 4 KiB writes at pseudo-random aligned offsets.
pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let stages: Vec<u64> = if cli.smoke { vec![100, 1000] } else { vec![10_000, 100_000, 1_000_000] };
    let disk_bytes: u64 = if cli.smoke { 64 << 20 } else { 1 << 30 };
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let dir = work.path().join("site");
    let client_path = one_disk_site(&dir, disk_bytes).await?;
    let result = async {
        let client = Client::new(&ClientConfig::load(&client_path)?)?;
        let mut lines = vec![
            format!("## replay: a {} MiB disk to a raw file (`rewind replay --latest`, from a follower, through the block index) and as an NBD export (`--serve`) after N logged 4 KiB writes at random aligned offsets, vs `restic restore` of the same image from a local restic repository (backed up just before, not timed) and `qemu-img convert` of it from a plain file; median (min-max) of {} runs (the --serve and restic columns: one run)
", disk_bytes >> 20, cli.runs.max(1)),
            "| logged writes | ingest s | data MiB (4 KiB blocks not known zero) | replay s | replay MB/s | --serve: first 4 KiB read, ms | --serve read by nbdcopy, MB/s | restic restore s | restic MB/s | qemu-img convert s | qemu-img MB/s | replay speed ÷ restic | replay speed ÷ qemu-img |".into(),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|".into(),
        ];
        let mut done = 0u64;
        for target in stages {
            eprintln!("replay: logging writes up to {target}");
            let spec = LoadSpec {
                group: "bench".into(),
                disk: "d0".into(),
                disk_bytes,
                events: target - done,
                sizes: vec![4096],
                window: 16,
                batch_bytes: 1 << 20,
                seed: target,
                time_max: Duration::from_secs(1800),
            };
            let report = load::run(client.clone(), &spec, |_, _| {}).await?;
            if !report.errors.is_empty() || report.events != target - done {
                bail!("load stopped at {} of {} events: {:?}", report.events, target - done, report.errors.first());
            }
            let ingest_s = report.elapsed.as_secs_f64();
            done = target;
            let image = work.path().join("replayed.raw");
            let (mut replay_s, mut convert_s) = (Vec::new(), Vec::new());
            let mut data_bytes = 0;
            for _ in 0..cli.runs.max(1) {
                let opts = rewind_node::replay::ReplayOptions {
                    group: "bench".into(),
                    disk: "d0".into(),
                    target: rewind_wire::rpc::Target::Latest,
                    out: image.clone(),
                    existing: rewind_replay::Existing::Replace,
                    node: Some(3),
                    wait: Duration::from_secs(120),
                };
                let r = rewind_node::replay::run(&client, &opts, |_, _| {}, |m| eprintln!("replay: {m}")).await?;
                replay_s.push(r.elapsed.as_secs_f64());
                data_bytes = r.data_bytes;
                let copy = work.path().join("converted.raw");
                let started = Instant::now();
                let status = std::process::Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "raw", image.to_str().unwrap(), copy.to_str().unwrap()])
                    .status()
                    .context("run qemu-img (install qemu-utils with ops/setup-debian.sh)")?;
                if !status.success() {
                    bail!("qemu-img convert failed");
                }
                convert_s.push(started.elapsed().as_secs_f64());
                std::fs::remove_file(&copy)?;
            }
            let (ttfb_ms, serve_s) = serve_once(&client_path)?;
            let restic = restic_restore_s(work.path(), &image)?;
            let (r, rmin, rmax) = median(replay_s);
            let (c, cmin, cmax) = median(convert_s);
            let mb = disk_bytes as f64 / 1e6;
            out.record("replay.file", mb / r);
            out.record("replay.serve", mb / serve_s);
            lines.push(format!(
                "| {target} | {ingest_s:.1} | {:.0} | {r:.2} ({rmin:.2}-{rmax:.2}) | {:.0} | {ttfb_ms:.0} | {:.0} | {:.2} | {:.0} | {c:.2} ({cmin:.2}-{cmax:.2}) | {:.0} | {:.2} | {:.2} |",
                data_bytes as f64 / 1048576.0,
                mb / r,
                mb / serve_s,
                restic,
                mb / restic,
                mb / c,
                restic / r,
                c / r
            ));
        }
        Ok::<_, anyhow::Error>(lines.join("\n"))
    }
    .await;
    rewind_node::dev::down(&dir, true)?;
    out.emit(&result?);
    Ok(())
}

/// Backs `image` up into a fresh local restic repository (not timed), then
/// times `restic restore` of it. Returns the restore's seconds.
pub(crate) fn restic_restore_s(work: &Path, image: &Path) -> anyhow::Result<f64> {
    let repo = work.join("restic-repo");
    let target = work.join("restic-restore");
    let _ = std::fs::remove_dir_all(&repo);
    let _ = std::fs::remove_dir_all(&target);
    let restic = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("restic")
            .args(["--repo", repo.to_str().unwrap(), "--quiet", "--no-cache"])
            .args(args)
            .env("RESTIC_PASSWORD", "rewind-bench")
            .output()
            .context("run restic (install it with `bash ops/setup-peers.sh`)")?;
        if !out.status.success() {
            bail!("restic {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    restic(&["init"])?;
    restic(&["backup", image.to_str().unwrap()])?;
    let started = Instant::now();
    restic(&["restore", "latest", "--target", target.to_str().unwrap()])?;
    let took = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&repo);
    let _ = std::fs::remove_dir_all(&target);
    Ok(took)
}

/// Starts `rewind replay --latest --serve` on a follower; returns the time
/// from the command's start to the first 4 KiB read by qemu-io, and the
/// seconds nbdcopy takes to read the whole disk through the export.
pub(crate) fn serve_once(client: &Path) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let (_export, uri) = spawn_uri(std::process::Command::new(rewind_binary()?).args([
        "replay", "bench", "--disk", "d0", "--latest", "--node", "3", "--serve", "127.0.0.1:0", "--config", client.to_str().unwrap(),
    ]))
    .context("start rewind replay --serve")?;
    let out = std::process::Command::new("qemu-io").args(["-r", "-f", "raw", &uri, "-c", "read 0 4096"]).output().context("run qemu-io")?;
    if !out.status.success() {
        bail!("qemu-io read failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let ttfb_ms = started.elapsed().as_secs_f64() * 1000.0;
    let copy = Instant::now();
    let status = std::process::Command::new("nbdcopy").args(["--requests=8", &uri, "null:"]).status().context("run nbdcopy")?;
    if !status.success() {
        bail!("nbdcopy failed");
    }
    Ok((ttfb_ms, copy.elapsed().as_secs_f64()))
}
