//! The store through openraft's traits: apply, read back, time to LSN,
//! checksums on read, and snapshots from one replica installed on another.

use futures::stream;
use openraft::entry::RaftEntry;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use rewind_wire::event::{Event, EventBatch, TimedEvent};
use rewind_wire::raft::Command;
use rewind_wire::rpc::DiskSpec;

use crate::codec::{Entry, LeaderId, LogId};

fn log_id(index: u64) -> LogId {
    LogId { leader_id: LeaderId { term: 1, node_id: 1 }, index }
}

fn write(offset: u64, time_ns: u64) -> TimedEvent {
    TimedEvent { time_ns, event: Event::Write { disk: "d0".into(), offset, data: vec![offset as u8; 4096] } }
}

fn commands() -> Vec<Command> {
    let disks = vec![DiskSpec { name: "d0".into(), size_bytes: 1 << 20, sector_bytes: 512 }];
    let batch = |seq, events| Command::Append(EventBatch { group: "g".into(), client_id: 5, seq, events });
    vec![
        Command::CreateGroup { group: "g".into(), disks, time_ns: 1 },
        batch(1, vec![write(0, 10), write(4096, 20)]),
        batch(2, vec![write(8192, 20)]),
        batch(3, vec![write(0, 30)]),
    ]
}

async fn apply_all(sm: &mut crate::StateMachine, commands: Vec<Command>) {
    apply_all_from(sm, 1, commands).await
}

async fn apply_all_from(sm: &mut crate::StateMachine, first_index: u64, commands: Vec<Command>) {
    let entries: Vec<std::io::Result<openraft::storage::EntryResponder<crate::TypeConfig>>> = commands
        .into_iter()
        .enumerate()
        .map(|(i, c)| Ok((Entry::new_normal(log_id(i as u64 + first_index), c), None)))
        .collect();
    sm.apply(stream::iter(entries)).await.expect("apply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_then_read_back_and_resolve_times() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::open(dir.path()).unwrap();
    apply_all(&mut store.state_machine, commands()).await;
    let r = &store.reader;
    let g = r.group("g").unwrap().unwrap();
    assert_eq!((g.last_lsn, g.events, g.payload_bytes), (4, 4, 4 * 4096));
    let events = r.events("g", 1, 100, usize::MAX).unwrap();
    assert_eq!(events.iter().map(|e| e.lsn).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    // Byte limit: stops once the limit is reached, but returns at least one.
    assert_eq!(r.events("g", 2, 100, 1).unwrap().len(), 1);
    for (t, want) in [(5, None), (10, Some(1)), (19, Some(1)), (20, Some(3)), (25, Some(3)), (30, Some(4)), (u64::MAX, Some(4))] {
        assert_eq!(r.lsn_at_time("g", t).unwrap(), want, "time {t}");
    }
    assert_eq!(r.lsn_at_time("other", 30).unwrap(), None);
    // A flipped bit in a stored event is an error on read, never data.
    let key = crate::db::event_key("g", 2);
    let events_cf = crate::db::cf(&r.db, crate::db::CF_EVENTS);
    let mut value = r.db.get_cf(events_cf, &key).unwrap().unwrap();
    let last = value.len() - 1;
    value[last] ^= 1;
    r.db.put_cf(events_cf, &key, &value).unwrap();
    let err = r.events("g", 1, 100, usize::MAX).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_moves_state_to_another_replica() {
    let a_dir = tempfile::tempdir().unwrap();
    let mut a = crate::open(a_dir.path()).unwrap();
    apply_all(&mut a.state_machine, commands()).await;
    let snapshot = a.state_machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(4)));

    // Built as a checkpoint; sent as a stream file made from it.
    assert!(snapshot.snapshot.path.is_dir());
    let stream = a_dir.path().join("out.sending");
    let (sent, temporary) = snapshot.snapshot.stream_for_send(&stream).unwrap();
    assert!(temporary);
    let b_dir = tempfile::tempdir().unwrap();
    let mut b = crate::open(b_dir.path()).unwrap();
    // A corrupt copy is refused and changes nothing.
    let bad = b_dir.path().join("bad.snap");
    let mut bytes = std::fs::read(&sent).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&bad, bytes).unwrap();
    let err = b.state_machine.install_snapshot(&snapshot.meta, crate::SnapshotFile { path: bad }).await.unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    assert!(b.reader.group("g").unwrap().is_none());

    let copy = b_dir.path().join("incoming.snap");
    std::fs::copy(&sent, &copy).unwrap();
    b.state_machine.install_snapshot(&snapshot.meta, crate::SnapshotFile { path: copy }).await.unwrap();
    assert_eq!(a.reader.group("g").unwrap(), b.reader.group("g").unwrap());
    assert_eq!(a.reader.events("g", 1, 100, usize::MAX).unwrap(), b.reader.events("g", 1, 100, usize::MAX).unwrap());
    let (applied, _) = b.state_machine.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(4)));
    // The state keeps changing on `a` after the checkpoint; the snapshot does not.
    apply_all_from(&mut a.state_machine, 5, vec![Command::Append(EventBatch { group: "g".into(), client_id: 5, seq: 4, events: vec![write(0, 40)] })]).await;
    assert_eq!(a.reader.group("g").unwrap().unwrap().last_lsn, 5);
    assert_eq!(b.reader.group("g").unwrap().unwrap().last_lsn, 4);
    // The installed snapshot is the current one, and survives a reopen.
    drop(b);
    let mut b = crate::open(b_dir.path()).unwrap();
    let current = b.state_machine.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snapshot.meta);
    assert_eq!(b.reader.group("g").unwrap().unwrap().last_lsn, 4);
    // And a's new snapshot covers the later entry.
    let again = a.state_machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(again.meta.last_log_id, Some(log_id(5)));
    let current = a.state_machine.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(log_id(5)));
    assert!(!snapshot.snapshot.path.exists(), "the older checkpoint is removed");
}
