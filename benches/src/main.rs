//! Reproducible benchmarks that print tables and never fail on a timing.
//!
//! `rewind-benches append`: append throughput and commit latency on a local
//! 3-node site for 4 KiB, 64 KiB and 1 MiB writes, with disk bytes written
//! per payload byte and CPU seconds per GB (both from /proc), beside the
//! machine's own durable-write limit measured in the same run.
//! `rewind-benches all` runs every benchmark. Results are printed and
//! written to `benches/results/<date>/`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use rewind_node::client::Client;
use rewind_node::config::{ClientConfig, RaftTuning};
use rewind_node::load::{self, LoadSpec};
use rewind_wire::rpc::DiskSpec;

mod etcd;
mod jetstream;
mod svg;

#[derive(Parser)]
#[command(name = "rewind-benches", about = "rewind's benchmarks: tables of measured figures, never a pass/fail on time.")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
    /// Small sizes: a smoke run of the harness (seconds, not minutes).
    #[arg(long, global = true)]
    smoke: bool,
    /// Payload bytes per row, in MiB (default 512; 8 with --smoke).
    #[arg(long, global = true)]
    mib: Option<u64>,
    /// Repeat each row this many times and report the median (and min-max).
    #[arg(long, global = true, default_value_t = 3)]
    runs: usize,
    /// Where results go (default benches/results/<date>).
    #[arg(long, global = true)]
    out: Option<PathBuf>,
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
    /// Every benchmark.
    All,
}

/// Key figures of this run, by name, for the fractions table of `all`.
static FIGURES: std::sync::Mutex<std::collections::BTreeMap<String, f64>> = std::sync::Mutex::new(std::collections::BTreeMap::new());

fn record(name: &str, value: f64) {
    FIGURES.lock().expect("figures lock").insert(name.to_string(), value);
}

/// Our figures as fractions of the machine's limits measured in the same
/// run; only rows whose two figures were both measured.
fn fractions() -> String {
    let f = FIGURES.lock().expect("figures lock").clone();
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

/// CPU time and bytes written of one process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    cpu_s: f64,
    write_bytes: u64,
}

fn sample(pid: u32) -> ProcSample {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let cpu = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let write_bytes = io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // Fields after the command: utime is the 12th, stime the 13th (0-based 11, 12).
    ProcSample { cpu_s: (cpu(11) + cpu(12)) / ticks, write_bytes }
}

struct Row {
    mb_s: f64,
    events_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    written_per_byte: Vec<f64>,
    cpu_s_per_gb: f64,
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn rewind_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("REWIND_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let sibling = exe.parent().context("benchmark binary has no folder")?.join("rewind");
    if !sibling.exists() {
        bail!("{} not found: build it first with `cargo build -p rewind-node` (or set REWIND_BIN)", sibling.display());
    }
    Ok(sibling)
}

async fn append_row(dir: &Path, size: usize, mib: u64, window: usize) -> anyhow::Result<Row> {
    let opts = rewind_node::dev::UpOptions { exe: rewind_binary()?, nodes: 3, dir: dir.to_path_buf(), raft: RaftTuning::default() };
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
fn fdatasync_limit(dir: &Path, size: usize, mib: u64, per_write: bool) -> anyhow::Result<f64> {
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

fn fmt_size(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

async fn bench_append(cli: &Cli, out: &mut String) -> anyhow::Result<()> {
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
        record(&format!("append.{}", match size { 4096 => "4k", 65536 => "64k", _ => "1m" }), mb);
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
    emit(out, &lines.join("\n"));
    Ok(())
}

/// Prints a benchmark's table and adds it to the results file's text.
fn emit(out: &mut String, table: &str) {
    println!("{table}\n");
    out.push_str(table);
    out.push_str("\n\n");
}

/// fio's JSON report from a finished run (`--output-format=json`).
fn fio_report(out: std::process::Output) -> anyhow::Result<serde_json::Value> {
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text[text.find('{').unwrap_or(0)..]).context("parse fio's JSON")
}

/// One fio job's figures, from its JSON output.
struct FioResult {
    iops: f64,
    mb_s: f64,
    clat_p50_ms: f64,
    clat_p99_ms: f64,
}

fn fio(target: &[String], rw: &str, bs: &str, iodepth: u32, seconds: u32) -> anyhow::Result<FioResult> {
    let out = std::process::Command::new("fio")
        .args(["--name=bench", &format!("--rw={rw}"), &format!("--bs={bs}"), &format!("--iodepth={iodepth}"), "--size=1G", "--time_based", &format!("--runtime={seconds}"), "--randseed=1", "--output-format=json"])
        .args(target)
        .output()
        .context("run fio (install it with ops/setup-debian.sh)")?;
    let json = fio_report(out)?;
    let w = &json["jobs"][0]["write"];
    let pct = |p: &str| w["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1e6;
    Ok(FioResult { iops: w["iops"].as_f64().unwrap_or(0.0), mb_s: w["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6, clat_p50_ms: pct("50.000000"), clat_p99_ms: pct("99.000000") })
}

/// A child process stopped (SIGTERM, then reaped) when dropped.
struct Killed(std::process::Child);

impl Killed {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One gauge from a Prometheus endpoint on loopback.
fn gauge(port: u16, name: &str) -> Option<f64> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Starts a tap on disk `disk` of group "bench"; returns it and its URI.
fn start_tap(exe: &Path, client: &Path, disk: &str, backing: &Path, extra: &[&str]) -> anyhow::Result<(Killed, String)> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(exe)
        .args(["tap", "--group", "bench", "--disk", disk, "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--config", client.to_str().unwrap()])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start the tap")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("tap stdout")?).read_line(&mut line)?;
    let tap = Killed(child);
    let uri = line.split_whitespace().find(|w| w.starts_with("nbd://")).context("the tap printed no URI")?.to_string();
    Ok((tap, uri))
}

/// Waits (at most 10 minutes) until the async tap's journal is empty.
fn wait_drained(port: u16) -> anyhow::Result<()> {
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

async fn bench_tap(cli: &Cli, out: &mut String) -> anyhow::Result<()> {
    let seconds = if cli.smoke { 1 } else { 10 };
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let dir = work.path().join("site");
    let exe = rewind_binary()?;
    let opts = rewind_node::dev::UpOptions { exe: exe.clone(), nodes: 3, dir: dir.clone(), raft: RaftTuning::default() };
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
                record(&format!("tap.sync.{bs}.{iodepth}"), t.mb_s);
                record(&format!("tap.async.{bs}.{iodepth}"), a.mb_s);
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
    emit(out, &result?);
    Ok(())
}

/// Replay cost as the history grows: the same 1 GiB disk after more and
/// more 4 KiB writes at pseudo-random aligned offsets.
async fn bench_replay(cli: &Cli, out: &mut String) -> anyhow::Result<()> {
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
            record("replay.file", mb / r);
            record("replay.serve", mb / serve_s);
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
    emit(out, &result?);
    Ok(())
}

/// Backs `image` up into a fresh local restic repository (not timed), then
/// times `restic restore` of it. Returns the restore's seconds.
fn restic_restore_s(work: &Path, image: &Path) -> anyhow::Result<f64> {
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
fn serve_once(client: &Path) -> anyhow::Result<(f64, f64)> {
    use std::io::BufRead;
    let started = Instant::now();
    let mut child = std::process::Command::new(rewind_binary()?)
        .args(["replay", "bench", "--disk", "d0", "--latest", "--node", "3", "--serve", "127.0.0.1:0", "--config", client.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start rewind replay --serve")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let _export = Killed(child);
    let uri = line.split_whitespace().find(|w| w.starts_with("nbd://")).context("the export printed no URI")?.to_string();
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

/// fio on a file in the benchmark folder: (MB/s, IOPS).
fn fio_file(file: &Path, rw: &str, bs: &str, extra: &[&str], seconds: u64) -> anyhow::Result<(f64, f64)> {
    let out = std::process::Command::new("fio")
        .args(["--name=limit", &format!("--filename={}", file.display()), &format!("--rw={rw}"), &format!("--bs={bs}"), "--size=1G", "--time_based", &format!("--runtime={seconds}"), "--output-format=json", "--ioengine=psync"])
        .args(extra)
        .output()
        .context("run fio (install it with ops/setup-debian.sh)")?;
    let json = fio_report(out)?;
    let side = if rw.contains("read") { "read" } else { "write" };
    let j = &json["jobs"][0][side];
    Ok((j["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6, j["iops"].as_f64().unwrap_or(0.0)))
}

/// Sends `bytes` over one QUIC stream between two endpoints on 127.0.0.1
/// with rewind's TLS (mutual, from a fresh site CA) and transport settings;
/// returns MB/s as the receiver saw it.
async fn quinn_loopback(dir: &Path, bytes: u64) -> anyhow::Result<f64> {
    use rewind_node::config::TlsFiles;
    rewind_node::tls::make_ca(dir, "ca")?;
    rewind_node::tls::make_leaf(dir, "server")?;
    rewind_node::tls::make_leaf(dir, "client")?;
    let files = |name: &str| TlsFiles { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
    let server = quinn::Endpoint::server(rewind_node::tls::server_config(&files("server"))?, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let client = rewind_node::transport::client_endpoint(&addr, rewind_node::tls::client_config(&files("client"))?)?;
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut recv = conn.accept_uni().await?;
        let started = Instant::now();
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        while let Some(n) = recv.read(&mut buf).await? {
            got += n as u64;
        }
        let secs = started.elapsed().as_secs_f64();
        conn.close(0u32.into(), b"done");
        Ok::<_, anyhow::Error>(got as f64 / 1e6 / secs)
    });
    let conn = client.connect(addr, rewind_node::tls::SERVER_NAME)?.await?;
    let mut send = conn.open_uni().await?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut sent = 0u64;
    while sent < bytes {
        send.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    send.finish()?;
    let mb_s = receiver.await??;
    client.wait_idle().await;
    Ok(mb_s)
}

async fn bench_limits(cli: &Cli, out: &mut String) -> anyhow::Result<()> {
    let seconds = if cli.smoke { 1 } else { 5 };
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let file = work.path().join("limit.dat");
    let mut lines = vec![
        format!("## limits: this machine's ceilings, measured in the same run (fio {seconds} s per row on the benchmark folder's file system; quinn over loopback)
"),
        "| measure | MB/s | IOPS | what it bounds |".into(),
        "|---|---|---|---|".into(),
    ];
    for bs in ["4k", "64k", "1m"] {
        eprintln!("limits: fio write {bs} with fdatasync after each");
        let (mb, iops) = fio_file(&file, "write", bs, &["--fdatasync=1"], seconds)?;
        record(&format!("limit.fdatasync.{bs}"), mb);
        lines.push(format!("| sequential write {bs}, fdatasync after each | {mb:.1} | {iops:.0} | a durable write at queue depth 1 (log, journal) |"));
    }
    eprintln!("limits: fio O_DIRECT read 1m");
    // Lay the file out first, so the reads hit the disk, not holes.
    fio_file(&file, "write", "1m", &["--end_fsync=1", "--time_based=0", "--runtime=0"], seconds).ok();
    let (mb, iops) = fio_file(&file, "read", "1m", &["--direct=1"], seconds)?;
    record("limit.direct_read", mb);
    lines.push(format!("| sequential read 1m, O_DIRECT | {mb:.1} | {iops:.0} | replay reading the store cold |"));
    std::fs::remove_file(&file).ok();
    eprintln!("limits: quinn loopback");
    let bytes = if cli.smoke { 64u64 << 20 } else { 2u64 << 30 };
    let mb = quinn_loopback(work.path(), bytes).await?;
    record("limit.quic", mb);
    lines.push(format!("| QUIC over loopback, one stream, rewind's TLS and windows ({} MiB) | {mb:.1} | | every byte between nodes, and replay's reads |", bytes >> 20));
    emit(out, &lines.join("\n"));
    Ok(())
}

/// The same bytes of 64 KiB writes spread over 1, 10 and 100 groups, one
/// producer per group, all at once; 16 batches in flight in all.
async fn bench_groups(cli: &Cli, out: &mut String) -> anyhow::Result<()> {
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
        let opts = rewind_node::dev::UpOptions { exe: rewind_binary()?, nodes: 3, dir: dir.clone(), raft: RaftTuning::default() };
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
    emit(out, &lines.join("\n"));
    Ok(())
}

/// Starts a local 3-node site in `dir` with group "bench" holding one disk
/// "d0" of `disk_bytes`; returns the client config's path.
async fn one_disk_site(dir: &Path, disk_bytes: u64) -> anyhow::Result<PathBuf> {
    let opts = rewind_node::dev::UpOptions { exe: rewind_binary()?, nodes: 3, dir: dir.to_path_buf(), raft: RaftTuning::default() };
    let client_path = rewind_node::dev::up(&opts).await?;
    let client = Client::new(&ClientConfig::load(&client_path)?)?;
    if let Err(e) = client.create_group("bench", vec![DiskSpec { name: "d0".into(), size_bytes: disk_bytes, sector_bytes: 512 }]).await {
        rewind_node::dev::down(dir, true)?;
        return Err(e);
    }
    Ok(client_path)
}

/// Ingest and replay as the history of one disk grows: the disk is written
/// over 1x, 10x and 100x its size in random 4 KiB writes, and at each level
/// probes of one disk's worth of writes are timed, then the whole disk is
/// replayed from a follower. Bytes on the disk stay the same, so any slowing
/// is the cost of history (log, index, compaction), not of data.
async fn bench_growth(cli: &Cli, out: &mut String) -> anyhow::Result<()> {
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
    emit(out, &result?);
    Ok(())
}

/// Every run of one ingest row for one system: throughput per run, and
/// latency, CPU and bytes summed over the runs.
struct Runs {
    mb_s: Vec<f64>,
    records_s: Vec<f64>,
    latency_us: hdrhistogram::Histogram<u64>,
    cpu_s: f64,
    bytes: u64,
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
async fn bench_ingest(cli: &Cli, out: &mut String) -> anyhow::Result<()> {
    let (mib, seconds) = if cli.smoke { (cli.mib.unwrap_or(4), 2u64) } else { (cli.mib.unwrap_or(256), 5) };
    let runs = if cli.smoke { 1 } else { cli.runs.max(1) };
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let version = jetstream::server_version().ok_or_else(|| anyhow::anyhow!("nats-server is not installed: run `bash ops/setup-peers.sh` (Debian's nats-server package)"))?;
    let dir = work.path().join("site");
    let opts = rewind_node::dev::UpOptions { exe: rewind_binary()?, nodes: 3, dir: dir.clone(), raft: RaftTuning::default() };
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
            format!("## ingest: one client, the same records into a rewind 3-node site, a 3-node NATS JetStream cluster ({version}, replicas=3, file storage) and a 3-node etcd cluster ({etcd_version}, through its JSON gateway), {mib} MiB or {seconds} s per run, whichever ends first, {runs} run(s) per row taken in turn (rewind, JetStream, etcd, then again): MB/s is the median (min-max) of the runs, latency percentiles are over every record of every run; CPU of all three server processes from /proc
"),
            "Durability: rewind acknowledges after fsync on a majority; so does etcd (WAL fsync). JetStream 2.9 acknowledges after the write reaches a quorum's memory and syncs its files every 2 minutes (`sync_interval: always` arrived in 2.10, so this server cannot run it): its rows are **not durable at acknowledgement**. etcd is driven through its HTTP/JSON gateway (values base64), which costs it CPU a gRPC client would not spend.".into(),
            String::new(),
            "| record | in flight | system | durable at ack | MB/s, median (min-max) | records/s | ack p50 ms | p99 ms | p99.9 ms | CPU s per GB (3 servers) | rewind MB/s ÷ this |".into(),
            "|---|---|---|---|---|---|---|---|---|---|---|".into(),
        ];
        for size in [4096usize, 64 << 10, 1 << 20] {
            for window in [1usize, 64] {
                let records = ((mib << 20) / size as u64).max(1);
                // rewind, JetStream, etcd: every run of each.
                let mut acc: Vec<Runs> = (0..3).map(|_| Runs::new()).collect::<anyhow::Result<_>>()?;
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
                    let e = etcd::put(etcd[0].port, size, records, window, Duration::from_secs(seconds)).await?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    acc[2].add(e.records, e.bytes, e.elapsed, &e.latency_us, cpu(&etcd_pids) - before);
                }
                let plot = svg::percentiles(
                    &format!("ack latency, {} records, {window} in flight, {runs} run(s)", fmt_size(size)),
                    &[("rewind", &acc[0].latency_us), ("etcd", &acc[2].latency_us), ("JetStream (no fsync)", &acc[1].latency_us)],
                );
                let name = format!("ingest-latency-{}-{window}.svg", fmt_size(size).replace(' ', ""));
                std::fs::create_dir_all(&plots)?;
                std::fs::write(plots.join(&name), plot)?;
                plot_names.push(name);
                let ours = median(acc[0].mb_s.clone()).0;
                for (name, durable, row) in [
                    ("rewind", "yes (fsync, majority)", &acc[0]),
                    ("NATS JetStream", "no (fsync every 2 min)", &acc[1]),
                    ("etcd", "yes (WAL fsync, majority)", &acc[2]),
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
    emit(out, &result?);
    Ok(())
}

fn results_dir(cli: &Cli) -> PathBuf {
    cli.out.clone().unwrap_or_else(|| {
        // YYYY-MM-DD of today (UTC).
        let today = rewind_node::timefmt::format_time_ns(rewind_node::now_ns())[..10].to_string();
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results").join(today)
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut out = String::new();
    let benches = match cli.bench {
        Bench::All => vec![Bench::Limits, Bench::Append, Bench::Ingest, Bench::Groups, Bench::Growth, Bench::Tap, Bench::Replay],
        b => vec![b],
    };
    for b in benches {
        match b {
            Bench::Append | Bench::All => runtime.block_on(bench_append(&cli, &mut out))?,
            Bench::Tap => runtime.block_on(bench_tap(&cli, &mut out))?,
            Bench::Replay => runtime.block_on(bench_replay(&cli, &mut out))?,
            Bench::Ingest => runtime.block_on(bench_ingest(&cli, &mut out))?,
            Bench::Limits => runtime.block_on(bench_limits(&cli, &mut out))?,
            Bench::Groups => runtime.block_on(bench_groups(&cli, &mut out))?,
            Bench::Growth => runtime.block_on(bench_growth(&cli, &mut out))?,
        }
    }
    if cli.bench == Bench::All {
        emit(&mut out, &fractions());
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
        (false, Bench::All) => "all.md",
    };
    std::fs::write(dir.join(name), &out)?;
    eprintln!("results written to {}", dir.join(name).display());
    Ok(())
}
