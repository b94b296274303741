//! Cross-site DR on a node. While this node leads its site, one task per
//! linked group talks to the peer site, as the link in the group's
//! replicated `DrRecord` says:
//!
//! * it asks the peer's leader for the group's DR state and head, and keeps
//!   what it saw for `rewind dr status` and the metrics (lag, epoch);
//! * when the peer has a higher epoch, it adopts it (a failover or a
//!   switchover happened there): if the peer handed the group to this site,
//!   it first drains the peer's last events, then takes over; otherwise
//!   this site is fenced and refuses the group's appends;
//! * when this site is the secondary, it pulls the primary's committed
//!   events in LSN order and commits them through its own Raft under the
//!   same LSNs, times and digests (`Command::Replicate`). Its cursor is
//!   its own last LSN, in its replicated state: after any break it asks
//!   again from there, and events it holds already are skipped, so nothing
//!   is lost or applied twice.
//!
//! A secondary whose chain does not agree with the primary's at its own
//! head holds events the primary never had (it was the primary before a
//! failover): it stops pulling and says so; `rewind failback` is the way on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rewind_wire::dr::{DrInfo, DrRecord, HashedShipment, PeerView, ShippedBlocks, Shipment, SiteLink};
use rewind_wire::raft::{Command, CommandReply};
use rewind_wire::rpc::{Request, Response};

use crate::client::{CallError, Client};
use crate::config::{ClientConfig, NodeAddr, TlsFiles};
use crate::server::Node;
use rewind_service::dr::{next_step, Step};

use super::state;

/// How often an idle link looks at the peer.
const TICK: Duration = Duration::from_millis(250);
/// How long one call to the peer site may take before the link counts as
/// broken (and is tried again at the next tick).
const PEER_DEADLINE: Duration = Duration::from_secs(5);
/// A peer not heard from for this long counts as unreachable.
pub const PEER_SILENT: Duration = Duration::from_secs(10);

/// What this node's DR tasks last saw of each group's peer.
#[derive(Default)]
pub struct DrViews(Mutex<BTreeMap<String, Seen>>);

#[derive(Clone)]
struct Seen {
    view: PeerView,
    at: Option<Instant>,
}

impl DrViews {
    /// The peer as last seen for `group`, with its age filled in.
    pub fn peer(&self, group: &str) -> Option<PeerView> {
        let map = self.0.lock().expect("dr views");
        let seen = map.get(group)?;
        let mut view = seen.view.clone();
        view.seen_ms_ago = seen.at.map_or(u64::MAX, |at| at.elapsed().as_millis() as u64);
        Some(view)
    }

    fn update(&self, group: &str, f: impl FnOnce(&mut Seen)) {
        let mut map = self.0.lock().expect("dr views");
        let seen = map.entry(group.to_string()).or_insert_with(|| Seen {
            view: PeerView { epoch: 0, primary: None, last_lsn: 0, last_time_ns: 0, first_time_ns: 0, payload_bytes: 0, seen_ms_ago: u64::MAX, problem: None, chains_agree: None },
            at: None,
        });
        f(seen);
    }

    fn problem(&self, group: &str, why: String) {
        tracing::warn!(group, "DR link: {why}");
        self.update(group, |s| s.view.problem = Some(why));
    }
}

/// Starts the supervisor that runs one task per linked group.
pub fn start(node: Arc<Node>) {
    crate::spawn(async move {
        let mut running: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
        loop {
            tokio::time::sleep(TICK).await;
            let Ok(shard) = node.data_shard() else { return };
            let reader = shard.reader.clone();
            let groups = match tokio::task::spawn_blocking(move || reader.dr_all()).await {
                Ok(Ok(g)) => g,
                Ok(Err(e)) => {
                    tracing::error!("reading DR records: {e}");
                    continue;
                }
                Err(_) => continue,
            };
            for (group, _) in groups {
                if running.get(&group).is_none_or(|t| t.is_finished()) {
                    let task = crate::spawn(run_link(node.clone(), group.clone()));
                    running.insert(group, task);
                }
            }
        }
    });
}

/// The peer site's client for a link, rebuilt when the link changes.
struct PeerClient {
    link: SiteLink,
    client: Client,
}

/// Writes the link's identity where the QUIC client reads it (readable by
/// this user only) and builds a client for the peer site.
fn peer_client(dir: &Path, link: &SiteLink) -> anyhow::Result<Client> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        use std::io::Write;
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    };
    let tls = TlsFiles { ca: write("peer-ca.pem", &link.ca_pem)?, cert: write("link.pem", &link.cert_pem)?, key: write("link.key", &link.key_pem)? };
    let mut nodes = Vec::new();
    for (i, a) in link.addrs.iter().enumerate() {
        nodes.push(NodeAddr { id: i as u64 + 1, addr: a.parse().map_err(|e| anyhow::anyhow!("peer address {a:?}: {e}"))? });
    }
    Ok(Client::new(&ClientConfig { nodes, tls })?.with_deadline(PEER_DEADLINE).with_fixed_addresses())
}

/// A link task's memory: the peer's client, the pacer, and a shipment
/// fetched ahead while the previous one committed.
#[derive(Default)]
struct Link {
    peer: Option<PeerClient>,
    pacer: Pacer,
    ahead: Option<(u64, Shipment)>,
    /// When the peer's whole state was last asked (a full round).
    asked: Option<Instant>,
}

/// A streak of shipments fetched ahead still asks the peer's whole state
/// this often, so status, metrics and epochs stay fresh.
const FULL_ROUND_EVERY: Duration = Duration::from_secs(1);

async fn run_link(node: Arc<Node>, group: String) {
    let mut link = Link::default();
    let dir = node.dr_dir.join(&group);
    loop {
        let busy = match step(&node, &dir, &group, &mut link).await {
            Ok(more) => more,
            Err(why) => {
                link.ahead = None;
                node.dr.problem(&group, why);
                false
            }
        };
        if !busy {
            tokio::time::sleep(TICK).await;
        }
    }
}

fn call_error(site: &str, e: CallError) -> String {
    format!("site {site:?}: {e}")
}

/// One round of a link. Returns whether there is more to do at once.
async fn step(node: &Node, dir: &Path, group: &str, link: &mut Link) -> Result<bool, String> {
    let shard = node.data_shard().map_err(|e| e.to_string())?;
    let leader = {
        use openraft::async_runtime::WatchReceiver;
        shard.raft.metrics().borrow_watched().current_leader
    };
    if leader != Some(node.id) {
        *link = Link::default();
        return Ok(false);
    }
    let mine = local_state(node, group).await?;
    let Some(record) = shard.reader.dr(group).map_err(|e| e.to_string())? else { return Ok(false) };
    if link.peer.as_ref().is_none_or(|p| p.link != record.link) {
        let client = peer_client(dir, &record.link).map_err(|e| format!("the link to site {:?}: {e:#}", record.remote))?;
        link.peer = Some(PeerClient { link: record.link.clone(), client });
    }
    let client = &link.peer.as_ref().expect("just set").client;
    // A shipment fetched ahead that continues this site's log, from the
    // primary of this site's epoch: commit it without asking again.
    // Kept through a full round otherwise: the round may pull from where
    // it starts, and fetching it again would cost the link its bytes twice.
    let mut ahead = link.ahead.take().filter(|(lsn_first, s)| *lsn_first == mine.last_lsn + 1 && !record.is_primary() && s.epoch == record.epoch && s.primary == record.primary);
    if let Some((_, s)) = ahead.take_if(|_| link.asked.is_some_and(|at| at.elapsed() < FULL_ROUND_EVERY)) {
        // The peer answered: it counts as seen.
        node.dr.update(group, |v| v.at = Some(Instant::now()));
        return commit(node, client, group, &record, s, &mut link.pacer, &mut link.ahead).await;
    }
    let theirs = match client.call_leader(&Request::DrState { group: group.to_string(), digest_at: Some(mine.last_lsn) }).await {
        Ok(Response::Dr(info)) => *info,
        Ok(other) => return Err(format!("site {:?} answered DR state with {other:?}", record.remote)),
        Err(e) => return Err(call_error(&record.remote, e)),
    };
    link.asked = Some(Instant::now());
    let agree = theirs.digest_at_hex.as_ref().map(|d| *d == mine.digest_hex);
    node.dr.update(group, |s| {
        s.at = Some(Instant::now());
        s.view = PeerView {
            epoch: theirs.epoch,
            primary: theirs.primary.clone(),
            last_lsn: theirs.last_lsn,
            last_time_ns: theirs.last_time_ns,
            payload_bytes: theirs.payload_bytes,
            first_time_ns: theirs.first_time_ns,
            seen_ms_ago: 0,
            problem: None,
            chains_agree: agree,
        };
    });
    publish(group, &record, &mine, &theirs);
    match next_step(&record, &mine, &theirs) {
        Step::Idle => Ok(false),
        Step::Adopt(adopted) => {
            let (epoch, primary) = (adopted.epoch, adopted.primary.clone());
            write(node, Command::DrSet { group: group.to_string(), record: adopted }).await?;
            tracing::info!(group, epoch, primary, "DR: adopted the peer site's epoch");
            Ok(true)
        }
        Step::Pull { lsn_first } => {
            let shipment = match ahead {
                Some((at, s)) if at == lsn_first => s,
                _ => {
                    link.pacer.wait().await;
                    fetch(node, client, group, &record, lsn_first).await?
                }
            };
            commit(node, client, group, &record, shipment, &mut link.pacer, &mut link.ahead).await
        }
        Step::Diverged(why) => {
            node.dr.update(group, |s| s.view.chains_agree = Some(false));
            Err(why)
        }
    }
}

/// zstd level for shipments: fast, and most of the gain.
const ZSTD_LEVEL: i32 = 1;

/// A shipment as it travels to the other site: compressed.
pub fn compress(shipment: &Shipment) -> Response {
    compress_record(shipment, "a shipment", |raw_len, data| Response::ShippedZstd { raw_len, data })
}

/// A DR answer's record (`frame::encode_record`) compressed with zstd,
/// wrapped by `wrap(raw length, compressed)`.
pub fn compress_record<T: rewind_wire::Encode>(record: &T, what: &str, wrap: fn(u64, Vec<u8>) -> Response) -> Response {
    let raw = match rewind_wire::frame::encode_record(record) {
        Ok(r) => r,
        Err(e) => return rewind_service::ServiceError::Internal(format!("encode {what}: {e}")).into(),
    };
    match zstd::bulk::compress(&raw, ZSTD_LEVEL) {
        Ok(data) => {
            metrics::counter!("rewind_dr_sent_raw_bytes_total").increment(raw.len() as u64);
            metrics::counter!("rewind_dr_sent_wire_bytes_total").increment(data.len() as u64);
            wrap(raw.len() as u64, data)
        }
        Err(e) => rewind_service::ServiceError::Internal(format!("compress {what}: {e}")).into(),
    }
}

/// A shipment back from its compressed form, checked (its size bounded
/// before anything is decompressed, then its record's checksum).
pub fn decompress(raw_len: u64, data: &[u8]) -> Result<Shipment, String> {
    decompress_record(raw_len, data, "a shipment")
}

/// A compressed DR record back, checked like a shipment.
pub fn decompress_record<T: rewind_wire::Decode>(raw_len: u64, data: &[u8], what: &str) -> Result<T, String> {
    if raw_len > rewind_wire::limits::FRAME_BODY_BYTES_MAX as u64 {
        return Err(format!("{what} of {raw_len} bytes decompressed is over the limit"));
    }
    let raw = zstd::bulk::decompress(data, raw_len as usize).map_err(|e| format!("{what} does not decompress: {e}"))?;
    rewind_wire::frame::decode_record(&raw).map_err(|e| format!("{what} is damaged: {e}"))
}

/// Paces pulls to a link's `max_rate_bytes`.
#[derive(Default)]
struct Pacer {
    next: Option<Instant>,
}

impl Pacer {
    async fn wait(&self) {
        if let Some(at) = self.next {
            tokio::time::sleep_until(at.into()).await;
        }
    }

    fn spent(&mut self, bytes: u64, rate: u64) {
        if rate == 0 {
            self.next = None;
            return;
        }
        let from = self.next.map_or_else(Instant::now, |n| n.max(Instant::now()));
        self.next = Some(from + Duration::from_secs_f64(bytes as f64 / rate as f64));
    }
}

/// One shipment from the peer, from `lsn_first` on: its blocks as hashes
/// first, then only the blocks this site does not hold. If that fails
/// part way (the peer's blocks do not match, or it no longer holds them),
/// the whole shipment is fetched instead.
async fn fetch(node: &Node, client: &Client, group: &str, record: &DrRecord, lsn_first: u64) -> Result<Shipment, String> {
    let count = |what: &str, n: u64| metrics::counter!(format!("rewind_dr_{what}_total"), "group" => group.to_string()).increment(n);
    let hashed = match client.call_leader(&Request::ShipHashed { group: group.to_string(), lsn_first }).await {
        Ok(Response::ShippedHashedZstd { raw_len, data }) => {
            count("received_wire_bytes", data.len() as u64);
            decompress_record::<HashedShipment>(raw_len, &data, "a hashed shipment")?
        }
        Ok(Response::HashedShipment(h)) => *h,
        Ok(other) => return Err(format!("site {:?} answered a shipment with {other:?}", record.remote)),
        // A peer that does not know hashed shipments (an older build, in a
        // rolling upgrade) still ships whole ones.
        Err(CallError::Refused { kind: rewind_wire::rpc::ErrorKind::BadRequest, message }) => {
            tracing::warn!(group, "DR: site {:?} refused a hashed shipment ({message}); fetching it whole", record.remote);
            return fetch_whole(client, group, record, lsn_first).await;
        }
        Err(e) => return Err(call_error(&record.remote, e)),
    };
    let elided = hashed.elided.len() as u64;
    let reader = node.data_shard().map_err(|e| e.to_string())?.reader.clone();
    let owned = group.to_string();
    let filling = tokio::task::spawn_blocking(move || rewind_service::dr::fill_local(&reader, &owned, hashed))
        .await
        .map_err(|e| format!("filling a shipment: {e}"))?
        .map_err(|e| e.to_string())?;
    count("blocks_elided", elided);
    count("blocks_found_here", filling.found_here);
    count("blocks_copied", filling.copied);
    let answer = if filling.wanted.is_empty() {
        ShippedBlocks { blocks: Vec::new() }
    } else {
        count("blocks_fetched", filling.wanted.len() as u64);
        match client.call_leader(&Request::ShipBlocks { group: group.to_string(), wanted: filling.wanted.clone() }).await {
            Ok(Response::BlocksZstd { raw_len, data }) => {
                count("received_wire_bytes", data.len() as u64);
                decompress_record::<ShippedBlocks>(raw_len, &data, "shipped blocks")?
            }
            Ok(Response::Blocks(b)) => b,
            Ok(other) => return Err(format!("site {:?} answered a request for blocks with {other:?}", record.remote)),
            Err(e) => {
                tracing::warn!(group, "DR: site {:?} did not send the blocks asked for ({}); fetching the whole shipment", record.remote, call_error(&record.remote, e));
                return fetch_whole(client, group, record, lsn_first).await;
            }
        }
    };
    match filling.complete(answer) {
        Ok(s) => Ok(s),
        Err(why) => {
            tracing::warn!(group, "DR: {why}; fetching the whole shipment");
            fetch_whole(client, group, record, lsn_first).await
        }
    }
}

/// One shipment from the peer with every payload byte in it.
async fn fetch_whole(client: &Client, group: &str, record: &DrRecord, lsn_first: u64) -> Result<Shipment, String> {
    match client.call_leader(&Request::Ship { group: group.to_string(), lsn_first }).await {
        Ok(Response::ShippedZstd { raw_len, data }) => {
            metrics::counter!("rewind_dr_received_wire_bytes_total", "group" => group.to_string()).increment(data.len() as u64);
            decompress(raw_len, &data)
        }
        Ok(Response::Shipped(s)) => Ok(*s),
        Ok(other) => Err(format!("site {:?} answered a shipment with {other:?}", record.remote)),
        Err(e) => Err(call_error(&record.remote, e)),
    }
}

/// Commits a shipment here; while it commits, fetches the next one when
/// the peer has more (kept in `ahead` for the next round).
async fn commit(
    node: &Node,
    client: &Client,
    group: &str,
    record: &DrRecord,
    shipment: Shipment,
    pacer: &mut Pacer,
    ahead: &mut Option<(u64, Shipment)>,
) -> Result<bool, String> {
    if shipment.events.is_empty() {
        return Ok(false);
    }
    let count = shipment.events.len() as u64;
    let bytes: u64 = shipment.events.iter().map(|e| e.event.payload_bytes() as u64).sum();
    let last = shipment.events.last().map_or(0, |e| e.lsn);
    let more = shipment.last_lsn > last;
    pacer.spent(bytes, record.max_rate_bytes);
    let replicate = write(node, Command::Replicate { group: group.to_string(), epoch: record.epoch, events: shipment.events, digest: shipment.digest });
    let pacer = &*pacer;
    let next = async {
        if !more {
            return None;
        }
        pacer.wait().await;
        fetch(node, client, group, record, last + 1).await.ok()
    };
    let (reply, next) = tokio::join!(replicate, next);
    match reply? {
        CommandReply::Appended { .. } => {
            metrics::counter!("rewind_dr_shipped_events_total", "group" => group.to_string()).increment(count);
            metrics::counter!("rewind_dr_shipped_bytes_total", "group" => group.to_string()).increment(bytes);
            *ahead = next.map(|s| (last + 1, s));
            Ok(more)
        }
        other => Err(format!("replicate answered {other:?}")),
    }
}

async fn write(node: &Node, command: Command) -> Result<CommandReply, String> {
    let shard = node.data_shard().map_err(|e| e.to_string())?;
    match shard.raft.client_write(command).await {
        Ok(r) => match r.data {
            CommandReply::Refused { reason } => Err(reason),
            other => Ok(other),
        },
        Err(e) => Err(shard.write_error(e).to_string()),
    }
}

async fn local_state(node: &Node, group: &str) -> Result<DrInfo, String> {
    let shard = node.data_shard().map_err(|e| e.to_string())?;
    match shard.handle(Request::DrState { group: group.to_string(), digest_at: None }).await {
        Response::Dr(info) => Ok(*info),
        Response::Error(e) => Err(e.message),
        other => Err(format!("DR state answered {other:?}")),
    }
}

/// The lag of the secondary behind the primary, from both heads: LSNs,
/// payload bytes and seconds of event time not yet at the secondary (all
/// of the primary's history when the secondary holds nothing yet).
pub fn lag(primary: &DrInfo, secondary: (u64, u64, u64)) -> (u64, u64, f64) {
    let (p_lsn, p_time, p_bytes) = (primary.last_lsn, primary.last_time_ns, primary.payload_bytes);
    let (s_lsn, s_time, s_bytes) = secondary;
    if p_lsn <= s_lsn {
        return (0, 0, 0.0);
    }
    let since = if s_lsn == 0 { primary.first_time_ns } else { s_time };
    (p_lsn - s_lsn, p_bytes.saturating_sub(s_bytes), p_time.saturating_sub(since) as f64 / 1e9)
}

fn publish(group: &str, record: &DrRecord, mine: &DrInfo, theirs: &DrInfo) {
    let head = |i: &DrInfo| (i.last_lsn, i.last_time_ns, i.payload_bytes);
    let (lsns, bytes, secs) = if record.is_primary() { lag(mine, head(theirs)) } else { lag(theirs, head(mine)) };
    let g = group.to_string();
    metrics::gauge!("rewind_dr_lag_lsn", "group" => g.clone()).set(lsns as f64);
    metrics::gauge!("rewind_dr_lag_bytes", "group" => g.clone()).set(bytes as f64);
    metrics::gauge!("rewind_dr_lag_seconds", "group" => g.clone()).set(secs);
    metrics::gauge!("rewind_dr_epoch", "group" => g.clone()).set(record.epoch as f64);
    metrics::gauge!("rewind_dr_is_primary", "group" => g.clone()).set(if record.is_primary() { 1.0 } else { 0.0 });
    let alarm = record.rpo_alarm_ms > 0 && secs * 1000.0 > record.rpo_alarm_ms as f64;
    metrics::gauge!("rewind_dr_rpo_alarm", "group" => g).set(if alarm { 1.0 } else { 0.0 });
}

/// Failback's first step, on this site's leader: the last LSN this site
/// and the other share with the same chain digest, found by bisection
/// over the other site's digests.
pub async fn fork_point(node: &Node, group: &str) -> Result<Response, rewind_service::ServiceError> {
    use rewind_service::ServiceError;
    let shard = node.data_shard()?;
    shard.leader_read(true).await?;
    let record = shard.reader.dr(group).map_err(|e| ServiceError::Internal(e.to_string()))?;
    let record = record.ok_or_else(|| ServiceError::Refused(format!("group {group:?} is not linked to another site")))?;
    let mine = local_state(node, group).await.map_err(ServiceError::Refused)?;
    let client = peer_client(&node.dr_dir.join(group).join("failback"), &record.link).map_err(|e| ServiceError::Internal(format!("{e:#}")))?;
    let unreachable = |e: anyhow::Error| ServiceError::Unavailable(format!("site {:?}: {e:#}", record.remote));
    let theirs = state(&client, group, None).await.map_err(unreachable)?;
    let mut search = rewind_service::dr::ForkSearch::new(mine.last_lsn.min(theirs.last_lsn));
    while let Some(lsn) = search.probe() {
        let there = state(&client, group, Some(lsn)).await.map_err(unreachable)?.digest_at_hex;
        let here = shard.reader.digest_at(group, lsn).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let here = here.map(|d| blake3::Hash::from_bytes(d).to_hex().to_string());
        search.answer(lsn, there.is_some() && there == here);
    }
    Ok(Response::ForkPoint { lsn: search.fork(), here_last: mine.last_lsn, there_last: theirs.last_lsn, epoch: record.epoch })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_wire::event::{Event, LoggedEvent};

    #[test]
    fn shipments_travel_compressed_and_garbage_is_refused() {
        let events = (1..=50u64).map(|lsn| LoggedEvent { lsn, time_ns: lsn, event: Event::Write { disk: "d0".into(), offset: lsn * 4096, data: vec![lsn as u8; 4096] } }).collect();
        let s = Shipment { events, digest: [7; 32], epoch: 3, primary: "a".into(), last_lsn: 90 };
        let Response::ShippedZstd { raw_len, data } = compress(&s) else { panic!("not compressed") };
        assert!(data.len() * 10 < raw_len as usize, "{} of {raw_len}", data.len());
        assert_eq!(decompress(raw_len, &data).unwrap(), s);
        assert!(decompress(raw_len, &data[..data.len() / 2]).is_err());
        assert!(decompress(raw_len - 1, &data).is_err());
        assert!(decompress(u64::MAX, &data).unwrap_err().contains("over the limit"));
        let mut flipped = data.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        assert!(decompress(raw_len, &flipped).is_err());
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..200).map(|i: u8| i.wrapping_mul(n).wrapping_add(n)).collect();
            assert!(decompress(4096, &junk).is_err());
        }
    }

    #[test]
    fn the_pacer_spreads_pulls_over_the_rate() {
        let mut p = Pacer::default();
        p.spent(10 << 20, 0);
        assert!(p.next.is_none(), "no cap, no wait");
        let start = Instant::now();
        p.spent(5 << 20, 10 << 20);
        p.spent(5 << 20, 10 << 20);
        let wait = p.next.unwrap() - start;
        assert!(wait >= Duration::from_millis(990) && wait < Duration::from_millis(1100), "{wait:?}");
    }
}
