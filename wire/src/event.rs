//! Events of a consistency group's log and the batches that carry them.

use rkyv::{Archive, Deserialize, Serialize};

use crate::limits::{
    BATCH_BYTES_MAX, BATCH_EVENTS_MAX, COPY_BLOCKS_MAX, DISK_BYTES_MAX, GROUP_DISKS_MAX, NAME_BYTES_MAX, REVERT_BLOCKS_MAX,
    WRITE_BYTES_MAX,
};

/// One entry of a consistency group's log, before it is given an LSN.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Guest bytes written at `offset` of `disk`.
    Write { disk: String, offset: u64, data: Vec<u8> },
    /// `len` bytes of zeroes at `offset` (NBD WRITE_ZEROES), kept compact.
    WriteZeroes { disk: String, offset: u64, len: u64 },
    /// `len` bytes at `offset` discarded (NBD TRIM); reads back as zeroes.
    Trim { disk: String, offset: u64, len: u64 },
    /// A backup of `disk` starts (or, while it is open, is taken over by
    /// the producer that sends this: a resumed backup); `base` names the
    /// committed backup it is incremental to. Until it commits or aborts,
    /// only that producer writes the disk, and points inside it read the
    /// disk as of its start. Its data travels as `Write`, `WriteZeroes`
    /// and `Revert` events on the disk.
    BackupBegin { backup: String, disk: String, base: Option<String> },
    /// Reserved, refused: a backup's data travels as `Write` events.
    BackupExtent { backup: String, offset: u64, data: Vec<u8> },
    /// The backup is complete and becomes a restore point: `extents`
    /// read from the source, `bytes` in them, and the blake3 `digest` (32
    /// bytes) of their blocks' hashes, as the importer read them.
    BackupCommit { backup: String, extents: u64, bytes: u64, digest: Vec<u8> },
    /// The backup is abandoned. Its importer has reverted the disk to the
    /// backup's start first, so nothing of it is ever visible.
    BackupAbort { backup: String },
    /// A named point in the log.
    Bookmark { name: String, app_consistent: bool },
    /// A disk joins the group.
    DiskCreate { disk: String, size_bytes: u64, sector_bytes: u32 },
    /// A disk changes size.
    DiskResize { disk: String, size_bytes: u64 },
    /// Blocks `block_first..block_end` (4 KiB each) of `disk` become what
    /// they were as of `to_lsn`: a failover to a past point starts its
    /// branch of the history here, keeping everything after `to_lsn`.
    Revert { disk: String, to_lsn: u64, block_first: u64, block_end: u64 },
    /// The group's retention policy from here on: history older than
    /// `keep_ns` behind the newest event, or more than `keep_bytes` of
    /// payload, may be released (0: no limit of that kind).
    Retain { keep_ns: u64, keep_bytes: u64 },
    /// Until `until_ns`, nothing may shorten the retention, delete the
    /// group, or unpin a bookmark. A lock is never shortened.
    Lock { until_ns: u64 },
    /// The point of bookmark `name` is kept until `until_ns`, beyond the
    /// window if need be (0 unpins it).
    Pin { name: String, until_ns: u64 },
    /// Blocks `block_first..` of `disk` become copies of blocks of
    /// `from_disk` as they were at LSNs inside the window: `from` holds one
    /// (block, LSN) pair per block. A backup sends a block the group holds
    /// elsewhere this way: by where it lies, not its bytes.
    Copy { disk: String, block_first: u64, from_disk: String, from: Vec<u64> },
}

impl Event {
    /// Whether the event changes what the group keeps (an admin's event).
    pub fn is_policy(&self) -> bool {
        matches!(self, Event::Retain { .. } | Event::Lock { .. } | Event::Pin { .. })
    }
}

/// An event with the time its source gave it (nanoseconds since the Unix epoch).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TimedEvent {
    pub time_ns: u64,
    pub event: Event,
}

/// One event as a group's log holds it: with its LSN and its time, which
/// never goes backwards within a group.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub lsn: u64,
    pub time_ns: u64,
    pub event: Event,
}

/// What a client appends to one consistency group in one request. It becomes
/// one Raft entry. `client_id` and `seq` make a retried batch apply once: a
/// batch whose `seq` is not above the last one applied for that client gets
/// the earlier answer again.
///
/// `seq` is an epoch (high 32 bits) and a number within it (low 32 bits,
/// from 1; see [`seq_in_epoch`]). A producer that restarts under the same
/// identity (a sync-mode tap's next process) takes the next epoch, and its
/// first batch, number 1 of the new epoch, fences the older epochs: a batch
/// of an older epoch that arrives after it is refused, never applied.
/// Producers that never restart use epoch 0.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct EventBatch {
    pub group: String,
    pub client_id: u64,
    pub seq: u64,
    pub events: Vec<TimedEvent>,
}

/// Why an event or batch is refused before it reaches the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("name {name:?} must be 1..={max} bytes of [A-Za-z0-9._-]", max = NAME_BYTES_MAX)]
    BadName { name: String },
    #[error("batch holds {count} events; the limit is {max}", max = BATCH_EVENTS_MAX)]
    TooManyEvents { count: usize },
    #[error("batch holds {bytes} payload bytes; the limit is {max}", max = BATCH_BYTES_MAX)]
    BatchTooLarge { bytes: usize },
    #[error("write of {bytes} bytes exceeds the per-event limit of {max}", max = WRITE_BYTES_MAX)]
    WriteTooLarge { bytes: usize },
    #[error("batch is empty")]
    EmptyBatch,
    #[error("disk size {size_bytes} is not a positive multiple of the sector size {sector_bytes}, or exceeds {max}", max = DISK_BYTES_MAX)]
    BadDiskSize { size_bytes: u64, sector_bytes: u32 },
    #[error("sector size {sector_bytes} must be a power of two from 512 to 4096")]
    BadSectorSize { sector_bytes: u32 },
    #[error("a group holds at most {max} disks, {count} given", max = GROUP_DISKS_MAX)]
    TooManyDisks { count: usize },
    #[error("revert of blocks {block_first}..{block_end}: 1..={max} blocks per event", max = REVERT_BLOCKS_MAX)]
    BadRevert { block_first: u64, block_end: u64 },
    #[error("bad DR link: {why}")]
    BadLink { why: String },
    #[error("{what} is reserved and refused")]
    Reserved { what: &'static str },
    #[error("a backup's digest is 32 bytes, not {bytes}")]
    BadDigest { bytes: usize },
    #[error("a copy names (block, LSN) pairs, 1..={max} of them; {values} values given", max = COPY_BLOCKS_MAX)]
    BadCopy { values: usize },
}

/// Checks a consistency-group, disk, bookmark or backup name.
pub fn check_name(name: &str) -> Result<(), InvalidInput> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidInput::BadName { name: name.chars().take(NAME_BYTES_MAX + 8).collect() })
    }
}

impl Event {
    /// Payload bytes this event carries (data, not zero ranges).
    pub fn payload_bytes(&self) -> usize {
        match self {
            Event::Write { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// The disk the event touches, if it touches one.
    pub fn disk(&self) -> Option<&str> {
        match self {
            Event::Write { disk, .. }
            | Event::WriteZeroes { disk, .. }
            | Event::Trim { disk, .. }
            | Event::BackupBegin { disk, .. }
            | Event::DiskCreate { disk, .. }
            | Event::DiskResize { disk, .. }
            | Event::Revert { disk, .. }
            | Event::Copy { disk, .. } => Some(disk),
            _ => None,
        }
    }

    /// Checks the bounds that do not need the group's state.
    pub fn check(&self) -> Result<(), InvalidInput> {
        if let Some(disk) = self.disk() {
            check_name(disk)?;
        }
        match self {
            Event::Write { data, .. } if data.len() > WRITE_BYTES_MAX => {
                Err(InvalidInput::WriteTooLarge { bytes: data.len() })
            }
            Event::BackupBegin { backup, base, .. } => {
                check_name(backup)?;
                base.as_deref().map(check_name).transpose().map(|_| ())
            }
            Event::BackupExtent { .. } => Err(InvalidInput::Reserved { what: "BackupExtent (a backup's data travels as Write events)" }),
            Event::BackupCommit { backup, digest, .. } if digest.len() != 32 => {
                check_name(backup)?;
                Err(InvalidInput::BadDigest { bytes: digest.len() })
            }
            Event::BackupCommit { backup, .. } | Event::BackupAbort { backup } => check_name(backup),
            Event::Bookmark { name, .. } | Event::Pin { name, .. } => check_name(name),
            Event::DiskCreate { size_bytes, sector_bytes, .. } => check_disk_geometry(*size_bytes, *sector_bytes),
            Event::DiskResize { .. } => Ok(()),
            Event::Revert { block_first, block_end, .. } if block_end <= block_first || block_end - block_first > REVERT_BLOCKS_MAX => {
                Err(InvalidInput::BadRevert { block_first: *block_first, block_end: *block_end })
            }
            Event::Copy { from_disk, from, .. } => {
                check_name(from_disk)?;
                if from.is_empty() || !from.len().is_multiple_of(2) || from.len() / 2 > COPY_BLOCKS_MAX {
                    return Err(InvalidInput::BadCopy { values: from.len() });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Splits a write larger than the per-event limit into consecutive writes of
/// at most `WRITE_BYTES_MAX` bytes each.
pub fn split_write(disk: &str, offset: u64, data: &[u8]) -> Vec<Event> {
    if data.is_empty() {
        return vec![Event::Write { disk: disk.to_string(), offset, data: Vec::new() }];
    }
    data.chunks(WRITE_BYTES_MAX)
        .enumerate()
        .map(|(i, chunk)| Event::Write {
            disk: disk.to_string(),
            offset: offset + (i * WRITE_BYTES_MAX) as u64,
            data: chunk.to_vec(),
        })
        .collect()
}

/// Checks a disk's size and sector size.
pub fn check_disk_geometry(size_bytes: u64, sector_bytes: u32) -> Result<(), InvalidInput> {
    if !(512..=4096).contains(&sector_bytes) || !sector_bytes.is_power_of_two() {
        return Err(InvalidInput::BadSectorSize { sector_bytes });
    }
    if size_bytes == 0 || !size_bytes.is_multiple_of(u64::from(sector_bytes)) || size_bytes > DISK_BYTES_MAX {
        return Err(InvalidInput::BadDiskSize { size_bytes, sector_bytes });
    }
    Ok(())
}

/// Bits of a batch's `seq` below its epoch.
pub const SEQ_EPOCH_SHIFT: u32 = 32;

/// The first sequence number of `epoch`.
pub fn seq_in_epoch(epoch: u32, n: u32) -> u64 {
    (u64::from(epoch) << SEQ_EPOCH_SHIFT) | u64::from(n)
}

/// The epoch of a sequence number.
pub fn seq_epoch(seq: u64) -> u32 {
    (seq >> SEQ_EPOCH_SHIFT) as u32
}

/// A sequence number's place within its epoch.
pub fn seq_number(seq: u64) -> u32 {
    seq as u32
}

impl EventBatch {
    /// Sum of the payload bytes of the batch's events.
    pub fn payload_bytes(&self) -> usize {
        self.events.iter().map(|e| e.event.payload_bytes()).sum()
    }

    /// Checks every bound of the batch; called where a batch enters a node.
    pub fn check(&self) -> Result<(), InvalidInput> {
        check_name(&self.group)?;
        if self.events.is_empty() {
            return Err(InvalidInput::EmptyBatch);
        }
        if self.events.len() > BATCH_EVENTS_MAX {
            return Err(InvalidInput::TooManyEvents { count: self.events.len() });
        }
        let bytes = self.payload_bytes();
        if bytes > BATCH_BYTES_MAX {
            return Err(InvalidInput::BatchTooLarge { bytes });
        }
        self.events.iter().try_for_each(|e| e.event.check())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_name_case(name: &str, ok: bool) {
        assert_eq!(check_name(name).is_ok(), ok, "{name:?}");
    }

    #[test]
    fn names() {
        for (name, ok) in [
            ("cg1", true),
            ("a.b_c-D9", true),
            ("", false),
            ("has space", false),
            ("slash/", false),
            (&"x".repeat(64), true),
            (&"x".repeat(65), false),
        ] {
            check_name_case(name, ok);
        }
    }

    #[test]
    fn batch_bounds() {
        let write = |len: usize| TimedEvent {
            time_ns: 1,
            event: Event::Write { disk: "d".into(), offset: 0, data: vec![0; len] },
        };
        let batch = |events: Vec<TimedEvent>| EventBatch { group: "g".into(), client_id: 1, seq: 1, events };
        assert_eq!(batch(vec![]).check(), Err(InvalidInput::EmptyBatch));
        assert!(batch(vec![write(WRITE_BYTES_MAX)]).check().is_ok());
        assert_eq!(
            batch(vec![write(WRITE_BYTES_MAX + 1)]).check(),
            Err(InvalidInput::WriteTooLarge { bytes: WRITE_BYTES_MAX + 1 })
        );
        let five = (0..5).map(|_| write(WRITE_BYTES_MAX)).collect();
        assert_eq!(batch(five).check(), Err(InvalidInput::BatchTooLarge { bytes: 5 * WRITE_BYTES_MAX }));
    }

    #[test]
    fn large_writes_are_split() {
        for (len, pieces) in [(0usize, 1usize), (1, 1), (WRITE_BYTES_MAX, 1), (WRITE_BYTES_MAX + 1, 2), (5 * WRITE_BYTES_MAX / 2, 3)] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let events = split_write("d", 4096, &data);
            assert_eq!(events.len(), pieces, "{len}");
            let mut joined = Vec::new();
            let mut next = 4096;
            for e in &events {
                let Event::Write { offset, data, .. } = e else { panic!("not a write") };
                assert_eq!(*offset, next);
                assert!(data.len() <= WRITE_BYTES_MAX);
                next += data.len() as u64;
                joined.extend_from_slice(data);
            }
            assert_eq!(joined, data);
        }
    }

    #[test]
    fn disk_geometry() {
        for (size, sector, ok) in [
            (1 << 20, 512, true),
            (1 << 20, 4096, true),
            (1000, 512, false),
            (0, 512, false),
            (1 << 20, 1000, false),
            (1 << 20, 8192, false),
            (DISK_BYTES_MAX + 4096, 4096, false),
        ] {
            assert_eq!(check_disk_geometry(size, sector).is_ok(), ok, "{size} {sector}");
        }
    }
}

#[cfg(test)]
mod layout_tests {
    /// Stored events (and the log's entries) hold archived events: a new
    /// variant must not change their layout, or stores written before it
    /// could not be read. Format-2 stores hold 40-byte archived events.
    #[test]
    fn the_archived_event_keeps_its_size() {
        assert_eq!(std::mem::size_of::<super::ArchivedEvent>(), 40);
    }
}
