//! `append`: throughput and commit latency of appends on a local 3-node
//! site, disk bytes written and CPU per payload byte, beside the machine's
//! durable-write limit.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use rewind_node::client::Client;
use rewind_node::config::ClientConfig;
use rewind_node::load::{self, LoadSpec};
use rewind_wire::rpc::DiskSpec;

use crate::harness::*;
use crate::Cli;

pub(crate) struct Row {
    pub(crate) mb_s: f64,
    pub(crate) events_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) written_per_byte: Vec<f64>,
    pub(crate) cpu_s_per_gb: f64,
}

pub(crate) async fn append_row(dir: &Path, size: usize, mib: u64, window: usize) -> anyhow::Result<Row> {
    let opts = rewind_node::dev::UpOptions::new(rewind_binary()?, 3, dir.to_path_buf());
    let client_path = rewind_node::dev::up(&opts).await?;
    let site = rewind_node::dev::DevSite::load(dir)?;
    let result = async {
        let client = Client::new(&ClientConfig::load(&client_path)?)?;
        let disk_bytes = 64u64 << 30;
        client.create_group("bench", vec![DiskSpec { name: "d0".into(), size_bytes: disk_bytes, sector_bytes: 512 }]).await?;
        let events = (mib << 20) / size as u64;
        let spec = LoadSpec {
            group: "bench".into(),
            disk: "d0".into(),
            disk_bytes,
            events,
            sizes: vec![size],
            window,
            batch_bytes: 1 << 20,
            seed: 7,
            time_max: Duration::from_secs(600),
        };
        let before: Vec<ProcSample> = site.nodes.iter().map(|n| sample(n.pid)).collect();
        let report = load::run(client, &spec, |_, _| {}).await?;
        // Let followers finish applying before reading their counters.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after: Vec<ProcSample> = site.nodes.iter().map(|n| sample(n.pid)).collect();
        if !report.errors.is_empty() {
            bail!("{} batches failed: {}", report.errors.len(), report.errors[0]);
        }
        let secs = report.elapsed.as_secs_f64();
        let bytes = report.bytes as f64;
        let cpu: f64 = before.iter().zip(&after).map(|(b, a)| a.cpu_s - b.cpu_s).sum();
        let h = &report.latency_us;
        Ok(Row {
            mb_s: bytes / 1e6 / secs,
            events_s: report.events as f64 / secs,
            p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
            p999_ms: h.value_at_quantile(0.999) as f64 / 1e3,
            written_per_byte: before.iter().zip(&after).map(|(b, a)| (a.write_bytes - b.write_bytes) as f64 / bytes).collect(),
            cpu_s_per_gb: cpu / (bytes / 1e9),
        })
    }
    .await;
    rewind_node::dev::down(dir, true)?;
    result
}

/// The machine's durable-write limit: sequential writes of `size` bytes to a
/// file on the same disk, with an fdatasync after each write (`per_write`) or
/// after each MiB (group commit, as the log does).
pub(crate) fn fdatasync_limit(dir: &Path, size: usize, mib: u64, per_write: bool) -> anyhow::Result<f64> {
    let path = dir.join("fdatasync-probe");
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
    let block = vec![0x5au8; size];
    let total = (mib << 20) as usize;
    let started = Instant::now();
    let mut since_sync = 0usize;
    let mut written = 0usize;
    while written < total && started.elapsed() < Duration::from_secs(60) {
        f.write_all(&block)?;
        written += size;
        since_sync += size;
        if per_write || since_sync >= 1 << 20 {
            f.sync_data()?;
            since_sync = 0;
        }
    }
    f.sync_data()?;
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_file(&path).ok();
    Ok(written as f64 / 1e6 / secs)
}

pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let mib = cli.mib.unwrap_or(if cli.smoke { 8 } else { 512 });
    let runs = if cli.smoke { 1 } else { cli.runs.max(1) };
    let window = 16;
    let sizes = [4usize << 10, 64 << 10, 1 << 20];
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let mut lines = Vec::new();
    lines.push(format!("## append: one client, {window} batches of <= 1 MiB in flight, 3 nodes on one disk, {mib} MiB per run, median of {runs} (min-max)\n"));
    lines.push("| write size | MB/s | events/s | commit p50 ms | p99 ms | p99.9 ms | disk bytes written per payload byte (node 1/2/3) | CPU s per GB (3 nodes) | fdatasync limit MB/s, sync per write / per MiB | MB/s as share of per-MiB limit |".into());
    lines.push("|---|---|---|---|---|---|---|---|---|---|".into());
    for size in sizes {
        let mut rows = Vec::new();
        for run in 0..runs {
            eprintln!("append {}: run {}/{runs}", fmt_size(size), run + 1);
            rows.push(append_row(&work.path().join(format!("site-{size}-{run}")), size, mib, window).await?);
        }
        let per_write = fdatasync_limit(work.path(), size, mib.min(64), true)?;
        let per_mib = fdatasync_limit(work.path(), size, mib.min(256), false)?;
        let (mb, mb_lo, mb_hi) = median(rows.iter().map(|r| r.mb_s).collect());
        out.record(&format!("append.{}", match size { 4096 => "4k", 65536 => "64k", _ => "1m" }), mb);
        let (ev, _, _) = median(rows.iter().map(|r| r.events_s).collect());
        let (p50, _, _) = median(rows.iter().map(|r| r.p50_ms).collect());
        let (p99, _, _) = median(rows.iter().map(|r| r.p99_ms).collect());
        let (p999, _, _) = median(rows.iter().map(|r| r.p999_ms).collect());
        let (cpu, _, _) = median(rows.iter().map(|r| r.cpu_s_per_gb).collect());
        let written: Vec<String> =
            (0..3).map(|i| format!("{:.2}", median(rows.iter().map(|r| r.written_per_byte[i]).collect()).0)).collect();
        lines.push(format!(
            "| {} | {mb:.1} ({mb_lo:.1}-{mb_hi:.1}) | {ev:.0} | {p50:.1} | {p99:.1} | {p999:.1} | {} | {cpu:.1} | {per_write:.1} / {per_mib:.1} | {:.0}% |",
            fmt_size(size),
            written.join(" / "),
            100.0 * mb / per_mib
        ));
    }
    out.emit(&lines.join("\n"));
    Ok(())
}
