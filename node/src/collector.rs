//! The collector's thread on a node: runs `gc::Collector` steps paced by
//! the node config (a CPU share, a byte rate, both lifted past a debt
//! bound), deletes dead payload segments, and publishes its metrics.

use std::sync::Arc;

use crate::spawn;

/// The collector's thread, and its metrics.
pub(crate) struct CollectorThread {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CollectorThread {
    pub(crate) async fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// How fast the collector may go.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GcPace {
    /// Freed plus rewritten bytes a second at most (0: no limit).
    pub(crate) rate_bytes: u64,
    /// Share of one core's time it may use, in percent (100: no limit).
    pub(crate) busy_percent: u64,
    /// Debt above which both limits are lifted (0: never).
    pub(crate) debt_max: u64,
}

impl GcPace {
    /// How long to rest after a step that took `wall` (of which `cpu` on
    /// a core: a busy host stretches a step's wall time, and waiting is not
    /// work) and freed plus rewrote `cost` bytes, when the debt is `debt`.
    fn wait(&self, wall: std::time::Duration, cpu: std::time::Duration, cost: u64, debt: u64) -> std::time::Duration {
        use std::time::Duration;
        if self.debt_max > 0 && debt >= self.debt_max {
            return Duration::ZERO;
        }
        let by_rate = if self.rate_bytes > 0 { Duration::from_secs_f64(cost as f64 / self.rate_bytes as f64).saturating_sub(wall) } else { Duration::ZERO };
        // Over the step and its rest, the CPU used is at most the share.
        let busy = self.busy_percent.clamp(1, 100);
        let by_busy = cpu.mul_f64(100.0 / busy as f64).saturating_sub(wall);
        by_rate.max(by_busy).min(Duration::from_secs(1))
    }
}

/// CPU time this thread has used.
fn thread_cpu_time() -> std::time::Duration {
    // SAFETY: clock_gettime writes the struct it is given.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs collector steps until `stop` is set, paced by `pace`, looking for
/// work every `idle` when there is none. An error is logged and retried
/// after `idle`: a failed read must not stop ingest.
fn run_collector(collector: &rewind_raft_store::gc::Collector, pace: GcPace, idle: std::time::Duration, stop: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut steps = 0u64;
    // The debt is read (a scan of the groups) at most once a second.
    let mut debt = (0u64, None::<std::time::Instant>);
    while !stop.load(Relaxed) {
        let started = std::time::Instant::now();
        let cpu_before = thread_cpu_time();
        let step = collector.step();
        steps += 1;
        // Payload segments nothing names any more go when the collector is
        // idle, and every 64 steps while it works.
        if matches!(step, Ok(ref s) if s.group.is_none()) || steps.is_multiple_of(64) {
            if let Err(e) = collector.reclaim_segments() {
                tracing::error!("deleting dead payload segments failed and is retried: {e}");
            }
        }
        match step {
            Ok(s) if s.group.is_some() => {
                let (wall, cpu) = (started.elapsed(), thread_cpu_time().saturating_sub(cpu_before));
                if debt.1.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(1)) {
                    debt = (collector.debt().unwrap_or(0), Some(std::time::Instant::now()));
                }
                let wait = pace.wait(wall, cpu, s.freed_bytes + s.rewritten_bytes, debt.0);
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
            }
            Ok(_) => std::thread::sleep(idle),
            Err(e) => {
                tracing::error!("the collector failed a step and retries: {e}");
                std::thread::sleep(idle);
            }
        }
    }
}

/// Runs the collector on a thread of its own (it reads and writes RocksDB
/// synchronously), paced by `pace`, and publishes
/// `rewind_gc_debt_bytes`, `rewind_gc_freed_bytes_total`,
/// `rewind_gc_rewritten_bytes_total` and the payload segments' bytes,
/// deletions and bytes freed every 5 s.
pub(crate) fn start(collector: rewind_raft_store::gc::Collector, pace: GcPace) -> CollectorThread {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = {
        let (collector, stop) = (collector.clone(), stop.clone());
        std::thread::Builder::new()
            .name("collector".into())
            .spawn(move || run_collector(&collector, pace, std::time::Duration::from_secs(1), &stop))
            .expect("spawn the collector thread")
    };
    let stats = collector.stats.clone();
    spawn(async move {
        use std::sync::atomic::Ordering::Relaxed;
        loop {
            let c = collector.clone();
            if let Ok(Ok(debt)) = tokio::task::spawn_blocking(move || c.debt()).await {
                metrics::gauge!("rewind_gc_debt_bytes").set(debt as f64);
            }
            metrics::counter!("rewind_gc_freed_bytes_total").absolute(stats.freed_bytes.load(Relaxed));
            metrics::counter!("rewind_gc_rewritten_bytes_total").absolute(stats.rewritten_bytes.load(Relaxed));
            metrics::counter!("rewind_segments_deleted_total").absolute(stats.segments_deleted.load(Relaxed));
            metrics::counter!("rewind_segment_bytes_freed_total").absolute(stats.segment_bytes_freed.load(Relaxed));
            let c = collector.clone();
            if let Ok(Ok(bytes)) = tokio::task::spawn_blocking(move || c.segment_bytes()).await {
                metrics::gauge!("rewind_segment_bytes").set(bytes as f64);
            }
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
    });
    CollectorThread { stop, thread: Some(thread) }
}

#[cfg(test)]
mod tests {
    use super::GcPace;
    use std::time::Duration;

    #[test]
    fn the_collector_waits_for_its_busy_share_and_rate_unless_the_debt_is_too_high() {
        let ms = Duration::from_millis;
        let pace = GcPace { rate_bytes: 0, busy_percent: 10, debt_max: 1 << 30 };
        // 10%: a step that used 5 ms of CPU in 5 ms rests 45 ms.
        assert_eq!(pace.wait(ms(5), ms(5), 4 << 20, 0), ms(45));
        // One that waited for the CPU for 20 ms of its 25 rests less: the
        // wait counts as rest.
        assert_eq!(pace.wait(ms(25), ms(5), 4 << 20, 0), ms(25));
        // Past the debt bound, no rest at all.
        assert_eq!(pace.wait(ms(5), ms(5), 4 << 20, 1 << 30), Duration::ZERO);
        // The byte rate, when it asks for more rest, wins: 64 MiB at
        // 64 MiB/s is a second, less the step's own time.
        let pace = GcPace { rate_bytes: 64 << 20, busy_percent: 100, debt_max: 0 };
        assert_eq!(pace.wait(ms(100), ms(100), 32 << 20, u64::MAX), ms(400));
        assert_eq!(pace.wait(ms(5), ms(5), 0, 0), Duration::ZERO);
        // Rests are at most a second.
        let pace = GcPace { rate_bytes: 0, busy_percent: 1, debt_max: 0 };
        assert_eq!(pace.wait(ms(500), ms(500), 0, 0), Duration::from_secs(1));
    }

    #[test]
    fn a_thread_s_cpu_time_grows_with_its_work() {
        let before = super::thread_cpu_time();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(super::thread_cpu_time() > before);
    }
}
