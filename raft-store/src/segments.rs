//! Payload segments: where the bytes of every write lie, once, on each
//! replica.
//!
//! A segment is an append-only file `DATA_DIR/shard-1/segments/<id>.seg`
//! (`id` as 16 hex digits, rising): `RWSEG001`, then records
//! `len(u32 LE) crc32(u32 LE) payload`. The log store writes each entry's
//! payloads here and keeps in RocksDB only the entry without them, plus a
//! [`Loc`] per payload (segment, offset, length, CRC-32). The state machine
//! stores a write event the same way: its record names the `Loc` the log
//! entry gave, so apply never copies a payload, and the block index's `Ref`
//! versions read the bytes where they lie.
//!
//! Durability: the log's syncer fsyncs (`fdatasync`) every segment written
//! since its last sync before it fsyncs the WAL, so an entry is never
//! reported durable before its payload is. A new segment file is made
//! durable in its directory when it is created. A torn tail (a crash with
//! written but unsynced payloads) is found at open: the log is cut at the
//! first entry whose payload does not read back whole (`LogStore::open`).
//! No entry after it was acknowledged, because a sync covers every byte
//! written before it, and entries are written in log order.
//!
//! A segment is deleted when nothing needs it (`reclaimable`): no event of
//! any group names it (the `segrefs` family, kept with the events), the
//! log's first entry lies past it, and it is not the one being written.
//! A snapshot hard-links the segments it names, so it outlives them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use rewind_wire::event::{Event, TimedEvent};
use rewind_wire::raft::Command;

use crate::apply::StoredEvent;
use crate::{corrupt, fsync_failed, io_err};

/// A segment is sealed, and the next one begun, past this many bytes.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const FILE_MAGIC: &[u8; 8] = b"RWSEG001";
const RECORD_HEADER: u64 = 8;
/// Open read handles kept (older ones are closed).
const READ_HANDLES_MAX: usize = 256;

/// Where one payload lies: its segment, the offset of its first byte, its
/// length and its CRC-32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Loc {
    pub seg: u64,
    pub off: u64,
    pub len: u32,
    pub crc: u32,
}

impl Loc {
    pub const BYTES: usize = 24;

    pub fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seg.to_le_bytes());
        out.extend_from_slice(&self.off.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
    }

    /// Reads a `Loc` from the first [`Loc::BYTES`] of `b`.
    pub fn get(b: &[u8]) -> Option<Loc> {
        let b = b.get(..Loc::BYTES)?;
        Some(Loc {
            seg: u64::from_le_bytes(b[0..8].try_into().ok()?),
            off: u64::from_le_bytes(b[8..16].try_into().ok()?),
            len: u32::from_le_bytes(b[16..20].try_into().ok()?),
            crc: u32::from_le_bytes(b[20..24].try_into().ok()?),
        })
    }
}

fn file_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

/// The segment ids in `dir`, ascending (other files are not ours and are
/// left alone).
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        if let Some(id) = parse_name(&entry?.file_name().to_string_lossy()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        fsync_failed("syncing the segment directory", e);
    }
}

/// Reads the payload at `loc` from the segments in `dir`, through `file`,
/// and checks it.
fn read_checked(file: &File, loc: &Loc) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; loc.len as usize];
    file.read_exact_at(&mut buf, loc.off).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            corrupt("segment", format!("{} ends before the payload at offset {} ({} bytes)", file_name(loc.seg), loc.off, loc.len))
        } else {
            io::Error::new(e.kind(), format!("reading segment {} at offset {}: {e}", file_name(loc.seg), loc.off))
        }
    })?;
    if crc32fast::hash(&buf) != loc.crc {
        return Err(corrupt("segment", format!("the payload at offset {} of {} ({} bytes) fails its checksum", loc.off, file_name(loc.seg), loc.len)));
    }
    Ok(buf)
}

/// Reads a payload from the segments of a snapshot (its linked copies).
pub fn read_in(dir: &Path, loc: &Loc) -> io::Result<Vec<u8>> {
    let file = File::open(dir.join(file_name(loc.seg))).map_err(|e| io::Error::new(e.kind(), format!("segment {} of the snapshot in {}: {e}", file_name(loc.seg), dir.display())))?;
    read_checked(&file, loc)
}

struct Writer {
    id: u64,
    file: Arc<File>,
    len: u64,
    /// Segments sealed since the last sync: the next sync covers them too.
    sealed: Vec<Arc<File>>,
    /// Whether anything was written since the last sync.
    dirty: bool,
}

/// The payload segments of one shard replica.
pub struct Segments {
    dir: PathBuf,
    writer: Mutex<Writer>,
    readers: Mutex<HashMap<u64, Arc<File>>>,
    /// Held while a snapshot links the segments its checkpoint names, and
    /// while segments are deleted: one never sees the other half done.
    building: Mutex<()>,
    /// One sync at a time, and the (segment, length) the last one covered.
    sync_one: Mutex<()>,
    synced: Mutex<(u64, u64)>,
    /// Payload bytes written (with record headers) since open.
    pub written_bytes: AtomicU64,
    /// When to begin the next segment ([`SEGMENT_BYTES`]; tests use less).
    segment_bytes: AtomicU64,
}

impl Segments {
    /// Opens the segments in `dir` and begins a new one (the newest may
    /// have a torn tail: it is read, never appended to).
    pub fn open(dir: &Path) -> io::Result<Segments> {
        fs::create_dir_all(dir)?;
        let next = list(dir)?.last().map_or(1, |id| id + 1);
        let (file, len) = Self::create(dir, next)?;
        Ok(Segments {
            dir: dir.to_path_buf(),
            writer: Mutex::new(Writer { id: next, file: Arc::new(file), len, sealed: Vec::new(), dirty: true }),
            readers: Mutex::default(),
            building: Mutex::default(),
            sync_one: Mutex::default(),
            synced: Mutex::default(),
            written_bytes: AtomicU64::new(0),
            segment_bytes: AtomicU64::new(SEGMENT_BYTES),
        })
    }

    fn create(dir: &Path, id: u64) -> io::Result<(File, u64)> {
        let path = dir.join(file_name(id));
        let mut file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        file.write_all(FILE_MAGIC)?;
        // The file must exist after a crash for its entries to be read.
        sync_dir(dir);
        Ok((file, FILE_MAGIC.len() as u64))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[cfg(test)]
    pub(crate) fn set_segment_bytes(&self, n: u64) {
        self.segment_bytes.store(n, Relaxed);
    }

    /// See `building`.
    pub fn snapshot_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.building.lock().expect("segment snapshot lock")
    }

    /// The segment being written.
    pub fn active(&self) -> u64 {
        self.writer.lock().expect("segment writer lock").id
    }

    /// Appends payloads, in order, as records; returns where each lies.
    /// Written, not yet durable: [`Segments::sync`] makes them so.
    pub fn append(&self, payloads: &[&[u8]]) -> io::Result<Vec<Loc>> {
        let segment_bytes = self.segment_bytes.load(Relaxed);
        let mut w = self.writer.lock().expect("segment writer lock");
        let mut locs = Vec::with_capacity(payloads.len());
        let mut i = 0;
        while i < payloads.len() {
            if w.len > FILE_MAGIC.len() as u64 && w.len + RECORD_HEADER + payloads[i].len() as u64 > segment_bytes {
                let (file, len) = Self::create(&self.dir, w.id + 1)?;
                let old = std::mem::replace(&mut w.file, Arc::new(file));
                w.sealed.push(old);
                w.id += 1;
                w.len = len;
            }
            // As many payloads as fit, in one vectored write.
            let mut headers = Vec::new();
            let mut end = w.len;
            let first = i;
            while i < payloads.len() && (i == first || end + RECORD_HEADER + payloads[i].len() as u64 <= segment_bytes) {
                let p = payloads[i];
                let len = u32::try_from(p.len()).map_err(|_| io_err(format!("a payload of {} bytes is too large for a segment", p.len())))?;
                let crc = crc32fast::hash(p);
                let mut h = [0u8; 8];
                h[..4].copy_from_slice(&len.to_le_bytes());
                h[4..].copy_from_slice(&crc.to_le_bytes());
                headers.push(h);
                locs.push(Loc { seg: w.id, off: end + RECORD_HEADER, len, crc });
                end += RECORD_HEADER + len as u64;
                i += 1;
            }
            let mut slices = Vec::with_capacity(2 * headers.len());
            for (h, p) in headers.iter().zip(&payloads[first..i]) {
                slices.push(IoSlice::new(h));
                slices.push(IoSlice::new(p));
            }
            write_all_vectored_at(&w.file, &mut slices, w.len)?;
            self.written_bytes.fetch_add(end - w.len, Relaxed);
            w.len = end;
            w.dirty = true;
        }
        Ok(locs)
    }

    /// Makes every payload appended so far durable. An fsync error stops
    /// the process (the page cache may have dropped the bytes).
    /// Returns the (segment, length) every payload up to which is durable.
    pub fn sync(&self) -> (u64, u64) {
        let _one = self.sync_one.lock().expect("segment sync lock");
        let (file, sealed, upto) = {
            let mut w = self.writer.lock().expect("segment writer lock");
            if !w.dirty && w.sealed.is_empty() {
                return *self.synced.lock().expect("segment synced lock");
            }
            w.dirty = false;
            (w.file.clone(), std::mem::take(&mut w.sealed), (w.id, w.len))
        };
        for f in sealed.iter().chain(std::iter::once(&file)) {
            if let Err(e) = f.sync_data() {
                fsync_failed("syncing a payload segment", e);
            }
        }
        *self.synced.lock().expect("segment synced lock") = upto;
        upto
    }

    /// Makes sure the payloads at `locs` are durable, syncing if the last
    /// sync did not cover them. Apply calls it: openraft may apply an entry
    /// the log has not synced yet, and the state machine's record of a
    /// write must never outlive its payload in a crash.
    pub fn ensure_synced(&self, locs: &[Loc]) {
        let Some(need) = locs.iter().map(|l| (l.seg, l.off + l.len as u64)).max() else { return };
        if need > *self.synced.lock().expect("segment synced lock") {
            let _ = self.sync();
        }
    }

    fn handle(&self, seg: u64) -> io::Result<Arc<File>> {
        let mut readers = self.readers.lock().expect("segment readers lock");
        if let Some(f) = readers.get(&seg) {
            return Ok(f.clone());
        }
        let file = File::open(self.dir.join(file_name(seg)))
            .map_err(|e| io::Error::new(e.kind(), format!("segment {} in {}: {e}", file_name(seg), self.dir.display())))?;
        if readers.len() >= READ_HANDLES_MAX {
            readers.clear();
        }
        let file = Arc::new(file);
        readers.insert(seg, file.clone());
        Ok(file)
    }

    /// The payload at `loc`, checked against its CRC-32.
    pub fn read(&self, loc: &Loc) -> io::Result<Vec<u8>> {
        read_checked(&*self.handle(loc.seg)?, loc)
    }

    /// The segment ids on disk, ascending.
    pub fn ids(&self) -> io::Result<Vec<u64>> {
        list(&self.dir)
    }

    /// Bytes the segment files take.
    pub fn bytes(&self) -> io::Result<u64> {
        let mut total = 0;
        for id in self.ids()? {
            total += fs::metadata(self.dir.join(file_name(id))).map(|m| m.len()).unwrap_or(0);
        }
        Ok(total)
    }

    /// Deletes segments (never the active one), then syncs the directory.
    pub fn remove(&self, ids: &[u64]) -> io::Result<u64> {
        let active = self.active();
        let mut freed = 0;
        for id in ids.iter().filter(|id| **id != active) {
            self.readers.lock().expect("segment readers lock").remove(id);
            let path = self.dir.join(file_name(*id));
            freed += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        sync_dir(&self.dir);
        Ok(freed)
    }

    /// Hard-links every segment into `to` (a snapshot's), which must not
    /// exist yet. A segment deleted meanwhile is not needed by the caller's
    /// state (deleted segments are never named again).
    pub fn link_all(&self, to: &Path) -> io::Result<()> {
        fs::create_dir_all(to)?;
        for id in self.ids()? {
            match fs::hard_link(self.dir.join(file_name(id)), to.join(file_name(id))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        sync_dir(to);
        Ok(())
    }
}

fn write_all_vectored_at(file: &File, slices: &mut [IoSlice<'_>], mut at: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut slices = slices;
    while !slices.is_empty() {
        let n = slices.len().min(512);
        // SAFETY: IoSlice is ABI-compatible with iovec; the pointers and
        // lengths come from live slices.
        let wrote = unsafe { libc::pwritev(file.as_raw_fd(), slices.as_ptr() as *const libc::iovec, n as libc::c_int, at as libc::off_t) };
        if wrote < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if wrote == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "a segment write wrote nothing"));
        }
        at += wrote as u64;
        IoSlice::advance_slices(&mut slices, wrote as usize);
    }
    Ok(())
}

/// Which segments may be deleted: those below both the active one and the
/// first the log still needs (`log_first`: the segment of the first
/// payload of the log's first entry that has one), that no event names.
pub fn reclaimable(ids: &[u64], active: u64, log_first: Option<u64>, referenced: &BTreeSet<u64>) -> Vec<u64> {
    let below = log_first.map_or(active, |l| l.min(active));
    ids.iter().copied().filter(|id| *id < below && !referenced.contains(id)).collect()
}

/// The CRC-32 a [`Loc`] carries.
pub fn checksum(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// What opening the log does about its first entry whose payload does
/// not read back (`end`: where that payload ends, as (segment, offset);
/// `synced`: the position the last recorded sync covered). Past it, the
/// payload was never synced, so never acknowledged: a torn tail, cut.
/// Within it, the bytes were durable and changed since: the disk damaged
/// them, and cutting would drop an acknowledged entry; refused.
pub fn torn_or_damaged(end: (u64, u64), synced: (u64, u64)) -> Damage {
    if end > synced {
        Damage::TornTail
    } else {
        Damage::Damaged
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    TornTail,
    Damaged,
}

// ---- Payloads of commands and events ------------------------------------

/// The payloads a command carries, in order: the data of each `Write` of an
/// `Append` batch or a `Replicate`.
pub fn payloads(cmd: &Command) -> Vec<&[u8]> {
    fn data(e: &Event) -> Option<&[u8]> {
        match e {
            Event::Write { data, .. } => Some(data.as_slice()),
            _ => None,
        }
    }
    match cmd {
        Command::Append(b) => b.events.iter().filter_map(|t| data(&t.event)).collect(),
        Command::Replicate { events, .. } => events.iter().filter_map(|e| data(&e.event)).collect(),
        _ => Vec::new(),
    }
}

/// The event without its payload (a `Write`'s data left empty), made
/// without copying the payload.
pub fn strip_event(e: &Event) -> Event {
    match e {
        Event::Write { disk, offset, .. } => Event::Write { disk: disk.clone(), offset: *offset, data: Vec::new() },
        other => other.clone(),
    }
}

/// The command without its payloads (see [`payloads`]).
pub fn strip(cmd: &Command) -> Command {
    match cmd {
        Command::Append(b) => Command::Append(rewind_wire::event::EventBatch {
            group: b.group.clone(),
            client_id: b.client_id,
            seq: b.seq,
            events: b.events.iter().map(|t| TimedEvent { time_ns: t.time_ns, event: strip_event(&t.event) }).collect(),
        }),
        Command::Replicate { group, epoch, events, digest } => Command::Replicate {
            group: group.clone(),
            epoch: *epoch,
            events: events.iter().map(|e| StoredEvent { lsn: e.lsn, time_ns: e.time_ns, event: strip_event(&e.event) }).collect(),
            digest: *digest,
        },
        other => other.clone(),
    }
}

/// Puts payloads back into a stripped command, in [`payloads`] order.
pub fn fill(cmd: &mut Command, mut data: impl Iterator<Item = Vec<u8>>) -> Result<(), String> {
    let mut put = |e: &mut Event| -> Result<(), String> {
        if let Event::Write { data: d, .. } = e {
            *d = data.next().ok_or("fewer payloads than writes")?;
        }
        Ok(())
    };
    match cmd {
        Command::Append(b) => b.events.iter_mut().try_for_each(|t| put(&mut t.event))?,
        Command::Replicate { events, .. } => events.iter_mut().try_for_each(|e| put(&mut e.event))?,
        _ => {}
    }
    if data.next().is_some() {
        return Err("more payloads than writes".into());
    }
    Ok(())
}

/// The segment location of each write of a command, by the LSN it takes
/// (`events`: every event of the command with its LSN, in order; `locs`:
/// one per write, in the same order, or none at all).
pub fn placed<'a>(events: impl Iterator<Item = (u64, &'a rewind_wire::event::Event)>, locs: &[Loc]) -> BTreeMap<u64, Loc> {
    let mut out = BTreeMap::new();
    if locs.is_empty() {
        return out;
    }
    let mut next = locs.iter();
    for (lsn, e) in events {
        if matches!(e, rewind_wire::event::Event::Write { .. }) {
            match next.next() {
                Some(l) => {
                    out.insert(lsn, *l);
                }
                None => return BTreeMap::new(),
            }
        }
    }
    if next.next().is_some() {
        return BTreeMap::new();
    }
    out
}

/// An event record whose payload lies in a segment: `RWE3`, its `Loc`,
/// then the event without its data as a checked record. Any other event
/// record is the event whole (`encode_record`), as stores wrote before.
pub(crate) const EVENT_MAGIC: &[u8; 4] = b"RWE3";

/// The event record of a write whose payload lies at `loc`.
pub fn event_value(event: &StoredEvent, loc: &Loc) -> Vec<u8> {
    let stripped = StoredEvent { lsn: event.lsn, time_ns: event.time_ns, event: strip_event(&event.event) };
    let body = rewind_wire::frame::encode_record(&stripped).expect("a stripped event always encodes");
    let mut v = Vec::with_capacity(4 + Loc::BYTES + body.len());
    v.extend_from_slice(EVENT_MAGIC);
    loc.put(&mut v);
    v.extend_from_slice(&body);
    v
}

/// An event record read without its payload: the event (a `Write`'s data
/// empty if it lies in a segment) and where its payload lies.
pub struct EventRecord {
    pub event: StoredEvent,
    pub loc: Option<Loc>,
}

impl EventRecord {
    pub fn parse(raw: &[u8]) -> io::Result<EventRecord> {
        if let Some(rest) = raw.strip_prefix(EVENT_MAGIC) {
            if let Some(loc) = Loc::get(rest) {
                if let Ok(event) = rewind_wire::frame::decode_record::<StoredEvent>(&rest[Loc::BYTES..]) {
                    if matches!(event.event, Event::Write { ref data, .. } if data.is_empty()) {
                        return Ok(EventRecord { event, loc: Some(loc) });
                    }
                }
            }
        }
        // A whole record (its checksum's first bytes can match the magic
        // by chance only; then the parse above failed its own checks).
        let event = rewind_wire::frame::decode_record::<StoredEvent>(raw).map_err(|e| corrupt("event record", e))?;
        Ok(EventRecord { event, loc: None })
    }

    /// Payload bytes of the event.
    pub fn payload_bytes(&self) -> u64 {
        self.loc.map_or(self.event.event.payload_bytes() as u64, |l| l.len as u64)
    }

    /// The event whole, its payload read through `read`.
    pub fn load(mut self, read: impl FnOnce(&Loc) -> io::Result<Vec<u8>>) -> io::Result<StoredEvent> {
        if let (Some(loc), Event::Write { data, .. }) = (self.loc, &mut self.event.event) {
            *data = read(&loc).map_err(|e| io::Error::new(e.kind(), format!("the payload of LSN {}: {e}", self.event.lsn)))?;
        }
        Ok(self.event)
    }
}

/// An event record whole, its payload read from `segs`.
pub fn decode_event(segs: &Segments, raw: &[u8]) -> io::Result<StoredEvent> {
    EventRecord::parse(raw)?.load(|l| segs.read(l))
}

/// Key of a segment reference: (group, segment, LSN). One per event whose
/// payload lies in a segment; written and deleted with the event.
pub(crate) fn segref_key(group: &str, seg: u64, lsn: u64) -> Vec<u8> {
    let mut k = crate::db::group_prefix(group);
    k.extend_from_slice(&seg.to_be_bytes());
    k.extend_from_slice(&lsn.to_be_bytes());
    k
}

/// Every segment some event names, read with one iterator (one view):
/// a skip-scan that seeks once per (group, segment).
pub(crate) fn referenced(db: &rocksdb::DB) -> io::Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    let mut it = db.raw_iterator_cf(crate::db::cf(db, crate::db::CF_SEGREFS));
    it.seek_to_first();
    while it.valid() {
        let k = it.key().expect("valid").to_vec();
        let glen = *k.first().ok_or_else(|| corrupt("segment reference", "empty key"))? as usize;
        if k.len() != 1 + glen + 16 {
            return Err(corrupt("segment reference", format!("a key of {} bytes", k.len())));
        }
        let seg = crate::db::be_u64(&k[1 + glen..1 + glen + 8]);
        out.insert(seg);
        match seg.checked_add(1) {
            Some(next) => {
                let mut to = k[..1 + glen].to_vec();
                to.extend_from_slice(&next.to_be_bytes());
                it.seek(&to);
            }
            None => it.seek(crate::db::prefix_end(&k[..1 + glen])),
        }
    }
    it.status().map_err(io_err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_read_back_checked() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path()).unwrap();
        let a = vec![1u8; 5000];
        let b = vec![2u8; 10];
        let locs = segs.append(&[&a, &b]).unwrap();
        segs.sync();
        assert_eq!(segs.read(&locs[0]).unwrap(), a);
        assert_eq!(segs.read(&locs[1]).unwrap(), b);
        // A flipped byte is refused by its checksum, naming where.
        let path = dir.path().join(file_name(locs[0].seg));
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[9], locs[0].off + 7).unwrap();
        let e = segs.read(&locs[0]).unwrap_err().to_string();
        assert!(e.contains("fails its checksum"), "{e}");
        // A torn tail: the file ends before the payload.
        f.set_len(locs[1].off + 3).unwrap();
        let e = segs.read(&locs[1]).unwrap_err().to_string();
        assert!(e.contains("ends before the payload"), "{e}");
    }

    #[test]
    fn segments_roll_past_their_size_and_reopen_on_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let segs = Segments::open(dir.path()).unwrap();
        let big = vec![7u8; (SEGMENT_BYTES / 3) as usize];
        let locs = segs.append(&[&big, &big, &big, &big]).unwrap();
        assert_eq!(locs.iter().map(|l| l.seg).collect::<Vec<_>>(), vec![1, 1, 2, 2]);
        segs.sync();
        for l in &locs {
            assert_eq!(segs.read(l).unwrap().len(), big.len());
        }
        drop(segs);
        let segs = Segments::open(dir.path()).unwrap();
        assert_eq!(segs.active(), 3);
        assert_eq!(segs.read(&locs[3]).unwrap().len(), big.len());
        assert!(segs.remove(&[1, 3]).unwrap() > 0);
        assert_eq!(segs.ids().unwrap(), vec![2, 3], "the active segment is never removed");
    }

    #[test]
    fn only_unreferenced_segments_behind_the_log_and_the_writer_go() {
        let refs: BTreeSet<u64> = [2].into();
        assert_eq!(reclaimable(&[1, 2, 3, 4, 5], 5, Some(4), &refs), vec![1, 3]);
        assert_eq!(reclaimable(&[1, 2, 3, 4, 5], 5, None, &refs), vec![1, 3, 4]);
        assert_eq!(reclaimable(&[1, 2, 3], 2, Some(9), &BTreeSet::new()), vec![1]);
    }

    #[test]
    fn commands_strip_and_fill_back() {
        let w = |d: u8| TimedEvent { time_ns: 1, event: Event::Write { disk: "d".into(), offset: 0, data: vec![d; 3] } };
        let z = TimedEvent { time_ns: 1, event: Event::Trim { disk: "d".into(), offset: 0, len: 4096 } };
        let cmd = Command::Append(rewind_wire::event::EventBatch { group: "g".into(), client_id: 1, seq: 1, events: vec![w(1), z, w(2)] });
        let p: Vec<Vec<u8>> = payloads(&cmd).into_iter().map(|s| s.to_vec()).collect();
        assert_eq!(p, vec![vec![1; 3], vec![2; 3]]);
        let mut s = strip(&cmd);
        assert!(payloads(&s).iter().all(|p| p.is_empty()));
        fill(&mut s, p.clone().into_iter()).unwrap();
        assert_eq!(s, cmd);
        assert!(fill(&mut strip(&cmd), p[..1].iter().cloned()).is_err());
    }

    proptest::proptest! {
        /// Whatever bytes a record holds (a damaged disk), parsing gives an
        /// event or an error, never a panic; a `Loc` read from garbage is
        /// only used through a checked read.
        #[test]
        fn garbage_records_never_panic(mut raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), magic in proptest::prelude::any::<bool>()) {
            if magic {
                let mut v = EVENT_MAGIC.to_vec();
                v.append(&mut raw);
                raw = v;
            }
            if let Ok(r) = EventRecord::parse(&raw) {
                let _ = r.payload_bytes();
                let _ = r.load(|_| Err(io::Error::other("no segment")));
            }
            let _ = Loc::get(&raw);
        }
    }

    #[test]
    fn event_records_name_their_payload_or_hold_it() {
        let e = StoredEvent { lsn: 4, time_ns: 9, event: Event::Write { disk: "d".into(), offset: 8192, data: vec![5; 100] } };
        let loc = Loc { seg: 3, off: 16, len: 100, crc: crc32fast::hash(&[5; 100]) };
        let r = EventRecord::parse(&event_value(&e, &loc)).unwrap();
        assert_eq!(r.loc, Some(loc));
        assert_eq!(r.payload_bytes(), 100);
        assert_eq!(r.load(|_| Ok(vec![5; 100])).unwrap(), e);
        let whole = rewind_wire::frame::encode_record(&e).unwrap();
        let r = EventRecord::parse(&whole).unwrap();
        assert_eq!((r.loc, r.event), (None, e));
        assert!(EventRecord::parse(b"RWE3garbage").is_err());
    }
}
