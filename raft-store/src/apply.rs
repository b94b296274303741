//! The state machine's pure core: what applying one command does to a
//! consistency group, with no I/O. The RocksDB adapter in `sm.rs` loads the
//! records this needs, calls it, and writes what it returns.

use rewind_wire::event::{check_disk_geometry, seq_epoch, seq_in_epoch, seq_number, Event, EventBatch};
use rewind_wire::limits::{GROUP_DISKS_MAX, PRODUCER_WINDOW_MAX, REASON_BYTES_MAX};
use rewind_wire::raft::CommandReply;
use rewind_wire::rpc::DiskSpec;
use rkyv::{Archive, Deserialize, Serialize};

/// A consistency group's durable state.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub name: String,
    pub disks: Vec<DiskSpec>,
    /// LSN of the newest event; 0 when the group has none.
    pub last_lsn: u64,
    /// Event time of the newest event; event times never go backwards.
    pub last_time_ns: u64,
    /// blake3 chain over every event in LSN order.
    pub digest: [u8; 32],
    pub events: u64,
    pub payload_bytes: u64,
}

/// A branch: the events a site held after a fork point when it failed
/// back, kept read-only under their own group name. Blocks and events up
/// to `base_lsn` are read from `base`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BranchRecord {
    pub base: String,
    pub base_lsn: u64,
    /// The epoch the site was in when it made the branch.
    pub epoch: u64,
}

/// What one producer (client id) has had applied in one group: its last
/// sequence number and the replies to its most recent sequences, so that a
/// batch resent after a leader change gets its first answer again.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct ProducerRecord {
    pub last_seq: u64,
    /// (sequence, reply), oldest first, at most `PRODUCER_WINDOW_MAX`.
    pub recent: Vec<(u64, CommandReply)>,
}

impl ProducerRecord {
    fn remember(&mut self, seq: u64, reply: &CommandReply) {
        self.last_seq = seq;
        let reply = match reply {
            CommandReply::Refused { reason } if reason.len() > REASON_BYTES_MAX => {
                let mut cut = REASON_BYTES_MAX;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                CommandReply::Refused { reason: reason[..cut].to_string() }
            }
            other => other.clone(),
        };
        self.recent.push((seq, reply));
        if self.recent.len() > PRODUCER_WINDOW_MAX {
            self.recent.remove(0);
        }
    }
}

pub use rewind_wire::event::LoggedEvent as StoredEvent;

pub use crate::dr::{apply_replicated, check_not_branch, check_writable, dr_set, fork_check};

/// The outcome of applying one batch.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The batch took the producer's next sequence number: `events` (new, in
    /// LSN order, each with its encoded record; empty when the batch was
    /// refused) and the producer record to store.
    Sequenced { events: Vec<(StoredEvent, Vec<u8>)>, producer: ProducerRecord },
    /// A resend of a recent batch, or a sequence number out of order:
    /// nothing changes.
    Unchanged,
}

impl GroupRecord {
    pub fn new(name: &str, disks: &[DiskSpec]) -> GroupRecord {
        GroupRecord {
            name: name.to_string(),
            disks: disks.to_vec(),
            last_lsn: 0,
            last_time_ns: 0,
            digest: [0; 32],
            events: 0,
            payload_bytes: 0,
        }
    }

    fn disk(&self, name: &str) -> Option<&DiskSpec> {
        self.disks.iter().find(|d| d.name == name)
    }

    /// Checks an event against the group's disks. Deterministic: every
    /// replica refuses the same events.
    fn check_event(&self, event: &Event) -> Result<(), String> {
        event.check().map_err(|e| e.to_string())?;
        let range = |disk: &str, offset: u64, len: u64| -> Result<(), String> {
            let spec = self.disk(disk).ok_or_else(|| format!("group {} has no disk {disk:?}", self.name))?;
            let end = offset.checked_add(len).ok_or_else(|| "offset + length overflows".to_string())?;
            if end > spec.size_bytes {
                return Err(format!(
                    "range {offset}..{end} is past the end of disk {disk:?} ({} bytes)",
                    spec.size_bytes
                ));
            }
            Ok(())
        };
        match event {
            Event::Write { disk, offset, data } => range(disk, *offset, data.len() as u64),
            Event::WriteZeroes { disk, offset, len } | Event::Trim { disk, offset, len } => range(disk, *offset, *len),
            Event::DiskCreate { disk, .. } if self.disk(disk).is_some() => {
                Err(format!("group {} already has disk {disk:?}", self.name))
            }
            Event::DiskCreate { .. } if self.disks.len() >= GROUP_DISKS_MAX => {
                Err(format!("group {} already holds {GROUP_DISKS_MAX} disks, the most a group holds", self.name))
            }
            Event::DiskResize { disk, size_bytes } => {
                let spec = self.disk(disk).ok_or_else(|| format!("group {} has no disk {disk:?}", self.name))?;
                check_disk_geometry(*size_bytes, spec.sector_bytes).map_err(|e| e.to_string())
            }
            Event::BackupBegin { disk, .. } => {
                self.disk(disk).map(|_| ()).ok_or_else(|| format!("group {} has no disk {disk:?}", self.name))
            }
            Event::Copy { disk, block_first, from_disk, from } => {
                let blocks_of = |d: &str| -> Result<u64, String> {
                    let spec = self.disk(d).ok_or_else(|| format!("group {} has no disk {d:?}", self.name))?;
                    Ok(spec.size_bytes.div_ceil(crate::blocks::BLOCK_BYTES))
                };
                let n = (from.len() / 2) as u64;
                if block_first.checked_add(n).is_none_or(|end| end > blocks_of(disk).unwrap_or(0)) {
                    blocks_of(disk)?;
                    return Err(format!("a copy to blocks {block_first}..+{n} runs past the end of disk {disk:?}"));
                }
                let from_blocks = blocks_of(from_disk)?;
                for pair in from.chunks(2) {
                    if pair[0] >= from_blocks {
                        return Err(format!("a copy from block {} is past the end of disk {from_disk:?}", pair[0]));
                    }
                    if pair[1] == 0 || pair[1] > self.last_lsn {
                        return Err(format!("a copy from LSN {}, outside the log of group {} (LSN 1..={})", pair[1], self.name, self.last_lsn));
                    }
                }
                Ok(())
            }
            Event::Revert { disk, to_lsn, block_end, .. } => {
                let spec = self.disk(disk).ok_or_else(|| format!("group {} has no disk {disk:?}", self.name))?;
                if *to_lsn > self.last_lsn {
                    return Err(format!("revert to LSN {to_lsn}, beyond the log of group {} (LSN {})", self.name, self.last_lsn));
                }
                if *block_end > spec.size_bytes.div_ceil(crate::blocks::BLOCK_BYTES) {
                    return Err(format!("revert up to block {block_end} is past the end of disk {disk:?} ({} bytes)", spec.size_bytes));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// As [`GroupRecord::check_event`], for an event the primary site
    /// committed already: a DiskCreate of a disk the secondary was created
    /// with is its own creation again.
    pub(crate) fn check_replicated(&self, event: &Event) -> Result<(), String> {
        match event {
            Event::DiskCreate { disk, size_bytes, sector_bytes } => match self.disk(disk) {
                Some(d) if d.sector_bytes == *sector_bytes && d.size_bytes >= *size_bytes => Ok(()),
                Some(d) => Err(format!("disk {disk:?} is {} bytes of {}-byte sectors here, {size_bytes} of {sector_bytes} at the primary", d.size_bytes, d.sector_bytes)),
                None => self.check_event(event),
            },
            _ => self.check_event(event),
        }
    }

    pub(crate) fn absorb(&mut self, event: &Event) {
        match event {
            // A secondary's group is created with the primary's disks, so a
            // replicated DiskCreate may name a disk it has already.
            Event::DiskCreate { disk, .. } if self.disk(disk).is_some() => {}
            Event::DiskCreate { disk, size_bytes, sector_bytes } => self.disks.push(DiskSpec {
                name: disk.clone(),
                size_bytes: *size_bytes,
                sector_bytes: *sector_bytes,
            }),
            Event::DiskResize { disk, size_bytes } => {
                if let Some(spec) = self.disks.iter_mut().find(|d| &d.name == disk) {
                    spec.size_bytes = *size_bytes;
                }
            }
            _ => {}
        }
    }
}

/// Checks a `CreateGroup` command (`exists`: a group of that name is
/// already there) and gives the new group's record, or the refusal.
pub fn create_group(exists: bool, group: &str, disks: &[DiskSpec]) -> Result<GroupRecord, String> {
    if exists {
        return Err(format!("group {group:?} already exists"));
    }
    rewind_wire::event::check_name(group).map_err(|e| e.to_string())?;
    if disks.len() > GROUP_DISKS_MAX {
        return Err(rewind_wire::event::InvalidInput::TooManyDisks { count: disks.len() }.to_string());
    }
    for (i, d) in disks.iter().enumerate() {
        if disks[..i].iter().any(|e| e.name == d.name) {
            return Err(format!("disk {:?} is named twice", d.name));
        }
        rewind_wire::event::check_name(&d.name)
            .and_then(|_| rewind_wire::event::check_disk_geometry(d.size_bytes, d.sector_bytes))
            .map_err(|e| format!("disk {:?}: {e}", d.name))?;
    }
    Ok(GroupRecord::new(group, disks))
}

/// The next link of a group's hash chain. A record starts with the blake3
/// checksum of the rest of it, so chaining over that prefix covers every
/// byte of the event without hashing the payload a second time.
pub fn chain(prev: &[u8; 32], record: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(prev);
    hasher.update(&record[..rewind_wire::frame::RECORD_CHECKSUM_BYTES.min(record.len())]);
    *hasher.finalize().as_bytes()
}

/// Applies one batch to a group. `producer` is the producer's record in
/// this group. Batches of one producer apply in sequence order: the next
/// sequence is applied (or refused, which still uses up its number); a
/// recent one gets its first reply again; a gap is answered `OutOfOrder`.
/// Number 1 of a newer epoch is the next sequence whatever came before
/// (a restarted producer's fence); from then on a batch of an older epoch
/// is refused as fenced (see [`EventBatch`]).
/// On `Sequenced`, `group` has been advanced if events were appended;
/// otherwise it is unchanged. Returns the reply the client gets.
pub fn apply_batch(
    group: &mut GroupRecord,
    producer: Option<ProducerRecord>,
    batch: &EventBatch,
    policy: &mut Policy,
) -> (BatchOutcome, CommandReply) {
    let mut producer = producer.unwrap_or_default();
    let (epoch, last_epoch) = (seq_epoch(batch.seq), seq_epoch(producer.last_seq));
    let opens_epoch = epoch > last_epoch && seq_number(batch.seq) == 1;
    if batch.seq <= producer.last_seq {
        let reply = match producer.recent.iter().find(|(s, _)| *s == batch.seq) {
            Some((_, reply)) => reply.clone(),
            None if epoch < last_epoch => CommandReply::Refused {
                reason: format!(
                    "client {} sequence {} is fenced: epoch {last_epoch} of that client has started (a restarted producer); epoch {epoch} takes no more batches",
                    batch.client_id,
                    seq_number(batch.seq)
                ),
            },
            None => CommandReply::Refused {
                reason: format!(
                    "client {} sequence {} is older than the {} replies kept (last applied {})",
                    batch.client_id, batch.seq, PRODUCER_WINDOW_MAX, producer.last_seq
                ),
            },
        };
        return (BatchOutcome::Unchanged, reply);
    }
    if !opens_epoch && batch.seq > producer.last_seq + 1 {
        let expected_seq = if epoch > last_epoch { seq_in_epoch(epoch, 1) } else { producer.last_seq + 1 };
        return (BatchOutcome::Unchanged, CommandReply::OutOfOrder { expected_seq });
    }
    let (events, reply) = match sequence_events(group, batch, policy) {
        Ok((next, events)) => {
            let reply = CommandReply::Appended { lsn_first: group.last_lsn + 1, lsn_last: next.last_lsn };
            *group = next;
            (events, reply)
        }
        Err(reason) => (Vec::new(), CommandReply::Refused { reason }),
    };
    producer.remember(batch.seq, &reply);
    (BatchOutcome::Sequenced { events, producer }, reply)
}

/// Checks every event of a batch against the group as it will be when that
/// event applies (a batch may create a disk and then write to it), and gives
/// them LSNs, times and digests. Returns the advanced group and the records.
#[allow(clippy::type_complexity)]
fn sequence_events(group: &GroupRecord, batch: &EventBatch, policy: &mut Policy) -> Result<(GroupRecord, Vec<(StoredEvent, Vec<u8>)>), String> {
    batch.check().map_err(|e| e.to_string())?;
    let mut next = group.clone();
    let mut retention = policy.retention.clone();
    let mut marks = policy.marks.clone();
    let mut backups = policy.backups.clone();
    let mut events = Vec::with_capacity(batch.events.len());
    for timed in &batch.events {
        next.check_event(&timed.event)?;
        next.absorb(&timed.event);
        next.last_lsn += 1;
        next.last_time_ns = next.last_time_ns.max(timed.time_ns);
        crate::backups::apply_event(&mut backups, &group.name, Some(batch.client_id), next.last_lsn, next.last_time_ns, &timed.event)?;
        check_copy_window(&retention, &group.name, &timed.event)?;
        match &timed.event {
            Event::Bookmark { name, .. } => {
                marks.insert(name.clone(), next.last_lsn);
            }
            e if e.is_policy() => crate::retention::apply_policy(&mut retention, &group.name, e, next.last_time_ns, &marks)?,
            _ => {}
        }
        let stored = StoredEvent { lsn: next.last_lsn, time_ns: next.last_time_ns, event: timed.event.clone() };
        let record = rewind_wire::frame::encode_record(&stored).expect("an event within limits always encodes");
        next.digest = chain(&next.digest, &record);
        next.events += 1;
        next.payload_bytes += timed.event.payload_bytes() as u64;
        events.push((stored, record));
    }
    policy.retention = retention;
    policy.backups = backups;
    Ok((next, events))
}

/// A copy reads only points inside the window: those every replica still
/// holds alike (a collector frees only what lies before it).
pub(crate) fn check_copy_window(r: &crate::retention::RetentionRecord, group: &str, event: &Event) -> Result<(), String> {
    if let Event::Copy { from, .. } = event {
        let first = r.first();
        if let Some(l) = from.chunks(2).map(|p| p[1]).find(|l| *l < first) {
            return Err(format!("a copy from LSN {l}, before the window of group {group} (LSN {first} on)"));
        }
    }
    Ok(())
}

/// What a batch's policy events (retention, lock, pin) check against and
/// change: the group's retention record, and its bookmarks by name (the
/// newest LSN of each name a pin in the batch may name).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub retention: crate::retention::RetentionRecord,
    pub marks: std::collections::BTreeMap<String, u64>,
    /// The group's open backups and those the batch names.
    pub backups: crate::backups::Backups,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_wire::dr::DrRecord;
    use proptest::prelude::*;
    use rewind_wire::event::TimedEvent;

    fn group() -> GroupRecord {
        GroupRecord::new("cg", &[DiskSpec { name: "d0".into(), size_bytes: 1 << 20, sector_bytes: 512 }])
    }

    fn write(offset: u64, len: usize, time_ns: u64) -> TimedEvent {
        TimedEvent { time_ns, event: Event::Write { disk: "d0".into(), offset, data: vec![1; len] } }
    }

    fn batch(seq: u64, events: Vec<TimedEvent>) -> EventBatch {
        EventBatch { group: "cg".into(), client_id: 9, seq, events }
    }

    fn check(
        producer: Option<ProducerRecord>,
        b: EventBatch,
        expected_reply: impl Fn(&CommandReply) -> bool,
        expected_last_lsn: u64,
    ) {
        let mut g = group();
        let (_, reply) = apply_batch(&mut g, producer, &b, &mut Policy::default());
        assert!(expected_reply(&reply), "{reply:?}");
        assert_eq!(g.last_lsn, expected_last_lsn);
    }

    fn last(seq: u64, first: u64, last: u64) -> ProducerRecord {
        let mut p = ProducerRecord::default();
        p.remember(seq, &CommandReply::Appended { lsn_first: first, lsn_last: last });
        p
    }

    #[test]
    fn groups_refuse_more_disks_than_the_limit_and_a_name_twice() {
        let disk = |i: usize| DiskSpec { name: format!("d{i}"), size_bytes: 4096, sector_bytes: 512 };
        let most: Vec<DiskSpec> = (0..GROUP_DISKS_MAX).map(disk).collect();
        let full = create_group(false, "g", &most).unwrap();
        let too_many: Vec<DiskSpec> = (0..=GROUP_DISKS_MAX).map(disk).collect();
        assert!(create_group(false, "g", &too_many).unwrap_err().contains("at most 256 disks"));
        assert!(create_group(false, "g", &[disk(1), disk(2), disk(1)]).unwrap_err().contains("\"d1\" is named twice"));
        // A DiskCreate event past the limit is refused too.
        let mut g = full;
        let create = TimedEvent { time_ns: 1, event: Event::DiskCreate { disk: "extra".into(), size_bytes: 4096, sector_bytes: 512 } };
        let b = EventBatch { group: "g".into(), client_id: 9, seq: 1, events: vec![create] };
        let (_, reply) = apply_batch(&mut g, None, &b, &mut Policy::default());
        assert!(matches!(&reply, CommandReply::Refused { reason } if reason.contains("the most a group holds")), "{reply:?}");
    }

    #[test]
    fn cases() {
        let appended = |f, l| move |r: &CommandReply| *r == CommandReply::Appended { lsn_first: f, lsn_last: l };
        let refused = |r: &CommandReply| matches!(r, CommandReply::Refused { .. });
        check(None, batch(1, vec![write(0, 512, 1), write(512, 512, 2)]), appended(1, 2), 2);
        // Past the end of the disk, and a disk that does not exist.
        check(None, batch(1, vec![write(0, 512, 1), write((1 << 20) - 511, 512, 2)]), refused, 0);
        let other = TimedEvent { time_ns: 1, event: Event::Trim { disk: "nope".into(), offset: 0, len: 1 } };
        check(None, batch(1, vec![other]), refused, 0);
        // A resend of a recent batch gets the same answer and changes nothing.
        check(Some(last(5, 10, 12)), batch(5, vec![write(0, 512, 1)]), appended(10, 12), 0);
        check(Some(last(5, 10, 12)), batch(4, vec![write(0, 512, 1)]), refused, 0);
        check(Some(last(5, 10, 12)), batch(6, vec![write(0, 512, 1)]), appended(1, 1), 1);
        // A gap is out of order: resend from the expected sequence.
        let gap = |r: &CommandReply| *r == CommandReply::OutOfOrder { expected_seq: 6 };
        check(Some(last(5, 10, 12)), batch(7, vec![write(0, 512, 1)]), gap, 0);
        check(None, batch(2, vec![write(0, 512, 1)]), |r| *r == CommandReply::OutOfOrder { expected_seq: 1 }, 0);
        // A batch may create a disk and write to it.
        let create = TimedEvent {
            time_ns: 1,
            event: Event::DiskCreate { disk: "d1".into(), size_bytes: 4096, sector_bytes: 512 },
        };
        let w1 = TimedEvent { time_ns: 2, event: Event::Write { disk: "d1".into(), offset: 0, data: vec![2; 4096] } };
        check(None, batch(1, vec![create, w1]), appended(1, 2), 2);
    }

    #[test]
    fn a_new_epoch_fences_the_older_ones() {
        let mut g = group();
        let w = |off| vec![write(off, 512, 1)];
        let e0 = |n| seq_in_epoch(0, n);
        let e1 = |n| seq_in_epoch(1, n);
        let mut p = None;
        let step = |g: &mut GroupRecord, p: &mut Option<ProducerRecord>, seq: u64, off: u64| {
            let (outcome, reply) = apply_batch(g, p.clone(), &batch(seq, w(off)), &mut Policy::default());
            if let BatchOutcome::Sequenced { producer, .. } = outcome {
                *p = Some(producer);
            }
            reply
        };
        assert_eq!(step(&mut g, &mut p, e0(1), 0), CommandReply::Appended { lsn_first: 1, lsn_last: 1 });
        assert_eq!(step(&mut g, &mut p, e0(2), 512), CommandReply::Appended { lsn_first: 2, lsn_last: 2 });
        // A later epoch's number 2 before its number 1: out of order, resend from 1.
        assert_eq!(step(&mut g, &mut p, e1(2), 0), CommandReply::OutOfOrder { expected_seq: e1(1) });
        // Number 1 of epoch 1 opens it, although epoch 0 was at 2.
        assert_eq!(step(&mut g, &mut p, e1(1), 1024), CommandReply::Appended { lsn_first: 3, lsn_last: 3 });
        // Epoch 0's next batch, still on the wire from the dead process: fenced.
        let fenced = step(&mut g, &mut p, e0(3), 1536);
        assert!(matches!(&fenced, CommandReply::Refused { reason } if reason.contains("fenced")), "{fenced:?}");
        assert_eq!(g.last_lsn, 3);
        // A resend of a batch epoch 0 did get applied still gets its answer.
        assert_eq!(step(&mut g, &mut p, e0(2), 512), CommandReply::Appended { lsn_first: 2, lsn_last: 2 });
        // Epoch 1 goes on; a skipped epoch (a process that died before
        // sending anything) opens just the same.
        assert_eq!(step(&mut g, &mut p, e1(2), 0), CommandReply::Appended { lsn_first: 4, lsn_last: 4 });
        assert_eq!(step(&mut g, &mut p, seq_in_epoch(3, 1), 0), CommandReply::Appended { lsn_first: 5, lsn_last: 5 });
        assert_eq!(step(&mut g, &mut p, e1(3), 0), fenced_like());
        // A fresh producer may start in any epoch.
        let (_, reply) = apply_batch(&mut g, None, &batch(seq_in_epoch(7, 1), w(0)), &mut Policy::default());
        assert_eq!(reply, CommandReply::Appended { lsn_first: 6, lsn_last: 6 });
    }

    fn link(local: &str, primary: &str, epoch: u64) -> DrRecord {
        DrRecord {
            local: local.into(),
            remote: if local == "a" { "b".into() } else { "a".into() },
            primary: primary.into(),
            epoch,
            rpo_alarm_ms: 0, max_rate_bytes: 0,
            link: rewind_wire::dr::SiteLink { addrs: vec!["127.0.0.1:1".into()], ca_pem: String::new(), cert_pem: String::new(), key_pem: String::new() },
        }
    }

    #[test]
    fn epochs_only_grow_and_one_epoch_has_one_primary() {
        assert!(dr_set("cg", false, None, &link("a", "a", 1)).unwrap_err().contains("no consistency group"));
        assert!(dr_set("cg", true, None, &link("a", "a", 1)).is_ok());
        let stored = link("a", "a", 2);
        assert!(dr_set("cg", true, Some(&stored), &link("a", "b", 1)).unwrap_err().contains("older"));
        assert!(dr_set("cg", true, Some(&stored), &link("a", "b", 2)).unwrap_err().contains("already has site \"a\""));
        assert!(dr_set("cg", true, Some(&stored), &link("a", "a", 2)).is_ok());
        assert!(dr_set("cg", true, Some(&stored), &link("a", "b", 3)).is_ok());
        assert!(dr_set("cg", true, Some(&stored), &link("b", "b", 3)).unwrap_err().contains("linked as site"));
        let mut bad = link("a", "c", 1);
        assert!(dr_set("cg", true, None, &bad).is_err());
        bad.primary = "a".into();
        bad.epoch = 0;
        assert!(dr_set("cg", true, None, &bad).is_err());
        // The secondary refuses appends and names the primary.
        assert!(check_writable("cg", Some(&link("a", "a", 1))).is_ok());
        assert!(check_writable("cg", None).is_ok());
        let e = check_writable("cg", Some(&link("a", "b", 4))).unwrap_err();
        assert!(e.contains("fenced") && e.contains("epoch 4") && e.contains("\"b\""), "{e}");
    }

    /// A primary's events, applied at a secondary in pieces, with resends
    /// and overlaps: the same LSNs, times and digest, each event once.
    #[test]
    fn replicated_events_keep_their_lsns_and_chain() {
        let mut primary = group();
        let mut events = Vec::new();
        let mut producer = None;
        for i in 0..20u64 {
            let (outcome, _) = apply_batch(&mut primary, producer.clone(), &batch(i + 1, vec![write(i * 512, 700, 10 * i), write(0, 4096, 10 * i + 5)]), &mut Policy::default());
            let BatchOutcome::Sequenced { events: e, producer: p } = outcome else { panic!() };
            events.extend(e.into_iter().map(|(s, _)| s));
            producer = Some(p);
        }
        let digest_at = |n: usize| {
            let mut d = [0u8; 32];
            for e in &events[..n] {
                d = chain(&d, &rewind_wire::frame::encode_record(e).unwrap());
            }
            d
        };
        let mut secondary = group();
        let dr = link("b", "a", 1);
        for (from, to) in [(0usize, 7usize), (3, 12), (12, 12), (10, 40)] {
            let held = secondary.last_lsn as usize;
            let got = apply_replicated(&mut secondary, Some(&dr), 1, &events[from..to], &digest_at(to.max(held)), &mut Policy::default()).unwrap();
            assert_eq!(got.len(), to.saturating_sub(held), "{from}..{to}: only the events not held yet");
            assert_eq!(secondary.last_lsn, to.max(held) as u64);
        }
        assert_eq!(secondary.digest, primary.digest);
        assert_eq!((secondary.last_lsn, secondary.last_time_ns, secondary.events), (primary.last_lsn, primary.last_time_ns, primary.events));
        // A gap, a wrong digest, a wrong epoch, a primary: refused, nothing applied.
        let mut g = group();
        assert!(apply_replicated(&mut g, Some(&dr), 1, &events[1..3], &digest_at(3), &mut Policy::default()).unwrap_err().contains("skips"));
        assert!(apply_replicated(&mut g, Some(&dr), 1, &events[0..3], &digest_at(2), &mut Policy::default()).unwrap_err().contains("diverged"));
        assert!(apply_replicated(&mut g, Some(&dr), 2, &events[0..3], &digest_at(3), &mut Policy::default()).unwrap_err().contains("epoch 2"));
        assert!(apply_replicated(&mut g, Some(&link("a", "a", 1)), 1, &events[0..3], &digest_at(3), &mut Policy::default()).unwrap_err().contains("primary"));
        assert!(apply_replicated(&mut g, None, 1, &events[0..3], &digest_at(3), &mut Policy::default()).unwrap_err().contains("not linked"));
        assert_eq!(g, group());
    }

    fn fenced_like() -> CommandReply {
        CommandReply::Refused {
            reason: "client 9 sequence 3 is fenced: epoch 3 of that client has started (a restarted producer); epoch 1 takes no more batches"
                .into(),
        }
    }

    #[test]
    fn refused_batch_uses_its_number_and_is_remembered() {
        let mut g = group();
        let bad = batch(1, vec![write((1 << 20) - 1, 512, 1)]);
        let (outcome, reply) = apply_batch(&mut g, None, &bad, &mut Policy::default());
        let BatchOutcome::Sequenced { events, producer } = outcome else { panic!("not sequenced") };
        assert!(events.is_empty());
        assert_eq!(producer.last_seq, 1);
        let (_, again) = apply_batch(&mut g, Some(producer.clone()), &bad, &mut Policy::default());
        assert_eq!(again, reply);
        let (_, next) = apply_batch(&mut g, Some(producer), &batch(2, vec![write(0, 512, 1)]), &mut Policy::default());
        assert_eq!(next, CommandReply::Appended { lsn_first: 1, lsn_last: 1 });
    }

    #[test]
    fn window_is_bounded() {
        let mut p = ProducerRecord::default();
        for seq in 1..=(PRODUCER_WINDOW_MAX as u64 + 10) {
            p.remember(seq, &CommandReply::Refused { reason: "x".repeat(1000) });
        }
        assert_eq!(p.recent.len(), PRODUCER_WINDOW_MAX);
        assert_eq!(p.recent[0].0, 11);
        assert!(p.recent.iter().all(|(_, r)| matches!(r, CommandReply::Refused { reason } if reason.len() == REASON_BYTES_MAX)));
    }

    #[test]
    fn time_never_goes_back() {
        let mut g = group();
        let (outcome, _) = apply_batch(&mut g, None, &batch(1, vec![write(0, 1, 100), write(0, 1, 50)]), &mut Policy::default());
        let BatchOutcome::Sequenced { events, .. } = outcome else { panic!("not sequenced") };
        let times: Vec<u64> = events.iter().map(|(e, _)| e.time_ns).collect();
        assert_eq!(times, vec![100, 100]);
    }

    proptest! {
        /// Whatever order batches of several epochs arrive in, duplicated
        /// or not: the applied ones are in increasing sequence order, each
        /// applied once, and none of an epoch older than one applied before.
        #[test]
        fn epochs_never_go_back(arrivals in proptest::collection::vec((0u32..4, 1u32..5), 1..60)) {
            let mut g = group();
            let mut p: Option<ProducerRecord> = None;
            let mut applied: Vec<u64> = Vec::new();
            for (i, (epoch, n)) in arrivals.iter().enumerate() {
                let seq = seq_in_epoch(*epoch, *n);
                let (outcome, reply) = apply_batch(&mut g, p.clone(), &batch(seq, vec![write(0, 512, i as u64)]), &mut Policy::default());
                if let BatchOutcome::Sequenced { producer, events } = outcome {
                    prop_assert_eq!(events.len(), 1);
                    prop_assert!(applied.last().is_none_or(|last| *last < seq), "applied {:?} then {:#x}", applied, seq);
                    prop_assert!(applied.last().is_none_or(|last| seq_epoch(*last) == *epoch || seq_number(seq) == 1));
                    applied.push(seq);
                    p = Some(producer);
                } else {
                    prop_assert!(!matches!(reply, CommandReply::Appended { .. }) || applied.contains(&seq), "{:?} for {:#x}", reply, seq);
                }
            }
            prop_assert_eq!(g.last_lsn, applied.len() as u64);
        }

        /// Splitting the same events into batches in any way gives the same
        /// LSNs and the same digest: the chain depends on the events only.
        #[test]
        fn digest_independent_of_batching(lens in proptest::collection::vec(1usize..2048, 1..40), cut in 1usize..8) {
            let events: Vec<TimedEvent> =
                lens.iter().enumerate().map(|(i, l)| write((i as u64) * 512, *l, i as u64)).collect();
            let mut whole = group();
            apply_batch(&mut whole, None, &batch(1, events.clone()), &mut Policy::default());
            let mut parts = group();
            let mut producer = None;
            for (i, chunk) in events.chunks(cut).enumerate() {
                let (outcome, _) = apply_batch(&mut parts, producer.clone(), &batch(i as u64 + 1, chunk.to_vec()), &mut Policy::default());
                if let BatchOutcome::Sequenced { producer: p, .. } = outcome { producer = Some(p); }
            }
            prop_assert_eq!(whole.last_lsn, events.len() as u64);
            prop_assert_eq!(whole, parts);
        }
    }
}
