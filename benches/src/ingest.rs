//! `ingest`: the same records into rewind, NATS JetStream and etcd.

use std::time::Duration;

use anyhow::bail;
use rewind_node::client::Client;
use rewind_node::config::ClientConfig;
use rewind_node::load::{self, LoadSpec};
use rewind_wire::rpc::DiskSpec;

use crate::harness::*;
use crate::{etcd, jetstream, svg, Cli};

/// Every run of one ingest row for one system: throughput per run, and
/// latency, CPU and bytes summed over the runs.
pub(crate) struct Runs {
    pub(crate) mb_s: Vec<f64>,
    pub(crate) records_s: Vec<f64>,
    pub(crate) latency_us: hdrhistogram::Histogram<u64>,
    pub(crate) cpu_s: f64,
    pub(crate) bytes: u64,
}

impl Runs {
    fn new() -> anyhow::Result<Runs> {
        let latency_us = hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)?;
        Ok(Runs { mb_s: Vec::new(), records_s: Vec::new(), latency_us, cpu_s: 0.0, bytes: 0 })
    }

    fn add(&mut self, records: u64, bytes: u64, elapsed: Duration, h: &hdrhistogram::Histogram<u64>, cpu_s: f64) {
        let secs = elapsed.as_secs_f64().max(1e-9);
        self.mb_s.push(bytes as f64 / 1e6 / secs);
        self.records_s.push(records as f64 / secs);
        self.latency_us.add(h).ok();
        self.cpu_s += cpu_s;
        self.bytes += bytes;
    }
}

/// The same records, one client, 1 and 64 in flight, into rewind and into
/// NATS JetStream; CPU of all server processes from /proc.
pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let (mib, seconds) = if cli.smoke { (cli.mib.unwrap_or(4), 2u64) } else { (cli.mib.unwrap_or(256), 5) };
    let runs = if cli.smoke { 1 } else { cli.runs.max(1) };
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let version = jetstream::server_version().ok_or_else(|| anyhow::anyhow!("nats-server is not installed: run `bash ops/setup-peers.sh` (Debian's nats-server package)"))?;
    let dir = work.path().join("site");
    let opts = rewind_node::dev::UpOptions::new(rewind_binary()?, 3, dir.clone());
    let client_path = rewind_node::dev::up(&opts).await?;
    let site = rewind_node::dev::DevSite::load(&dir)?;
    let etcd_version = etcd::server_version().ok_or_else(|| anyhow::anyhow!("etcd is not installed: run `bash ops/setup-peers.sh` (Debian's etcd-server package)"))?;
    std::fs::create_dir_all(work.path().join("nats"))?;
    std::fs::create_dir_all(work.path().join("etcd"))?;
    let nats = jetstream::start_cluster(&work.path().join("nats"), free_port);
    let etcd = etcd::start_cluster(&work.path().join("etcd"), free_port);
    let result = async {
        let nats = nats?;
        let etcd = etcd?;
        jetstream::create_stream(nats[0].port).await?;
        etcd::wait_ready(etcd[0].port).await?;
        let client = Client::new(&ClientConfig::load(&client_path)?)?;
        let disk_bytes = 64u64 << 30;
        client.create_group("bench", vec![DiskSpec { name: "d0".into(), size_bytes: disk_bytes, sector_bytes: 512 }]).await?;
        let plots = results_dir(cli).join(if cli.smoke { "smoke-plots" } else { "plots" });
        let mut plot_names: Vec<String> = Vec::new();
        let rewind_pids: Vec<u32> = site.nodes.iter().map(|n| n.pid).collect();
        let nats_pids: Vec<u32> = nats.iter().map(|n| n.child.id()).collect();
        let etcd_pids: Vec<u32> = etcd.iter().map(|n| n.child.id()).collect();
        let cpu = |pids: &[u32]| pids.iter().map(|p| sample(*p).cpu_s).sum::<f64>();
        let mut lines = vec![
            format!("## ingest: one client, the same records into a rewind 3-node site, a 3-node NATS JetStream cluster ({version}, replicas=3, file storage) and a 3-node etcd cluster ({etcd_version}, through its gRPC API and through its JSON gateway), {mib} MiB or {seconds} s per run, whichever ends first, {runs} run(s) per row taken in turn (rewind, JetStream, etcd over gRPC, etcd through the gateway, then again): MB/s is the median (min-max) of the runs, latency percentiles are over every record of every run; CPU of all three server processes from /proc
"),
            "Durability: rewind acknowledges after fsync on a majority; so does etcd (WAL fsync). JetStream 2.9 acknowledges after the write reaches a quorum's memory and syncs its files every 2 minutes (`sync_interval: always` arrived in 2.10, so this server cannot run it): its rows are **not durable at acknowledgement**. etcd is driven through its native gRPC API (one HTTP/2 channel, requests multiplexed on it: the way its clients drive it; the messages are declared by hand, as in etcd's rpc.proto) and, for comparison with earlier runs, through its HTTP/JSON gateway (values base64), which costs it CPU a gRPC client does not spend.".into(),
            String::new(),
            "| record | in flight | system | durable at ack | MB/s, median (min-max) | records/s | ack p50 ms | p99 ms | p99.9 ms | CPU s per GB (3 servers) | rewind MB/s ÷ this |".into(),
            "|---|---|---|---|---|---|---|---|---|---|---|".into(),
        ];
        for size in [4096usize, 64 << 10, 1 << 20] {
            for window in [1usize, 64] {
                let records = ((mib << 20) / size as u64).max(1);
                // rewind, JetStream, etcd through the gateway, etcd over gRPC: every run of each.
                let mut acc: Vec<Runs> = (0..4).map(|_| Runs::new()).collect::<anyhow::Result<_>>()?;
                for run in 0..runs {
                    eprintln!("ingest: {} x {records}, {window} in flight, run {}/{runs}", fmt_size(size), run + 1);
                    let spec = LoadSpec {
                        group: "bench".into(),
                        disk: "d0".into(),
                        disk_bytes,
                        events: records,
                        sizes: vec![size],
                        window,
                        batch_bytes: size,
                        seed: size as u64 + window as u64 + run as u64,
                        time_max: Duration::from_secs(seconds),
                    };
                    let before = cpu(&rewind_pids);
                    let r = load::run(client.clone(), &spec, |_, _| {}).await?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if !r.errors.is_empty() {
                        bail!("{} batches failed: {}", r.errors.len(), r.errors[0]);
                    }
                    acc[0].add(r.events, r.bytes, r.elapsed, &r.latency_us, cpu(&rewind_pids) - before);
                    let before = cpu(&nats_pids);
                    let j = jetstream::publish(nats[0].port, size, records, window, Duration::from_secs(seconds)).await?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    acc[1].add(j.records, j.bytes, j.elapsed, &j.latency_us, cpu(&nats_pids) - before);
                    let before = cpu(&etcd_pids);
                    let g = etcd::put_grpc(etcd[0].port, size, records, window, Duration::from_secs(seconds)).await?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    acc[3].add(g.records, g.bytes, g.elapsed, &g.latency_us, cpu(&etcd_pids) - before);
                    let before = cpu(&etcd_pids);
                    let e = etcd::put(etcd[0].port, size, records, window, Duration::from_secs(seconds)).await?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    acc[2].add(e.records, e.bytes, e.elapsed, &e.latency_us, cpu(&etcd_pids) - before);
                }
                let plot = svg::percentiles(
                    &format!("ack latency, {} records, {window} in flight, {runs} run(s)", fmt_size(size)),
                    &[("rewind", &acc[0].latency_us), ("etcd (gRPC)", &acc[3].latency_us), ("etcd (gateway)", &acc[2].latency_us), ("JetStream (no fsync)", &acc[1].latency_us)],
                );
                let name = format!("ingest-latency-{}-{window}.svg", fmt_size(size).replace(' ', ""));
                std::fs::create_dir_all(&plots)?;
                std::fs::write(plots.join(&name), plot)?;
                plot_names.push(name);
                let ours = median(acc[0].mb_s.clone()).0;
                for (name, durable, row) in [
                    ("rewind", "yes (fsync, majority)", &acc[0]),
                    ("NATS JetStream", "no (fsync every 2 min)", &acc[1]),
                    ("etcd (gRPC)", "yes (WAL fsync, majority)", &acc[3]),
                    ("etcd (JSON gateway)", "yes (WAL fsync, majority)", &acc[2]),
                ] {
                    let (mb, lo, hi) = median(row.mb_s.clone());
                    let h = &row.latency_us;
                    lines.push(format!(
                        "| {} | {window} | {name} | {durable} | {mb:.1} ({lo:.1}-{hi:.1}) | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {} |",
                        fmt_size(size),
                        median(row.records_s.clone()).0,
                        h.value_at_quantile(0.5) as f64 / 1e3,
                        h.value_at_quantile(0.99) as f64 / 1e3,
                        h.value_at_quantile(0.999) as f64 / 1e3,
                        row.cpu_s / (row.bytes as f64 / 1e9).max(1e-9),
                        if name == "rewind" { String::new() } else { format!("{:.2}", ours / mb.max(1e-9)) }
                    ));
                }
            }
        }
        lines.push(String::new());
        lines.push(format!("Latency percentile plots: {}", plot_names.iter().map(|n| format!("[{n}]({}/{n})", plots.file_name().unwrap().to_string_lossy())).collect::<Vec<_>>().join(", ")));
        Ok::<_, anyhow::Error>(lines.join("\n"))
    }
    .await;
    rewind_node::dev::down(&dir, true)?;
    out.emit(&result?);
    Ok(())
}
