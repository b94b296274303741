//! Reconstructing a disk as it was at a point in its group's log, and
//! handing it over.
//!
//! Replay reads a disk as of one LSN through a [`BlockSource`], which
//! `node` implements over `raft-store`'s block index (on this node or
//! another one). The index makes each block a seek, so the cost of a replay
//! grows with the disk's size, not with the length of its history; the
//! source checks every block against its blake3 before handing it over.
//!
//! Built: [`write_image`], a raw image file (sparse where the disk reads as
//! zeroes) with a blake3 of the whole image; [`read_bytes`];
//! [`ReplayExport`], the disk as an NBD export (served by `rewind-nbd`'s
//! server); and [`Overlay`], the copy-on-write layer that makes such an
//! export writable without touching the log.
//!
//! Replay never writes the log, never resolves a target (the node's
//! request handler does), and does no network I/O of its own.

use std::os::unix::fs::FileExt;
use std::path::Path;

pub use futures::future::BoxFuture;
use futures::StreamExt;

pub mod export;
pub use export::ReplayExport;

/// Why a read of the disk failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source will not serve this read (the LSN is not applied there
    /// yet, the disk is unknown, ...): another source, or later, may.
    #[error("{0}")]
    Refused(String),
    /// The source's copy failed its checks: other copies may be good.
    #[error("{0}")]
    Damaged(String),
    /// The source did not answer.
    #[error("{0}")]
    Unreachable(String),
    /// The source answered with a piece that does not fit the read.
    #[error("{0}")]
    BadPiece(String),
    #[error("write {offset}+{len} is past the end of the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("overlay {path}: {source}")]
    Overlay { path: String, source: std::io::Error },
}

/// `len` bytes of a disk: runs (offset in the piece, bytes) that may be
/// non-zero, in order and not overlapping; the rest reads as zeroes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Piece {
    pub len: u64,
    pub runs: Vec<(u64, Vec<u8>)>,
}

impl Piece {
    /// Checks that the runs lie inside the piece, in order.
    pub fn check(&self) -> Result<(), SourceError> {
        let mut at = 0u64;
        for (offset, bytes) in &self.runs {
            let end = offset.checked_add(bytes.len() as u64).filter(|e| *e <= self.len);
            match end {
                Some(end) if *offset >= at => at = end,
                _ => return Err(SourceError::BadPiece(format!("run at {offset} of {} bytes does not fit a piece of {} bytes in order", bytes.len(), self.len))),
            }
        }
        Ok(())
    }
}

/// A disk as of one LSN, read in pieces.
pub trait BlockSource: Send + Sync {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// The largest piece `read` takes.
    fn piece_bytes(&self) -> u64;
    /// `len` bytes from `offset`, checked.
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Piece, SourceError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("read bytes {offset}..{end}: {why}")]
    Read { offset: u64, end: u64, why: SourceError },
    #[error("the source sent a piece of {got} bytes for a read of {want}")]
    Short { got: u64, want: u64 },
    #[error("{path}: {why}")]
    Io { path: String, why: std::io::Error },
    #[error("{path} exists; give another path, or --force to replace it")]
    Exists { path: String },
    #[error("{path} is locked by another program (a running tap serves it as its backing file); a replay never replaces it, even with --force")]
    InUse { path: String },
    #[error("{path} is not a regular file; a replay writes only regular files")]
    NotAFile { path: String },
}

/// What `write_image` does when its output path already holds a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse (the default: a path may point at a user's file).
    Refuse,
    /// Replace it, once the new image is whole and synced; a file another
    /// program holds a lock on (a tap's backing file) is refused anyway.
    Replace,
}

/// Holds a shared lock on the file at `path`, if there is one: refuses a
/// file a tap (or any program) holds an exclusive lock on, and keeps a tap
/// from taking it until the lock is dropped.
fn lock_existing(path: &Path, existing: Existing) -> Result<Option<std::fs::File>, ExportError> {
    use std::os::fd::AsRawFd;
    let display = || path.display().to_string();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(why) => return Err(ExportError::Io { path: display(), why }),
    };
    if !meta.file_type().is_file() {
        return Err(ExportError::NotAFile { path: display() });
    }
    let file = std::fs::File::open(path).map_err(|why| ExportError::Io { path: display(), why })?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
        let why = std::io::Error::last_os_error();
        if why.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(ExportError::InUse { path: display() });
        }
        return Err(ExportError::Io { path: display(), why });
    }
    match existing {
        Existing::Refuse => Err(ExportError::Exists { path: display() }),
        Existing::Replace => Ok(Some(file)),
    }
}

/// A new file beside `out` that only this process can have made (created
/// exclusively, mode 0600), removed when dropped unless kept.
struct TempImage {
    path: std::path::PathBuf,
    file: std::fs::File,
    keep: bool,
}

impl TempImage {
    fn create(out: &Path) -> Result<TempImage, ExportError> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
        let mut last = None;
        for attempt in 0..16u32 {
            let path = dir.join(format!(".{name}.rewind-{}-{attempt}.tmp", std::process::id()));
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(file) => return Ok(TempImage { path, file, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(why) => return Err(ExportError::Io { path: path.display().to_string(), why }),
            }
        }
        Err(ExportError::Io { path: dir.display().to_string(), why: last.unwrap_or_else(|| std::io::Error::other("no free temporary name")) })
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReport {
    pub image_bytes: u64,
    /// Bytes written (4 KiB blocks the source did not know to be zero);
    /// the rest of the image is holes.
    pub data_bytes: u64,
    pub blake3_hex: String,
}

/// Writes the disk to a raw image at `out` (mode 0600), with `in_flight`
/// reads at once. Pieces of zeroes stay holes. `progress(done, total)` is
/// called as pieces land. The image is written to a new file beside `out`,
/// synced, renamed over `out` and the folder synced: `out` holds either
/// what it held before or the whole image, and a failed replay leaves
/// nothing behind. An existing `out` is refused unless `existing` says
/// replace, and a file another program holds locked (a tap's backing
/// file) is never replaced.
pub async fn write_image(source: &dyn BlockSource, out: &Path, existing: Existing, in_flight: usize, mut progress: impl FnMut(u64, u64)) -> Result<ImageReport, ExportError> {
    let _held = lock_existing(out, existing)?;
    let mut tmp = TempImage::create(out)?;
    let io = |why: std::io::Error| ExportError::Io { path: out.display().to_string(), why };
    let size = source.size();
    let piece = source.piece_bytes().max(1);
    let file = &tmp.file;
    file.set_len(size).map_err(io)?;
    let reads = (0..size.div_ceil(piece)).map(|i| {
        let offset = i * piece;
        let len = piece.min(size - offset);
        async move { (offset, len, source.read(offset, len).await) }
    });
    let mut reads = futures::stream::iter(reads).buffered(in_flight.max(1));
    let mut hasher = blake3::Hasher::new();
    let (mut done, mut data_bytes) = (0u64, 0u64);
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    let hash_zeroes = |hasher: &mut blake3::Hasher, mut n: u64| {
        while n > 0 {
            let k = n.min(ZEROES.len() as u64);
            hasher.update(&ZEROES[..k as usize]);
            n -= k;
        }
    };
    while let Some((offset, len, piece)) = reads.next().await {
        let piece = piece.and_then(|p| p.check().map(|_| p)).map_err(|why| ExportError::Read { offset, end: offset + len, why })?;
        if piece.len != len {
            return Err(ExportError::Short { got: piece.len, want: len });
        }
        // Runs are written; gaps stay holes (zeroes) and are hashed as such.
        let mut at = 0u64;
        for (run_at, bytes) in &piece.runs {
            hash_zeroes(&mut hasher, run_at - at);
            hasher.update(bytes);
            file.write_all_at(bytes, offset + run_at).map_err(io)?;
            data_bytes += bytes.len() as u64;
            at = run_at + bytes.len() as u64;
        }
        hash_zeroes(&mut hasher, len - at);
        done += len;
        progress(done, size);
    }
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp.path, out).map_err(io)?;
    tmp.keep = true;
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|why| ExportError::Io { path: dir.display().to_string(), why })?;
    Ok(ImageReport { image_bytes: size, data_bytes, blake3_hex: hasher.finalize().to_hex().to_string() })
}

/// Reads `len` bytes at `offset` from the source as one buffer, in pieces
/// of at most the source's piece size.
pub async fn read_bytes(source: &dyn BlockSource, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
    let mut out = vec![0u8; len as usize];
    let piece = source.piece_bytes().max(1);
    let mut at = 0u64;
    while at < len {
        let n = piece.min(len - at);
        let p = source.read(offset + at, n).await?;
        p.check()?;
        if p.len != n {
            return Err(SourceError::BadPiece(format!("the source sent a piece of {} bytes for a read of {n}", p.len)));
        }
        for (run_at, bytes) in &p.runs {
            let start = (at + run_at) as usize;
            out[start..start + bytes.len()].copy_from_slice(bytes);
        }
        at += n;
    }
    Ok(out)
}

/// The block size of a copy-on-write overlay.
pub const OVERLAY_BLOCK_BYTES: u64 = 4096;

/// A copy-on-write overlay over a disk as of one LSN: writes land in a
/// sparse local file, block by block; reads take written blocks from it and
/// the rest from the source. The log is never touched. Its map (which
/// blocks are written) is kept beside the file as `FILE.map`, one
/// little-endian u64 block number per written block, so a kept overlay can
/// be inspected or applied later.
pub struct Overlay {
    path: std::path::PathBuf,
    file: std::fs::File,
    size: u64,
    /// Written blocks. Guarded by one lock: writes are serialised, which
    /// also keeps partial-block read-modify-writes whole.
    written: futures::lock::Mutex<std::collections::BTreeSet<u64>>,
    map: std::sync::Mutex<std::fs::File>,
}

impl Overlay {
    /// Creates the overlay file at `path` (and its map beside it) for a
    /// disk of `size`: new files only, mode 0600. An existing file at
    /// either path is refused (`AlreadyExists`), never truncated; if the
    /// map cannot be made, the overlay file is removed again.
    pub fn create(path: &Path, size: u64) -> std::io::Result<Overlay> {
        use std::os::unix::fs::OpenOptionsExt;
        let new = || {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(true).create_new(true).mode(0o600);
            o
        };
        let file = new().open(path)?;
        let made = file.set_len(size).and_then(|_| new().open(Self::map_path(path)));
        match made {
            Ok(map) => Ok(Overlay { path: path.to_path_buf(), file, size, written: Default::default(), map: std::sync::Mutex::new(map) }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Creates an overlay in `dir` under a name no one can guess ahead
    /// (`STEM-<random>.raw`), so a shared folder such as /var/tmp cannot
    /// hold a trap laid for it.
    pub fn create_in(dir: &Path, stem: &str, size: u64) -> std::io::Result<Overlay> {
        use std::hash::BuildHasher;
        let mut last = None;
        for attempt in 0u64..16 {
            // RandomState is seeded from the operating system's generator.
            let tag = std::collections::hash_map::RandomState::new().hash_one((std::process::id(), attempt));
            match Overlay::create(&dir.join(format!("{stem}-{tag:016x}.raw")), size) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free overlay name")))
    }

    pub fn map_path(path: &Path) -> std::path::PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".map");
        std::path::PathBuf::from(p)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_error(&self, source: std::io::Error) -> SourceError {
        SourceError::Overlay { path: self.path.display().to_string(), source }
    }

    /// Blocks written so far.
    pub async fn written_blocks(&self) -> usize {
        self.written.lock().await.len()
    }

    /// `len` bytes at `offset`: the source's, with written blocks on top.
    pub async fn read(&self, source: &dyn BlockSource, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        let mut out = read_bytes(source, offset, len).await?;
        let written = self.written.lock().await;
        let first = offset / OVERLAY_BLOCK_BYTES;
        let end = (offset + len).div_ceil(OVERLAY_BLOCK_BYTES);
        for b in written.range(first..end) {
            let bstart = b * OVERLAY_BLOCK_BYTES;
            let from = bstart.max(offset);
            let to = (bstart + OVERLAY_BLOCK_BYTES).min(offset + len);
            let dst = &mut out[(from - offset) as usize..(to - offset) as usize];
            self.file.read_exact_at(dst, from).map_err(|e| self.io_error(e))?;
        }
        Ok(out)
    }

    /// Writes `data` at `offset` into the overlay (zeroes if `data` is None,
    /// for `len` bytes). A block written in part is first filled from the
    /// source, so the overlay always holds whole blocks.
    pub async fn write(&self, source: &dyn BlockSource, offset: u64, len: u64, data: Option<&[u8]>) -> Result<(), SourceError> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(SourceError::OutOfRange { offset, len, size: self.size });
        }
        let io = |e: std::io::Error| self.io_error(e);
        let mut written = self.written.lock().await;
        let first = offset / OVERLAY_BLOCK_BYTES;
        let end = (offset + len).div_ceil(OVERLAY_BLOCK_BYTES);
        let mut new_blocks = Vec::new();
        for b in first..end {
            let bstart = b * OVERLAY_BLOCK_BYTES;
            let blen = OVERLAY_BLOCK_BYTES.min(self.size - bstart);
            let from = bstart.max(offset);
            let to = (bstart + blen).min(offset + len);
            let whole = from == bstart && to == bstart + blen;
            let mut block = if whole {
                vec![0u8; blen as usize]
            } else if written.contains(&b) {
                let mut buf = vec![0u8; blen as usize];
                self.file.read_exact_at(&mut buf, bstart).map_err(io)?;
                buf
            } else {
                read_bytes(source, bstart, blen).await?
            };
            let range = (from - bstart) as usize..(to - bstart) as usize;
            match data {
                Some(d) => block[range].copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize]),
                None => block[range].fill(0),
            }
            self.file.write_all_at(&block, bstart).map_err(io)?;
            if written.insert(b) {
                new_blocks.push(b);
            }
        }
        if !new_blocks.is_empty() {
            use std::io::Write;
            let bytes: Vec<u8> = new_blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
            self.map.lock().expect("map lock").write_all(&bytes).map_err(io)?;
        }
        Ok(())
    }

    /// Makes the overlay's writes durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.map.lock().expect("map lock").sync_data()
    }

    /// Deletes the overlay file and its map.
    pub fn discard(self) -> std::io::Result<()> {
        std::fs::remove_file(&self.path)?;
        std::fs::remove_file(Self::map_path(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A disk in memory, with one piece that fails its check.
    struct Mem {
        bytes: Vec<u8>,
        bad_at: Option<u64>,
    }

    impl BlockSource for Mem {
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn piece_bytes(&self) -> u64 {
            1 << 20
        }
        fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Piece, SourceError>> {
            Box::pin(async move {
                if self.bad_at.is_some_and(|b| (offset..offset + len).contains(&b)) {
                    return Err(SourceError::Damaged("checksum mismatch".into()));
                }
                // Runs of 4 KiB blocks that hold a non-zero byte.
                let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
                for (i, block) in self.bytes[offset as usize..(offset + len) as usize].chunks(4096).enumerate() {
                    if block.iter().any(|b| *b != 0) {
                        let at = i as u64 * 4096;
                        match runs.last_mut() {
                            Some((s, r)) if *s + r.len() as u64 == at => r.extend_from_slice(block),
                            _ => runs.push((at, block.to_vec())),
                        }
                    }
                }
                Ok(Piece { len, runs })
            })
        }
    }

    #[tokio::test]
    async fn an_overlay_takes_writes_and_leaves_the_source_alone() {
        let mut bytes = vec![0u8; 64 << 10];
        bytes[..10000].fill(3);
        let source = Mem { bytes: bytes.clone(), bad_at: None };
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::create(&dir.path().join("ov"), bytes.len() as u64).unwrap();
        let mut model = bytes.clone();
        for (offset, len, data) in [(100u64, 50u64, Some(7u8)), (4000, 5000, Some(8)), (8192, 4096, None), (60000, 5536, Some(9)), (5000, 10, None)] {
            match data {
                Some(v) => {
                    o.write(&source, offset, len, Some(&vec![v; len as usize])).await.unwrap();
                    model[offset as usize..(offset + len) as usize].fill(v);
                }
                None => {
                    o.write(&source, offset, len, None).await.unwrap();
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
            }
        }
        assert_eq!(o.read(&source, 0, bytes.len() as u64).await.unwrap(), model);
        assert_eq!(o.read(&source, 4001, 7).await.unwrap(), model[4001..4008]);
        assert_eq!(source.bytes, bytes, "the source is never written");
        assert!(o.write(&source, 65000, 1000, None).await.is_err());
        let map = std::fs::read(Overlay::map_path(o.path())).unwrap();
        assert_eq!(map.len() / 8, o.written_blocks().await);
        o.discard().unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn the_image_is_the_disk_sparse_where_it_is_zero() {
        let mut bytes = vec![0u8; (8 << 20) + 4096];
        bytes[100..5000].fill(7);
        bytes[(8 << 20)..].fill(9);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("img");
        let mut calls = 0;
        let r = write_image(&Mem { bytes: bytes.clone(), bad_at: None }, &out, Existing::Refuse, 3, |_, _| calls += 1).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), bytes);
        assert_eq!(r.blake3_hex, blake3::hash(&bytes).to_hex().to_string());
        assert_eq!((r.image_bytes, r.data_bytes, calls), (bytes.len() as u64, 8192 + 4096, 9));
        assert!(Piece { len: 10, runs: vec![(5, vec![1; 6])] }.check().is_err());
        assert!(Piece { len: 10, runs: vec![(4, vec![1; 2]), (5, vec![1])] }.check().is_err());
        assert!(std::fs::metadata(&out).unwrap().blocks() * 512 < 4 << 20, "zero pieces are holes");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
        let bad = write_image(&Mem { bytes: bytes.clone(), bad_at: Some(3 << 20) }, &out, Existing::Replace, 3, |_, _| {}).await;
        assert!(matches!(bad, Err(ExportError::Read { offset, .. }) if offset == 3 << 20), "{bad:?}");
        // The failed replay left the old image whole and nothing beside it.
        assert_eq!(std::fs::read(&out).unwrap(), bytes);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn an_existing_file_is_kept_unless_replaced_and_a_locked_one_always() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("user.raw");
        std::fs::write(&out, b"the user's file").unwrap();
        let disk = || Mem { bytes: vec![5u8; 8192], bad_at: None };
        let r = write_image(&disk(), &out, Existing::Refuse, 2, |_, _| {}).await;
        assert!(matches!(&r, Err(ExportError::Exists { .. })) && r.as_ref().unwrap_err().to_string().contains("--force"), "{r:?}");
        assert_eq!(std::fs::read(&out).unwrap(), b"the user's file");
        // A tap holds its backing file with an exclusive lock.
        let held = std::fs::OpenOptions::new().read(true).write(true).open(&out).unwrap();
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        let r = write_image(&disk(), &out, Existing::Replace, 2, |_, _| {}).await;
        assert!(matches!(r, Err(ExportError::InUse { .. })), "{r:?}");
        assert_eq!(std::fs::read(&out).unwrap(), b"the user's file");
        drop(held);
        write_image(&disk(), &out, Existing::Replace, 2, |_, _| {}).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), vec![5u8; 8192]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let r = write_image(&disk(), dir.path(), Existing::Replace, 2, |_, _| {}).await;
        assert!(matches!(r, Err(ExportError::NotAFile { .. })), "{r:?}");
    }
}
