//! `rewind dr` (link, status, switchover) and `rewind failover`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rewind_node::config::ClientConfig;
use rewind_node::dr;
use rewind_wire::dr::DrInfo;
use rewind_wire::rpc::{Request, Response, Target};
use rewind_wire::timefmt::format_time_ns;
use serde::Serialize;

use super::ClientArgs;

#[derive(Subcommand)]
pub enum DrCommand {
    /// Pair a group with a second site: the group is created there with
    /// the same disks, and that site's leader pulls every committed event
    /// in LSN order and commits it under the same LSNs, times and digests.
    /// Run at the primary site.
    ///
    /// Example:
    ///   rewind dr link vm1 --remote-config /etc/rewind/site-b/client.toml \
    ///       --peer-identity-there /etc/rewind/site-b/peer.toml \
    ///       --peer-identity-here /etc/rewind/site-a/peer.toml --rpo-alarm 30s
    #[command(verbatim_doc_comment)]
    Link(LinkArgs),
    /// Per group: the primary site, the epoch, the last LSN at each site,
    /// the lag (LSNs, bytes, seconds of history: the cross-site RPO) and
    /// whether the hash chains agree. Works at either site.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// One group (default: every linked group this site holds).
        group: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Planned handover, for maintenance: this site (the primary) stops
    /// taking the group's writes at once, the other site drains what it
    /// lacks and then takes over. No data is lost. Run at the primary.
    Switchover {
        #[command(flatten)]
        client: ClientArgs,
        group: String,
        /// Seconds to wait for the other site to take over.
        #[arg(long, default_value_t = 300)]
        wait: u64,
    },
}

#[derive(Args)]
pub struct LinkArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The consistency group (it must exist here; it is created there).
    group: String,
    /// A client config of the other site with an admin certificate, used
    /// by this command only. The other site's CA is trusted for this link
    /// only, never for the site.
    #[arg(long)]
    remote_config: PathBuf,
    /// The client config whose identity this site's nodes present to the
    /// other site (best: a `--role peer` certificate of the other site's
    /// CA). Default: --remote-config's admin identity.
    #[arg(long)]
    peer_identity_there: Option<PathBuf>,
    /// The client config whose identity the other site's nodes present
    /// here (a `--role peer` certificate of this site's CA). Default: this
    /// command's own config.
    #[arg(long)]
    peer_identity_here: Option<PathBuf>,
    /// This site's name (default: site- and 8 hex digits of its CA).
    #[arg(long)]
    name_here: Option<String>,
    /// The other site's name (default: site- and 8 hex digits of its CA).
    #[arg(long)]
    name_there: Option<String>,
    /// Alarm when the other site lags by more than this much history, e.g.
    /// 30s, 5m, 1h (default: no alarm).
    #[arg(long)]
    rpo_alarm: Option<String>,
    /// Payload bytes per second the other site pulls at most, e.g. 50M
    /// (default: as fast as the link goes). Leaves room on a shared WAN;
    /// the RPO grows when writes outpace it.
    #[arg(long)]
    max_rate: Option<String>,
}

/// Parses 500ms, 30s, 5m, 1h, 7d.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num.parse().with_context(|| format!("duration {s:?}: expected a number and a unit, e.g. 30s or 5m"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("duration {s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"),
    };
    n.checked_mul(ms).map(Duration::from_millis).with_context(|| format!("duration {s:?} is too long"))
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("output").args(["out", "serve"])))]
pub struct FailoverArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The consistency group.
    #[arg(required_unless_present = "plan", conflicts_with = "plan")]
    group: Option<String>,
    /// A failover plan: a TOML file listing groups in boot order, each with
    /// its point ([[group]] name = "db", at-time = "...", or at, at-bookmark, at-backup,
    /// latest = true). Each is failed over in turn (epoch and revert events,
    /// as for one group; no disk is served: start the taps or replays
    /// after), and a table of results is printed. Stops at the first group
    /// that fails unless --keep-going.
    #[arg(long, conflicts_with_all = ["out", "serve", "test", "disk", "at", "at_time", "at_bookmark", "at_backup", "latest"])]
    plan: Option<PathBuf>,
    /// With --plan: go on with the next groups after one fails.
    #[arg(long, requires = "plan")]
    keep_going: bool,
    /// With --plan: the results as JSON.
    #[arg(long, requires = "plan")]
    json: bool,
    /// The point to bring the disks up as of.
    #[command(flatten)]
    target: super::TargetArgs,
    /// Fail over although the primary site still answers. Only when that
    /// site is cut off from its users; it is fenced (refuses the group's
    /// writes) as soon as it hears of the new epoch.
    #[arg(long)]
    force: bool,
    /// A test failover: serve the disk at the target on a writable,
    /// copy-on-write branch outside the log, while replication goes on.
    /// Nothing enters the group's history; `--test --stop` (or Ctrl-C)
    /// ends it and throws the branch away.
    #[arg(long, conflicts_with_all = ["force", "backing"])]
    test: bool,
    /// With --test: stop the group's running test failover (started with
    /// the same --config) and throw its branch away.
    #[arg(long, requires = "test", conflicts_with_all = ["serve", "out", "at", "at_time", "at_bookmark", "at_backup", "latest"])]
    stop: bool,
    /// The disk to bring up (default: the group's only disk).
    #[arg(long)]
    disk: Option<String>,
    /// Write the disk to this raw image file (new; mode 0600).
    #[arg(long, group = "output")]
    out: Option<PathBuf>,
    /// Serve the disk over NBD on this address (read-only, unless
    /// --writable). Runs until SIGINT or SIGTERM.
    #[arg(long, group = "output")]
    serve: Option<rewind_node::addr::HostPort>,
    /// With --serve: a tap: writes are journalled into the group at this
    /// site, which is now the primary (needs --backing).
    #[arg(long, requires = "serve")]
    writable: bool,
    /// With --writable: the tap's backing file, written new with the disk
    /// as of the target.
    #[arg(long, requires = "writable")]
    backing: Option<PathBuf>,
    /// With --serve: require NBD-TLS on loopback too.
    #[arg(long, requires = "serve")]
    tls: bool,
}

pub async fn run(c: DrCommand) -> anyhow::Result<()> {
    match c {
        DrCommand::Link(a) => link(a).await,
        DrCommand::Status { client, group, json } => status(client, group, json).await,
        DrCommand::Switchover { client, group, wait } => {
            let c = client.client()?;
            let started = std::time::Instant::now();
            let info = dr::switchover(&c, &group, Duration::from_secs(wait)).await?;
            println!(
                "switchover of {group}: site {} is the primary in epoch {} with LSN 1..={}; this site ({}) follows it ({:.1} s)",
                info.remote.as_deref().unwrap_or("?"),
                info.epoch,
                info.last_lsn,
                info.local.as_deref().unwrap_or("?"),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

async fn link(a: LinkArgs) -> anyhow::Result<()> {
    let local_path = ClientConfig::locate(a.client.config.as_deref());
    let local_config = ClientConfig::load(&local_path)?;
    let remote_config = ClientConfig::load(&a.remote_config).context("--remote-config")?;
    let id_there = match &a.peer_identity_there {
        Some(p) => ClientConfig::load(p).context("--peer-identity-there")?,
        None => {
            eprintln!("dr link: this site will reach the other with --remote-config's admin identity; a `--role peer` certificate (--peer-identity-there) can do no more than pull");
            remote_config.clone()
        }
    };
    let id_here = match &a.peer_identity_here {
        Some(p) => ClientConfig::load(p).context("--peer-identity-here")?,
        None => {
            eprintln!("dr link: the other site will reach this one with this command's identity; a `--role peer` certificate (--peer-identity-here) can do no more than pull");
            local_config.clone()
        }
    };
    let to_there = dr::link_from(&id_there)?;
    let to_here = dr::link_from(&id_here)?;
    let here = match a.name_here {
        Some(n) => n,
        None => dr::default_site_name(&std::fs::read_to_string(&local_config.tls.ca)?),
    };
    let there = match a.name_there {
        Some(n) => n,
        None => dr::default_site_name(&to_there.ca_pem),
    };
    let rpo_alarm_ms = a.rpo_alarm.as_deref().map(parse_duration).transpose().context("--rpo-alarm")?.map_or(0, |d| d.as_millis() as u64);
    let max_rate_bytes = a.max_rate.as_deref().map(super::parse_size).transpose().context("--max-rate")?.unwrap_or(0);
    let plan = dr::LinkPlan { group: a.group.clone(), here: here.clone(), there: there.clone(), to_there, to_here, rpo_alarm_ms, max_rate_bytes };
    let local = rewind_node::client::Client::new(&local_config)?;
    let remote = rewind_node::client::Client::new(&remote_config)?;
    dr::link(&local, &remote, &plan).await?;
    println!("linked group {}: site {here} (here) is the primary in epoch 1; site {there} pulls its log from LSN 1 (see `rewind dr status {}`)", a.group, a.group);
    Ok(())
}

#[derive(Serialize)]
struct StatusJson {
    group: String,
    site: Option<String>,
    peer_site: Option<String>,
    primary: Option<String>,
    epoch: u64,
    last_lsn: u64,
    last_time: String,
    digest: String,
    peer_last_lsn: Option<u64>,
    peer_epoch: Option<u64>,
    peer_seen_ms_ago: Option<u64>,
    lag_lsn: Option<u64>,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
    rpo_alarm_seconds: Option<f64>,
    alarm: bool,
    chains_agree: Option<bool>,
    problem: Option<String>,
}

fn status_json(i: &DrInfo) -> StatusJson {
    let lag = dr::lag_of(i);
    let alarm_s = (i.rpo_alarm_ms > 0).then(|| i.rpo_alarm_ms as f64 / 1000.0);
    let peer = i.peer.as_ref();
    let seen = peer.map(|p| p.seen_ms_ago).filter(|s| *s != u64::MAX);
    StatusJson {
        group: i.group.clone(),
        site: i.local.clone(),
        peer_site: i.remote.clone(),
        primary: i.primary.clone(),
        epoch: i.epoch,
        last_lsn: i.last_lsn,
        last_time: format_time_ns(i.last_time_ns),
        digest: i.digest_hex.clone(),
        peer_last_lsn: peer.filter(|_| seen.is_some()).map(|p| p.last_lsn),
        peer_epoch: peer.filter(|_| seen.is_some()).map(|p| p.epoch),
        peer_seen_ms_ago: seen,
        lag_lsn: lag.map(|l| l.0),
        lag_bytes: lag.map(|l| l.1),
        lag_seconds: lag.map(|l| l.2),
        rpo_alarm_seconds: alarm_s,
        alarm: matches!((lag, alarm_s), (Some(l), Some(a)) if l.2 > a),
        chains_agree: peer.and_then(|p| p.chains_agree),
        problem: peer.and_then(|p| p.problem.clone()),
    }
}

async fn status(args: ClientArgs, group: Option<String>, json: bool) -> anyhow::Result<()> {
    let client = args.client()?;
    let groups = match group {
        Some(g) => vec![g],
        None => {
            let s = match client.call_leader(&Request::Status).await? {
                Response::Status(s) => s,
                other => bail!("unexpected reply {other:?}"),
            };
            s.shards.iter().flat_map(|sh| sh.groups.iter().map(|g| g.name.clone())).collect()
        }
    };
    let mut rows = Vec::new();
    for g in &groups {
        let info = dr::state(&client, g, None).await?;
        if info.local.is_some() || groups.len() == 1 {
            rows.push(status_json(&info));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no group of this site is linked to another site (see `rewind dr link`)");
        return Ok(());
    }
    println!(
        "{:<16} {:<16} {:<16} {:>5} {:>10} {:>10} {:>8} {:>12} {:>9} {:>9}  CHAINS",
        "GROUP", "THIS SITE", "PRIMARY", "EPOCH", "LAST LSN", "PEER LSN", "LAG LSN", "LAG BYTES", "LAG S", "PEER SEEN"
    );
    for r in &rows {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "{:<16} {:<16} {:<16} {:>5} {:>10} {:>10} {:>8} {:>12} {:>9} {:>9}  {}{}",
            r.group,
            opt(r.site.clone()),
            opt(r.primary.clone()),
            r.epoch,
            r.last_lsn,
            opt(r.peer_last_lsn.map(|v| v.to_string())),
            opt(r.lag_lsn.map(|v| v.to_string())),
            opt(r.lag_bytes.map(|v| v.to_string())),
            opt(r.lag_seconds.map(|v| format!("{v:.3}"))),
            opt(r.peer_seen_ms_ago.map(|v| format!("{:.1}s", v as f64 / 1000.0))),
            match r.chains_agree {
                Some(true) => "agree",
                Some(false) => "DIFFER",
                None => "-",
            },
            if r.alarm { "  RPO ALARM" } else { "" },
        );
        if let Some(p) = &r.problem {
            println!("  problem: {p}");
        }
    }
    Ok(())
}

pub async fn failover(a: FailoverArgs) -> anyhow::Result<()> {
    if let Some(plan) = &a.plan {
        return run_plan(&a.client.client()?, plan, a.force, a.keep_going, a.json).await;
    }
    let Some(group) = a.group.clone() else { super::usage_error("name the group, or give --plan FILE") };
    let group = group.as_str();
    if a.stop {
        return stop_test(&a.client, group);
    }
    if a.test && a.serve.is_none() {
        super::usage_error("--test serves the branch: give --serve ADDR");
    }
    if a.out.is_none() && a.serve.is_none() {
        super::usage_error("say where the disk goes: --out FILE or --serve ADDR");
    }
    let target = a.target.target()?;
    let client = a.client.client()?;
    let started = std::time::Instant::now();
    let points = match client.call_leader(&Request::Points { group: group.to_string(), on_leader: true }).await? {
        Response::Points(p) => p,
        other => bail!("unexpected reply {other:?}"),
    };
    let disk = match (&a.disk, points.disks.as_slice()) {
        (Some(d), _) => d.clone(),
        (None, [only]) => only.name.clone(),
        (None, disks) => bail!("group {} has {} disks ({}): name one with --disk", group, disks.len(), disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")),
    };
    if a.writable && a.backing.is_none() {
        super::usage_error("--writable needs --backing FILE: the tap's backing file, written new with the disk as of the target");
    }
    let (lsn, what) = if a.test {
        (None, "test failover (a copy-on-write branch outside the log; replication goes on)".to_string())
    } else {
        let f = dr::failover(&client, group, &target, a.force).await?;
        let what = format!(
            "failover: this site is the primary of {} in epoch {}; disks as of LSN {} ({}){}",
            group,
            f.epoch,
            f.target_lsn,
            format_time_ns(f.target_time_ns),
            if f.reverts > 0 { format!(", reverted by {} events; the new branch starts after LSN {}", f.reverts + 1, f.head_lsn) } else { String::new() }
        );
        (Some(f.head_lsn), what)
    };
    eprintln!("{what}");
    let opts = rewind_node::replay::ReplayOptions {
        group: group.to_string(),
        disk: disk.clone(),
        target: lsn.map_or(target, Target::Lsn),
        out: a.out.clone().or(a.backing.clone()).unwrap_or_default(),
        existing: rewind_replay::Existing::Refuse,
        node: None,
        wait: Duration::from_secs(60),
    };
    // A test failover leaves a pid file, so that `--test --stop` finds it.
    let _running = if a.test { Some(TestFile::create(&a.client, group)?) } else { None };
    if let (Some(listen), false) = (a.serve.clone(), a.writable) {
        let tls = super::tap::nbd_tls_policy(a.tls, false);
        let serve = rewind_node::replay::ServeOptions { listen, tls, writable: a.test, overlay: None, keep_overlay: false, connections_max: rewind_nbd::listen::CONNECTIONS_MAX_DEFAULT };
        return rewind_node::replay::serve(
            &client,
            &opts,
            &serve,
            |s| {
                use std::io::Write;
                println!(
                    "failover: serving disk {disk} of group {} at LSN {} at {} ({}), first read possible {:.0} ms after the command started",
                    group,
                    s.lsn,
                    s.uri,
                    if a.test { "writable test branch" } else { "read-only" },
                    started.elapsed().as_secs_f64() * 1000.0
                );
                let _ = std::io::stdout().flush();
            },
            |msg| eprintln!("failover: {msg}"),
        )
        .await;
    }
    let r = rewind_node::replay::run(&client, &opts, |_, _| {}, |msg| eprintln!("failover: {msg}")).await?;
    if let (Some(listen), Some(backing)) = (a.serve.clone(), a.backing.clone()) {
        let tap = rewind_node::tap::TapOptions {
            group: group.to_string(),
            disk: disk.clone(),
            backing: backing.clone(),
            listen: rewind_node::tap::Listen::Tcp(listen, super::tap::nbd_tls_policy(a.tls, false)),
            window: 64,
            mode: rewind_node::tap::TapMode::Sync { identity: { let mut p = backing.as_os_str().to_owned(); p.push(".tap-id"); PathBuf::from(p) } },
            metrics_listen: None,
            connections_max: rewind_nbd::listen::CONNECTIONS_MAX_DEFAULT,
        };
        return rewind_node::tap::run(client, tap, |uri| {
            use std::io::Write;
            println!(
                "failover: tap serving disk {disk} of group {} at {uri} (writable, from LSN {}), ready {:.0} ms after the command started",
                group,
                r.lsn,
                started.elapsed().as_secs_f64() * 1000.0
            );
            let _ = std::io::stdout().flush();
        })
        .await;
    }
    println!("failover: wrote disk {disk} of group {} as of LSN {} to {} ({} bytes, blake3 {})", group, r.lsn, opts.out.display(), r.image_bytes, r.blake3_hex);
    Ok(())
}

#[derive(Args)]
pub struct FailbackArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The consistency group.
    group: String,
    /// Seconds to wait for this site to catch up with the primary.
    #[arg(long, default_value_t = 600)]
    wait: u64,
}

pub async fn failback(a: FailbackArgs) -> anyhow::Result<()> {
    let client = a.client.client()?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = std::time::Instant::now();
    let f = dr::failback(&client, &a.group, Duration::from_secs(a.wait), |done, total| {
        if tty {
            eprint!("\rkeeping this site's own events in a branch: {done}/{total}   ");
        }
    })
    .await?;
    if tty {
        eprintln!();
    }
    match &f.branch {
        Some(b) => println!(
            "failback of {}: this site shares LSN 1..={} with the primary; its own {} events after that are kept, read-only, in group {b} (replay it like any group); it follows the primary again at LSN {}, having received {} bytes since the fork ({:.1} s)",
            a.group, f.fork_lsn, f.kept_events, f.head_lsn, f.received_bytes, started.elapsed().as_secs_f64()
        ),
        None => println!(
            "failback of {}: this site held nothing the primary lacks (shared LSN 1..={}); it follows the primary at LSN {}, having received {} bytes ({:.1} s)",
            a.group, f.fork_lsn, f.head_lsn, f.received_bytes, started.elapsed().as_secs_f64()
        ),
    }
    println!("give the primary role back with `rewind dr switchover {}` at the other site", a.group);
    Ok(())
}

/// One group of a failover plan.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PlanGroup {
    name: String,
    at: Option<u64>,
    at_time: Option<String>,
    at_bookmark: Option<String>,
    at_backup: Option<String>,
    #[serde(default)]
    latest: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    group: Vec<PlanGroup>,
}

/// A plan's result for one group.
#[derive(Serialize)]
struct PlanRow {
    group: String,
    ok: bool,
    epoch: Option<u64>,
    target_lsn: Option<u64>,
    target_time: Option<String>,
    head_lsn: Option<u64>,
    seconds: f64,
    error: Option<String>,
}

fn plan_target(g: &PlanGroup) -> anyhow::Result<Target> {
    let given = [g.at.is_some(), g.at_time.is_some(), g.at_bookmark.is_some(), g.at_backup.is_some(), g.latest].iter().filter(|x| **x).count();
    if given != 1 {
        bail!("group {:?} in the plan: give exactly one of at, at-time, at-bookmark, at-backup or latest = true ({given} given)", g.name);
    }
    super::TargetArgs { at: g.at, at_time: g.at_time.clone(), at_bookmark: g.at_bookmark.clone(), at_backup: g.at_backup.clone(), latest: g.latest }.target()
}

async fn run_plan(client: &rewind_node::client::Client, path: &std::path::Path, force: bool, keep_going: bool, json: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read the plan {}", path.display()))?;
    let plan: Plan = toml::from_str(&text).map_err(|e| anyhow::anyhow!("plan {}: {}", path.display(), e.to_string().trim()))?;
    if plan.group.is_empty() {
        bail!("plan {} lists no group ([[group]] name = ...)", path.display());
    }
    // Every entry is checked before anything is failed over.
    let targets = plan.group.iter().map(plan_target).collect::<anyhow::Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for (g, target) in plan.group.iter().zip(targets) {
        let started = std::time::Instant::now();
        let r = dr::failover(client, &g.name, &target, force).await;
        let row = match r {
            Ok(f) => PlanRow {
                group: g.name.clone(),
                ok: true,
                epoch: Some(f.epoch),
                target_lsn: Some(f.target_lsn),
                target_time: Some(format_time_ns(f.target_time_ns)),
                head_lsn: Some(f.head_lsn),
                seconds: started.elapsed().as_secs_f64(),
                error: None,
            },
            Err(e) => PlanRow { group: g.name.clone(), ok: false, epoch: None, target_lsn: None, target_time: None, head_lsn: None, seconds: started.elapsed().as_secs_f64(), error: Some(format!("{e:#}")) },
        };
        let failed = !row.ok;
        rows.push(row);
        if failed && !keep_going {
            break;
        }
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    let skipped = plan.group.len() - rows.len();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<20} {:<7} {:>6} {:>10} {:<32} {:>10} {:>8}", "GROUP", "RESULT", "EPOCH", "AT LSN", "AT TIME", "HEAD LSN", "SECONDS");
        for r in &rows {
            let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
            println!(
                "{:<20} {:<7} {:>6} {:>10} {:<32} {:>10} {:>8.2}",
                r.group,
                if r.ok { "ok" } else { "FAILED" },
                opt(r.epoch),
                opt(r.target_lsn),
                r.target_time.clone().unwrap_or_else(|| "-".into()),
                opt(r.head_lsn),
                r.seconds
            );
            if let Some(e) = &r.error {
                println!("  {e}");
            }
        }
        for g in &plan.group[rows.len()..] {
            println!("{:<20} skipped (an earlier group failed; --keep-going goes on)", g.name);
        }
    }
    if failed > 0 {
        bail!("{failed} of {} groups failed over with an error{}", plan.group.len(), if skipped > 0 { format!(", {skipped} skipped") } else { String::new() });
    }
    Ok(())
}

/// Where a running test failover of a group says it runs: beside the
/// client config, `failover-tests/GROUP.pid`.
fn test_file(client: &ClientArgs, group: &str) -> PathBuf {
    let config = ClientConfig::locate(client.config.as_deref());
    config.parent().unwrap_or(std::path::Path::new(".")).join("failover-tests").join(format!("{group}.pid"))
}

/// A running test failover's pid file, removed when it ends.
struct TestFile(PathBuf);

impl TestFile {
    fn create(client: &ClientArgs, group: &str) -> anyhow::Result<TestFile> {
        let path = test_file(client, group);
        std::fs::create_dir_all(path.parent().expect("a folder"))?;
        if let Ok(text) = std::fs::read_to_string(&path) {
            if text.trim().parse::<u32>().is_ok_and(rewind_node::dev::alive) {
                bail!("a test failover of group {group} runs already (pid {}, {}); stop it with `rewind failover {group} --test --stop`", text.trim(), path.display());
            }
        }
        std::fs::write(&path, format!("{}\n", std::process::id())).with_context(|| format!("write {}", path.display()))?;
        Ok(TestFile(path))
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `--test --stop`: SIGTERM to the group's test failover, then waits (up
/// to 20 s) until it has ended and thrown its branch away.
fn stop_test(client: &ClientArgs, group: &str) -> anyhow::Result<()> {
    let path = test_file(client, group);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("no test failover of group {group} runs here ({} does not exist)", path.display()),
        Err(e) => return Err(anyhow::anyhow!(e).context(format!("read {}", path.display()))),
    };
    let pid: u32 = text.trim().parse().with_context(|| format!("{} holds no pid", path.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    if !args.iter().any(|a| a == "failover") || !args.iter().any(|a| a == group) || !args.iter().any(|a| a == "--test") {
        let _ = std::fs::remove_file(&path);
        bail!("the test failover of group {group} (pid {pid}) is not running any more; removed its stale {}", path.display());
    }
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while rewind_node::dev::alive(pid) {
        if std::time::Instant::now() > deadline {
            bail!("the test failover of group {group} (pid {pid}) did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("stopped the test failover of group {group} (pid {pid}); its copy-on-write branch is gone, and the group's history never saw it");
    Ok(())
}
