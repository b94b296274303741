//! The fault injector of a seed's site: crashes, power loss, pauses,
//! partitions, fsync errors, corruption, membership changes and clock
//! jumps (`inject`), and the kinds added later, each on its own generator:
//! read corruption, snapshot corruption, slow disks. What each does is
//! written down in `simulation/FAULTS.md`.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use openraft::BasicNode;
use openraft_rt::WatchReceiver;

use crate::model::NODES;
use crate::rng::Rng;
use crate::site::{crash, leader, membership, restart_later, up_nodes};
use crate::{rt, world, Bug};

pub(crate) async fn inject(mut rng: Rng, end_ns: u64, skews: Vec<Rc<RefCell<i64>>>) {
    let plan = world::with(|w| w.plan.clone());
    let mut kinds = Vec::new();
    for (on, kind) in [
        (plan.partitions, "partition"),
        (plan.crashes, "crash"),
        (plan.power_loss, "power loss"),
        (plan.pauses, "pause"),
        (plan.fsync_errors, "fsync error"),
        (plan.corruption, "corruption"),
        (plan.membership, "membership"),
        (plan.clock_jumps, "clock jump"),
        (plan.node_clocks, "node clock"),
        (plan.io_crashes, "crash at I/O completion"),
    ] {
        if on {
            kinds.push(kind);
        }
    }
    let mut corrupted = false;
    while rt::now_ns() < end_ns {
        rt::sleep(Duration::from_millis(rng.range(plan.fault_every_ms / 2, plan.fault_every_ms * 3 / 2))).await;
        if kinds.is_empty() {
            continue;
        }
        let kind = kinds[rng.range(0, kinds.len() as u64) as usize];
        let up = up_nodes();
        let pick = |rng: &mut Rng, from: &[u64]| from.get(rng.range(0, from.len() as u64) as usize).copied();
        match kind {
            "partition" => {
                let leader = leader().map(|(id, _)| id);
                let variant = rng.range(0, 4);
                let cut: Vec<(u64, u64)> = match (variant, leader) {
                    (0, Some(l)) => {
                        world::count("partition: leader isolated");
                        NODES.iter().filter(|n| **n != l).flat_map(|n| [(l, *n), (*n, l)]).collect()
                    }
                    (1, _) => {
                        world::count("partition: majority/minority");
                        let a = NODES[rng.range(0, 4) as usize];
                        NODES.iter().filter(|n| **n != a).flat_map(|n| [(a, *n), (*n, a)]).collect()
                    }
                    (2, _) => {
                        world::count("partition: one way");
                        let a = NODES[rng.range(0, 4) as usize];
                        let b = NODES[rng.range(0, 4) as usize];
                        if a == b { vec![] } else { vec![(a, b)] }
                    }
                    _ => {
                        world::count("partition: healed");
                        world::with(|w| w.blocked.clear());
                        world::trace("network healed");
                        continue;
                    }
                };
                world::trace(format!("links cut: {cut:?}"));
                world::with(|w| w.blocked.extend(cut));
            }
            "crash" => {
                if let Some(id) = pick(&mut rng, &up) {
                    world::count("crash");
                    crash(id, "injected");
                    // Often a supervisor restarts it at once.
                    let after = if rng.chance(0.3) { rng.range(5, 100) } else { rng.range(100, 3000) };
                    restart_later(id, after);
                }
            }
            "power loss" => {
                world::count("power loss");
                world::trace("power loss: every node crashes");
                for id in &up {
                    crash(*id, "power loss");
                }
                let after = rng.range(200, 2000);
                for id in NODES {
                    restart_later(id, after);
                }
            }
            "pause" => {
                if let Some(id) = pick(&mut rng, &up) {
                    world::count("pause");
                    let ms = rng.range(100, 2000);
                    world::trace(format!("n{id} paused for {ms} ms"));
                    rt::pause_node(id);
                    rt::spawn_local(async move {
                        rt::sleep(Duration::from_millis(ms)).await;
                        rt::resume_node(id);
                        world::trace(format!("n{id} resumes"));
                    });
                }
            }
            "fsync error" => {
                if let Some(id) = pick(&mut rng, &up) {
                    world::count("fsync error");
                    world::trace(format!("n{id}: its next fsync will fail"));
                    world::with(|w| w.fsync_fail.insert(id));
                }
            }
            "corruption" if !corrupted && rng.chance(0.5) => {
                // One replica only: a minority. A write misdirected over
                // another record: both read back wrong.
                if let Some(id) = pick(&mut rng, &up) {
                    corrupted = true;
                    world::count("misdirected write");
                    world::trace(format!("n{id}: its next log write will land over another record"));
                    world::with(|w| w.misdirect.insert(id));
                }
            }
            "corruption" if !corrupted => {
                // A synced payload rots in its segment under a stopped node:
                // its next open must refuse, not cut acknowledged entries.
                let down: Vec<u64> = NODES.iter().copied().filter(|n| !up.contains(n) && !world::with(|w| w.nodes[n].refused)).collect();
                if world::with(|w| w.torn_segments) && rng.range(0, 2) == 0 {
                    if let Some(id) = pick(&mut rng, &down) {
                        let disk = world::with(|w| w.nodes[&id].disk.clone());
                        let mut r = world::with(|w| w.disk_rng.fork(id));
                        let rotten = disk.lock().expect("disk").rot_payload(&mut r);
                        if let Some(k) = rotten {
                            corrupted = true;
                            world::count("segment payload rots under a stopped node");
                            world::trace(format!("n{id}: the payload of log entry {k} rots in its segment"));
                            continue;
                        }
                    }
                }
                // One replica only: a minority.
                if let Some(id) = pick(&mut rng, &NODES) {
                    let disk = world::with(|w| w.nodes[&id].disk.clone());
                    let mut r = world::with(|w| w.disk_rng.fork(id));
                    let rotten = disk.lock().expect("disk").corrupt_one(&mut r);
                    if let Some(k) = rotten {
                        corrupted = true;
                        world::count("corruption");
                        world::trace(format!("n{id}: log entry {k} rots on disk"));
                    }
                }
            }
            "membership" => {
                let (voters, _) = membership();
                let Some((lid, raft)) = leader() else { continue };
                world::count("membership change");
                // The same guard production's admin requests go through.
                let guard = !world::with(|w| w.is_bug(Bug::MembershipUnguarded));
                if let Some(why) = rewind_raft_store::membership_change_refusal(&raft.metrics().borrow_watched().clone()).filter(|_| guard) {
                    world::trace(format!("n{lid} refuses a membership change: {why}"));
                    continue;
                }
                if voters.len() <= 3 {
                    let Some(new) = NODES.iter().copied().find(|n| !voters.contains(n)) else { continue };
                    world::trace(format!("n{lid}: add n{new} as a learner, then promote it"));
                    rt::spawn_local(async move {
                        let r = rt::timeout(Duration::from_secs(10), async {
                            raft.add_learner(new, BasicNode::new(format!("n{new}")), false).await.map_err(|e| e.to_string())?;
                            let mut v = voters.clone();
                            v.insert(new);
                            raft.change_membership(v, false).await.map_err(|e| e.to_string())
                        })
                        .await;
                        world::trace(format!("promote n{new}: {}", short(&r)));
                    });
                } else {
                    let list: Vec<u64> = voters.iter().copied().collect();
                    let Some(gone) = pick(&mut rng, &list) else { continue };
                    let mut v = voters.clone();
                    v.remove(&gone);
                    // Production's rule: a leader leaving the voters hands
                    // leadership over, and the next leader makes the change.
                    let handover = rewind_raft_store::self_removal_handover(&raft.metrics().borrow_watched().clone(), &v);
                    let unguarded = world::with(|w| w.is_bug(Bug::LeaderRemovesItself) || w.is_bug(Bug::MembershipUnguarded));
                    if let Some(to) = handover.filter(|_| !unguarded) {
                        world::trace(format!("n{lid} is asked to leave the voters: it hands leadership to n{to}"));
                        let _ = raft.trigger().transfer_leader(to).await;
                        continue;
                    }
                    world::trace(format!("n{lid}: remove n{gone} from the voters"));
                    rt::spawn_local(async move {
                        let r = rt::timeout(Duration::from_secs(10), raft.change_membership(v, false)).await;
                        world::trace(format!("remove n{gone}: {}", match r {
                            Ok(Ok(_)) => "done".to_string(),
                            Ok(Err(e)) => e.to_string(),
                            Err(e) => e.to_string(),
                        }));
                    });
                }
            }
            "node clock" => {
                if let Some(id) = pick(&mut rng, &up) {
                    world::count("node clock skew or jump");
                    let rate = rng.range(70, 131) as f64 / 100.0;
                    let forward = if rng.chance(0.3) { rng.range(0, 3_000_000_000) } else { 0 };
                    world::trace(format!("n{id}'s clock now runs at {rate:.2}x, {} ms ahead", forward / 1_000_000));
                    rt::skew_clock(id, rate, forward);
                }
            }
            "crash at I/O completion" => {
                if let Some(id) = pick(&mut rng, &up) {
                    world::count("crash at I/O completion");
                    if rng.chance(0.5) {
                        world::trace(format!("n{id}: will crash when its next fsync completes"));
                        world::with(|w| w.crash_at_io.insert(id));
                    } else {
                        world::trace(format!("n{id}: will crash when it next saves a vote"));
                        world::with(|w| w.crash_at_vote.insert(id));
                    }
                }
            }
            "clock jump" => {
                if let Some(s) = skews.get(rng.range(0, skews.len() as u64) as usize) {
                    world::count("clock jump");
                    let jump = rng.range(0, 2_000_000_000) as i64 - 1_000_000_000;
                    *s.borrow_mut() += jump;
                    world::trace(format!("a client's clock jumps {} ms", jump / 1_000_000));
                }
            }
            _ => {}
        }
    }
}

fn short<T, E: std::fmt::Display, F: std::fmt::Display>(r: &Result<Result<T, E>, F>) -> String {
    match r {
        Ok(Ok(_)) => "done".into(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    }
}

/// Reads that come back wrong once, the media being fine (a bad cable, a
/// controller glitch): production's checksum catches it and the node stops
/// rather than use the bytes; after a restart the entry reads right.
pub(crate) async fn inject_read_errors(mut rng: Rng, end_ns: u64) {
    while rt::now_ns() < end_ns {
        rt::sleep(Duration::from_millis(rng.range(500, 4000))).await;
        let up = up_nodes();
        if let Some(id) = up.get(rng.range(0, up.len() as u64) as usize).copied() {
            world::count("read corruption");
            world::trace(format!("n{id}: its next log read comes back corrupt"));
            world::with(|w| w.misread.insert(id));
        }
    }
}

/// Arms a node so that the next snapshot sent to it arrives corrupt (its
/// count is taken when one does).
pub(crate) async fn inject_snapshot_errors(mut rng: Rng, end_ns: u64) {
    while rt::now_ns() < end_ns {
        rt::sleep(Duration::from_millis(rng.range(500, 4000))).await;
        let id = NODES[rng.range(0, NODES.len() as u64) as usize];
        world::with(|w| w.snapshot_misread.insert(id));
    }
}

/// A disk turns slow (a failing drive, a noisy neighbour): its fsyncs take
/// 10-300 times as long for 0.5-5 s.
pub(crate) async fn inject_slow_disks(mut rng: Rng, end_ns: u64) {
    while rt::now_ns() < end_ns {
        rt::sleep(Duration::from_millis(rng.range(1000, 5000))).await;
        let id = NODES[rng.range(0, NODES.len() as u64) as usize];
        let ms = rng.range(500, 5000);
        let factor = rng.range(10, 301);
        world::count("slow disk");
        world::trace(format!("n{id}'s disk turns slow for {ms} ms: fsyncs take {factor}x as long"));
        let until = rt::now_ns() + ms * 1_000_000;
        world::with(|w| w.slow.insert(id, (until, factor)));
    }
}
