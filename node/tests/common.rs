//! Helpers for tests that run a real local site: `rewind dev up` in a
//! temporary folder, stopped (and its processes killed) when dropped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rewind_node::client::Client;
use rewind_node::config::ClientConfig;
use rewind_wire::event::{Event, LoggedEvent};
use rewind_wire::rpc::DiskSpec;
use rewind_wire::rpc::{NodeStatus, Request, Response};

pub const REWIND: &str = env!("CARGO_BIN_EXE_rewind");

pub struct Site {
    pub dir: tempfile::TempDir,
    pub client: Client,
}

pub fn rewind(args: &[&str]) -> std::process::Output {
    Command::new(REWIND).args(args).output().expect("run rewind")
}

impl Site {
    pub fn up(extra: &[&str]) -> Site {
        let dir = tempfile::Builder::new().prefix("rewind-test-").tempdir().expect("temp dir");
        let d = dir.path().to_str().unwrap().to_string();
        let mut args = vec!["dev", "up", "--dir", &d];
        args.extend_from_slice(extra);
        let out = rewind(&args);
        assert!(out.status.success(), "dev up failed: {}", String::from_utf8_lossy(&out.stderr));
        let config = ClientConfig::load(&dir.path().join("client.toml")).expect("client config");
        let client = Client::new(&config).expect("client");
        Site { dir, client }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("client.toml")
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut full: Vec<&str> = args.to_vec();
        let c = self.config();
        full.push("--config");
        full.push(c.to_str().unwrap());
        rewind(&full)
    }

    pub fn site(&self) -> rewind_node::dev::DevSite {
        rewind_node::dev::DevSite::load(self.path()).expect("site.json")
    }

    pub async fn statuses(&self) -> Vec<Option<NodeStatus>> {
        self.client.status_all().await.into_iter().map(|(_, s)| s.ok()).collect()
    }

    pub async fn leader(&self) -> NodeStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for s in self.statuses().await.into_iter().flatten() {
                if s.shards[0].role == rewind_wire::rpc::Role::Leader {
                    return s;
                }
            }
            assert!(Instant::now() < deadline, "no leader within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every node that is up has applied `group` to `last_lsn`;
    /// returns each node's (id, digest).
    pub async fn converged(&self, group: &str, last_lsn: u64, nodes: usize) -> Vec<(u64, String)> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut digests = Vec::new();
            for s in self.statuses().await.into_iter().flatten() {
                if let Some(g) = s.shards[0].groups.iter().find(|g| g.name == group) {
                    if g.last_lsn == last_lsn {
                        digests.push((s.id, g.digest_hex.clone()));
                    }
                }
            }
            if digests.len() == nodes {
                return digests;
            }
            assert!(Instant::now() < deadline, "nodes did not converge on {group} LSN {last_lsn}: {digests:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `nodes` nodes report the same last LSN and digest for
    /// `group`, and returns them.
    pub async fn settled(&self, group: &str, nodes: usize) -> (u64, String) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let seen: Vec<(u64, String)> = self
                .statuses()
                .await
                .into_iter()
                .flatten()
                .filter_map(|s| s.shards[0].groups.iter().find(|g| g.name == group).map(|g| (g.last_lsn, g.digest_hex.clone())))
                .collect();
            if seen.len() == nodes && seen.iter().all(|x| *x == seen[0]) {
                return seen[0].clone();
            }
            assert!(Instant::now() < deadline, "nodes did not settle on one state of {group}: {seen:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every event of `group` as node `addr` holds it.
    pub async fn read_all(&self, addr: &rewind_node::addr::HostPort, group: &str, last_lsn: u64) -> Vec<LoggedEvent> {
        let mut out = Vec::new();
        while (out.len() as u64) < last_lsn {
            let req = Request::ReadEvents { group: group.into(), lsn_first: out.len() as u64 + 1, count_max: 4096 };
            match self.client.call_node(addr, &req).await.expect("read events") {
                Response::Events(e) if !e.is_empty() => out.extend(e),
                other => panic!("read events from {addr}: {other:?}"),
            }
        }
        out
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = rewind_node::dev::down(self.dir.path(), false);
    }
}

pub fn kill9(pid: u32) {
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while rewind_node::dev::alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Peak resident memory of a process, from /proc.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A process serving NBD (`rewind tap`, `rewind replay --serve`), stopped
/// with SIGTERM when dropped.
pub struct TapProcess {
    pub child: std::process::Child,
    pub uri: String,
}

impl Drop for TapProcess {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Starts a command that prints an `nbd://` URI on its first line of
/// output once it listens; returns when it does.
pub fn spawn_serving(cmd: &mut Command) -> TapProcess {
    use std::io::BufRead;
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::inherit()).spawn().expect("start the server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("the server's first line");
    let uri = line.split_whitespace().find(|w| w.starts_with("nbd://") || w.starts_with("nbds://")).unwrap_or_else(|| panic!("no URI in {line:?}")).to_string();
    eprintln!("{}", line.trim());
    TapProcess { child, uri }
}

/// Starts a tap on loopback for `disk` of `group`; returns once it listens.
pub fn start_tap_with(site: &Site, group: &str, disk: &str, backing: &Path, extra: &[&str]) -> TapProcess {
    let config = site.config();
    spawn_serving(
        Command::new(REWIND)
            .args(["tap", "--group", group, "--disk", disk, "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--config", config.to_str().unwrap()])
            .args(extra),
    )
}

/// Runs a command that must succeed; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img compare` of two raw images; panics if they differ.
pub fn compare(a: &Path, b: &Path) {
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a.to_str().unwrap(), b.to_str().unwrap()]));
}

/// The disk the tap tests serve.
pub const DISK_BYTES: u64 = 64 << 20;

pub fn start_tap(site: &Site, group: &str, disk: &str, backing: &Path) -> TapProcess {
    start_tap_with(site, group, disk, backing, &[])
}

/// A site with group "g" holding disk "d0", and a folder for its backing file.
pub async fn site_with_disk() -> (Site, tempfile::TempDir, PathBuf) {
    let site = Site::up(&[]);
    let dir = tempfile::tempdir().unwrap();
    site.client.create_group("g", vec![DiskSpec { name: "d0".into(), size_bytes: DISK_BYTES, sector_bytes: 512 }]).await.unwrap();
    let backing = dir.path().join("d0.raw");
    (site, dir, backing)
}

pub fn zeroed(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK_BYTES).unwrap();
}

/// Applies logged events for `disk` to a zeroed image: what replay will do.
pub fn replay_onto(events: &[LoggedEvent], disk: &str, path: &Path) {
    use std::os::unix::fs::FileExt;
    zeroed(path);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for e in events {
        match &e.event {
            Event::Write { disk: d, offset, data } if d == disk => f.write_all_at(data, *offset).unwrap(),
            Event::WriteZeroes { disk: d, offset, len } | Event::Trim { disk: d, offset, len } if d == disk => {
                f.write_all_at(&vec![0u8; *len as usize], *offset).unwrap()
            }
            _ => {}
        }
    }
}

/// Every event of `group`, checked to be the same on every node.
pub async fn log_of(site: &Site, group: &str) -> Vec<LoggedEvent> {
    let (last_lsn, _) = site.settled(group, 3).await;
    let mut all = Vec::new();
    for n in site.site().nodes {
        let events = site.read_all(&n.addr, group, last_lsn).await;
        assert_eq!(events.len() as u64, last_lsn);
        if !all.is_empty() {
            assert!(events == all, "node {} holds a different log", n.id);
        }
        all = events;
    }
    all
}

/// The Prometheus text a node's metrics endpoint serves.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    body
}

/// The sum of a counter over every series and every node of a site (0
/// where a node has none yet).
pub fn site_counter(site: &Site, name: &str) -> f64 {
    site.site()
        .nodes
        .iter()
        .map(|n| {
            scrape(&n.metrics.to_string())
                .lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
                .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
                .sum::<f64>()
        })
        .sum()
}

/// The `rewind_*` names in the dashboard's queries for one scrape job.
pub fn dashboard_metrics(job: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/grafana-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut names = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            if !expr.contains(&format!("job=\"{job}\"")) {
                continue;
            }
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("rewind_") && !names.contains(&word.to_string()) {
                    names.push(word.to_string());
                }
            }
        }
    }
    names
}
