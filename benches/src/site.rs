//! `site`: what real addresses and NBD-TLS cost. The same append and tap
//! rows on a local site on loopback (plaintext NBD) and on a site of
//! network namespaces on a bridge (`ops/netns-site.sh`: each node at its
//! own address, the tap on a fourth host, NBD-TLS from fio in the root
//! namespace), in one run, with their ratio; then the same with a 1 ms
//! round trip between hosts (netem) where the kernel has netem.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use rewind_node::client::Client;
use rewind_node::config::ClientConfig;
use rewind_node::load::{self, LoadSpec};
use rewind_wire::rpc::DiskSpec;

use crate::harness::*;
use crate::Cli;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/netns-site.sh");

/// One site's figures: append MB/s and commit p50 ms per record size, and
/// fio through the tap per job.
struct Figures {
    append: Vec<(f64, f64)>,
    tap: Vec<FioResult>,
}

const APPEND_SIZES: [usize; 2] = [4 << 10, 64 << 10];
const TAP_JOBS: [(&str, &str, u32); 3] = [("randwrite", "4k", 1), ("randwrite", "4k", 32), ("write", "64k", 32)];

async fn appends(config: &Path, mib: u64, runs: usize) -> anyhow::Result<Vec<(f64, f64)>> {
    let client = Client::new(&ClientConfig::load(config)?)?;
    client.create_group("bench", vec![DiskSpec { name: "d0".into(), size_bytes: 64 << 30, sector_bytes: 512 }]).await?;
    let mut rows = Vec::new();
    for size in APPEND_SIZES {
        let (mut mb, mut p50) = (Vec::new(), Vec::new());
        for run in 0..runs {
            let spec = LoadSpec {
                group: "bench".into(),
                disk: "d0".into(),
                disk_bytes: 64 << 30,
                events: (mib << 20) / size as u64,
                sizes: vec![size],
                window: 64,
                batch_bytes: 1 << 20,
                seed: 7 + run as u64,
                time_max: Duration::from_secs(300),
            };
            let r = load::run(client.clone(), &spec, |_, _| {}).await?;
            if !r.errors.is_empty() {
                bail!("{} batches failed: {}", r.errors.len(), r.errors[0]);
            }
            mb.push(r.bytes as f64 / 1e6 / r.elapsed.as_secs_f64());
            p50.push(r.latency_us.value_at_quantile(0.5) as f64 / 1e3);
        }
        rows.push((median(mb).0, median(p50).0));
    }
    Ok(rows)
}

fn taps(uri: &str, seconds: u32, prefix: &[String], home: Option<&Path>) -> anyhow::Result<Vec<FioResult>> {
    let mut rows = Vec::new();
    for (rw, bs, iodepth) in TAP_JOBS {
        let target = vec!["--ioengine=nbd".to_string(), format!("--uri={uri}")];
        rows.push(fio_with(prefix, home, &target, rw, bs, iodepth, seconds)?);
    }
    Ok(rows)
}

async fn loopback(work: &Path, cli: &Cli, mib: u64, seconds: u32) -> anyhow::Result<Figures> {
    let dir = work.join("lo");
    let exe = rewind_binary()?;
    let config = rewind_node::dev::up(&rewind_node::dev::UpOptions::new(exe.clone(), 3, dir.clone())).await?;
    let result = async {
        let append = appends(&config, mib, cli.runs).await?;
        let client = Client::new(&ClientConfig::load(&config)?)?;
        client.create_group("vm1", vec![DiskSpec { name: "disk0".into(), size_bytes: 1 << 30, sector_bytes: 512 }]).await?;
        let backing = work.join("lo.raw");
        let (_tap, uri) = spawn_uri(Command::new(&exe).args(["tap", "--group", "vm1", "--disk", "disk0", "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--config", config.to_str().unwrap()]))?;
        let tap = taps(&uri, seconds, &[], None)?;
        Ok::<_, anyhow::Error>(Figures { append, tap })
    }
    .await;
    rewind_node::dev::down(&dir, true)?;
    result
}

/// A site of namespaces, taken down when dropped.
struct NetnsSite(PathBuf);

impl NetnsSite {
    fn script(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let (cmd, rest) = args.split_first().context("a command")?;
        Ok(Command::new("bash").arg(SCRIPT).arg(cmd).args(["--dir", self.0.to_str().unwrap()]).args(rest).output()?)
    }

    fn must(&self, args: &[&str]) -> anyhow::Result<String> {
        let o = self.script(args)?;
        if !o.status.success() {
            bail!("netns-site {args:?}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

impl Drop for NetnsSite {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
    }
}

/// The netns site's figures; with `netem`, a 1 ms round trip (0.5 ms each
/// way on every host) — None when the kernel has no netem.
async fn netns(work: &Path, cli: &Cli, mib: u64, seconds: u32, rtt_1ms: bool) -> anyhow::Result<Option<Figures>> {
    let dir = work.join(if rtt_1ms { "ns-rtt" } else { "ns" });
    std::fs::create_dir_all(&dir)?;
    let exe = rewind_binary()?;
    let site = NetnsSite(dir.clone());
    site.must(&["up", "--bin", exe.to_str().unwrap()])?;
    if rtt_1ms {
        let o = site.script(&["netem", "--delay", "0.5ms"])?;
        if o.status.code() == Some(3) {
            return Ok(None);
        }
        if !o.status.success() {
            bail!("netem: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let config = dir.join("client.toml");
    let append = appends(&config, mib, cli.runs).await?;
    let client = Client::new(&ClientConfig::load(&config)?)?;
    client.create_group("vm1", vec![DiskSpec { name: "disk0".into(), size_bytes: 1 << 30, sector_bytes: 512 }]).await?;
    let tap_ip = site.must(&["add-host", "tap"])?;
    let pki = dir.join("pki");
    let made = Command::new(&exe).args(["certs", "--dir", pki.to_str().unwrap(), "--name", "tap", "--role", "tap", "--group", "vm1", "--san", &tap_ip]).output()?;
    if !made.status.success() {
        bail!("certs: {}", String::from_utf8_lossy(&made.stderr));
    }
    let mut c = ClientConfig::load(&config)?;
    c.tls.cert = pki.join("tap.pem");
    c.tls.key = pki.join("tap.key");
    let tap_config = dir.join("tap.toml");
    std::fs::write(&tap_config, toml::to_string(&c)?)?;
    let backing = dir.join("disk0.raw");
    let listen = format!("{tap_ip}:10809");
    let (_tap, uri) = spawn_uri(Command::new("bash").arg(SCRIPT).args(["exec", "--dir", dir.to_str().unwrap(), "tap", "--"]).args([
        exe.to_str().unwrap(), "tap", "--group", "vm1", "--disk", "disk0", "--backing", backing.to_str().unwrap(), "--listen", &listen, "--config", tap_config.to_str().unwrap(),
    ]))?;
    let home = libnbd_home(&dir, &pki)?;
    let prefix: Vec<String> = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"].map(String::from).to_vec();
    let tap = taps(&uri, seconds, &prefix, Some(&home))?;
    Ok(Some(Figures { append, tap }))
}

/// A HOME holding `.pki/libnbd` (the admin's certificate as the NBD
/// client's) for fio run as nobody: fio's nbd engine takes no certificate
/// path, and as root libnbd would read the machine's /etc/pki/libnbd.
fn libnbd_home(dir: &Path, pki: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{chown, PermissionsExt};
    let home = dir.join("fio-home");
    let certs = home.join(".pki/libnbd");
    std::fs::create_dir_all(&certs)?;
    for (from, to) in [("ca.pem", "ca-cert.pem"), ("admin.pem", "client-cert.pem"), ("admin.key", "client-key.pem")] {
        std::fs::copy(pki.join(from), certs.join(to))?;
        chown(certs.join(to), Some(65534), Some(65534))?;
    }
    for d in [home.clone(), home.join(".pki"), certs] {
        chown(&d, Some(65534), Some(65534))?;
    }
    let mut up = dir.to_path_buf();
    while up.parent().is_some() && up != Path::new("/var/tmp") && up != Path::new("/tmp") {
        std::fs::set_permissions(&up, std::fs::Permissions::from_mode(0o711))?;
        up = up.parent().unwrap().to_path_buf();
    }
    Ok(home)
}

fn cell(f: Option<&Figures>, pick: impl Fn(&Figures) -> f64) -> String {
    f.map(|f| format!("{:.1}", pick(f))).unwrap_or_else(|| "n/a".into())
}

pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let seconds = if cli.smoke { 1 } else { 10 };
    let mib = cli.mib.unwrap_or(if cli.smoke { 4 } else { 64 });
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    eprintln!("site: loopback");
    let lo = loopback(work.path(), cli, mib, seconds).await?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (ns, rtt, why) = if root {
        eprintln!("site: netns");
        let ns = netns(work.path(), cli, mib, seconds, false).await?;
        eprintln!("site: netns, 1 ms RTT");
        let rtt = netns(work.path(), cli, mib, seconds, true).await?;
        let why = if rtt.is_none() { "the 1 ms RTT column is n/a: this kernel has no netem qdisc (sch_netem not built in, no modules)" } else { "" };
        (ns, rtt, why)
    } else {
        (None, None, "the netns columns are n/a: network namespaces need root")
    };
    let mut lines = vec![
        format!("## site: loopback vs a site of network namespaces (each node at its own address on a bridge; the tap on a fourth host, read by fio from the root namespace over NBD-TLS). Appends: {mib} MiB per row, 64 in flight, median of {} runs; tap: fio (nbd engine) {seconds} s per row, sync mode. {why}\n", cli.runs),
        "| row | loopback | netns | netns, 1 ms RTT | netns / loopback |".into(),
        "|---|---|---|---|---|".into(),
    ];
    for (i, size) in APPEND_SIZES.iter().enumerate() {
        let l = lo.append[i].0;
        let n = ns.as_ref().map(|f| f.append[i].0);
        out.record(&format!("site.append.{}.lo", fmt_size(*size)), l);
        lines.push(format!(
            "| append {} MB/s (commit p50 ms) | {l:.1} ({:.1}) | {} ({}) | {} ({}) | {} |",
            fmt_size(*size),
            lo.append[i].1,
            cell(ns.as_ref(), |f| f.append[i].0),
            cell(ns.as_ref(), |f| f.append[i].1),
            cell(rtt.as_ref(), |f| f.append[i].0),
            cell(rtt.as_ref(), |f| f.append[i].1),
            n.map(|n| format!("{:.2}", n / l.max(1e-9))).unwrap_or_else(|| "n/a".into())
        ));
    }
    for (i, (rw, bs, iodepth)) in TAP_JOBS.iter().enumerate() {
        let l = &lo.tap[i];
        lines.push(format!(
            "| tap {rw} {bs} qd {iodepth} MB/s (clat p50 ms) | {:.1} ({:.2}) | {} ({}) | {} ({}) | {} |",
            l.mb_s,
            l.clat_p50_ms,
            cell(ns.as_ref(), |f| f.tap[i].mb_s),
            ns.as_ref().map(|f| format!("{:.2}", f.tap[i].clat_p50_ms)).unwrap_or_else(|| "n/a".into()),
            cell(rtt.as_ref(), |f| f.tap[i].mb_s),
            rtt.as_ref().map(|f| format!("{:.2}", f.tap[i].clat_p50_ms)).unwrap_or_else(|| "n/a".into()),
            ns.as_ref().map(|f| format!("{:.2}", f.tap[i].mb_s / l.mb_s.max(1e-9))).unwrap_or_else(|| "n/a".into())
        ));
    }
    out.emit(&lines.join("\n"));
    Ok(())
}
