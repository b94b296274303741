//! Reproducible benchmarks that print tables and never fail on a timing.
//!
//! `rewind-benches append`: append throughput and commit latency on a local
//! 3-node site for 4 KiB, 64 KiB and 1 MiB writes, with disk bytes written
//! per payload byte and CPU seconds per GB (both from /proc), beside the
//! machine's own durable-write limit measured in the same run.
//! `rewind-benches all` runs every benchmark. Results are printed and
//! written to `benches/results/<date>/`.


use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod append;
mod backup;
mod dr;
mod etcd;
mod groups;
mod growth;
mod harness;
mod ingest;
mod jetstream;
mod limits;
mod replay;
mod site;
mod svg;
mod tap;
mod wan;

use harness::{results_dir, Report};
pub(crate) use harness::Killed;

#[derive(Parser)]
#[command(name = "rewind-benches", about = "rewind's benchmarks: tables of measured figures, never a pass/fail on time.")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) bench: Bench,
    /// Small sizes: a smoke run of the harness (seconds, not minutes).
    #[arg(long, global = true)]
    pub(crate) smoke: bool,
    /// Payload bytes per row, in MiB (default 512; 8 with --smoke).
    #[arg(long, global = true)]
    pub(crate) mib: Option<u64>,
    /// Repeat each row this many times and report the median (and min-max).
    #[arg(long, global = true, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Where results go (default benches/results/<date>).
    #[arg(long, global = true)]
    pub(crate) out: Option<PathBuf>,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Bench {
    /// Append throughput and latency on a local 3-node site.
    Append,
    /// fio through the tap (sync and async mode) vs fio against qemu-nbd with
    /// no journaling, and the async tap's RPO at a steady 50 MB/s.
    Tap,
    /// Replay of a 1 GiB disk to a file after 10^4, 10^5 and 10^6 logged
    /// writes, vs qemu-img convert of the same image from a plain file.
    Replay,
    /// The same records into a rewind site and a 3-node NATS JetStream
    /// cluster (replicas=3, file storage), 1 and 64 in flight.
    Ingest,
    /// The machine's own ceilings: durable sequential writes (fio with
    /// fdatasync), O_DIRECT reads, and QUIC throughput of quinn on loopback
    /// with rewind's TLS and transport settings.
    Limits,
    /// Ingest throughput as the number of consistency groups grows (1, 10,
    /// 100), the same bytes in all, one producer per group.
    Groups,
    /// Cost growth with history: ingest throughput and replay time of one
    /// small disk after 1x, 10x and 100x its size has been written to it.
    Growth,
    /// The append and tap rows on loopback beside the same rows on a site
    /// of network namespaces (real addresses, NBD-TLS), and with a 1 ms RTT
    /// where the kernel has netem. Needs root for the namespaces.
    Site,
    /// Cross-site DR over a WAN emulated in user space (40 ms RTT, 0.1%
    /// loss, 400 Mbit/s): shipping rate, RPO under a 20 MB/s tap load,
    /// catch-up after a cut, wire bytes per byte, RTO, failback bytes.
    Dr,
    /// `rewind backup` of a 1 GiB qcow2 image (full, then an incremental
    /// after 5% was rewritten) vs nbdcopy of the same source and restic.
    Backup,
    /// Every benchmark.
    All,
}

/// Our figures as fractions of the machine's limits measured in the same
/// run; only rows whose two figures were both measured.
fn fractions(f: &std::collections::BTreeMap<String, f64>) -> String {
    let rows = [
        ("append 4 KiB MB/s (3 replicas on one disk)", "append.4k", "sequential 1 MiB writes with fdatasync", "limit.fdatasync.1m"),
        ("append 64 KiB MB/s (3 replicas on one disk)", "append.64k", "sequential 1 MiB writes with fdatasync", "limit.fdatasync.1m"),
        ("append 1 MiB MB/s (3 replicas on one disk)", "append.1m", "sequential 1 MiB writes with fdatasync", "limit.fdatasync.1m"),
        ("tap sync, 1 MiB writes, qd 32, MB/s", "tap.sync.1m.32", "sequential 1 MiB writes with fdatasync", "limit.fdatasync.1m"),
        ("tap async, 4 KiB random writes, qd 1, MB/s", "tap.async.4k.1", "sequential 4 KiB writes with fdatasync", "limit.fdatasync.4k"),
        ("replay to a file, fullest disk, MB/s", "replay.file", "O_DIRECT 1 MiB reads", "limit.direct_read"),
        ("replay --serve read by nbdcopy, fullest disk, MB/s", "replay.serve", "QUIC loopback, one stream", "limit.quic"),
    ];
    let mut lines = vec![
        "## fractions: our figures against this machine's limits, from this run\n".to_string(),
        "| figure | value | limit | limit value | fraction |".into(),
        "|---|---|---|---|---|".into(),
    ];
    for (what, key, limit, lkey) in rows {
        if let (Some(v), Some(l)) = (f.get(key), f.get(lkey)) {
            lines.push(format!("| {what} | {v:.1} | {limit} | {l:.1} | {:.2} |", v / l.max(1e-9)));
        }
    }
    lines.join("\n")
}


fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut out = Report::default();
    let benches = match cli.bench {
        Bench::All => vec![Bench::Limits, Bench::Append, Bench::Ingest, Bench::Groups, Bench::Growth, Bench::Tap, Bench::Replay, Bench::Site, Bench::Dr, Bench::Backup],
        b => vec![b],
    };
    for b in benches {
        match b {
            Bench::Append | Bench::All => runtime.block_on(append::run(&cli, &mut out))?,
            Bench::Tap => runtime.block_on(tap::run(&cli, &mut out))?,
            Bench::Replay => runtime.block_on(replay::run(&cli, &mut out))?,
            Bench::Ingest => runtime.block_on(ingest::run(&cli, &mut out))?,
            Bench::Limits => runtime.block_on(limits::run(&cli, &mut out))?,
            Bench::Groups => runtime.block_on(groups::run(&cli, &mut out))?,
            Bench::Growth => runtime.block_on(growth::run(&cli, &mut out))?,
            Bench::Site => runtime.block_on(site::run(&cli, &mut out))?,
            Bench::Dr => runtime.block_on(dr::run(&cli, &mut out))?,
            Bench::Backup => runtime.block_on(backup::run(&cli, &mut out))?,
        }
    }
    if cli.bench == Bench::All {
        let table = fractions(&out.figures);
        out.emit(&table);
    }
    let dir = results_dir(&cli);
    std::fs::create_dir_all(&dir)?;
    let name = match (cli.smoke, cli.bench) {
        (true, _) => "smoke.md",
        (false, Bench::Append) => "append.md",
        (false, Bench::Tap) => "tap.md",
        (false, Bench::Replay) => "replay.md",
        (false, Bench::Ingest) => "ingest.md",
        (false, Bench::Limits) => "limits.md",
        (false, Bench::Groups) => "groups.md",
        (false, Bench::Growth) => "growth.md",
        (false, Bench::Site) => "site.md",
        (false, Bench::Dr) => "dr.md",
        (false, Bench::Backup) => "backup.md",
        (false, Bench::All) => "all.md",
    };
    std::fs::write(dir.join(name), &out.text)?;
    eprintln!("results written to {}", dir.join(name).display());
    Ok(())
}
