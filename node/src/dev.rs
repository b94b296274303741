//! `rewind dev up` / `down`: a local site of real node processes on
//! 127.0.0.1, with its own CA, certificates, configs and data, in one folder.

use std::net::{SocketAddr, TcpListener, UdpSocket};

use rewind_service::access::Access;

use crate::addr::HostPort;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::config::{default_gc_busy_percent, default_gc_debt_max_mib, default_gc_rate_mib, ClientConfig, NodeAddr, NodeConfig, RaftTuning, TlsFiles};
use rewind_wire::raft::Member;
use rewind_wire::rpc::{Request, Response};

const SITE_FILE: &str = "site.json";
const START_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevNode {
    pub id: u64,
    pub addr: HostPort,
    pub metrics: HostPort,
    pub pid: u32,
    pub exe: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevSite {
    pub nodes: Vec<DevNode>,
}

impl DevSite {
    pub fn load(dir: &Path) -> anyhow::Result<DevSite> {
        let path = dir.join(SITE_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no dev site in {} (read {})", dir.display(), path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let tmp = dir.join("site.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join(SITE_FILE))?;
        Ok(())
    }
}

pub fn alive(pid: u32) -> bool {
    // Signal 0 checks existence; a zombie child still "exists", so also read its state.
    if unsafe { libc::kill(pid as i32, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// The kernel's ephemeral port range, from which clients get their ports.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// A free loopback port below the ephemeral range, so that no client's
/// ephemeral port can take it while its node is down and restarting.
/// Free for both UDP (QUIC) and TCP (metrics) when it is returned.
/// A dev site's certificates name loopback only and last ten years.
fn dev_leaf(access: Access) -> crate::tls::LeafSpec {
    crate::tls::LeafSpec::loopback(access, 3650)
}

fn free_port() -> anyhow::Result<SocketAddr> {
    // Ports handed out by this process: a node started a moment ago may
    // not have bound its port yet, so a probe alone would give it again.
    static CHOSEN: std::sync::Mutex<std::collections::BTreeSet<u16>> = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let (ephemeral_low, _) = ephemeral_range();
    let low = 10_000u16;
    let high = ephemeral_low.saturating_sub(1).max(low + 1);
    let span = u64::from(high - low);
    let mut pick = crate::now_ns() ^ u64::from(std::process::id()).rotate_left(17);
    let mut chosen = CHOSEN.lock().expect("chosen ports");
    for _ in 0..512 {
        pick = pick.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let port = low + ((pick >> 33) % span) as u16;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if !chosen.contains(&port) && UdpSocket::bind(addr).is_ok() && TcpListener::bind(addr).is_ok() {
            chosen.insert(port);
            return Ok(addr);
        }
    }
    bail!("no free loopback port found between {low} and {high}")
}

/// Starts one node process from its config, detached in its own session, its
/// output in `log`. Returns its pid.
pub fn spawn_node(exe: &Path, config: &Path, log: &Path) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("node").arg("--config").arg(config);
    cmd.stdin(std::process::Stdio::null()).stdout(out.try_clone()?).stderr(out);
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("start a node process")?;
    Ok(child.id())
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

pub struct UpOptions {
    /// The `rewind` binary the nodes run.
    pub exe: PathBuf,
    pub nodes: usize,
    pub dir: PathBuf,
    pub raft: RaftTuning,
    /// The groups the dev site's `tap` certificate may write.
    pub tap_groups: Vec<String>,
    /// The nodes' collector's busy share (`gc_busy_percent`).
    pub gc_busy_percent: u64,
}

/// The groups a dev site's `tap` certificate names unless told otherwise.
pub const DEV_TAP_GROUPS: [&str; 1] = ["vm1"];

impl UpOptions {
    /// A site of `nodes` nodes in `dir`, with Raft's default timing.
    pub fn new(exe: PathBuf, nodes: usize, dir: PathBuf) -> UpOptions {
        UpOptions {
            exe,
            nodes,
            dir,
            raft: RaftTuning::default(),
            tap_groups: DEV_TAP_GROUPS.iter().map(|g| g.to_string()).collect(),
            gc_busy_percent: default_gc_busy_percent(),
        }
    }
}

/// Builds and starts a local site. Returns the path of its client config.
pub async fn up(opts: &UpOptions) -> anyhow::Result<PathBuf> {
    if !(1..=7).contains(&opts.nodes) {
        bail!("--nodes must be from 1 to 7, got {}", opts.nodes);
    }
    let dir = &opts.dir;
    if let Ok(site) = DevSite::load(dir) {
        if site.nodes.iter().any(|n| alive(n.pid)) {
            bail!("a dev site is already running in {}; stop it with `rewind dev down --dir {}`", dir.display(), dir.display());
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    if !certs.join("ca.pem").exists() {
        crate::tls::make_ca(&certs, &dir.display().to_string())?;
    }
    let mut nodes = Vec::new();
    let mut reused = 0usize;
    for id in 1..=opts.nodes as u64 {
        let name = format!("node-{id}");
        if !certs.join(format!("{name}.pem")).exists() {
            crate::tls::make_leaf(&certs, &name, &dev_leaf(Access::Node))?;
        }
        let node_dir = dir.join(&name);
        std::fs::create_dir_all(&node_dir)?;
        let path = node_dir.join("node.toml");
        // A site that was stopped keeps its configs: the addresses are in its
        // Raft membership, so a restart must listen where it did before.
        let config = if path.exists() {
            reused += 1;
            NodeConfig::load(&path).with_context(|| format!("reuse the existing site in {}", dir.display()))?
        } else {
            let config = NodeConfig {
                id,
                listen: free_port()?.into(),
                advertise: None,
                data_dir: node_dir.join("data"),
                metrics_listen: Some(free_port()?.into()),
                tls: TlsFiles { ca: certs.join("ca.pem"), cert: certs.join(format!("{name}.pem")), key: certs.join(format!("{name}.key")) },
                raft: opts.raft.clone(),
                gc_rate_mib: default_gc_rate_mib(),
                gc_busy_percent: opts.gc_busy_percent,
                gc_debt_max_mib: default_gc_debt_max_mib(),
            };
            std::fs::write(&path, toml::to_string(&config)?)?;
            config
        };
        let log = node_dir.join("node.log");
        let pid = spawn_node(&opts.exe, &path, &log)?;
        nodes.push(DevNode { id, addr: config.listen.clone(), metrics: config.metrics_listen.clone().expect("set above"), pid, exe: opts.exe.clone(), config: path, log });
    }
    let site = DevSite { nodes };
    site.save(&dir)?;
    // One certificate and client config per client role: `client` is the
    // admin's, `reader` may only read, `peer` is what another site's nodes
    // present on a DR link (`rewind dr link --peer-identity-here`), and
    // `tap` may write the groups named by --tap-groups.
    let roles = [
        ("client", Access::Admin),
        ("reader", Access::Reader),
        ("peer", Access::Peer),
        ("tap", Access::Tap { groups: opts.tap_groups.clone() }),
    ];
    let mut client_config = None;
    for (name, access) in roles {
        if !certs.join(format!("{name}.pem")).exists() {
            crate::tls::make_leaf(&certs, name, &dev_leaf(access))?;
        }
        let config = ClientConfig {
            nodes: site.nodes.iter().map(|n| NodeAddr { id: n.id, addr: n.addr.clone() }).collect(),
            tls: TlsFiles { ca: certs.join("ca.pem"), cert: certs.join(format!("{name}.pem")), key: certs.join(format!("{name}.key")) },
        };
        std::fs::write(dir.join(format!("{name}.toml")), toml::to_string(&config)?)?;
        client_config.get_or_insert(config);
    }
    let client_config = client_config.expect("the admin's config is written first");
    let client = Client::new(&client_config)?;
    wait_answering(&client, &site).await?;
    if reused == 0 {
        let members: Vec<Member> = site.nodes.iter().map(|n| Member { id: n.id, addr: n.addr.to_string() }).collect();
        match client.call_node(&site.nodes[0].addr, &Request::ClusterInit { members }).await? {
            Response::Done => {}
            other => bail!("initialise the site: {other:?}"),
        }
    } else if reused != site.nodes.len() {
        bail!("{} holds configs for {reused} of the {} nodes asked for; use the same --nodes, or a new --dir", dir.display(), site.nodes.len());
    }
    client.wait_for_leader(START_DEADLINE).await?;
    Ok(dir.join("client.toml"))
}

async fn wait_answering(client: &Client, site: &DevSite) -> anyhow::Result<()> {
    let started = Instant::now();
    for n in &site.nodes {
        loop {
            if !alive(n.pid) {
                bail!("node {} exited at start; its log {} ends with:\n{}", n.id, n.log.display(), log_tail(&n.log));
            }
            if let Ok(Response::Status(_)) = client.call_node(&n.addr, &Request::Status).await {
                break;
            }
            if started.elapsed() > START_DEADLINE {
                bail!("node {} did not answer within {START_DEADLINE:?}; see {}", n.id, n.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Restarts one node of a dev site (after a crash or a kill) and waits
/// until it answers.
pub async fn start_node(dir: &Path, id: u64) -> anyhow::Result<u32> {
    let mut site = DevSite::load(dir)?;
    let node = site.nodes.iter_mut().find(|n| n.id == id).with_context(|| format!("the dev site has no node {id}"))?;
    if alive(node.pid) {
        bail!("node {id} is already running (pid {})", node.pid);
    }
    node.pid = spawn_node(&node.exe, &node.config, &node.log)?;
    let started = node.clone();
    site.save(dir)?;
    let client = Client::new(&ClientConfig::load(&dir.join("client.toml"))?)?;
    wait_answering(&client, &DevSite { nodes: vec![started.clone()] }).await?;
    Ok(started.pid)
}

/// Stops every node: SIGTERM, then SIGKILL for any still running after the
/// stop deadline.
pub fn down(dir: &Path, purge: bool) -> anyhow::Result<usize> {
    let site = DevSite::load(dir)?;
    let running: Vec<&DevNode> = site.nodes.iter().filter(|n| alive(n.pid)).collect();
    for n in &running {
        unsafe { libc::kill(n.pid as i32, libc::SIGTERM) };
    }
    let started = Instant::now();
    while running.iter().any(|n| alive(n.pid)) && started.elapsed() < STOP_DEADLINE {
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in running.iter().filter(|n| alive(n.pid)) {
        tracing::warn!(id = n.id, pid = n.pid, "node ignored SIGTERM; killing it");
        unsafe { libc::kill(n.pid as i32, libc::SIGKILL) };
    }
    std::fs::remove_file(dir.join(SITE_FILE)).ok();
    if purge {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(running.len())
}
