//! The operator's side of cross-site DR: each command over a client of
//! this site (and, for `link`, one of the other site).

use std::path::Path;
use std::time::{Duration, Instant};

use rewind_wire::dr::{DrInfo, DrRecord, SiteLink};
use rewind_wire::rpc::{Request, Response};

use super::{lag, PEER_SILENT};
use crate::client::{CallError, Client};
use crate::config::ClientConfig;

/// What a failback did.
#[derive(Debug, Clone)]
pub struct FailedBack {
    pub fork_lsn: u64,
    /// The branch holding this site's events after the fork (None when it
    /// had none).
    pub branch: Option<String>,
    pub kept_events: u64,
    /// The group's head here when it caught up, and the payload bytes it
    /// received from the primary since the fork.
    pub head_lsn: u64,
    pub received_bytes: u64,
}

/// Failback at the old primary after a failover: keeps this site's events
/// after the fork as a read-only branch, cuts the group back to the fork,
/// and waits (up to `wait`) until it has caught up with the primary.
pub async fn failback(client: &Client, group: &str, wait: Duration, mut progress: impl FnMut(u64, u64)) -> anyhow::Result<FailedBack> {
    use anyhow::bail;
    let info = state(client, group, None).await?;
    let (Some(local), Some(primary)) = (info.local.clone(), info.primary.clone()) else {
        bail!("group {group:?} is not linked to another site: there is nothing to fail back");
    };
    if primary == local {
        bail!(
            "site {local:?} is the primary of group {group:?} (epoch {}): failback is for the old primary once it has heard of a failover at the other site (see `rewind dr status {group}`)",
            info.epoch
        );
    }
    let (fork, here_last, epoch) = match client.call_leader(&Request::DrForkPoint { group: group.to_string() }).await? {
        Response::ForkPoint { lsn, here_last, epoch, .. } => (lsn, here_last, epoch),
        other => bail!("unexpected reply {other:?}"),
    };
    let mut branch = None;
    if here_last > fork {
        let name = rewind_service::dr::branch_name(group, epoch);
        loop {
            let r = client.call_leader(&Request::DrFork { group: group.to_string(), branch: name.clone(), fork_lsn: fork }).await?;
            let Response::Appended { lsn_first, .. } = r else { bail!("unexpected reply {r:?}") };
            progress(here_last - (lsn_first - 1), here_last - fork);
            if lsn_first == fork + 1 {
                break;
            }
        }
        branch = Some(name);
    }
    let at_fork = state(client, group, None).await?;
    let started = Instant::now();
    loop {
        let now = state(client, group, None).await?;
        if let Some(p) = &now.peer {
            if p.seen_ms_ago < 2000 && p.last_lsn == now.last_lsn && p.chains_agree == Some(true) {
                return Ok(FailedBack {
                    fork_lsn: fork,
                    branch,
                    kept_events: here_last - fork,
                    head_lsn: now.last_lsn,
                    received_bytes: now.payload_bytes.saturating_sub(at_fork.payload_bytes),
                });
            }
        }
        if started.elapsed() > wait {
            bail!("group {group:?} has not caught up with site {primary:?} within {wait:?} (see `rewind dr status {group}`); it goes on in the background");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A site's DR state of a group, asked of its leader.
pub async fn state(client: &Client, group: &str, digest_at: Option<u64>) -> anyhow::Result<DrInfo> {
    match client.call_leader(&Request::DrState { group: group.to_string(), digest_at }).await? {
        Response::Dr(info) => Ok(*info),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

/// A site's default name: `site-` and 8 hex digits of its CA certificate's
/// hash, the same from every client of that site.
pub fn default_site_name(ca_pem: &str) -> String {
    format!("site-{}", &blake3::hash(ca_pem.as_bytes()).to_hex()[..8])
}

/// How one site reaches the other: the other site's nodes, its CA, and an
/// identity it signed (read from a client config of that site).
pub fn link_from(config: &ClientConfig) -> anyhow::Result<SiteLink> {
    use anyhow::Context;
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
    Ok(SiteLink {
        addrs: config.nodes.iter().map(|n| n.addr.to_string()).collect(),
        ca_pem: read(&config.tls.ca)?,
        cert_pem: read(&config.tls.cert)?,
        key_pem: read(&config.tls.key)?,
    })
}

/// What `link` needs: both sites' admin clients, their names, and how each
/// site reaches the other.
pub struct LinkPlan {
    pub group: String,
    pub here: String,
    pub there: String,
    /// Site "here" uses this to reach "there", and the reverse.
    pub to_there: SiteLink,
    pub to_here: SiteLink,
    pub rpo_alarm_ms: u64,
    pub max_rate_bytes: u64,
}

/// Pairs a group with a second site: creates it there with the same disks
/// (empty), fences it there as the secondary, then records the link here.
/// The second site's leader starts pulling from LSN 1 at once.
pub async fn link(local: &Client, remote: &Client, plan: &LinkPlan) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    let g = &plan.group;
    let points = match local.call_leader(&Request::Points { group: g.clone(), on_leader: true }).await.context("this site")? {
        Response::Points(p) => p,
        other => bail!("unexpected reply {other:?}"),
    };
    let here = state(local, g, None).await.context("this site")?;
    if let Some(l) = &here.local {
        bail!("group {g:?} is linked already: this site is {l:?}, the other {:?}, primary {:?} in epoch {}", here.remote.as_deref().unwrap_or("?"), here.primary.as_deref().unwrap_or("?"), here.epoch);
    }
    match remote.call_leader(&Request::GroupState { group: g.clone() }).await {
        Ok(Response::Group(there)) => {
            if there.last_lsn > 0 {
                bail!("group {g:?} exists at the other site with {} events; a link starts from an empty copy (remove or rename it there first)", there.last_lsn);
            }
            if there.disks != points.disks {
                bail!("group {g:?} exists at the other site with other disks; a link needs the same disks");
            }
        }
        Ok(other) => bail!("unexpected reply {other:?}"),
        Err(CallError::Refused { message, .. }) if message.contains("no consistency group") => {
            remote.create_group(g, points.disks.clone()).await.context("create the group at the other site")?;
        }
        Err(e) => return Err(anyhow::anyhow!(e).context("the other site")),
    }
    let ours = DrRecord {
        local: plan.here.clone(),
        remote: plan.there.clone(),
        primary: plan.here.clone(),
        epoch: 1,
        rpo_alarm_ms: plan.rpo_alarm_ms,
        max_rate_bytes: plan.max_rate_bytes,
        link: plan.to_there.clone(),
    };
    let theirs = ours.mirrored(plan.to_here.clone());
    remote.call_leader(&Request::DrSet { group: g.clone(), record: theirs }).await.context("record the link at the other site")?;
    local.call_leader(&Request::DrSet { group: g.clone(), record: ours }).await.context("record the link at this site")?;
    Ok(())
}

/// The lag of a group's secondary as one site sees it: (LSNs, bytes,
/// seconds), or None when the peer was never reached.
pub fn lag_of(info: &DrInfo) -> Option<(u64, u64, f64)> {
    let peer = info.peer.as_ref().filter(|p| p.seen_ms_ago != u64::MAX)?;
    let there = DrInfo { last_lsn: peer.last_lsn, last_time_ns: peer.last_time_ns, payload_bytes: peer.payload_bytes, first_time_ns: peer.first_time_ns, ..info.clone() };
    let head = |i: &DrInfo| (i.last_lsn, i.last_time_ns, i.payload_bytes);
    Some(if info.primary == info.local { lag(info, head(&there)) } else { lag(&there, head(info)) })
}

/// What a failover did.
#[derive(Debug, Clone)]
pub struct FailedOver {
    pub epoch: u64,
    /// The point the disks came up as of, and its time.
    pub target_lsn: u64,
    pub target_time_ns: u64,
    /// The group's last LSN after the failover: its disks equal the target.
    pub head_lsn: u64,
    /// Revert events appended (0 when the target was the latest point).
    pub reverts: u64,
}

/// Makes this site the group's primary in the next epoch, and its disks as
/// of `target`: events after the target stay in the history, and revert
/// events start the new branch. Refuses while the primary site answers,
/// unless `force`.
pub async fn failover(client: &Client, group: &str, target: &rewind_wire::rpc::Target, force: bool) -> anyhow::Result<FailedOver> {
    use anyhow::bail;
    use rewind_wire::event::{Event, TimedEvent};
    let info = state(client, group, None).await?;
    let (Some(local), Some(primary)) = (info.local.clone(), info.primary.clone()) else {
        bail!("group {group:?} is not linked to another site: there is nothing to fail over (see `rewind dr link`)");
    };
    if primary == local {
        bail!("site {local:?} is the primary of group {group:?} already (epoch {}): nothing to fail over", info.epoch);
    }
    if let Some(p) = info.peer.as_ref().filter(|p| p.seen_ms_ago < PEER_SILENT.as_millis() as u64) {
        if !force {
            bail!(
                "site {primary:?}, the primary of group {group:?}, answered {:.1} s ago: a failover now would leave two sites that think they lead. \
                 For planned maintenance run `rewind dr switchover {group}` at site {primary:?} (it drains, then hands over, losing nothing); \
                 if that site is lost in all but its network, add --force (it is fenced as soon as it hears of the new epoch)",
                p.seen_ms_ago as f64 / 1000.0
            );
        }
    }
    let (target_lsn, target_time_ns) = match client.call_leader(&Request::Resolve { group: group.to_string(), target: target.clone(), on_leader: true }).await? {
        Response::Resolved { lsn, time_ns } => (lsn, time_ns),
        other => bail!("unexpected reply {other:?}"),
    };
    client.call_leader(&Request::DrSwitch { group: group.to_string(), from_epoch: info.epoch, to: local.clone() }).await?;
    let epoch = info.epoch + 1;
    let points = match client.call_leader(&Request::Points { group: group.to_string(), on_leader: true }).await? {
        Response::Points(p) => p,
        other => bail!("unexpected reply {other:?}"),
    };
    let mut producer = crate::client::producer(client.clone(), 8);
    let mut reverts = 0u64;
    let mut head = points.last_lsn;
    if target_lsn < points.last_lsn {
        let now = crate::now_ns();
        for d in &points.disks {
            let blocks = d.size_bytes.div_ceil(rewind_raft_store::blocks::BLOCK_BYTES);
            let mut first = 0;
            while first < blocks {
                let end = (first + rewind_wire::limits::REVERT_BLOCKS_MAX).min(blocks);
                let event = Event::Revert { disk: d.name.clone(), to_lsn: target_lsn, block_first: first, block_end: end };
                producer.append(group, vec![TimedEvent { time_ns: now, event }]).await?;
                reverts += 1;
                first = end;
            }
        }
        let mark = Event::Bookmark { name: format!("failover-epoch-{epoch}"), app_consistent: false };
        let (_, last) = producer.append(group, vec![TimedEvent { time_ns: now, event: mark }]).await?;
        head = last;
    }
    Ok(FailedOver { epoch, target_lsn, target_time_ns, head_lsn: head, reverts })
}

/// Hands the group to the other site with no data loss: this site (the
/// primary) stops taking writes at once, the other drains what it lacks
/// and then takes over. Waits up to `wait` for the other site to report
/// the new epoch as its own.
pub async fn switchover(client: &Client, group: &str, wait: Duration) -> anyhow::Result<DrInfo> {
    use anyhow::bail;
    let info = state(client, group, None).await?;
    let (Some(local), Some(remote), Some(primary)) = (info.local.clone(), info.remote.clone(), info.primary.clone()) else {
        bail!("group {group:?} is not linked to another site (see `rewind dr link`)");
    };
    if primary != local {
        bail!("site {local:?} is not the primary of group {group:?} (site {primary:?} is, epoch {}): run the switchover there", info.epoch);
    }
    client.call_leader(&Request::DrSwitch { group: group.to_string(), from_epoch: info.epoch, to: remote.clone() }).await?;
    let started = Instant::now();
    loop {
        let now = state(client, group, None).await?;
        if let Some(p) = &now.peer {
            if p.epoch == info.epoch + 1 && p.primary.as_deref() == Some(remote.as_str()) && p.last_lsn == now.last_lsn && p.seen_ms_ago < 2000 {
                return Ok(now);
            }
        }
        if started.elapsed() > wait {
            bail!(
                "site {remote:?} has not taken group {group:?} over within {wait:?}: this site is fenced (epoch {}), and the other site takes over once it has drained (see `rewind dr status {group}`)",
                info.epoch + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
