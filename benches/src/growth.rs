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
pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let disk_bytes: u64 = if cli.smoke { 1 << 20 } else { 16 << 20 };
    let runs = if cli.smoke { 1 } else { cli.runs.max(1) } as u64;
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let dir = work.path().join("site");
    let client_path = one_disk_site(&dir, disk_bytes).await?;
    let result = async {
        let client = Client::new(&ClientConfig::load(&client_path)?)?;
        let per_disk = disk_bytes / 4096;
        let mut lines = vec![
            format!("## growth: one {} MiB disk written over and over in random 4 KiB writes (16 batches of <= 1 MiB in flight); at each history level, {runs} probe(s) of one disk's worth of writes are timed, then the whole disk is replayed to a file from a follower {runs} time(s) after one untimed replay that waits for the follower to catch up; median (min-max)\n", disk_bytes >> 20),
            "| history before the probes (x disk size) | logged writes, after the probes | history GiB, after the probes | probe MB/s | probe commit p50 ms | p99 ms | replay s | replay ÷ replay at 1x |".into(),
            "|---|---|---|---|---|---|---|---|".into(),
        ];
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
            lines.push(format!(
                "| {level} | {written} | {:.2} | {m:.1} ({mlo:.1}-{mhi:.1}) | {:.1} | {:.1} | {r:.3} ({rlo:.3}-{rhi:.3}) | {:.2} |",
                (written * 4096) as f64 / (1u64 << 30) as f64,
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3,
                r / base.max(1e-9)
            ));
        }
        let plots = results_dir(cli).join(if cli.smoke { "smoke-plots" } else { "plots" });
        std::fs::create_dir_all(&plots)?;
        let size = format!("{} MiB disk", disk_bytes >> 20);
        std::fs::write(plots.join("growth-ingest.svg"), svg::growth(&format!("ingest probe MB/s as history grows ({size})"), "history, x disk size (log)", "MB/s", &[("rewind ingest", ingest_pts)]))?;
        std::fs::write(plots.join("growth-replay.svg"), svg::growth(&format!("replay of the whole disk as history grows ({size})"), "history, x disk size (log)", "replay ms", &[("rewind replay", replay_pts)]))?;
        let folder = plots.file_name().unwrap().to_string_lossy().to_string();
        lines.push(String::new());
        lines.push(format!("Plots: [growth-ingest.svg]({folder}/growth-ingest.svg), [growth-replay.svg]({folder}/growth-replay.svg)"));
        Ok::<_, anyhow::Error>(lines.join("\n"))
    }
    .await;
    rewind_node::dev::down(&dir, true)?;
    out.emit(&result?);
    Ok(())
}
