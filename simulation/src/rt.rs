//! A deterministic executor with simulated time, and openraft's
//! `AsyncRuntime` on top of it.
//!
//! One thread runs every task of a simulated site. Which ready task runs
//! next is drawn from the seed; time stands still while any task can run
//! and jumps to the next timer when none can. Tasks are tagged with the node
//! they belong to, so a node can be paused (its tasks are not polled) or
//! crashed (its tasks are dropped where they stand).
//!
//! openraft's channels and mutexes are tokio's (`openraft-rt-tokio`): they
//! are plain data structures that need no tokio runtime. `futures::select!`
//! inside openraft draws from a per-thread generator seeded by a
//! process-wide counter, so each seed runs in a process of its own (see
//! `main.rs`): the same seed then makes the same choices.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::ops::{Add, AddAssign, Sub, SubAssign};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use crate::rng::Rng;

type TaskFuture = Pin<Box<dyn Future<Output = ()>>>;

/// Id of the future given to [`block_on`].
const MAIN: u64 = 0;

struct Task {
    future: Option<TaskFuture>,
    node: Option<u64>,
}

/// Woken tasks, as a set ordered by task id: the order in which tasks were
/// woken does not matter. (It is not always deterministic: tokio's `watch`,
/// which openraft uses, spreads its waiters over shards chosen at random.)
#[derive(Default)]
struct Ready {
    set: BTreeSet<u64>,
}

struct TaskWaker {
    id: u64,
    ready: Arc<Mutex<Ready>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.lock().expect("ready lock").set.insert(self.id);
    }
}

struct State {
    now_ns: u64,
    next_id: u64,
    tasks: BTreeMap<u64, Task>,
    timers: BTreeMap<(u64, u64), Waker>,
    next_timer: u64,
    ready: Arc<Mutex<Ready>>,
    rng: Rng,
    current_node: Option<u64>,
    paused: BTreeSet<u64>,
    polls: u64,
    /// Nodes whose clock runs at another rate or has jumped.
    clocks: BTreeMap<u64, Clock>,
}

/// A node's own clock: `base_local + (global - base_global) * rate`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    base_global: u64,
    base_local: u64,
    rate: f64,
}

impl Clock {
    fn local(&self, global: u64) -> u64 {
        self.base_local + (global.saturating_sub(self.base_global) as f64 * self.rate) as u64
    }

    fn global(&self, local: u64) -> u64 {
        self.base_global + (local.saturating_sub(self.base_local) as f64 / self.rate).ceil() as u64
    }
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
    static LAST_RUN: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    STATE.with(|s| f(s.borrow_mut().as_mut().expect("called outside a simulation")))
}

/// Like [`with_state`], but does nothing outside a simulation or while the
/// state is borrowed (drops during teardown).
fn try_with_state(f: impl FnOnce(&mut State)) {
    let _ = STATE.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if let Some(s) = s.as_mut() {
                f(s);
            }
        }
    });
}

fn waker(id: u64, ready: &Arc<Mutex<Ready>>) -> Waker {
    Waker::from(Arc::new(TaskWaker { id, ready: ready.clone() }))
}

/// Why [`block_on`] returned without the main future's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Simulated time passed its limit.
    TimeLimit,
    /// No task could run and no timer was set.
    Deadlock,
    /// More polls than the limit: a busy loop that never lets time pass.
    PollLimit,
}

/// Simulated nanoseconds since the start.
pub fn now_ns() -> u64 {
    with_state(|s| s.now_ns)
}

/// The node whose task is running, if any (for log lines).
pub fn current_node() -> Option<u64> {
    STATE.with(|s| s.try_borrow().ok().and_then(|s| s.as_ref().and_then(|s| s.current_node)))
}

/// Simulated time, or none outside a simulation (for log lines).
pub fn try_now_ns() -> Option<u64> {
    STATE.with(|s| s.try_borrow().ok().and_then(|s| s.as_ref().map(|s| s.now_ns)))
}

/// Simulated time and task polls at the end of the last [`block_on`] on
/// this thread (zeros if none has ended).
pub fn last_run() -> (u64, u64) {
    LAST_RUN.with(|c| c.get())
}

/// The message a panic carried.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// A number from the executor's own generator (for openraft's
/// randomised timeouts).
fn next_u64() -> u64 {
    with_state(|s| s.rng.next_u64())
}

/// Runs `future` and every task it spawns until it finishes, simulated time
/// passes `time_limit`, or `poll_limit` polls have been made.
pub fn block_on<F: Future>(seed: u64, time_limit: Duration, poll_limit: u64, future: F) -> Result<F::Output, Stop> {
    let ready = Arc::new(Mutex::new(Ready::default()));
    STATE.with(|s| {
        *s.borrow_mut() = Some(State {
            now_ns: 0,
            next_id: MAIN + 1,
            tasks: BTreeMap::new(),
            timers: BTreeMap::new(),
            next_timer: 0,
            ready: ready.clone(),
            rng: Rng::new(seed ^ 0x005e_ed0f_e8ec),
            current_node: None,
            paused: BTreeSet::new(),
            polls: 0,
            clocks: BTreeMap::new(),
        })
    });
    let main_waker = waker(MAIN, &ready);
    main_waker.wake_by_ref();
    let mut main = std::pin::pin!(future);
    let limit_ns = time_limit.as_nanos() as u64;
    let result = loop {
        let pick = with_state(State::pick);
        match pick {
            Some(MAIN) => {
                with_state(|s| {
                    s.current_node = None;
                    s.polls += 1;
                });
                if let Poll::Ready(v) = main.as_mut().poll(&mut Context::from_waker(&main_waker)) {
                    break Ok(v);
                }
            }
            Some(id) => {
                let taken = with_state(|s| {
                    let task = s.tasks.get_mut(&id)?;
                    s.current_node = task.node;
                    s.polls += 1;
                    task.future.take()
                });
                let Some(mut future) = taken else { continue };
                let w = waker(id, &ready);
                let done = future.as_mut().poll(&mut Context::from_waker(&w)).is_ready();
                let finished = with_state(|s| {
                    s.current_node = None;
                    match s.tasks.get_mut(&id) {
                        Some(task) if !done => {
                            task.future = Some(future);
                            None
                        }
                        // Done, or killed while it ran: drop it outside the borrow.
                        _ => {
                            s.tasks.remove(&id);
                            Some(future)
                        }
                    }
                });
                drop(finished);
            }
            None => {
                let fired = with_state(|s| {
                    let (&(deadline, _), _) = s.timers.first_key_value()?;
                    s.now_ns = s.now_ns.max(deadline);
                    let mut fired = Vec::new();
                    while let Some(entry) = s.timers.first_entry() {
                        if entry.key().0 > s.now_ns {
                            break;
                        }
                        fired.push(entry.remove());
                    }
                    Some(fired)
                });
                match fired {
                    None => break Err(Stop::Deadlock),
                    Some(wakers) => wakers.into_iter().for_each(Waker::wake),
                }
            }
        }
        let (now, polls) = with_state(|s| (s.now_ns, s.polls));
        if now > limit_ns {
            break Err(Stop::TimeLimit);
        }
        if polls > poll_limit {
            break Err(Stop::PollLimit);
        }
    };
    // Tear down: drop every task outside the borrow, then the state.
    loop {
        let tasks = with_state(|s| std::mem::take(&mut s.tasks));
        if tasks.is_empty() {
            break;
        }
        drop(tasks);
    }
    let state = STATE.with(|s| s.borrow_mut().take());
    if let Some(st) = &state {
        LAST_RUN.with(|c| c.set((st.now_ns, st.polls)));
    }
    drop(state);
    result
}

/// Forgets a simulation that unwound out of [`block_on`] (a panic), without
/// running the destructors of its tasks.
pub fn abandon() {
    let state = STATE.with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.take()));
    std::mem::forget(state);
}

impl State {
    /// The running node's own clock (the simulation's for the harness).
    fn local_now(&self) -> u64 {
        match self.current_node.and_then(|n| self.clocks.get(&n)) {
            Some(c) => c.local(self.now_ns),
            None => self.now_ns,
        }
    }

    /// When, in simulated time, the running node's clock reads `local`.
    fn to_global(&self, local: u64) -> u64 {
        let g = match self.current_node.and_then(|n| self.clocks.get(&n)) {
            Some(c) => c.global(local),
            None => local,
        };
        g.max(self.now_ns + 1)
    }

    /// Takes a ready task, chosen by the generator among those whose node
    /// is not paused.
    fn pick(&mut self) -> Option<u64> {
        let mut ready = self.ready.lock().expect("ready lock");
        let runnable: Vec<u64> = ready
            .set
            .iter()
            .copied()
            .filter(|id| *id == MAIN || self.tasks.get(id).is_none_or(|t| t.node.is_none_or(|n| !self.paused.contains(&n))))
            .collect();
        if runnable.is_empty() {
            return None;
        }
        let id = runnable[(self.rng.next_u64() % runnable.len() as u64) as usize];
        ready.set.remove(&id);
        Some(id)
    }
}

/// Runs `f` as if from a task of `node`: tasks it spawns belong to `node`.
pub fn with_node<R>(node: Option<u64>, f: impl FnOnce() -> R) -> R {
    let before = with_state(|s| std::mem::replace(&mut s.current_node, node));
    let r = f();
    with_state(|s| s.current_node = before);
    r
}

/// Drops every task of `node` where it stands: a crash.
pub fn kill_node(node: u64) {
    let killed: Vec<Task> = with_state(|s| {
        let ids: Vec<u64> = s.tasks.iter().filter(|(_, t)| t.node == Some(node)).map(|(id, _)| *id).collect();
        ids.iter().filter_map(|id| s.tasks.remove(id)).collect()
    });
    drop(killed);
}

/// Number of live tasks of `node`.
#[cfg(test)]
fn node_tasks(node: u64) -> usize {
    with_state(|s| s.tasks.values().filter(|t| t.node == Some(node)).count())
}

pub fn pause_node(node: u64) {
    with_state(|s| s.paused.insert(node));
}

pub fn resume_node(node: u64) {
    with_state(|s| s.paused.remove(&node));
}

/// Makes `node`'s clock run at `rate` times simulated time from now on
/// (its timers fire early or late), and jumps it `forward_ns` ahead (a
/// suspended VM). Monotonic clocks never go back, so neither does this.
pub fn skew_clock(node: u64, rate: f64, forward_ns: u64) {
    with_state(|s| {
        let now = s.now_ns;
        let local = s.clocks.get(&node).map_or(now, |c| c.local(now));
        s.clocks.insert(node, Clock { base_global: now, base_local: local + forward_ns, rate: rate.clamp(0.5, 2.0) });
    });
}

/// Time on the running node's own clock.
pub fn local_now_ns() -> u64 {
    with_state(|s| s.local_now())
}

/// Spawns a task that need not be `Send` (the harness's own tasks).
pub fn spawn_local<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let slot = Arc::new(Mutex::new(Slot { value: None, cancelled: false, waiter: None }));
    let guard = CancelGuard(slot.clone());
    let wrapped = async move {
        let guard = guard;
        let value = future.await;
        let mut s = guard.0.lock().expect("join slot");
        s.value = Some(value);
        if let Some(w) = s.waiter.take() {
            w.wake();
        }
    };
    let handle = JoinHandle { slot };
    with_state(|s| {
        let id = s.next_id;
        s.next_id += 1;
        s.tasks.insert(id, Task { future: Some(Box::pin(wrapped)), node: s.current_node });
        s.ready.lock().expect("ready lock").set.insert(id);
    });
    handle
}

struct Slot<T> {
    value: Option<T>,
    cancelled: bool,
    waiter: Option<Waker>,
}

/// Marks a task's slot cancelled when the task is dropped unfinished.
struct CancelGuard<T>(Arc<Mutex<Slot<T>>>);

impl<T> Drop for CancelGuard<T> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.lock() {
            if s.value.is_none() {
                s.cancelled = true;
                if let Some(w) = s.waiter.take() {
                    w.wake();
                }
            }
        }
    }
}

/// The handle of a spawned task. Dropping it detaches the task.
pub struct JoinHandle<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

/// A task ended without a value: its node crashed.
#[derive(Debug, Clone, Copy)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the task was dropped (its node crashed)")
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, Cancelled>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.slot.lock().expect("join slot");
        if let Some(v) = s.value.take() {
            return Poll::Ready(Ok(v));
        }
        if s.cancelled {
            return Poll::Ready(Err(Cancelled));
        }
        s.waiter = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A point in simulated time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SimInstant(u64);

impl Add<Duration> for SimInstant {
    type Output = SimInstant;
    fn add(self, d: Duration) -> SimInstant {
        SimInstant(self.0.saturating_add(d.as_nanos() as u64))
    }
}

impl AddAssign<Duration> for SimInstant {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}

impl Sub<Duration> for SimInstant {
    type Output = SimInstant;
    fn sub(self, d: Duration) -> SimInstant {
        SimInstant(self.0.saturating_sub(d.as_nanos() as u64))
    }
}

impl SubAssign<Duration> for SimInstant {
    fn sub_assign(&mut self, d: Duration) {
        *self = *self - d;
    }
}

impl Sub<SimInstant> for SimInstant {
    type Output = Duration;
    fn sub(self, other: SimInstant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(other.0))
    }
}

impl openraft_rt::Instant for SimInstant {
    fn now() -> SimInstant {
        SimInstant(local_now_ns())
    }
}

/// Waits until the running node's clock reads a time (or, `global`, until
/// a point in simulated time).
pub struct Sleep {
    deadline: u64,
    global: bool,
    key: Option<(u64, u64)>,
}

impl Sleep {
    /// Until the running node's clock reads `deadline_ns`.
    pub fn until(deadline_ns: u64) -> Sleep {
        Sleep { deadline: deadline_ns, global: false, key: None }
    }

    /// Until simulated time `deadline_ns`, whatever the node's clock says.
    pub fn until_global(deadline_ns: u64) -> Sleep {
        Sleep { deadline: deadline_ns, global: true, key: None }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let (deadline, global, key) = (self.deadline, self.global, self.key);
        let (done, key) = with_state(|s| {
            let now = if global { s.now_ns } else { s.local_now() };
            if now >= deadline {
                if let Some(k) = key {
                    s.timers.remove(&k);
                }
                return (true, None);
            }
            let at = if global { deadline } else { s.to_global(deadline) };
            let k = match key {
                Some(k) if k.0 == at => k,
                other => {
                    if let Some(old) = other {
                        s.timers.remove(&old);
                    }
                    s.next_timer += 1;
                    (at, s.next_timer)
                }
            };
            s.timers.insert(k, cx.waker().clone());
            (false, Some(k))
        });
        self.key = key;
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            try_with_state(|s| {
                s.timers.remove(&k);
            });
        }
    }
}

/// Sleeps `d` on the running node's clock.
pub fn sleep(d: Duration) -> Sleep {
    Sleep::until(local_now_ns().saturating_add(d.as_nanos() as u64))
}

/// A future with a deadline.
pub struct Timeout<F> {
    future: Pin<Box<F>>,
    sleep: Sleep,
}

#[derive(Debug, Clone, Copy)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline elapsed")
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(v) = self.future.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match Pin::new(&mut self.sleep).poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

pub fn timeout<F: Future>(d: Duration, future: F) -> Timeout<F> {
    Timeout { future: Box::pin(future), sleep: sleep(d) }
}

/// openraft's runtime in the simulation.
#[derive(Debug, Default)]
pub struct SimRuntime;

impl openraft_rt::AsyncRuntime for SimRuntime {
    type JoinError = Cancelled;
    type JoinHandle<T: openraft_rt::OptionalSend + 'static> = JoinHandle<T>;
    type Sleep = Sleep;
    type Instant = SimInstant;
    type TimeoutError = Elapsed;
    type Timeout<R, T: Future<Output = R> + openraft_rt::OptionalSend> = Timeout<T>;
    type ThreadLocalRng = rand::rngs::SmallRng;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + openraft_rt::OptionalSend + 'static,
        T::Output: openraft_rt::OptionalSend + 'static,
    {
        spawn_local(future)
    }

    fn sleep(duration: Duration) -> Sleep {
        sleep(duration)
    }

    fn sleep_until(deadline: SimInstant) -> Sleep {
        Sleep::until(deadline.0)
    }

    fn timeout<R, F: Future<Output = R> + openraft_rt::OptionalSend>(duration: Duration, future: F) -> Timeout<F> {
        timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + openraft_rt::OptionalSend>(deadline: SimInstant, future: F) -> Timeout<F> {
        Timeout { future: Box::pin(future), sleep: Sleep::until(deadline.0) }
    }

    fn is_panic(_: &Cancelled) -> bool {
        false
    }

    fn thread_rng() -> rand::rngs::SmallRng {
        rand::SeedableRng::seed_from_u64(next_u64())
    }

    type Mpsc = openraft_rt_tokio::TokioMpsc;
    type Watch = openraft_rt_tokio::TokioWatch;
    type Oneshot = openraft_rt_tokio::TokioOneshot;
    type Mutex<T: openraft_rt::OptionalSend + 'static> = openraft_rt_tokio::TokioMutex<T>;

    fn new(_threads: usize) -> SimRuntime {
        SimRuntime
    }

    /// openraft never calls this inside a running Raft; the simulation's
    /// entry point is [`block_on`], which needs a seed.
    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        match block_on(0, Duration::from_secs(3600), u64::MAX, future) {
            Ok(v) => v,
            Err(stop) => panic!("simulated block_on stopped: {stop:?}"),
        }
    }

    /// No threads in a simulation: the work runs where it is awaited.
    #[allow(clippy::manual_async_fn)] // the trait's signature, with its `Send` bound
    fn spawn_blocking<F, T>(f: F) -> impl Future<Output = Result<T, std::io::Error>> + Send
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        async move { Ok(f()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn time_jumps_to_the_next_timer_and_order_follows_the_seed() {
        let order = |seed| {
            let log = Rc::new(RefCell::new(Vec::new()));
            let l = log.clone();
            let end = block_on(seed, Duration::from_secs(10), 1_000_000, async move {
                let mut hs = Vec::new();
                for i in 0..8u64 {
                    let l = l.clone();
                    hs.push(spawn_local(async move {
                        sleep(Duration::from_millis(10 * (i % 2))).await;
                        l.borrow_mut().push(i);
                    }));
                }
                for h in hs {
                    h.await.unwrap();
                }
                now_ns()
            })
            .unwrap();
            assert_eq!(end, 10_000_000, "the clock stops at the last timer");
            let v = log.borrow().clone();
            v
        };
        assert_eq!(order(1), order(1));
        let runs: BTreeSet<Vec<u64>> = (0..8).map(order).collect();
        assert!(runs.len() > 1, "the seed picks the order of ready tasks");
    }

    #[test]
    fn a_killed_node_drops_its_tasks_and_joiners_see_it() {
        let r = block_on(3, Duration::from_secs(10), 1_000_000, async {
            let h = with_node(Some(7), || spawn_local(async { sleep(Duration::from_secs(5)).await }));
            sleep(Duration::from_millis(1)).await;
            assert_eq!(node_tasks(7), 1);
            kill_node(7);
            assert_eq!(node_tasks(7), 0);
            h.await.is_err()
        });
        assert_eq!(r, Ok(true));
    }

    #[test]
    fn a_fast_clock_fires_its_timers_early_in_simulated_time() {
        let r = block_on(3, Duration::from_secs(10), 1_000_000, async {
            skew_clock(5, 2.0, 0);
            let h = with_node(Some(5), || spawn_local(async { sleep(Duration::from_secs(2)).await }));
            h.await.unwrap();
            now_ns()
        });
        assert_eq!(r, Ok(1_000_000_000), "2 s on a clock running twice as fast is 1 s");
    }

    #[test]
    fn a_stuck_simulation_stops() {
        let r = block_on(3, Duration::from_secs(1), 1_000_000, std::future::pending::<()>());
        assert_eq!(r, Err(Stop::Deadlock));
        let r = block_on(3, Duration::from_secs(1), 1_000_000, async {
            loop {
                sleep(Duration::from_millis(100)).await;
            }
        });
        assert_eq!(r, Err(Stop::TimeLimit));
    }
}
