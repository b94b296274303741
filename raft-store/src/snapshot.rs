//! Snapshots: built cheaply as RocksDB checkpoints, streamed as files only
//! when a follower needs one, in bounded pieces.
//!
//! Building a snapshot flushes the state machine and takes a checkpoint of
//! the database (`<name>.ckpt/`: hard links to the immutable table and blob
//! files, so its cost does not grow with the state's size). A `.meta` file
//! beside it holds the snapshot's metadata as a checksummed record.
//!
//! The payload segments its events name are hard-linked beside it
//! (`<name>.segs/`), taken under the segments' snapshot lock, so the
//! collector cannot delete one between the checkpoint and the links.
//!
//! To send one, the checkpoint is opened read-only and written as a stream
//! file: `RWSNAP01`, then records `cf(1) klen(4) vlen(4) key value` for every
//! key of the state machine's column families, then `0xFF` and the blake3
//! hash of everything before it. An event whose payload lies in a segment
//! goes whole (read from the linked segments), and `segrefs`, which names
//! this replica's own segments, is left out: a follower's segments are its
//! own. A follower receives that file (`.snap`), checks the hash before
//! changing anything, and installs it.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::alias::SnapshotOf;
use openraft::RaftSnapshotBuilder;
use rewind_wire::frame::{decode_record, encode_record};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};

use crate::codec::{self, SnapshotMeta};
use crate::db::{cf, CF_EVENTS, CF_META, CF_SEGREFS, SM_CFS};
use crate::segments::{EventRecord, Segments};
use crate::sm::{MembershipRecord, KEY_APPLIED, KEY_MEMBERSHIP};
use crate::{corrupt, fsync_failed, io_err, TypeConfig};

const MAGIC: &[u8; 8] = b"RWSNAP01";
const END: u8 = 0xFF;
const KEY_INSTALLING: &[u8] = b"installing-snapshot";
/// Longest key and value a snapshot record may hold.
const KEY_BYTES_MAX: usize = 1024;
const VALUE_BYTES_MAX: usize = 8 << 20;
/// Largest write batch an install builds before writing it.
const INSTALL_BATCH_BYTES_MAX: usize = 4 << 20;
const IO_BUFFER_BYTES: usize = 1 << 20;

/// A complete snapshot on disk: a checkpoint directory (built here) or a
/// stream file (received from a leader). Cheap to move around: the data
/// stays on disk.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

impl SnapshotFile {
    /// Checks a stream file's trailer hash, reading it in bounded pieces.
    /// Returns its size in bytes.
    pub fn verify(&self) -> io::Result<u64> {
        verify(&self.path)
    }

    /// A stream file of this snapshot, ready to send. For a checkpoint it is
    /// written to `<scratch>` (the caller removes it after sending); a stream
    /// file is returned as it is. Either way it has been verified.
    pub fn stream_for_send(&self, scratch: &Path) -> io::Result<(PathBuf, bool)> {
        if !self.path.is_dir() {
            verify(&self.path)?;
            return Ok((self.path.clone(), false));
        }
        let opts = rocksdb::Options::default();
        let names = DB::list_cf(&opts, &self.path).map_err(io_err)?;
        let db = DB::open_cf_for_read_only(&opts, &self.path, names, false).map_err(io_err)?;
        write_stream(&db, &self.path.with_extension("segs"), scratch)?;
        drop(db);
        verify(scratch)?;
        Ok((scratch.to_path_buf(), true))
    }
}

pub(crate) struct Snapshots {
    db: Arc<DB>,
    segs: Arc<Segments>,
    dir: PathBuf,
}

pub struct SnapshotBuilder {
    db: Arc<DB>,
    segs: Arc<Segments>,
    dir: PathBuf,
}

fn snapshot_name(meta: &SnapshotMeta) -> String {
    match &meta.last_log_id {
        Some(l) => format!("{:020}-{}-{}", l.index, l.leader_id.term, l.leader_id.node_id),
        None => format!("{:020}-0-0", 0),
    }
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        fsync_failed("syncing the snapshot directory", e);
    }
}

fn sync_file(file: &File, what: &str) {
    if let Err(e) = file.sync_all() {
        fsync_failed(what, e);
    }
}

/// Removes every snapshot in `dir` older than `keep`, and stray temp files
/// (a stream being sent is named `.sending` and left alone).
fn remove_older(dir: &Path, keep: &str) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let stem = name.split('.').next().unwrap_or_default().to_string();
        let is_snapshot = name.ends_with(".snap") || name.ends_with(".meta") || name.ends_with(".ckpt") || name.ends_with(".segs");
        if (is_snapshot && stem.as_str() < keep) || name.ends_with(".tmp") || name.ends_with(".segs-tmp") {
            let path = dir.join(&name);
            let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        }
    }
    Ok(())
}

fn verify(path: &Path) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    if len < (MAGIC.len() + 33) as u64 {
        return Err(corrupt("snapshot file", format!("{} bytes is too short", len)));
    }
    let body_len = len - 32;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; IO_BUFFER_BYTES];
    let mut left = body_len;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        file.read_exact(&mut buf[..n])?;
        if left == body_len && buf[..MAGIC.len()] != MAGIC[..] {
            return Err(corrupt("snapshot file", "bad magic"));
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    let mut sum = [0u8; 32];
    file.read_exact(&mut sum)?;
    if hasher.finalize().as_bytes() != &sum {
        return Err(corrupt("snapshot file", "checksum mismatch"));
    }
    Ok(len)
}

/// Hashes what passes through it.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn read_membership(db: &DB) -> io::Result<rewind_wire::raft::SnapshotMeta> {
    let (applied, membership) = crate::sm::read_applied_records(db)?;
    let membership = membership.unwrap_or(MembershipRecord { log_id: None, membership: Default::default() });
    Ok(rewind_wire::raft::SnapshotMeta {
        last_log_id: applied,
        last_membership_log_id: membership.log_id,
        last_membership: membership.membership,
    })
}

/// Builds a snapshot: a checkpoint of the database, whose applied index and
/// membership are read from the checkpoint itself so they match its data.
// The clock only makes a temporary file's name unique; no time reaches the
// state.
#[allow(clippy::disallowed_methods)]
fn build_blocking(db: &DB, segs: &Segments, dir: &Path) -> io::Result<SnapshotOf<TypeConfig, SnapshotFile>> {
    // Durable state first: openraft purges the log behind this snapshot.
    crate::db::flush_state_machine(db)?;
    let tmp = dir.join(format!("build-{:x}.tmp", std::process::id() as u64 ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)));
    let tmp_segs = tmp.with_extension("segs-tmp");
    {
        let _held = segs.snapshot_lock();
        rocksdb::checkpoint::Checkpoint::new(db).and_then(|c| c.create_checkpoint(&tmp)).map_err(io_err)?;
        segs.link_all(&tmp_segs)?;
    }
    let wire_meta = {
        let opts = rocksdb::Options::default();
        let names = DB::list_cf(&opts, &tmp).map_err(io_err)?;
        let view = DB::open_cf_for_read_only(&opts, &tmp, names, false).map_err(io_err)?;
        read_membership(&view)?
    };
    let meta = codec::snapshot_meta_from_wire(&wire_meta).map_err(|e| corrupt("snapshot meta", e))?;
    let name = snapshot_name(&meta);
    let path = dir.join(format!("{name}.ckpt"));
    if path.exists() {
        fs::remove_dir_all(&tmp)?;
        fs::remove_dir_all(&tmp_segs)?;
    } else {
        // The segments first: a checkpoint is never without them.
        let linked = path.with_extension("segs");
        if linked.exists() {
            fs::remove_dir_all(&linked)?;
        }
        fs::rename(&tmp_segs, &linked)?;
        fs::rename(&tmp, &path)?;
    }
    write_meta(dir, &name, &wire_meta)?;
    sync_dir(dir);
    remove_older(dir, &name)?;
    tracing::info!(snapshot = %name, "built snapshot (checkpoint)");
    Ok(SnapshotOf::<TypeConfig, SnapshotFile> { meta, snapshot: SnapshotFile { path } })
}

/// Writes the state machine's column families of `db` as a stream file.
fn write_stream(db: &DB, segs: &Path, out_path: &Path) -> io::Result<()> {
    let file = File::create(out_path)?;
    let mut out = HashingWriter { inner: BufWriter::with_capacity(IO_BUFFER_BYTES, file), hasher: blake3::Hasher::new() };
    out.write_all(MAGIC)?;
    for (i, name) in SM_CFS.iter().enumerate() {
        if *name == CF_SEGREFS {
            continue;
        }
        let handle = db.cf_handle(name).ok_or_else(|| corrupt("snapshot source", format!("no column family {name}")))?;
        for item in db.iterator_cf(handle, IteratorMode::Start) {
            let (k, mut v) = item.map_err(io_err)?;
            // Only a record with the segment magic can name a payload; a
            // whole record goes as it is, undecoded.
            if *name == CF_EVENTS && v.starts_with(crate::segments::EVENT_MAGIC) {
                let record = EventRecord::parse(&v)?;
                if record.loc.is_some() {
                    let whole = record.load(|l| crate::segments::read_in(segs, l))?;
                    v = encode_record(&whole).map_err(io_err)?.into_boxed_slice();
                }
            }
            out.write_all(&[i as u8])?;
            out.write_all(&(k.len() as u32).to_le_bytes())?;
            out.write_all(&(v.len() as u32).to_le_bytes())?;
            out.write_all(&k)?;
            out.write_all(&v)?;
        }
    }
    out.write_all(&[END])?;
    let sum = *out.hasher.finalize().as_bytes();
    let mut writer = out.inner;
    writer.write_all(&sum)?;
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    sync_file(&file, "writing a snapshot stream");
    Ok(())
}

fn write_meta(dir: &Path, name: &str, meta: &rewind_wire::raft::SnapshotMeta) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.meta.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(&encode_record(meta).map_err(io_err)?)?;
    sync_file(&file, "writing snapshot metadata");
    fs::rename(&tmp, dir.join(format!("{name}.meta")))
}

/// Reads the records of a verified snapshot file, one at a time.
struct RecordReader {
    input: BufReader<File>,
}

/// One key-value pair of a snapshot stream: (column family index, key, value).
type StreamRecord = (usize, Vec<u8>, Vec<u8>);

impl RecordReader {
    fn open(path: &Path) -> io::Result<RecordReader> {
        let mut input = BufReader::with_capacity(IO_BUFFER_BYTES, File::open(path)?);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(corrupt("snapshot file", "bad magic"));
        }
        Ok(RecordReader { input })
    }

    /// The next (column family index, key, value), or None at the end.
    fn next_record(&mut self) -> io::Result<Option<StreamRecord>> {
        let mut tag = [0u8; 1];
        self.input.read_exact(&mut tag)?;
        if tag[0] == END {
            return Ok(None);
        }
        let cf_index = tag[0] as usize;
        if cf_index >= SM_CFS.len() {
            return Err(corrupt("snapshot record", format!("unknown column family {cf_index}")));
        }
        let mut lens = [0u8; 8];
        self.input.read_exact(&mut lens)?;
        let klen = u32::from_le_bytes(lens[..4].try_into().expect("4")) as usize;
        let vlen = u32::from_le_bytes(lens[4..].try_into().expect("4")) as usize;
        if klen > KEY_BYTES_MAX || vlen > VALUE_BYTES_MAX {
            return Err(corrupt("snapshot record", format!("key {klen} / value {vlen} bytes over the limits")));
        }
        let mut key = vec![0u8; klen];
        self.input.read_exact(&mut key)?;
        let mut value = vec![0u8; vlen];
        self.input.read_exact(&mut value)?;
        Ok(Some((cf_index, key, value)))
    }
}

/// Replaces the state machine's tables with a verified snapshot file. Safe
/// to run again after a crash part way through.
fn install_blocking(db: &DB, path: &Path, meta: &rewind_wire::raft::SnapshotMeta) -> io::Result<()> {
    let all = [0xFFu8; 2 * KEY_BYTES_MAX];
    for name in SM_CFS {
        db.delete_range_cf(cf(db, name), [].as_slice(), all.as_slice()).map_err(io_err)?;
    }
    let mut reader = RecordReader::open(path)?;
    let mut batch = WriteBatch::default();
    while let Some((i, k, v)) = reader.next_record()? {
        // Segments are a replica's own: a stream naming them is refused.
        if SM_CFS[i] == CF_SEGREFS || (SM_CFS[i] == CF_EVENTS && v.starts_with(crate::segments::EVENT_MAGIC) && EventRecord::parse(&v)?.loc.is_some()) {
            return Err(corrupt("snapshot record", "it names payload segments of another replica"));
        }
        batch.put_cf(cf(db, SM_CFS[i]), k, v);
        if batch.size_in_bytes() >= INSTALL_BATCH_BYTES_MAX {
            db.write(std::mem::take(&mut batch)).map_err(io_err)?;
        }
    }
    let sm = cf(db, crate::db::CF_SM);
    match &meta.last_log_id {
        Some(l) => batch.put_cf(sm, KEY_APPLIED, encode_record(l).map_err(io_err)?),
        None => batch.delete_cf(sm, KEY_APPLIED),
    }
    let membership = MembershipRecord { log_id: meta.last_membership_log_id, membership: meta.last_membership.clone() };
    batch.put_cf(sm, KEY_MEMBERSHIP, encode_record(&membership).map_err(io_err)?);
    batch.delete_cf(cf(db, CF_META), KEY_INSTALLING);
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    if let Err(e) = db.write_opt(batch, &opts) {
        fsync_failed("finishing a snapshot install", e);
    }
    Ok(())
}

impl Snapshots {
    pub(crate) fn open(db: Arc<DB>, segs: Arc<Segments>, dir: PathBuf) -> io::Result<Snapshots> {
        // Streams left by sends that a crash interrupted.
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "sending") {
                let _ = fs::remove_file(&path);
            }
        }
        let snapshots = Snapshots { db, segs, dir };
        if let Some(name) = snapshots.db.get_cf(cf(&snapshots.db, CF_META), KEY_INSTALLING).map_err(io_err)? {
            let name = String::from_utf8_lossy(&name).into_owned();
            tracing::warn!(snapshot = %name, "finishing a snapshot install that was interrupted");
            let meta = snapshots.read_meta(&name)?;
            install_blocking(&snapshots.db, &snapshots.dir.join(format!("{name}.snap")), &meta)?;
        }
        Ok(snapshots)
    }

    fn read_meta(&self, name: &str) -> io::Result<rewind_wire::raft::SnapshotMeta> {
        let bytes = fs::read(self.dir.join(format!("{name}.meta")))?;
        decode_record(&bytes).map_err(|e| corrupt("snapshot meta", e))
    }

    pub(crate) fn builder(&self) -> SnapshotBuilder {
        SnapshotBuilder { db: self.db.clone(), segs: self.segs.clone(), dir: self.dir.clone() }
    }

    pub(crate) async fn install(&self, meta: &SnapshotMeta, file: SnapshotFile) -> io::Result<()> {
        let db = self.db.clone();
        let dir = self.dir.clone();
        let wire_meta = codec::snapshot_meta_to_wire(meta);
        let name = snapshot_name(meta);
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            // A checkpoint (ours, or one handed over in-process) is first
            // written out as a stream, so every install reads the same format.
            let file = if file.path.is_dir() {
                let scratch = dir.join(format!("{name}.from-checkpoint.tmp"));
                let (path, _) = file.stream_for_send(&scratch)?;
                SnapshotFile { path }
            } else {
                file
            };
            verify(&file.path)?;
            let path = dir.join(format!("{name}.snap"));
            if file.path != path {
                fs::rename(&file.path, &path)?;
            }
            write_meta(&dir, &name, &wire_meta)?;
            sync_dir(&dir);
            let mut opts = WriteOptions::default();
            opts.set_sync(true);
            if let Err(e) = db.put_cf_opt(cf(&db, CF_META), KEY_INSTALLING, name.as_bytes(), &opts) {
                fsync_failed("marking a snapshot install", e);
            }
            install_blocking(&db, &path, &wire_meta)?;
            remove_older(&dir, &name)?;
            tracing::info!(snapshot = %name, "installed snapshot");
            Ok(())
        })
        .await
        .map_err(io_err)?
    }

    pub(crate) fn current(&self) -> io::Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>> {
        let mut newest: Option<String> = None;
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".meta") {
                if newest.as_deref().is_none_or(|n| stem > n) {
                    newest = Some(stem.to_string());
                }
            }
        }
        let Some(name) = newest else { return Ok(None) };
        let meta = codec::snapshot_meta_from_wire(&self.read_meta(&name)?).map_err(|e| corrupt("snapshot meta", e))?;
        let checkpoint = self.dir.join(format!("{name}.ckpt"));
        let path = if checkpoint.is_dir() { checkpoint } else { self.dir.join(format!("{name}.snap")) };
        Ok(Some(SnapshotOf::<TypeConfig, SnapshotFile> { meta, snapshot: SnapshotFile { path } }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<TypeConfig, SnapshotFile>> {
        let (db, segs) = (self.db.clone(), self.segs.clone());
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || build_blocking(&db, &segs, &dir)).await.map_err(io_err)?
    }
}
