//! `groups`: ingest as the number of consistency groups grows.

use std::time::{Duration, Instant};

use anyhow::bail;
use rewind_node::client::Client;
use rewind_node::config::ClientConfig;
use rewind_node::load::{self, LoadSpec};
use rewind_wire::rpc::DiskSpec;

use crate::harness::*;
use crate::Cli;

/// The same bytes of 64 KiB writes spread over 1, 10 and 100 groups, one
/// producer per group, all at once; 16 batches in flight in all.
pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let mib = if cli.smoke { 8 } else { cli.mib.unwrap_or(256) };
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let mut lines = vec![
        format!("## groups: {mib} MiB of 64 KiB writes spread over N consistency groups, one producer per group, 16 batches in flight in all (one per group beyond 16 groups, so 100 at 100 groups), a fresh 3-node site per row\n"),
        "| groups | MB/s | events/s | commit p50 ms (all groups) | p99 ms | CPU s per GB (3 nodes) |".into(),
        "|---|---|---|---|---|---|".into(),
    ];
    for n in [1usize, 10, 100] {
        eprintln!("groups: {n}");
        let dir = work.path().join(format!("site-{n}"));
        let opts = rewind_node::dev::UpOptions::new(rewind_binary()?, 3, dir.clone());
        let client_path = rewind_node::dev::up(&opts).await?;
        let site = rewind_node::dev::DevSite::load(&dir)?;
        let result = async {
            let client = Client::new(&ClientConfig::load(&client_path)?)?;
            let disk_bytes = 4u64 << 30;
            for g in 0..n {
                client.create_group(&format!("g{g}"), vec![DiskSpec { name: "d0".into(), size_bytes: disk_bytes, sector_bytes: 512 }]).await?;
            }
            let size = 64usize << 10;
            let total = (mib << 20) / size as u64;
            let before: f64 = site.nodes.iter().map(|x| sample(x.pid).cpu_s).sum();
            let started = Instant::now();
            let runs = (0..n).map(|g| {
                let spec = LoadSpec {
                    group: format!("g{g}"),
                    disk: "d0".into(),
                    disk_bytes,
                    events: total / n as u64 + u64::from((g as u64) < total % n as u64),
                    sizes: vec![size],
                    window: (16 / n).max(1),
                    batch_bytes: 1 << 20,
                    seed: g as u64,
                    time_max: Duration::from_secs(600),
                };
                let client = client.clone();
                async move { load::run(client, &spec, |_, _| {}).await }
            });
            let reports = futures::future::join_all(runs).await;
            let elapsed = started.elapsed().as_secs_f64();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let cpu: f64 = site.nodes.iter().map(|x| sample(x.pid).cpu_s).sum::<f64>() - before;
            let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let (mut events, mut bytes) = (0u64, 0u64);
            for r in reports {
                let r = r?;
                if !r.errors.is_empty() {
                    bail!("{} batches failed: {}", r.errors.len(), r.errors[0]);
                }
                events += r.events;
                bytes += r.bytes;
                h.add(&r.latency_us).ok();
            }
            Ok::<_, anyhow::Error>(format!(
                "| {n} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} |",
                bytes as f64 / 1e6 / elapsed,
                events as f64 / elapsed,
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3,
                cpu / (bytes as f64 / 1e9)
            ))
        }
        .await;
        rewind_node::dev::down(&dir, true)?;
        lines.push(result?);
    }
    out.emit(&lines.join("\n"));
    Ok(())
}
