//! Which layout of the tables a store is in: stamped at creation, checked
//! at every open, and migrated in place from the one before the block
//! index (`rewind store migrate`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{IteratorMode, DB};

use crate::db::{cf, open_db, CF_LOG, CF_META, CF_SM};
use crate::{io_err, StateMachine};

/// The layout of the tables this build reads and writes. Format 2 added the
/// block index; a store without it cannot serve replays. Format 3 keeps
/// payloads in segment files; it reads format 2's records as they are, so
/// a format-2 store is stamped 3 at open (an older build then refuses it,
/// rather than misreading the records that name segments).
const STORE_FORMAT: u32 = 3;
const KEY_FORMAT: &[u8] = b"format";

fn format_of(v: &[u8]) -> Option<u32> {
    (v.len() == 4).then(|| u32::from_le_bytes(v[..4].try_into().expect("4 bytes")))
}

/// Stamps a new store with this build's format; refuses a store written in
/// another one, saying what to do.
pub(crate) fn check_format(db: &DB, dir: &Path) -> std::io::Result<()> {
    let meta = cf(db, CF_META);
    match db.get_cf(meta, KEY_FORMAT).map_err(io_err)? {
        Some(v) if format_of(&v) == Some(STORE_FORMAT) => Ok(()),
        Some(v) if format_of(&v) == Some(2) => {
            tracing::info!("the store in {} is format 2: stamped format 3 (payloads of new writes go to segment files; older records read as they are)", dir.display());
            let mut o = rocksdb::WriteOptions::default();
            o.set_sync(true);
            db.put_cf_opt(meta, KEY_FORMAT, STORE_FORMAT.to_le_bytes(), &o).map_err(io_err)
        }
        Some(v) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the store in {} has format {v:?}; this build reads format {STORE_FORMAT} only", dir.display()),
        )),
        None => {
            let used = db.get_cf(cf(db, CF_SM), crate::sm::KEY_APPLIED).map_err(io_err)?.is_some()
                || db.iterator_cf(cf(db, CF_LOG), IteratorMode::Start).next().is_some();
            if used {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "the store in {} was written by an older rewind without the block index (format 1); this build needs format {STORE_FORMAT}. \
                         With the node stopped, migrate it in place: rewind store migrate --data-dir {}",
                        dir.display(),
                        dir.parent().unwrap_or(dir).display()
                    ),
                ));
            }
            let mut o = rocksdb::WriteOptions::default();
            o.set_sync(true);
            db.put_cf_opt(meta, KEY_FORMAT, STORE_FORMAT.to_le_bytes(), &o).map_err(io_err)
        }
    }
}

/// The format a store is in, as `migrate` found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Current already: nothing to do.
    Current,
    /// Never used: stamped with this build's format.
    Empty,
    /// Format 1, migrated.
    Migrated,
}

/// Migrates the store in `dir` (a node's `DATA_DIR/shard-1`, the node
/// stopped) to this build's format: a format-1 store (events, no block
/// index) gets every group's block index, content index, zero extents,
/// bookmarks, times and chain links rebuilt from its events, each group's
/// chain checked against its record, the tables flushed, and only then the
/// new format stamped (with sync). A crash part way leaves it format 1, and
/// running it again starts over. `progress(group, LSN done, of)`.
pub fn migrate(dir: &Path, progress: impl FnMut(&str, u64, u64)) -> std::io::Result<(Found, Vec<crate::sm::MigratedGroup>)> {
    if !dir.join("db").is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no store in {} (no db folder): is it a node's data_dir/shard-1?", dir.display())));
    }
    let db = open_db(dir)?;
    let meta = cf(&db, CF_META);
    match db.get_cf(meta, KEY_FORMAT).map_err(io_err)? {
        Some(v) if format_of(&v) == Some(STORE_FORMAT) || format_of(&v) == Some(2) => return Ok((Found::Current, Vec::new())),
        Some(v) => {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("the store in {} has format {v:?}, which this build cannot migrate", dir.display())))
        }
        None => {}
    }
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    let used = db.get_cf(cf(&db, CF_SM), crate::sm::KEY_APPLIED).map_err(io_err)?.is_some() || db.iterator_cf(cf(&db, CF_LOG), IteratorMode::Start).next().is_some();
    if !used {
        db.put_cf_opt(meta, KEY_FORMAT, STORE_FORMAT.to_le_bytes(), &sync).map_err(io_err)?;
        return Ok((Found::Empty, Vec::new()));
    }
    let db = Arc::new(db);
    let snapshot_dir: PathBuf = dir.join("snapshots");
    std::fs::create_dir_all(&snapshot_dir)?;
    let segs = Arc::new(crate::segments::Segments::open(&dir.join("segments"))?);
    let sm = StateMachine::open(db.clone(), segs, snapshot_dir, Default::default(), Default::default())?;
    let groups = sm.rebuild_derived(progress)?;
    db.put_cf_opt(cf(&db, CF_META), KEY_FORMAT, STORE_FORMAT.to_le_bytes(), &sync).map_err(io_err)?;
    Ok((Found::Migrated, groups))
}

