//! The command line: the clap definitions and one file per command family
//! (`site`: node, certs, cluster, dev; `group`: groups, points, bookmarks;
//! `tap`; `replay`; `status`; `load`). Each command turns its flags into a
//! library call and prints what came back; `--json` output is a typed
//! struct serialised with serde.

mod backup;
mod dr;
mod group;
mod load;
mod replay;
mod site;
mod status;
mod tap;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use rewind_node::client::Client;
use rewind_node::config::NodeConfig;
use rewind_wire::rpc::DiskSpec;

#[derive(Parser)]
#[command(name = "rewind", version, about = "Continuous data protection: a replicated, ordered log of every write, replayable to any point.", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Client config naming the site's nodes and this client's certificate.
    /// Default: $REWIND_CONFIG, then ./.rewind/client.toml.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

impl ClientArgs {
    /// A client of the site this config names.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::from_file(self.config.as_deref())
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a node from its config file (see ops/node.example.toml).
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make the site's CA (if DIR has none) and a certificate signed by it,
    /// naming its holder's hosts and carrying one role. Keys are written
    /// with mode 0600, atomically; an existing certificate is never
    /// overwritten.
    ///
    /// Examples:
    ///   rewind certs --dir pki --name node-1 --role node --san node1.example.net --san 10.0.0.1
    ///   rewind certs --dir pki --name ops --role admin
    ///   rewind certs --dir pki --name tap-vm1 --role tap --group vm1 --san hv1.example.net
    ///   rewind certs --dir pki --name restore --role reader
    #[command(verbatim_doc_comment)]
    Certs(site::CertsArgs),
    /// Change the site's membership.
    #[command(subcommand)]
    Cluster(site::ClusterCommand),
    /// A node's store on disk, with the node stopped.
    #[command(subcommand)]
    Store(site::StoreCommand),
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
    Group(group::GroupCommand),
    /// Serve a disk over NBD and journal every write into its group (sync
    /// mode: answered once committed on the site; async: once in the tap's
    /// local journal).
    Tap(tap::TapArgs),
    /// A disk as it was at a point in its group's log (an LSN, a time, a
    /// bookmark, a committed backup, or the latest), from any node: written to a raw image file,
    /// or served over NBD (read-only, or writable through a copy-on-write
    /// overlay). Reads go through the block index: the cost grows with the
    /// disk's size, not its history.
    ///
    /// Examples:
    ///   rewind replay vm1 --disk disk0 --at-bookmark before-upgrade --out disk0.raw
    ///   rewind replay vm1 --disk disk0 --at-time 2026-11-22T05:09:40Z --serve 127.0.0.1:10810
    ///   rewind replay vm1 --disk disk0 --latest --serve 127.0.0.1:10810 --writable
    #[command(verbatim_doc_comment)]
    Replay(replay::ReplayArgs),
    /// What a group can be replayed to: its continuous window (first and
    /// last LSN and their times), its bookmarks, newest first, and its
    /// backups (only a committed one is a restore point).
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
        /// Pin the point until then (a time, RFC 3339, or a duration from
        /// now such as 90d): it is kept even when the retention window
        /// passes it.
        #[arg(long)]
        keep_until: Option<String>,
    },
    /// Pin an existing bookmark until a time (kept beyond the retention
    /// window), or release its pin (refused while the group is locked).
    ///
    /// Examples:
    ///   rewind pin vm1 before-upgrade --until 2027-01-31T00:00:00Z
    ///   rewind pin vm1 before-upgrade --release
    #[command(verbatim_doc_comment)]
    Pin {
        #[command(flatten)]
        client: ClientArgs,
        group: String,
        name: String,
        /// A time (RFC 3339) or a duration from now (90d).
        #[arg(long, required_unless_present = "release", conflicts_with = "release")]
        until: Option<String>,
        /// Release the pin.
        #[arg(long)]
        release: bool,
    },
    /// Cross-site disaster recovery: link a group to a second site, watch
    /// the lag, hand it over for maintenance.
    #[command(subcommand)]
    Dr(dr::DrCommand),
    /// At the secondary site: make it the group's primary (next epoch) and
    /// bring a disk up as of a point: written to a file, served read-only,
    /// or served writable by a tap. Refused while the primary answers
    /// (use `rewind dr switchover` there), unless --force.
    ///
    /// Examples:
    ///   rewind failover vm1 --at-time 2026-11-30T10:15:00Z --serve 127.0.0.1:10810
    ///   rewind failover vm1 --latest --serve 10.0.0.5:10809 --writable --backing /srv/vm1.raw
    ///   rewind failover vm1 --latest --test --serve 127.0.0.1:10811
    #[command(verbatim_doc_comment)]
    Failover(dr::FailoverArgs),
    /// At the old primary, after a failover elsewhere: keep this site's
    /// events after the fork point (the last LSN both sites share) as a
    /// read-only branch group, cut the group back to the fork, and follow
    /// the new primary, receiving only what it wrote since. Then `rewind dr
    /// switchover` at the other site gives the roles back.
    Failback(dr::FailbackArgs),
    /// Back a disk up from an NBD source into its group: a full backup, or
    /// an incremental one from a QEMU dirty bitmap or a list of changed
    /// areas (VADP's CBT). Each block is compared with the group's by
    /// blake3, and only blocks that differ are sent; zero extents are
    /// recorded, not read. The backup is a transaction in the group's log:
    /// a restore point once committed, never visible half-done.
    ///
    /// Exit status: 0 committed; 1 failed before it began (nothing
    /// changed); 2 bad usage; 3 the source lacks the dirty bitmap, or qemu
    /// refused it as inconsistent (rerun with --fallback-full); 4 cut off
    /// after it began: the backup stays open (rerun with --resume, or
    /// --abort).
    ///
    /// Examples:
    ///   qemu-nbd -r -f qcow2 -B daily --socket /run/vm1.sock vm1.qcow2 &
    ///   rewind backup --group vm1 --disk disk0 --from 'nbd+unix:///?socket=/run/vm1.sock' --full
    ///   rewind backup --group vm1 --disk disk0 --from nbd://10.0.0.5:10809/disk0 --bitmap daily --fallback-full
    ///   rewind backup --group vm1 --disk disk0 --from nbd://10.0.0.5/disk0 --changed-areas cbt.json --json
    ///   rewind backup --group vm1 --disk disk0 --from nbd://10.0.0.5/disk0 --bitmap daily --resume
    ///   rewind backup --group vm1 --disk disk0 --abort
    #[command(verbatim_doc_comment)]
    Backup(backup::BackupArgs),
    /// Append generated writes to a group (a load generator and smoke test).
    Load(load::LoadArgs),
    /// A local site of real node processes on 127.0.0.1.
    #[command(subcommand)]
    Dev(site::DevCommand),
}

/// A point in a group's log, as `replay` and `failover` take it.
#[derive(Args, Clone)]
#[group(id = "target", multiple = false)]
pub struct TargetArgs {
    /// This LSN (see `rewind points GROUP`).
    #[arg(long)]
    pub at: Option<u64>,
    /// The last LSN whose event time is at or before this time: RFC 3339
    /// (2026-11-22T05:09:40Z, 2026-11-22T06:09:40.25+01:00) or nanoseconds
    /// since the Unix epoch.
    #[arg(long)]
    pub at_time: Option<String>,
    /// The newest bookmark of this name.
    #[arg(long)]
    pub at_bookmark: Option<String>,
    /// The commit of this backup (see `rewind points GROUP`).
    #[arg(long)]
    pub at_backup: Option<String>,
    /// The group's newest LSN.
    #[arg(long)]
    pub latest: bool,
}

impl TargetArgs {
    pub fn target(&self) -> anyhow::Result<rewind_wire::rpc::Target> {
        use rewind_wire::rpc::Target;
        Ok(match (self.at, &self.at_time, &self.at_bookmark) {
            (Some(n), _, _) => Target::Lsn(n),
            (_, Some(t), _) => Target::TimeNs(rewind_wire::timefmt::parse_time_ns(t).context("--at-time")?),
            (_, _, Some(b)) => Target::Bookmark(b.clone()),
            _ if self.at_backup.is_some() => Target::Backup(self.at_backup.clone().expect("checked")),
            _ if self.latest => Target::Latest,
            _ => usage_error("give the point: one of --at LSN, --at-time T, --at-bookmark NAME, --at-backup ID or --latest"),
        })
    }
}

/// An error with its own exit status (documented in the command's help).
#[derive(Debug)]
pub struct ExitStatus(pub u8, pub String);

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for ExitStatus {}

/// Stops with a usage error (exit status 2), as clap does for flags that
/// must be given together, for checks clap cannot express.
pub fn usage_error(message: &str) -> ! {
    clap::Error::raw(clap::error::ErrorKind::MissingRequiredArgument, format!("{message}\n")).exit()
}

/// Parses 4096, 4K, 64M, 1G, 256MiB, 4GiB (binary multiples).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
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

pub fn parse_disk(s: &str) -> anyhow::Result<DiskSpec> {
    let parts: Vec<&str> = s.split(':').collect();
    let (name, size, sector) = match parts.as_slice() {
        [n, sz] => (*n, *sz, "512"),
        [n, sz, sec] => (*n, *sz, *sec),
        _ => bail!("--disk {s:?}: expected NAME:SIZE or NAME:SIZE:SECTOR"),
    };
    let sector_bytes = u32::try_from(parse_size(sector)?).map_err(|_| anyhow::anyhow!("--disk {s:?}: sector size {sector} is not 512, 1024, 2048 or 4096"))?;
    let size_bytes = parse_size(size)?;
    rewind_wire::event::check_name(name)?;
    rewind_wire::event::check_disk_geometry(size_bytes, sector_bytes).with_context(|| format!("--disk {s:?}"))?;
    Ok(DiskSpec { name: name.to_string(), size_bytes, sector_bytes })
}

/// Runs one command to its end.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Node { config } => rewind_node::server::run(NodeConfig::load(&config)?).await,
        Command::Certs(a) => site::certs(&a),
        Command::Cluster(c) => site::cluster(c).await,
        Command::Store(c) => site::store(c),
        Command::Status { client, json } => status::run(client, json).await,
        Command::Group(c) => group::run(c).await,
        Command::Tap(a) => tap::run(a).await,
        Command::Replay(a) => replay::run(a).await,
        Command::Points { client, group, json } => group::points(client, &group, json).await,
        Command::Bookmark { client, group, name, app_consistent, keep_until } => group::bookmark(client, &group, &name, app_consistent, keep_until.as_deref()).await,
        Command::Pin { client, group, name, until, .. } => group::pin(client, &group, &name, until.as_deref()).await,
        Command::Load(a) => load::run(a).await,
        Command::Backup(a) => backup::run(a).await,
        Command::Dr(c) => dr::run(c).await,
        Command::Failover(a) => dr::failover(a).await,
        Command::Failback(a) => dr::failback(a).await,
        Command::Dev(c) => site::dev(c).await,
    }
}
