//! Reconstructing a disk as it was at an LSN.
//!
//! Built today: the simple replay, which applies every event of the group up
//! to the target LSN, in LSN order, onto a sparse image. It is exact
//! (DESIGN.md invariant 2) but its cost grows with the length of the
//! history, not with the disk's size.
//!
//! Not built yet (issue "Point-in-time replay"): the block index and base
//! images that make reading block b at LSN n a seek, targets by time,
//! bookmark and backup, and NBD exports (read-only and copy-on-write).
//!
//! Replay never writes the log. It takes events through whatever the caller
//! reads them with; this crate does no network I/O.

use std::os::unix::fs::FileExt;

use rewind_wire::event::{Event, LoggedEvent};

/// Where replayed bytes go.
pub trait Image {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeroes.
    fn zero_at(&mut self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// A sparse raw image file.
pub struct FileImage {
    file: std::fs::File,
}

impl FileImage {
    /// Creates (or truncates) `path` as a sparse file of `size_bytes`.
    pub fn create(path: &std::path::Path, size_bytes: u64) -> std::io::Result<FileImage> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        file.set_len(size_bytes)?;
        Ok(FileImage { file })
    }

    pub fn into_file(self) -> std::fs::File {
        self.file
    }
}

impl Image for FileImage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn zero_at(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) } == 0 {
            return Ok(());
        }
        let zeroes = vec![0u8; (len as usize).min(1 << 20)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Applies one logged event to the image of `disk`. Returns whether the
/// event touched that disk's bytes.
pub fn apply(disk: &str, event: &LoggedEvent, image: &mut impl Image) -> std::io::Result<bool> {
    match &event.event {
        Event::Write { disk: d, offset, data } if d == disk => image.write_at(*offset, data).map(|_| true),
        Event::WriteZeroes { disk: d, offset, len } | Event::Trim { disk: d, offset, len } if d == disk => {
            image.zero_at(*offset, *len).map(|_| true)
        }
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Model(Vec<u8>);

    impl Image for Model {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero_at(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
            self.0[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    fn logged(lsn: u64, event: Event) -> LoggedEvent {
        LoggedEvent { lsn, time_ns: lsn, event }
    }

    #[test]
    fn file_image_matches_a_byte_model() {
        let events = vec![
            logged(1, Event::Write { disk: "d".into(), offset: 0, data: vec![1; 10000] }),
            logged(2, Event::Write { disk: "other".into(), offset: 0, data: vec![9; 100] }),
            logged(3, Event::WriteZeroes { disk: "d".into(), offset: 4096, len: 4096 }),
            logged(4, Event::Trim { disk: "d".into(), offset: 100, len: 50 }),
            logged(5, Event::Write { disk: "d".into(), offset: 5000, data: vec![2; 300] }),
            logged(6, Event::Bookmark { name: "b".into(), app_consistent: false }),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut file = FileImage::create(&path, 16384).unwrap();
        let mut model = Model(vec![0; 16384]);
        let mut touched = 0;
        for e in &events {
            touched += apply("d", e, &mut file).unwrap() as usize;
            apply("d", e, &mut model).unwrap();
        }
        assert_eq!(touched, 4);
        assert_eq!(std::fs::read(&path).unwrap(), model.0);
    }
}
