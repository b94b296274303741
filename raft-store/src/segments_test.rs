//! The payload segments through the store: payloads written once and
//! named by the records, torn tails cut at open, dead segments deleted and
//! a snapshot's kept.

use openraft::entry::RaftEntry;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use rewind_wire::event::{Event, EventBatch, TimedEvent};
use rewind_wire::raft::Command;
use rewind_wire::rpc::DiskSpec;

use crate::codec::Entry;
use crate::store_test::{apply_all, apply_all_from, commands, log_id, retry_while_in_use};

/// Every payload byte is written once, to a segment: the log's record and
/// the event's record name it; nothing copies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_lie_once_in_segments_and_records_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::open(dir.path()).unwrap();
    apply_all(&mut store, commands()).await;
    let r = store.reader.clone();
    let written = r.segs.written_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(written, 4 * (4096 + 8), "four payloads and their record headers");
    for lsn in 1..=4 {
        let raw = r.db.get_cf(crate::db::cf(&r.db, crate::db::CF_EVENTS), crate::db::event_key("g", lsn)).unwrap().unwrap();
        assert!(raw.starts_with(b"RWE3") && raw.len() < 200, "LSN {lsn}: the event record names its payload ({} bytes)", raw.len());
    }
    for item in r.db.iterator_cf(crate::db::cf(&r.db, crate::db::CF_LOG), rocksdb::IteratorMode::Start) {
        let (_, v) = item.unwrap();
        assert!(v.len() < 400, "a log record holds no payload ({} bytes)", v.len());
    }
    assert_eq!(crate::segments::referenced(&r.db).unwrap().len(), 1);
    // Replays read the bytes where they lie.
    let w = |seq, v: u8| Command::Append(EventBatch { group: "g".into(), client_id: 5, seq, events: vec![TimedEvent { time_ns: 50, event: Event::Write { disk: "d0".into(), offset: 4096, data: vec![v; 8192] } }] });
    apply_all_from(&mut store, 5, vec![w(4, 7), w(5, 9)]).await;
    assert_eq!(r.read_disk("g", "d0", 5, 4096, 8192).unwrap(), vec![(0, vec![7u8; 8192])]);
    assert_eq!(r.read_disk("g", "d0", 6, 0, 3 * 4096).unwrap(), vec![(4096, vec![9u8; 8192])]);
    // A payload that reads back wrong is refused by its checksum, never served.
    let loc = crate::segments::EventRecord::parse(&r.db.get_cf(crate::db::cf(&r.db, crate::db::CF_EVENTS), crate::db::event_key("g", 5)).unwrap().unwrap()).unwrap().loc.unwrap();
    let path = dir.path().join("segments").join(format!("{:016x}.seg", loc.seg));
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xAA], loc.off + 100).unwrap();
    let err = r.read_disk("g", "d0", 5, 4096, 4096).unwrap_err().to_string();
    assert!(err.contains("fails its checksum"), "{err}");
}

/// A crash can leave payloads written but not synced: the log is cut at
/// the first entry whose payload does not read back, and what is before it
/// reads whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_segment_tail_cuts_the_log_at_the_first_torn_entry() {
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = commands().into_iter().enumerate().map(|(i, c)| Entry::new_normal(log_id(i as u64 + 1), c)).collect();
    let (synced_to, torn_at) = {
        let mut store = crate::open(dir.path()).unwrap();
        store.log.append(entries.clone(), openraft::storage::IOFlushed::noop()).await.unwrap();
        let at = |i| crate::log::LogStore::locs_at(&store.reader.db, i).unwrap().unwrap().1[0];
        (at(2), at(3))
    };
    // The power went after the sync of entries 1 and 2 and while entry
    // 3's payload was half written: the WAL holds the position synced.
    {
        let db = retry_while_in_use(|| crate::db::open_db(dir.path()));
        let mut pos = synced_to.seg.to_le_bytes().to_vec();
        pos.extend_from_slice(&(synced_to.off + synced_to.len as u64).to_le_bytes());
        db.put_cf(crate::db::cf(&db, crate::db::CF_META), b"segments-synced", pos).unwrap();
    }
    let path = dir.path().join("segments").join(format!("{:016x}.seg", torn_at.seg));
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(torn_at.off + 1000).unwrap();
    let mut store = retry_while_in_use(|| crate::open(dir.path()));
    let state = store.log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2)), "entries 3 and 4 were never synced, so never acknowledged");
    let got = store.log.try_get_log_entries(1..=2).await.unwrap();
    assert_eq!(format!("{got:?}"), format!("{:?}", &entries[..2]));
    // New appends go to a new segment and read back.
    store.log.append(entries[2..].to_vec(), openraft::storage::IOFlushed::noop()).await.unwrap();
    let got = store.log.try_get_log_entries(1..=4).await.unwrap();
    assert_eq!(format!("{got:?}"), format!("{entries:?}"));
    drop(got);
    drop(store);
    // A synced payload that changed is damage, not a torn tail: the open is
    // refused (cutting there would drop an acknowledged entry).
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x55], synced_to.off + 5).unwrap();
    let err = retry_while_in_use(|| match crate::open(dir.path()) {
        Ok(_) => Ok(String::from("opened")),
        Err(e) if e.to_string().contains("in use") => Err(e),
        Err(e) => Ok(e.to_string()),
    });
    assert!(err.contains("the disk damaged it"), "{err}");
}

/// Retention frees events, then whole segments once nothing names them
/// and the log is purged past them; a snapshot keeps the segments it
/// names alive (hard links) and carries payloads to another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_segments_are_deleted_and_snapshots_keep_theirs() {
    use openraft::storage::RaftLogStorage;
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::open(dir.path()).unwrap();
    store.reader.segs.set_segment_bytes(64 << 10);
    let disks = vec![DiskSpec { name: "d0".into(), size_bytes: 1 << 20, sector_bytes: 512 }];
    let batch = |seq: u64, events| Command::Append(EventBatch { group: "g".into(), client_id: 5, seq, events });
    let mut commands = vec![Command::CreateGroup { group: "g".into(), disks, time_ns: 1 }, batch(1, vec![TimedEvent { time_ns: 2, event: Event::Retain { keep_ns: 0, keep_bytes: 128 << 10 } }])];
    // 2 MiB of 16 KiB writes over 256 KiB of the disk, 8 times over.
    let w = |i: u64| TimedEvent { time_ns: 10 + i, event: Event::Write { disk: "d0".into(), offset: (i % 16) * 16384, data: vec![(i % 250) as u8 + 1; 16384] } };
    for i in 0..128u64 {
        commands.push(batch(i + 2, vec![w(i)]));
    }
    let n = commands.len() as u64;
    apply_all(&mut store, commands).await;
    let segs_before = store.reader.segs.ids().unwrap().len();
    assert!(segs_before >= 30, "{segs_before} segments of 64 KiB");
    // A snapshot now names (and links) the segments of the window.
    let snapshot = store.state_machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
    store.log.purge(log_id(n)).await.unwrap();
    let collector = store.collector.clone();
    let freed = tokio::task::spawn_blocking(move || {
        while collector.step().unwrap().group.is_some() {}
        collector.reclaim_segments().unwrap()
    })
    .await
    .unwrap();
    let left = store.reader.segs.ids().unwrap();
    assert!(freed > 0 && left.len() < 16, "{} segments left of {segs_before}, {freed} bytes freed", left.len());
    assert!(store.reader.segs.bytes().unwrap() < 1 << 20, "what is left is about the window (128 KiB) and the copies kept");
    // The window's start reads as the model says: each 16 KiB piece holds
    // the last write to it.
    let r = store.reader.clone();
    let first = r.retention("g").unwrap().first();
    let last = r.group("g").unwrap().unwrap().last_lsn;
    for lsn in [first, last] {
        let mut model = vec![0u8; 1 << 18];
        for i in 0..128u64 {
            if 2 + i <= lsn {
                model[((i % 16) * 16384) as usize..][..16384].fill((i % 250) as u8 + 1);
            }
        }
        let mut disk = vec![0u8; 1 << 18];
        for (at, bytes) in r.read_disk("g", "d0", lsn, 0, 1 << 18).unwrap() {
            disk[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        }
        assert!(disk == model, "LSN {lsn} reads as the model");
    }
    // The snapshot, built before the deletions, still streams whole and
    // installs on another replica, which reads the same history.
    let stream = dir.path().join("out.sending");
    let (sent, _) = snapshot.snapshot.stream_for_send(&stream).unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let mut b = crate::open(b_dir.path()).unwrap();
    b.state_machine.install_snapshot(&snapshot.meta, crate::SnapshotFile { path: sent }).await.unwrap();
    let at = b.reader.retention("g").unwrap().first();
    let mut disk_b = vec![0u8; 1 << 18];
    for (off, bytes) in b.reader.read_disk("g", "d0", last, 0, 1 << 18).unwrap() {
        disk_b[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    }
    let mut disk_a = vec![0u8; 1 << 18];
    for (off, bytes) in r.read_disk("g", "d0", last, 0, 1 << 18).unwrap() {
        disk_a[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    }
    assert!(disk_a == disk_b && at <= first);
    assert!(crate::segments::referenced(&b.reader.db).unwrap().is_empty(), "an installed snapshot names no segment of another replica");
}
