//! `rewind tap`: flags to options, and the line that says where it serves.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::{parse_size, ClientArgs};

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum TapMode {
    /// Answer a write once its event is committed on a majority (RPO 0).
    Sync,
    /// Answer once the write is in the tap's local journal (fsync'd); a
    /// shipper streams the journal to the site behind. RPO is the age of the
    /// oldest unshipped write (`rewind status` shows it).
    Async,
}

#[derive(Args)]
pub struct TapArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long)]
    group: String,
    /// The disk to serve; also the NBD export name.
    #[arg(long)]
    disk: String,
    /// The disk's backing file (created sparse at the disk's size if missing).
    #[arg(long)]
    backing: PathBuf,
    /// TCP address to serve NBD on: IP:PORT, [IPv6]:PORT or HOST:PORT,
    /// e.g. 127.0.0.1:10809 (port 0 picks a free one). Off loopback, NBD
    /// clients must start TLS (the certificate of the client config, which
    /// must name this host; clients show one from the site's CA).
    #[arg(long, conflicts_with = "socket", required_unless_present = "socket")]
    listen: Option<rewind_node::addr::HostPort>,
    /// Require NBD-TLS on loopback too.
    #[arg(long, requires = "listen", conflicts_with = "insecure_plaintext")]
    tls: bool,
    /// Serve plaintext NBD off loopback: anyone who reaches the port reads
    /// and writes the disk. For isolated storage networks only.
    #[arg(long, requires = "listen")]
    insecure_plaintext: bool,
    /// Unix socket path to listen on instead of TCP.
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = TapMode::Sync)]
    mode: TapMode,
    /// Batches in flight to the site at once (back-pressure beyond this).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Sync mode: the file that keeps the tap's producer identity and epoch
    /// (default: the backing file's path with `.tap-id` added). Each start
    /// takes the next epoch, whose first batch makes the site refuse any
    /// batch the previous process left on its way; keep it with the backing
    /// file.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Async mode: the journal folder (default: the backing file's path
    /// with `.journal` added). A restarted tap ships what it holds first.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Async mode: bytes of unshipped writes the journal holds at most,
    /// e.g. 256MiB or 4GiB (at least 16MiB). When full, the guest waits.
    #[arg(long, default_value = "256MiB")]
    journal_max: String,
    /// Serve Prometheus metrics here, e.g. 127.0.0.1:9464.
    #[arg(long)]
    metrics_listen: Option<rewind_node::addr::HostPort>,
    /// NBD connections served at once; more are closed as they come. Each
    /// connection has at most 64 requests and 64 MiB in flight, and 10 s
    /// to finish its handshake.
    #[arg(long, default_value_t = rewind_nbd::listen::CONNECTIONS_MAX_DEFAULT)]
    max_connections: usize,
}

/// The NBD-TLS policy the flags ask for.
pub fn nbd_tls_policy(tls: bool, insecure_plaintext: bool) -> rewind_node::tls::NbdTlsPolicy {
    use rewind_node::tls::NbdTlsPolicy;
    match (tls, insecure_plaintext) {
        (true, _) => NbdTlsPolicy::Always,
        (false, true) => NbdTlsPolicy::InsecurePlaintext,
        (false, false) => NbdTlsPolicy::Auto,
    }
}

/// `backing` with `suffix` added: where a tap keeps its files by default.
fn beside(backing: &std::path::Path, suffix: &str) -> PathBuf {
    let mut p = backing.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

pub async fn run(a: TapArgs) -> anyhow::Result<()> {
    let mode = match a.mode {
        TapMode::Sync => {
            if a.journal.is_some() {
                bail!("--journal is for --mode async; a sync tap keeps no journal");
            }
            let identity = a.identity.clone().unwrap_or_else(|| beside(&a.backing, ".tap-id"));
            rewind_node::tap::TapMode::Sync { identity }
        }
        TapMode::Async => {
            if a.identity.is_some() {
                bail!("--identity is for --mode sync; an async tap keeps its identity in its journal");
            }
            let journal = a.journal.clone().unwrap_or_else(|| beside(&a.backing, ".journal"));
            let journal_bytes_max = parse_size(&a.journal_max).context("--journal-max")?;
            rewind_node::tap::TapMode::Async { journal, journal_bytes_max }
        }
    };
    let mode_text = match &mode {
        rewind_node::tap::TapMode::Sync { .. } => "sync mode".to_string(),
        rewind_node::tap::TapMode::Async { journal, journal_bytes_max } => {
            format!("async mode, journal {} of at most {} MiB", journal.display(), journal_bytes_max >> 20)
        }
    };
    let client = a.client.client()?;
    let listen = match (a.listen, a.socket) {
        (Some(addr), _) => rewind_node::tap::Listen::Tcp(addr, nbd_tls_policy(a.tls, a.insecure_plaintext)),
        (None, Some(path)) => rewind_node::tap::Listen::Unix(path),
        (None, None) => bail!("give --listen ADDR or --socket PATH"),
    };
    let opts = rewind_node::tap::TapOptions {
        group: a.group.clone(),
        disk: a.disk.clone(),
        backing: a.backing,
        listen,
        window: a.window,
        mode,
        metrics_listen: a.metrics_listen,
        connections_max: a.max_connections,
    };
    rewind_node::tap::run(client, opts, |uri| {
        use std::io::Write;
        println!("tap: serving disk {} of group {} at {uri} ({mode_text})", a.disk, a.group);
        let _ = std::io::stdout().flush();
    })
    .await
}
