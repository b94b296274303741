//! What every benchmark shares: the report it adds its tables and key
//! figures to (passed along as a value, no global), /proc samples, medians,
//! fio runs, child processes that stop when dropped, and small helpers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use rewind_node::client::Client;
use rewind_node::config::ClientConfig;
use rewind_wire::rpc::DiskSpec;


/// The text of a run's results and its key figures, by name, for the
/// fractions table of `all`.
#[derive(Default)]
pub(crate) struct Report {
    pub(crate) text: String,
    pub(crate) figures: std::collections::BTreeMap<String, f64>,
}

impl Report {
    /// Notes a key figure of this run.
    pub(crate) fn record(&mut self, name: &str, value: f64) {
        self.figures.insert(name.to_string(), value);
    }

    /// Prints a benchmark's table and adds it to the results file's text.
    pub(crate) fn emit(&mut self, table: &str) {
        println!("{table}\n");
        self.text.push_str(table);
        self.text.push_str("\n\n");
    }
}

/// CPU time and bytes written of one process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcSample {
    pub(crate) cpu_s: f64,
    pub(crate) write_bytes: u64,
}

pub(crate) fn sample(pid: u32) -> ProcSample {
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

pub(crate) fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub(crate) fn rewind_binary() -> anyhow::Result<PathBuf> {
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

pub(crate) fn fmt_size(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

/// fio's JSON report from a finished run (`--output-format=json`).
pub(crate) fn fio_report(out: std::process::Output) -> anyhow::Result<serde_json::Value> {
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text[text.find('{').unwrap_or(0)..]).context("parse fio's JSON")
}

/// One fio job's figures, from its JSON output.
pub(crate) struct FioResult {
    pub(crate) iops: f64,
    pub(crate) mb_s: f64,
    pub(crate) clat_p50_ms: f64,
    pub(crate) clat_p99_ms: f64,
}

pub(crate) fn fio(target: &[String], rw: &str, bs: &str, iodepth: u32, seconds: u32) -> anyhow::Result<FioResult> {
    fio_with(&[], None, target, rw, bs, iodepth, seconds)
}

/// fio run through `prefix` (e.g. setpriv, to run as another user) with
/// HOME set to `home` when given.
pub(crate) fn fio_with(prefix: &[String], home: Option<&Path>, target: &[String], rw: &str, bs: &str, iodepth: u32, seconds: u32) -> anyhow::Result<FioResult> {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg("fio");
            c
        }
        None => std::process::Command::new("fio"),
    };
    if let Some(h) = home {
        cmd.env("HOME", h).current_dir(h);
    }
    let out = cmd
        .args(["--name=bench", &format!("--rw={rw}"), &format!("--bs={bs}"), &format!("--iodepth={iodepth}"), "--size=1G", "--time_based", &format!("--runtime={seconds}"), "--randseed=1", "--output-format=json"])
        .args(target)
        .output()
        .context("run fio (install it with ops/setup-debian.sh)")?;
    let json = fio_report(out)?;
    let w = &json["jobs"][0]["write"];
    let pct = |p: &str| w["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1e6;
    Ok(FioResult { iops: w["iops"].as_f64().unwrap_or(0.0), mb_s: w["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6, clat_p50_ms: pct("50.000000"), clat_p99_ms: pct("99.000000") })
}

/// fio on a file in the benchmark folder: (MB/s, IOPS).
pub(crate) fn fio_file(file: &Path, rw: &str, bs: &str, extra: &[&str], seconds: u64) -> anyhow::Result<(f64, f64)> {
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

/// A child process stopped (SIGTERM, then reaped) when dropped.
pub(crate) struct Killed(pub(crate) std::process::Child);

impl Killed {
    pub(crate) fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One gauge from a Prometheus endpoint on loopback.
pub(crate) fn gauge(port: u16, name: &str) -> Option<f64> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Where this run's results go.
pub(crate) fn results_dir(cli: &crate::Cli) -> PathBuf {
    cli.out.clone().unwrap_or_else(|| {
        // YYYY-MM-DD of today (UTC).
        let today = rewind_wire::timefmt::format_time_ns(rewind_node::now_ns())[..10].to_string();
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results").join(today)
    })
}

/// Starts a local 3-node site in `dir` with group "bench" holding one disk
/// "d0" of `disk_bytes`; returns the client config's path.
pub(crate) async fn one_disk_site(dir: &Path, disk_bytes: u64) -> anyhow::Result<PathBuf> {
    one_disk_site_with(dir, disk_bytes, rewind_node::config::default_gc_busy_percent()).await
}

/// `one_disk_site` whose nodes' collectors work at most `gc_busy_percent`
/// of the time.
pub(crate) async fn one_disk_site_with(dir: &Path, disk_bytes: u64, gc_busy_percent: u64) -> anyhow::Result<PathBuf> {
    let mut opts = rewind_node::dev::UpOptions::new(rewind_binary()?, 3, dir.to_path_buf());
    opts.gc_busy_percent = gc_busy_percent;
    let client_path = rewind_node::dev::up(&opts).await?;
    let client = Client::new(&ClientConfig::load(&client_path)?)?;
    if let Err(e) = client.create_group("bench", vec![DiskSpec { name: "d0".into(), size_bytes: disk_bytes, sector_bytes: 512 }]).await {
        rewind_node::dev::down(dir, true)?;
        return Err(e);
    }
    Ok(client_path)
}

/// Starts a serving process; returns it and the URI on its first line.
pub(crate) fn spawn_uri(cmd: &mut std::process::Command) -> anyhow::Result<(Killed, String)> {
    use std::io::BufRead;
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().context("start the server")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let killed = Killed(child);
    let uri = line.split_whitespace().find(|w| w.starts_with("nbd://") || w.starts_with("nbds://")).context("no URI printed")?.to_string();
    Ok((killed, uri))
}

/// Runs `cmd` to its end; its output, or an error with its stderr.
pub(crate) fn run_ok(cmd: &mut std::process::Command) -> anyhow::Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        anyhow::bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}
