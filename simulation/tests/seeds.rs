//! CI's share of the simulation: a fixed budget of seeds run twice (every
//! checker must pass and both runs must hash the same), the pinned seeds of
//! bugs found and fixed, and each reintroduced bug caught within a bounded
//! number of seeds.

use std::process::Command;

fn sim(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rewind-simulation")).args(args).output().expect("run rewind-simulation");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    println!("$ rewind-simulation {}\n{text}", args.join(" "));
    (out.status.success(), text)
}

/// Seeds that found bugs, with the switch that puts each bug back: each
/// seed must pass as the code is, and fail with its bug back. (A seed alone
/// would stop meaning anything as soon as the simulation changes; this
/// pairing keeps the regression test honest.)
/// They were pinned before retention existed and run without it
/// (`--no-retention`), in the world they were found in.
const PINNED: [(u64, &str); 4] = [
    // Replicas diverged after a restored leader rewrote log ids (first
    // found by seeds 79 and 233; the pins are re-drawn, by running the bug
    // from seed 1, whenever a change to the simulated world moves them).
    (126, "leader-restore"),
    (263, "leader-restore"),
    // The site stalled for good: a leader removed itself, crashed before
    // the change committed, and a corrupt replica could not come back
    // (found in a 20-minute run; too rare for the budget below).
    (108007, "leader-removes-itself"),
    // openraft tripped a debug assertion on a change sent to a leader that
    // removed itself (first found by seed 229). openraft is now built
    // without its debug assertions and the second change does no harm the
    // simulation sees; the bug also skips the handover, which 108007 needs.
    (108007, "membership-unguarded"),
];

#[test]
fn a_budget_of_seeds_passes_twice_with_the_same_trace_hashes() {
    let (ok, text) = sim(&["--seeds", "150", "--first-seed", "500", "--twice"]);
    assert!(ok, "a seed failed or was not deterministic:\n{text}");
    assert!(text.contains("determinism: 150 of 150 seeds gave the same trace hash twice"), "{text}");
    let hash = text.lines().find_map(|l| l.strip_prefix("trace-hash: ")).expect("a trace-hash line");
    assert_eq!(hash.len(), 64);
    // Every fault kind fired in this budget.
    for kind in [
        "message lost",
        "message duplicated",
        "partition: leader isolated",
        "partition: majority/minority",
        "partition: one way",
        "crash",
        "power loss",
        "pause",
        "fsync error",
        "corruption",
        "membership change",
        "clock jump",
        "node clock skew or jump",
        "crash at I/O completion",
        "misdirected write",
        "read corruption",
        "snapshot corruption",
        "slow disk",
        "tap crash",
        "frame stalled",
        "tap journal full (back-pressure, not a fault)",
        "tap host power loss",
        "tap journal entry damaged",
        "tap refused a damaged journal (an answer, not a fault)",
        "dr message lost",
        "dr message duplicated",
        "dr link cut",
        "dr leader change",
        "dr proposal lost with its leader",
        "dr site rebuilt from its log",
        "dr failover",
        "dr failback",
        "retention: history freed by the collector",
        "retention: a pinned point behind the window",
        "backup source gone",
        "backup resumed",
        "backup aborted",
        "backup: a write from another producer refused",
        "backup: blocks sent as references",
        "torn segment tail cut at open",
        "segment payload rots under a stopped node",
        "segments deleted by the collector",
    ] {
        assert!(text.lines().any(|l| l.starts_with(&format!("{kind} | "))), "fault kind {kind:?} never fired:\n{text}");
    }
}

#[test]
fn pinned_seeds_of_fixed_bugs_pass_and_fail_with_their_bug_back() {
    for (seed, bug) in PINNED {
        let (ok, text) = sim(&["--seed", &seed.to_string(), "--no-retention"]);
        assert!(ok, "pinned seed {seed} fails again:\n{text}");
        let (caught, text) = sim(&["--seed", &seed.to_string(), "--bug", bug, "--no-retention"]);
        assert!(caught, "pinned seed {seed} no longer catches {bug}:\n{text}");
    }
}

/// Runs a reintroduced bug from seed 1 and returns how many seeds it took.
fn caught_after(bug: &str, budget: u64) -> u64 {
    let (ok, text) = sim(&["--bug", bug, "--seeds", &budget.to_string()]);
    assert!(ok, "bug {bug} was not caught in {budget} seeds:\n{text}");
    let line = text.lines().find(|l| l.starts_with(&format!("bug {bug} caught by seed"))).expect("a caught line");
    line.rsplit("after ").next().and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).expect("a seed count")
}

#[test]
fn every_reintroduced_bug_is_caught() {
    let mut counts = Vec::new();
    for (bug, budget) in [
        ("ack-before-fsync", 300),
        ("commit-without-majority", 300),
        ("ack-before-commit", 300),
        ("vote-not-synced", 2000),
        ("leader-restore", 1500),
        ("tap-answer-before-commit", 300),
        ("replay-before-applied", 300),
        ("tap-unfenced", 1000),
        ("shipper-trims-on-send", 300),
        ("trim-before-backing-sync", 300),
        ("cut-damaged-journal-entry", 300),
        ("dr-fence-ignored", 300),
        ("dr-revert-ignores-extents", 300),
        ("dr-fork-one-late", 300),
        ("dr-dedupe-fill-askew", 300),
        ("gc-frees-live", 300),
        ("gc-ignores-pins", 300),
        ("backup-half-visible", 300),
        ("backup-admits-other-writers", 300),
        ("segments-not-synced", 300),
        ("apply-before-payload-synced", 300),
        ("reclaim-ignores-events", 300),
    ] {
        counts.push((bug, caught_after(bug, budget)));
    }
    for (bug, n) in counts {
        println!("bug {bug}: caught after {n} seed(s)");
    }
}
