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
//! zeroes) with a blake3 of the whole image. Not built yet: the read-only
//! and copy-on-write NBD exports (`rewind replay --serve [--writable]`).
//!
//! Replay never writes the log, and does no network I/O of its own.

use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::Pin;

use futures::StreamExt;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a read of the disk failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

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
                _ => return Err(SourceError(format!("run at {offset} of {} bytes does not fit a piece of {} bytes in order", bytes.len(), self.len))),
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReport {
    pub image_bytes: u64,
    /// Bytes written (4 KiB blocks the source did not know to be zero);
    /// the rest of the image is holes.
    pub data_bytes: u64,
    pub blake3_hex: String,
}

/// Writes the disk to a raw image at `out` (created or truncated), with
/// `in_flight` reads at once. Pieces of zeroes stay holes. `progress(done,
/// total)` is called as pieces land.
pub async fn write_image(source: &dyn BlockSource, out: &Path, in_flight: usize, mut progress: impl FnMut(u64, u64)) -> Result<ImageReport, ExportError> {
    let io = |why: std::io::Error| ExportError::Io { path: out.display().to_string(), why };
    let size = source.size();
    let piece = source.piece_bytes().max(1);
    let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(out).map_err(io)?;
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
    Ok(ImageReport { image_bytes: size, data_bytes, blake3_hex: hasher.finalize().to_hex().to_string() })
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
                    return Err(SourceError("checksum mismatch".into()));
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
    async fn the_image_is_the_disk_sparse_where_it_is_zero() {
        let mut bytes = vec![0u8; (8 << 20) + 4096];
        bytes[100..5000].fill(7);
        bytes[(8 << 20)..].fill(9);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("img");
        let mut calls = 0;
        let r = write_image(&Mem { bytes: bytes.clone(), bad_at: None }, &out, 3, |_, _| calls += 1).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), bytes);
        assert_eq!(r.blake3_hex, blake3::hash(&bytes).to_hex().to_string());
        assert_eq!((r.image_bytes, r.data_bytes, calls), (bytes.len() as u64, 8192 + 4096, 9));
        assert!(Piece { len: 10, runs: vec![(5, vec![1; 6])] }.check().is_err());
        assert!(Piece { len: 10, runs: vec![(4, vec![1; 2]), (5, vec![1])] }.check().is_err());
        assert!(std::fs::metadata(&out).unwrap().blocks() * 512 < 4 << 20, "zero pieces are holes");
        let bad = write_image(&Mem { bytes, bad_at: Some(3 << 20) }, &out, 3, |_, _| {}).await;
        assert!(matches!(bad, Err(ExportError::Read { offset, .. }) if offset == 3 << 20), "{bad:?}");
    }
}
