//! A sync tap's producer identity: one client id per backing file, and an
//! epoch that each start of the tap takes anew, so the site can fence the
//! batches an earlier process of the same tap left on their way.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("tap identity file {path} holds {text:?}, not `<16 hex digits> <epoch>`; move it away to start the tap under a new identity")]
    Damaged { path: PathBuf, text: String },
    #[error("read tap identity file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("tap identity file {path}: every epoch is used; move it away to start under a new identity")]
    EpochsUsed { path: PathBuf },
    #[error("write tap identity file {path} (epoch {epoch}): {source}")]
    Write { path: PathBuf, epoch: u32, source: std::io::Error },
}

/// A sync tap's producer identity for this start: the client id kept in
/// `path` (a fresh one, from `fresh`, when there is no file) and the epoch
/// after the one kept there. The new epoch is written and fsync'd before it
/// is used, so no two starts share one. Its first batch fences every batch
/// of the earlier epochs that a dead process left on its way to the site
/// (`rewind_wire::event::EventBatch`). Call it holding the backing file's
/// lock. The file is one line: `<16 hex digits> <epoch>`.
pub fn next_identity(path: &Path, fresh: impl FnOnce() -> u64) -> Result<(u64, u32), IdentityError> {
    let (client_id, epoch) = match std::fs::read_to_string(path) {
        Ok(text) => {
            let mut words = text.split_whitespace();
            let id = words.next().and_then(|w| (w.len() == 16).then(|| u64::from_str_radix(w, 16).ok()).flatten());
            let epoch = words.next().and_then(|w| w.parse::<u32>().ok());
            match (id, epoch, words.next()) {
                (Some(id), Some(epoch), None) => (id, epoch),
                _ => return Err(IdentityError::Damaged { path: path.to_path_buf(), text: text.chars().take(80).collect() }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (fresh(), 0),
        Err(source) => return Err(IdentityError::Read { path: path.to_path_buf(), source }),
    };
    let epoch = epoch.checked_add(1).ok_or_else(|| IdentityError::EpochsUsed { path: path.to_path_buf() })?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{client_id:016x} {epoch}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|source| IdentityError::Write { path: path.to_path_buf(), epoch, source })?;
    Ok((client_id, epoch))
}


#[cfg(test)]
mod tests {
    use super::next_identity;

    #[test]
    fn each_start_takes_the_next_epoch_under_one_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d0.raw.tap-id");
        assert_eq!(next_identity(&path, || 0xabc).unwrap(), (0xabc, 1));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0000000000000abc 1\n");
        // The id is kept; a fresh one is never asked for again.
        assert_eq!(next_identity(&path, || unreachable!()).unwrap(), (0xabc, 2));
        assert_eq!(next_identity(&path, || unreachable!()).unwrap(), (0xabc, 3));
        assert!(!dir.path().join("d0.raw.tap-id.tmp").exists());
    }

    #[test]
    fn a_damaged_identity_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        for bad in ["", "xyz 1\n", "0000000000000abc\n", "0000000000000abc one\n", "abc 1\n", "0000000000000abc 1 extra\n"] {
            std::fs::write(&path, bad).unwrap();
            let err = next_identity(&path, || 1).unwrap_err().to_string();
            assert!(err.contains("not `<16 hex digits> <epoch>`") && err.contains("move it away"), "{bad:?}: {err}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), bad);
        }
        std::fs::write(&path, format!("0000000000000abc {}\n", u32::MAX)).unwrap();
        assert!(next_identity(&path, || 1).unwrap_err().to_string().contains("every epoch is used"));
    }
}
