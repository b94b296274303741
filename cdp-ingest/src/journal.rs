//! The async tap's local journal: batches a guest has been told are written,
//! kept on the tap's own disk (fsync'd) until the site has committed them.
//!
//! Layout of the journal folder:
//! * `identity`: `client_id group`, written once. The client id is the
//!   producer identity the shipper uses on the site, so a batch resent after
//!   a crash of the tap is recognised and applied once.
//! * `seg-<first seq, 20 digits>.jnl`: segments, each a run of entries
//!   `len: u32 LE | record`, the record being a checksummed
//!   [`EventBatch`] (`wire::frame::encode_record`). Sequence numbers are
//!   dense across segments. The newest segment is the one being written; a
//!   segment whose batches are all committed on the site is deleted.
//!
//! Rules:
//! * an append is acknowledged only after its bytes and the segment are
//!   fdatasync'd; an fsync error stops the process (DESIGN.md invariant 1);
//! * the shipper trims a batch once the site has committed it and the
//!   backing file is synced past it; what the journal still holds is redone
//!   onto the backing file at start (`crate::shipper::redo_journal`), so a
//!   power loss cannot leave the guest's disk behind the log;
//! * at open the newest segment is synced: batches a crashed process left in
//!   the page cache are durable before the shipper may send them;
//! * the bytes of batches not yet committed never exceed `bytes_max`: an
//!   append waits for the shipper to trim (back-pressure on the guest); one
//!   batch is always let in, so a batch larger than the bound cannot stall;
//! * at open, only a torn tail is cut: an entry at the end of the newest
//!   segment whose header or bytes run past the end of the file (a crash
//!   during an append, which was never acknowledged). A whole entry that
//!   fails its checksum, anywhere, may be an acknowledged write: the open is
//!   refused with the file and offset, and nothing is cut ([`recovery`]).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rewind_wire::event::{EventBatch, TimedEvent};
use rewind_wire::frame::{decode_record, encode_record};
use rewind_wire::limits::FRAME_BODY_BYTES_MAX;
use tokio::sync::{oneshot, Notify};

/// The smallest journal bound accepted: a few full batches.
pub const JOURNAL_BYTES_MIN: u64 = 16 << 20;
/// Appends one writer round takes at most before it syncs.
const ROUND_BYTES_MAX: usize = 16 << 20;
/// Appends queued for the writer thread at most.
const WRITE_QUEUE_MAX: usize = 256;
const ENTRY_HEADER_BYTES: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("journal {path} is damaged at byte {offset}: {why}. The tap will not start: the journal may hold acknowledged writes the site does not have yet, and nothing was cut. Keep the folder for inspection; to start without what it holds from there on, move the folder away (those writes are then lost)")]
    Corrupt { path: PathBuf, offset: u64, why: String },
    #[error("journal {dir} belongs to group {found:?}, not {wanted:?}; give another --journal folder")]
    OtherGroup { dir: PathBuf, found: String, wanted: String },
    #[error("journal bound {got} bytes is below the minimum of {JOURNAL_BYTES_MIN}")]
    TooSmall { got: u64 },
    #[error("journal {dir} is in use by another tap")]
    Busy { dir: PathBuf },
    /// The writer thread has ended (the process is stopping, or an fsync
    /// failed and it is aborting).
    #[error("the journal writer stopped")]
    WriterStopped,
    /// This handle's process no longer has the journal open.
    #[error("the journal is closed")]
    Closed,
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_path_buf(), source }
}

/// What the journal reports for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Bytes of batches not yet committed on the site.
    pub bytes: u64,
    pub bytes_max: u64,
    /// Batches not yet committed on the site.
    pub batches: u64,
    /// Event time of the oldest batch not yet committed; None when empty.
    pub oldest_time_ns: Option<u64>,
    /// The sequence number the next batch will get.
    pub next_seq: u64,
    /// Batches appended since open.
    pub appended: u64,
    /// Times an append had to wait for room, and for how long in total.
    pub stalls: u64,
    pub stalled: Duration,
    pub segments: usize,
}

struct Entry {
    seq: u64,
    segment: u64,
    offset: u64,
    len: u32,
    time_ns: u64,
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
    file: Arc<File>,
    /// The last sequence it holds; None while empty.
    last_seq: Option<u64>,
    bytes: u64,
}

struct State {
    /// Batches not yet trimmed, in sequence order.
    entries: VecDeque<Entry>,
    segments: VecDeque<Segment>,
    bytes: u64,
    next_seq: u64,
    appended: u64,
    stalls: u64,
    stalled: Duration,
}

struct Shared {
    /// Holds the folder's exclusive lock for as long as the journal is open.
    _lock: File,
    dir: PathBuf,
    group: String,
    client_id: u64,
    bytes_max: u64,
    segment_bytes: u64,
    state: Mutex<State>,
    /// Signalled when a trim makes room.
    room: Condvar,
    /// Signalled when a batch becomes durable.
    appended: Notify,
}

struct Append {
    events: Vec<TimedEvent>,
    done: oneshot::Sender<u64>,
}

/// The tap's sink in async mode: a batch counts as done once the journal
/// holds it durably. The "LSN range" it reports is the batch's journal
/// sequence number, twice; the site's LSNs come later, from the shipper.
pub struct JournalSink(pub Journal);

impl crate::tap::LogSink for JournalSink {
    fn submit(&self, events: Vec<TimedEvent>) -> crate::BoxFuture<'_, Result<crate::tap::Committed, crate::tap::SinkError>> {
        Box::pin(async move {
            let rx = self.0.submit(events).await?;
            let durable: crate::tap::Committed = Box::pin(async move {
                rx.await.map(|seq| (seq, seq)).map_err(|_| JournalError::WriterStopped.into())
            });
            Ok(durable)
        })
    }
}

/// A handle on the journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
    writer: std::sync::mpsc::SyncSender<Append>,
}

fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.jnl")
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

/// fsync failed: the kernel may have dropped the dirty pages, so what the
/// guest was told is durable may not be. Stop rather than go on.
fn fatal_sync(path: &Path, e: std::io::Error) -> ! {
    crate::fsync_failed(&path.display().to_string(), e)
}

impl Journal {
    /// Opens the journal in `dir` (created if missing) for `group`. A new
    /// journal gets a fresh producer identity from `new_client_id`.
    pub fn open(dir: &Path, group: &str, bytes_max: u64, new_client_id: impl FnOnce() -> u64) -> Result<Journal, JournalError> {
        if bytes_max < JOURNAL_BYTES_MIN {
            return Err(JournalError::TooSmall { got: bytes_max });
        }
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let lock = lock_dir(dir)?;
        let client_id = identity(dir, group, new_client_id)?;
        let mut segments = VecDeque::new();
        let mut entries = VecDeque::new();
        let mut bytes = 0u64;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for item in std::fs::read_dir(dir).map_err(io_at(dir))? {
            let item = item.map_err(io_at(dir))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if let Some(seq) = name.strip_prefix("seg-").and_then(|s| s.strip_suffix(".jnl")).and_then(|s| s.parse::<u64>().ok()) {
                names.push((seq, item.path()));
            }
        }
        names.sort();
        let count = names.len();
        let mut next_seq = names.first().map_or(1, |(s, _)| *s);
        for (i, (first_seq, path)) in names.into_iter().enumerate() {
            let newest = i + 1 == count;
            if first_seq != next_seq {
                return Err(JournalError::Corrupt { path, offset: 0, why: format!("segment starts at sequence {first_seq}, expected {next_seq}") });
            }
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_at(&path))?;
            let len = file.metadata().map_err(io_at(&path))?.len();
            let mut offset = 0u64;
            let mut last_seq = None;
            let id = first_seq;
            while offset < len {
                match read_entry(&file, offset, len) {
                    Ok((batch, size)) => {
                        let why = if batch.seq != next_seq {
                            Some(format!("sequence {} where {next_seq} was expected", batch.seq))
                        } else if batch.client_id != client_id || batch.group != group {
                            Some(format!("a batch of client {} group {:?} in a journal of client {client_id} group {group:?}", batch.client_id, batch.group))
                        } else {
                            None
                        };
                        if let Some(why) = why {
                            return Err(JournalError::Corrupt { path, offset, why });
                        }
                        entries.push_back(Entry { seq: batch.seq, segment: id, offset, len: size, time_ns: batch.events.first().map_or(0, |e| e.time_ns) });
                        bytes += u64::from(size) + ENTRY_HEADER_BYTES;
                        last_seq = Some(batch.seq);
                        next_seq += 1;
                        offset += u64::from(size) + ENTRY_HEADER_BYTES;
                    }
                    Err(bad) => match recovery(&bad, newest) {
                        Recovery::Cut => {
                            tracing::warn!("journal {}: cutting a torn entry at byte {offset} ({bad:?}); it was never acknowledged", path.display());
                            file.set_len(offset).map_err(io_at(&path))?;
                            file.sync_all().unwrap_or_else(|e| fatal_sync(&path, e));
                            break;
                        }
                        Recovery::Refuse => {
                            let (BadEntry::Torn(why) | BadEntry::Damaged(why)) = bad;
                            return Err(JournalError::Corrupt { path, offset, why });
                        }
                    },
                }
            }
            if newest && offset > 0 {
                // What a crash of the tap left in the page cache becomes
                // durable before the shipper may send it: a power loss
                // later must not take back a batch the site has.
                file.sync_data().unwrap_or_else(|e| fatal_sync(&path, e));
            }
            let seg_bytes = offset;
            segments.push_back(Segment { first_seq, path, file: Arc::new(file), last_seq, bytes: seg_bytes });
        }
        if segments.is_empty() {
            let path = dir.join(segment_name(next_seq));
            let file = create_segment(dir, &path)?;
            segments.push_back(Segment { first_seq: next_seq, path, file: Arc::new(file), last_seq: None, bytes: 0 });
        }
        let shared = Arc::new(Shared {
            _lock: lock,
            dir: dir.to_path_buf(),
            group: group.to_string(),
            client_id,
            bytes_max,
            segment_bytes: (bytes_max / 4).clamp(4 << 20, 256 << 20),
            state: Mutex::new(State { entries, segments, bytes, next_seq, appended: 0, stalls: 0, stalled: Duration::ZERO }),
            room: Condvar::new(),
            appended: Notify::new(),
        });
        let (writer, rx) = std::sync::mpsc::sync_channel(WRITE_QUEUE_MAX);
        let s = shared.clone();
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer_thread(s, rx))
            .map_err(io_at(dir))?;
        Ok(Journal { shared, writer })
    }

    pub fn client_id(&self) -> u64 {
        self.shared.client_id
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Appends a batch; resolves with its sequence number once it is
    /// durable. Waits while the journal is full.
    pub async fn append(&self, events: Vec<TimedEvent>) -> Result<u64, JournalError> {
        self.submit(events).await?.await.map_err(|_| JournalError::WriterStopped)
    }

    /// Queues a batch for the writer, waiting while its queue is full; the
    /// receiver gets the batch's sequence number once it is durable.
    /// Batches are journaled in the order they are submitted.
    pub async fn submit(&self, events: Vec<TimedEvent>) -> Result<oneshot::Receiver<u64>, JournalError> {
        let (done, rx) = oneshot::channel();
        let append = Append { events, done };
        // Fast path: room in the queue. Otherwise block off the workers.
        let append = match self.writer.try_send(append) {
            Ok(()) => return Ok(rx),
            Err(std::sync::mpsc::TrySendError::Full(a)) => a,
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(JournalError::WriterStopped),
        };
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || writer.send(append))
            .await
            .map_err(|_| JournalError::WriterStopped)?
            .map_err(|_| JournalError::WriterStopped)?;
        Ok(rx)
    }

    /// The oldest batch with a sequence number above `after`, waiting until
    /// one is durable.
    pub async fn next_after(&self, after: u64) -> Result<EventBatch, JournalError> {
        loop {
            let notified = self.shared.appended.notified();
            let found = {
                let st = self.shared.state.lock().expect("journal lock");
                let first = st.entries.front().map_or(st.next_seq, |e| e.seq);
                let want = after.max(first.saturating_sub(1)) + 1;
                st.entries.get((want - first) as usize).map(|e| {
                    let seg = st.segments.iter().find(|s| s.first_seq == e.segment).expect("an entry's segment exists");
                    (seg.file.clone(), seg.path.clone(), e.offset, e.len)
                })
            };
            if let Some((file, path, offset, len)) = found {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset + ENTRY_HEADER_BYTES).map_err(io_at(&path))?;
                return decode_record(&buf).map_err(|e| JournalError::Corrupt { path, offset, why: e.to_string() });
            }
            notified.await;
        }
    }

    /// Forgets every batch up to `seq` (committed on the site): frees its
    /// room and deletes segments that hold nothing else.
    pub fn trim(&self, seq: u64) {
        let mut removed = Vec::new();
        {
            let mut st = self.shared.state.lock().expect("journal lock");
            while st.entries.front().is_some_and(|e| e.seq <= seq) {
                let e = st.entries.pop_front().expect("checked");
                st.bytes -= u64::from(e.len) + ENTRY_HEADER_BYTES;
            }
            while st.segments.len() > 1 && st.segments[0].last_seq.is_some_and(|l| l <= seq) {
                removed.push(st.segments.pop_front().expect("checked").path);
            }
        }
        self.shared.room.notify_all();
        for path in removed {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("remove shipped journal segment {}: {e}", path.display());
            }
        }
    }

    pub fn stats(&self) -> JournalStats {
        let st = self.shared.state.lock().expect("journal lock");
        JournalStats {
            bytes: st.bytes,
            bytes_max: self.shared.bytes_max,
            batches: st.entries.len() as u64,
            oldest_time_ns: st.entries.front().map(|e| e.time_ns),
            next_seq: st.next_seq,
            appended: st.appended,
            stalls: st.stalls,
            stalled: st.stalled,
            segments: st.segments.len(),
        }
    }

    /// The sequence numbers still held: (first, last), or None when empty.
    pub fn held(&self) -> Option<(u64, u64)> {
        let st = self.shared.state.lock().expect("journal lock");
        Some((st.entries.front()?.seq, st.entries.back()?.seq))
    }
}

/// Takes the folder's exclusive lock (`lock`, flock): one tap per journal.
fn lock_dir(dir: &Path) -> Result<File, JournalError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_at(&path))?;
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(JournalError::Busy { dir: dir.to_path_buf() });
        }
        return Err(JournalError::Io { path, source: e });
    }
    Ok(file)
}

fn identity(dir: &Path, group: &str, new_client_id: impl FnOnce() -> u64) -> Result<u64, JournalError> {
    let path = dir.join("identity");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut words = text.split_whitespace();
            let id = words.next().and_then(|w| u64::from_str_radix(w, 16).ok());
            let found = words.next().unwrap_or("").to_string();
            let Some(id) = id else {
                return Err(JournalError::Corrupt { path, offset: 0, why: format!("identity {text:?} is not `<hex client id> <group>`") });
            };
            if found != group {
                return Err(JournalError::OtherGroup { dir: dir.to_path_buf(), found, wanted: group.to_string() });
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = new_client_id();
            let tmp = dir.join("identity.tmp");
            let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
            writeln!(f, "{id:016x} {group}").map_err(io_at(&tmp))?;
            f.sync_all().unwrap_or_else(|e| fatal_sync(&tmp, e));
            std::fs::rename(&tmp, &path).map_err(io_at(&path))?;
            sync_dir(dir)?;
            Ok(id)
        }
        Err(e) => Err(JournalError::Io { path, source: e }),
    }
}

fn create_segment(dir: &Path, path: &Path) -> Result<File, JournalError> {
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(io_at(path))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Reads and checks the entry at `offset`: the batch and its record's
/// length. The error says why the entry is bad.
/// An entry that did not read back whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadEntry {
    /// Its header or bytes run past the end of the file: an append a crash
    /// cut short, which was never acknowledged.
    Torn(String),
    /// It is all there but fails its checks (checksum, validation, a
    /// length no batch can have): damage to what may be an acknowledged
    /// write.
    Damaged(String),
}

/// What opening a journal does with a bad entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Cut the segment at the entry: a torn tail.
    Cut,
    /// Refuse to open, naming the file and offset.
    Refuse,
}

/// The rule for a bad entry: only a torn entry in the newest segment, which
/// can only be the unacknowledged tail, is cut; damage anywhere, and a
/// torn entry in an older segment, refuse the open. (The simulation's
/// journal applies this same rule.)
pub fn recovery(bad: &BadEntry, newest_segment: bool) -> Recovery {
    #[cfg(feature = "simulation-bugs")]
    if newest_segment && bugs::CUT_DAMAGED_ENTRY.load(std::sync::atomic::Ordering::Relaxed) {
        return Recovery::Cut;
    }
    match bad {
        BadEntry::Torn(_) if newest_segment => Recovery::Cut,
        _ => Recovery::Refuse,
    }
}

/// Known bugs the simulation puts back to show it finds them. Built only
/// with the `simulation-bugs` feature; every switch is off unless set.
#[cfg(feature = "simulation-bugs")]
pub mod bugs {
    use std::sync::atomic::AtomicBool;

    /// Open cuts the newest segment at its first bad entry, torn or
    /// damaged (as before session 7): a flipped bit in an acknowledged
    /// entry then drops it and every entry after it.
    pub static CUT_DAMAGED_ENTRY: AtomicBool = AtomicBool::new(false);
}

fn read_entry(file: &File, offset: u64, file_len: u64) -> Result<(EventBatch, u32), BadEntry> {
    if offset + ENTRY_HEADER_BYTES > file_len {
        return Err(BadEntry::Torn(format!("{} bytes left, less than an entry header", file_len - offset)));
    }
    let mut head = [0u8; 4];
    file.read_exact_at(&mut head, offset).map_err(|e| BadEntry::Damaged(e.to_string()))?;
    let len = u64::from(u32::from_le_bytes(head));
    if len > (FRAME_BODY_BYTES_MAX as u64) * 2 {
        return Err(BadEntry::Damaged(format!("entry length {len} is past any batch's size")));
    }
    if offset + ENTRY_HEADER_BYTES + len > file_len {
        return Err(BadEntry::Torn(format!("entry of {len} bytes runs past the end of the file")));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset + ENTRY_HEADER_BYTES).map_err(|e| BadEntry::Damaged(e.to_string()))?;
    let batch = decode_record::<EventBatch>(&buf).map_err(|e| BadEntry::Damaged(format!("entry of {len} bytes fails its checks: {e}")))?;
    Ok((batch, len as u32))
}

/// The writer: takes appends in order, waits for room, writes them to the
/// newest segment, syncs once per round, then publishes and answers them.
fn writer_thread(shared: Arc<Shared>, rx: std::sync::mpsc::Receiver<Append>) {
    let mut written: Vec<(Entry, oneshot::Sender<u64>)> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut round = vec![first];
        let mut round_bytes = 0usize;
        while round_bytes < ROUND_BYTES_MAX {
            match rx.try_recv() {
                Ok(a) => {
                    round_bytes += a.events.iter().map(|e| e.event.payload_bytes()).sum::<usize>();
                    round.push(a);
                }
                Err(_) => break,
            }
        }
        for append in round {
            let seq = shared.state.lock().expect("journal lock").next_seq;
            let batch = EventBatch { group: shared.group.clone(), client_id: shared.client_id, seq, events: append.events };
            let record = encode_record(&batch).expect("a checked batch encodes");
            let need = record.len() as u64 + ENTRY_HEADER_BYTES;
            wait_for_room(&shared, need, &mut written);
            let time_ns = batch.events.first().map_or(0, |e| e.time_ns);
            let (file, path, offset, segment) = {
                let mut st = shared.state.lock().expect("journal lock");
                if st.segments.back().expect("one segment").bytes >= shared.segment_bytes {
                    drop(st);
                    publish(&shared, &mut written);
                    st = shared.state.lock().expect("journal lock");
                    let path = shared.dir.join(segment_name(seq));
                    match create_segment(&shared.dir, &path) {
                        Ok(file) => st.segments.push_back(Segment { first_seq: seq, path, file: Arc::new(file), last_seq: None, bytes: 0 }),
                        Err(e) => fatal_write(&e.to_string()),
                    }
                }
                let seg = st.segments.back_mut().expect("one segment");
                let offset = seg.bytes;
                seg.bytes += need;
                seg.last_seq = Some(seq);
                st.next_seq += 1;
                let seg = st.segments.back().expect("one segment");
                (seg.file.clone(), seg.path.clone(), offset, seg.first_seq)
            };
            let mut entry = (record.len() as u32).to_le_bytes().to_vec();
            entry.extend_from_slice(&record);
            if let Err(e) = file.write_all_at(&entry, offset) {
                fatal_write(&format!("write {}: {e}", path.display()));
            }
            written.push((Entry { seq, segment, offset, len: record.len() as u32, time_ns }, append.done));
        }
        publish(&shared, &mut written);
    }
}

/// A journal that cannot be written cannot keep what the guest is told.
fn fatal_write(why: &str) -> ! {
    tracing::error!("journal write failed: {why}; stopping the tap");
    eprintln!("rewind tap: journal write failed: {why}; stopping");
    std::process::abort();
}

/// Syncs the newest segment, then makes the written entries visible to the
/// shipper and answers their appends.
fn publish(shared: &Shared, written: &mut Vec<(Entry, oneshot::Sender<u64>)>) {
    if written.is_empty() {
        return;
    }
    let segment = written[0].0.segment;
    let (file, path) = {
        let st = shared.state.lock().expect("journal lock");
        let s = st.segments.iter().find(|s| s.first_seq == segment).expect("segment exists");
        (s.file.clone(), s.path.clone())
    };
    // Only the newest segment is written to; a rotation publishes first.
    file.sync_data().unwrap_or_else(|e| fatal_sync(&path, e));
    let mut answers = Vec::with_capacity(written.len());
    {
        let mut st = shared.state.lock().expect("journal lock");
        for (entry, done) in written.drain(..) {
            st.bytes += u64::from(entry.len) + ENTRY_HEADER_BYTES;
            st.appended += 1;
            answers.push((entry.seq, done));
            st.entries.push_back(entry);
        }
    }
    shared.appended.notify_waiters();
    for (seq, done) in answers {
        let _ = done.send(seq);
    }
}

/// Blocks until `need` more bytes fit under the bound (always when the
/// journal holds nothing). What was written so far is published first, so
/// the shipper can make the room.
// The journal's files run only in production (the simulation models the
// journal's rules in memory); the stall time it reads is a metric.
#[allow(clippy::disallowed_methods)]
fn wait_for_room(shared: &Shared, need: u64, written: &mut Vec<(Entry, oneshot::Sender<u64>)>) {
    let pending: u64 = written.iter().map(|(e, _)| u64::from(e.len) + ENTRY_HEADER_BYTES).sum();
    {
        let st = shared.state.lock().expect("journal lock");
        if st.bytes + pending + need <= shared.bytes_max || (st.entries.is_empty() && written.is_empty()) {
            return;
        }
    }
    publish(shared, written);
    let started = Instant::now();
    let mut st = shared.state.lock().expect("journal lock");
    st.stalls += 1;
    tracing::info!(bytes = st.bytes, bytes_max = shared.bytes_max, "journal full: the guest waits until the site takes more");
    while st.bytes + need > shared.bytes_max && !st.entries.is_empty() {
        st = shared.room.wait_timeout(st, Duration::from_millis(500)).expect("journal lock").0;
    }
    st.stalled += started.elapsed();
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests of real files run on tokio and the wall clock
mod tests {
    use super::*;
    use rewind_wire::event::Event;

    /// Opens a journal just dropped: its writer thread lets go of the
    /// folder's lock a moment after the last handle is gone.
    fn reopen(dir: &Path, group: &str) -> Result<Journal, JournalError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Journal::open(dir, group, JOURNAL_BYTES_MIN, || 7) {
                Err(JournalError::Busy { .. }) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                other => return other,
            }
        }
    }

    fn events(n: usize, fill: u8) -> Vec<TimedEvent> {
        (0..n)
            .map(|i| TimedEvent { time_ns: 1000 + i as u64, event: Event::Write { disk: "d".into(), offset: (i as u64) * 4096, data: vec![fill; 4096] } })
            .collect()
    }

    #[tokio::test]
    async fn appends_are_read_back_in_order_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "g", JOURNAL_BYTES_MIN, || 7).unwrap();
        for i in 0..10u8 {
            assert_eq!(j.append(events(3, i)).await.unwrap(), u64::from(i) + 1);
        }
        let b = j.next_after(4).await.unwrap();
        assert_eq!((b.seq, b.client_id, b.group.as_str()), (5, 7, "g"));
        j.trim(6);
        assert_eq!(j.held(), Some((7, 10)));
        drop(j);
        let j = reopen(dir.path(), "g").unwrap();
        // Trimmed batches in the newest segment are held again after a
        // reopen; the shipper asks the site what it has and trims them.
        assert_eq!(j.held(), Some((1, 10)));
        assert_eq!(j.append(events(1, 9)).await.unwrap(), 11);
        let b = j.next_after(10).await.unwrap();
        assert_eq!(b.events[0].event, events(1, 9)[0].event);
        assert!(matches!(Journal::open(dir.path(), "g", JOURNAL_BYTES_MIN, || 1), Err(JournalError::Busy { .. })), "a second tap on one journal");
        drop(j);
        assert!(matches!(reopen(dir.path(), "other"), Err(JournalError::OtherGroup { .. })));
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_damage_elsewhere_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "g", JOURNAL_BYTES_MIN, || 7).unwrap();
        for i in 0..3u8 {
            j.append(events(2, i)).await.unwrap();
        }
        drop(j);
        let seg = dir.path().join(segment_name(1));
        let len = std::fs::metadata(&seg).unwrap().len();
        // A half-written fourth entry.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[200, 0, 0, 0, 1, 2, 3], len).unwrap();
        let j = reopen(dir.path(), "g").unwrap();
        assert_eq!(j.held(), Some((1, 3)));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
        drop(j);
        // A flipped byte inside the second entry of an older segment.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[0xff], len / 2).unwrap();
        std::fs::write(dir.path().join(segment_name(4)), b"").unwrap();
        match reopen(dir.path(), "g") {
            Err(JournalError::Corrupt { offset, .. }) => assert!(offset > 0 && offset < len),
            other => panic!("expected corruption, got {:?}", other.map(|_| ())),
        }
    }

    /// Three acknowledged appends, then one byte flipped inside each entry
    /// in turn (the newest segment, the first and the last entry too): the
    /// open is refused with the file and the entry's offset, and the
    /// segment is left as it was, byte for byte.
    #[tokio::test]
    async fn a_damaged_whole_entry_refuses_the_open_and_cuts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "g", JOURNAL_BYTES_MIN, || 7).unwrap();
        let mut ends = vec![0u64];
        let seg = dir.path().join(segment_name(1));
        for i in 0..3u8 {
            j.append(events(2, i)).await.unwrap();
            ends.push(std::fs::metadata(&seg).unwrap().len());
        }
        drop(j);
        let good = std::fs::read(&seg).unwrap();
        for entry in 0..3 {
            let (start, end) = (ends[entry], ends[entry + 1]);
            let mut bad = good.clone();
            // Past the header and the checksum: a payload byte.
            let at = (start + ENTRY_HEADER_BYTES + 20 + (end - start) / 2) as usize;
            bad[at.min(end as usize - 1)] ^= 0x40;
            std::fs::write(&seg, &bad).unwrap();
            match reopen(dir.path(), "g") {
                Err(e @ JournalError::Corrupt { .. }) => {
                    let JournalError::Corrupt { ref path, offset, .. } = e else { unreachable!() };
                    assert_eq!((path.as_path(), offset), (seg.as_path(), start), "entry {entry}");
                    let text = e.to_string();
                    assert!(text.contains("will not start") && text.contains(&format!("byte {start}")), "{text}");
                }
                other => panic!("entry {entry}: expected a refusal, got {:?}", other.map(|j| j.held())),
            }
            assert_eq!(std::fs::read(&seg).unwrap(), bad, "entry {entry}: the segment must be left alone");
        }
        std::fs::write(&seg, &good).unwrap();
        assert_eq!(reopen(dir.path(), "g").unwrap().held(), Some((1, 3)));
    }

    #[test]
    fn only_a_torn_entry_of_the_newest_segment_is_cut() {
        let torn = BadEntry::Torn("short".into());
        let damaged = BadEntry::Damaged("checksum".into());
        assert_eq!(recovery(&torn, true), Recovery::Cut);
        assert_eq!(recovery(&torn, false), Recovery::Refuse);
        assert_eq!(recovery(&damaged, true), Recovery::Refuse);
        assert_eq!(recovery(&damaged, false), Recovery::Refuse);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// A segment of garbage (alone, or after good entries) is cut or
        /// refused at open, never a panic and never a batch.
        #[test]
        fn garbage_segments_are_cut_or_refused(garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000), newest in proptest::prelude::any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("identity"), "0000000000000007 g\n").unwrap();
            std::fs::write(dir.path().join(segment_name(1)), &garbage).unwrap();
            if !newest {
                std::fs::write(dir.path().join(segment_name(2)), b"").unwrap();
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                match Journal::open(dir.path(), "g", JOURNAL_BYTES_MIN, || 7) {
                    Ok(j) => assert_eq!(j.held(), None),
                    Err(JournalError::Corrupt { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            });
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_journal_holds_appends_until_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), "g", JOURNAL_BYTES_MIN, || 7).unwrap();
        // 1 MiB batches: about 16 fit.
        let big = |i: u8| vec![TimedEvent { time_ns: 1, event: Event::Write { disk: "d".into(), offset: 0, data: vec![i; 1 << 20] } }];
        let mut seqs = Vec::new();
        for i in 0..15u8 {
            seqs.push(j.append(big(i)).await.unwrap());
        }
        let j2 = j.clone();
        let blocked = tokio::spawn(async move {
            let mut last = 0;
            for i in 0..4u8 {
                last = j2.append(big(i)).await.unwrap();
            }
            last
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!blocked.is_finished(), "appends past the bound must wait");
        assert!(j.stats().bytes <= JOURNAL_BYTES_MIN);
        j.trim(10);
        let last = tokio::time::timeout(Duration::from_secs(10), blocked).await.unwrap().unwrap();
        assert_eq!(last, 19);
        let s = j.stats();
        assert!(s.stalls >= 1 && s.bytes <= JOURNAL_BYTES_MIN, "{s:?}");
        assert!(s.segments >= 2 && std::fs::read_dir(dir.path()).unwrap().count() >= 2);
    }
}
