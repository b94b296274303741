//! `rewind node`'s neighbours: certificates, membership (`cluster`) and
//! the local dev site (`dev`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use rewind_node::client::Client;
use rewind_node::config::RaftTuning;
use rewind_node::dev;
use rewind_node::tls::{LeafSpec, LOOPBACK_NAMES};
use rewind_service::access::Access;
use rewind_wire::raft::Member;
use rewind_wire::rpc::{Request, Response};

use super::ClientArgs;

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Bring a node's store written by an older rewind to this build's
    /// format, in place: a format-1 store (before the block index) gets
    /// its block index, content index, bookmarks and chain rebuilt from its
    /// events, each group's chain checked against its record. Stop the
    /// node first; run it on every node of the site, then start them. A
    /// store that is current already is left alone. Exit 0 when the store
    /// is current at the end, 1 on an error (the store is left in its old
    /// format, and running the command again starts over).
    ///
    /// Examples:
    ///   rewind store migrate --config /etc/rewind/node.toml
    ///   rewind store migrate --data-dir /var/lib/rewind
    #[command(verbatim_doc_comment)]
    Migrate {
        /// The node's config file (its data_dir is used).
        #[arg(long, required_unless_present = "data_dir", conflicts_with = "data_dir")]
        config: Option<PathBuf>,
        /// The node's data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Runs `rewind store ...`.
pub fn store(c: StoreCommand) -> anyhow::Result<()> {
    let StoreCommand::Migrate { config, data_dir } = c;
    let data_dir = match (config, data_dir) {
        (Some(c), _) => rewind_node::config::NodeConfig::load(&c)?.data_dir,
        (None, Some(d)) => d,
        (None, None) => anyhow::bail!("give --config or --data-dir"),
    };
    let dir = data_dir.join(format!("shard-{}", rewind_node::DATA_SHARD));
    let started = std::time::Instant::now();
    let mut last = std::time::Instant::now();
    let (found, groups) = rewind_raft_store::migrate(&dir, |group, done, of| {
        if last.elapsed() >= std::time::Duration::from_secs(1) || done == of {
            eprintln!("migrate: group {group}: {done} of {of} events");
            last = std::time::Instant::now();
        }
    })
    .with_context(|| format!("migrate the store in {}", dir.display()))?;
    match found {
        rewind_raft_store::Found::Current => println!("the store in {} is current already; nothing to do", dir.display()),
        rewind_raft_store::Found::Empty => println!("the store in {} held nothing; stamped with this build's format", dir.display()),
        rewind_raft_store::Found::Migrated => {
            for g in &groups {
                println!("group {}: {} events, {} payload bytes, rebuilt and checked", g.group, g.events, g.payload_bytes);
            }
            println!("the store in {} is current now ({} groups, {:.1} s); start the node", dir.display(), groups.len(), started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum ClusterCommand {
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
pub enum DevCommand {
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
        #[arg(long, default_value_t = 128)]
        logs_kept: u64,
        /// Groups the site's `tap` certificate (DIR/tap.toml) may write;
        /// the admin's DIR/client.toml may write any group.
        #[arg(long, value_delimiter = ',', default_value = "vm1")]
        tap_groups: Vec<String>,
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

#[derive(clap::Args)]
pub struct CertsArgs {
    /// Folder for ca.pem/ca.key and NAME.pem/NAME.key (created with mode
    /// 0700 if missing). Keep ca.key on the machine that issues
    /// certificates only; hosts need ca.pem and their own pair.
    #[arg(long)]
    dir: PathBuf,
    /// Certificate name, e.g. node-4 or backup-admin: 1-64 of
    /// A-Z a-z 0-9 . _ -, not `ca` and not one DIR already holds.
    #[arg(long)]
    name: String,
    /// A host name or IP address the holder is dialled at (repeat for
    /// each). A node's certificate must name its `advertise` host; a
    /// tap's or replay's must name its NBD-TLS listen host. Default:
    /// localhost, 127.0.0.1 and ::1.
    #[arg(long = "san", value_name = "DNS-OR-IP")]
    sans: Vec<String>,
    /// What the holder may ask of the site: node (Raft's RPCs between
    /// nodes), admin (membership, groups and everything a client does),
    /// tap (appends to the --group groups), reader (points, resolve and
    /// block reads, for replays), peer (another site's nodes on a DR link:
    /// DR state and pulling the log, never a write).
    #[arg(long, value_parser = ["node", "admin", "tap", "reader", "peer"])]
    role: String,
    /// A group a tap certificate may write (repeat, or comma-separated).
    #[arg(long = "group", value_delimiter = ',')]
    groups: Vec<String>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365)]
    days: i64,
}

pub fn certs(a: &CertsArgs) -> anyhow::Result<()> {
    // Everything is checked before anything is written.
    let access = Access::from_parts(&a.role, &a.groups)?;
    let names = if a.sans.is_empty() { LOOPBACK_NAMES.iter().map(|s| s.to_string()).collect() } else { a.sans.clone() };
    let spec = LeafSpec { names, access, days: a.days };
    spec.check()?;
    let dir = &a.dir;
    rewind_node::tls::check_leaf_name(dir, &a.name)?;
    create_private_dir(dir)?;
    if !dir.join("ca.pem").exists() {
        rewind_node::tls::make_ca(dir, &a.name)?;
        println!("made CA {}", dir.join("ca.pem").display());
    }
    rewind_node::tls::make_leaf(dir, &a.name, &spec)?;
    println!(
        "made {} ({}; names {}; valid {} days)",
        dir.join(format!("{}.pem", a.name)).display(),
        spec.access,
        spec.names.join(", "),
        spec.days
    );
    Ok(())
}

fn expect_done(r: Response) -> anyhow::Result<()> {
    match r {
        Response::Done => Ok(()),
        Response::Error(e) => bail!("{e}"),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// The site's voters and learners, as its leader sees them.
async fn members(client: &Client) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    for (_, s) in client.status_all().await {
        if let Ok(s) = s {
            if let Some(sh) = s.shards.first() {
                if sh.role == rewind_wire::rpc::Role::Leader {
                    return Ok((sh.voters.clone(), sh.learners.clone()));
                }
            }
        }
    }
    bail!("no leader answered; cannot read the current members")
}

async fn voters(client: &Client) -> anyhow::Result<Vec<u64>> {
    Ok(members(client).await?.0)
}

/// A node address peers can dial: IP:PORT, [IPv6]:PORT or HOST:PORT.
fn check_addr(addr: &str) -> anyhow::Result<()> {
    rewind_node::addr::HostPort::parse(addr).map(|_| ()).with_context(|| format!("--addr {addr:?}"))
}

/// Creates `dir` (and its parents) if missing, the new folders with mode 0700.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("create {}", dir.display()))
}

pub async fn cluster(c: ClusterCommand) -> anyhow::Result<()> {
    match c {
        ClusterCommand::Init { client } => {
            let client = client.client()?;
            let members = client.nodes().iter().map(|n| Member { id: n.id, addr: n.addr.to_string() }).collect();
            expect_done(client.call_node(&client.nodes()[0].addr, &Request::ClusterInit { members }).await?)?;
            let leader = client.wait_for_leader(Duration::from_secs(30)).await?;
            println!("site initialised; node {leader} leads");
        }
        ClusterCommand::AddLearner { client, id, addr } => {
            check_addr(&addr)?;
            let client = client.client()?;
            expect_done(client.call_leader(&Request::AddLearner { member: Member { id, addr } }).await?)?;
            println!("node {id} added as a learner");
        }
        ClusterCommand::Join { client, id, addr } => {
            check_addr(&addr)?;
            let client = client.client()?;
            expect_done(client.call_leader(&Request::AddLearner { member: Member { id, addr } }).await?)?;
            let mut v = voters(&client).await?;
            v.push(id);
            expect_done(client.call_leader(&Request::ChangeVoters { voters: v }).await?)?;
            println!("node {id} joined as a voter");
        }
        ClusterCommand::Promote { client, id } => {
            let client = client.client()?;
            let mut v = voters(&client).await?;
            if !v.contains(&id) {
                v.push(id);
            }
            expect_done(client.call_leader(&Request::ChangeVoters { voters: v }).await?)?;
            println!("node {id} is a voter");
        }
        ClusterCommand::Remove { client, id } => {
            let client = client.client()?;
            let (voters, learners) = members(&client).await?;
            if voters.contains(&id) {
                let v: Vec<u64> = voters.into_iter().filter(|v| *v != id).collect();
                expect_done(client.call_leader(&Request::ChangeVoters { voters: v }).await?)?;
            } else if learners.contains(&id) {
                expect_done(client.call_leader(&Request::RemoveLearner { id }).await?)?;
            } else {
                bail!("node {id} is not a member of the site (voters {voters:?}, learners {learners:?})");
            }
            // The leader may have handed over: ask until the change shows.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let now = members(&client).await;
                match now {
                    Ok((v, l)) if !v.contains(&id) && !l.contains(&id) => break,
                    _ if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                    Ok((v, l)) => bail!("node {id} is still a member 10 s after the change (voters {v:?}, learners {l:?}); try again"),
                    Err(e) => return Err(e.context(format!("check that node {id} left"))),
                }
            }
            println!("node {id} removed; stop its process and take it out of the clients' configs");
        }
    }
    Ok(())
}

pub async fn dev(c: DevCommand) -> anyhow::Result<()> {
    match c {
        DevCommand::Up { nodes, dir, snapshot_every, logs_kept, tap_groups } => {
            let raft = RaftTuning { snapshot_every_entries: snapshot_every, logs_kept_after_snapshot: logs_kept, ..RaftTuning::default() };
            let exe = std::env::current_exe().context("find the rewind binary")?;
            let opts = dev::UpOptions { exe, nodes, dir: dir.clone(), raft, tap_groups, gc_busy_percent: rewind_node::config::default_gc_busy_percent() };
            let client_path = dev::up(&opts).await?;
            let site = dev::DevSite::load(&dir)?;
            println!("dev site up: {} nodes in {}", site.nodes.len(), dir.display());
            for n in &site.nodes {
                println!("  node {} quic {} metrics http://{}/metrics pid {} log {}", n.id, n.addr, n.metrics, n.pid, n.log.display());
            }
            println!("use it with:\n  export REWIND_CONFIG={}", client_path.display());
            println!(
                "  (admin: client.toml; reader: {}; DR peer: {}; tap for groups {}: {})",
                dir.join("reader.toml").display(),
                dir.join("peer.toml").display(),
                opts.tap_groups.join(","),
                dir.join("tap.toml").display()
            );
            println!("stop it with:\n  rewind dev down --dir {}", dir.display());
            Ok(())
        }
        DevCommand::Down { dir, purge } => {
            let n = dev::down(&dir, purge)?;
            println!("stopped {n} node(s) of the dev site in {}", dir.display());
            Ok(())
        }
        DevCommand::StartNode { id, dir } => {
            let pid = dev::start_node(&dir, id).await?;
            println!("started node {id} (pid {pid})");
            Ok(())
        }
    }
}
