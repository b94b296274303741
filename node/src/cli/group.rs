//! Consistency groups, their restore points and bookmarks.

use anyhow::{bail, Context};
use clap::Subcommand;
use rewind_wire::rpc::{BackupState, Request, Response};
use rewind_wire::timefmt::format_time_ns;
use serde::Serialize;

use super::{parse_disk, ClientArgs};

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Create a consistency group with its disks.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// Group name: 1-64 of [A-Za-z0-9._-].
        group: String,
        /// NAME:SIZE[:SECTOR], e.g. disk0:10G or disk1:64M:4096. Repeat for each disk.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        #[command(flatten)]
        keep: KeepArgs,
    },
    /// Change a group's retention (an event in its log). While the group
    /// is locked, only a longer retention is taken.
    ///
    /// Examples:
    ///   rewind group set vm1 --keep 7d
    ///   rewind group set vm1 --keep-bytes 500G
    ///   rewind group set vm1 --keep none --keep-bytes none   (keep everything)
    #[command(verbatim_doc_comment)]
    Set {
        #[command(flatten)]
        client: ClientArgs,
        group: String,
        #[command(flatten)]
        keep: KeepArgs,
    },
    /// Lock a group's history until a time: until then no command, an
    /// admin's included, can shorten its retention, delete it, or unpin its
    /// bookmarks. A lock can be extended, never shortened or lifted.
    ///
    /// Examples:
    ///   rewind group lock vm1 --until 30d
    ///   rewind group lock vm1 --until 2027-06-30T00:00:00Z
    #[command(verbatim_doc_comment)]
    Lock {
        #[command(flatten)]
        client: ClientArgs,
        group: String,
        /// A time (RFC 3339) or a duration from now (30d, 12h).
        #[arg(long)]
        until: String,
    },
    /// Delete a group and its whole history, on every node of the site.
    /// Refused while the group is locked or linked to another site.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        group: String,
        /// Confirm: the history cannot be brought back.
        #[arg(long)]
        yes: bool,
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

/// A retention policy's two limits, as flags.
#[derive(clap::Args, Clone, Default)]
pub struct KeepArgs {
    /// Keep the history of this long behind the newest write (30m, 12h,
    /// 7d), or `none` for no time limit.
    #[arg(long)]
    keep: Option<String>,
    /// Keep at most this much history (payload bytes: 500G, 2T), or `none`
    /// for no size limit. With --keep too, whichever is reached first
    /// releases the oldest history.
    #[arg(long)]
    keep_bytes: Option<String>,
}

impl KeepArgs {
    fn is_empty(&self) -> bool {
        self.keep.is_none() && self.keep_bytes.is_none()
    }

    /// The policy event: the flags given, the rest as `current` has it.
    fn event(&self, current: (u64, u64)) -> anyhow::Result<rewind_wire::event::Event> {
        let keep_ns = match self.keep.as_deref() {
            None => current.0,
            Some("none") => 0,
            Some(d) => u64::try_from(super::dr::parse_duration(d).context("--keep")?.as_nanos()).context("--keep is too long")?,
        };
        let keep_bytes = match self.keep_bytes.as_deref() {
            None => current.1,
            Some("none") => 0,
            Some(s) => super::parse_size(s).context("--keep-bytes")?,
        };
        if self.keep.is_some() && keep_ns == 0 && self.keep.as_deref() != Some("none") {
            bail!("--keep 0 would release all history; use --keep none for no time limit");
        }
        if self.keep_bytes.is_some() && keep_bytes == 0 && self.keep_bytes.as_deref() != Some("none") {
            bail!("--keep-bytes 0 would release all history; use --keep-bytes none for no size limit");
        }
        Ok(rewind_wire::event::Event::Retain { keep_ns, keep_bytes })
    }
}

fn policy_text(keep_ns: u64, keep_bytes: u64) -> String {
    let time = if keep_ns == 0 { "no time limit".to_string() } else { format!("{} of history", duration_text(keep_ns)) };
    let bytes = if keep_bytes == 0 { "no size limit".to_string() } else { format!("at most {} MiB", keep_bytes >> 20) };
    format!("{time}, {bytes}")
}

fn duration_text(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        _ if s >= 86_400 && s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        _ if s >= 3600 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s >= 60 && s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// Parses a time (RFC 3339, or ns since the epoch) or a duration from now.
fn parse_until(s: &str) -> anyhow::Result<u64> {
    if let Ok(d) = super::dr::parse_duration(s) {
        return Ok(rewind_node::now_ns().saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)));
    }
    rewind_wire::timefmt::parse_time_ns(s).with_context(|| format!("{s:?} is neither a time (2027-01-31T00:00:00Z) nor a duration from now (30d)"))
}

/// Appends admin events (policy, lock, pin) to a group, stamped now.
async fn append_admin(client: &ClientArgs, group: &str, events: Vec<rewind_wire::event::Event>) -> anyhow::Result<u64> {
    let mut producer = rewind_node::client::producer(client.client()?, 1);
    let time_ns = rewind_node::now_ns();
    let events = events.into_iter().map(|event| rewind_wire::event::TimedEvent { time_ns, event }).collect();
    let (lsn, _) = producer.append(group, events).await?;
    Ok(lsn)
}

async fn fetch_points(client: &ClientArgs, group: &str) -> anyhow::Result<rewind_wire::rpc::PointsInfo> {
    match client.client()?.call_leader(&Request::Points { group: group.to_string(), on_leader: true }).await? {
        Response::Points(p) => Ok(p),
        other => bail!("unexpected reply {other:?}"),
    }
}

pub async fn run(c: GroupCommand) -> anyhow::Result<()> {
    match c {
        GroupCommand::Create { client, group, disks, keep } => {
            rewind_wire::event::check_name(&group)?;
            let disks = disks.iter().map(|d| parse_disk(d)).collect::<anyhow::Result<Vec<_>>>()?;
            let policy = (!keep.is_empty()).then(|| keep.event((0, 0))).transpose()?;
            client.client()?.create_group(&group, disks).await?;
            println!("created consistency group {group}");
            if let Some(e) = policy {
                let rewind_wire::event::Event::Retain { keep_ns, keep_bytes } = e else { unreachable!("a policy event") };
                let lsn = append_admin(&client, &group, vec![e]).await?;
                println!("retention of {group}: {} (LSN {lsn})", policy_text(keep_ns, keep_bytes));
            }
            Ok(())
        }
        GroupCommand::Set { client, group, keep } => {
            if keep.is_empty() {
                super::usage_error("give --keep DURATION and/or --keep-bytes SIZE (or `none`)");
            }
            let r = fetch_points(&client, &group).await?.retention;
            let e = keep.event((r.keep_ns, r.keep_bytes))?;
            let rewind_wire::event::Event::Retain { keep_ns, keep_bytes } = e else { unreachable!("a policy event") };
            let lsn = append_admin(&client, &group, vec![e]).await?;
            println!("retention of {group}: {} (LSN {lsn}); the window moves with the next write", policy_text(keep_ns, keep_bytes));
            Ok(())
        }
        GroupCommand::Lock { client, group, until } => {
            let until_ns = parse_until(&until)?;
            if until_ns <= rewind_node::now_ns() {
                bail!("--until {until} is in the past");
            }
            let lsn = append_admin(&client, &group, vec![rewind_wire::event::Event::Lock { until_ns }]).await?;
            println!("group {group} is locked until {} (LSN {lsn}): its retention cannot shrink, nor the group be deleted, nor its pins be released, until then", format_time_ns(until_ns));
            Ok(())
        }
        GroupCommand::Delete { client, group, yes } => {
            if !yes {
                super::usage_error(&format!("deleting group {group} drops its whole history on every node; add --yes to confirm"));
            }
            match client.client()?.call_leader(&Request::DeleteGroup { group: group.clone() }).await? {
                Response::Done => println!("deleted consistency group {group}"),
                other => bail!("unexpected reply {other:?}"),
            }
            Ok(())
        }
        GroupCommand::AddDisk { client, group, disk } => {
            rewind_wire::event::check_name(&group)?;
            let d = parse_disk(&disk)?;
            let client = client.client()?;
            let mut producer = rewind_node::client::producer(client, 1);
            let event = rewind_wire::event::Event::DiskCreate { disk: d.name.clone(), size_bytes: d.size_bytes, sector_bytes: d.sector_bytes };
            let (lsn, _) = producer.append(&group, vec![rewind_wire::event::TimedEvent { time_ns: rewind_node::now_ns(), event }]).await?;
            println!("added disk {} to {group} at LSN {lsn}", d.name);
            Ok(())
        }
    }
}

/// Puts a named point into a group's log and prints its LSN; with
/// `keep_until`, pins it (kept beyond the window until then).
pub async fn bookmark(client: ClientArgs, group: &str, name: &str, app_consistent: bool, keep_until: Option<&str>) -> anyhow::Result<()> {
    use rewind_wire::event::Event;
    rewind_wire::event::check_name(name).context("bookmark name")?;
    let until = keep_until.map(parse_until).transpose().context("--keep-until")?;
    let mut events = vec![Event::Bookmark { name: name.to_string(), app_consistent }];
    if let Some(until_ns) = until {
        events.push(Event::Pin { name: name.to_string(), until_ns });
    }
    let time_ns = rewind_node::now_ns();
    let lsn = append_admin(&client, group, events).await?;
    print!("bookmark {name} in {group} at LSN {lsn} ({}){}", format_time_ns(time_ns), if app_consistent { ", app-consistent" } else { "" });
    match until {
        Some(u) => println!(", pinned until {}", format_time_ns(u)),
        None => println!(),
    }
    Ok(())
}

/// Pins an existing bookmark until a time, or releases its pin.
pub async fn pin(client: ClientArgs, group: &str, name: &str, until: Option<&str>) -> anyhow::Result<()> {
    let until_ns = until.map(parse_until).transpose().context("--until")?.unwrap_or(0);
    let lsn = append_admin(&client, group, vec![rewind_wire::event::Event::Pin { name: name.to_string(), until_ns }]).await?;
    if until_ns == 0 {
        println!("bookmark {name} of {group} is no longer pinned (LSN {lsn}); its point goes when the window passes it");
    } else {
        println!("bookmark {name} of {group} is pinned until {} (LSN {lsn})", format_time_ns(until_ns));
    }
    Ok(())
}

/// `rewind points --json`.
#[derive(Serialize)]
struct PointsJson {
    group: String,
    window: WindowJson,
    bookmarks: Vec<BookmarkJson>,
    /// Every backup, open, committed or aborted, oldest first.
    backups: Vec<BackupJson>,
    disks: Vec<DiskJson>,
    retention: RetentionJson,
}

#[derive(Serialize)]
struct RetentionJson {
    /// 0: no limit of that kind.
    keep_ns: u64,
    keep_bytes: u64,
    /// Absent when never locked.
    locked_until: Option<String>,
    locked_until_ns: u64,
    window_bytes: u64,
    gc_debt_bytes: u64,
    freed_bytes: u64,
    rewritten_bytes: u64,
}

#[derive(Serialize)]
struct WindowJson {
    first_lsn: u64,
    last_lsn: u64,
    first_time: String,
    last_time: String,
    first_time_ns: u64,
    last_time_ns: u64,
}

#[derive(Serialize)]
struct BookmarkJson {
    name: String,
    lsn: u64,
    time: String,
    time_ns: u64,
    app_consistent: bool,
    /// Pinned until then: kept beyond the window.
    keep_until: Option<String>,
}

#[derive(Serialize)]
struct BackupJson {
    name: String,
    disk: String,
    /// open, committed or aborted: only a committed one is a restore point.
    state: &'static str,
    base: Option<String>,
    begin_lsn: u64,
    /// The commit's LSN (absent unless committed).
    lsn: Option<u64>,
    time: Option<String>,
    time_ns: u64,
    extents: u64,
    bytes: u64,
    digest: String,
}

#[derive(Serialize)]
struct DiskJson {
    name: String,
    size_bytes: u64,
}

pub async fn points(args: ClientArgs, group: &str, json: bool) -> anyhow::Result<()> {
    let p = fetch_points(&args, group).await?;
    let backups = match args.client()?.call_leader(&Request::Backups { group: group.to_string(), on_leader: true }).await? {
        Response::Backups(b) => b,
        other => bail!("unexpected reply {other:?}"),
    };
    let r = &p.retention;
    let pinned = |ns: u64| (ns > 0).then(|| if ns == u64::MAX { "forever".to_string() } else { format_time_ns(ns) });
    if json {
        let v = PointsJson {
            group: p.group.clone(),
            window: WindowJson {
                first_lsn: p.first_lsn,
                last_lsn: p.last_lsn,
                first_time: format_time_ns(p.first_time_ns),
                last_time: format_time_ns(p.last_time_ns),
                first_time_ns: p.first_time_ns,
                last_time_ns: p.last_time_ns,
            },
            bookmarks: p
                .bookmarks
                .iter()
                .map(|b| BookmarkJson {
                    name: b.name.clone(),
                    lsn: b.lsn,
                    time: format_time_ns(b.time_ns),
                    time_ns: b.time_ns,
                    app_consistent: b.app_consistent,
                    keep_until: pinned(b.keep_until_ns),
                })
                .collect(),
            backups: backups
                .iter()
                .map(|b| BackupJson {
                    name: b.name.clone(),
                    disk: b.disk.clone(),
                    state: rewind_raft_store::backups::state_word(b.state),
                    base: b.base.clone(),
                    begin_lsn: b.begin_lsn,
                    lsn: (b.state == BackupState::Committed).then_some(b.end_lsn),
                    time: (b.end_time_ns > 0).then(|| format_time_ns(b.end_time_ns)),
                    time_ns: b.end_time_ns,
                    extents: b.extents,
                    bytes: b.bytes,
                    digest: b.digest.iter().map(|x| format!("{x:02x}")).collect(),
                })
                .collect(),
            disks: p.disks.iter().map(|d| DiskJson { name: d.name.clone(), size_bytes: d.size_bytes }).collect(),
            retention: RetentionJson {
                keep_ns: r.keep_ns,
                keep_bytes: r.keep_bytes,
                locked_until: (r.lock_until_ns > 0).then(|| format_time_ns(r.lock_until_ns)),
                locked_until_ns: r.lock_until_ns,
                window_bytes: r.window_bytes,
                gc_debt_bytes: r.gc_debt_bytes,
                freed_bytes: r.freed_bytes,
                rewritten_bytes: r.rewritten_bytes,
            },
        };
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
    println!(
        "  retention: {}; the window holds {} MiB of writes{}",
        policy_text(r.keep_ns, r.keep_bytes),
        r.window_bytes >> 20,
        if r.gc_debt_bytes > 0 { format!(", {} MiB released and not yet freed on this node", r.gc_debt_bytes >> 20) } else { String::new() }
    );
    if r.lock_until_ns > 0 {
        println!("  locked until {}", format_time_ns(r.lock_until_ns));
    }
    if p.bookmarks.is_empty() {
        println!("no bookmarks (add one with `rewind bookmark {group} NAME`)");
    } else {
        println!("\n{:<24} {:>10}  {:<32} {:<14} PINNED UNTIL", "BOOKMARK", "LSN", "TIME", "APP-CONSISTENT");
        for b in &p.bookmarks {
            println!(
                "{:<24} {:>10}  {:<32} {:<14} {}",
                b.name,
                b.lsn,
                format_time_ns(b.time_ns),
                if b.app_consistent { "yes" } else { "no" },
                pinned(b.keep_until_ns).unwrap_or_else(|| "-".into())
            );
        }
    }
    for b in backups.iter().filter(|b| b.state == BackupState::Open) {
        println!(
            "  backup {} of disk {} is open since LSN {}: until it commits or aborts only its importer writes the disk, and the window does not pass its start (rewind backup --group {group} --disk {} --resume, or --abort)",
            b.name, b.disk, b.begin_lsn, b.disk
        );
    }
    if backups.is_empty() {
        println!("no backups (take one with `rewind backup --group {group} --disk DISK --from NBD-URI --full`)");
    } else {
        println!("\n{:<28} {:<10} {:<10} {:>10}  {:<32} {:>10}  BASE", "BACKUP", "DISK", "STATE", "LSN", "TIME", "MIB");
        for b in &backups {
            let (lsn, time) = if b.state == BackupState::Open { (b.begin_lsn, b.begin_time_ns) } else { (b.end_lsn, b.end_time_ns) };
            println!(
                "{:<28} {:<10} {:<10} {:>10}  {:<32} {:>10.1}  {}",
                b.name,
                b.disk,
                rewind_raft_store::backups::state_word(b.state),
                lsn,
                format_time_ns(time),
                b.bytes as f64 / (1u64 << 20) as f64,
                b.base.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}

