//! One seed: a site of four node processes (three voters and a spare),
//! clients writing through it, a fault injector, an observer that checks
//! Raft safety as the run goes, and the end-of-run checkers.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, ServerState};
use openraft_rt::WatchReceiver;
use rewind_wire::event::{Event, EventBatch, TimedEvent};
use rewind_wire::raft::{Command, CommandReply};
use rewind_wire::rpc::DiskSpec;
use serde::Serialize;

use crate::disk::{Disk, SimLog};
use crate::net::{deliver, SimNet, Undelivered};
use crate::rng::Rng;
use crate::sm::SimSm;
use crate::world::{self, NodeSlot, Plan, World};
use crate::model::{Shared, CLIENT_BASE, DISKS, DISK_BYTES, GROUP, NODES, SECTOR, TAP_DISK, TAP_DISK_BYTES, TAP_GROUP};
use crate::{check, rt, tap, Bug, Raft};

/// Seeds the generator of the fault kinds added later, and their injector.
const EXTRA_SALT: u64 = 0x7A95_EED5_0000_0001;

/// What one seed is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub bug: Option<Bug>,
    /// Simulated seconds of faults.
    pub fault_secs: u64,
    pub clients: u64,
    /// Batches per client.
    pub batches: u64,
    /// Requests the guest sends the tap, when the plan has a tap.
    pub tap_ops: u64,
    /// The plan never has retention (the world before it existed).
    pub no_retention: bool,
}

impl Options {
    pub fn new(seed: u64) -> Options {
        Options { seed, bug: None, fault_secs: 20, clients: 3, batches: 60, tap_ops: 200, no_retention: false }
    }
}

/// What one seed did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Outcome {
    pub seed: u64,
    pub failures: Vec<String>,
    pub trace_hash: String,
    pub trace_lines: u64,
    pub sim_ns: u64,
    pub polls: u64,
    pub messages: u64,
    pub faults: BTreeMap<String, u64>,
    pub acked_batches: u64,
    /// Replays over the network checked against the model.
    pub replays: u64,
    pub plan: String,
    /// The last lines of the trace (on failure).
    pub tail: Vec<String>,
}

pub fn run_seed(opts: &Options) -> Outcome {
    let mut rng = Rng::new(opts.seed);
    // Kinds added later are drawn from a generator of their own, so a seed
    // with all of them off runs as it did before they existed.
    let plan = Plan::draw(&mut rng).with_extra_kinds(&mut Rng::new(opts.seed ^ EXTRA_SALT));
    rewind_cdp_ingest::tap::bugs::ANSWER_BEFORE_COMMIT.store(opts.bug == Some(Bug::TapAnswerBeforeCommit), std::sync::atomic::Ordering::Relaxed);
    rewind_cdp_ingest::shipper::bugs::TRIM_ON_SEND.store(opts.bug == Some(Bug::ShipperTrimsOnSend), std::sync::atomic::Ordering::Relaxed);
    rewind_cdp_ingest::shipper::bugs::TRIM_BEFORE_BACKING_SYNC.store(opts.bug == Some(Bug::TrimBeforeBackingSync), std::sync::atomic::Ordering::Relaxed);
    rewind_cdp_ingest::journal::bugs::CUT_DAMAGED_ENTRY.store(opts.bug == Some(Bug::CutDamagedJournalEntry), std::sync::atomic::Ordering::Relaxed);
    rewind_service::bugs::REPLAY_BEFORE_APPLIED.store(opts.bug == Some(Bug::ReplayBeforeApplied), std::sync::atomic::Ordering::Relaxed);
    rewind_raft_store::bugs::FENCE_IGNORED.store(opts.bug == Some(Bug::DrFenceIgnored), std::sync::atomic::Ordering::Relaxed);
    rewind_raft_store::bugs::REVERT_IGNORES_EXTENTS.store(opts.bug == Some(Bug::DrRevertIgnoresExtents), std::sync::atomic::Ordering::Relaxed);
    rewind_service::bugs::FORK_ONE_LATE.store(opts.bug == Some(Bug::DrForkOneLate), std::sync::atomic::Ordering::Relaxed);
    rewind_service::bugs::DEDUPE_FILL_ASKEW.store(opts.bug == Some(Bug::DrDedupeFillAskew), std::sync::atomic::Ordering::Relaxed);
    rewind_raft_store::bugs::GC_FREES_LIVE.store(opts.bug == Some(Bug::GcFreesLive), std::sync::atomic::Ordering::Relaxed);
    rewind_raft_store::bugs::GC_IGNORES_PINS.store(opts.bug == Some(Bug::GcIgnoresPins), std::sync::atomic::Ordering::Relaxed);
    rewind_raft_store::bugs::BACKUP_HALF_VISIBLE.store(opts.bug == Some(Bug::BackupHalfVisible), std::sync::atomic::Ordering::Relaxed);
    rewind_raft_store::bugs::BACKUP_ADMITS_OTHER_WRITERS.store(opts.bug == Some(Bug::BackupAdmitsOtherWriters), std::sync::atomic::Ordering::Relaxed);
    let plan_text = format!("{plan:?}");
    world::install(World::new(opts.seed, opts.bug, plan, &mut rng));
    world::with(|w| w.torn_segments = !opts.no_retention);
    let history: Shared = Rc::default();
    let h2 = history.clone();
    let opts2 = opts.clone();
    // A panic anywhere (our code or openraft's) is a failure of the seed,
    // reported with the trace that led to it.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        rt::block_on(opts2.seed, Duration::from_secs(600), 400_000_000, scenario(opts2.clone(), rng, h2))
    }));
    let mut failures = match result {
        Ok(Ok(f)) => f,
        Ok(Err(stop)) => vec![format!("the simulation stopped early: {stop:?}")],
        Err(panic) => {
            rt::abandon();
            let msg = rt::panic_message(&*panic);
            vec![format!("panic: {msg} (at {})", PANIC_AT.with(|p| p.borrow().clone()))]
        }
    };
    // The cross-site scenario, with a generator of its own.
    match std::panic::catch_unwind(|| crate::dr::run(opts.seed)) {
        Ok(f) => failures.extend(f),
        Err(panic) => failures.push(format!("panic in the DR scenario: {}", rt::panic_message(&*panic))),
    }
    let w = world::take().expect("world");
    let h = history.borrow();
    failures.extend(h.safety.iter().cloned());
    failures.extend(h.client_errors.iter().cloned());
    Outcome {
        seed: opts.seed,
        failures,
        trace_hash: w.trace_hash(),
        trace_lines: w.trace_lines,
        sim_ns: rt::last_run().0,
        polls: rt::last_run().1,
        messages: w.messages,
        faults: w.faults.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        acked_batches: h.acked.len() as u64,
        replays: h.replays.len() as u64,
        plan: plan_text,
        tail: w.tail(),
    }
}

/// Records where the last panic happened, for the failure report.
pub fn hook_panics() {
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        PANIC_AT.with(|p| *p.borrow_mut() = at);
    }));
}

thread_local! {
    static PANIC_AT: RefCell<String> = const { RefCell::new(String::new()) };
}

fn raft_config() -> Arc<openraft::Config> {
    let c = openraft::Config {
        cluster_name: "sim".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(64),
        max_in_snapshot_log_to_keep: 16,
        purge_batch_size: 1,
        // As production (`node/src/server.rs`): see the note there.
        enable_leader_restore: Some(world::with(|w| w.is_bug(Bug::LeaderRestore))),
        ..Default::default()
    };
    Arc::new(c.validate().expect("valid raft config"))
}

fn start_node(id: u64) {
    let disk = world::with(|w| w.nodes[&id].disk.clone());
    let opened = disk.lock().expect("disk").open_log();
    match opened {
        crate::disk::Opened::Ready => {}
        crate::disk::Opened::Cut(k) => {
            world::count("torn segment tail cut at open");
            world::trace(format!("n{id}: the payload of log entry {k} is torn (never synced): the log is cut there"));
        }
        crate::disk::Opened::Refused(why) => {
            world::trace(format!("n{id} refuses to start: {why}"));
            world::with(|w| w.nodes.get_mut(&id).expect("node").refused = true);
            return;
        }
    }
    world::trace(format!("n{id} starts"));
    world::with(|w| w.nodes.get_mut(&id).expect("node").died = None);
    rt::with_node(Some(id), || {
        rt::spawn_local(async move {
            let sm = SimSm::open(disk.clone());
            let state = sm.state.clone();
            match Raft::new(id, raft_config(), SimNet { from: id }, SimLog { disk }, sm).await {
                Ok(raft) => world::with(|w| {
                    let n = w.nodes.get_mut(&id).expect("node");
                    n.raft = Some(raft);
                    n.sm = Some(state);
                }),
                Err(e) => world::trace(format!("n{id} failed to start: {e}")),
            }
        })
    });
}

pub(crate) fn crash(id: u64, why: &str) {
    let raft = world::with(|w| {
        let n = w.nodes.get_mut(&id).expect("node");
        n.sm = None;
        n.raft.take()
    });
    rt::kill_node(id);
    drop(raft);
    let (kept, lost) = world::with(|w| {
        let disk = w.nodes[&id].disk.clone();
        let r = disk.lock().expect("disk").crash(&mut w.disk_rng, w.torn_segments);
        r
    });
    world::trace(format!("n{id} crashes ({why}): of {} unsynced writes, {kept} survive", kept + lost));
}

pub(crate) fn up_nodes() -> Vec<u64> {
    world::with(|w| w.nodes.iter().filter(|(_, n)| n.raft.is_some()).map(|(id, _)| *id).collect())
}

fn is_up(id: u64) -> bool {
    world::with(|w| w.nodes[&id].raft.is_some())
}

/// The answer a node gives a client's write.
#[derive(Debug, Clone)]
enum WriteAnswer {
    Reply(CommandReply),
    NotLeader(Option<u64>),
}

async fn serve_write(raft: Raft, command: Command) -> Result<WriteAnswer, String> {
    if world::with(|w| w.is_bug(Bug::AckBeforeCommit)) && matches!(command, Command::Append(_)) {
        let m = raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            return Ok(WriteAnswer::NotLeader(m.current_leader));
        }
        // The bug: answer once the leader has the entry, before commit.
        raft.client_write_ff(command, None).await.map_err(|e| e.to_string())?;
        return Ok(WriteAnswer::Reply(CommandReply::Appended { lsn_first: 0, lsn_last: 0 }));
    }
    match raft.client_write(command).await {
        Ok(r) => Ok(WriteAnswer::Reply(r.data)),
        Err(e) => match e.forward_to_leader() {
            Some(f) => Ok(WriteAnswer::NotLeader(f.leader_id)),
            None => Err(e.to_string()),
        },
    }
}

/// Sends one command until some node answers it, or the deadline passes.
pub(crate) async fn submit(from: u64, command: Command, rng: &mut Rng, deadline_ns: u64) -> Option<CommandReply> {
    let mut target = NODES[rng.range(0, 4) as usize];
    while rt::now_ns() < deadline_ns {
        let r = deliver(from, target, "write", command.clone(), Duration::from_secs(2), serve_write).await;
        match r {
            Ok(WriteAnswer::Reply(reply)) => return Some(reply),
            Ok(WriteAnswer::NotLeader(Some(l))) if l != target => {
                target = l;
                rt::sleep(Duration::from_millis(rng.range(1, 20))).await;
            }
            Ok(WriteAnswer::NotLeader(_)) | Err(Undelivered::Lost | Undelivered::Down | Undelivered::TimedOut | Undelivered::Failed(_)) => {
                target = NODES[rng.range(0, 4) as usize];
                rt::sleep(Duration::from_millis(rng.range(20, 300))).await;
            }
        }
    }
    None
}

fn tag(client: u64, seq: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&client.to_le_bytes());
    t[8..].copy_from_slice(&seq.to_le_bytes());
    t
}

fn sectors(rng: &mut Rng, lo: u64, hi: u64) -> u64 {
    rng.range(lo, hi + 1) * SECTOR
}

/// A batch: a tagged write first, then up to three more writes, zeroes or
/// trims (some large enough to be indexed as an extent).
fn make_batch(client: u64, seq: u64, rng: &mut Rng, clock_ns: u64) -> Vec<TimedEvent> {
    let n = rng.range(1, 5);
    let mut events = Vec::new();
    for i in 0..n {
        let disk = DISKS[rng.range(0, 2) as usize].to_string();
        let kind = if i == 0 { 0 } else { rng.range(0, 10) };
        let event = match kind {
            0..=6 => {
                let len = sectors(rng, 1, 24);
                let offset = sectors(rng, 0, (DISK_BYTES - len) / SECTOR);
                let mut data = vec![0u8; len as usize];
                for chunk in data.chunks_mut(8) {
                    let v = rng.next_u64().to_le_bytes();
                    chunk.copy_from_slice(&v[..chunk.len()]);
                }
                if i == 0 {
                    data[..16].copy_from_slice(&tag(client, seq));
                }
                Event::Write { disk, offset, data }
            }
            7 | 8 => {
                let len = if rng.chance(0.3) { sectors(rng, 2100, 3000) } else { sectors(rng, 1, 64) };
                let offset = sectors(rng, 0, (DISK_BYTES - len) / SECTOR);
                if kind == 7 {
                    Event::WriteZeroes { disk, offset, len }
                } else {
                    Event::Trim { disk, offset, len }
                }
            }
            _ => Event::Bookmark { name: format!("c{client}-s{seq}"), app_consistent: rng.chance(0.5) },
        };
        events.push(TimedEvent { time_ns: clock_ns, event });
    }
    events
}

async fn client(id: u64, mut rng: Rng, batches: u64, deadline_ns: u64, clock_skew: Rc<RefCell<i64>>, history: Shared) {
    for seq in 1..=batches {
        let clock = (rt::now_ns() as i64 + *clock_skew.borrow()).max(0) as u64;
        let events = make_batch(id, seq, &mut rng, clock);
        history.borrow_mut().submitted.insert((id, seq), events.iter().map(|e| e.event.clone()).collect());
        let batch = EventBatch { group: GROUP.into(), client_id: id, seq, events };
        match submit(CLIENT_BASE + id, Command::Append(batch), &mut rng, deadline_ns).await {
            Some(CommandReply::Appended { lsn_first, lsn_last }) => {
                world::trace(format!("client {id} seq {seq} acknowledged: LSN {lsn_first}..={lsn_last}"));
                history.borrow_mut().acked.push((id, seq, lsn_first, lsn_last));
            }
            Some(other) => {
                history.borrow_mut().client_errors.push(format!("client {id} seq {seq}: a valid batch was answered {other:?}"));
                return;
            }
            None => {
                world::trace(format!("client {id} gives up at seq {seq}: deadline"));
                return;
            }
        }
        rt::sleep(Duration::from_millis(rng.range(0, 40))).await;
    }
}

/// Watches every running node. Raft's leader completeness: an entry
/// committed under leader id C is in the log of every leader with a higher
/// leader id. (openraft orders leader ids by (term, node), so two nodes may
/// lead in one term; that is not a violation, missing entries are.) C is
/// not known exactly, so each committed entry gets an upper bound of it:
/// the highest vote on any disk when the entry is first seen applied. And
/// an entry once applied (so committed) never changes. Also stops nodes
/// that died.
async fn observe(history: Shared, stop: Rc<RefCell<bool>>) {
    // index -> (upper bound of the leader id it was committed under, digest)
    let mut committed: BTreeMap<u64, ((u64, u64), [u8; 32])> = BTreeMap::new();
    let mut checked: BTreeMap<u64, u64> = BTreeMap::new();
    // leader id -> highest committed index verified in its log
    let mut leaders: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    while !*stop.borrow() {
        rt::sleep(Duration::from_millis(5)).await;
        let died: Vec<(u64, String)> = world::with(|w| {
            w.nodes.iter().filter(|(_, n)| n.raft.is_some()).filter_map(|(id, n)| n.died.clone().map(|d| (*id, d))).collect()
        });
        for (id, why) in died {
            crash(id, &why);
            restart_later(id, 1000);
        }
        for id in up_nodes() {
            let Some(raft) = world::with(|w| w.raft(id)) else { continue };
            let m = raft.metrics().borrow_watched().clone();
            let disk = world::with(|w| w.nodes[&id].disk.clone());
            let applied = m.last_applied.map_or(0, |l| l.index);
            let from = checked.get(&id).copied().unwrap_or(0);
            if applied > from {
                let lid = highest_vote();
                let d = disk.lock().expect("disk");
                for (idx, s) in d.current.entries.range(from + 1..=applied) {
                    let h = check::entry_digest(&s.entry);
                    match committed.get(idx) {
                        None => {
                            committed.insert(*idx, (lid, h));
                        }
                        Some((_, c)) if *c != h => {
                            history.borrow_mut().safety.push(format!("committed entry {idx} differs on n{id}: {:?}", s.entry.log_id));
                        }
                        _ => {}
                    }
                }
                checked.insert(id, applied);
            }
            if m.state == ServerState::Leader {
                let lid = (m.vote.leader_id.term, m.vote.leader_id.node_id);
                if !leaders.contains_key(&lid) {
                    world::trace(format!("n{id} leads term {}", lid.0));
                }
                let done = leaders.get(&lid).copied().unwrap_or(0);
                let d = disk.lock().expect("disk");
                let purged = d.current.purged.map_or(0, |p| p.index);
                for (idx, (elid, h)) in committed.range(done + 1..) {
                    if *elid >= lid || *idx <= purged {
                        continue;
                    }
                    let ok = d.current.entries.get(idx).is_some_and(|s| check::entry_digest(&s.entry) == *h);
                    if !ok {
                        history.borrow_mut().safety.push(format!(
                            "leader completeness: n{id}, leader of term {}, lacks entry {idx}, committed by term {} at the latest",
                            lid.0, elid.0
                        ));
                        break;
                    }
                }
                if let Some((last, _)) = committed.last_key_value() {
                    leaders.insert(lid, *last);
                }
            }
        }
    }
}

/// The highest vote (term, node) on any node's disk, up or down.
fn highest_vote() -> (u64, u64) {
    world::with(|w| {
        w.nodes
            .values()
            .filter_map(|n| n.disk.lock().expect("disk").current.vote.map(|v| (v.leader_id.term, v.leader_id.node_id)))
            .max()
            .unwrap_or((0, 0))
    })
}

pub(crate) fn restart_later(id: u64, after_ms: u64) {
    rt::spawn_local(async move {
        rt::sleep(Duration::from_millis(after_ms)).await;
        let (up, refused) = world::with(|w| (w.nodes[&id].raft.is_some(), w.nodes[&id].refused));
        if !up && !refused {
            start_node(id);
        }
    });
}

/// The voters and learners as the leader (or any node) sees them.
pub(crate) fn membership() -> (BTreeSet<u64>, BTreeSet<u64>) {
    for id in up_nodes() {
        if let Some(raft) = world::with(|w| w.raft(id)) {
            let m = raft.metrics().borrow_watched().clone();
            if m.state == ServerState::Leader {
                let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
                let all: BTreeSet<u64> = m.membership_config.nodes().map(|(id, _)| *id).collect();
                return (voters, all);
            }
        }
    }
    (BTreeSet::new(), BTreeSet::new())
}

/// The members as the leader of the highest term sees them: a removed node
/// can still believe it leads an older term (nobody sends it anything), so
/// the first node that says it leads is not enough at the end.
fn newest_members() -> BTreeSet<u64> {
    let mut best: Option<(u64, BTreeSet<u64>)> = None;
    for id in up_nodes() {
        let Some(raft) = world::with(|w| w.raft(id)) else { continue };
        let m = raft.metrics().borrow_watched().clone();
        if m.state == ServerState::Leader && best.as_ref().is_none_or(|(term, _)| m.current_term > *term) {
            best = Some((m.current_term, m.membership_config.nodes().map(|(id, _)| *id).collect()));
        }
    }
    best.map(|(_, members)| members).unwrap_or_default()
}

pub(crate) fn leader() -> Option<(u64, Raft)> {
    up_nodes().into_iter().find_map(|id| {
        let raft = world::with(|w| w.raft(id))?;
        let leads = raft.metrics().borrow_watched().state == ServerState::Leader;
        leads.then_some((id, raft))
    })
}

/// Creates a group through the site; `what` names it in the trace.
async fn create_group(group: &str, disks: Vec<DiskSpec>, what: &str, rng: &mut Rng, deadline_ns: u64) -> Result<(), String> {
    let create = Command::CreateGroup { group: group.into(), disks, time_ns: 0 };
    match submit(CLIENT_BASE, create, rng, deadline_ns).await {
        Some(CommandReply::Created) => world::trace(format!("{what} created")),
        // A retry after a lost answer finds the group the first try made.
        Some(CommandReply::Refused { reason }) if reason.contains("already exists") => world::trace(format!("{what} created (found on retry)")),
        other => return Err(format!("creating the {what} failed: {other:?}")),
    }
    Ok(())
}

async fn scenario(opts: Options, mut rng: Rng, history: Shared) -> Vec<String> {
    let mut failures = Vec::new();
    for id in NODES {
        let slot = NodeSlot {
            raft: None,
            sm: None,
            disk: Arc::new(Mutex::new(Disk::new(id))),
            died: None,
            refused: false,
        };
        world::with(|w| w.nodes.insert(id, slot));
        start_node(id);
    }
    rt::sleep(Duration::from_millis(1)).await;
    let raft1 = world::with(|w| w.raft(1)).expect("n1 started");
    let members: BTreeMap<u64, BasicNode> = [1u64, 2, 3].iter().map(|id| (*id, BasicNode::new(format!("n{id}")))).collect();
    if let Err(e) = raft1.initialize(members).await {
        return vec![format!("initialize failed: {e}")];
    }
    drop(raft1);
    let disks = DISKS.iter().map(|d| DiskSpec { name: d.to_string(), size_bytes: DISK_BYTES, sector_bytes: SECTOR as u32 }).collect();
    if let Err(e) = create_group(GROUP, disks, "group", &mut rng, 30_000_000_000).await {
        return vec![e];
    }
    let plan = world::with(|w| w.plan.clone());
    if plan.tap {
        let disks = vec![DiskSpec { name: TAP_DISK.into(), size_bytes: TAP_DISK_BYTES, sector_bytes: SECTOR as u32 }];
        if let Err(e) = create_group(TAP_GROUP, disks, "tap group", &mut rng, rt::now_ns() + 30_000_000_000).await {
            return vec![e];
        }
    }
    // Backups, in a group of their own (the pinned seeds run without them,
    // as without retention: in the world they were found in).
    let backups = plan.backups && !opts.no_retention;
    if backups {
        if let Err(e) = create_group(crate::backup::BACKUP_GROUP, Vec::new(), "backup group", &mut rng, rt::now_ns() + 30_000_000_000).await {
            return vec![e];
        }
    }
    let start = rt::now_ns();
    let fault_end = start + opts.fault_secs * 1_000_000_000;
    let stop = Rc::new(RefCell::new(false));
    let mut extra = Rng::new(opts.seed ^ EXTRA_SALT ^ 1);
    let tap_site = plan.tap.then(|| tap::new_site(history.clone()));
    let guest = tap_site.as_ref().map(|t| {
        let depth = extra.range(1, 9) as usize;
        rt::spawn_local(tap::guest(t.clone(), opts.tap_ops, depth, extra.fork(2), fault_end + 60_000_000_000))
    });
    if let Some(t) = tap_site.as_ref().filter(|_| plan.tap_crashes) {
        rt::spawn_local(tap::inject(t.clone(), extra.fork(3), fault_end));
    }
    if plan.read_errors {
        rt::spawn_local(crate::faults::inject_read_errors(extra.fork(4), fault_end));
    }
    if plan.snapshot_errors {
        rt::spawn_local(crate::faults::inject_snapshot_errors(extra.fork(5), fault_end));
    }
    if plan.slow_disks {
        rt::spawn_local(crate::faults::inject_slow_disks(extra.fork(6), fault_end));
    }
    if plan.replays {
        rt::spawn_local(crate::replay::replayer(extra.fork(7), fault_end, history.clone()));
    }
    if plan.retention && !opts.no_retention {
        rt::spawn_local(crate::retention::admin(extra.fork(8), start, fault_end));
    }
    let importer = backups.then(|| rt::spawn_local(crate::backup::importer(extra.fork(9), fault_end, history.clone())));
    let observer = rt::spawn_local(observe(history.clone(), stop.clone()));
    let skews: Vec<Rc<RefCell<i64>>> = (0..opts.clients).map(|_| Rc::new(RefCell::new(0))).collect();
    let clients: Vec<_> = (1..=opts.clients)
        .map(|c| {
            let r = rng.fork(1000 + c);
            rt::spawn_local(client(c, r, opts.batches, fault_end + 60_000_000_000, skews[c as usize - 1].clone(), history.clone()))
        })
        .collect();
    crate::faults::inject(rng.fork(7), fault_end, skews.clone()).await;
    // Faults stop: heal the network, wake paused nodes, restart the rest.
    world::trace("faults stop");
    world::with(|w| {
        // The network heals: no more loss or duplication (delays stay).
        w.plan.loss = 0.0;
        w.plan.dup = 0.0;
        w.plan.stalled_frames = false;
        w.blocked.clear();
        w.fsync_fail.clear();
        w.crash_at_io.clear();
        w.crash_at_vote.clear();
        w.misdirect.clear();
        w.misread.clear();
        w.snapshot_misread.clear();
        w.slow.clear();
    });
    for id in NODES {
        rt::resume_node(id);
        restart_later(id, 0);
    }
    for c in clients {
        let _ = c.await;
    }
    if let Some(i) = importer {
        let _ = i.await;
    }
    if let Some(g) = guest {
        let _ = g.await;
    }
    // Async mode: the journal ships everything the guest was told is
    // written, within a bounded time.
    if let Some(journal) = tap_site.as_ref().and_then(|t| t.borrow().journal.clone()) {
        let deadline = rt::now_ns() + 60_000_000_000;
        loop {
            let held = journal.lock().expect("journal").held();
            if held == 0 {
                world::trace("the tap's journal is drained");
                break;
            }
            if world::with(|w| !w.tap_errors.is_empty()) {
                break;
            }
            if rt::now_ns() > deadline {
                failures.push(format!("the tap's journal still holds {held} batches 60 s after the guest's last flush"));
                break;
            }
            rt::sleep(Duration::from_millis(50)).await;
        }
    }
    let healed = rt::now_ns();
    // Liveness: a new write is acknowledged within a bounded time.
    let marker = EventBatch {
        group: GROUP.into(),
        client_id: CLIENT_BASE - 1,
        seq: 1,
        events: vec![TimedEvent { time_ns: rt::now_ns(), event: Event::Bookmark { name: "end".into(), app_consistent: false } }],
    };
    let reply = submit(CLIENT_BASE - 1, Command::Append(marker), &mut rng, rt::now_ns() + 30_000_000_000).await;
    let final_lsn = match reply {
        Some(CommandReply::Appended { lsn_last, .. }) => lsn_last,
        other => {
            failures.push(format!("no progress within 30 s after the faults stopped: {other:?}"));
            0
        }
    };
    world::trace(format!("final write at LSN {final_lsn}, {} ms after healing", (rt::now_ns() - healed) / 1_000_000));
    // Every member catches up.
    let deadline = rt::now_ns() + 30_000_000_000;
    let members = loop {
        let members = newest_members();
        let up: Vec<u64> = members.iter().copied().filter(|id| is_up(*id)).collect();
        let caught_up = up.iter().all(|id| {
            world::with(|w| w.nodes[id].sm.as_ref().map(|s| s.lock().expect("sm").groups.get(GROUP).map_or(0, |g| g.last_lsn)))
                .unwrap_or(0)
                >= final_lsn
        });
        if caught_up && !up.is_empty() {
            break up;
        }
        if rt::now_ns() > deadline {
            failures.push(format!("members {up:?} did not all apply LSN {final_lsn} within 30 s"));
            break up;
        }
        rt::sleep(Duration::from_millis(50)).await;
    };
    *stop.borrow_mut() = true;
    let _ = observer.await;
    let images: Vec<(u64, crate::sm::SmImage)> = members
        .iter()
        .filter_map(|id| world::with(|w| w.nodes[id].sm.clone()).map(|s| (*id, s.lock().expect("sm").clone())))
        .collect();
    failures.extend(check::check(&history.borrow(), &images, &mut rng.fork(9)));
    if backups {
        failures.extend(check::replicas_agree(crate::backup::BACKUP_GROUP, &images));
        failures.extend(crate::backup::check(&history, &members).await);
    }
    if let Some(t) = tap_site {
        let file = t.borrow().file.lock().expect("backing").bytes.clone();
        let (batches, errors) = world::with(|w| (std::mem::take(&mut w.tap_batches), std::mem::take(&mut w.tap_errors)));
        history.borrow_mut().tap_batches = batches;
        failures.extend(errors);
        failures.extend(check::replicas_agree(TAP_GROUP, &images));
        if let Some((_, image)) = images.iter().max_by_key(|(_, i)| i.groups.get(TAP_GROUP).map_or(0, |g| g.last_lsn)) {
            failures.extend(tap::check(&history.borrow(), image, &file));
        }
    }
    failures
}
