//! Consistency groups, their restore points and bookmarks.

use anyhow::{bail, Context};
use clap::Subcommand;
use rewind_wire::rpc::{Request, Response};
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

pub async fn run(c: GroupCommand) -> anyhow::Result<()> {
    match c {
        GroupCommand::Create { client, group, disks } => {
            rewind_wire::event::check_name(&group)?;
            let disks = disks.iter().map(|d| parse_disk(d)).collect::<anyhow::Result<Vec<_>>>()?;
            client.client()?.create_group(&group, disks).await?;
            println!("created consistency group {group}");
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

/// Puts a named point into a group's log and prints its LSN.
pub async fn bookmark(client: ClientArgs, group: &str, name: &str, app_consistent: bool) -> anyhow::Result<()> {
    rewind_wire::event::check_name(name).context("bookmark name")?;
    let mut producer = rewind_node::client::producer(client.client()?, 1);
    let event = rewind_wire::event::Event::Bookmark { name: name.to_string(), app_consistent };
    let time_ns = rewind_node::now_ns();
    let (lsn, _) = producer.append(group, vec![rewind_wire::event::TimedEvent { time_ns, event }]).await?;
    println!("bookmark {name} in {group} at LSN {lsn} ({}){}", format_time_ns(time_ns), if app_consistent { ", app-consistent" } else { "" });
    Ok(())
}

/// `rewind points --json`.
#[derive(Serialize)]
struct PointsJson {
    group: String,
    window: WindowJson,
    bookmarks: Vec<BookmarkJson>,
    /// Committed backups: none until CBT import is built.
    backups: Vec<BookmarkJson>,
    disks: Vec<DiskJson>,
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
}

#[derive(Serialize)]
struct DiskJson {
    name: String,
    size_bytes: u64,
}

pub async fn points(args: ClientArgs, group: &str, json: bool) -> anyhow::Result<()> {
    let client = args.client()?;
    let p = match client.call_leader(&Request::Points { group: group.to_string(), on_leader: true }).await? {
        Response::Points(p) => p,
        other => bail!("unexpected reply {other:?}"),
    };
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
                .map(|b| BookmarkJson { name: b.name.clone(), lsn: b.lsn, time: format_time_ns(b.time_ns), time_ns: b.time_ns, app_consistent: b.app_consistent })
                .collect(),
            backups: Vec::new(),
            disks: p.disks.iter().map(|d| DiskJson { name: d.name.clone(), size_bytes: d.size_bytes }).collect(),
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

