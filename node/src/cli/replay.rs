//! `rewind replay`: a disk as of a point, to a file or as an NBD export.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::ClientArgs;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("output").required(true).args(["out", "serve"])))]
pub struct ReplayArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The consistency group.
    group: String,
    /// The disk of the group to replay.
    #[arg(long)]
    disk: String,
    /// The point to replay to.
    #[command(flatten)]
    target: super::TargetArgs,
    /// The raw image to write (sparse where the disk reads as zeroes, mode
    /// 0600). It is written beside FILE and renamed over it once whole and
    /// synced; an existing FILE is refused unless --force, and a file a
    /// tap holds (its backing file) is refused always.
    #[arg(long, group = "output")]
    out: Option<PathBuf>,
    /// With --out: replace an existing file.
    #[arg(long, requires = "out")]
    force: bool,
    /// Serve the disk at that point as an NBD export on this address
    /// (e.g. 127.0.0.1:10810, [fd00::5]:10810 or restore1.example.net:10810)
    /// instead of writing a file: instant access, no copy first. Runs until
    /// SIGINT or SIGTERM. Off loopback, clients must start TLS (the client
    /// config's certificate, which must name this host).
    #[arg(long, group = "output")]
    serve: Option<rewind_node::addr::HostPort>,
    /// With --serve: require NBD-TLS on loopback too.
    #[arg(long, requires = "serve", conflicts_with = "insecure_plaintext")]
    tls: bool,
    /// With --serve: plaintext NBD off loopback; anyone who reaches the
    /// port reads the disk (and writes it, with --writable).
    #[arg(long, requires = "serve")]
    insecure_plaintext: bool,
    /// With --serve: accept writes into a copy-on-write overlay (instant
    /// recovery: boot and change the disk); the log is never touched.
    #[arg(long, requires = "serve")]
    writable: bool,
    /// With --writable: the overlay file, created new with mode 0600 (an
    /// existing file is refused, never truncated). Its map of written
    /// blocks is kept beside it as FILE.map. Default: a new file with a
    /// random name under /var/tmp.
    #[arg(long, requires = "writable")]
    overlay: Option<PathBuf>,
    /// With --writable: keep the overlay when the export stops (default:
    /// thrown away).
    #[arg(long, requires = "writable")]
    keep_overlay: bool,
    /// With --serve: NBD connections served at once; more are closed as
    /// they come.
    #[arg(long, requires = "serve", default_value_t = rewind_nbd::listen::CONNECTIONS_MAX_DEFAULT)]
    max_connections: usize,
    /// The node to replay from (default: the first that answers). A
    /// follower that has not applied the target yet is waited for.
    #[arg(long)]
    node: Option<u64>,
    /// How long to wait for the serving node to apply the target, in seconds.
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

pub async fn run(a: ReplayArgs) -> anyhow::Result<()> {
    let client = a.client.client()?;
    let target = a.target.target()?;
    let opts = rewind_node::replay::ReplayOptions {
        group: a.group.clone(),
        disk: a.disk.clone(),
        target,
        out: a.out.clone().unwrap_or_default(),
        existing: if a.force { rewind_replay::Existing::Replace } else { rewind_replay::Existing::Refuse },
        node: a.node,
        wait: std::time::Duration::from_secs(a.wait),
    };
    if let Some(listen) = a.serve.clone() {
        let tls = super::tap::nbd_tls_policy(a.tls, a.insecure_plaintext);
        let serve = rewind_node::replay::ServeOptions { listen, tls, writable: a.writable, overlay: a.overlay.clone(), keep_overlay: a.keep_overlay, connections_max: a.max_connections };
        return rewind_node::replay::serve(
            &client,
            &opts,
            &serve,
            |s| {
                use std::io::Write;
                println!(
                    "replay: serving disk {} of group {} at LSN {} ({}; resolved on {}) from node {} at {} ({}{}), ready after {:.0} ms",
                    a.disk,
                    a.group,
                    s.lsn,
                    rewind_wire::timefmt::format_time_ns(s.time_ns),
                    s.resolved_on,
                    s.node,
                    s.uri,
                    if a.writable { "writable, overlay " } else { "read-only" },
                    s.overlay.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    s.ready_after.as_secs_f64() * 1000.0
                );
                let _ = std::io::stdout().flush();
            },
            |msg| eprintln!("replay: {msg}"),
        )
        .await;
    }
    let out = a.out.clone().context("--out or --serve")?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = std::time::Instant::now();
    let r = rewind_node::replay::run(
        &client,
        &opts,
        |done, total| {
            if tty {
                let mb_s = done as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-3);
                eprint!("\r{:.0}/{:.0} MiB ({:.0}%), {mb_s:.0} MB/s   ", done as f64 / 1048576.0, total as f64 / 1048576.0, 100.0 * done as f64 / total.max(1) as f64);
            }
        },
        |msg| eprintln!("replay: {msg}"),
    )
    .await?;
    if tty {
        eprintln!();
    }
    println!(
        "replayed disk {} of group {} at LSN {} ({}; resolved on {}) from node {} to {}: {} bytes, {} of them data, {:.2} s ({:.0} MB/s), blake3 {}",
        a.disk,
        a.group,
        r.lsn,
        rewind_wire::timefmt::format_time_ns(r.time_ns),
        r.resolved_on,
        r.node,
        out.display(),
        r.image_bytes,
        r.data_bytes,
        r.elapsed.as_secs_f64(),
        r.image_bytes as f64 / 1e6 / r.elapsed.as_secs_f64().max(1e-6),
        r.blake3_hex
    );
    Ok(())
}
