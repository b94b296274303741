//! `rewind-simulation`: runs seeds of the deterministic site simulation and
//! prints a summary ending in `trace-hash: <hex>`.
//!
//! Each seed runs in a child process of its own (`worker`), for two
//! reasons: openraft's `select!` draws from a generator seeded by a
//! process-wide counter, so only a fresh process replays a seed exactly;
//! and a seed that hangs or panics is killed and reported, not fatal.
//!
//! This runner bounds and reports wall time, so it reads the system clock;
//! the simulated world (the library) never does.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rewind_simulation::site::Options;
use rewind_simulation::{run_seed, Bug, Outcome};

#[derive(Parser)]
#[command(
    name = "rewind-simulation",
    about = "Deterministic simulation of a rewind site under injected faults.",
    long_about = "Runs seeds of a simulated 4-node site (3 voters and a spare): clients write \
batches, and in half the seeds a guest writes through production's tap (sync mode, or async mode \
with a journal and production's shipper), while faults are \
injected (message loss, duplication and delay, partitions, crashes that lose unsynced writes, power \
loss, pauses, fsync errors, a rotten log entry or misdirected write on one replica, log reads and \
snapshots that arrive corrupt, slow disks, membership changes, node and client clock skew and jumps, \
crashes of the tap's process, stalled stream frames); disks are replayed over the network from any node meanwhile. Every \
seed ends with the checkers: no acknowledged write lost, no phantom or duplicate, replicas equal, \
replay equal to a byte model, the tap's backing file equal to its log, committed entries never \
change, leader completeness, progress after the faults stop.\n\n\
Exit status: 0 when every seed passed (with --bug: when the bug was caught), 1 when a seed \
failed (with --bug: when it was not caught), 2 on a usage error.",
    after_help = "Examples:\n  rewind-simulation --seeds 100\n  rewind-simulation --seed 42          # reproduce one seed, with its trace tail\n  rewind-simulation --minutes 60 --seeds 1000000\n  rewind-simulation --bug ack-before-fsync --seeds 500   # stops at the first seed that catches it\n  rewind-simulation --seeds 20 --twice # run each seed twice: the trace hashes must match"
)]
struct Cli {
    #[command(subcommand)]
    worker: Option<Worker>,
    /// Number of seeds to run, from --first-seed.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed of the range.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Run only this seed, and print its trace's last lines.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop starting new seeds after this many minutes of wall time.
    #[arg(long)]
    minutes: Option<f64>,
    /// Put back a known bug; the run stops at the first seed that catches it.
    #[arg(long, value_enum)]
    bug: Option<Bug>,
    /// Seeds run at once (each in its own process).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Simulated seconds of faults per seed.
    #[arg(long, default_value_t = 20)]
    fault_secs: u64,
    /// Run every seed twice and fail if the two trace hashes differ.
    #[arg(long)]
    twice: bool,
    /// Wall-clock limit per seed, in seconds.
    #[arg(long, default_value_t = 300)]
    seed_timeout: u64,
    /// Never give the group a retention policy: the world as it was
    /// before retention (seeds pinned for older bugs replay in it).
    #[arg(long)]
    no_retention: bool,
}

#[derive(Subcommand)]
enum Worker {
    /// Runs one seed in this process and prints its outcome as JSON.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        seed: u64,
        #[arg(long, value_enum)]
        bug: Option<Bug>,
        #[arg(long, default_value_t = 20)]
        fault_secs: u64,
        #[arg(long)]
        no_retention: bool,
    },
}

fn bug_name(b: Bug) -> String {
    clap::ValueEnum::to_possible_value(&b).map(|v| v.get_name().to_string()).unwrap_or_default()
}

struct Running {
    seed: u64,
    child: Child,
    started: Instant,
}

fn spawn(cli: &Cli, seed: u64) -> std::io::Result<Running> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["worker", "--seed", &seed.to_string(), "--fault-secs", &cli.fault_secs.to_string()]);
    if let Some(b) = cli.bug {
        cmd.args(["--bug", &bug_name(b)]);
    }
    if cli.no_retention {
        cmd.arg("--no-retention");
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    Ok(Running { seed, child, started: Instant::now() })
}

fn outcome_of(r: &mut Running) -> Outcome {
    let mut out = String::new();
    if let Some(mut s) = r.child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    let status = r.child.wait().ok();
    serde_json::from_str(out.trim()).unwrap_or_else(|_| Outcome {
        seed: r.seed,
        failures: vec![format!("the seed's process ended without an outcome ({status:?}): a panic?")],
        trace_hash: String::new(),
        trace_lines: 0,
        sim_ns: 0,
        polls: 0,
        messages: 0,
        faults: BTreeMap::new(),
        acked_batches: 0,
        replays: 0,
        plan: String::new(),
        tail: Vec::new(),
    })
}

/// `REWIND_SIM_LOG=<filter>` (e.g. `openraft=debug`): the worker writes
/// tracing's log lines to stderr, stamped with simulated time and node.
fn log_to_stderr() {
    struct SimTime;
    impl tracing_subscriber::fmt::time::FormatTime for SimTime {
        fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
            let now = rewind_simulation::rt::try_now_ns().unwrap_or(0);
            let node = rewind_simulation::rt::current_node().map_or("--".to_string(), |n| format!("n{n}"));
            write!(w, "{:>11.3}ms {node}", now as f64 / 1e6)
        }
    }
    let Ok(filter) = std::env::var("REWIND_SIM_LOG") else { return };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_timer(SimTime)
        .with_ansi(false)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Worker::Worker { seed, bug, fault_secs, no_retention }) = cli.worker {
        rewind_simulation::site::hook_panics();
        log_to_stderr();
        let mut opts = Options::new(seed);
        opts.bug = bug;
        opts.fault_secs = fault_secs;
        opts.no_retention = no_retention;
        let outcome = run_seed(&opts);
        println!("{}", serde_json::to_string(&outcome).expect("outcome encodes"));
        return ExitCode::SUCCESS;
    }
    if cli.jobs == 0 || cli.seeds == 0 {
        eprintln!("error: --jobs and --seeds must be at least 1");
        return ExitCode::from(2);
    }
    let seeds: Vec<u64> = match cli.seed {
        Some(s) => vec![s],
        None => (cli.first_seed..cli.first_seed.saturating_add(cli.seeds)).collect(),
    };
    let runs_per_seed = if cli.twice { 2 } else { 1 };
    let started = Instant::now();
    let deadline = cli.minutes.map(|m| started + Duration::from_secs_f64(m * 60.0));
    let mut queue: std::collections::VecDeque<u64> = seeds.iter().flat_map(|s| std::iter::repeat_n(*s, runs_per_seed)).collect();
    let mut running: Vec<Running> = Vec::new();
    let mut results: BTreeMap<u64, Vec<Outcome>> = BTreeMap::new();
    let mut caught: Option<u64> = None;
    let mut last_report = Instant::now();
    loop {
        let out_of_time = deadline.is_some_and(|d| Instant::now() > d);
        while running.len() < cli.jobs && caught.is_none() && !out_of_time {
            let Some(seed) = queue.pop_front() else { break };
            match spawn(&cli, seed) {
                Ok(r) => running.push(r),
                Err(e) => {
                    eprintln!("error: cannot start a worker process: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        let mut i = 0;
        while i < running.len() {
            let done = matches!(running[i].child.try_wait(), Ok(Some(_)));
            let overdue = running[i].started.elapsed() > Duration::from_secs(cli.seed_timeout);
            if !done && !overdue {
                i += 1;
                continue;
            }
            let mut r = running.swap_remove(i);
            let outcome = if overdue && !done {
                let _ = r.child.kill();
                let _ = r.child.wait();
                let mut o = outcome_of(&mut r);
                o.failures = vec![format!("the seed ran longer than {} s of wall time", cli.seed_timeout)];
                o
            } else {
                outcome_of(&mut r)
            };
            if !outcome.failures.is_empty() && cli.bug.is_some() && caught.is_none() {
                caught = Some(outcome.seed);
            }
            results.entry(outcome.seed).or_default().push(outcome);
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!("... {} seed runs done, {} running, {:.0} s", results.values().map(Vec::len).sum::<usize>(), running.len(), started.elapsed().as_secs_f64());
        }
    }
    report(&cli, &results, caught, started.elapsed())
}

fn report(cli: &Cli, results: &BTreeMap<u64, Vec<Outcome>>, caught: Option<u64>, wall: Duration) -> ExitCode {
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let (mut sim_ns, mut messages, mut acked, mut seeds_with_fault) = (0u64, 0u64, 0u64, BTreeMap::<String, u64>::new());
    let mut replays = 0u64;
    let mut failed: Vec<&Outcome> = Vec::new();
    let mut nondeterministic = Vec::new();
    let mut all = blake3::Hasher::new();
    for (seed, outcomes) in results {
        let o = &outcomes[0];
        sim_ns += o.sim_ns;
        messages += o.messages;
        acked += o.acked_batches;
        replays += o.replays;
        for (k, v) in &o.faults {
            *faults.entry(k.clone()).or_default() += v;
            *seeds_with_fault.entry(k.clone()).or_default() += 1;
        }
        if outcomes.iter().any(|x| x.trace_hash != o.trace_hash) {
            nondeterministic.push(*seed);
        }
        if let Some(f) = outcomes.iter().find(|x| !x.failures.is_empty()) {
            failed.push(f);
        }
        all.update(&seed.to_le_bytes());
        all.update(o.trace_hash.as_bytes());
    }
    let seeds = results.len() as u64;
    let bug = cli.bug.map(|b| format!(" --bug {}", bug_name(b))).unwrap_or_default();
    for f in &failed {
        println!("seed {} FAILED{}:", f.seed, if cli.bug.is_some() { " (the bug was caught)" } else { "" });
        for line in &f.failures {
            println!("  {line}");
        }
        println!("  plan: {}", f.plan);
        let world = if cli.no_retention { " --no-retention" } else { "" };
        println!("  reproduce: cargo run -p rewind-simulation -- --seed {} --fault-secs {}{bug}{world}", f.seed, cli.fault_secs);
        if cli.seed.is_some() || failed.len() == 1 {
            println!("  last {} lines of its trace:", f.tail.len());
            for l in &f.tail {
                println!("    {l}");
            }
        }
    }
    if cli.seed.is_some() && failed.is_empty() {
        if let Some(o) = results.values().next().map(|v| &v[0]) {
            println!("seed {} passed; plan: {}", o.seed, o.plan);
            println!("  last {} lines of its trace:", o.tail.len());
            for l in &o.tail {
                println!("    {l}");
            }
        }
    }
    for s in &nondeterministic {
        println!("seed {s} is NOT deterministic: its two runs gave different trace hashes");
    }
    println!();
    println!("fault kind | injected | seeds where it fired");
    for (k, v) in &faults {
        println!("{k} | {v} | {} of {seeds}", seeds_with_fault[k]);
    }
    let wall_s = wall.as_secs_f64().max(1e-9);
    println!();
    println!(
        "seeds: {seeds} run, {} failed; simulated time: {:.0} s ({:.1} simulated s per wall s); {:.1} seeds per minute; messages: {messages}; acknowledged batches: {acked}; replays over the network checked: {replays}; faults injected: {}",
        failed.len(),
        sim_ns as f64 / 1e9,
        sim_ns as f64 / 1e9 / wall_s,
        seeds as f64 * 60.0 / wall_s,
        faults.iter().filter(|(k, _)| !k.contains("not a fault")).map(|(_, v)| v).sum::<u64>()
    );
    if cli.twice {
        println!("determinism: {} of {seeds} seeds gave the same trace hash twice", seeds - nondeterministic.len() as u64);
    }
    println!("trace-hash: {}", all.finalize().to_hex());
    match cli.bug {
        Some(b) => match caught {
            Some(_) => {
                // With several jobs, a later seed may finish first: report the
                // lowest seed that caught it.
                let seed = failed.iter().map(|f| f.seed).min().unwrap_or_default();
                let rank = results.keys().position(|s| *s == seed).map_or(0, |p| p + 1);
                println!("bug {} caught by seed {seed}, after {rank} seed(s)", bug_name(b));
                ExitCode::SUCCESS
            }
            None => {
                println!("bug {} NOT caught in {seeds} seeds", bug_name(b));
                ExitCode::from(1)
            }
        },
        None if failed.is_empty() && nondeterministic.is_empty() => ExitCode::SUCCESS,
        None => ExitCode::from(1),
    }
}
