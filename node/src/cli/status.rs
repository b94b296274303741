//! `rewind status`: every node's view of the site, and the async taps.

use rewind_node::config::NodeAddr;
use rewind_wire::rpc::{NodeStatus, TapStatus};
use serde::Serialize;

use super::ClientArgs;

/// `rewind status --json`.
#[derive(Serialize)]
struct StatusJson {
    nodes: Vec<NodeJson>,
    taps: Vec<TapJson>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum NodeJson {
    Up {
        id: u64,
        addr: String,
        pid: u32,
        up: bool,
        role: Option<&'static str>,
        term: Option<u64>,
        leader: Option<u64>,
        last_log_index: Option<u64>,
        committed_index: Option<u64>,
        applied_index: Option<u64>,
        snapshot_index: Option<u64>,
        purged_index: Option<u64>,
        voters: Option<Vec<u64>>,
        learners: Option<Vec<u64>>,
        groups: Option<Vec<GroupJson>>,
    },
    Down {
        id: u64,
        addr: String,
        up: bool,
        error: String,
    },
}

#[derive(Serialize)]
struct GroupJson {
    name: String,
    last_lsn: u64,
    digest: String,
    events: u64,
    payload_bytes: u64,
    /// Payload and block bytes this node holds for the group: every write
    /// since it was created, less what the collector freed, plus the
    /// blocks it rewrote.
    stored_bytes: u64,
    window_bytes: u64,
    gc_debt_bytes: u64,
}

/// What a node holds for a group (see `GroupJson::stored_bytes`).
fn stored(g: &rewind_wire::rpc::GroupState) -> u64 {
    g.retention.stored_bytes
}

impl NodeJson {
    fn new(n: &NodeAddr, s: &anyhow::Result<NodeStatus>) -> NodeJson {
        let s = match s {
            Ok(s) => s,
            Err(e) => return NodeJson::Down { id: n.id, addr: n.addr.to_string(), up: false, error: format!("{e:#}") },
        };
        let sh = s.shards.first();
        NodeJson::Up {
            id: s.id,
            addr: s.addr.clone(),
            pid: s.pid,
            up: true,
            role: sh.map(|x| x.role.as_str()),
            term: sh.map(|x| x.term),
            leader: sh.and_then(|x| x.leader),
            last_log_index: sh.and_then(|x| x.last_log_index),
            committed_index: sh.and_then(|x| x.committed_index),
            applied_index: sh.and_then(|x| x.applied_index),
            snapshot_index: sh.and_then(|x| x.snapshot_index),
            purged_index: sh.and_then(|x| x.purged_index),
            voters: sh.map(|x| x.voters.clone()),
            learners: sh.map(|x| x.learners.clone()),
            groups: sh.map(|x| {
                x.groups
                    .iter()
                    .map(|g| GroupJson {
                        name: g.name.clone(),
                        last_lsn: g.last_lsn,
                        digest: g.digest_hex.clone(),
                        events: g.events,
                        payload_bytes: g.payload_bytes,
                        stored_bytes: stored(g),
                        window_bytes: g.retention.window_bytes,
                        gc_debt_bytes: g.retention.gc_debt_bytes,
                    })
                    .collect()
            }),
        }
    }
}

#[derive(Serialize)]
struct TapJson {
    group: String,
    disk: String,
    pid: u32,
    uri: String,
    mode: &'static str,
    rpo_ms: u64,
    journal_bytes: u64,
    journal_bytes_max: u64,
    unshipped_batches: u64,
    stalls: u64,
    shipped_lsn: u64,
    report_age_ms: u64,
}

impl TapJson {
    fn new(t: &TapStatus) -> TapJson {
        let r = &t.report;
        TapJson {
            group: r.group.clone(),
            disk: r.disk.clone(),
            pid: r.pid,
            uri: r.uri.clone(),
            mode: "async",
            rpo_ms: r.rpo_ms,
            journal_bytes: r.journal_bytes,
            journal_bytes_max: r.journal_bytes_max,
            unshipped_batches: r.unshipped_batches,
            stalls: r.stalls,
            shipped_lsn: r.shipped_lsn,
            report_age_ms: t.age_ms,
        }
    }
}

pub async fn run(args: ClientArgs, json: bool) -> anyhow::Result<()> {
    let client = args.client()?;
    let all = client.status_all().await;
    // Each tap reports to the leader of the moment; keep its freshest report.
    let mut taps: std::collections::BTreeMap<(String, String), rewind_wire::rpc::TapStatus> = Default::default();
    for t in all.iter().filter_map(|(_, s)| s.as_ref().ok()).flat_map(|s| s.taps.iter()) {
        let key = (t.report.group.clone(), t.report.disk.clone());
        if taps.get(&key).is_none_or(|old| old.age_ms > t.age_ms) {
            taps.insert(key, t.clone());
        }
    }
    let taps: Vec<rewind_wire::rpc::TapStatus> = taps.into_values().collect();
    if json {
        let nodes: Vec<NodeJson> = all.iter().map(|(n, s)| NodeJson::new(n, s)).collect();
        let taps: Vec<TapJson> = taps.iter().map(TapJson::new).collect();
        println!("{}", serde_json::to_string_pretty(&StatusJson { nodes, taps })?);
        if all.iter().all(|(_, s)| s.is_err()) {
            anyhow::bail!("no node of the site answered");
        }
        return Ok(());
    }
    println!("{:<5} {:<22} {:<10} {:>5} {:>7} {:>9} {:>10} {:>8} {:>8}", "NODE", "ADDR", "ROLE", "TERM", "LEADER", "LAST-LOG", "COMMITTED", "APPLIED", "PID");
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    // Per group: (node, last LSN, digest, stored bytes, collector debt).
    type PerNode = Vec<(u64, u64, String, u64, u64)>;
    let mut groups: std::collections::BTreeMap<String, PerNode> = Default::default();
    for (n, s) in &all {
        match s {
            Ok(s) => {
                for sh in &s.shards {
                    println!("{:<5} {:<22} {:<10} {:>5} {:>7} {:>9} {:>10} {:>8} {:>8}", s.id, s.addr, sh.role, sh.term, opt(sh.leader), opt(sh.last_log_index), opt(sh.committed_index), opt(sh.applied_index), s.pid);
                    for g in &sh.groups {
                        groups.entry(g.name.clone()).or_default().push((s.id, g.last_lsn, g.digest_hex.clone(), stored(g), g.retention.gc_debt_bytes));
                    }
                }
            }
            Err(e) => println!("{:<5} {:<22} {:<10} ({e:#})", n.id, n.addr.to_string(), "down"),
        }
    }
    if !groups.is_empty() {
        println!("\n{:<20} {:<6} {:>10}  {:<16} {:>11} {:>12}", "GROUP", "NODE", "LAST-LSN", "DIGEST", "STORED-MiB", "GC-DEBT-MiB");
        for (name, per_node) in &groups {
            for (id, lsn, digest, stored, debt) in per_node {
                println!("{:<20} {:<6} {:>10}  {:<16} {:>11} {:>12}", name, id, lsn, &digest[..16], stored >> 20, debt >> 20);
            }
        }
    }
    let omitted: u64 = all.iter().filter_map(|(_, s)| s.as_ref().ok()).flat_map(|s| s.shards.iter()).map(|sh| sh.groups_omitted).max().unwrap_or(0);
    if omitted > 0 {
        println!("... and {omitted} more groups (a status reply holds what fits one frame; see `rewind points GROUP`)");
    }
    if !taps.is_empty() {
        println!("\n{:<16} {:<12} {:>9} {:>21} {:>9} {:>7} {:>11} {:>8}", "ASYNC TAP", "DISK", "RPO", "JOURNAL", "UNSHIPPED", "STALLS", "SHIPPED-LSN", "REPORTED");
        for t in &taps {
            let r = &t.report;
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            let fill = format!("{:.1}/{:.0} MiB {:>3.0}%", mib(r.journal_bytes), mib(r.journal_bytes_max), 100.0 * r.journal_bytes as f64 / r.journal_bytes_max.max(1) as f64);
            println!("{:<16} {:<12} {:>7.2} s {:>21} {:>9} {:>7} {:>11} {:>6.1} s ago", r.group, r.disk, r.rpo_ms as f64 / 1000.0, fill, r.unshipped_batches, r.stalls, r.shipped_lsn, t.age_ms as f64 / 1000.0);
        }
    }
    if all.iter().all(|(_, s)| s.is_err()) {
        anyhow::bail!("no node of the site answered");
    }
    Ok(())
}

