//! `growth`: ingest and replay of one small disk as its history grows.

use std::time::Duration;

use anyhow::bail;
use rewind_node::client::Client;
use rewind_node::config::ClientConfig;
use rewind_node::load::{self, LoadSpec};

use crate::harness::*;
use crate::{svg, Cli};


/// Ingest and replay as the history of one disk grows: the disk is written
/// over 1x, 10x and 100x its size in random 4 KiB writes, and at each level
/// probes of one disk's worth of writes are timed, then the whole disk is
/// replayed from a follower. Bytes on the disk stay the same, so any slowing
/// is the cost of history (log, index, compaction), not of data.
///
/// The series runs twice on fresh sites: with no retention policy (all
/// history kept), and with `--keep-bytes` at 3x the disk, where the
/// collector frees what the window leaves behind while the probes run.
pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let disk_bytes: u64 = if cli.smoke { 1 << 20 } else { 16 << 20 };
    let runs = if cli.smoke { 1 } else { cli.runs.max(1) } as u64;
    let mut lines = vec![
        format!("## growth: one {} MiB disk written over and over in random 4 KiB writes (16 batches of <= 1 MiB in flight); at each history level, {runs} probe(s) of one disk's worth of writes are timed, then the whole disk is replayed to a file from a follower {runs} time(s) after one untimed replay that waits for the follower to catch up; median (min-max). Once with no retention policy, then on fresh sites with `--keep-bytes` 3x the disk, the collector at its default pace (`gc_busy_percent`) and unpaced (100%); it runs meanwhile; debt and data directories are read after the probes\n", disk_bytes >> 20),
        "| policy | history before the probes (x disk size) | logged writes, after the probes | history GiB, after the probes | probe MB/s | probe commit p50 ms | p99 ms | replay s | replay ÷ replay at 1x | GC debt MiB (leader) | data dir MiB per node |".into(),
        "|---|---|---|---|---|---|---|---|---|---|---|".into(),
    ];
    let mut ingest_series = Vec::new();
    let mut replay_series = Vec::new();
    let default_busy = rewind_node::config::default_gc_busy_percent();
    for (keep, busy) in [(None, default_busy), (Some(3 * disk_bytes), default_busy), (Some(3 * disk_bytes), 100)] {
        let label = match keep {
            None => "all kept".to_string(),
            Some(k) => format!("keep {} MiB, collector busy <= {busy}%", k >> 20),
        };
        let (rows, ingest, replay) = series(disk_bytes, runs, keep, busy, &label).await?;
        lines.extend(rows);
        ingest_series.push((label.clone(), ingest));
        replay_series.push((label, replay));
    }
    let plots = results_dir(cli).join(if cli.smoke { "smoke-plots" } else { "plots" });
    std::fs::create_dir_all(&plots)?;
    let size = format!("{} MiB disk", disk_bytes >> 20);
    std::fs::write(plots.join("growth-ingest.svg"), svg::growth(&format!("ingest probe MB/s as history grows ({size})"), "history, x disk size (log)", "MB/s", &named(&ingest_series)))?;
    std::fs::write(plots.join("growth-replay.svg"), svg::growth(&format!("replay of the whole disk as history grows ({size})"), "history, x disk size (log)", "replay ms", &named(&replay_series)))?;
    let folder = plots.file_name().unwrap().to_string_lossy().to_string();
    lines.push(String::new());
    lines.push(format!("Plots: [growth-ingest.svg]({folder}/growth-ingest.svg), [growth-replay.svg]({folder}/growth-replay.svg)"));
    out.emit(&lines.join("\n"));
    Ok(())
}

type Points = Vec<(f64, f64)>;

fn named(v: &[(String, Points)]) -> Vec<(&str, Points)> {
    v.iter().map(|(n, p)| (n.as_str(), p.clone())).collect()
}

/// One series on a fresh site: its table rows and its ingest and replay
/// points.
async fn series(disk_bytes: u64, runs: u64, keep: Option<u64>, gc_busy_percent: u64, label: &str) -> anyhow::Result<(Vec<String>, Points, Points)> {
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let dir = work.path().join("site");
    let client_path = one_disk_site_with(&dir, disk_bytes, gc_busy_percent).await?;
    let result = async {
        let client = Client::new(&ClientConfig::load(&client_path)?)?;
        if let Some(k) = keep {
            let config = client_path.to_string_lossy().to_string();
            run_ok(std::process::Command::new(rewind_binary()?).args(["group", "set", "bench", "--keep-bytes", &format!("{}M", k >> 20), "--config", &config]))?;
        }
        let per_disk = disk_bytes / 4096;
        let mut lines = Vec::new();
        let (mut written, mut index) = (0u64, 0u64);
        let mut first_replay = None;
        let (mut ingest_pts, mut replay_pts) = (Vec::new(), Vec::new());
        for level in [1u64, 10, 100] {
            let target = level * per_disk;
            let load = |events: u64, index: u64| LoadSpec {
                group: "bench".into(),
                disk: "d0".into(),
                disk_bytes,
                events,
                sizes: vec![4096],
                window: 16,
                batch_bytes: 1 << 20,
                seed: index,
                time_max: Duration::from_secs(1800),
            };
            if target > written {
                eprintln!("growth: writing history up to {level}x ({} writes)", target - written);
                let r = load::run(client.clone(), &load(target - written, index), |_, _| {}).await?;
                if !r.errors.is_empty() || r.events != target - written {
                    bail!("history load stopped at {} of {} writes: {:?}", r.events, target - written, r.errors.first());
                }
                index += 1;
                written = target;
            }
            let mut mb = Vec::new();
            let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            for run in 0..runs {
                eprintln!("growth: {level}x, probe {}/{runs}", run + 1);
                let r = load::run(client.clone(), &load(per_disk, index), |_, _| {}).await?;
                if !r.errors.is_empty() {
                    bail!("{} batches failed: {}", r.errors.len(), r.errors[0]);
                }
                index += 1;
                written += r.events;
                mb.push(r.bytes as f64 / 1e6 / r.elapsed.as_secs_f64().max(1e-9));
                h.add(&r.latency_us).ok();
            }
            // One untimed replay first: it waits until the follower has
            // applied the probes, which is catch-up, not replay.
            let mut replay_s = Vec::new();
            for run in 0..=runs {
                let opts = rewind_node::replay::ReplayOptions {
                    group: "bench".into(),
                    disk: "d0".into(),
                    target: rewind_wire::rpc::Target::Latest,
                    out: work.path().join("replayed.raw"),
                    existing: rewind_replay::Existing::Replace,
                    node: Some(3),
                    wait: Duration::from_secs(120),
                };
                let r = rewind_node::replay::run(&client, &opts, |_, _| {}, |m| eprintln!("growth: {m}")).await?;
                if run > 0 {
                    replay_s.push(r.elapsed.as_secs_f64());
                }
            }
            let (m, mlo, mhi) = median(mb);
            let (r, rlo, rhi) = median(replay_s);
            let base = *first_replay.get_or_insert(r);
            ingest_pts.push((level as f64, m));
            replay_pts.push((level as f64, r * 1e3));
            let (debt, dirs) = collector_state(&client, &dir).await;
            lines.push(format!(
                "| {label} | {level} | {written} | {:.2} | {m:.1} ({mlo:.1}-{mhi:.1}) | {:.1} | {:.1} | {r:.3} ({rlo:.3}-{rhi:.3}) | {:.2} |",
                (written * 4096) as f64 / (1u64 << 30) as f64,
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3,
                r / base.max(1e-9),
            ));
            lines.last_mut().expect("pushed").push_str(&format!(" {debt} | {dirs} |"));
        }
        Ok::<_, anyhow::Error>((lines, ingest_pts, replay_pts))
    }
    .await;
    rewind_node::dev::down(&dir, true)?;
    result
}

/// The leader's collector debt for the group (MiB), and each node's data
/// directory (MiB), as table text.
async fn collector_state(client: &Client, dir: &std::path::Path) -> (String, String) {
    let debt = match client.call_leader(&rewind_wire::rpc::Request::Points { group: "bench".into(), on_leader: true }).await {
        Ok(rewind_wire::rpc::Response::Points(p)) => format!("{:.1}", p.retention.gc_debt_bytes as f64 / (1u64 << 20) as f64),
        _ => "?".into(),
    };
    let dirs = (1..=3).map(|n| dir_bytes(&dir.join(format!("node-{n}"))).map(|b| format!("{}", b >> 20)).unwrap_or_else(|| "?".into())).collect::<Vec<_>>().join(" / ");
    (debt, dirs)
}

/// Bytes of the files under `path`.
fn dir_bytes(path: &std::path::Path) -> Option<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(path).ok()? {
        let e = e.ok()?;
        let meta = e.metadata().ok()?;
        total += if meta.is_dir() { dir_bytes(&e.path())? } else { meta.len() };
    }
    Some(total)
}
