//! The checkers run at the end of every seed, on the state machines of the
//! members that are up once every node has caught up.

use openraft::EntryPayload;
use rewind_wire::event::Event;

use crate::rng::Rng;
use crate::model::{read_tag, History, DISKS, DISK_BYTES, GROUP, PINNED};
use crate::world;
use crate::sm::SmImage;
use crate::Entry;

/// A digest of an entry: its log id and payload.
pub fn entry_digest(e: &Entry) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(format!("{:?}", e.log_id).as_bytes());
    match &e.payload {
        EntryPayload::Blank => {
            h.update(b"blank");
        }
        EntryPayload::Normal(c) => {
            let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(c).expect("a command encodes");
            h.update(&bytes);
        }
        EntryPayload::Membership(m) => {
            h.update(format!("{m:?}").as_bytes());
        }
    }
    *h.finalize().as_bytes()
}

/// A disk as a byte vector that applies events one after another.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn apply(&mut self, disk: &str, event: &Event) {
        match event {
            Event::Write { disk: d, offset, data } if d == disk => {
                self.bytes[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            Event::WriteZeroes { disk: d, offset, len } | Event::Trim { disk: d, offset, len } if d == disk => {
                self.bytes[*offset as usize..(*offset + *len) as usize].fill(0);
            }
            _ => {}
        }
    }
}

pub fn check(history: &History, images: &[(u64, SmImage)], rng: &mut Rng) -> Vec<String> {
    let mut failures = Vec::new();
    let Some((ref_id, reference)) = images.iter().max_by_key(|(_, i)| i.groups.get(GROUP).map_or(0, |g| g.last_lsn)) else {
        return vec!["no member is up at the end".into()];
    };
    let Some(group) = reference.groups.get(GROUP) else {
        return vec![format!("n{ref_id} has no group {GROUP}")];
    };
    let events = reference.events.get(GROUP).cloned().unwrap_or_default();

    failures.extend(replicas_agree(GROUP, images));

    // The log is a sequence of whole batches that clients sent, each once.
    let mut at = std::collections::BTreeMap::new();
    let mut pos = 0usize;
    while pos < events.len() {
        let lsn = events[pos].lsn;
        if lsn != pos as u64 + 1 {
            failures.push(format!("LSN {lsn} at position {pos}: LSNs are not dense"));
            break;
        }
        // The harness's own events: the final marker, the retention
        // policy, and the pinned bookmark.
        let admin = match &events[pos].event {
            Event::Bookmark { name, .. } => name == "end" || name == PINNED,
            e => e.is_policy(),
        };
        if admin {
            pos += 1;
            continue;
        }
        let Some(key) = read_tag(&events[pos].event) else {
            failures.push(format!("phantom event at LSN {lsn}: it starts no batch a client sent: {:?}", short(&events[pos].event)));
            break;
        };
        let Some(sent) = history.submitted.get(&key) else {
            failures.push(format!("phantom batch at LSN {lsn}: client {} never sent seq {}", key.0, key.1));
            break;
        };
        let logged: Vec<&Event> = events[pos..(pos + sent.len()).min(events.len())].iter().map(|e| &e.event).collect();
        if logged.len() != sent.len() || logged.iter().zip(sent).any(|(a, b)| *a != b) {
            failures.push(format!("the batch of client {} seq {} at LSN {lsn} is not what the client sent", key.0, key.1));
            break;
        }
        if at.insert(key, lsn).is_some() {
            failures.push(format!("duplicate: client {} seq {} is in the log twice (again at LSN {lsn})", key.0, key.1));
        }
        pos += sent.len();
    }

    // Every acknowledged batch is there, where the acknowledgement said.
    for (client, seq, first, last) in &history.acked {
        match at.get(&(*client, *seq)) {
            None => failures.push(format!("acknowledged write lost: client {client} seq {seq} (LSN {first}..={last}) is not in the log")),
            Some(l) if *first != 0 && (*l != *first || last - first + 1 != history.submitted[&(*client, *seq)].len() as u64) => {
                failures.push(format!("client {client} seq {seq} was acknowledged at LSN {first}..={last} but is at LSN {l}"))
            }
            _ => {}
        }
    }

    // Event times never go backwards, whatever the clients' clocks did.
    if let Some(w) = events.windows(2).find(|w| w[1].time_ns < w[0].time_ns) {
        failures.push(format!("event time goes backwards at LSN {}", w[1].lsn));
    }

    // Replay at acknowledged LSNs equals the byte model, on two replicas.
    let mut points: Vec<u64> = history.acked.iter().map(|a| a.3).filter(|l| *l > 0).collect();
    points.push(group.last_lsn);
    let mut chosen: Vec<u64> = (0..4).filter_map(|_| points.get(rng.range(0, points.len() as u64) as usize).copied()).collect();
    chosen.push(group.last_lsn);
    let other = &images[rng.range(0, images.len() as u64) as usize];
    // With retention, only the points both replicas keep: and always the
    // window's start and the pinned points, where the collector's mistakes
    // would show.
    let kept = |lsn: u64| [reference, &other.1].iter().all(|i| i.retention.get(GROUP).is_none_or(|r| r.keeps(lsn)));
    if let Some(r) = reference.retention.get(GROUP) {
        chosen.push(r.first());
        chosen.extend(r.pins.iter().map(|p| p.lsn));
        if r.first() > 1 {
            world::trace(format!("retention: window LSN {}..={} ({} bytes), pins {:?}", r.first(), group.last_lsn, r.window_bytes(group), r.pinned_points()));
        }
        if reference.gc.get(GROUP).is_some_and(|g| g.collected_to() > 1) {
            world::count("retention: history freed by the collector");
        }
        if !r.pinned_points().is_empty() {
            world::count("retention: a pinned point behind the window");
        }
    }
    chosen.retain(|l| *l <= group.last_lsn && kept(*l));
    chosen.sort_unstable();
    chosen.dedup();
    for disk in DISKS {
        let mut model = Model { bytes: vec![0; DISK_BYTES as usize] };
        let mut applied = 0u64;
        for &lsn in &chosen {
            for e in &events[applied as usize..lsn as usize] {
                model.apply(disk, &e.event);
            }
            applied = lsn;
            for (id, image) in [(ref_id, reference), (&other.0, &other.1)] {
                for b in 0..DISK_BYTES / 4096 {
                    match image.block_at(GROUP, disk, b, lsn) {
                        Ok(got) if got[..] == model.bytes[(b * 4096) as usize..((b + 1) * 4096) as usize] => {}
                        Ok(_) => {
                            failures.push(format!("replay of {disk} at LSN {lsn} on n{id}: block {b} differs from the model"));
                            break;
                        }
                        Err(e) => {
                            failures.push(format!("replay of {disk} at LSN {lsn} on n{id}: block {b} cannot be read: {e}"));
                            break;
                        }
                    }
                }
            }
        }
    }
    failures.extend(replays(history, &events));
    failures
}

/// Replays read over the network during the faults equal the byte model
/// at their LSNs, block by block.
fn replays(history: &History, events: &[rewind_wire::event::LoggedEvent]) -> Vec<String> {
    let mut failures = Vec::new();
    for disk in DISKS {
        let mut done: Vec<&crate::replay::Replayed> = history.replays.iter().filter(|r| r.disk == disk).collect();
        done.sort_by_key(|r| r.lsn);
        let mut model = Model { bytes: vec![0; DISK_BYTES as usize] };
        let mut applied = 0u64;
        for r in done {
            if r.lsn as usize > events.len() {
                failures.push(format!("a replay of {disk} at LSN {} from n{} is past the log's end ({})", r.lsn, r.node, events.len()));
                continue;
            }
            for e in &events[applied as usize..r.lsn as usize] {
                model.apply(disk, &e.event);
            }
            applied = r.lsn;
            let want = crate::replay::block_digests(&model.bytes);
            if let Some(b) = (0..want.len()).find(|b| want[*b] != r.blocks[*b]) {
                failures.push(format!("replay of {disk} at LSN {} from n{} during the faults: block {b} differs from the model", r.lsn, r.node));
            }
        }
    }
    failures
}

/// Every member holds the same events of `group` in the same order: the
/// same last LSN and hash chain.
pub fn replicas_agree(group: &str, images: &[(u64, SmImage)]) -> Vec<String> {
    let mut failures = Vec::new();
    let Some((ref_id, reference)) = images.iter().max_by_key(|(_, i)| i.groups.get(group).map_or(0, |g| g.last_lsn)) else {
        return failures;
    };
    let Some(want) = reference.groups.get(group) else {
        return vec![format!("n{ref_id} has no group {group}")];
    };
    for (id, image) in images {
        match image.groups.get(group) {
            Some(g) if g.digest == want.digest && g.last_lsn == want.last_lsn => {
                // The window moves deterministically: equal logs, equal windows.
                if image.retention.get(group) != reference.retention.get(group) {
                    failures.push(format!("group {group}: n{id} and n{ref_id} hold the same log but different retention windows"));
                }
            }
            Some(g) => failures.push(format!(
                "group {group}: n{id} differs from n{ref_id}: LSN {} vs {}, digests {} vs {}",
                g.last_lsn,
                want.last_lsn,
                hex(&g.digest[..8]),
                hex(&want.digest[..8])
            )),
            None => failures.push(format!("n{id} has no group {group}")),
        }
    }
    failures
}

fn short(e: &Event) -> String {
    let s = format!("{e:?}");
    s.chars().take(80).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
