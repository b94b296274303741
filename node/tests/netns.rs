//! A site of real hosts on one machine (`ops/netns-site.sh`): network
//! namespaces with their own addresses on a bridge, one `rewind node` per
//! host from an ordinary config, certificates naming each host's address.
//!
//! * the README's deployment steps form a site; a tap in a fourth host
//!   takes fio's writes over NBD-TLS; a replay served from a fifth host is
//!   read by `qemu-img compare` over NBD-TLS;
//! * a nemesis (Jepsen style) partitions, kills, pauses and throttles the
//!   nodes while a tap under fio, `rewind load` and a checked writer run;
//!   then every acknowledged write is present once and in order, the
//!   replicas hold identical logs, and a replay equals the tap's disk;
//! * a rolling restart under fio reaches the guest with no error.
//!
//! These tests need root (network namespaces, veth, tc) and fail saying so
//! without it. `REWIND_NEMESIS_SECONDS` sets the nemesis's length (default
//! 75 s; `ops/nemesis.sh --minutes N` runs a long one).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{run, spawn_serving, TapProcess, REWIND};
use rewind_node::client::Client;
use rewind_node::config::ClientConfig;
use rewind_wire::event::{Event, LoggedEvent, TimedEvent};
use rewind_wire::rpc::{Request, Response};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/netns-site.sh");

/// One netns test at a time: each runs several processes under load, and
/// two at once on a small machine would test the machine.
fn serial() -> &'static tokio::sync::Mutex<()> {
    static LOCK: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "the netns tests need root (ip netns, veth, tc); run the suite as root, as ops/test.sh and CI do");
}

struct NetnsSite {
    dir: tempfile::TempDir,
    /// Kept (not deleted) when the test fails: the nodes' logs are in it.
    keep: std::cell::Cell<bool>,
}

fn out_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

impl NetnsSite {
    fn up(nodes: usize) -> NetnsSite {
        require_root();
        let dir = tempfile::Builder::new().prefix("rewind-netns-").tempdir().unwrap();
        let site = NetnsSite { dir, keep: std::cell::Cell::new(false) };
        let n = nodes.to_string();
        let o = site.script(&["up", "--nodes", &n, "--bin", REWIND]);
        assert!(o.status.success(), "netns-site up failed:\n{}", out_text(&o));
        site
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn script(&self, args: &[&str]) -> Output {
        let (cmd, rest) = args.split_first().unwrap();
        Command::new("bash").arg(SCRIPT).arg(cmd).args(["--dir", self.path().to_str().unwrap()]).args(rest).output().expect("run netns-site.sh")
    }

    fn must(&self, args: &[&str]) -> String {
        let o = self.script(args);
        assert!(o.status.success(), "netns-site {args:?}:\n{}", out_text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn config(&self) -> PathBuf {
        self.path().join("client.toml")
    }

    fn client(&self) -> Client {
        Client::new(&ClientConfig::load(&self.config()).unwrap()).unwrap()
    }

    fn cli(&self, args: &[&str]) -> String {
        let c = self.config();
        run(Command::new(REWIND).args(args).args(["--config", c.to_str().unwrap()]))
    }

    /// A host with no node; returns its address.
    fn add_host(&self, name: &str) -> String {
        self.must(&["add-host", name])
    }

    /// A certificate from the site's CA, and a client config with it.
    fn client_config(&self, name: &str, role: &str, extra: &[&str]) -> PathBuf {
        let pki = self.path().join("pki");
        run(Command::new(REWIND).args(["certs", "--dir", pki.to_str().unwrap(), "--name", name, "--role", role]).args(extra));
        let mut c = ClientConfig::load(&self.config()).unwrap();
        c.tls.cert = pki.join(format!("{name}.pem"));
        c.tls.key = pki.join(format!("{name}.key"));
        let path = self.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
        path
    }

    /// A folder in GnuTLS's layout for qemu and libnbd, with the admin's
    /// certificate as the NBD client's.
    fn gnutls_creds(&self) -> PathBuf {
        let pki = self.path().join("pki");
        let d = self.path().join("creds");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(pki.join("ca.pem"), d.join("ca-cert.pem")).unwrap();
        std::fs::copy(pki.join("admin.pem"), d.join("client-cert.pem")).unwrap();
        std::fs::copy(pki.join("admin.key"), d.join("client-key.pem")).unwrap();
        d
    }

    /// A command inside a host's namespace.
    fn exec(&self, host: &str, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(SCRIPT).args(["exec", "--dir", self.path().to_str().unwrap(), host, "--"]).args(args);
        c
    }

    /// The id of the node that leads now, as the root namespace sees it.
    async fn leader(&self) -> u64 {
        self.client().wait_for_leader(Duration::from_secs(60)).await.expect("a leader")
    }

    /// Waits until every node reports the same last LSN and digest for
    /// each of `groups`; returns them.
    async fn settled(&self, groups: &[&str], nodes: usize) -> BTreeMap<String, (u64, String)> {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let statuses: Vec<_> = client.status_all().await.into_iter().filter_map(|(_, s)| s.ok()).collect();
            let mut out = BTreeMap::new();
            let mut all = statuses.len() == nodes;
            for g in groups {
                let seen: Vec<(u64, String)> = statuses.iter().filter_map(|s| s.shards[0].groups.iter().find(|x| x.name == *g).map(|x| (x.last_lsn, x.digest_hex.clone()))).collect();
                all &= seen.len() == nodes && seen.iter().all(|x| *x == seen[0]);
                if let Some(first) = seen.first() {
                    out.insert(g.to_string(), first.clone());
                }
            }
            if all {
                return out;
            }
            assert!(Instant::now() < deadline, "the nodes did not settle: {out:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Every event of `group` as node `id` holds it.
    async fn events_on(&self, id: u64, group: &str, last_lsn: u64) -> Vec<LoggedEvent> {
        let client = self.client();
        let addr = client.nodes().iter().find(|n| n.id == id).unwrap().addr.clone();
        let mut out: Vec<LoggedEvent> = Vec::new();
        while (out.len() as u64) < last_lsn {
            let req = Request::ReadEvents { group: group.into(), lsn_first: out.len() as u64 + 1, count_max: 4096 };
            match client.call_node(&addr, &req).await.expect("read events") {
                Response::Events(e) if !e.is_empty() => out.extend(e),
                other => panic!("read events of {group} from node {id}: {other:?}"),
            }
        }
        out
    }
}

impl Drop for NetnsSite {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
        if std::thread::panicking() || self.keep.get() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("a temp dir")).keep();
            eprintln!("netns site kept for its logs: {}", kept.display());
        }
    }
}

fn tap_in(site: &NetnsSite, host: &str, ip: &str, config: &Path, backing: &Path) -> TapProcess {
    let listen = format!("{ip}:10809");
    spawn_serving(&mut site.exec(host, &[REWIND, "tap", "--config", config.to_str().unwrap(), "--group", "vm1", "--disk", "disk0", "--backing", backing.to_str().unwrap(), "--listen", &listen]))
}

/// fio through its nbd engine (libnbd). fio's engine does not let a URI
/// name local files, and libnbd looks for certificates in /etc/pki/libnbd
/// when run as root, a machine-wide folder this test must not touch; so
/// fio runs as `nobody`, and libnbd finds them in `$HOME/.pki/libnbd`,
/// with HOME a folder of the test's own.
fn fio_cmd(uri: &str, creds: &Path, extra: &[&str]) -> Command {
    use std::os::unix::fs::{chown, PermissionsExt};
    const NOBODY: u32 = 65534;
    let home = creds.with_extension("home");
    let pki = home.join(".pki/libnbd");
    std::fs::create_dir_all(&pki).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(creds.join(f), pki.join(f)).unwrap();
        chown(pki.join(f), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    for d in [home.clone(), home.join(".pki"), pki.clone()] {
        chown(&d, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    // The folders above it (the test's temp dir) must let nobody through.
    std::fs::set_permissions(creds.parent().unwrap(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    cmd.env("HOME", &home);
    cmd.current_dir(&home);
    cmd.args(["fio", "--name=guest", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=4k", "--size=32M", "--iodepth=8", "--randseed=7", "--refill_buffers=1", "--norandommap"]);
    cmd.args(extra);
    cmd
}

/// fio's error count in its terse output (field 5 of the read section and
/// field 46 of the write section: the job's total error count is field 5).
fn fio_errors(out: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.starts_with("3;"))?;
    line.split(';').nth(4)?.parse().ok()
}

fn compare_files(a: &Path, b: &Path) {
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a.to_str().unwrap(), b.to_str().unwrap()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_a_tap_and_a_replay_over_nbd_tls() {
    let _serial = serial().lock().await;
    let site = NetnsSite::up(3);
    // The nodes listen on their own addresses, not loopback.
    let status = site.cli(&["status"]);
    for i in 1..=3 {
        assert!(status.contains(&format!("{}:7101", site.must(&["addr", &format!("n{i}")]))), "{status}");
    }
    site.cli(&["group", "create", "vm1", "--disk", "disk0:32M"]);

    // A tap on a fourth host, with a tap certificate naming its address.
    let tap_ip = site.add_host("tap");
    let tap_config = site.client_config("tap", "tap", &["--group", "vm1", "--san", &tap_ip]);
    let backing = site.path().join("disk0.raw");
    let tap = tap_in(&site, "tap", &tap_ip, &tap_config, &backing);
    assert_eq!(tap.uri, format!("nbds://{tap_ip}:10809/disk0"), "a tap off loopback must require TLS");
    let creds = site.gnutls_creds();

    // A plaintext client is refused; fio writes over TLS with no error.
    let plain = Command::new("nbdinfo").arg(tap.uri.replacen("nbds://", "nbd://", 1)).output().unwrap();
    assert!(!plain.status.success(), "a plaintext client read a TLS-only tap");
    let out = run(fio_cmd(&tap.uri, &creds, &["--io_size=8M", "--output-format=terse"]).args(["--rw=randwrite"]));
    assert_eq!(fio_errors(&out), Some(0), "fio: {out}");
    drop(tap);

    // A replay served from a fifth host over TLS equals the tap's disk, as
    // qemu-img compare reads it from the root namespace.
    let restore_ip = site.add_host("restore");
    let reader = site.client_config("restore", "reader", &["--san", &restore_ip]);
    let listen = format!("{restore_ip}:10810");
    let replay = spawn_serving(&mut site.exec("restore", &[REWIND, "replay", "vm1", "--disk", "disk0", "--latest", "--serve", &listen, "--config", reader.to_str().unwrap()]));
    assert_eq!(replay.uri, format!("nbds://{restore_ip}:10810/disk0"));
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", creds.display());
    let image = format!("driver=raw,file.driver=nbd,file.host={restore_ip},file.port=10810,file.export=disk0,file.tls-creds=tls0");
    let file = format!("driver=raw,file.driver=file,file.filename={}", backing.display());
    run(Command::new("qemu-img").args(["compare", "--object", &object, "--image-opts", &image, &file]));
}

/// A tiny deterministic generator for the nemesis's choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The checked writer's payload: writer number and sequence in the first
/// 16 bytes of a 512-byte write at a place of its own.
fn tagged(writer: u64, seq: u64) -> TimedEvent {
    let mut data = vec![0u8; 512];
    data[..8].copy_from_slice(&writer.to_le_bytes());
    data[8..16].copy_from_slice(&seq.to_le_bytes());
    TimedEvent { time_ns: rewind_node::now_ns(), event: Event::Write { disk: "d".into(), offset: (seq % 4096) * 512, data } }
}

fn untag(e: &LoggedEvent) -> (u64, u64) {
    match &e.event {
        Event::Write { data, .. } => (u64::from_le_bytes(data[..8].try_into().unwrap()), u64::from_le_bytes(data[8..16].try_into().unwrap())),
        other => panic!("LSN {}: not a checked write: {other:?}", e.lsn),
    }
}

/// Appends tagged batches of 4 until `stop`, one at a time; a batch that
/// fails (the site gave no answer in time) ends that producer and a new
/// one (a new writer number) goes on. Returns each acknowledged
/// (writer, seq) with its LSN, and the number of failed batches.
async fn checked_writer(client: Client, stop: Instant) -> (Vec<((u64, u64), u64)>, u64) {
    let mut acked = Vec::new();
    let mut failed = 0;
    let mut writer = 0u64;
    'writers: while Instant::now() < stop {
        writer += 1;
        let mut producer = rewind_node::client::producer(client.clone(), 1);
        let mut seq = 0u64;
        while Instant::now() < stop {
            let events: Vec<TimedEvent> = (0..4).map(|i| tagged(writer, seq + i)).collect();
            match producer.append("seq", events).await {
                Ok((first, last)) => {
                    assert_eq!(last - first + 1, 4, "a batch of 4 got LSNs {first}..={last}");
                    for i in 0..4 {
                        acked.push(((writer, seq + i), first + i));
                    }
                    seq += 4;
                }
                Err(e) => {
                    eprintln!("checked writer {writer}: batch at seq {seq} failed: {e}");
                    failed += 1;
                    continue 'writers;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (acked, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_partitions_kills_and_pauses_lose_no_acknowledged_write() {
    let _serial = serial().lock().await;
    let seconds: u64 = std::env::var("REWIND_NEMESIS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(75);
    let seed: u64 = std::env::var("REWIND_NEMESIS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(rewind_node::now_ns()) | 1;
    eprintln!("nemesis: {seconds} s, seed {seed} (REWIND_NEMESIS_SEED={seed} repeats its choices)");
    let site = NetnsSite::up(3);
    site.cli(&["group", "create", "vm1", "--disk", "disk0:32M"]);
    site.cli(&["group", "create", "load", "--disk", "d:1G"]);
    site.cli(&["group", "create", "seq", "--disk", "d:2M"]);
    let tap_ip = site.add_host("tap");
    let tap_config = site.client_config("tap", "tap", &["--group", "vm1", "--san", &tap_ip]);
    let backing = site.path().join("disk0.raw");
    let tap = tap_in(&site, "tap", &tap_ip, &tap_config, &backing);
    let creds = site.gnutls_creds();

    // The writers: fio through the tap, `rewind load`, the checked writer.
    let runtime = (seconds + 10).to_string();
    let fio = fio_cmd(&tap.uri, &creds, &["--time_based", &format!("--runtime={runtime}"), "--rate_iops=200", "--output-format=terse"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let c = site.config();
    // The load is bounded in bytes as well as time: no history is ever
    // dropped (retention is not built), and three replicas of an unbounded
    // load fill a disk in minutes (a 10-minute run once wrote 67 GB).
    // About 200 events a second of 10 KiB on average.
    let load_events = (seconds * 200).to_string();
    let load = Command::new(REWIND)
        .args(["load", "--group", "load", "--disk", "d", "--events", &load_events, "--sizes", "4K,16K", "--window", "4", "--seconds-max", &runtime, "--json", "--config", c.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let writer = rewind_node::spawn(checked_writer(site.client(), Instant::now() + Duration::from_secs(seconds + 5)));

    // The nemesis: one fault at a time, each healed before the next.
    let mut rng = Rng(seed);
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let nemesis_end = Instant::now() + Duration::from_secs(seconds);
    let mut netem = true;
    while Instant::now() < nemesis_end {
        let leader = site.leader().await;
        let victim = rng.below(3) + 1;
        let others: Vec<String> = (1..=3).filter(|i| *i != victim).map(|i| format!("n{i}")).collect();
        let kind = match rng.below(7) {
            0 => {
                let rest: Vec<String> = (1..=3).filter(|i| *i != leader).map(|i| format!("n{i}")).collect();
                site.must(&["partition", &format!("n{leader}"), &rest.join(",")]);
                tokio::time::sleep(Duration::from_secs(4)).await;
                site.must(&["heal"]);
                "leader isolated"
            }
            1 => {
                site.must(&["partition", &format!("n{victim}"), &others.join(",")]);
                tokio::time::sleep(Duration::from_secs(4)).await;
                site.must(&["heal"]);
                "majority/minority split"
            }
            2 => {
                let to = if leader == victim { others[0].clone() } else { format!("n{victim}") };
                site.must(&["one-way", &format!("n{leader}"), &to]);
                tokio::time::sleep(Duration::from_secs(4)).await;
                site.must(&["heal"]);
                "one-way loss (leader to one)"
            }
            3 => {
                site.must(&["kill", &format!("n{victim}")]);
                tokio::time::sleep(Duration::from_secs(2)).await;
                site.must(&["start", &format!("n{victim}")]);
                "SIGKILL and restart"
            }
            4 => {
                site.must(&["stop", &format!("n{victim}")]);
                tokio::time::sleep(Duration::from_secs(3)).await;
                site.must(&["cont", &format!("n{victim}")]);
                "SIGSTOP/SIGCONT"
            }
            5 if netem => {
                let o = site.script(&["netem", "--delay", "20ms", "--jitter", "10ms", "--loss", "2%"]);
                if o.status.code() == Some(3) {
                    eprintln!("nemesis: {}", out_text(&o).trim());
                    netem = false;
                    continue;
                }
                assert!(o.status.success(), "{}", out_text(&o));
                tokio::time::sleep(Duration::from_secs(4)).await;
                site.must(&["netem", "--clear"]);
                "netem delay and loss"
            }
            _ => {
                site.must(&["rate", "--host", &format!("n{leader}"), "10mbit"]);
                tokio::time::sleep(Duration::from_secs(3)).await;
                site.must(&["rate", "off"]);
                "leader's link throttled (10 Mbit/s)"
            }
        };
        *faults.entry(kind).or_default() += 1;
        eprintln!("nemesis: {} {kind} (leader was {leader}, victim {victim})", rewind_wire::timefmt::format_time_ns(rewind_node::now_ns()));
        // A healthy spell between faults, as long as the faults: the site
        // must make progress in it (a sync tap's writes fail after 30 s
        // without any).
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    eprintln!("nemesis: faults injected: {faults:?}");

    // The writers finish; everything is healed and running.
    let (acked, writer_failed) = writer.await.unwrap();
    let fio_out = fio.wait_with_output().unwrap();
    let fio_text = String::from_utf8_lossy(&fio_out.stdout).to_string();
    assert!(fio_out.status.success(), "fio failed: {fio_text}{}", String::from_utf8_lossy(&fio_out.stderr));
    let load_out = load.wait_with_output().unwrap();
    let load_json: serde_json::Value = serde_json::from_slice(&load_out.stdout).unwrap_or_else(|e| panic!("load's JSON ({e}): {}", String::from_utf8_lossy(&load_out.stderr)));
    drop(tap);
    let settled = site.settled(&["vm1", "load", "seq"], 3).await;
    eprintln!("nemesis: settled {settled:?}");

    // The checked writer: every acknowledged write is in the log at the
    // LSN it was acknowledged with, once; each writer's writes are in
    // order; the log holds nothing else.
    let (seq_last, _) = settled["seq"];
    let logs: Vec<Vec<LoggedEvent>> = futures::future::join_all((1..=3).map(|id| site.events_on(id, "seq", seq_last))).await;
    for (i, log) in logs.iter().enumerate().skip(1) {
        assert!(log == &logs[0], "node {} holds a different log of seq than node 1", i + 1);
    }
    let mut at: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    let mut last_seq: BTreeMap<u64, u64> = BTreeMap::new();
    for e in &logs[0] {
        let tag = untag(e);
        assert!(at.insert(tag, e.lsn).is_none(), "write {tag:?} is in the log twice");
        if let Some(prev) = last_seq.insert(tag.0, tag.1) {
            assert!(tag.1 > prev, "writer {}: seq {} after {prev}: out of order", tag.0, tag.1);
        }
    }
    for (tag, lsn) in &acked {
        assert_eq!(at.get(tag), Some(lsn), "acknowledged write {tag:?} at LSN {lsn} is not there");
    }
    // `rewind load`: what it was told is in the log, and the replicas of
    // its group agree (the digests above).
    let load_events = load_json["events"].as_u64().unwrap();
    let (load_last, _) = settled["load"];
    assert!(load_last >= load_events, "load was told {load_events} events went in, the log has {load_last}");
    if let Some(l) = load_json["lsn_last"].as_u64() {
        assert!(l <= load_last);
    }
    // The tap's disk: a replay of the latest point equals its backing file.
    let reader = site.client_config("check", "reader", &[]);
    let replayed = site.path().join("replayed.raw");
    run(Command::new(REWIND).args(["replay", "vm1", "--disk", "disk0", "--latest", "--out", replayed.to_str().unwrap(), "--config", reader.to_str().unwrap()]));
    compare_files(&replayed, &backing);
    eprintln!(
        "nemesis: checked {} acknowledged writes of {} checked writers ({} batches unanswered in time), {} load events ({} errors), fio errors {:?}; {} LSNs in seq, {} in load, {} in vm1; 0 lost",
        acked.len(),
        last_seq.len(),
        writer_failed,
        load_events,
        load_json["errors"].as_array().map(|a| a.len()).unwrap_or(0),
        fio_errors(&fio_text),
        seq_last,
        load_last,
        settled["vm1"].0
    );
    assert_eq!(fio_errors(&fio_text), Some(0), "the guest saw errors: {fio_text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_fio_reaches_the_guest_with_no_error() {
    let _serial = serial().lock().await;
    let site = NetnsSite::up(3);
    site.cli(&["group", "create", "vm1", "--disk", "disk0:32M"]);
    let tap_ip = site.add_host("tap");
    let tap_config = site.client_config("tap", "tap", &["--group", "vm1", "--san", &tap_ip]);
    let backing = site.path().join("disk0.raw");
    let tap = tap_in(&site, "tap", &tap_ip, &tap_config, &backing);
    let creds = site.gnutls_creds();
    let fio = fio_cmd(&tap.uri, &creds, &["--time_based", "--runtime=40", "--rate_iops=300", "--output-format=terse"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Each node in turn: SIGTERM (as `systemctl restart` does), start it
    // again, wait until the site has all three and agrees, then the next.
    let client = site.client();
    for i in 1..=3u64 {
        let pid: i32 = std::fs::read_to_string(site.path().join(format!("n{i}/pid"))).unwrap().trim().parse().unwrap();
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false) {
            assert!(Instant::now() < deadline, "node {i} did not stop within 30 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        site.must(&["start", &format!("n{i}")]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = client.status_all().await.into_iter().filter(|(_, s)| s.is_ok()).count();
            if up == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "node {i} did not come back");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("rolling restart: node {i} restarted");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "fio failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fio_errors(&text), Some(0), "the guest saw errors: {text}");
    drop(tap);
    let settled = site.settled(&["vm1"], 3).await;
    let reader = site.client_config("check", "reader", &[]);
    let replayed = site.path().join("replayed.raw");
    run(Command::new(REWIND).args(["replay", "vm1", "--disk", "disk0", "--latest", "--out", replayed.to_str().unwrap(), "--config", reader.to_str().unwrap()]));
    compare_files(&replayed, &backing);
    eprintln!("rolling restart: fio err=0, {} LSNs, replay equals the disk", settled["vm1"].0);
}

const TWO_SITES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/netns-two-sites.sh");

/// Two sites of three hosts each, joined by a WAN through a router
/// namespace (`ops/netns-two-sites.sh`); taken down when dropped.
struct TwoSites {
    dir: tempfile::TempDir,
}

impl TwoSites {
    fn up() -> TwoSites {
        require_root();
        let dir = tempfile::Builder::new().prefix("rewind-two-sites-").tempdir().unwrap();
        let two = TwoSites { dir };
        let o = two.script(&["up", "--bin", REWIND]);
        assert!(o.status.success(), "netns-two-sites up failed:\n{}", out_text(&o));
        two
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn script(&self, args: &[&str]) -> Output {
        let (cmd, rest) = args.split_first().unwrap();
        Command::new("bash").arg(TWO_SITES).arg(cmd).args(["--dir", self.path().to_str().unwrap()]).args(rest).output().expect("run netns-two-sites.sh")
    }

    fn must(&self, args: &[&str]) {
        let o = self.script(args);
        assert!(o.status.success(), "netns-two-sites {args:?}:\n{}", out_text(&o));
    }

    fn config(&self, site: &str) -> PathBuf {
        self.path().join(site).join("client.toml")
    }

    fn client(&self, site: &str) -> Client {
        Client::new(&ClientConfig::load(&self.config(site)).unwrap()).unwrap()
    }

    fn cli(&self, site: &str, args: &[&str]) -> String {
        let c = self.config(site);
        run(Command::new(REWIND).args(args).args(["--config", c.to_str().unwrap()]))
    }
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
        if std::thread::panicking() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("a temp dir")).keep();
            eprintln!("two sites kept for their logs: {}", kept.display());
        }
    }
}

/// Waits until site b holds exactly site a's log of `group` (same last
/// LSN, same chain digest); returns b's state.
async fn dr_caught_up(a: &Client, b: &Client, group: &str, within: Duration) -> rewind_wire::dr::DrInfo {
    let deadline = Instant::now() + within;
    loop {
        let ia = rewind_node::dr::state(a, group, None).await.expect("dr state at a");
        let ib = rewind_node::dr::state(b, group, None).await.expect("dr state at b");
        if ia.last_lsn == ib.last_lsn && ia.digest_hex == ib.digest_hex {
            return ib;
        }
        assert!(Instant::now() < deadline, "site b did not catch up within {within:?}: a at LSN {}, b at LSN {}", ia.last_lsn, ib.last_lsn);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Issue 15 on hosts of their own: two sites of three hosts, a WAN between
/// them (a rate cap; delay and loss too where the kernel has netem). Site
/// a's tap takes qemu-io's and fio's writes; the WAN is cut for 30 s (the
/// router's links down) while a takes more, and the lag a reports grows;
/// once the WAN is back, b catches up to a's exact log (same LSNs, same
/// chain), and b's replay equals the tap's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_over_a_wan_cut_for_30_s_lose_nothing() {
    let _serial = serial().lock().await;
    let two = TwoSites::up();
    let shaped = two.script(&["wan", "--rate", "200mbit", "--delay", "20ms", "--loss", "0.1%"]);
    match shaped.status.code() {
        Some(0) => eprintln!("WAN: 200 Mbit/s, 40 ms round trip, 0.1% loss each way"),
        Some(3) => {
            assert!(out_text(&shaped).contains("no netem qdisc"), "{}", out_text(&shaped));
            eprintln!("WAN: 200 Mbit/s each way; this kernel has no netem, so no delay or loss");
        }
        _ => panic!("netns-two-sites wan:\n{}", out_text(&shaped)),
    }
    let d = two.path().to_path_buf();
    two.cli("a", &["group", "create", "vm1", "--disk", "d0:64M"]);
    let p = |s: &str, f: &str| d.join(s).join(f).to_str().unwrap().to_string();
    let (b_config, b_peer, a_peer) = (p("b", "client.toml"), p("b", "peer.toml"), p("a", "peer.toml"));
    let linked = two.cli("a", &[
        "dr", "link", "vm1", "--remote-config", &b_config, "--peer-identity-there", &b_peer, "--peer-identity-here", &a_peer, "--name-here", "a", "--name-there", "b", "--rpo-alarm", "5s",
    ]);
    eprintln!("{}", linked.trim());
    let (a, b) = (two.client("a"), two.client("b"));

    // The tap runs beside the test, on loopback, and writes to site a.
    let backing = d.join("d0.raw");
    let a_config = two.config("a");
    let tap = spawn_serving(Command::new(REWIND).args([
        "tap", "--group", "vm1", "--disk", "d0", "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--config", a_config.to_str().unwrap(),
    ]));
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 0x11 0 4M", "-c", "write -P 0x22 8M 1M", "-c", "discard 1M 1M", "-c", "flush"]));
    dr_caught_up(&a, &b, "vm1", Duration::from_secs(120)).await;

    // The WAN goes down for 30 s while fio writes through the tap.
    two.must(&["cut"]);
    let cut = Instant::now();
    let mut lags = Vec::new();
    for round in 0..3u32 {
        let out = Command::new("fio")
            .args(["--name=w", "--ioengine=nbd", &format!("--uri={}", tap.uri), "--rw=randwrite", "--bsrange=4k-64k", "--size=64M", "--io_size=4M", "--iodepth=8", &format!("--randseed={}", 3 + round)])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("err= 0"), "fio:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        tokio::time::sleep(Duration::from_secs(6)).await;
        let during = rewind_node::dr::state(&a, "vm1", None).await.expect("dr state at a");
        lags.push(rewind_node::dr::lag_of(&during).expect("a saw b before the cut"));
    }
    let status = two.cli("a", &["dr", "status", "vm1"]);
    assert!(status.contains("RPO ALARM"), "a lag past the 5 s alarm should show while the WAN is down:\n{status}");
    assert!(lags.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1), "the lag did not grow while the WAN was down: {lags:?}");
    let b_during = rewind_node::dr::state(&b, "vm1", None).await.expect("dr state at b");
    if let Some(rest) = Duration::from_secs(30).checked_sub(cut.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    two.must(&["heal"]);
    let healed = Instant::now();
    let ib = dr_caught_up(&a, &b, "vm1", Duration::from_secs(180)).await;
    eprintln!(
        "lag while the WAN was down for 30 s: {lags:?} (LSNs, bytes, s); b held LSN {} then, caught up to LSN {} {:.1} s after the WAN came back",
        b_during.last_lsn,
        ib.last_lsn,
        healed.elapsed().as_secs_f64()
    );
    assert!(b_during.last_lsn < ib.last_lsn, "b took events while the WAN was down");
    drop(tap);

    // b's copy, replayed at b, is the tap's disk.
    let out = d.join("b-latest.raw");
    two.cli("b", &["replay", "vm1", "--disk", "d0", "--latest", "--out", out.to_str().unwrap()]);
    compare_files(&out, &backing);
}
