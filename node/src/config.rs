//! Node and client configuration files (TOML). Unknown keys are errors, so a
//! typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::addr::HostPort;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The site's CA certificate (PEM); peers must present a certificate it signed.
    pub ca: PathBuf,
    /// This process's certificate (PEM).
    pub cert: PathBuf,
    /// This process's private key (PEM).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftTuning {
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_election_timeout_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_timeout_max_ms")]
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log before it) after this many entries.
    #[serde(default = "default_snapshot_every_entries")]
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind the last snapshot, for lagging followers.
    #[serde(default = "default_logs_kept_after_snapshot")]
    pub logs_kept_after_snapshot: u64,
    /// Also build a snapshot once this many MiB were appended to the log
    /// since the last one: the log holds every payload until then.
    #[serde(default = "default_snapshot_every_mib")]
    pub snapshot_every_mib: u64,
}

fn default_snapshot_every_mib() -> u64 {
    256
}

fn default_heartbeat_ms() -> u64 {
    100
}
fn default_election_timeout_min_ms() -> u64 {
    500
}
fn default_election_timeout_max_ms() -> u64 {
    1000
}
fn default_snapshot_every_entries() -> u64 {
    2000
}
fn default_logs_kept_after_snapshot() -> u64 {
    128
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: default_heartbeat_ms(),
            election_timeout_min_ms: default_election_timeout_min_ms(),
            election_timeout_max_ms: default_election_timeout_max_ms(),
            snapshot_every_entries: default_snapshot_every_entries(),
            logs_kept_after_snapshot: default_logs_kept_after_snapshot(),
            snapshot_every_mib: default_snapshot_every_mib(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id, unique in the site, > 0.
    pub id: u64,
    /// Address the node's QUIC endpoint binds (Raft and clients share it):
    /// IP:PORT, [IPv6]:PORT or HOST:PORT; 0.0.0.0 or [::] bind every
    /// address of the host.
    pub listen: HostPort,
    /// Address peers and clients dial to reach this node, as written in the
    /// site's membership and the clients' configs; its host must be one of
    /// the names in the node's certificate. Default: `listen`.
    #[serde(default)]
    pub advertise: Option<HostPort>,
    /// Where the node keeps its data.
    pub data_dir: PathBuf,
    /// Address of the Prometheus metrics endpoint; none if absent.
    #[serde(default)]
    pub metrics_listen: Option<HostPort>,
    pub tls: TlsFiles,
    #[serde(default)]
    pub raft: RaftTuning,
    /// The collector frees at most this many MiB per second (payload freed
    /// plus blocks rewritten), so that ingest keeps its latency; 0: no
    /// limit.
    #[serde(default = "default_gc_rate_mib")]
    pub gc_rate_mib: u64,
    /// The collector uses at most this share of one core's time (1-100,
    /// in percent: CPU time, so a step stretched by a busy host is not
    /// charged its waits), so that ingest keeps its CPU; 100: no limit.
    #[serde(default = "default_gc_busy_percent")]
    pub gc_busy_percent: u64,
    /// Above this much debt (MiB released by the windows and not yet
    /// freed, over all groups) the collector works flat out, ignoring
    /// both limits above, so that space stays bounded; 0: never.
    #[serde(default = "default_gc_debt_max_mib")]
    pub gc_debt_max_mib: u64,
}

pub fn default_gc_rate_mib() -> u64 {
    64
}

pub fn default_gc_busy_percent() -> u64 {
    25
}

pub fn default_gc_debt_max_mib() -> u64 {
    4096
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddr {
    pub id: u64,
    pub addr: HostPort,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The site's nodes; a client tries them in turn and follows the leader.
    pub nodes: Vec<NodeAddr>,
    pub tls: TlsFiles,
}

fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), e.to_string().trim()))
}

impl NodeConfig {
    /// The address peers and clients dial.
    pub fn advertised(&self) -> &HostPort {
        self.advertise.as_ref().unwrap_or(&self.listen)
    }

    pub fn load(path: &Path) -> anyhow::Result<NodeConfig> {
        let mut c: NodeConfig = read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        resolve(base, &mut c.data_dir);
        for p in [&mut c.tls.ca, &mut c.tls.cert, &mut c.tls.key] {
            resolve(base, p);
        }
        if c.id == 0 {
            bail!("config file {}: id must be greater than 0", path.display());
        }
        if c.advertise.is_none() && c.listen.ip().is_some_and(|ip| ip.is_unspecified()) {
            bail!(
                "config file {}: listen = \"{}\" binds every address of the host; set advertise to the address peers and clients dial, e.g. advertise = \"10.0.0.1:{}\"",
                path.display(),
                c.listen,
                c.listen.port()
            );
        }
        if let Some(a) = &c.advertise {
            if a.ip().is_some_and(|ip| ip.is_unspecified()) || a.port() == 0 {
                bail!("config file {}: advertise = \"{a}\" cannot be dialled; give a host's address and a port", path.display());
            }
        }
        if !(1..=100).contains(&c.gc_busy_percent) {
            bail!("config file {}: gc_busy_percent = {} must be 1 to 100 (100: no limit)", path.display(), c.gc_busy_percent);
        }
        let r = &c.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms || r.election_timeout_max_ms <= r.election_timeout_min_ms {
            bail!("config file {}: need 0 < heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms", path.display());
        }
        Ok(c)
    }
}

impl ClientConfig {
    /// `--config`, else `$REWIND_CONFIG`, else `./.rewind/client.toml`.
    pub fn locate(explicit: Option<&Path>) -> PathBuf {
        if let Some(p) = explicit {
            return p.to_path_buf();
        }
        match std::env::var_os("REWIND_CONFIG") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(".rewind/client.toml"),
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<ClientConfig> {
        let mut c: ClientConfig = read_toml(path).with_context(|| {
            "a client needs a site: run `rewind dev up` or pass --config / set REWIND_CONFIG".to_string()
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.tls.ca, &mut c.tls.cert, &mut c.tls.key] {
            resolve(base, p);
        }
        if c.nodes.is_empty() {
            bail!("config file {}: lists no nodes", path.display());
        }
        let mut ids = std::collections::BTreeSet::new();
        for n in &c.nodes {
            if !ids.insert(n.id) {
                bail!("config file {}: node {} is listed twice", path.display(), n.id);
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected_err: Option<&str>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        match (NodeConfig::load(&path), expected_err) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => {
                let text = format!("{e:#}");
                assert!(text.contains(want), "error {text:?} should mention {want:?}");
            }
            (r, want) => panic!("got {:?}, wanted error {want:?}", r.map(|_| ())),
        }
    }

    const GOOD: &str = r#"
id = 1
listen = "127.0.0.1:7101"
data_dir = "data"
[tls]
ca = "ca.pem"
cert = "n.pem"
key = "n.key"
"#;

    #[test]
    fn configs() {
        check(GOOD, None);
        check(&GOOD.replace("data_dir", "data_dri"), Some("unknown field `data_dri`"));
        check(&GOOD.replace("id = 1", "id = 0"), Some("id must be greater than 0"));
        check(&GOOD.replace("127.0.0.1", "10.0.0.1"), None);
        check(&GOOD.replace("127.0.0.1", "node1.example.net"), None);
        check(&GOOD.replace("127.0.0.1:7101", "[fd00::1]:7101"), None);
        check(&GOOD.replace("127.0.0.1", "0.0.0.0"), Some("set advertise"));
        check(&GOOD.replace("listen = \"127.0.0.1:7101\"", "listen = \"0.0.0.0:7101\"\nadvertise = \"node1:7101\""), None);
        check(&GOOD.replace("127.0.0.1", "node_1"), Some("not a host name"));
        check(&format!("{GOOD}\n[raft]\nheartbeat_ms = 900\n"), Some("heartbeat_ms"));
        check(&format!("{GOOD}\n[raft]\nheartbeat = 50\n"), Some("unknown field `heartbeat`"));
        check("id = \"one\"", Some("invalid type"));
        let top = |line: &str| GOOD.replace("[tls]", &format!("{line}\n[tls]"));
        check(&top("gc_busy_percent = 100"), None);
        check(&top("gc_busy_percent = 0"), Some("gc_busy_percent = 0 must be 1 to 100"));
        check(&top("gc_busy_percent = 150"), Some("must be 1 to 100"));
        check(&top("gc_debt_max_mib = 0"), None);
    }
}
