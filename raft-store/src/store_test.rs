//! The store through openraft's traits: apply, read back, time to LSN,
//! checksums on read, and snapshots from one replica installed on another.

use futures::stream;
use openraft::entry::RaftEntry;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use rewind_wire::event::{Event, EventBatch, TimedEvent};
use rewind_wire::raft::Command;
use rewind_wire::rpc::DiskSpec;

use crate::codec::{Entry, LeaderId, LogId};

pub(crate) fn log_id(index: u64) -> LogId {
    LogId { leader_id: LeaderId { term: 1, node_id: 1 }, index }
}

fn write(offset: u64, time_ns: u64) -> TimedEvent {
    TimedEvent { time_ns, event: Event::Write { disk: "d0".into(), offset, data: vec![offset as u8; 4096] } }
}

pub(crate) fn commands() -> Vec<Command> {
    let disks = vec![DiskSpec { name: "d0".into(), size_bytes: 1 << 20, sector_bytes: 512 }];
    let batch = |seq, events| Command::Append(EventBatch { group: "g".into(), client_id: 5, seq, events });
    vec![
        Command::CreateGroup { group: "g".into(), disks, time_ns: 1 },
        batch(1, vec![write(0, 10), write(4096, 20)]),
        batch(2, vec![write(8192, 20)]),
        batch(3, vec![write(0, 30)]),
    ]
}

pub(crate) async fn apply_all(store: &mut crate::Store, commands: Vec<Command>) {
    apply_all_from(store, 1, commands).await
}

/// Appends the commands to the log (payloads to segments), then applies
/// them, as a node does.
pub(crate) async fn apply_all_from(store: &mut crate::Store, first_index: u64, commands: Vec<Command>) {
    use openraft::storage::RaftLogStorage;
    let entries: Vec<Entry> = commands.into_iter().enumerate().map(|(i, c)| Entry::new_normal(log_id(i as u64 + first_index), c)).collect();
    store.log.append(entries.clone(), openraft::storage::IOFlushed::noop()).await.expect("append");
    let entries: Vec<std::io::Result<openraft::storage::EntryResponder<crate::TypeConfig>>> = entries.into_iter().map(|e| Ok((e, None))).collect();
    store.state_machine.apply(stream::iter(entries)).await.expect("apply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_then_read_back_and_resolve_times() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::open(dir.path()).unwrap();
    apply_all(&mut store, commands()).await;
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
    apply_all(&mut a, commands()).await;
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
    apply_all_from(&mut a, 5, vec![Command::Append(EventBatch { group: "g".into(), client_id: 5, seq: 4, events: vec![write(0, 40)] })]).await;
    assert_eq!(a.reader.group("g").unwrap().unwrap().last_lsn, 5);
    assert_eq!(b.reader.group("g").unwrap().unwrap().last_lsn, 4);
    // The installed snapshot is the current one, and survives a reopen.
    drop(b);
    let mut b = retry_while_in_use(|| crate::open(b_dir.path()));
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

/// The content index of `group` is exactly its hashed block versions: one
/// entry per `Ref` or `Data` version, none for a freed or moved one.
fn content_index_agrees(r: &crate::StoreReader, group: &str) -> usize {
    use crate::content::content_key;
    use crate::db::{cf, group_prefix, CF_BLOCKS, CF_CONTENT};
    let prefix = group_prefix(group);
    type Kv = (Box<[u8]>, Box<[u8]>);
    let keys = |family: &str| -> Vec<Kv> {
        r.db.iterator_cf(cf(&r.db, family), rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward))
            .map(|i| i.unwrap())
            .take_while(|(k, _)| k.starts_with(&prefix))
            .collect()
    };
    let mut want = std::collections::BTreeSet::new();
    for (k, v) in keys(CF_BLOCKS) {
        let rest = &k[prefix.len()..];
        let n = rest[0] as usize;
        let disk = std::str::from_utf8(&rest[1..1 + n]).unwrap();
        let block = u64::from_be_bytes(rest[1 + n..9 + n].try_into().unwrap());
        let lsn = u64::from_be_bytes(rest[9 + n..17 + n].try_into().unwrap());
        if let Some(h) = crate::blocks::Version::stored_hash(&v) {
            want.insert(content_key(group, &h, disk, block, lsn));
        }
    }
    let got: std::collections::BTreeSet<Vec<u8>> = keys(CF_CONTENT).into_iter().map(|(k, _)| k.to_vec()).collect();
    assert_eq!(got.len(), want.len(), "content entries of {group:?} vs hashed versions");
    assert!(got == want, "the content index of {group:?} differs from its hashed versions");
    got.len()
}

/// Failback on a real store: a site whose history diverged after LSN F
/// moves its events after F into a branch, in bounded steps. The group
/// then reads as it did at F and can take the primary's events; the branch
/// reads, at every LSN, what the group read before the failback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_keeps_the_diverged_events_as_a_readable_branch() {
    use rewind_wire::dr::{DrRecord, SiteLink};
    const DISK: u64 = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::open(dir.path()).unwrap();
    let disks = vec![DiskSpec { name: "d0".into(), size_bytes: DISK, sector_bytes: 512 }];
    let link = SiteLink { addrs: vec!["x:1".into()], ca_pem: String::new(), cert_pem: String::new(), key_pem: String::new() };
    let record = |primary: &str, epoch| DrRecord { local: "a".into(), remote: "b".into(), primary: primary.into(), epoch, rpo_alarm_ms: 0, max_rate_bytes: 0, link: link.clone() };
    let mut commands = vec![Command::CreateGroup { group: "g".into(), disks, time_ns: 1 }, Command::DrSet { group: "g".into(), record: record("a", 1) }];
    // 40 batches of writes, zero ranges, a large trim (an extent), bookmarks.
    let mut x = 7u64;
    for seq in 1..=40u64 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let offset = (x >> 20) % (DISK / 512 - 300) * 512;
        let event = match seq % 7 {
            3 => Event::WriteZeroes { disk: "d0".into(), offset, len: 8192 },
            5 => Event::Trim { disk: "d0".into(), offset: 0, len: 2 << 20 },
            6 => Event::Bookmark { name: format!("m{seq}"), app_consistent: false },
            _ => Event::Write { disk: "d0".into(), offset, data: vec![seq as u8; 12288 + 512] },
        };
        commands.push(Command::Append(EventBatch { group: "g".into(), client_id: 5, seq, events: vec![TimedEvent { time_ns: seq * 10, event }] }));
    }
    // 1100 bookmarks more, so that the failback takes more than one step.
    for seq in 41..=51u64 {
        let marks = (0..100).map(|i| TimedEvent { time_ns: 500, event: Event::Bookmark { name: format!("k{seq}-{i}"), app_consistent: false } }).collect();
        commands.push(Command::Append(EventBatch { group: "g".into(), client_id: 5, seq, events: marks }));
    }
    let n = commands.len() as u64;
    apply_all(&mut store, commands).await;
    let r = store.reader.clone();
    let disk_at = |group: &str, lsn: u64| r.read_disk(group, "d0", lsn, 0, DISK).unwrap();
    let before: Vec<_> = (0..=40).map(|l| disk_at("g", l)).collect();
    let digest_at_fork = r.digest_at("g", 25).unwrap().unwrap();
    let digest_at_head = r.digest_at("g", 1140).unwrap();
    // A failover elsewhere: this site is the secondary now, and fails back.
    apply_all_from(&mut store, n + 1, vec![Command::DrSet { group: "g".into(), record: record("b", 2) }]).await;
    let mut index = n + 2;
    loop {
        let fork = Command::Fork { group: "g".into(), branch: "g.branch-e2".into(), fork_lsn: 25 };
        apply_all_from(&mut store, index, vec![fork]).await;
        index += 1;
        if r.group("g").unwrap().unwrap().last_lsn == 25 {
            break;
        }
        assert!(index < n + 100, "the failback never finished");
    }
    assert!(index >= n + 4, "one step moved everything: the bounds were not exercised");
    let g = r.group("g").unwrap().unwrap();
    assert_eq!((g.last_lsn, g.digest, g.last_time_ns), (25, digest_at_fork, 250));
    assert_eq!(r.events("g", 26, 100, usize::MAX).unwrap(), vec![]);
    for l in 0..=25 {
        assert!(disk_at("g", l) == before[l as usize], "the group at LSN {l} changed");
    }
    for l in 0..=40 {
        assert!(disk_at("g.branch-e2", l) == before[l as usize], "the branch at LSN {l} differs from the group before the failback");
    }
    assert!(content_index_agrees(&r, "g") > 0);
    assert!(content_index_agrees(&r, "g.branch-e2") > 0);
    let kept = r.events("g.branch-e2", 26, 10_000, usize::MAX).unwrap();
    assert_eq!(kept.iter().map(|e| e.lsn).collect::<Vec<_>>(), (26..=1140).collect::<Vec<_>>());
    assert!(disk_at("g.branch-e2", 1140) == before[40]);
    assert!(r.bookmarks("g", 100).unwrap().iter().all(|b| b.lsn <= 25));
    assert_eq!(r.bookmarks("g.branch-e2", 10_000).unwrap().iter().filter(|b| b.lsn > 25).count(), 1100 + 2);
    assert_eq!(r.digest_at("g.branch-e2", 1140).unwrap(), digest_at_head);
    // The branch takes no writes; the group takes the primary's events.
    let events: Vec<_> = (26..=30).map(|lsn| rewind_wire::event::LoggedEvent { lsn, time_ns: 1000 + lsn, event: Event::Write { disk: "d0".into(), offset: 0, data: vec![0xee; 4096] } }).collect();
    let mut d = digest_at_fork;
    for e in &events {
        d = crate::apply::chain(&d, &rewind_wire::frame::encode_record(e).unwrap());
    }
    let to_branch = Command::Append(EventBatch { group: "g.branch-e2".into(), client_id: 9, seq: 1, events: vec![write(0, 5000)] });
    apply_all_from(&mut store, index, vec![to_branch, Command::Replicate { group: "g".into(), epoch: 2, events, digest: d }]).await;
    assert_eq!(r.group("g.branch-e2").unwrap().unwrap().last_lsn, 1140, "the branch took a write");
    assert_eq!(r.group("g").unwrap().unwrap().last_lsn, 30);
    assert_eq!(&disk_at("g", 30)[0].1[..4096], &[0xee; 4096][..]);
    for l in 0..=40 {
        assert!(disk_at("g.branch-e2", l) == before[l as usize], "the branch at LSN {l} changed when the group went on");
    }
}


/// Retention through the store: a byte policy moves the window while
/// writes (whole and partial blocks, large zero ranges) arrive; a pinned
/// bookmark keeps its point; the collector frees every event before the
/// window; and every kept point reads what a model of the disk says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_frees_history_before_the_window_and_keeps_every_kept_point() {
    const SIZE: u64 = 2 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::open(dir.path()).unwrap();
    let disks = vec![DiskSpec { name: "d0".into(), size_bytes: SIZE, sector_bytes: 512 }];
    let mut commands = vec![Command::CreateGroup { group: "g".into(), disks, time_ns: 1 }];
    let batch = |seq: u64, events: Vec<TimedEvent>| Command::Append(EventBatch { group: "g".into(), client_id: 5, seq, events });
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // The model: every event, so the disk at any LSN can be rebuilt.
    let mut events: Vec<Event> = Vec::new();
    let mut seq = 0;
    let mut t = 10;
    let mut push = |commands: &mut Vec<Command>, events: &mut Vec<Event>, e: Event| {
        seq += 1;
        t += 10;
        events.push(e.clone());
        commands.push(batch(seq, vec![TimedEvent { time_ns: t, event: e }]));
    };
    push(&mut commands, &mut events, Event::Retain { keep_ns: 0, keep_bytes: 64 << 10 });
    for i in 0..300u64 {
        let e = match next() % 10 {
            0 => Event::WriteZeroes { disk: "d0".into(), offset: (next() % 4) * 4096, len: 300 * 4096 },
            1 => Event::Trim { disk: "d0".into(), offset: next() % (SIZE / 2), len: 4096 + next() % 8192 },
            2..=4 => {
                let offset = next() % (SIZE - 9000);
                Event::Write { disk: "d0".into(), offset, data: vec![(i % 251) as u8 + 1; 1 + (next() % 9000) as usize] }
            }
            _ => Event::Write { disk: "d0".into(), offset: (next() % 64) * 4096, data: vec![(i % 251) as u8 + 1; 4096 * (1 + (next() % 3) as usize)] },
        };
        push(&mut commands, &mut events, e);
        if i == 40 {
            push(&mut commands, &mut events, Event::Bookmark { name: "keep".into(), app_consistent: false });
            push(&mut commands, &mut events, Event::Pin { name: "keep".into(), until_ns: u64::MAX });
        }
        if i == 60 {
            push(&mut commands, &mut events, Event::Bookmark { name: "gone".into(), app_consistent: false });
        }
    }
    // The collector runs between applies, as on a node: a version it keeps
    // (current then) must be freed when a later event replaces it.
    let mut index = 1;
    for chunk in commands.chunks(25) {
        apply_all_from(&mut store, index, chunk.to_vec()).await;
        index += chunk.len() as u64;
        let collector = store.collector.clone();
        tokio::task::spawn_blocking(move || collector.step().unwrap()).await.unwrap();
    }
    let r = store.reader.clone();
    let g = r.group("g").unwrap().unwrap();
    let ret = r.retention("g").unwrap();
    let first = ret.first();
    assert!(first > 100 && first < g.last_lsn, "the window moved: first LSN {first} of {}", g.last_lsn);
    assert!(ret.window_bytes(&g) <= 64 << 10);
    let pinned = r.bookmarks("g", 100).unwrap().into_iter().find(|b| b.name == "keep").unwrap().lsn;
    assert!(pinned < first);
    let collector = store.collector.clone();
    let freed = tokio::task::spawn_blocking(move || {
        let mut freed = 0;
        for _ in 0..1000 {
            let s = collector.step().unwrap();
            if s.group.is_none() {
                break;
            }
            freed += s.events;
        }
        freed
    })
    .await
    .unwrap();
    assert!(freed < first - 1, "the steps between applies freed most: {freed} left for the end");
    assert_eq!(r.gc("g").unwrap().collected_to(), first, "every event before the window is freed");
    // The tables keyed by LSN (freed by ranges) hold exactly the window's
    // LSNs, and the chain the link before it too: nothing more went.
    let lsns = |family: &str| -> Vec<u64> {
        let prefix = crate::db::group_prefix("g");
        r.db.iterator_cf(crate::db::cf(&r.db, family), rocksdb::IteratorMode::Start)
            .map(|i| i.unwrap().0)
            .filter(|k| k.starts_with(&prefix))
            .map(|k| u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap()))
            .collect()
    };
    let window: Vec<u64> = (first..=g.last_lsn).collect();
    assert_eq!(lsns(crate::db::CF_EVENTS), window, "event records");
    assert_eq!(lsns(crate::db::CF_TIMES), window, "time keys");
    assert_eq!(lsns(crate::db::CF_CHAIN), (first - 1..=g.last_lsn).collect::<Vec<_>>(), "chain links");
    let mut segrefs = lsns(crate::db::CF_SEGREFS);
    segrefs.sort_unstable();
    let writes: Vec<u64> = window.iter().copied().filter(|l| matches!(events[*l as usize - 1], Event::Write { .. })).collect();
    assert_eq!(segrefs, writes, "segment references");
    // At most one version per block lies before the window (the one
    // current at its start), and the pinned point's.
    let versions_before: usize = (0..SIZE / 4096)
        .map(|b| {
            let from = crate::db::block_key("g", "d0", b, 0);
            let to = crate::db::block_key("g", "d0", b, first);
            r.db.iterator_cf(crate::db::cf(&r.db, crate::db::CF_BLOCKS), rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward))
                .map(|i| i.unwrap().0)
                .take_while(|k| k[..] < to[..])
                .count()
        })
        .max()
        .unwrap();
    assert!(versions_before <= 2, "a block keeps {versions_before} versions before the window");
    assert_eq!(r.gc("g").unwrap().debt(&r.retention("g").unwrap()), 0);
    assert!(r.events("g", 1, 10, usize::MAX).unwrap().first().is_some_and(|e| e.lsn == first));
    let marks: Vec<String> = r.bookmarks("g", 100).unwrap().into_iter().map(|b| b.name).collect();
    assert_eq!(marks, vec!["keep".to_string()], "the unpinned bookmark before the window is gone");
    let model_at = |lsn: u64| {
        let mut disk = vec![0u8; SIZE as usize];
        for e in &events[..lsn as usize] {
            match e {
                Event::Write { offset, data, .. } => disk[*offset as usize..*offset as usize + data.len()].copy_from_slice(data),
                Event::WriteZeroes { offset, len, .. } | Event::Trim { offset, len, .. } => disk[*offset as usize..(*offset + *len) as usize].fill(0),
                _ => {}
            }
        }
        disk
    };
    let read_at = |lsn: u64| -> std::io::Result<Vec<u8>> {
        let mut disk = vec![0u8; SIZE as usize];
        for (at, bytes) in r.read_disk("g", "d0", lsn, 0, SIZE)? {
            disk[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(disk)
    };
    for lsn in [pinned, first, first + 1, (first + g.last_lsn) / 2, g.last_lsn] {
        assert!(read_at(lsn).unwrap() == model_at(lsn), "the disk at LSN {lsn} (window from {first}, pin at {pinned})");
    }
    let err = read_at(first - 1).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(err.to_string().contains("before the window"), "{err}");
    // The content index lost the freed versions with them, and finds every
    // non-zero block of every kept point by its hash; zeroes are never
    // stored, and bytes never written are not found.
    assert!(content_index_agrees(&r, "g") > 0);
    for lsn in [pinned, first, g.last_lsn] {
        let disk = model_at(lsn);
        let blocks: Vec<&[u8]> = disk.chunks(4096).filter(|b| b.iter().any(|x| *x != 0)).collect();
        let hashes: Vec<_> = blocks.iter().map(|b| crate::blocks::block_hash(b)).collect();
        let found = r.find_blocks("g", &hashes).unwrap();
        for (b, f) in blocks.iter().zip(&found) {
            assert_eq!(f.as_deref(), Some(*b), "a block of the disk at LSN {lsn} is not found by its hash");
        }
    }
    let absent = [crate::blocks::zero_block_hash(), crate::blocks::block_hash(&[0xab; 4096])];
    assert_eq!(r.find_blocks("g", &absent).unwrap(), vec![None, None]);
    assert_eq!(r.find_blocks("other", &[crate::blocks::block_hash(&model_at(first)[..4096])]).unwrap(), vec![None]);
}

/// A lock refuses a shorter policy and the group's deletion until it
/// ends; then the group and all its keys go. (The refusals' texts are
/// checked in `retention`'s tests; here, their effect on the store.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_group_refuses_a_shorter_policy_and_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::open(dir.path()).unwrap();
    let mut commands = commands();
    let batch = |seq: u64, e: Event, time_ns: u64| Command::Append(EventBatch { group: "g".into(), client_id: 6, seq, events: vec![TimedEvent { time_ns, event: e }] });
    commands.push(batch(1, Event::Retain { keep_ns: 1000, keep_bytes: 0 }, 40));
    commands.push(batch(2, Event::Lock { until_ns: 500 }, 41));
    commands.push(batch(3, Event::Retain { keep_ns: 10, keep_bytes: 0 }, 42));
    commands.push(Command::DeleteGroup { group: "g".into(), time_ns: 499 });
    let data = TimedEvent { time_ns: 43, event: Event::Write { disk: "d0".into(), offset: 0, data: vec![9; 8192] } };
    commands.push(Command::Append(EventBatch { group: "g".into(), client_id: 7, seq: 1, events: vec![data] }));
    let n = commands.len() as u64;
    apply_all(&mut store, commands).await;
    let r = store.reader.retention("g").unwrap();
    assert_eq!((r.keep_ns, r.lock_until_ns), (1000, 500), "the shorter policy was refused");
    assert_eq!(store.reader.group("g").unwrap().unwrap().last_lsn, 7, "the refused batch took no LSN");
    assert_eq!(content_index_agrees(&store.reader, "g"), 2);
    apply_all_from(&mut store, n + 1, vec![Command::DeleteGroup { group: "g".into(), time_ns: 500 }]).await;
    assert!(store.reader.group("g").unwrap().is_none());
    assert!(store.reader.events("g", 1, 10, usize::MAX).unwrap().is_empty());
    assert!(store.reader.bookmarks("g", 10).unwrap().is_empty());
    assert_eq!(store.reader.retention("g").unwrap(), Default::default());
    assert!(store.reader.producer(5, "g").unwrap().is_none());
    assert_eq!(content_index_agrees(&store.reader, "g"), 0, "the group's content index entries went with it");
}

/// A format-1 store (events, no block index) is refused with the command
/// that migrates it; `migrate` rebuilds every derived table from the
/// events, and the store then reads as it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_store_is_refused_then_migrated_in_place() {
    use crate::db::{cf, CF_BLOCKS, CF_CHAIN, CF_CONTENT, CF_EXTENTS, CF_MARKS, CF_META, CF_TIMES};
    const SIZE: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut commands = vec![Command::CreateGroup { group: "g".into(), disks: vec![DiskSpec { name: "d0".into(), size_bytes: SIZE, sector_bytes: 512 }], time_ns: 1 }];
    for seq in 1..=700u64 {
        let offset = (seq * 7919 * 512) % (SIZE - 20000);
        let event = match seq % 9 {
            0 => Event::Trim { disk: "d0".into(), offset: 0, len: SIZE / 2 },
            4 => Event::Bookmark { name: format!("m{seq}"), app_consistent: seq % 2 == 0 },
            5 => Event::WriteZeroes { disk: "d0".into(), offset, len: 9000 },
            _ => Event::Write { disk: "d0".into(), offset, data: (0..(seq as usize % 5 + 1) * 3000).map(|i| (i as u64 ^ seq) as u8).collect() },
        };
        commands.push(Command::Append(EventBatch { group: "g".into(), client_id: 5, seq, events: vec![TimedEvent { time_ns: seq * 10, event }] }));
    }
    let before = {
        let mut store = crate::open(dir.path()).unwrap();
        apply_all(&mut store, commands).await;
        let r = store.reader.clone();
        let disks: Vec<_> = [1, 100, 350, 699, 700].iter().map(|l| r.read_disk("g", "d0", *l, 0, SIZE).unwrap()).collect();
        (disks, r.bookmarks("g", 1000).unwrap(), r.digest_at("g", 700).unwrap(), content_index_agrees(&r, "g"))
    };
    // What a format-1 store lacks: the derived tables, and the stamp.
    {
        let db = retry_while_in_use(|| crate::db::open_db(dir.path()));
        for family in [CF_BLOCKS, CF_EXTENTS, CF_CONTENT, CF_MARKS, CF_TIMES, CF_CHAIN] {
            db.delete_range_cf(cf(&db, family), [0u8].as_slice(), [0xffu8; 300].as_slice()).unwrap();
        }
        db.delete_cf(cf(&db, CF_META), b"format").unwrap();
    }
    let refused = crate::open(dir.path()).err().expect("a format-1 store is refused");
    assert!(refused.to_string().contains("rewind store migrate --data-dir"), "{refused}");
    // A migration that dies part way (here, after its first write) leaves
    // a format-1 store, refused as before; the next run starts over.
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| crate::migrate(dir.path(), |_, _, _| panic!("killed part way"))));
    assert!(died.is_err());
    assert!(crate::open(dir.path()).err().expect("still format 1").to_string().contains("rewind store migrate"));
    let mut seen = Vec::new();
    let (found, groups) = crate::migrate(dir.path(), |g, done, of| seen.push((g.to_string(), done, of))).unwrap();
    assert_eq!(found, crate::Found::Migrated);
    assert_eq!(groups.iter().map(|g| (g.group.as_str(), g.events)).collect::<Vec<_>>(), vec![("g", 700)]);
    assert_eq!(seen.last(), Some(&("g".to_string(), 700, 700)));
    assert!(seen.len() >= 3, "the rebuild wrote in bounded pieces: {seen:?}");
    let store = crate::open(dir.path()).unwrap();
    let r = store.reader.clone();
    for (i, l) in [1, 100, 350, 699, 700].iter().enumerate() {
        assert!(r.read_disk("g", "d0", *l, 0, SIZE).unwrap() == before.0[i], "the disk at LSN {l} differs after the migration");
    }
    assert_eq!(r.bookmarks("g", 1000).unwrap(), before.1);
    assert_eq!(r.digest_at("g", 700).unwrap(), before.2);
    assert_eq!(content_index_agrees(&r, "g"), before.3);
    assert_eq!(r.lsn_at_time("g", 3505).unwrap(), Some(350));
    // While the store is open (its node running), the command refuses.
    let busy = crate::migrate(dir.path(), |_, _, _| {}).unwrap_err();
    assert!(busy.to_string().contains("is in use (is its node running? stop it first)"), "{busy}");
    drop((store, r));
    assert_eq!(retry_while_in_use(|| crate::migrate(dir.path(), |_, _, _| {})).0, crate::Found::Current);
}

/// A backup's records as the store keeps them: only its importer writes
/// its disk while it is open, the window holds at its start, a resumed
/// import takes it over, and the records survive a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_are_records_that_hold_their_disk_and_the_window() {
    use rewind_wire::rpc::BackupState;
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::open(dir.path()).unwrap();
    let disks = vec![DiskSpec { name: "d0".into(), size_bytes: 1 << 20, sector_bytes: 512 }];
    let batch = |client_id, seq, events: Vec<Event>| {
        Command::Append(EventBatch { group: "g".into(), client_id, seq, events: events.into_iter().map(|event| TimedEvent { time_ns: 10, event }).collect() })
    };
    let begin = Event::BackupBegin { backup: "full".into(), disk: "d0".into(), base: None };
    let data = |v: u8| Event::Write { disk: "d0".into(), offset: 4096, data: vec![v; 8192] };
    apply_all(
        &mut store,
        vec![
            Command::CreateGroup { group: "g".into(), disks, time_ns: 1 },
            batch(1, 1, vec![data(1)]),
            batch(5, 1, vec![Event::Retain { keep_ns: 0, keep_bytes: 1 }, begin.clone(), data(2)]),
            // Another producer may not write the disk meanwhile.
            batch(6, 1, vec![data(3)]),
            batch(1, 2, vec![data(4)]),
        ],
    )
    .await;
    let r = store.reader.clone();
    let g = r.group("g").unwrap().unwrap();
    assert_eq!(g.last_lsn, 4, "the other producers' writes were refused");
    let list = r.backups("g", 10).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].state, list[0].begin_lsn), (BackupState::Open, 3));
    assert_eq!(r.retention("g").unwrap().first(), 3, "the window holds at the open backup's start");
    let hashes = r.block_hashes("g", "d0", 4, 0, 4).unwrap();
    let zero = crate::blocks::zero_block_hash();
    assert_eq!(hashes, vec![zero, crate::blocks::block_hash(&[2; 4096]), crate::blocks::block_hash(&[2; 4096]), zero]);
    assert_eq!(r.block_hashes("g", "d0", 1, 1, 1).unwrap(), vec![crate::blocks::block_hash(&[1; 4096])]);

    // Producer 7 resumes it and commits; then anyone writes again, and the
    // window moves on.
    let commit = Event::BackupCommit { backup: "full".into(), extents: 1, bytes: 8192, digest: vec![7; 32] };
    apply_all_from(
        &mut store,
        6,
        vec![batch(7, 1, vec![begin.clone(), data(5), commit.clone()]), batch(1, 3, vec![data(6)]), batch(5, 2, vec![begin.clone()])],
    )
    .await;
    let g = r.group("g").unwrap().unwrap();
    assert_eq!(g.last_lsn, 8, "a committed name is not begun again");
    let list = r.backups("g", 10).unwrap();
    assert_eq!((list[0].state, list[0].end_lsn, list[0].bytes, list[0].digest.clone()), (BackupState::Committed, 7, 8192, vec![7; 32]));
    assert_eq!(r.retention("g").unwrap().first(), 8);

    // A snapshot carries the records to another replica.
    let snapshot = store.state_machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let (sent, _) = snapshot.snapshot.stream_for_send(&dir.path().join("out.sending")).unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let mut b = crate::open(b_dir.path()).unwrap();
    let copy = b_dir.path().join("incoming.snap");
    std::fs::copy(&sent, &copy).unwrap();
    b.state_machine.install_snapshot(&snapshot.meta, crate::SnapshotFile { path: copy }).await.unwrap();
    assert_eq!(b.reader.backups("g", 10).unwrap(), list);
}

/// A copy makes blocks of one disk the bytes of another's at a point in
/// the window, and is refused for a point before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_takes_blocks_from_a_point_in_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::open(dir.path()).unwrap();
    let disks = vec![DiskSpec { name: "a".into(), size_bytes: 1 << 20, sector_bytes: 512 }, DiskSpec { name: "b".into(), size_bytes: 1 << 20, sector_bytes: 512 }];
    let batch = |seq, events: Vec<Event>| Command::Append(EventBatch { group: "g".into(), client_id: 5, seq, events: events.into_iter().map(|event| TimedEvent { time_ns: 10, event }).collect() });
    let w = |v: u8| Event::Write { disk: "a".into(), offset: 0, data: vec![v; 8192] };
    let copy = |lsn: u64| Event::Copy { disk: "b".into(), block_first: 10, from_disk: "a".into(), from: vec![1, lsn, 0, lsn] };
    apply_all(&mut store, vec![Command::CreateGroup { group: "g".into(), disks, time_ns: 1 }, batch(1, vec![w(1)]), batch(2, vec![w(2)]), batch(3, vec![copy(1)])]).await;
    let r = store.reader.clone();
    assert_eq!(r.group("g").unwrap().unwrap().last_lsn, 3);
    let runs = r.read_disk("g", "b", 3, 40960, 8192).unwrap();
    assert_eq!(runs, vec![(0, vec![1u8; 8192])], "blocks 10 and 11 of b are a's blocks 1 and 0 as of LSN 1");
    assert_eq!(r.block_hashes("g", "b", 3, 10, 1).unwrap(), vec![crate::blocks::block_hash(&[1; 4096])]);
    // The window moves to LSN 4: a copy from LSN 1 is refused, from 4 taken.
    apply_all_from(&mut store, 5, vec![batch(4, vec![Event::Retain { keep_ns: 0, keep_bytes: 1 }]), batch(5, vec![copy(1)]), batch(6, vec![copy(2)])]).await;
    let g = r.group("g").unwrap().unwrap();
    assert_eq!(g.last_lsn, 4, "copies from before the window (LSN {}) are refused", r.retention("g").unwrap().first());
    let found = r.locate_blocks("g", &[crate::blocks::block_hash(&[2; 4096]), crate::blocks::block_hash(&[9; 4096])], 1).unwrap();
    assert!(matches!(&found[0], Some((d, _, 2)) if d == "a"), "{found:?}");
    assert_eq!(found[1], None);
}

/// A dropped store's threads (the log syncer mid-sync) may hold RocksDB
/// open for a moment after the drop: retry an open that finds it in use.
pub(crate) fn retry_while_in_use<T>(mut open: impl FnMut() -> std::io::Result<T>) -> T {
    // At most 200 tries, 50 ms apart: 10 s.
    for _ in 0..200 {
        match open() {
            Ok(v) => return v,
            Err(e) if e.to_string().contains("in use") => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(e) => panic!("open: {e}"),
        }
    }
    panic!("the store stayed in use for 10 s after it was dropped")
}
