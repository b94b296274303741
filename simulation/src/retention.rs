//! Retention in the simulated site: an admin's policy and pin (the
//! harness's side; the rules themselves are production's, run by `sm.rs`).

use std::time::Duration;

use rewind_wire::event::{Event, EventBatch, TimedEvent};
use rewind_wire::raft::Command;

use crate::model::{CLIENT_BASE, GROUP, PINNED};
use crate::rng::Rng;
use crate::{rt, world};

/// The group's retention, set as an admin would: a byte policy at the
/// start, so the window moves and the collector frees history while the
/// faults run, and a bookmark pinned part-way, which the window passes.
pub async fn admin(mut rng: Rng, start: u64, fault_end: u64) {
    let keep_bytes = rng.range(96 << 10, 384 << 10);
    let batch = |seq: u64, events: Vec<Event>| {
        let events = events.into_iter().map(|event| TimedEvent { time_ns: rt::now_ns(), event }).collect();
        Command::Append(EventBatch { group: GROUP.into(), client_id: CLIENT_BASE - 2, seq, events })
    };
    let reply = crate::site::submit(CLIENT_BASE - 2, batch(1, vec![Event::Retain { keep_ns: 0, keep_bytes }]), &mut rng, fault_end).await;
    world::trace(format!("retention: keep {keep_bytes} bytes: {reply:?}"));
    let at = start + (fault_end - start) * rng.range(15, 45) / 100;
    rt::sleep(Duration::from_nanos(at.saturating_sub(rt::now_ns()))).await;
    let pin = vec![Event::Bookmark { name: PINNED.into(), app_consistent: false }, Event::Pin { name: PINNED.into(), until_ns: u64::MAX }];
    let reply = crate::site::submit(CLIENT_BASE - 2, batch(2, pin), &mut rng, fault_end).await;
    world::trace(format!("retention: bookmark {PINNED} pinned: {reply:?}"));
}
