//! What the simulated world knows beside the executor: the nodes and their
//! disks, the network's faults, the trace, and the fault counters.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::disk::Disk;
use crate::rng::Rng;
use crate::{rt, Bug, Raft};

/// Lines of trace kept for a failure report.
pub const TRACE_TAIL: usize = 60;

/// The per-seed fault model, drawn once per seed (swarm testing: each kind
/// is on or off, and its rate varies).
#[derive(Debug, Clone)]
pub struct Plan {
    pub loss: f64,
    pub dup: f64,
    pub delay_max_ms: u64,
    pub partitions: bool,
    pub crashes: bool,
    pub power_loss: bool,
    pub pauses: bool,
    pub fsync_errors: bool,
    pub corruption: bool,
    pub membership: bool,
    pub clock_jumps: bool,
    pub node_clocks: bool,
    pub io_crashes: bool,
    /// A tap with a guest writing through it, into a group of its own.
    pub tap: bool,
    /// The tap's process crashes (only with a tap).
    pub tap_crashes: bool,
    /// The tap runs in async mode: a journal on the tap's host, shipped
    /// behind the guest (only with a tap).
    pub tap_async: bool,
    /// The group gets a byte retention policy and a pinned bookmark: its
    /// window moves and the collector frees history while the faults run.
    pub retention: bool,
    /// Log reads that come back corrupt once.
    pub read_errors: bool,
    /// Snapshots that arrive corrupt (they fail their checksum).
    pub snapshot_errors: bool,
    /// A node's disk turns slow for a while (fsyncs 10-300x longer).
    pub slow_disks: bool,
    /// Disks replayed over the network from any node while faults run.
    pub replays: bool,
    /// Frames of append streams that sit in the network for 50-500 ms
    /// (a queue, a route change), holding up the frames behind them.
    pub stalled_frames: bool,
    /// Backups imported into a group of their own, their source going
    /// away mid-way, an intruder writing their disk.
    pub backups: bool,
    /// Mean simulated time between two fault actions.
    pub fault_every_ms: u64,
}

impl Plan {
    pub fn draw(rng: &mut Rng) -> Plan {
        let mut on = |p: f64| rng.chance(p);
        let (loss_on, dup_on) = (on(0.5), on(0.4));
        let partitions = on(0.5);
        let crashes = on(0.5);
        let power_loss = on(0.3);
        let pauses = on(0.4);
        let fsync_errors = on(0.3);
        let corruption = on(0.3);
        let membership = on(0.3);
        let clock_jumps = on(0.4);
        Plan {
            loss: if loss_on { rng.range(1, 200) as f64 / 1000.0 } else { 0.0 },
            dup: if dup_on { rng.range(1, 100) as f64 / 1000.0 } else { 0.0 },
            delay_max_ms: rng.range(1, 40),
            partitions,
            crashes,
            power_loss,
            pauses,
            fsync_errors,
            corruption,
            membership,
            clock_jumps,
            node_clocks: false,
            io_crashes: false,
            tap: false,
            tap_crashes: false,
            tap_async: false,
            retention: false,
            read_errors: false,
            snapshot_errors: false,
            slow_disks: false,
            replays: false,
            stalled_frames: false,
            backups: false,
            fault_every_ms: rng.range(150, 1500),
        }
        .with_later_kinds(rng)
    }

    /// Kinds added after the first ones, drawn last so that older seeds
    /// keep their plans.
    fn with_later_kinds(mut self, rng: &mut Rng) -> Plan {
        self.node_clocks = rng.chance(0.4);
        self.io_crashes = rng.chance(0.3);
        self
    }

    /// Kinds added after those, drawn from a generator of their own (the
    /// caller's), so that a seed with all of them off keeps its history.
    pub fn with_extra_kinds(mut self, rng: &mut Rng) -> Plan {
        self.tap = rng.chance(0.5);
        self.tap_crashes = self.tap && rng.chance(0.5);
        self.read_errors = rng.chance(0.3);
        self.snapshot_errors = rng.chance(0.3);
        self.slow_disks = rng.chance(0.3);
        self.replays = rng.chance(0.5);
        self.stalled_frames = rng.chance(0.5);
        self.tap_async = self.tap && rng.chance(0.5);
        self.retention = rng.chance(0.5);
        self.backups = rng.chance(0.5);
        self
    }
}

/// A node's process: up with its Raft handle, or down.
pub struct NodeSlot {
    pub raft: Option<Raft>,
    /// The state machine of the running process.
    pub sm: Option<Arc<Mutex<crate::sm::SmImage>>>,
    pub disk: Arc<Mutex<Disk>>,
    /// Why the node stopped by itself (an fsync error, a corrupt record).
    pub died: Option<String>,
    /// The node refuses to start: its log failed a checksum at open.
    pub refused: bool,
}

pub struct World {
    pub seed: u64,
    pub bug: Option<Bug>,
    pub plan: Plan,
    pub net_rng: Rng,
    pub disk_rng: Rng,
    pub nodes: BTreeMap<u64, NodeSlot>,
    /// Blocked one-way links (from, to).
    pub blocked: BTreeSet<(u64, u64)>,
    /// Counts of faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    pub messages: u64,
    trace: blake3::Hasher,
    pub trace_lines: u64,
    tail: VecDeque<String>,
    /// Nodes armed to fail their next fsync.
    pub fsync_fail: BTreeSet<u64>,
    /// Nodes armed to crash when their next fsync completes.
    pub crash_at_io: BTreeSet<u64>,
    /// Nodes armed to crash right after they next save a vote.
    pub crash_at_vote: BTreeSet<u64>,
    /// Nodes whose next append lands over another entry.
    pub misdirect: BTreeSet<u64>,
    /// Nodes whose next log read comes back corrupt (the media is fine).
    pub misread: BTreeSet<u64>,
    /// Nodes the next snapshot sent to arrives corrupt.
    pub snapshot_misread: BTreeSet<u64>,
    /// Slow disks: node -> (until, fsync latency factor).
    pub slow: BTreeMap<u64, (u64, u64)>,
    /// A crash tears the payload segments' unsynced bytes, and payloads
    /// rot (off with `--no-retention`: the pinned seeds' world).
    pub torn_segments: bool,
    /// Batches the tap gave its producer: (producer, seq) -> events.
    pub tap_batches: BTreeMap<(u64, u64), Vec<rewind_wire::event::Event>>,
    /// Batches the tap's producer failed for a reason other than its deadline.
    pub tap_errors: Vec<String>,
    /// Every trace line, when `REWIND_SIM_TRACE` names a file.
    full: Option<std::io::BufWriter<std::fs::File>>,
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
}

pub fn install(w: World) {
    WORLD.with(|c| *c.borrow_mut() = Some(w));
}

pub fn take() -> Option<World> {
    WORLD.with(|c| c.borrow_mut().take())
}

/// Runs `f` on the world. Never call it across an `.await`.
pub fn with<R>(f: impl FnOnce(&mut World) -> R) -> R {
    WORLD.with(|c| f(c.borrow_mut().as_mut().expect("no simulated world")))
}

/// Adds a line to the trace (hashed, and kept for failure reports).
pub fn trace(line: impl AsRef<str>) {
    let now = rt::now_ns();
    with(|w| w.record(now, line.as_ref()));
}

/// The node's process stops by itself (fsync error, corrupt record, an
/// injected crash at an I/O completion): the observer crashes it and
/// restarts it a second later. The caller should then wait forever.
pub fn die(node: u64, why: &str) {
    trace(format!("n{node} stops: {why}"));
    with(|w| {
        if let Some(n) = w.nodes.get_mut(&node) {
            n.died.get_or_insert_with(|| why.to_string());
        }
    });
}

/// Adds a line to the trace at a time the caller gives: for parts of a
/// seed that run outside the simulated executor (the DR scenario).
pub fn trace_at(now_ns: u64, line: impl AsRef<str>) {
    with(|w| w.record(now_ns, line.as_ref()));
}

pub fn count(kind: &'static str) {
    with(|w| *w.faults.entry(kind).or_default() += 1);
}

impl World {
    pub fn new(seed: u64, bug: Option<Bug>, plan: Plan, rng: &mut Rng) -> World {
        World {
            seed,
            bug,
            plan,
            net_rng: rng.fork(1),
            disk_rng: rng.fork(2),
            nodes: BTreeMap::new(),
            blocked: BTreeSet::new(),
            faults: BTreeMap::new(),
            messages: 0,
            trace: blake3::Hasher::new(),
            trace_lines: 0,
            tail: VecDeque::new(),
            fsync_fail: BTreeSet::new(),
            crash_at_io: BTreeSet::new(),
            crash_at_vote: BTreeSet::new(),
            misdirect: BTreeSet::new(),
            misread: BTreeSet::new(),
            snapshot_misread: BTreeSet::new(),
            slow: BTreeMap::new(),
            torn_segments: true,
            tap_batches: BTreeMap::new(),
            tap_errors: Vec::new(),
            full: std::env::var_os("REWIND_SIM_TRACE").and_then(|p| std::fs::File::create(p).ok()).map(std::io::BufWriter::new),
        }
    }

    fn record(&mut self, now_ns: u64, line: &str) {
        let line = format!("{:>10.3}ms {line}", now_ns as f64 / 1e6);
        self.trace.update(line.as_bytes());
        self.trace.update(b"\n");
        self.trace_lines += 1;
        if let Some(f) = &mut self.full {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
        if self.tail.len() == TRACE_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    pub fn trace_hash(&self) -> String {
        self.trace.finalize().to_hex().to_string()
    }

    pub fn tail(&self) -> Vec<String> {
        self.tail.iter().cloned().collect()
    }

    pub fn raft(&self, node: u64) -> Option<Raft> {
        self.nodes.get(&node).and_then(|n| n.raft.clone())
    }

    pub fn is_bug(&self, bug: Bug) -> bool {
        self.bug == Some(bug)
    }

    /// The fate of one message from `from` to `to`: `None` when it is lost
    /// (or the link is cut), else its delay and whether it is duplicated.
    pub fn route(&mut self, from: u64, to: u64) -> Option<(Duration, bool)> {
        self.messages += 1;
        if self.blocked.contains(&(from, to)) {
            return None;
        }
        if self.net_rng.chance(self.plan.loss) {
            *self.faults.entry("message lost").or_default() += 1;
            return None;
        }
        let dup = self.net_rng.chance(self.plan.dup);
        if dup {
            *self.faults.entry("message duplicated").or_default() += 1;
        }
        let delay = Duration::from_micros(self.net_rng.range(50, self.plan.delay_max_ms * 1000 + 51));
        Some((delay, dup))
    }
}
