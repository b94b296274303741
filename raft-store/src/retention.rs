//! Retention's pure core: a group's policy and lock, the window of points
//! it keeps (moved forward deterministically as events arrive, so every
//! replica moves it alike), pinned bookmarks, and the collector's rule for
//! what the events before the window leave live. No I/O: `sm.rs` and
//! `gc.rs` load what this needs and write what it returns, and the
//! simulation runs the same functions over memory.
//!
//! The rules:
//! * the window is the points `first_lsn..=last_lsn`; a replay outside it
//!   is refused, except at a pinned bookmark's point;
//! * `keep_ns` keeps every point from `last_time - keep_ns` on (the point
//!   that was current at that time included); `keep_bytes` bounds the
//!   payload of the events `first_lsn..=last_lsn`. With both, the window is
//!   cut by whichever is reached first;
//! * a block version written at LSN `l` whose block next changes at `n`
//!   (a newer version, or a zero extent that covers it) is live while
//!   some kept point `p` has `l <= p < n`: `n > first_lsn` (it is current
//!   at the window's start), or a pin at `p`. Everything else an event
//!   before the window wrote is garbage. The collector walks the events
//!   before the window in order; a version it kept (current then) becomes
//!   garbage when a later event before the window writes its block, and is
//!   freed then. Zero extents are kept (16 bytes each): a version they
//!   shadow is freed when its block is written again;
//! * under a lock (`lock_until_ns` after the command's time), the policy
//!   may only grow, a pin only lengthen, the lock only extend, and the
//!   group cannot be deleted.

use std::collections::BTreeMap;

use rewind_wire::event::Event;
use rewind_wire::limits::{PINS_MAX, WINDOW_STEP_EVENTS_MAX};
use rewind_wire::timefmt::format_time_ns;
use rkyv::{Archive, Deserialize, Serialize};

use crate::apply::GroupRecord;
use crate::blocks::{BlockHash, Version};

/// A pinned bookmark: its point is kept until `until_ns`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PinRecord {
    pub name: String,
    pub lsn: u64,
    pub until_ns: u64,
}

/// A group's retention state, part of the replicated state machine.
/// Absent (a store written before retention) reads as the default: no
/// policy, no lock, the window from LSN 1.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct RetentionRecord {
    /// 0: no limit of that kind.
    pub keep_ns: u64,
    pub keep_bytes: u64,
    /// 0: never locked.
    pub lock_until_ns: u64,
    /// The window's first point (0 reads as 1).
    pub first_lsn: u64,
    /// The event time of `first_lsn` (0 until the window first moves).
    pub first_time_ns: u64,
    /// Payload bytes of the events before `first_lsn`.
    pub released_bytes: u64,
    pub pins: Vec<PinRecord>,
}

impl RetentionRecord {
    pub fn first(&self) -> u64 {
        self.first_lsn.max(1)
    }

    /// Payload bytes of the events `first..=last`.
    pub fn window_bytes(&self, g: &GroupRecord) -> u64 {
        g.payload_bytes.saturating_sub(self.released_bytes)
    }

    /// Whether `time_ns` is before the lock's end.
    pub fn locked_at(&self, time_ns: u64) -> bool {
        self.lock_until_ns > time_ns
    }

    /// Whether a replay at `lsn` is kept: in the window, or a pin's point
    /// (or LSN 0, the empty disk, while nothing was released).
    pub fn keeps(&self, lsn: u64) -> bool {
        lsn >= self.first() || self.first() == 1 || self.pins.iter().any(|p| p.lsn == lsn)
    }

    /// The points before the window that pins keep, ascending.
    pub fn pinned_points(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.pins.iter().map(|p| p.lsn).filter(|l| *l < self.first()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn lock_text(&self) -> String {
        format!("it is locked until {} (`rewind group lock`)", format_time_ns(self.lock_until_ns))
    }

    /// The refusal for a replay at `lsn` outside what the group keeps.
    pub fn outside(&self, group: &str, lsn: u64, last_lsn: u64) -> String {
        format!(
            "LSN {lsn} is before the window of group {group:?}: its retention policy has released the history before LSN {} (window LSN {}..={last_lsn}; see `rewind points {group}`)",
            self.first(),
            self.first()
        )
    }
}

fn limit_text(v: u64, unit: &str) -> String {
    if v == 0 {
        "no limit".to_string()
    } else {
        format!("{v} {unit}")
    }
}

/// A limit where 0 means none, for comparing: none is the longest.
fn as_limit(v: u64) -> u64 {
    if v == 0 {
        u64::MAX
    } else {
        v
    }
}

/// Checks a policy event (retention, lock, pin) at `time_ns` against the
/// record, and applies it. `marks`: the group's bookmarks by name (newest
/// LSN and time), those of the same batch included. Deterministic.
pub fn apply_policy(r: &mut RetentionRecord, group: &str, event: &Event, time_ns: u64, marks: &BTreeMap<String, u64>) -> Result<(), String> {
    let locked = r.locked_at(time_ns);
    match event {
        Event::Retain { keep_ns, keep_bytes } => {
            if locked && (as_limit(*keep_ns) < as_limit(r.keep_ns) || as_limit(*keep_bytes) < as_limit(r.keep_bytes)) {
                return Err(format!(
                    "group {group:?} keeps {} and {}; a shorter retention is refused: {}",
                    limit_text(r.keep_ns / 1_000_000_000, "s"),
                    limit_text(r.keep_bytes, "bytes"),
                    r.lock_text()
                ));
            }
            r.keep_ns = *keep_ns;
            r.keep_bytes = *keep_bytes;
        }
        Event::Lock { until_ns } => {
            if *until_ns < r.lock_until_ns {
                return Err(format!("group {group:?} is locked until {}; a lock is never shortened", format_time_ns(r.lock_until_ns)));
            }
            r.lock_until_ns = *until_ns;
        }
        Event::Pin { name, until_ns } => {
            let Some(&lsn) = marks.get(name) else {
                return Err(format!("group {group:?} has no bookmark {name:?} to pin"));
            };
            let old = r.pins.iter().position(|p| p.name == *name);
            let shorter = old.is_some_and(|i| r.pins[i].until_ns > *until_ns);
            if locked && shorter {
                return Err(format!("bookmark {name:?} of group {group:?} is pinned until {}; unpinning it early is refused: {}", format_time_ns(r.pins[old.expect("found")].until_ns), r.lock_text()));
            }
            if lsn < r.first() && !r.pins.iter().any(|p| p.lsn == lsn) {
                return Err(format!("bookmark {name:?} of group {group:?} (LSN {lsn}) is before the window (LSN {} on); its point is released and cannot be pinned", r.first()));
            }
            if let Some(i) = old {
                r.pins.remove(i);
            }
            if *until_ns > time_ns {
                if r.pins.len() >= PINS_MAX {
                    return Err(format!("group {group:?} has {PINS_MAX} pinned bookmarks, the most it keeps; unpin one first"));
                }
                r.pins.push(PinRecord { name: name.clone(), lsn, until_ns: *until_ns });
            }
        }
        _ => {}
    }
    Ok(())
}

/// Checks a `DeleteGroup` at `time_ns`.
pub fn delete_check(group: &str, r: Option<&RetentionRecord>, time_ns: u64, linked: bool, branches: &[String]) -> Result<(), String> {
    if let Some(r) = r.filter(|r| r.locked_at(time_ns)) {
        return Err(format!("group {group:?} cannot be deleted: {}", r.lock_text()));
    }
    if linked {
        return Err(format!("group {group:?} is linked to another site; deleting a linked group is not built"));
    }
    if let Some(b) = branches.first() {
        return Err(format!("group {group:?} is the base of branch {b:?}, which reads its history; delete the branch first"));
    }
    Ok(())
}

/// Moves the window forward as the policy allows, by at most
/// `WINDOW_STEP_EVENTS_MAX` events (the next append moves it on), and
/// drops pins that ended before the group's newest event. `info(lsn)`
/// gives an event's (time, payload bytes). Returns how many events the
/// window passed. The start never moves past `hold` (the start of an
/// open backup, `backups::hold`).
pub fn advance_window<E>(r: &mut RetentionRecord, g: &GroupRecord, hold: u64, mut info: impl FnMut(u64) -> Result<(u64, u64), E>) -> Result<u64, E> {
    r.pins.retain(|p| p.until_ns > g.last_time_ns);
    if g.last_lsn == 0 || (r.keep_ns == 0 && r.keep_bytes == 0) {
        return Ok(0);
    }
    let cutoff = (r.keep_ns > 0).then(|| g.last_time_ns.saturating_sub(r.keep_ns));
    let mut first = r.first();
    let mut moved = 0;
    while first < g.last_lsn.min(hold) && moved < WINDOW_STEP_EVENTS_MAX {
        let by_bytes = r.keep_bytes > 0 && r.window_bytes(g) > r.keep_bytes;
        let (next_time, _) = info(first + 1)?;
        let by_time = cutoff.is_some_and(|c| next_time <= c);
        if !by_bytes && !by_time {
            break;
        }
        let (_, bytes) = info(first)?;
        r.released_bytes += bytes;
        first += 1;
        r.first_time_ns = next_time;
        moved += 1;
    }
    r.first_lsn = first;
    Ok(moved)
}

/// What the collector needs of an event without its payload: the blocks
/// it versioned, and a bookmark's name. Stored beside its chain link, so
/// freeing an event reads its payload only for the blocks it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// An event with versions: its disk and blocks.
    Blocks { disk: String, blocks: Vec<u64>, write: bool },
    Bookmark { name: String },
    Other,
}

const SHAPE_OTHER: u8 = 0;
const SHAPE_WRITE: u8 = 1;
const SHAPE_ZEROES: u8 = 2;
const SHAPE_REVERT: u8 = 3;
const SHAPE_BOOKMARK: u8 = 4;

impl Shape {
    /// `kind | a u64 | b u64 | name length u8 | name`: (offset, length) of
    /// a write, zero or trim; (first, end block) of a revert.
    pub fn encode(event: &Event) -> Vec<u8> {
        let (kind, a, b, name) = match event {
            Event::Write { disk, offset, data } => (SHAPE_WRITE, *offset, data.len() as u64, disk.as_str()),
            Event::WriteZeroes { disk, offset, len } | Event::Trim { disk, offset, len } => (SHAPE_ZEROES, *offset, *len, disk.as_str()),
            Event::Revert { disk, block_first, block_end, .. } => (SHAPE_REVERT, *block_first, *block_end, disk.as_str()),
            // A copy versions a run of blocks, as a revert does.
            Event::Copy { disk, block_first, from, .. } => (SHAPE_REVERT, *block_first, *block_first + (from.len() / 2) as u64, disk.as_str()),
            Event::Bookmark { name, .. } => (SHAPE_BOOKMARK, 0, 0, name.as_str()),
            _ => (SHAPE_OTHER, 0, 0, ""),
        };
        let mut v = Vec::with_capacity(18 + name.len());
        v.push(kind);
        v.extend_from_slice(&a.to_le_bytes());
        v.extend_from_slice(&b.to_le_bytes());
        v.push(name.len() as u8);
        v.extend_from_slice(name.as_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Result<Shape, String> {
        if v.len() < 18 || v.len() != 18 + v[17] as usize {
            return Err(format!("event shape of {} bytes", v.len()));
        }
        let a = u64::from_le_bytes(v[1..9].try_into().expect("8"));
        let b = u64::from_le_bytes(v[9..17].try_into().expect("8"));
        let name = std::str::from_utf8(&v[18..]).map_err(|e| format!("event shape: {e}"))?.to_string();
        let stub = |event: Event| match crate::blocks::versioned_blocks(&event) {
            Some((disk, blocks)) => Shape::Blocks { disk: disk.to_string(), blocks, write: matches!(event, Event::Write { .. }) },
            None => Shape::Other,
        };
        Ok(match v[0] {
            SHAPE_WRITE => Shape::Blocks { disk: name, blocks: crate::blocks::write_blocks(a, b), write: true },
            SHAPE_ZEROES => stub(Event::Trim { disk: name, offset: a, len: b }),
            SHAPE_REVERT => stub(Event::Revert { disk: name, to_lsn: 0, block_first: a, block_end: b }),
            SHAPE_BOOKMARK => Shape::Bookmark { name },
            SHAPE_OTHER => Shape::Other,
            k => return Err(format!("event shape of kind {k}")),
        })
    }

    pub fn of(event: &Event) -> Shape {
        Shape::decode(&Shape::encode(event)).expect("a shape decodes what it encodes")
    }
}

/// What the collector reads of one block: its versions around the event
/// being collected, found in one pass over the block's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockScan {
    /// The versions below the event's LSN, ascending, with the content
    /// hash each stored (its content index entry goes with it).
    pub older: Vec<(u64, Option<BlockHash>)>,
    /// The version the event wrote, and its stored content hash.
    pub at: Option<(Version, Option<BlockHash>)>,
    /// The LSN of the next version after the event's, if it is at most
    /// the scan's `upto`.
    pub next: Option<u64>,
}

/// What the collector reads of one disk's block index.
pub trait GcIndex {
    type Error;
    /// The versions of `block` below, at and just after `lsn` (the next
    /// one only if at most `upto`).
    fn scan(&mut self, block: u64, lsn: u64, upto: u64) -> Result<BlockScan, Self::Error>;
    /// The zero extents with LSN in `after+1..=upto`: (LSN, first block,
    /// end block).
    fn extents(&mut self, after: u64, upto: u64) -> Result<Vec<(u64, u64, u64)>, Self::Error>;
}

/// One change the collector makes for an event before the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcOp {
    /// The version is live and refers to bytes `offset..offset + 4 KiB`
    /// of the event's payload: it gets its own copy, so the event can go.
    Materialise { block: u64, offset: u32 },
    /// A garbage version (of the event's LSN, or an older one), and the
    /// content hash its record carried.
    DeleteVersion { block: u64, lsn: u64, hash: Option<BlockHash> },
}

/// The collector's changes to the block index for the event at LSN `l`
/// (before the window) that versioned `blocks`: for each version it wrote,
/// live or garbage by the rule above, and the older versions of those
/// blocks, which it replaced, freed unless a pin needs them. `pins`: the
/// pinned points before the window.
pub fn collect_event<I: GcIndex>(index: &mut I, l: u64, blocks: &[u64], first: u64, pins: &[u64]) -> Result<Vec<GcOp>, I::Error> {
    let mut ops = Vec::new();
    debug_assert!(l < first);
    let pins: &[u64] = if crate::bug("gc-ignores-pins") { &[] } else { pins };
    let extents = if blocks.is_empty() { Vec::new() } else { index.extents(l, first)? };
    for &block in blocks {
        let scan = index.scan(block, l, first)?;
        let Some((version, hash)) = scan.at else { continue };
        for (u, hash) in scan.older {
            if !pins.iter().any(|p| u <= *p && *p < l) {
                ops.push(GcOp::DeleteVersion { block, lsn: u, hash });
            }
        }
        let by_extent = extents.iter().filter(|(_, b0, b1)| (*b0..*b1).contains(&block)).map(|(x, _, _)| *x).min();
        let next = match (scan.next, by_extent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let live = match next {
            None => !crate::bug("gc-frees-live"),
            Some(n) => pins.iter().any(|p| l <= *p && *p < n),
        };
        if !live {
            ops.push(GcOp::DeleteVersion { block, lsn: l, hash });
        } else if let Version::Ref { offset, .. } = version {
            ops.push(GcOp::Materialise { block, offset });
        }
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_wire::rpc::DiskSpec;

    fn group(last_lsn: u64, last_time_ns: u64, payload_bytes: u64) -> GroupRecord {
        let mut g = GroupRecord::new("g", &[DiskSpec { name: "d".into(), size_bytes: 1 << 20, sector_bytes: 512 }]);
        g.last_lsn = last_lsn;
        g.last_time_ns = last_time_ns;
        g.payload_bytes = payload_bytes;
        g
    }

    #[test]
    fn the_window_moves_by_bytes_and_by_time_whichever_cuts_first() {
        // 10 events of 100 bytes at times 10, 20, ..., 100.
        let info = |l: u64| Ok::<_, ()>((l * 10, 100));
        let g = group(10, 100, 1000);
        let mut r = RetentionRecord { keep_bytes: 350, ..Default::default() };
        advance_window(&mut r, &g, u64::MAX, info).unwrap();
        // Events first..=10 hold at most 350 bytes: first = 8 (8, 9, 10).
        assert_eq!((r.first(), r.window_bytes(&g), r.first_time_ns), (8, 300, 80));
        let mut r = RetentionRecord { keep_ns: 45, ..Default::default() };
        advance_window(&mut r, &g, u64::MAX, info).unwrap();
        // Points from time 55 on: the point current at 55 is LSN 5.
        assert_eq!(r.first(), 5);
        let mut r = RetentionRecord { keep_ns: 45, keep_bytes: 350, ..Default::default() };
        advance_window(&mut r, &g, u64::MAX, info).unwrap();
        assert_eq!(r.first(), 8);
        // No policy: never moves; the window never passes the last event.
        let mut r = RetentionRecord::default();
        assert_eq!(advance_window(&mut r, &g, u64::MAX, info).unwrap(), 0);
        let mut r = RetentionRecord { keep_bytes: 1, ..Default::default() };
        advance_window(&mut r, &g, u64::MAX, info).unwrap();
        assert_eq!(r.first(), 10);
    }

    #[test]
    fn an_event_shape_gives_the_blocks_the_index_versioned() {
        let d = || "disk-a".to_string();
        for e in [
            Event::Write { disk: d(), offset: 4095, data: vec![1; 4098] },
            Event::Write { disk: d(), offset: 0, data: vec![1; 1 << 20] },
            Event::Trim { disk: d(), offset: 512, len: 300 * 4096 },
            Event::WriteZeroes { disk: d(), offset: 8192, len: 4096 },
            Event::Revert { disk: d(), to_lsn: 3, block_first: 7, block_end: 19 },
        ] {
            let (disk, blocks) = crate::blocks::versioned_blocks(&e).unwrap();
            assert_eq!(Shape::of(&e), Shape::Blocks { disk: disk.to_string(), blocks, write: matches!(e, Event::Write { .. }) }, "{e:?}");
        }
        assert_eq!(Shape::of(&Event::Bookmark { name: "m".into(), app_consistent: true }), Shape::Bookmark { name: "m".into() });
        assert_eq!(Shape::of(&Event::Lock { until_ns: 5 }), Shape::Other);
        assert!(Shape::decode(&[9; 18]).is_err());
    }

    #[test]
    fn a_lock_refuses_a_shorter_policy_an_early_unpin_and_a_delete() {
        let marks: BTreeMap<String, u64> = [("m".to_string(), 3)].into();
        let mut r = RetentionRecord::default();
        apply_policy(&mut r, "g", &Event::Retain { keep_ns: 100, keep_bytes: 0 }, 1, &marks).unwrap();
        apply_policy(&mut r, "g", &Event::Pin { name: "m".into(), until_ns: 500 }, 1, &marks).unwrap();
        apply_policy(&mut r, "g", &Event::Lock { until_ns: 1000 }, 1, &marks).unwrap();
        let e = apply_policy(&mut r, "g", &Event::Retain { keep_ns: 50, keep_bytes: 0 }, 2, &marks).unwrap_err();
        assert!(e.contains("locked until"), "{e}");
        assert!(apply_policy(&mut r, "g", &Event::Retain { keep_ns: 100, keep_bytes: 1 << 30 }, 2, &marks).is_err(), "a byte limit where there was none is shorter");
        apply_policy(&mut r, "g", &Event::Retain { keep_ns: 200, keep_bytes: 0 }, 2, &marks).unwrap();
        assert!(apply_policy(&mut r, "g", &Event::Pin { name: "m".into(), until_ns: 0 }, 2, &marks).unwrap_err().contains("unpinning"));
        assert!(apply_policy(&mut r, "g", &Event::Lock { until_ns: 900 }, 2, &marks).unwrap_err().contains("never shortened"));
        assert!(delete_check("g", Some(&r), 999, false, &[]).unwrap_err().contains("cannot be deleted"));
        // After the lock's end, all of it is allowed.
        apply_policy(&mut r, "g", &Event::Retain { keep_ns: 1, keep_bytes: 0 }, 1000, &marks).unwrap();
        apply_policy(&mut r, "g", &Event::Pin { name: "m".into(), until_ns: 0 }, 1000, &marks).unwrap();
        assert!(r.pins.is_empty());
        delete_check("g", Some(&r), 1000, false, &[]).unwrap();
        assert!(apply_policy(&mut r, "g", &Event::Pin { name: "nope".into(), until_ns: 5000 }, 1000, &marks).unwrap_err().contains("no bookmark"));
    }
}
