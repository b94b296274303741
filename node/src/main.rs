//! `rewind`: one binary for nodes, the dev site and every client command.
//! Exit status: 0 done, 1 failed (one line on stderr says why), 2 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use rewind_node::client::Client;
use rewind_node::config::{NodeConfig, RaftTuning};
use rewind_node::dev;
use rewind_wire::raft::Member;
use rewind_wire::rpc::{DiskSpec, Request, Response};

#[derive(Parser)]
#[command(name = "rewind", version, about = "Continuous data protection: a replicated, ordered log of every write, replayable to any point.", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// Client config naming the site's nodes and this client's certificate.
    /// Default: $REWIND_CONFIG, then ./.rewind/client.toml.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node from its config file (see ops/node.example.toml).
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make the site's CA (if DIR has none) and a certificate signed by it.
    Certs {
        /// Folder for ca.pem/ca.key and NAME.pem/NAME.key.
        #[arg(long)]
        dir: PathBuf,
        /// Certificate name, e.g. node-4 or client-backup.
        #[arg(long)]
        name: String,
    },
    /// Change the site's membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Nodes, roles, leader, term, log indexes, and each group's last LSN and digest.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Consistency groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Serve a disk over NBD and journal every write into its group (sync
    /// mode: answered once committed on the site; async: once in the tap's
    /// local journal).
    Tap(TapArgs),
    /// A disk as it was at a point in its group's log (an LSN, a time, a
    /// bookmark, or the latest), from any node: written to a raw image file,
    /// or served over NBD (read-only, or writable through a copy-on-write
    /// overlay). Reads go through the block index: the cost grows with the
    /// disk's size, not its history.
    ///
    /// Examples:
    ///   rewind replay vm1 --disk disk0 --at-bookmark before-upgrade --out disk0.raw
    ///   rewind replay vm1 --disk disk0 --at-time 2026-11-22T05:09:40Z --serve 127.0.0.1:10810
    ///   rewind replay vm1 --disk disk0 --latest --serve 127.0.0.1:10810 --writable
    #[command(verbatim_doc_comment)]
    Replay(ReplayArgs),
    /// What a group can be replayed to: its continuous window (first and
    /// last LSN and their times) and its bookmarks, newest first.
    Points {
        #[command(flatten)]
        client: ClientArgs,
        group: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Put a named point into a group's log, e.g. before an upgrade.
    Bookmark {
        #[command(flatten)]
        client: ClientArgs,
        group: String,
        name: String,
        /// Mark the point as application-consistent (the application was
        /// quiesced or flushed when it was taken).
        #[arg(long)]
        app_consistent: bool,
    },
    /// Append generated writes to a group (a load generator and smoke test).
    Load(LoadArgs),
    /// A local site of real node processes on 127.0.0.1.
    #[command(subcommand)]
    Dev(DevCommand),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Initialise a new site with the nodes listed in the client config as voters.
    Init {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a node as a learner (it receives the log but does not vote).
    AddLearner {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u64,
        /// The node's QUIC address, e.g. 127.0.0.1:7104.
        #[arg(long)]
        addr: String,
    },
    /// Make a learner a voter.
    Promote {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u64,
    },
    /// Add a node as a learner, wait for it to catch up, then promote it.
    Join {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        addr: String,
    },
    /// Remove a node from the site. Removing the leader is safe: it hands
    /// leadership to another voter first, and that node makes the change.
    /// Then stop the removed node's process and take it out of the
    /// clients' configs: no member talks to it any more, so if it missed
    /// the change it can go on believing it leads an old term.
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create a consistency group with its disks.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// Group name: 1-64 of [A-Za-z0-9._-].
        group: String,
        /// NAME:SIZE[:SECTOR], e.g. disk0:10G or disk1:64M:4096. Repeat for each disk.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
    },
    /// Add a disk to an existing group (an event in its log).
    AddDisk {
        #[command(flatten)]
        client: ClientArgs,
        group: String,
        /// NAME:SIZE[:SECTOR], e.g. disk1:20G.
        #[arg(long = "disk", required = true)]
        disk: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum TapMode {
    /// Answer a write once its event is committed on a majority (RPO 0).
    Sync,
    /// Answer once the write is in the tap's local journal (fsync'd); a
    /// shipper streams the journal to the site behind. RPO is the age of the
    /// oldest unshipped write (`rewind status` shows it).
    Async,
}

#[derive(Args)]
struct TapArgs {
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
    /// TCP address on loopback, e.g. 127.0.0.1:10809 (port 0 picks a free one).
    #[arg(long, conflicts_with = "socket", required_unless_present = "socket")]
    listen: Option<std::net::SocketAddr>,
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
    /// Serve Prometheus metrics here (loopback), e.g. 127.0.0.1:9464.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["at", "at_time", "at_bookmark", "latest"])))]
#[command(group(clap::ArgGroup::new("output").required(true).args(["out", "serve"])))]
struct ReplayArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The consistency group.
    group: String,
    /// The disk of the group to replay.
    #[arg(long)]
    disk: String,
    /// Replay to this LSN (see `rewind points GROUP`).
    #[arg(long, group = "target")]
    at: Option<u64>,
    /// Replay to the last LSN whose event time is at or before this time:
    /// RFC 3339 (2026-11-22T05:09:40Z, 2026-11-22T06:09:40.25+01:00) or
    /// nanoseconds since the Unix epoch.
    #[arg(long, group = "target")]
    at_time: Option<String>,
    /// Replay to the newest bookmark of this name.
    #[arg(long, group = "target")]
    at_bookmark: Option<String>,
    /// Replay to the group's newest LSN.
    #[arg(long, group = "target")]
    latest: bool,
    /// The raw image to write (sparse where the disk reads as zeroes).
    #[arg(long, group = "output")]
    out: Option<PathBuf>,
    /// Serve the disk at that point as an NBD export on this loopback
    /// address (e.g. 127.0.0.1:10810) instead of writing a file: instant
    /// access, no copy first. Runs until SIGINT or SIGTERM.
    #[arg(long, group = "output")]
    serve: Option<std::net::SocketAddr>,
    /// With --serve: accept writes into a copy-on-write overlay (instant
    /// recovery: boot and change the disk); the log is never touched.
    #[arg(long, requires = "serve")]
    writable: bool,
    /// With --writable: the overlay file (default under /var/tmp). Its map
    /// of written blocks is kept beside it as FILE.map.
    #[arg(long, requires = "writable")]
    overlay: Option<PathBuf>,
    /// With --writable: keep the overlay when the export stops (default:
    /// thrown away).
    #[arg(long, requires = "writable")]
    keep_overlay: bool,
    /// The node to replay from (default: the first that answers). A
    /// follower that has not applied the target yet is waited for.
    #[arg(long)]
    node: Option<u64>,
    /// How long to wait for the serving node to apply the target, in seconds.
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

#[derive(Args)]
struct LoadArgs {
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

#[derive(Subcommand)]
enum DevCommand {
    /// Start a local site: certificates, configs, N node processes, init.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = ".rewind")]
        dir: PathBuf,
        /// Build a snapshot (and purge the log) after this many entries.
        #[arg(long, default_value_t = 2000)]
        snapshot_every: u64,
        /// Entries kept in the log behind a snapshot for lagging followers.
        #[arg(long, default_value_t = 500)]
        logs_kept: u64,
    },
    /// Stop the local site (SIGTERM, then SIGKILL after 10 s).
    Down {
        #[arg(long, default_value = ".rewind")]
        dir: PathBuf,
        /// Also delete the site's folder and data.
        #[arg(long)]
        purge: bool,
    },
    /// Start one stopped node of the local site again.
    StartNode {
        id: u64,
        #[arg(long, default_value = ".rewind")]
        dir: PathBuf,
    },
}

/// Parses 4096, 4K, 64M, 1G, 256MiB, 4GiB (binary multiples).
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let mult = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1u64,
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        "T" | "TIB" => 1 << 40,
        _ => bail!("size {s:?}: unknown unit {unit:?} (use K, M, G, T or KiB, MiB, GiB, TiB)"),
    };
    let n: u64 = num.parse().with_context(|| format!("size {s:?} is not a number with an optional unit such as M or MiB"))?;
    n.checked_mul(mult).with_context(|| format!("size {s:?} is too large"))
}

fn parse_disk(s: &str) -> anyhow::Result<DiskSpec> {
    let parts: Vec<&str> = s.split(':').collect();
    let (name, size, sector) = match parts.as_slice() {
        [n, sz] => (*n, *sz, "512"),
        [n, sz, sec] => (*n, *sz, *sec),
        _ => bail!("--disk {s:?}: expected NAME:SIZE or NAME:SIZE:SECTOR"),
    };
    let sector_bytes = parse_size(sector)? as u32;
    let size_bytes = parse_size(size)?;
    rewind_wire::event::check_name(name)?;
    rewind_wire::event::check_disk_geometry(size_bytes, sector_bytes).with_context(|| format!("--disk {s:?}"))?;
    Ok(DiskSpec { name: name.to_string(), size_bytes, sector_bytes })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let default = if matches!(cli.command, Command::Node { .. }) { "info" } else { "warn" };
        tracing_subscriber::EnvFilter::new(default)
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rewind: error: start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rewind: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Node { config } => rewind_node::server::run(NodeConfig::load(&config)?).await,
        Command::Certs { dir, name } => {
            std::fs::create_dir_all(&dir)?;
            if !dir.join("ca.pem").exists() {
                rewind_node::tls::make_ca(&dir, &name)?;
                println!("made CA {}", dir.join("ca.pem").display());
            }
            rewind_node::tls::make_leaf(&dir, &name)?;
            println!("made {}", dir.join(format!("{name}.pem")).display());
            Ok(())
        }
        Command::Cluster(c) => cluster(c).await,
        Command::Status { client, json } => status(client, json).await,
        Command::Group(GroupCommand::Create { client, group, disks }) => {
            rewind_wire::event::check_name(&group)?;
            let disks = disks.iter().map(|d| parse_disk(d)).collect::<anyhow::Result<Vec<_>>>()?;
            Client::from_file(client.config.as_deref())?.create_group(&group, disks).await?;
            println!("created consistency group {group}");
            Ok(())
        }
        Command::Group(GroupCommand::AddDisk { client, group, disk }) => {
            rewind_wire::event::check_name(&group)?;
            let d = parse_disk(&disk)?;
            let client = Client::from_file(client.config.as_deref())?;
            let mut producer = rewind_node::client::Producer::new(client, 1);
            let event = rewind_wire::event::Event::DiskCreate { disk: d.name.clone(), size_bytes: d.size_bytes, sector_bytes: d.sector_bytes };
            let (lsn, _) = producer.append(&group, vec![rewind_wire::event::TimedEvent { time_ns: rewind_node::now_ns(), event }]).await?;
            println!("added disk {} to {group} at LSN {lsn}", d.name);
            Ok(())
        }
        Command::Tap(a) => {
            let mode = match a.mode {
                TapMode::Sync => {
                    if a.journal.is_some() {
                        bail!("--journal is for --mode async; a sync tap keeps no journal");
                    }
                    let identity = a.identity.clone().unwrap_or_else(|| {
                        let mut p = a.backing.clone().into_os_string();
                        p.push(".tap-id");
                        PathBuf::from(p)
                    });
                    rewind_node::tap::TapMode::Sync { identity }
                }
                TapMode::Async => {
                    if a.identity.is_some() {
                        bail!("--identity is for --mode sync; an async tap keeps its identity in its journal");
                    }
                    let journal = a.journal.clone().unwrap_or_else(|| {
                        let mut p = a.backing.clone().into_os_string();
                        p.push(".journal");
                        PathBuf::from(p)
                    });
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
            let client = Client::from_file(a.client.config.as_deref())?;
            let listen = match (a.listen, a.socket) {
                (Some(addr), _) => rewind_node::tap::Listen::Tcp(addr),
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
            };
            rewind_node::tap::run(client, opts, |uri| {
                use std::io::Write;
                println!("tap: serving disk {} of group {} at {uri} ({mode_text})", a.disk, a.group);
                let _ = std::io::stdout().flush();
            })
            .await
        }
        Command::Replay(a) => {
            let client = Client::from_file(a.client.config.as_deref())?;
            use rewind_wire::rpc::Target;
            let target = match (a.at, &a.at_time, &a.at_bookmark) {
                (Some(n), _, _) => Target::Lsn(n),
                (_, Some(t), _) => Target::TimeNs(rewind_node::timefmt::parse_time_ns(t).context("--at-time")?),
                (_, _, Some(b)) => Target::Bookmark(b.clone()),
                _ => Target::Latest,
            };
            let opts = rewind_node::replay::ReplayOptions {
                group: a.group.clone(),
                disk: a.disk.clone(),
                target,
                out: a.out.clone().unwrap_or_default(),
                node: a.node,
                wait: std::time::Duration::from_secs(a.wait),
            };
            if let Some(listen) = a.serve {
                let serve = rewind_node::replay::ServeOptions { listen, writable: a.writable, overlay: a.overlay.clone(), keep_overlay: a.keep_overlay };
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
                            rewind_node::timefmt::format_time_ns(s.time_ns),
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
                rewind_node::timefmt::format_time_ns(r.time_ns),
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
        Command::Points { client, group, json } => points(client, &group, json).await,
        Command::Bookmark { client, group, name, app_consistent } => {
            rewind_wire::event::check_name(&name).context("bookmark name")?;
            let client = Client::from_file(client.config.as_deref())?;
            let mut producer = rewind_node::client::Producer::new(client, 1);
            let event = rewind_wire::event::Event::Bookmark { name: name.clone(), app_consistent };
            let time_ns = rewind_node::now_ns();
            let (lsn, _) = producer.append(&group, vec![rewind_wire::event::TimedEvent { time_ns, event }]).await?;
            println!("bookmark {name} in {group} at LSN {lsn} ({}){}", rewind_node::timefmt::format_time_ns(time_ns), if app_consistent { ", app-consistent" } else { "" });
            Ok(())
        }
        Command::Load(args) => load(args).await,
        Command::Dev(DevCommand::Up { nodes, dir, snapshot_every, logs_kept }) => {
            let raft = RaftTuning { snapshot_every_entries: snapshot_every, logs_kept_after_snapshot: logs_kept, ..RaftTuning::default() };
            let exe = std::env::current_exe().context("find the rewind binary")?;
            let opts = dev::UpOptions { exe, nodes, dir: dir.clone(), raft };
            let client_path = dev::up(&opts).await?;
            let site = dev::DevSite::load(&dir)?;
            println!("dev site up: {} nodes in {}", site.nodes.len(), dir.display());
            for n in &site.nodes {
                println!("  node {} quic {} metrics http://{}/metrics pid {} log {}", n.id, n.addr, n.metrics, n.pid, n.log.display());
            }
            println!("use it with:\n  export REWIND_CONFIG={}", client_path.display());
            println!("stop it with:\n  rewind dev down --dir {}", dir.display());
            Ok(())
        }
        Command::Dev(DevCommand::Down { dir, purge }) => {
            let n = dev::down(&dir, purge)?;
            println!("stopped {n} node(s) of the dev site in {}", dir.display());
            Ok(())
        }
        Command::Dev(DevCommand::StartNode { id, dir }) => {
            let pid = dev::start_node(&dir, id).await?;
            println!("started node {id} (pid {pid})");
            Ok(())
        }
    }
}

fn expect_done(r: Response) -> anyhow::Result<()> {
    match r {
        Response::Done => Ok(()),
        Response::Error(e) => bail!("{e}"),
        other => bail!("unexpected reply {other:?}"),
    }
}

async fn voters(client: &Client) -> anyhow::Result<Vec<u64>> {
    for (_, s) in client.status_all().await {
        if let Ok(s) = s {
            if let Some(sh) = s.shards.first() {
                if sh.role == "leader" {
                    return Ok(sh.voters.clone());
                }
            }
        }
    }
    bail!("no leader answered; cannot read the current voters")
}

async fn cluster(c: ClusterCommand) -> anyhow::Result<()> {
    match c {
        ClusterCommand::Init { client } => {
            let client = Client::from_file(client.config.as_deref())?;
            let members = client.nodes().iter().map(|n| Member { id: n.id, addr: n.addr.to_string() }).collect();
            expect_done(client.call_node(client.nodes()[0].addr, &Request::ClusterInit { members }).await?)?;
            let leader = client.wait_for_leader(Duration::from_secs(30)).await?;
            println!("site initialised; node {leader} leads");
        }
        ClusterCommand::AddLearner { client, id, addr } => {
            let client = Client::from_file(client.config.as_deref())?;
            expect_done(client.call_leader(&Request::AddLearner { member: Member { id, addr } }).await?)?;
            println!("node {id} added as a learner");
        }
        ClusterCommand::Join { client, id, addr } => {
            let client = Client::from_file(client.config.as_deref())?;
            expect_done(client.call_leader(&Request::AddLearner { member: Member { id, addr } }).await?)?;
            let mut v = voters(&client).await?;
            v.push(id);
            expect_done(client.call_leader(&Request::ChangeVoters { voters: v }).await?)?;
            println!("node {id} joined as a voter");
        }
        ClusterCommand::Promote { client, id } => {
            let client = Client::from_file(client.config.as_deref())?;
            let mut v = voters(&client).await?;
            if !v.contains(&id) {
                v.push(id);
            }
            expect_done(client.call_leader(&Request::ChangeVoters { voters: v }).await?)?;
            println!("node {id} is a voter");
        }
        ClusterCommand::Remove { client, id } => {
            let client = Client::from_file(client.config.as_deref())?;
            let v: Vec<u64> = voters(&client).await?.into_iter().filter(|v| *v != id).collect();
            expect_done(client.call_leader(&Request::ChangeVoters { voters: v }).await?)?;
            println!("node {id} removed; stop its process and take it out of the clients' configs");
        }
    }
    Ok(())
}

async fn status(args: ClientArgs, json: bool) -> anyhow::Result<()> {
    let client = Client::from_file(args.config.as_deref())?;
    let all = client.status_all().await;
    // Each tap reports to the leader of the moment; keep its freshest report.
    let mut taps: std::collections::BTreeMap<(String, String), rewind_wire::rpc::TapStatus> = Default::default();
    for t in all.iter().filter_map(|(_, s)| s.as_ref().ok()).flat_map(|s| s.taps.iter()) {
        let key = (t.report.group.clone(), t.report.disk.clone());
        if taps.get(&key).is_none_or(|old| old.age_ms > t.age_ms) {
            taps.insert(key, t.clone());
        }
    }
    let taps: Vec<rewind_wire::rpc::TapStatus> = taps.into_values().collect();
    if json {
        let nodes: Vec<serde_json::Value> = all
            .iter()
            .map(|(n, s)| match s {
                Ok(s) => {
                    let sh = s.shards.first();
                    serde_json::json!({
                        "id": s.id, "addr": s.addr, "pid": s.pid, "up": true,
                        "role": sh.map(|x| x.role.clone()), "term": sh.map(|x| x.term),
                        "leader": sh.and_then(|x| x.leader),
                        "last_log_index": sh.and_then(|x| x.last_log_index),
                        "committed_index": sh.and_then(|x| x.committed_index),
                        "applied_index": sh.and_then(|x| x.applied_index),
                        "snapshot_index": sh.and_then(|x| x.snapshot_index),
                        "purged_index": sh.and_then(|x| x.purged_index),
                        "voters": sh.map(|x| x.voters.clone()), "learners": sh.map(|x| x.learners.clone()),
                        "groups": sh.map(|x| x.groups.iter().map(|g| serde_json::json!({
                            "name": g.name, "last_lsn": g.last_lsn, "digest": g.digest_hex,
                            "events": g.events, "payload_bytes": g.payload_bytes,
                        })).collect::<Vec<_>>()),
                    })
                }
                Err(e) => serde_json::json!({"id": n.id, "addr": n.addr.to_string(), "up": false, "error": format!("{e:#}")}),
            })
            .collect();
        let taps: Vec<serde_json::Value> = taps
            .iter()
            .map(|t| {
                let r = &t.report;
                serde_json::json!({
                    "group": r.group, "disk": r.disk, "pid": r.pid, "uri": r.uri, "mode": "async",
                    "rpo_ms": r.rpo_ms, "journal_bytes": r.journal_bytes, "journal_bytes_max": r.journal_bytes_max,
                    "unshipped_batches": r.unshipped_batches, "stalls": r.stalls, "shipped_lsn": r.shipped_lsn,
                    "report_age_ms": t.age_ms,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "nodes": nodes, "taps": taps }))?);
        return Ok(());
    }
    println!("{:<5} {:<22} {:<10} {:>5} {:>7} {:>9} {:>10} {:>8} {:>8}", "NODE", "ADDR", "ROLE", "TERM", "LEADER", "LAST-LOG", "COMMITTED", "APPLIED", "PID");
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let mut groups: std::collections::BTreeMap<String, Vec<(u64, u64, String)>> = Default::default();
    for (n, s) in &all {
        match s {
            Ok(s) => {
                for sh in &s.shards {
                    println!("{:<5} {:<22} {:<10} {:>5} {:>7} {:>9} {:>10} {:>8} {:>8}", s.id, s.addr, sh.role, sh.term, opt(sh.leader), opt(sh.last_log_index), opt(sh.committed_index), opt(sh.applied_index), s.pid);
                    for g in &sh.groups {
                        groups.entry(g.name.clone()).or_default().push((s.id, g.last_lsn, g.digest_hex.clone()));
                    }
                }
            }
            Err(e) => println!("{:<5} {:<22} {:<10} ({e:#})", n.id, n.addr.to_string(), "down"),
        }
    }
    if !groups.is_empty() {
        println!("\n{:<20} {:<6} {:>10}  DIGEST", "GROUP", "NODE", "LAST-LSN");
        for (name, per_node) in &groups {
            for (id, lsn, digest) in per_node {
                println!("{:<20} {:<6} {:>10}  {}", name, id, lsn, &digest[..16]);
            }
        }
    }
    if !taps.is_empty() {
        println!("\n{:<16} {:<12} {:>9} {:>21} {:>9} {:>7} {:>11} {:>8}", "ASYNC TAP", "DISK", "RPO", "JOURNAL", "UNSHIPPED", "STALLS", "SHIPPED-LSN", "REPORTED");
        for t in &taps {
            let r = &t.report;
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            let fill = format!("{:.1}/{:.0} MiB {:>3.0}%", mib(r.journal_bytes), mib(r.journal_bytes_max), 100.0 * r.journal_bytes as f64 / r.journal_bytes_max.max(1) as f64);
            println!("{:<16} {:<12} {:>7.2} s {:>21} {:>9} {:>7} {:>11} {:>6.1} s ago", r.group, r.disk, r.rpo_ms as f64 / 1000.0, fill, r.unshipped_batches, r.stalls, r.shipped_lsn, t.age_ms as f64 / 1000.0);
        }
    }
    Ok(())
}

async fn points(args: ClientArgs, group: &str, json: bool) -> anyhow::Result<()> {
    use rewind_node::timefmt::format_time_ns;
    let client = Client::from_file(args.config.as_deref())?;
    let p = match client.call_leader(&Request::Points { group: group.to_string(), on_leader: true }).await? {
        Response::Points(p) => p,
        other => bail!("unexpected reply {other:?}"),
    };
    if json {
        let v = serde_json::json!({
            "group": p.group,
            "window": { "first_lsn": p.first_lsn, "last_lsn": p.last_lsn, "first_time": format_time_ns(p.first_time_ns), "last_time": format_time_ns(p.last_time_ns),
                        "first_time_ns": p.first_time_ns, "last_time_ns": p.last_time_ns },
            "bookmarks": p.bookmarks.iter().map(|b| serde_json::json!({
                "name": b.name, "lsn": b.lsn, "time": format_time_ns(b.time_ns), "time_ns": b.time_ns, "app_consistent": b.app_consistent,
            })).collect::<Vec<_>>(),
            "backups": [],
            "disks": p.disks.iter().map(|d| serde_json::json!({"name": d.name, "size_bytes": d.size_bytes})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if p.last_lsn == 0 {
        println!("group {group} has no events yet: nothing to replay");
        return Ok(());
    }
    println!("group {group}: continuous window LSN {}..={}", p.first_lsn, p.last_lsn);
    println!("  from {}  to {}", format_time_ns(p.first_time_ns), format_time_ns(p.last_time_ns));
    println!("  disks: {}", p.disks.iter().map(|d| format!("{} ({} MiB)", d.name, d.size_bytes >> 20)).collect::<Vec<_>>().join(", "));
    if p.bookmarks.is_empty() {
        println!("no bookmarks (add one with `rewind bookmark {group} NAME`)");
    } else {
        println!("\n{:<24} {:>10}  {:<32} APP-CONSISTENT", "BOOKMARK", "LSN", "TIME");
        for b in &p.bookmarks {
            println!("{:<24} {:>10}  {:<32} {}", b.name, b.lsn, format_time_ns(b.time_ns), if b.app_consistent { "yes" } else { "no" });
        }
    }
    println!("backups: none (CBT import is not built yet)");
    Ok(())
}

async fn load(a: LoadArgs) -> anyhow::Result<()> {
    let client = Client::from_file(a.client.config.as_deref())?;
    let group = match client.call_leader(&Request::GroupState { group: a.group.clone() }).await? {
        Response::Group(g) => g,
        other => bail!("unexpected reply {other:?}"),
    };
    let disk = group.disks.iter().find(|d| d.name == a.disk).with_context(|| format!("group {} has no disk {:?}", a.group, a.disk))?;
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
        println!("{}", serde_json::json!({
            "events": report.events, "bytes": report.bytes, "seconds": secs,
            "mb_per_s": report.bytes as f64 / 1e6 / secs, "events_per_s": report.events as f64 / secs,
            "latency_us_p50": h.value_at_quantile(0.5), "latency_us_p99": h.value_at_quantile(0.99),
            "latency_us_p999": h.value_at_quantile(0.999), "lsn_first": first, "lsn_last": last,
            "errors": report.errors,
        }));
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
