//! Cross-site DR's reads and decisions over any replica's applied state
//! ([`ReadState`]), shared by the node's DR loop and the simulation: a
//! group's DR state and head, the shipment a secondary pulls, and what one
//! round of a link does given both sites' states ([`next_step`]).
//!
//! Invariants kept here:
//! * a shipment holds committed events only (the caller reads on the
//!   leader after a read index), in LSN order from the asked LSN, with the
//!   chain digest after the last of them;
//! * a site adopts a higher epoch it sees at its peer, and never lowers
//!   its own; it pulls only from the primary of its own epoch, or drains a
//!   peer that handed the group to it;
//! * a secondary whose chain does not continue at the primary stops
//!   pulling and says so (its events after the fork need a failback).

use rewind_raft_store::ReadState;
use rewind_raft_store::blocks::{block_hash, zero_block_hash, BlockHash, BLOCK_BYTES};
use rewind_wire::dr::{BlockAt, DrInfo, DrRecord, Elided, HashedShipment, Place, ShippedBlocks, Shipment};
use rewind_wire::event::Event;

use crate::{no_group, ServiceError};

fn hex(d: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*d).to_hex().to_string()
}

/// A group's DR state and head on this replica; with `digest_at`, also the
/// chain digest at that LSN. `peer` is left empty (the shell knows it).
pub fn dr_info<R: ReadState>(r: &R, group: &str, digest_at: Option<u64>) -> Result<DrInfo, ServiceError> {
    let io = |e: std::io::Error| ServiceError::Internal(e.to_string());
    let g = r.group(group).map_err(io)?.ok_or_else(|| no_group(group))?;
    let dr = r.dr(group).map_err(io)?;
    let last_time_ns = if g.last_lsn == 0 { 0 } else { r.time_of(group, g.last_lsn).map_err(io)?.unwrap_or(g.last_time_ns) };
    let digest_at_hex = match digest_at {
        Some(lsn) if lsn <= g.last_lsn => r.digest_at(group, lsn).map_err(io)?.map(|d| hex(&d)),
        _ => None,
    };
    Ok(DrInfo {
        group: group.to_string(),
        local: dr.as_ref().map(|d| d.local.clone()),
        remote: dr.as_ref().map(|d| d.remote.clone()),
        primary: dr.as_ref().map(|d| d.primary.clone()),
        epoch: dr.as_ref().map_or(0, |d| d.epoch),
        rpo_alarm_ms: dr.as_ref().map_or(0, |d| d.rpo_alarm_ms),
        last_lsn: g.last_lsn,
        last_time_ns,
        first_time_ns: if g.last_lsn == 0 { 0 } else { r.time_of(group, 1).map_err(io)?.unwrap_or(0) },
        payload_bytes: g.payload_bytes,
        digest_hex: hex(&g.digest),
        digest_at_hex,
        peer: None,
    })
}

/// The group's events from `lsn_first` on (bounded by `SHIP_EVENTS_MAX`
/// and `SHIP_BYTES_MAX`), for the other site, with the chain digest after
/// the last of them.
pub fn shipment<R: ReadState>(r: &R, group: &str, lsn_first: u64) -> Result<Shipment, ServiceError> {
    use rewind_wire::limits::{SHIP_BYTES_MAX, SHIP_EVENTS_MAX};
    let io = |e: std::io::Error| ServiceError::Internal(e.to_string());
    if lsn_first == 0 {
        return Err(ServiceError::BadRequest("LSNs start at 1".into()));
    }
    let g = r.group(group).map_err(io)?.ok_or_else(|| no_group(group))?;
    let dr = r.dr(group).map_err(io)?.ok_or_else(|| ServiceError::Refused(format!("group {group:?} is not linked to another site")))?;
    if lsn_first > g.last_lsn + 1 {
        return Err(ServiceError::Refused(format!(
            "group {group:?} ends at LSN {} at site {:?}; a copy that asks from LSN {lsn_first} holds events this site does not (the histories diverged)",
            g.last_lsn, dr.local
        )));
    }
    let first = r.retention(group).map_err(io)?.first();
    if lsn_first < first {
        return Err(ServiceError::Refused(format!(
            "the copy of group {group:?} asks from LSN {lsn_first}, but the retention policy at site {:?} released the history before LSN {first}: the copy cannot catch up; give the group a longer retention and link it again",
            dr.local
        )));
    }
    let events = if lsn_first > g.last_lsn { Vec::new() } else { r.events(group, lsn_first, SHIP_EVENTS_MAX, SHIP_BYTES_MAX).map_err(io)? };
    let upto = events.last().map_or(lsn_first - 1, |e| e.lsn);
    let digest = r
        .digest_at(group, upto)
        .map_err(io)?
        .ok_or_else(|| ServiceError::Refused(format!("group {group:?} has no chain digest for LSN {upto} here (written before this build kept them)")))?;
    Ok(Shipment { events, digest, epoch: dr.epoch, primary: dr.primary, last_lsn: g.last_lsn })
}

/// The shipment from `lsn_first` on with the whole 4 KiB disk blocks the
/// secondary holds as hashes (`HashedShipment`): the blocks this replica's
/// history held before `lsn_first` (the content index), and repeats of a
/// block that travels inline earlier in the shipment.
pub fn hashed_shipment<R: ReadState>(r: &R, group: &str, lsn_first: u64) -> Result<HashedShipment, ServiceError> {
    let s = shipment(r, group, lsn_first)?;
    elide(s, |hashes| r.stored_before(group, hashes, lsn_first).map_err(|e| ServiceError::Internal(e.to_string())))
}

/// Elides the whole, non-zero disk blocks of a shipment's writes that
/// `held` says the secondary holds, and repeats of a block already inline.
pub fn elide(mut shipment: Shipment, held: impl FnOnce(&[BlockHash]) -> Result<Vec<bool>, ServiceError>) -> Result<HashedShipment, ServiceError> {
    let zero = zero_block_hash();
    let block = BLOCK_BYTES as usize;
    // Every whole, non-zero disk block of every write, in order.
    let mut blocks: Vec<(Place, BlockHash)> = Vec::new();
    for (i, e) in shipment.events.iter().enumerate() {
        let Event::Write { offset, data, .. } = &e.event else { continue };
        let mut at = (offset.div_ceil(BLOCK_BYTES) * BLOCK_BYTES - *offset) as usize;
        while at + block <= data.len() {
            let hash = block_hash(&data[at..at + block]);
            if hash != zero {
                blocks.push((Place { event: i as u32, offset: at as u32 }, hash));
            }
            at += block;
        }
    }
    let mut distinct: Vec<BlockHash> = blocks.iter().map(|(_, h)| *h).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let there = held(&distinct)?;
    if there.len() != distinct.len() {
        return Err(ServiceError::Internal(format!("the content index answered {} of {} hashes", there.len(), distinct.len())));
    }
    let mut inline: std::collections::HashMap<BlockHash, Place> = Default::default();
    let mut elided = Vec::new();
    for (at, hash) in blocks {
        let copy_of = inline.get(&hash).copied();
        let is_held = there[distinct.binary_search(&hash).expect("listed")];
        if copy_of.is_none() && !is_held {
            inline.insert(hash, at);
            continue;
        }
        if let Some(Event::Write { data, .. }) = shipment.events.get_mut(at.event as usize).map(|e| &mut e.event) {
            data[at.offset as usize..at.offset as usize + block].fill(0);
        }
        elided.push(Elided { at, hash, copy_of });
    }
    Ok(HashedShipment { shipment, elided })
}

/// A hashed shipment at the secondary, part filled: what it still lacks.
#[derive(Debug, Clone)]
pub struct Filling {
    pub shipment: Shipment,
    /// Elided blocks not filled yet.
    missing: Vec<Elided>,
    /// One place at the primary for each distinct hash still missing, and
    /// that hash; what `Request::ShipBlocks` asks for.
    pub wanted: Vec<BlockAt>,
    wanted_hashes: Vec<BlockHash>,
    /// Blocks filled from the secondary's own store, and from the
    /// shipment itself.
    pub found_here: u64,
    pub copied: u64,
}

fn block_of(shipment: &Shipment, at: Place) -> Option<&[u8]> {
    match shipment.events.get(at.event as usize).map(|e| &e.event) {
        Some(Event::Write { data, .. }) => data.get(at.offset as usize..at.offset as usize + BLOCK_BYTES as usize),
        _ => None,
    }
}

fn put_block(shipment: &mut Shipment, at: Place, bytes: &[u8]) -> Result<(), String> {
    let from = at.offset as usize;
    match shipment.events.get_mut(at.event as usize).map(|x| &mut x.event) {
        Some(Event::Write { data, .. }) if from + bytes.len() <= data.len() => {
            data[from..from + bytes.len()].copy_from_slice(bytes);
            Ok(())
        }
        _ => Err(format!("an elided block at event {} offset {} lies outside the shipment", at.event, at.offset)),
    }
}

/// Fills in the elided blocks: repeats from the shipment itself, the rest
/// from the blocks `r`'s group holds (its content index), every one
/// checked against its hash; and lists the ones to ask the primary for,
/// one place per distinct hash.
pub fn fill_local<R: ReadState>(r: &R, group: &str, hashed: HashedShipment) -> Result<Filling, ServiceError> {
    fill_with(hashed, |hashes| r.find_blocks(group, hashes).map_err(|e| ServiceError::Internal(e.to_string())))
}

/// `fill_local` with the look-up given: for each hash, the block or None.
pub fn fill_with(hashed: HashedShipment, find: impl FnOnce(&[BlockHash]) -> Result<Vec<Option<Vec<u8>>>, ServiceError>) -> Result<Filling, ServiceError> {
    let HashedShipment { mut shipment, elided } = hashed;
    let mut copied = 0;
    let mut rest = Vec::new();
    for e in elided {
        let Some(from) = e.copy_of else {
            rest.push(e);
            continue;
        };
        // The source travels inline (it is never elided), so its bytes are
        // there whatever the order.
        let bytes = block_of(&shipment, from).filter(|b| block_hash(b) == e.hash).map(<[u8]>::to_vec);
        let bytes = bytes.ok_or_else(|| ServiceError::BadRequest(format!("an elided block names a copy at event {} offset {} that does not match its hash", from.event, from.offset)))?;
        put_block(&mut shipment, e.at, &bytes).map_err(ServiceError::BadRequest)?;
        copied += 1;
    }
    let mut distinct: Vec<BlockHash> = rest.iter().map(|e| e.hash).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let found = if distinct.is_empty() { Vec::new() } else { find(&distinct)? };
    if found.len() != distinct.len() {
        return Err(ServiceError::Internal(format!("the content index answered {} of {} hashes", found.len(), distinct.len())));
    }
    let mut missing = Vec::new();
    let mut wanted = Vec::new();
    let mut wanted_hashes = Vec::new();
    let mut found_here = 0;
    for e in &rest {
        let i = distinct.binary_search(&e.hash).expect("every hash is listed");
        match &found[i] {
            Some(bytes) => {
                #[cfg(feature = "simulation-bugs")]
                let bytes = &if crate::bugs::DEDUPE_FILL_ASKEW.load(std::sync::atomic::Ordering::Relaxed) {
                    // A local block filled in one sector off.
                    [&bytes[512..], &bytes[..512]].concat()
                } else {
                    bytes.clone()
                };
                put_block(&mut shipment, e.at, bytes).map_err(ServiceError::BadRequest)?;
                found_here += 1;
            }
            None => {
                if !wanted_hashes.contains(&e.hash) {
                    let lsn = shipment.events.get(e.at.event as usize).map_or(0, |x| x.lsn);
                    wanted.push(BlockAt { lsn, offset: e.at.offset });
                    wanted_hashes.push(e.hash);
                }
                missing.push(*e);
            }
        }
    }
    Ok(Filling { shipment, missing, wanted, wanted_hashes, found_here, copied })
}

impl Filling {
    /// The whole shipment, with the primary's answer to `wanted` filled
    /// in; every block is checked against its hash first.
    pub fn complete(mut self, answer: ShippedBlocks) -> Result<Shipment, String> {
        if answer.blocks.len() != self.wanted.len() {
            return Err(format!("asked for {} blocks, got {}", self.wanted.len(), answer.blocks.len()));
        }
        for (bytes, hash) in answer.blocks.iter().zip(&self.wanted_hashes) {
            if bytes.len() != BLOCK_BYTES as usize || block_hash(bytes) != *hash {
                return Err("a block from the primary does not match its hash".into());
            }
        }
        for e in std::mem::take(&mut self.missing) {
            let i = self.wanted_hashes.iter().position(|h| *h == e.hash).ok_or("a missing block was not asked for")?;
            put_block(&mut self.shipment, e.at, &answer.blocks[i])?;
        }
        Ok(self.shipment)
    }
}

/// The blocks at `wanted` (at most `SHIP_BLOCKS_MAX`, of one shipment's
/// events), for a secondary that lacks them.
pub fn ship_blocks<R: ReadState>(r: &R, group: &str, wanted: &[BlockAt]) -> Result<ShippedBlocks, ServiceError> {
    use rewind_wire::limits::{SHIP_BLOCKS_MAX, SHIP_BYTES_MAX, SHIP_EVENTS_MAX};
    let io = |e: std::io::Error| ServiceError::Internal(e.to_string());
    if wanted.len() > SHIP_BLOCKS_MAX {
        return Err(ServiceError::BadRequest(format!("{} blocks asked for; {SHIP_BLOCKS_MAX} at most", wanted.len())));
    }
    // In LSN order, so each event is read once.
    if wanted.windows(2).any(|w| w[1].lsn < w[0].lsn) {
        return Err(ServiceError::BadRequest("blocks must be asked for in LSN order".into()));
    }
    let (Some(low), Some(high)) = (wanted.first().map(|w| w.lsn), wanted.last().map(|w| w.lsn)) else {
        return Ok(ShippedBlocks { blocks: Vec::new() });
    };
    if high - low >= SHIP_EVENTS_MAX as u64 {
        return Err(ServiceError::BadRequest(format!("blocks from LSN {low} to {high}: one shipment's events ({SHIP_EVENTS_MAX}) at most")));
    }
    let g = r.group(group).map_err(io)?.ok_or_else(|| no_group(group))?;
    let first = r.retention(group).map_err(io)?.first();
    if low == 0 || low < first || high > g.last_lsn {
        return Err(ServiceError::Refused(format!("group {group:?} holds LSN {first}..={} here; blocks from LSN {low} to {high} were asked for", g.last_lsn)));
    }
    let mut blocks = Vec::with_capacity(wanted.len());
    let mut events = r.events(group, low, (high - low + 1) as usize, SHIP_BYTES_MAX).map_err(io)?;
    let mut next = events.last().map_or(low, |e| e.lsn + 1);
    for w in wanted {
        // The events of one shipment fit one read; a larger spread reads on.
        if w.lsn >= next {
            events = r.events(group, w.lsn, (high - w.lsn + 1) as usize, SHIP_BYTES_MAX).map_err(io)?;
            next = events.last().map_or(w.lsn, |e| e.lsn + 1);
        }
        let event = events.iter().find(|e| e.lsn == w.lsn);
        let at = w.offset as usize;
        match event.map(|e| &e.event) {
            Some(Event::Write { data, .. }) if at + BLOCK_BYTES as usize <= data.len() => blocks.push(data[at..at + BLOCK_BYTES as usize].to_vec()),
            _ => return Err(ServiceError::BadRequest(format!("LSN {} of group {group:?} holds no block at payload offset {at}", w.lsn))),
        }
    }
    Ok(ShippedBlocks { blocks })
}

/// What one round of a link does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now.
    Idle,
    /// Take the peer's higher epoch and its primary (this record).
    Adopt(DrRecord),
    /// Pull the peer's events from this LSN on.
    Pull { lsn_first: u64 },
    /// This site's history does not continue at the primary: stop.
    Diverged(String),
}

/// The next step of the link of `record` (this site's), from this site's
/// state `mine` and the peer's `theirs` (asked with `digest_at` = this
/// site's last LSN).
pub fn next_step(record: &DrRecord, mine: &DrInfo, theirs: &DrInfo) -> Step {
    let group = &mine.group;
    if theirs.epoch > record.epoch {
        let Some(primary) = theirs.primary.clone() else { return Step::Idle };
        if primary == record.local && theirs.last_lsn > mine.last_lsn {
            // Handed over to this site (a switchover): take the peer's last
            // events first, under the epoch they were written in.
            return Step::Pull { lsn_first: mine.last_lsn + 1 };
        }
        return Step::Adopt(DrRecord { primary, epoch: theirs.epoch, ..record.clone() });
    }
    if record.is_primary() || theirs.epoch < record.epoch || theirs.primary.as_deref() != Some(&record.primary) {
        return Step::Idle;
    }
    let agree = theirs.digest_at_hex.as_ref().map(|d| *d == mine.digest_hex);
    if mine.last_lsn > theirs.last_lsn || agree == Some(false) {
        return Step::Diverged(format!(
            "group {group:?} diverged: this site holds LSN 1..={} and its chain does not continue at site {:?} (LSN 1..={}); \
             run `rewind failback {group}` here to keep this site's own events as a branch and follow the primary",
            mine.last_lsn, record.primary, theirs.last_lsn
        ));
    }
    if theirs.last_lsn == mine.last_lsn {
        return Step::Idle;
    }
    Step::Pull { lsn_first: mine.last_lsn + 1 }
}

/// The fork point of two histories by bisection over chain digests: the
/// last LSN both hold with the same digest. Digests agree up to the fork
/// and never after it (each covers every event before it). Start with the
/// lower of the two heads; feed it `answer` for each `probe`.
#[derive(Debug, Clone)]
pub struct ForkSearch {
    /// Known to agree (LSN 0 always does).
    agree: u64,
    /// Known to differ, or one past the lower head.
    differ: u64,
}

impl ForkSearch {
    pub fn new(lower_head: u64) -> ForkSearch {
        ForkSearch { agree: 0, differ: lower_head + 1 }
    }

    /// The next LSN to compare, or None when the fork is found.
    pub fn probe(&self) -> Option<u64> {
        (self.differ - self.agree > 1).then(|| self.agree + (self.differ - self.agree) / 2)
    }

    pub fn answer(&mut self, lsn: u64, agree: bool) {
        if agree {
            self.agree = self.agree.max(lsn);
        } else {
            self.differ = self.differ.min(lsn);
        }
    }

    pub fn fork(&self) -> u64 {
        #[cfg(feature = "simulation-bugs")]
        if crate::bugs::FORK_ONE_LATE.load(std::sync::atomic::Ordering::Relaxed) {
            return self.agree + 1;
        }
        self.agree
    }
}

/// The name of the branch a failback keeps a group's own events in.
pub fn branch_name(group: &str, epoch: u64) -> String {
    let suffix = format!(".branch-e{epoch}");
    let keep = rewind_wire::limits::NAME_BYTES_MAX.saturating_sub(suffix.len()).min(group.len());
    format!("{}{suffix}", &group[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lsn: u64, offset: u64, data: Vec<u8>) -> rewind_wire::event::LoggedEvent {
        rewind_wire::event::LoggedEvent { lsn, time_ns: lsn, event: Event::Write { disk: "d".into(), offset, data } }
    }

    fn block(seed: u8) -> Vec<u8> {
        (0..4096u32).map(|i| seed.wrapping_add((i / 512) as u8 * 31)).collect()
    }

    /// Whole blocks the secondary holds and repeats travel as hashes; new
    /// blocks, zero blocks and partial edges as bytes. The secondary fills
    /// what it holds, asks once per distinct hash for what it lacks, and
    /// the result is the shipment as it was, byte for byte.
    #[test]
    fn hashed_shipments_fill_back_to_the_shipment() {
        let (a, b, c) = (block(1), block(2), block(3));
        // LSN 1: 512 bytes of an edge, block a, block b, an edge (disk
        // offset 3584, so whole blocks sit at payload 512 and 4608).
        let mut w1 = vec![7u8; 512];
        w1.extend_from_slice(&a);
        w1.extend_from_slice(&b);
        w1.extend_from_slice(&[8u8; 100]);
        // LSN 2: a zero block, then a again and c; LSN 4: c again.
        let w2 = [vec![0u8; 4096], a.clone(), c.clone()].concat();
        let events = vec![
            write(1, 3584, w1),
            write(2, 8192, w2),
            rewind_wire::event::LoggedEvent { lsn: 3, time_ns: 3, event: Event::Bookmark { name: "m".into(), app_consistent: false } },
            write(4, 0, c.clone()),
        ];
        let shipment = Shipment { events, digest: [9; 32], epoch: 1, primary: "a".into(), last_lsn: 4 };
        let place = |event, offset| Place { event, offset };
        // The primary's history held b and c before the shipment.
        let held_there = [block_hash(&b), block_hash(&c)];
        let hashed = elide(shipment.clone(), |hs| Ok(hs.iter().map(|h| held_there.contains(h)).collect())).unwrap();
        let got: Vec<(Place, Option<Place>)> = hashed.elided.iter().map(|e| (e.at, e.copy_of)).collect();
        assert_eq!(got, vec![(place(0, 4608), None), (place(1, 4096), Some(place(0, 512))), (place(1, 8192), None), (place(3, 0), None)], "held blocks and repeats only");
        let Event::Write { data, .. } = &hashed.shipment.events[0].event else { panic!() };
        assert!(data[512..4608] == a[..] && data[4608..8704].iter().all(|x| *x == 0), "a new block travels, a held one does not");
        // The secondary's collector freed c: it holds b only.
        let held_here = block_hash(&b);
        let filling = fill_with(hashed.clone(), |hs| Ok(hs.iter().map(|h| (*h == held_here).then(|| b.clone())).collect())).unwrap();
        assert_eq!((filling.found_here, filling.copied), (1, 1));
        assert_eq!(filling.wanted, vec![BlockAt { lsn: 2, offset: 8192 }], "c, once");
        assert!(filling.clone().complete(ShippedBlocks { blocks: vec![c.clone()] }) == Ok(shipment.clone()));
        // A wrong or missing block from the primary is refused.
        assert!(filling.clone().complete(ShippedBlocks { blocks: vec![a.clone()] }).unwrap_err().contains("does not match"));
        assert!(filling.complete(ShippedBlocks { blocks: vec![] }).unwrap_err().contains("asked for 1 blocks, got 0"));
        // A copy that does not match its hash is refused, not filled.
        let mut bad = hashed.clone();
        bad.elided[1].copy_of = Some(place(0, 0));
        assert!(fill_with(bad, |hs| Ok(vec![None; hs.len()])).unwrap_err().to_string().contains("does not match its hash"));
        // Nothing held at the primary: only the repeat is elided.
        let fresh = elide(shipment, |hs| Ok(vec![false; hs.len()])).unwrap();
        assert_eq!(fresh.elided.len(), 2, "a and c repeat once each");
        assert!(fresh.elided.iter().all(|e| e.copy_of.is_some()));
    }

    #[test]
    fn the_search_finds_the_last_shared_lsn() {
        for head in 0..40u64 {
            for fork in 0..=head {
                let mut s = ForkSearch::new(head);
                let mut probes = 0;
                while let Some(p) = s.probe() {
                    s.answer(p, p <= fork);
                    probes += 1;
                }
                assert_eq!(s.fork(), fork, "head {head}");
                assert!(probes <= 7);
            }
        }
        assert_eq!(branch_name("vm1", 2), "vm1.branch-e2");
        assert_eq!(branch_name(&"x".repeat(64), 12).len(), 64);
    }
}
