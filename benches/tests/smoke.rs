//! Keeps the benchmark harness working: `rewind-benches all --smoke` runs
//! every benchmark at tiny sizes against real servers and must print every
//! table with numbers in it. Never asserts what the numbers are.

use std::process::Command;

#[test]
fn every_benchmark_prints_its_tables() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rewind-benches"))
        .args(["all", "--smoke", "--runs", "1", "--out", out_dir.path().to_str().unwrap()])
        .output()
        .expect("run rewind-benches");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rewind-benches all --smoke failed:\n{stderr}");
    let text = std::fs::read_to_string(out_dir.path().join("smoke.md")).unwrap();
    for section in ["## limits", "## append", "## ingest", "## groups", "## growth", "## tap", "## replay", "## fractions"] {
        assert!(text.contains(section), "no {section} table in:\n{text}");
    }
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with('|') && !l.starts_with("|---")).collect();
    let mut data_rows = 0;
    for row in &rows {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let numbers = cells.iter().filter(|c| c.split_whitespace().next().and_then(|w| w.parse::<f64>().ok()).is_some_and(f64::is_finite)).count();
        // Header rows have no numbers; every other row must have some.
        if numbers > 0 {
            data_rows += 1;
        } else {
            assert!(cells.iter().all(|c| c.parse::<f64>().is_err()), "a row without numbers: {row}");
        }
    }
    // limits 5 + append 3 + ingest 18 + groups 3 + growth 3 + tap 6 + RPO 1 + replay 2 + fractions 7.
    assert!(data_rows >= 48, "only {data_rows} rows with numbers in:\n{text}");
}
