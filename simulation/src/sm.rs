//! The state machine of a simulated node: production's pure apply core
//! (`rewind_raft_store::apply`) and block index (`blocks`) over memory.
//! It is volatile, like production's (which writes without a WAL): a crash
//! loses it, and the node rebuilds it from its snapshot and its log.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rewind_raft_store::apply::{apply_batch, create_group, BatchOutcome, GroupRecord, ProducerRecord};
use rewind_raft_store::blocks::{index_event, IndexPut, Version, BLOCK_BYTES};
use rewind_wire::event::{Event, LoggedEvent};
use rewind_wire::raft::{Command, CommandReply};

use crate::disk::{current_snapshot, Disk};
use crate::{LogId, SimConfig, Snapshot, StoredMembership};

/// Everything a state machine holds; a snapshot is one of these, shared.
#[derive(Clone, Default)]
pub struct SmImage {
    pub applied: Option<LogId>,
    pub membership: StoredMembership,
    pub groups: BTreeMap<String, GroupRecord>,
    pub producers: BTreeMap<(u64, String), ProducerRecord>,
    /// Each group's events in LSN order (LSN n at index n - 1).
    pub events: BTreeMap<String, Vec<LoggedEvent>>,
    /// (group, disk, block) -> versions by LSN.
    blocks: BTreeMap<(String, String, u64), BTreeMap<u64, Version>>,
    /// (group, disk) -> zeroed extents by LSN.
    extents: BTreeMap<(String, String), BTreeMap<u64, (u64, u64)>>,
}

impl SmImage {
    /// Block `b` of a disk as of LSN `lsn`, read the way the store reads it.
    pub fn block_at(&self, group: &str, disk: &str, b: u64, lsn: u64) -> Vec<u8> {
        let zero = vec![0u8; BLOCK_BYTES as usize];
        let versions = self.blocks.get(&(group.to_string(), disk.to_string(), b));
        let found = versions.and_then(|v| v.range(..=lsn).next_back());
        let since = found.map_or(0, |(l, _)| *l);
        if let Some(ext) = self.extents.get(&(group.to_string(), disk.to_string())) {
            if since < lsn && ext.range(since + 1..=lsn).any(|(_, (f, e))| (*f..*e).contains(&b)) {
                return zero;
            }
        }
        match found {
            None | Some((_, Version::Zero)) => zero,
            Some((_, Version::Data(d))) => d.clone(),
            Some((l, Version::Ref { offset })) => match &self.events[group][*l as usize - 1].event {
                Event::Write { data, .. } => data[*offset as usize..*offset as usize + BLOCK_BYTES as usize].to_vec(),
                other => panic!("a Ref version points at {other:?}"),
            },
        }
    }

    fn apply_command(&mut self, command: &Command) -> CommandReply {
        match command {
            Command::CreateGroup { group, disks, .. } => match create_group(self.groups.contains_key(group), group, disks) {
                Ok(record) => {
                    self.groups.insert(group.clone(), record);
                    CommandReply::Created
                }
                Err(reason) => CommandReply::Refused { reason },
            },
            Command::Append(b) => {
                let Some(mut group) = self.groups.get(&b.group).cloned() else {
                    return CommandReply::Refused { reason: format!("no consistency group {:?}", b.group) };
                };
                let key = (b.client_id, b.group.clone());
                let (outcome, reply) = apply_batch(&mut group, self.producers.get(&key).cloned(), b);
                if let BatchOutcome::Sequenced { events, producer } = outcome {
                    for (event, _record) in events {
                        self.index(&b.group, &event);
                        self.events.entry(b.group.clone()).or_default().push(event);
                    }
                    self.producers.insert(key, producer);
                    self.groups.insert(b.group.clone(), group);
                }
                reply
            }
        }
    }

    fn index(&mut self, group: &str, event: &LoggedEvent) {
        let Some(disk) = event.event.disk() else { return };
        let disk = disk.to_string();
        let puts = index_event(&disk, &event.event, |b| Ok::<_, ()>(self.block_at(group, &disk, b, event.lsn - 1)))
            .expect("reading memory cannot fail");
        for put in puts {
            match put {
                IndexPut::Block { block, version } => {
                    self.blocks.entry((group.to_string(), disk.clone(), block)).or_default().insert(event.lsn, version);
                }
                IndexPut::Extent { block_first, block_end } => {
                    self.extents.entry((group.to_string(), disk.clone())).or_default().insert(event.lsn, (block_first, block_end));
                }
            }
        }
    }
}

/// One node's state machine.
pub struct SimSm {
    pub state: Arc<Mutex<SmImage>>,
    pub disk: Arc<Mutex<Disk>>,
}

impl SimSm {
    /// A state machine as it is after a (re)start: the disk's snapshot, or
    /// empty.
    pub fn open(disk: Arc<Mutex<Disk>>) -> SimSm {
        let image = current_snapshot(&disk).map(|s| (*s.snapshot).clone()).unwrap_or_default();
        SimSm { state: Arc::new(Mutex::new(image)), disk }
    }
}

impl RaftSnapshotBuilder<SimConfig> for SimSm {
    type SnapshotData = Arc<SmImage>;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let image = Arc::new(self.state.lock().expect("sm").clone());
        let meta = openraft::alias::SnapshotMetaOf::<SimConfig> {
            last_log_id: image.applied,
            last_membership: image.membership.clone(),
        };
        self.disk.lock().expect("disk").save_snapshot(meta.clone(), image.clone());
        Ok(Snapshot { meta, snapshot: image })
    }
}

impl RaftStateMachine<SimConfig> for SimSm {
    type SnapshotData = Arc<SmImage>;
    type SnapshotBuilder = SimSm;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let s = self.state.lock().expect("sm");
        Ok((s.applied, s.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<SimConfig>>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let reply = {
                let mut s = self.state.lock().expect("sm");
                s.applied = Some(entry.log_id);
                match &entry.payload {
                    EntryPayload::Blank => CommandReply::Created,
                    EntryPayload::Normal(c) => s.apply_command(c),
                    EntryPayload::Membership(m) => {
                        s.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        CommandReply::Created
                    }
                }
            };
            if let Some(r) = responder {
                r.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> SimSm {
        SimSm { state: self.state.clone(), disk: self.disk.clone() }
    }

    async fn install_snapshot(&mut self, meta: &openraft::alias::SnapshotMetaOf<SimConfig>, snapshot: Arc<SmImage>) -> io::Result<()> {
        *self.state.lock().expect("sm") = (*snapshot).clone();
        self.disk.lock().expect("disk").save_snapshot(meta.clone(), snapshot);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        Ok(current_snapshot(&self.disk))
    }
}
