//! `rewind load`: generated writes, and their throughput and latency.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use rewind_wire::rpc::{Request, Response};
use serde::Serialize;

use super::{parse_size, ClientArgs};

#[derive(Args)]
pub struct LoadArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long)]
    group: String,
    #[arg(long)]
    disk: String,
    /// Number of write events.
    #[arg(long, default_value_t = 1000)]
    events: u64,
    /// Write sizes, cycled: e.g. 4K or 512,64K,1M.
    #[arg(long, default_value = "4K", value_delimiter = ',')]
    sizes: Vec<String>,
    /// Batches in flight.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Bytes per batch at most (one batch is one Raft entry).
    #[arg(long, default_value = "1M")]
    batch: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many seconds even if not all events were sent.
    #[arg(long, default_value_t = 600)]
    seconds_max: u64,
    #[arg(long)]
    json: bool,
}

/// `rewind load --json`.
#[derive(Serialize)]
struct LoadJson {
    events: u64,
    bytes: u64,
    seconds: f64,
    mb_per_s: f64,
    events_per_s: f64,
    latency_us_p50: u64,
    latency_us_p99: u64,
    latency_us_p999: u64,
    lsn_first: Option<u64>,
    lsn_last: Option<u64>,
    errors: Vec<String>,
}

pub async fn run(a: LoadArgs) -> anyhow::Result<()> {
    let client = a.client.client()?;
    let group = match client.call_leader(&Request::GroupState { group: a.group.clone() }).await? {
        Response::Group(g) => g,
        other => bail!("unexpected reply {other:?}"),
    };
    let disk = group.disks.iter().find(|d| d.name == a.disk).with_context(|| rewind_service::no_disk(&a.group, &a.disk, &group.disks))?;
    let sizes = a.sizes.iter().map(|s| parse_size(s).map(|v| v as usize)).collect::<anyhow::Result<Vec<_>>>()?;
    let spec = rewind_node::load::LoadSpec {
        group: a.group,
        disk: a.disk,
        disk_bytes: disk.size_bytes,
        events: a.events,
        sizes,
        window: a.window,
        batch_bytes: parse_size(&a.batch)? as usize,
        seed: a.seed,
        time_max: Duration::from_secs(a.seconds_max),
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let total = spec.events;
    let report = rewind_node::load::run(client, &spec, |events, bytes| {
        if tty {
            eprint!("\r{events}/{total} events, {:.1} MiB", bytes as f64 / (1 << 20) as f64);
        }
    })
    .await?;
    if tty {
        eprintln!();
    }
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    let h = &report.latency_us;
    let (first, last) = (report.acked.first().map(|a| a.lsn_first), report.acked.last().map(|a| a.lsn_last));
    if a.json {
        let out = LoadJson {
            events: report.events,
            bytes: report.bytes,
            seconds: secs,
            mb_per_s: report.bytes as f64 / 1e6 / secs,
            events_per_s: report.events as f64 / secs,
            latency_us_p50: h.value_at_quantile(0.5),
            latency_us_p99: h.value_at_quantile(0.99),
            latency_us_p999: h.value_at_quantile(0.999),
            lsn_first: first,
            lsn_last: last,
            errors: report.errors.clone(),
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "appended {} events ({:.1} MiB) in {:.2} s: {:.1} MB/s, {:.0} events/s; commit latency p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms; LSNs {}..={}",
            report.events, report.bytes as f64 / (1 << 20) as f64, secs, report.bytes as f64 / 1e6 / secs, report.events as f64 / secs,
            h.value_at_quantile(0.5) as f64 / 1e3, h.value_at_quantile(0.99) as f64 / 1e3, h.value_at_quantile(0.999) as f64 / 1e3,
            first.unwrap_or(0), last.unwrap_or(0)
        );
    }
    if !report.errors.is_empty() {
        bail!("{} batches failed; first: {}", report.errors.len(), report.errors[0]);
    }
    if report.events < total {
        bail!("stopped after {} s with {} of {total} events appended", a.seconds_max, report.events);
    }
    Ok(())
}
