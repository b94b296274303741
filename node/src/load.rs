//! A load generator: a client appending write events of chosen sizes with a
//! window of batches in flight. Used by `rewind load`, the demo, tests and
//! benchmarks. Payloads are a pure function of (seed, index), so a checker
//! can tell what each event held.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rewind_wire::event::{Event, TimedEvent};
use rewind_wire::limits::BATCH_BYTES_MAX;

use crate::client::Client;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub group: String,
    pub disk: String,
    pub disk_bytes: u64,
    /// Events to append in all.
    pub events: u64,
    /// Sizes cycle through this list.
    pub sizes: Vec<usize>,
    /// Batches in flight at once.
    pub window: usize,
    /// Bytes per batch at most.
    pub batch_bytes: usize,
    pub seed: u64,
    /// Stop early after this long.
    pub time_max: Duration,
}

#[derive(Debug, Clone)]
pub struct Acked {
    pub lsn_first: u64,
    pub lsn_last: u64,
    pub first_index: u64,
    pub count: u64,
}

#[derive(Debug)]
pub struct LoadReport {
    pub events: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
    pub acked: Vec<Acked>,
    pub errors: Vec<String>,
}

/// The payload of event `index`: `len` bytes derived from the seed.
pub fn payload(seed: u64, index: u64, len: usize) -> Vec<u8> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.update(&index.to_le_bytes());
    let mut out = vec![0u8; len];
    hasher.finalize_xof().fill(&mut out);
    out
}

/// The offset event `index` writes at: aligned, inside the disk.
pub fn offset(spec: &LoadSpec, index: u64, len: usize) -> u64 {
    let slots = (spec.disk_bytes / 4096).max(1);
    let slot = (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7) % slots;
    (slot * 4096).min(spec.disk_bytes.saturating_sub(len as u64))
}

pub fn event(spec: &LoadSpec, index: u64) -> TimedEvent {
    let len = spec.sizes[(index as usize) % spec.sizes.len()];
    TimedEvent {
        time_ns: crate::now_ns(),
        event: Event::Write { disk: spec.disk.clone(), offset: offset(spec, index, len), data: payload(spec.seed, index, len) },
    }
}

/// Runs the load to its count or time limit. Every batch's outcome is kept:
/// an acknowledged range in `acked`, a failure in `errors`.
pub async fn run(client: Client, spec: &LoadSpec, mut progress: impl FnMut(u64, u64)) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(!spec.sizes.is_empty() && spec.window > 0, "need at least one size and a window of 1 or more");
    let batch_bytes = spec.batch_bytes.clamp(1, BATCH_BYTES_MAX);
    let mut producer = crate::client::producer(client, spec.window);
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).context("histogram")?;
    let mut in_flight = VecDeque::new();
    let started = Instant::now();
    let (mut next, mut events, mut bytes) = (0u64, 0u64, 0u64);
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    loop {
        // Keep the window full; answers come back in order, so wait on the oldest.
        if in_flight.len() < spec.window && next < spec.events && started.elapsed() < spec.time_max {
            let first_index = next;
            let mut batch_events = Vec::new();
            let mut size = 0usize;
            while next < spec.events {
                let len = spec.sizes[(next as usize) % spec.sizes.len()];
                // Cut by bytes, and by count: tiny writes would pass the
                // limit on events per batch long before the byte budget.
                if !batch_events.is_empty() && (size + len > batch_bytes || batch_events.len() == rewind_wire::limits::BATCH_EVENTS_MAX) {
                    break;
                }
                batch_events.push(event(spec, next));
                size += len;
                next += 1;
            }
            let count = batch_events.len() as u64;
            let rx = producer.submit(&spec.group, batch_events).await?;
            in_flight.push_back((rx, Instant::now(), first_index, count, size as u64));
            continue;
        }
        let Some((rx, sent_at, first_index, count, size)) = in_flight.pop_front() else { break };
        match rx.await.unwrap_or(Err(crate::client::ProducerError::Stopped)) {
            Ok((lsn_first, lsn_last)) => {
                latency_us.record((sent_at.elapsed().as_micros() as u64).max(1)).ok();
                events += count;
                bytes += size;
                acked.push(Acked { lsn_first, lsn_last, first_index, count });
                progress(events, bytes);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    Ok(LoadReport { events, bytes, elapsed: started.elapsed(), latency_us, acked, errors })
}
