//! Cross-site DR in the simulated world: two sites, each a state machine
//! (production's apply core and block index, `sm.rs`) behind its own
//! consensus, which is taken as given here (the site simulation tests it),
//! so a site is its log of commands and the image that log applies to.
//!
//! Production's DR rules run over them: `rewind_service::dr`'s `dr_info`
//! and `shipment` answer the peer, `next_step` decides each round of a
//! link, and `Command::Replicate` / `Command::DrSet` apply through
//! `apply.rs`. What is modelled around them: the link (messages delayed,
//! lost, duplicated, reordered, cut for a while), leader changes at either
//! site (a new link task starts with nothing in memory; the old one keeps
//! going for a few ticks and its proposals may still commit, or be lost),
//! a site's state rebuilt from its log, writers at the primary, and a
//! failover at the secondary to a past point, while the old primary keeps
//! writing until it hears of the new epoch.
//!
//! Checkers: the secondary's events are the primary's, LSN for LSN, with
//! the same chain (no gap, no duplicate); after the faults stop it catches
//! up; disks replayed at random LSNs are equal at both sites; a failover's
//! disk equals the primary's at the target; the old primary takes no write
//! once it has adopted the new epoch; epochs never go back; a site rebuilt
//! from its log equals the running one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rewind_raft_store::ReadState;
use rewind_service::dr::{dr_info, fill_with, hashed_shipment, next_step, ship_blocks, shipment, Filling, Step};
use rewind_wire::dr::{BlockAt, DrInfo, DrRecord, HashedShipment, ShippedBlocks, Shipment, SiteLink};
use rewind_wire::event::{Event, EventBatch, LoggedEvent, TimedEvent};
use rewind_wire::raft::{Command, CommandReply};
use rewind_wire::rpc::DiskSpec;

use crate::rng::Rng;
use crate::sm::{SimState, SmImage};
use crate::world;

const GROUP: &str = "drg";
const DISK: &str = "d0";
/// The disk: 512 blocks of 4 KiB, so a trim of more than 256 whole blocks
/// becomes an extent.
const BLOCKS: u64 = 512;
const FAULT_TICKS: u64 = 600;
const DRAIN_TICKS: u64 = 400;
/// Salt of the DR scenario's generator, apart from the site scenario's.
const DR_SALT: u64 = 0xD15A_57E2;
const NAMES: [&str; 2] = ["a", "b"];

struct Site {
    image: Arc<Mutex<SmImage>>,
    log: Vec<Command>,
    /// The epoch after each DrSet that applied.
    epoch: u64,
    /// The link task running now, and older ones still running until a tick.
    puller: u64,
    lingering: BTreeMap<u64, u64>,
    diverged: bool,
}

impl Site {
    fn new() -> Site {
        Site { image: Arc::default(), log: Vec::new(), epoch: 0, puller: 1, lingering: BTreeMap::new(), diverged: false }
    }

    fn state(&self) -> SimState {
        SimState(self.image.clone())
    }

    fn apply(&mut self, c: Command) -> CommandReply {
        self.log.push(c.clone());
        let reply = self.image.lock().expect("image").apply_command(&c);
        reply
    }

    fn info(&self, digest_at: Option<u64>) -> DrInfo {
        dr_info(&self.state(), GROUP, digest_at).expect("the group exists at both sites")
    }

    fn record(&self) -> DrRecord {
        self.state().dr(GROUP).expect("memory").expect("linked")
    }

    fn events(&self) -> Vec<LoggedEvent> {
        self.image.lock().expect("image").events.get(GROUP).cloned().unwrap_or_default()
    }

    fn block(&self, b: u64, lsn: u64) -> Vec<u8> {
        self.image.lock().expect("image").block_at(GROUP, DISK, b, lsn).expect("the DR scenario keeps its whole history")
    }

    fn live(&self, puller: u64, tick: u64) -> bool {
        puller == self.puller || self.lingering.get(&puller).is_some_and(|until| tick < *until)
    }
}

enum Msg {
    /// To the peer: a link task asks for the group's state, remembering
    /// what it read of its own site when it asked.
    AskState { from: usize, puller: u64, mine: Box<DrInfo>, record: Box<DrRecord> },
    /// Hashes first (production's way), or every byte (`whole`: the
    /// fallback when the blocks asked for do not come back right).
    AskShip { from: usize, puller: u64, lsn_first: u64, epoch: u64, whole: bool },
    State { to: usize, puller: u64, mine: Box<DrInfo>, record: Box<DrRecord>, theirs: Box<DrInfo> },
    Shipped { to: usize, puller: u64, epoch: u64, shipment: Result<Box<Shipment>, String> },
    Hashed { to: usize, puller: u64, epoch: u64, hashed: Result<Box<HashedShipment>, String> },
    /// The blocks a secondary lacks; the part-filled shipment rides along
    /// (the link task's memory while it waits).
    AskBlocks { from: usize, puller: u64, epoch: u64, lsn_first: u64, wanted: Vec<BlockAt>, filling: Box<Filling> },
    Blocks { to: usize, puller: u64, epoch: u64, lsn_first: u64, blocks: Result<ShippedBlocks, String>, filling: Box<Filling> },
    /// A proposal in a site's own consensus: it commits whatever became of
    /// the task that proposed it (or is lost with a leader).
    Propose { site: usize, command: Box<Command> },
}

struct World {
    rng: Rng,
    tick: u64,
    sites: [Site; 2],
    flight: BTreeMap<(u64, u64), Msg>,
    sent: u64,
    cut_until: u64,
    failures: Vec<String>,
    /// Writers' next sequence numbers, by client.
    seqs: BTreeMap<u64, u64>,
}

fn link() -> SiteLink {
    SiteLink { addrs: vec!["sim:1".into()], ca_pem: String::new(), cert_pem: String::new(), key_pem: String::new() }
}

impl World {
    fn fail(&mut self, why: String) {
        world::trace_at(self.tick * 1_000_000, format!("dr: FAILED {why}"));
        self.failures.push(why);
    }

    fn send(&mut self, msg: Msg, between_sites: bool) {
        let (lo, hi) = if between_sites { (1, 6) } else { (0, 3) };
        let at = self.tick + self.rng.range(lo, hi);
        if between_sites && (self.tick < self.cut_until || self.rng.chance(0.05)) {
            world::count("dr message lost");
            return;
        }
        if !between_sites && self.rng.chance(0.03) {
            world::count("dr proposal lost with its leader");
            return;
        }
        if between_sites && self.rng.chance(0.03) {
            world::count("dr message duplicated");
            let again = match &msg {
                Msg::State { to, puller, mine, record, theirs } => {
                    Some(Msg::State { to: *to, puller: *puller, mine: mine.clone(), record: record.clone(), theirs: theirs.clone() })
                }
                Msg::Shipped { to, puller, epoch, shipment } => Some(Msg::Shipped { to: *to, puller: *puller, epoch: *epoch, shipment: shipment.clone() }),
                Msg::Hashed { to, puller, epoch, hashed } => Some(Msg::Hashed { to: *to, puller: *puller, epoch: *epoch, hashed: hashed.clone() }),
                Msg::Blocks { to, puller, epoch, lsn_first, blocks, filling } => {
                    Some(Msg::Blocks { to: *to, puller: *puller, epoch: *epoch, lsn_first: *lsn_first, blocks: blocks.clone(), filling: filling.clone() })
                }
                _ => None,
            };
            if let Some(m) = again {
                self.sent += 1;
                self.flight.insert((at + self.rng.range(0, 4), self.sent), m);
            }
        }
        self.sent += 1;
        self.flight.insert((at, self.sent), msg);
    }

    /// Applies a command at a site and checks what it must never do.
    fn apply(&mut self, site: usize, command: Command) -> CommandReply {
        let was_primary = self.sites[site].state().dr(GROUP).expect("memory").is_none_or(|d| d.is_primary());
        let is_append = matches!(command, Command::Append(_));
        let reply = self.sites[site].apply(command);
        if is_append && !was_primary && matches!(reply, CommandReply::Appended { .. }) {
            self.fail(format!("site {} took a write while fenced (epoch {})", NAMES[site], self.sites[site].epoch));
        }
        if let Some(d) = self.sites[site].state().dr(GROUP).expect("memory") {
            if d.epoch < self.sites[site].epoch {
                self.fail(format!("site {}'s epoch went back from {} to {}", NAMES[site], self.sites[site].epoch, d.epoch));
            }
            if d.epoch > self.sites[site].epoch {
                world::trace_at(self.tick * 1_000_000, format!("dr: site {} in epoch {}, primary {}", NAMES[site], d.epoch, d.primary));
            }
            self.sites[site].epoch = d.epoch;
        }
        reply
    }

    fn write(&mut self, site: usize, client: u64) {
        let seq = self.seqs.entry(client).or_insert(0);
        *seq += 1;
        let seq = *seq;
        let mut events = Vec::new();
        for _ in 0..self.rng.range(1, 5) {
            let sectors = BLOCKS * 8;
            let event = match self.rng.range(0, 20) {
                0 => {
                    let len = self.rng.range(300, 480) * 8;
                    Event::Trim { disk: DISK.into(), offset: self.rng.range(0, sectors - len) * 512, len: len * 512 }
                }
                1 | 2 => {
                    let len = self.rng.range(1, 64);
                    Event::WriteZeroes { disk: DISK.into(), offset: self.rng.range(0, sectors - len) * 512, len: len * 512 }
                }
                _ => {
                    let len = self.rng.range(1, 40);
                    // One of 255 patterns, each a function of the disk
                    // sector's place in its 4 KiB block: the same blocks
                    // recur at any place (hashes-first shipping finds them at
                    // the secondary), and no sector equals its neighbour.
                    let fill = (self.rng.next_u64() as u8).max(1);
                    let offset = self.rng.range(0, sectors - len) * 512;
                    let data = (0..len * 512).map(|i| fill.wrapping_add((((offset + i) / 512) % 8) as u8 * 31)).collect();
                    Event::Write { disk: DISK.into(), offset, data }
                }
            };
            events.push(TimedEvent { time_ns: self.tick * 1_000_000, event });
        }
        let batch = EventBatch { group: GROUP.into(), client_id: client, seq, events };
        self.apply(site, Command::Append(batch));
    }

    /// A shipment filled from hashes: proposed, or fetched whole when the
    /// blocks did not come back right (production's fallback).
    fn commit_filled(&mut self, to: usize, epoch: u64, lsn_first: u64, puller: u64, filled: Result<Shipment, String>) {
        match filled {
            Ok(s) if !s.events.is_empty() => {
                let command = Command::Replicate { group: GROUP.into(), epoch, events: s.events, digest: s.digest };
                self.send(Msg::Propose { site: to, command: Box::new(command) }, false);
            }
            Ok(_) => {}
            Err(why) => {
                world::count("dr: a hashed shipment fetched whole");
                world::trace_at(self.tick * 1_000_000, format!("dr: site {}: {why}; fetching the shipment whole", NAMES[to]));
                self.send(Msg::AskShip { from: to, puller, lsn_first, epoch, whole: true }, true);
            }
        }
    }

    /// One round of a site's link task: ask the peer for its state.
    fn ask(&mut self, site: usize) {
        let s = &self.sites[site];
        let mine = s.info(None);
        let record = s.record();
        let puller = s.puller;
        self.send(Msg::AskState { from: site, puller, mine: Box::new(mine), record: Box::new(record) }, true);
    }

    fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::AskState { from, puller, mine, record } => {
                let theirs = self.sites[1 - from].info(Some(mine.last_lsn));
                self.send(Msg::State { to: from, puller, mine, record, theirs: Box::new(theirs) }, true);
            }
            Msg::AskShip { from, puller, lsn_first, epoch, whole: true } => {
                let shipment = shipment(&self.sites[1 - from].state(), GROUP, lsn_first).map(Box::new).map_err(|e| e.to_string());
                self.send(Msg::Shipped { to: from, puller, epoch, shipment }, true);
            }
            Msg::AskShip { from, puller, lsn_first, epoch, whole: false } => {
                let hashed = hashed_shipment(&self.sites[1 - from].state(), GROUP, lsn_first).map(Box::new).map_err(|e| e.to_string());
                self.send(Msg::Hashed { to: from, puller, epoch, hashed }, true);
            }
            Msg::AskBlocks { from, puller, epoch, lsn_first, wanted, filling } => {
                let blocks = ship_blocks(&self.sites[1 - from].state(), GROUP, &wanted).map_err(|e| e.to_string());
                self.send(Msg::Blocks { to: from, puller, epoch, lsn_first, blocks, filling }, true);
            }
            Msg::Hashed { to, puller, epoch, hashed } => {
                if !self.sites[to].live(puller, self.tick) {
                    return;
                }
                let h = match hashed {
                    Ok(h) => h,
                    Err(why) => return world::trace_at(self.tick * 1_000_000, format!("dr: site {} refused a shipment: {why}", NAMES[1 - to])),
                };
                let lsn_first = h.shipment.events.first().map_or(0, |e| e.lsn);
                // Now and then the secondary no longer holds a block the
                // primary elided (its collector freed it): it must ask.
                let state = self.sites[to].state();
                let rng = &mut self.rng;
                let filling = fill_with(*h, |hashes| {
                    let mut found = state.find_blocks(GROUP, hashes).map_err(|e| rewind_service::ServiceError::Internal(e.to_string()))?;
                    for f in found.iter_mut() {
                        if f.is_some() && rng.chance(0.05) {
                            world::count("dr: a block the primary elided is gone at the secondary");
                            *f = None;
                        }
                    }
                    Ok(found)
                })
                .expect("a shipment's blocks lie inside it");
                if filling.found_here > 0 {
                    world::count("dr: blocks the secondary already held were not sent");
                }
                if filling.copied > 0 {
                    world::count("dr: blocks repeated in a shipment were sent once");
                }
                if !filling.wanted.is_empty() {
                    world::count("dr: blocks the primary elided were asked for (the secondary freed them)");
                }
                if filling.wanted.is_empty() {
                    let s = filling.complete(ShippedBlocks { blocks: Vec::new() });
                    self.commit_filled(to, epoch, lsn_first, puller, s);
                } else {
                    let wanted = filling.wanted.clone();
                    self.send(Msg::AskBlocks { from: to, puller, epoch, lsn_first, wanted, filling: Box::new(filling) }, true);
                }
            }
            Msg::Blocks { to, puller, epoch, lsn_first, blocks, filling } => {
                if !self.sites[to].live(puller, self.tick) {
                    return;
                }
                let s = blocks.and_then(|b| filling.complete(b));
                self.commit_filled(to, epoch, lsn_first, puller, s);
            }
            Msg::State { to, puller, mine, record, theirs } => {
                if !self.sites[to].live(puller, self.tick) {
                    return;
                }
                match next_step(&record, &mine, &theirs) {
                    Step::Idle => {}
                    Step::Adopt(r) => self.send(Msg::Propose { site: to, command: Box::new(Command::DrSet { group: GROUP.into(), record: r }) }, false),
                    Step::Pull { lsn_first } => self.send(Msg::AskShip { from: to, puller, lsn_first, epoch: record.epoch, whole: false }, true),
                    Step::Diverged(why) => {
                        if !self.sites[to].diverged {
                            world::trace_at(self.tick * 1_000_000, format!("dr: site {}: {why}", NAMES[to]));
                        }
                        self.sites[to].diverged = true;
                    }
                }
            }
            Msg::Shipped { to, puller, epoch, shipment } => {
                if !self.sites[to].live(puller, self.tick) {
                    return;
                }
                match shipment {
                    Ok(s) if !s.events.is_empty() => {
                        let command = Command::Replicate { group: GROUP.into(), epoch, events: s.events, digest: s.digest };
                        self.send(Msg::Propose { site: to, command: Box::new(command) }, false);
                    }
                    Ok(_) => {}
                    Err(why) => world::trace_at(self.tick * 1_000_000, format!("dr: site {} refused a shipment: {why}", NAMES[1 - to])),
                }
            }
            Msg::Propose { site, command } => {
                if let CommandReply::Refused { reason } = self.apply(site, *command) {
                    world::trace_at(self.tick * 1_000_000, format!("dr: site {} refused a proposal: {reason}", NAMES[site]));
                }
            }
        }
    }

    fn faults(&mut self) {
        if self.tick >= self.cut_until && self.rng.chance(0.004) {
            self.cut_until = self.tick + self.rng.range(20, 120);
            world::count("dr link cut");
            world::trace_at(self.tick * 1_000_000, format!("dr: the link is cut until tick {}", self.cut_until));
        }
        for site in 0..2 {
            if self.rng.chance(0.02) {
                let until = self.tick + self.rng.range(0, 6);
                let s = &mut self.sites[site];
                s.lingering.insert(s.puller, until);
                s.puller += 1;
                world::count("dr leader change");
            }
        }
        if self.rng.chance(0.005) {
            let site = self.rng.range(0, 2) as usize;
            world::count("dr site rebuilt from its log");
            let mut fresh = SmImage::default();
            for c in &self.sites[site].log {
                fresh.apply_command(c);
            }
            let running = self.sites[site].image.lock().expect("image");
            let same = fresh.groups == running.groups && fresh.events == running.events && fresh.chain == running.chain && fresh.dr == running.dr;
            drop(running);
            if !same {
                self.fail(format!("site {} rebuilt from its log differs from the running state", NAMES[site]));
            }
            *self.sites[site].image.lock().expect("image") = fresh;
        }
    }

    fn step(&mut self, faults: bool, writers: &[(usize, u64)]) {
        self.tick += 1;
        if faults {
            self.faults();
        }
        for &(site, client) in writers {
            if self.rng.chance(0.4) {
                self.write(site, client);
            }
        }
        for site in 0..2 {
            if self.rng.chance(0.6) {
                self.ask(site);
            }
        }
        while let Some((&key, _)) = self.flight.first_key_value() {
            if key.0 > self.tick {
                break;
            }
            let msg = self.flight.remove(&key).expect("present");
            self.deliver(msg);
        }
    }

    /// Disk equality of two sites at one LSN each, block by block.
    fn same_disk(&mut self, a: (usize, u64), b: (usize, u64), what: &str) {
        for block in 0..BLOCKS {
            if self.sites[a.0].block(block, a.1) != self.sites[b.0].block(block, b.1) {
                self.fail(format!("{what}: block {block} differs between site {} at LSN {} and site {} at LSN {}", NAMES[a.0], a.1, NAMES[b.0], b.1));
                return;
            }
        }
    }
}

/// Runs the DR scenario of one seed; returns its failures.
pub fn run(seed: u64) -> Vec<String> {
    let mut w = World {
        rng: Rng::new(seed ^ DR_SALT),
        tick: 0,
        sites: [Site::new(), Site::new()],
        flight: BTreeMap::new(),
        sent: 0,
        cut_until: 0,
        failures: Vec::new(),
        seqs: BTreeMap::new(),
    };
    let disks = vec![DiskSpec { name: DISK.into(), size_bytes: BLOCKS * 4096, sector_bytes: 512 }];
    for (i, site) in w.sites.iter_mut().enumerate() {
        site.apply(Command::CreateGroup { group: GROUP.into(), disks: disks.clone(), time_ns: 0 });
        let record = DrRecord { local: NAMES[i].into(), remote: NAMES[1 - i].into(), primary: "a".into(), epoch: 1, rpo_alarm_ms: 0, max_rate_bytes: 0, link: link() };
        site.apply(Command::DrSet { group: GROUP.into(), record });
        site.epoch = 1;
    }
    let failover_at = w.rng.chance(0.5).then(|| w.rng.range(FAULT_TICKS / 3, 2 * FAULT_TICKS / 3));
    let mut fork: Option<(u64, u64, u64)> = None;
    let mut writers = vec![(0usize, 1u64)];
    while w.tick < FAULT_TICKS {
        if Some(w.tick) == failover_at {
            // Site b fails over to a past point while site a goes on writing.
            world::count("dr failover");
            let b_last = w.sites[1].info(None).last_lsn;
            let target = w.rng.range(0, b_last + 1);
            let r = w.sites[1].record();
            let next = DrRecord { primary: "b".into(), epoch: r.epoch + 1, ..r };
            w.apply(1, Command::DrSet { group: GROUP.into(), record: next });
            let revert = TimedEvent { time_ns: w.tick * 1_000_000, event: Event::Revert { disk: DISK.into(), to_lsn: target, block_first: 0, block_end: BLOCKS } };
            let mark = TimedEvent { time_ns: w.tick * 1_000_000, event: Event::Bookmark { name: "failover".into(), app_consistent: false } };
            let batch = EventBatch { group: GROUP.into(), client_id: 2, seq: 1, events: vec![revert, mark] };
            let reply = w.apply(1, Command::Append(batch));
            let head = w.sites[1].info(None).last_lsn;
            world::trace_at(w.tick * 1_000_000, format!("dr: site b fails over to LSN {target} of {b_last} ({reply:?})"));
            w.same_disk((1, head), (0, target), "the failed-over disk");
            fork = Some((b_last, target, head));
            writers.push((1, 3));
        }
        w.step(true, &writers);
    }
    // A site that diverged fails back: its own events after the fork go to
    // a branch (production's fork search over both chains), and it follows.
    let mut failback = None;
    if w.sites[0].diverged {
        world::count("dr failback");
        let before = w.sites[0].image.lock().expect("image").clone();
        let (la, lb) = (w.sites[0].info(None).last_lsn, w.sites[1].info(None).last_lsn);
        let mut search = rewind_service::dr::ForkSearch::new(la.min(lb));
        while let Some(lsn) = search.probe() {
            let (x, y) = (w.sites[0].state().digest_at(GROUP, lsn).expect("memory"), w.sites[1].state().digest_at(GROUP, lsn).expect("memory"));
            search.answer(lsn, x.is_some() && x == y);
        }
        let branch = rewind_service::dr::branch_name(GROUP, w.sites[0].epoch);
        let reply = w.apply(0, Command::Fork { group: GROUP.into(), branch: branch.clone(), fork_lsn: search.fork() });
        world::trace_at(w.tick * 1_000_000, format!("dr: site a fails back after LSN {} into {branch}: {reply:?}", search.fork()));
        w.sites[0].diverged = false;
        failback = Some((search.fork(), la, branch, before));
    }
    // The faults stop; writers stop; the links run until everything settles.
    w.cut_until = 0;
    for _ in 0..DRAIN_TICKS {
        w.step(false, &[]);
    }
    let (a, b) = (w.sites[0].events(), w.sites[1].events());
    let shared = match fork {
        Some((b_last, _, _)) => b_last,
        None => {
            if a.len() != b.len() || w.sites[0].info(None).digest_hex != w.sites[1].info(None).digest_hex {
                w.fail(format!("site b did not catch up after the faults stopped: LSN {} of {}", b.len(), a.len()));
            }
            a.len().min(b.len()) as u64
        }
    };
    let n = shared as usize;
    if a.len() < n || b.len() < n || a[..n] != b[..n] {
        let at = a.iter().zip(&b).position(|(x, y)| x != y).map_or(a.len().min(b.len()) + 1, |i| i + 1);
        w.fail(format!("the sites' logs differ at LSN {at} (shared prefix should be 1..={shared})"));
    } else if w.sites[0].state().digest_at(GROUP, shared).expect("memory") != w.sites[1].state().digest_at(GROUP, shared).expect("memory") {
        w.fail(format!("the sites' chains differ at LSN {shared}"));
    }
    for _ in 0..6 {
        let lsn = w.rng.range(0, shared + 1);
        w.same_disk((0, lsn), (1, lsn), "a replay");
    }
    if let Some((_, _, head)) = fork {
        let ra = w.sites[0].record();
        if ra.epoch < 2 || ra.primary != "b" {
            w.fail(format!("site a never learned of the failover: epoch {}, primary {}", ra.epoch, ra.primary));
        }
        // Site a either follows b (it wrote nothing after the fork, so its
        // log is a prefix of b's and it pulls the rest) or saw that it
        // diverged.
        let (la, lb) = (a.len() as u64, b.len() as u64);
        if a != b && !w.sites[0].diverged {
            w.fail(format!("site a (LSN {la}) neither follows site b (LSN {lb}, failover head {head}) nor saw that it diverged"));
        }
    }
    if let Some((fork_lsn, kept_to, branch, before)) = failback {
        if Some(fork_lsn) != fork.map(|f| f.0) {
            w.fail(format!("the failback found the fork at LSN {fork_lsn}, not at {:?}", fork.map(|f| f.0)));
        }
        for _ in 0..4 {
            let lsn = w.rng.range(0, kept_to + 1);
            for block in 0..BLOCKS {
                if before.block_at(GROUP, DISK, block, lsn).ok() != w.sites[0].image.lock().expect("image").block_at(&branch, DISK, block, lsn).ok() {
                    w.fail(format!("the branch {branch} at LSN {lsn}, block {block}, differs from site a before its failback"));
                    break;
                }
            }
        }
    }
    world::trace_at(w.tick * 1_000_000, format!(
        "dr: {} events at a, {} at b, fork {:?}, a diverged {}, {} messages",
        a.len(),
        b.len(),
        fork,
        w.sites[0].diverged,
        w.sent
    ));
    w.failures
}
