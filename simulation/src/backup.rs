//! Backups while the faults run: production's importer
//! (`rewind_cdp_ingest::backup::run`, `abort`) reads a disk kept in memory
//! (its dirty bitmap and zero extents as qemu-nbd would give them) and
//! imports it into a group of its own over the simulated network, through
//! production's producer and request service.
//!
//! Faults: the source goes away mid-backup (the backup stays open; the
//! next round resumes it or aborts it), and an intruding producer tries to
//! write the disk while a backup may be open (production refuses it then).
//! The intruder writes what the source holds, so a write taken outside a
//! backup changes nothing the checks compare.
//!
//! Checks at the end, on every member: each committed backup resolves to
//! its commit and reads back exactly as the source was; a point just inside
//! a backup reads as the disk before it; an aborted backup's end reads as
//! the last committed backup; no intruding write was accepted inside a
//! backup's window.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rewind_cdp_ingest::backup::{self, BackupError, Extents, Mode, Source, Spec};
use rewind_cdp_ingest::producer::Producer;
use rewind_cdp_ingest::BoxFuture;
use rewind_wire::event::{Event, TimedEvent};
use rewind_wire::rpc::{BackupInfo, BackupState, DiskSpec, ErrorKind, Request, Response, Target};

use crate::model::{Shared, NODES, PRODUCER_DEADLINE};
use crate::net::deliver;
use crate::rng::Rng;
use crate::{rt, service_of, stream, world, Raft};

pub const BACKUP_GROUP: &str = "bk";
pub const BACKUP_DISK: &str = "b0";
pub const BACKUP_DISK_BYTES: u64 = 512 << 10;
/// The importer's and the intruder's network addresses.
pub const BACKUP_ADDR: u64 = 170;
pub const INTRUDER_ADDR: u64 = 171;
/// Producer ids: one per importer process, and the intruder's.
pub const BACKUP_PRODUCER_BASE: u64 = 3000;
const INTRUDER_PRODUCER: u64 = 2999;
const BLOCK: u64 = 4096;
const BLOCKS: usize = (BACKUP_DISK_BYTES / BLOCK) as usize;

/// What the importer did, for the checks.
#[derive(Debug, Clone)]
pub enum Done {
    /// Committed at `lsn`: the source's blocks' digests then.
    Committed { name: String, lsn: u64, blocks: Vec<[u8; 32]> },
    /// Aborted at `lsn`: the disk must read as `blocks` (the last committed
    /// backup, or zeroes) there.
    Aborted { lsn: u64, blocks: Vec<[u8; 32]> },
    /// The intruder's write was acknowledged at `lsn`.
    Intruded { lsn: u64 },
}

fn digests(bytes: &[u8]) -> Vec<[u8; 32]> {
    crate::replay::block_digests(bytes)
}

/// The source: a disk in memory, its dirty bitmap "dirty" (blocks changed
/// since the last committed backup), zero extents where blocks are zero,
/// and a fault: it goes away after `reads_left` reads.
struct MemSource {
    bytes: Vec<u8>,
    dirty: Vec<bool>,
    reads_left: Option<u32>,
    /// Extents per block status answer at most (the importer asks again).
    answer_max: usize,
}

impl Source for MemSource {
    fn size(&self) -> u64 {
        BACKUP_DISK_BYTES
    }

    fn knows_zeroes(&self) -> bool {
        true
    }

    fn has_bitmap(&self, name: &str) -> bool {
        name == "dirty"
    }

    fn extents<'a>(&'a mut self, bitmap: Option<&'a str>, offset: u64, len: u64) -> BoxFuture<'a, Result<Extents, String>> {
        let flag = |b: usize| match bitmap {
            Some(_) => self.dirty[b],
            None => self.bytes[b * BLOCK as usize..(b + 1) * BLOCK as usize].iter().all(|x| *x == 0),
        };
        let (first, end) = ((offset / BLOCK) as usize, ((offset + len).div_ceil(BLOCK) as usize).min(BLOCKS));
        let mut out: Extents = Vec::new();
        for b in first..end {
            let f = flag(b);
            let n = out.len();
            match out.last_mut() {
                Some((_, l, g)) if *g == f => *l += BLOCK,
                _ if n == self.answer_max => break,
                _ => out.push((b as u64 * BLOCK, BLOCK, f)),
            }
        }
        Box::pin(async move { Ok(out) })
    }

    fn read(&mut self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        let gone = match &mut self.reads_left {
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        };
        let data = self.bytes[offset as usize..(offset + len) as usize].to_vec();
        Box::pin(async move {
            if gone {
                Err("the source went away".to_string())
            } else {
                Ok(data)
            }
        })
    }
}

/// The site as the importer asks it: production's request service on a
/// node, through the simulated network, following the leader.
struct SimSite {
    leader: Arc<Mutex<Option<u64>>>,
}

async fn handle(raft: Raft, request: Request) -> Result<Response, String> {
    let service = service_of(raft)?;
    Ok(service.handle(request).await)
}

/// Asks the leader, trying each node in turn for up to 20 s.
async fn ask(leader: Arc<Mutex<Option<u64>>>, request: Request) -> Result<Response, String> {
    let mut last = String::from("no node answered");
    for turn in 0..60u64 {
        let to = leader.lock().expect("leader").unwrap_or(NODES[turn as usize % NODES.len()]);
        match deliver(BACKUP_ADDR, to, "backup-read", request.clone(), Duration::from_secs(2), handle).await {
            Ok(Response::Error(e)) if e.kind == ErrorKind::NotLeader || e.kind == ErrorKind::Unavailable => {
                *leader.lock().expect("leader") = e.leader.map(|m| m.id).filter(|id| *id != to);
                last = format!("n{to}: {}", e.message);
            }
            Ok(Response::Error(e)) => return Err(format!("n{to}: {}", e.message)),
            Ok(r) => {
                *leader.lock().expect("leader") = Some(to);
                return Ok(r);
            }
            Err(e) => {
                *leader.lock().expect("leader") = None;
                last = format!("n{to}: {e}");
            }
        }
        rt::sleep(Duration::from_millis(300)).await;
    }
    Err(last)
}

impl SimSite {
    fn call(&self, request: Request) -> BoxFuture<'static, Result<Response, String>> {
        let answer = rt::spawn_local(ask(self.leader.clone(), request));
        Box::pin(async move { answer.await.map_err(|e| e.to_string())? })
    }
}

impl backup::Site for SimSite {
    fn disks<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<DiskSpec>, String>> {
        let call = self.call(Request::GroupState { group: group.to_string() });
        Box::pin(async move {
            match call.await? {
                Response::Group(g) => Ok(g.disks),
                other => Err(format!("unexpected reply {other:?}")),
            }
        })
    }

    fn backups<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<BackupInfo>, String>> {
        let call = self.call(Request::Backups { group: group.to_string(), on_leader: true });
        Box::pin(async move {
            match call.await? {
                Response::Backups(b) => Ok(b),
                other => Err(format!("unexpected reply {other:?}")),
            }
        })
    }

    fn block_hashes<'a>(&'a self, group: &'a str, disk: &'a str, lsn: u64, first: u64, count: u32) -> BoxFuture<'a, Result<Vec<[u8; 32]>, String>> {
        let call = self.call(Request::BlockHashes { group: group.to_string(), disk: disk.to_string(), lsn, block_first: first, count });
        Box::pin(async move {
            match call.await? {
                Response::BlockHashes { hashes, .. } if hashes.len() == count as usize * 32 => Ok(hashes.chunks_exact(32).map(|h| h.try_into().expect("32")).collect()),
                other => Err(format!("unexpected reply {other:?}")),
            }
        })
    }

    fn find_blocks<'a>(&'a self, group: &'a str, hashes: &'a [[u8; 32]], lsn: u64) -> BoxFuture<'a, Result<Vec<Option<(String, u64, u64)>>, String>> {
        let n = hashes.len();
        let call = self.call(Request::FindBlocks { group: group.to_string(), hashes: hashes.concat(), lsn });
        Box::pin(async move {
            match call.await? {
                Response::Found(f) if f.len() == n => Ok(f),
                other => Err(format!("unexpected reply {other:?}")),
            }
        })
    }
}

fn producer(addr: u64, id: u64) -> Producer {
    Producer::over(stream::link(addr, PRODUCER_DEADLINE), Arc::new(stream::SimProducerRuntime), 4, id, 1)
}

/// The guest changes the source: a few blocks get new patterns, and
/// sometimes a range is discarded (zeroes).
fn mutate(rng: &mut Rng, bytes: &mut [u8], dirty: &mut [bool]) {
    for _ in 0..rng.range(1, 12) {
        let b = rng.range(0, BLOCKS as u64) as usize;
        let v = rng.range(1, 256) as u8;
        bytes[b * BLOCK as usize..(b + 1) * BLOCK as usize].fill(v);
        // A sector of the block differs, so equal patterns still differ.
        let s = rng.range(0, 8) as usize * 512;
        bytes[b * BLOCK as usize + s] = v.wrapping_add(1);
        dirty[b] = true;
    }
    if rng.chance(0.2) {
        let (a, n) = (rng.range(0, BLOCKS as u64) as usize, rng.range(1, 40) as usize);
        for b in a..(a + n).min(BLOCKS) {
            bytes[b * BLOCK as usize..(b + 1) * BLOCK as usize].fill(0);
            dirty[b] = true;
        }
    }
}

/// The importer's rounds until `end_ns`.
pub async fn importer(mut rng: Rng, end_ns: u64, history: Shared) {
    let mut bytes = vec![0u8; BACKUP_DISK_BYTES as usize];
    let mut dirty = vec![true; BLOCKS];
    let mut committed: Option<Vec<[u8; 32]>> = None;
    // Whether `committed` is surely what the site's last committed backup
    // holds (a commit whose answer was lost may have happened).
    let mut sure = true;
    let site = SimSite { leader: Arc::default() };
    let mut round = 0u64;
    while rt::now_ns() < end_ns {
        rt::sleep(Duration::from_millis(rng.range(200, 1500))).await;
        round += 1;
        mutate(&mut rng, &mut bytes, &mut dirty);
        let mut p = producer(BACKUP_ADDR, BACKUP_PRODUCER_BASE + round);
        if rng.chance(0.15) {
            match backup::abort(&site, &mut p, BACKUP_GROUP, BACKUP_DISK, rt::local_now_ns()).await {
                Ok((name, lsn, blocks)) => {
                    world::count("backup aborted");
                    world::trace(format!("backup {name} aborted at LSN {lsn}, {blocks} blocks reverted"));
                    if sure {
                        let expected = committed.clone().unwrap_or_else(|| digests(&vec![0u8; BACKUP_DISK_BYTES as usize]));
                        history.borrow_mut().backups.push(Done::Aborted { lsn, blocks: expected });
                    }
                }
                Err(e) => world::trace(format!("no abort: {e}")),
            }
            continue;
        }
        let mode = if committed.is_none() || rng.chance(0.2) {
            Mode::Full
        } else if rng.chance(0.5) {
            Mode::Bitmap("dirty".into())
        } else {
            let areas = (0..BLOCKS).filter(|b| dirty[*b]).map(|b| (b as u64 * BLOCK, (b as u64 + 1) * BLOCK)).collect();
            Mode::Areas(areas)
        };
        let mut source = MemSource {
            bytes: bytes.clone(),
            dirty: dirty.clone(),
            reads_left: rng.chance(0.3).then(|| rng.range(0, 4) as u32),
            answer_max: rng.range(1, 6) as usize,
        };
        // A resumed backup keeps its name.
        let open = match backup::Site::backups(&site, BACKUP_GROUP).await {
            Ok(list) => list.into_iter().find(|b| b.disk == BACKUP_DISK && b.state == BackupState::Open).map(|b| b.name),
            Err(e) => {
                world::trace(format!("no backup round: {e}"));
                continue;
            }
        };
        let name = open.clone().unwrap_or_else(|| format!("bk-{round}"));
        let spec = Spec {
            group: BACKUP_GROUP.into(),
            disk: BACKUP_DISK.into(),
            mode,
            name: open.is_none().then(|| name.clone()),
            resume: true,
            fallback_full: false,
            now_ns: rt::local_now_ns(),
            compress: rng.chance(0.5),
            references: rng.chance(0.7),
        };
        // The intruder tries one write to the disk while this runs.
        let intruder = rng.chance(0.5).then(|| {
            let delay = rng.range(0, 400);
            let block = rng.range(0, BLOCKS as u64);
            let data = bytes[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize].to_vec();
            rt::spawn_local(async move {
                rt::sleep(Duration::from_millis(delay)).await;
                let mut p = producer(INTRUDER_ADDR, INTRUDER_PRODUCER * 1000 + round);
                let e = Event::Write { disk: BACKUP_DISK.into(), offset: block * BLOCK, data };
                p.append(BACKUP_GROUP, vec![TimedEvent { time_ns: rt::local_now_ns(), event: e }]).await
            })
        });
        let result = backup::run(&mut source, &site, &mut p, &spec, |_| {}).await;
        if let Some(i) = intruder {
            match i.await {
                Ok(Ok((_, lsn))) => {
                    world::trace(format!("the intruder's write was taken at LSN {lsn}"));
                    history.borrow_mut().backups.push(Done::Intruded { lsn });
                }
                Ok(Err(e)) => {
                    world::count("backup: a write from another producer refused");
                    world::trace(format!("the intruder's write was refused: {e}"));
                }
                Err(e) => world::trace(format!("the intruder stopped: {e}")),
            }
        }
        // A backup whose commit's answer was lost may be committed.
        let result = match result {
            Err(e) => match backup::Site::backups(&site, BACKUP_GROUP).await {
                Ok(list) => match list.iter().find(|b| b.name == name && b.state == BackupState::Committed) {
                    Some(b) => {
                        world::trace(format!("backup {} was committed at LSN {} after all ({e})", b.name, b.end_lsn));
                        Ok(backup::Report { name: b.name.clone(), commit_lsn: b.end_lsn, mode: "found committed".into(), ..Default::default() })
                    }
                    None => Err(e),
                },
                Err(why) => {
                    world::trace(format!("the backups of {BACKUP_GROUP} are unknown ({why}): an abort is not checked until a commit"));
                    sure = false;
                    Err(e)
                }
            },
            ok => ok,
        };
        match result {
            Ok(r) => {
                if r.resumed {
                    world::count("backup resumed");
                }
                world::trace(format!("backup {} ({}) committed at LSN {}: {} bytes new, {} of them as references", r.name, r.mode, r.commit_lsn, r.bytes_new, r.bytes_referenced));
                if r.bytes_referenced > 0 {
                    world::count("backup: blocks sent as references");
                }
                let blocks = digests(&source.bytes);
                history.borrow_mut().backups.push(Done::Committed { name: r.name, lsn: r.commit_lsn, blocks: blocks.clone() });
                committed = Some(blocks);
                sure = true;
                dirty.fill(false);
            }
            Err(e @ BackupError::Interrupted { .. }) => {
                world::count("backup source gone");
                world::trace(format!("backup cut off: {e}"));
            }
            Err(e) => world::trace(format!("backup not taken: {e}")),
        }
    }
}

/// The disk as of `lsn` on one node, through production's request service.
async fn read_disk(raft: Raft, lsn: u64) -> Result<Vec<u8>, String> {
    let r = handle(raft, Request::ReadDisk { group: BACKUP_GROUP.into(), disk: BACKUP_DISK.into(), lsn, offset: 0, len: BACKUP_DISK_BYTES }).await?;
    match r {
        Response::DiskPiece { len, runs } if len == BACKUP_DISK_BYTES => {
            let mut out = vec![0u8; len as usize];
            for (at, bytes) in runs {
                out[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
            }
            Ok(out)
        }
        other => Err(format!("read of {BACKUP_DISK} at LSN {lsn}: {other:?}")),
    }
}

/// The checks, on each member that is up, once every member has applied
/// everything.
pub async fn check(history: &Shared, members: &[u64]) -> Vec<String> {
    let mut failures = Vec::new();
    let done = history.borrow().backups.clone();
    for id in members {
        let Some(raft) = world::with(|w| w.raft(*id)) else { continue };
        let list = match handle(raft.clone(), Request::Backups { group: BACKUP_GROUP.into(), on_leader: false }).await {
            Ok(Response::Backups(b)) => b,
            other => {
                failures.push(format!("n{id}: the backups of {BACKUP_GROUP}: {other:?}"));
                continue;
            }
        };
        for d in &done {
            match d {
                Done::Committed { name, lsn, blocks } => {
                    match handle(raft.clone(), Request::Resolve { group: BACKUP_GROUP.into(), target: Target::Backup(name.clone()), on_leader: false }).await {
                        Ok(Response::Resolved { lsn: l, .. }) if l == *lsn => {}
                        other => failures.push(format!("n{id}: backup {name} (committed at LSN {lsn}) resolves to {other:?}")),
                    }
                    match read_disk(raft.clone(), *lsn).await {
                        Ok(b) if digests(&b) == *blocks => {}
                        Ok(b) => {
                            let first = digests(&b).iter().zip(blocks).position(|(x, y)| x != y).unwrap_or(0);
                            failures.push(format!("n{id}: backup {name} at LSN {lsn} reads back wrong from block {first}"));
                        }
                        Err(e) => failures.push(format!("n{id}: backup {name}: {e}")),
                    }
                    // A point just inside the backup reads as before it.
                    if let Some(info) = list.iter().find(|b| &b.name == name) {
                        if info.begin_lsn + 1 < info.end_lsn {
                            let (before, inside) = (read_disk(raft.clone(), info.begin_lsn).await, read_disk(raft.clone(), info.begin_lsn + 1).await);
                            if before.is_ok() && before != inside {
                                failures.push(format!("n{id}: LSN {} inside backup {name} (LSN {}..{}) shows the backup half-imported", info.begin_lsn + 1, info.begin_lsn, info.end_lsn));
                            }
                        }
                    }
                }
                Done::Aborted { lsn, blocks } => match read_disk(raft.clone(), *lsn).await {
                    Ok(b) if digests(&b) == *blocks => {}
                    other => failures.push(format!("n{id}: after the abort at LSN {lsn} the disk is not as its last backup left it ({})", other.err().unwrap_or_else(|| "other bytes".into()))),
                },
                Done::Intruded { lsn } => {
                    if let Some(b) = list.iter().find(|b| b.begin_lsn < *lsn && (b.state == BackupState::Open || *lsn < b.end_lsn)) {
                        failures.push(format!("n{id}: another producer's write was taken at LSN {lsn}, inside backup {} (LSN {}..{})", b.name, b.begin_lsn, b.end_lsn));
                    }
                }
            }
        }
    }
    failures
}
