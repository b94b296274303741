//! `rewind backup`: a full or incremental backup of a disk, read from an
//! NBD source, into the disk's group as one transaction.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use rewind_cdp_ingest::backup::{BackupError, Mode, Progress, Spec};
use rewind_node::backup::{NbdSource, SiteClient};

use super::{ClientArgs, ExitStatus};

/// Exit status when the source lacks the dirty bitmap (or qemu refused it).
pub const EXIT_NO_BITMAP: u8 = 3;
/// Exit status when a begun backup was cut off and stays open.
pub const EXIT_INTERRUPTED: u8 = 4;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["full", "bitmap", "changed_areas", "abort"])))]
pub struct BackupArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The consistency group the backup goes into.
    #[arg(long)]
    group: String,
    /// The disk in the group (created, with the source's size, if the
    /// group lacks it).
    #[arg(long)]
    disk: String,
    /// The source: nbd://HOST[:PORT][/EXPORT], nbds://HOST[:PORT][/EXPORT]
    /// (NBD-TLS), or nbd+unix:///EXPORT?socket=PATH.
    #[arg(long, required_unless_present = "abort")]
    from: Option<String>,
    /// For nbds://: the CA that signed the source's certificate (default:
    /// the site's, from the client config: right for a rewind export).
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// For nbds://: the certificate to present (default: the client
    /// config's; `--tls-cert none` presents none).
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// For nbds://: the key of --tls-cert.
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Read every allocated extent (holes and zero extents are recorded as
    /// zeroes, not read).
    #[arg(long)]
    full: bool,
    /// Read only the extents dirty in this QEMU dirty bitmap, as `qemu-nbd
    /// -B NAME` exports it; incremental to the disk's newest backup.
    #[arg(long)]
    bitmap: Option<String>,
    /// If the bitmap is missing or inconsistent, read every allocated
    /// extent instead; only blocks that differ from the group's are sent.
    #[arg(long, requires = "bitmap")]
    fallback_full: bool,
    /// Read only these byte ranges: a JSON list of {"start": N, "length":
    /// N}, or VADP's QueryChangedDiskAreas answer (its "changedArea").
    #[arg(long, value_name = "FILE")]
    changed_areas: Option<PathBuf>,
    /// Complete the disk's open backup (one whose import was cut off),
    /// sending only what it had not sent; with none open, start a new one
    /// (so a timer can always pass it).
    #[arg(long)]
    resume: bool,
    /// Drop the disk's open backup: revert what it wrote, then abort it.
    #[arg(long, conflicts_with_all = ["from", "resume", "name"])]
    abort: bool,
    /// Send the blocks uncompressed (default: zstd, level 1).
    #[arg(long)]
    no_compress: bool,
    /// Send every differing block's bytes, even one the group holds at
    /// another place (default: such a block travels as a reference to it).
    #[arg(long)]
    no_references: bool,
    /// The backup's name (default: full-TIME or incr-TIME).
    #[arg(long)]
    name: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

pub async fn run(a: BackupArgs) -> anyhow::Result<()> {
    let client = a.client.client()?;
    let site = SiteClient(client.clone());
    let mut producer = rewind_node::client::producer(client, 16);
    let now_ns = rewind_node::now_ns();
    if a.abort {
        let (name, lsn, reverted) = rewind_cdp_ingest::backup::abort(&site, &mut producer, &a.group, &a.disk, now_ns).await.map_err(to_exit)?;
        if a.json {
            println!("{}", serde_json::json!({ "aborted": name, "lsn": lsn, "blocks_reverted": reverted }));
        } else {
            println!("backup {name} of {}/{} aborted at LSN {lsn}; {reverted} blocks reverted to its start", a.group, a.disk);
        }
        return Ok(());
    }
    let from = a.from.as_deref().expect("clap requires --from without --abort");
    let uri = rewind_nbd::client::parse_uri(from).context("--from")?;
    let tls = if uri.tls {
        let files = &site.0.tls;
        let ca = a.tls_ca.clone().unwrap_or_else(|| files.ca.clone());
        let cert_key = match (&a.tls_cert, &a.tls_key) {
            (Some(c), _) if c.as_os_str() == "none" => None,
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (Some(_), None) => super::usage_error("--tls-cert needs --tls-key (or give --tls-cert none)"),
            (None, _) => Some((files.cert.clone(), files.key.clone())),
        };
        Some(rewind_node::tls::nbd_client_tls(&ca, cert_key.as_ref().map(|(c, k)| (c.as_path(), k.as_path()))).context("NBD-TLS settings for --from")?)
    } else {
        None
    };
    let mut source = NbdSource::connect(&uri, a.bitmap.as_deref(), tls.as_ref()).await.with_context(|| format!("connect to the source {from}"))?;
    let mode = match (&a.bitmap, &a.changed_areas) {
        (Some(b), _) => Mode::Bitmap(b.clone()),
        (_, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("read --changed-areas {}", path.display()))?;
            let size = rewind_cdp_ingest::backup::Source::size(&source);
            Mode::Areas(rewind_cdp_ingest::backup::parse_changed_areas(&text, size).map_err(|e| anyhow::anyhow!("--changed-areas {}: {e}", path.display()))?)
        }
        _ => Mode::Full,
    };
    let spec = Spec { group: a.group.clone(), disk: a.disk.clone(), mode, name: a.name.clone(), resume: a.resume, fallback_full: a.fallback_full, now_ns, compress: !a.no_compress, references: !a.no_references };
    let tty = std::io::stderr().is_terminal() && !a.json;
    let started = std::time::Instant::now();
    let mut shown = started;
    let show = |p: &Progress| {
        if !tty || (shown.elapsed() < std::time::Duration::from_millis(250) && p.bytes_done < p.bytes_total) {
            return;
        }
        shown = std::time::Instant::now();
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = p.bytes_done as f64 / secs;
        let eta = if rate > 0.0 { (p.bytes_total.saturating_sub(p.bytes_done)) as f64 / rate } else { 0.0 };
        eprint!(
            "\r{:.0}/{:.0} MiB covered ({:.0}%), {:.0} MiB read, {:.1} MiB new, {} extents, {:.1} MiB/s, ETA {:.0} s   ",
            mib(p.bytes_done),
            mib(p.bytes_total),
            100.0 * p.bytes_done as f64 / p.bytes_total.max(1) as f64,
            mib(p.bytes_read),
            mib(p.bytes_new),
            p.extents,
            rate / (1u64 << 20) as f64,
            eta
        );
    };
    let result = rewind_cdp_ingest::backup::run(&mut source, &site, &mut producer, &spec, show).await;
    if tty {
        eprintln!();
    }
    source.disconnect().await;
    let mut r = result.map_err(to_exit)?;
    r.seconds = started.elapsed().as_secs_f64();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "backup {} of {}/{} committed at LSN {} ({}{}{})",
        r.name,
        r.group,
        r.disk,
        r.commit_lsn,
        r.mode,
        r.base.as_ref().map(|b| format!(", incremental to {b}")).unwrap_or_default(),
        if r.resumed { ", resumed" } else { "" }
    );
    println!("  covered  {:>10.1} MiB in {} extents", mib(r.bytes_covered), r.extents);
    println!("  read     {:>10.1} MiB ({:.1} MiB/s)", mib(r.bytes_read), mib(r.bytes_read) / r.seconds.max(0.001));
    println!("  zero     {:>10.1} MiB (not stored)", mib(r.bytes_zero));
    println!("  same     {:>10.1} MiB (held by the group already: not sent)", mib(r.bytes_unchanged));
    println!("  new      {:>10.1} MiB (stored, in {} events; {:.1} MiB on the wire)", mib(r.bytes_new), r.events, mib(r.bytes_wire));
    if r.bytes_referenced > 0 {
        println!("           {:>10.1} MiB of it held elsewhere by the group: sent as references", mib(r.bytes_referenced));
    }
    println!("  took {:.1} s; digest {}", r.seconds, r.digest);
    println!("replay it: rewind replay {} --disk {} --at-backup {} --out FILE", r.group, r.disk, r.name);
    Ok(())
}

fn to_exit(e: BackupError) -> anyhow::Error {
    match e {
        BackupError::NoBitmap(m) => ExitStatus(EXIT_NO_BITMAP, m).into(),
        e @ BackupError::Interrupted { .. } => ExitStatus(EXIT_INTERRUPTED, e.to_string()).into(),
        BackupError::Refused(m) => anyhow::anyhow!(m),
    }
}
