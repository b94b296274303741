//! `rewind replay`: a disk as of an LSN, written to a raw image file. Reads
//! the group's events from one node (which must have applied the target
//! LSN) in bounded pieces and applies them with `rewind-replay`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rewind_replay::{apply, FileImage};
use rewind_wire::rpc::{GroupState, Request, Response};

use crate::client::Client;

#[derive(Debug, Clone, Copy)]
pub enum Target {
    Lsn(u64),
    Latest,
}

pub struct ReplayOptions {
    pub group: String,
    pub disk: String,
    pub target: Target,
    pub out: PathBuf,
    /// Which node serves the replay; any that answers if none.
    pub node: Option<u64>,
}

#[derive(Debug)]
pub struct ReplayReport {
    pub node: u64,
    pub lsn: u64,
    pub events_read: u64,
    pub events_applied: u64,
    pub image_bytes: u64,
    pub blake3_hex: String,
    pub elapsed: Duration,
}

async fn group_on(client: &Client, addr: SocketAddr, group: &str) -> anyhow::Result<GroupState> {
    match client.call_node(addr, &Request::GroupState { group: group.into() }).await? {
        Response::Group(g) => Ok(g),
        Response::Error(e) => bail!("{}", e.message),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// Replays a disk to a file. `progress(done, target)` is called as LSNs are applied.
pub async fn run(client: &Client, opts: &ReplayOptions, mut progress: impl FnMut(u64, u64)) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let candidates: Vec<_> = match opts.node {
        Some(id) => vec![client.nodes().iter().find(|n| n.id == id).with_context(|| format!("the client config lists no node {id}"))?.clone()],
        None => client.nodes().to_vec(),
    };
    let mut chosen = None;
    let mut last_error = None;
    for n in &candidates {
        match group_on(client, n.addr, &opts.group).await {
            Ok(g) => {
                chosen = Some((n.clone(), g));
                break;
            }
            Err(e) => last_error = Some(e.context(format!("node {} at {}", n.id, n.addr))),
        }
    }
    let Some((node, group)) = chosen else {
        return Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no node to replay from")));
    };
    let disk = group.disks.iter().find(|d| d.name == opts.disk).with_context(|| {
        format!("group {} has no disk {:?} (it has: {})", opts.group, opts.disk, group.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "))
    })?;
    let lsn = match opts.target {
        Target::Latest => group.last_lsn,
        Target::Lsn(0) => bail!("LSNs start at 1; the group's window is 1..={}", group.last_lsn),
        Target::Lsn(n) if n > group.last_lsn => {
            bail!("LSN {n} is beyond what node {} has applied of group {} (its window is 1..={})", node.id, opts.group, group.last_lsn)
        }
        Target::Lsn(n) => n,
    };
    let mut image = FileImage::create(&opts.out, disk.size_bytes).with_context(|| format!("create {}", opts.out.display()))?;
    let (mut next, mut read, mut applied) = (1u64, 0u64, 0u64);
    while next <= lsn {
        let req = Request::ReadEvents { group: opts.group.clone(), lsn_first: next, count_max: 4096 };
        let events = match client.call_node(node.addr, &req).await? {
            Response::Events(e) if !e.is_empty() => e,
            Response::Events(_) => bail!("node {} returned no events from LSN {next}", node.id),
            Response::Error(e) => bail!("node {}: {}", node.id, e.message),
            other => bail!("unexpected reply {other:?}"),
        };
        for e in events.iter().take_while(|e| e.lsn <= lsn) {
            if e.lsn != next {
                bail!("node {} skipped from LSN {next} to {}", node.id, e.lsn);
            }
            applied += apply(&opts.disk, e, &mut image).with_context(|| format!("write {}", opts.out.display()))? as u64;
            read += 1;
            next += 1;
        }
        progress(next - 1, lsn);
    }
    let file = image.into_file();
    file.sync_all().with_context(|| format!("sync {}", opts.out.display()))?;
    let blake3_hex = hash_file(&opts.out)?;
    Ok(ReplayReport { node: node.id, lsn, events_read: read, events_applied: applied, image_bytes: disk.size_bytes, blake3_hex, elapsed: started.elapsed() })
}

fn hash_file(path: &std::path::Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}
