//! The deployment files in `ops/`: the systemd units pass `systemd-analyze
//! verify` (and a broken one does not), the sample configs load, and every
//! metric the Grafana dashboard draws is one a real node or tap exports.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{dashboard_metrics, run, scrape, spawn_serving, Site, REWIND};
use rewind_node::config::{ClientConfig, NodeConfig};

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

/// `systemd-analyze verify` on copies of the units whose ExecStart names
/// the binary this test built (verify checks that it is executable).
fn verify(units: &[(&str, String)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, text) in units {
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace("/usr/local/bin/rewind", REWIND)).unwrap();
        paths.push(path);
    }
    Command::new("systemd-analyze").arg("verify").args(&paths).output().expect("systemd-analyze (package systemd)")
}

#[test]
fn systemd_units_verify() {
    let node = std::fs::read_to_string(ops().join("systemd/rewind-node.service")).unwrap();
    let tap = std::fs::read_to_string(ops().join("systemd/rewind-tap@.service")).unwrap();
    let script = ops().join("backup-image.sh").canonicalize().unwrap();
    let backup = std::fs::read_to_string(ops().join("systemd/rewind-backup@.service")).unwrap().replace("/usr/local/bin/rewind-backup-image", script.to_str().unwrap());
    let timer = std::fs::read_to_string(ops().join("systemd/rewind-backup@.timer")).unwrap();
    let out = verify(&[
        ("rewind-node.service", node.clone()),
        ("rewind-tap@vm1-disk0.service", tap),
        ("rewind-backup@vm1-disk0.service", backup),
        ("rewind-backup@vm1-disk0.timer", timer),
    ]);
    assert!(out.status.success(), "systemd-analyze verify: {}", String::from_utf8_lossy(&out.stderr));
    // The check bites: a misspelt directive is refused.
    let broken = node.replace("ExecStart=", "ExecStrat=");
    let out = verify(&[("rewind-node.service", broken)]);
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stderr).contains("ExecStrat"), "a broken unit passed");
}

#[test]
fn sample_configs_load() {
    for i in 1..=3 {
        let path = ops().join(format!("deploy/node-{i}.toml"));
        let c = NodeConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!(c.id, i);
        assert_eq!(c.advertised().to_string(), format!("rewind{i}.example.net:7101"));
    }
    let c = ClientConfig::load(&ops().join("deploy/client.toml")).unwrap();
    assert_eq!(c.nodes.len(), 3);
    NodeConfig::load(&ops().join("node.example.toml")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_draws_metrics_that_exist() {
    let node_metrics = dashboard_metrics("rewind-node");
    let tap_metrics = dashboard_metrics("rewind-tap");
    assert!(node_metrics.len() >= 5 && tap_metrics.len() >= 5, "{node_metrics:?} {tap_metrics:?}");

    let site = Site::up(&[]);
    assert!(site.cli(&["group", "create", "vm1", "--disk", "disk0:16M"]).status.success());
    let out = site.cli(&["load", "--group", "vm1", "--disk", "disk0", "--events", "50"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let leader = site.leader().await;
    let node = site.site().nodes.into_iter().find(|n| n.id == leader.id).unwrap();
    let body = scrape(&node.metrics.to_string());
    for name in &node_metrics {
        // DR's metrics appear once a group is linked to a second site:
        // `tests/dr.rs` checks them on two linked sites.
        if name.starts_with("rewind_dr_") {
            continue;
        }
        // A counter only appears once something was counted: the denied
        // requests are made to happen here.
        if name == "rewind_requests_denied_total" {
            let reader = site.path().join("reader.toml");
            let out = common::rewind(&["group", "create", "x", "--disk", "d:1M", "--config", reader.to_str().unwrap()]);
            assert!(!out.status.success());
            // The node the client asked first refused it, whichever it was.
            let any = site.site().nodes.iter().any(|n| scrape(&n.metrics.to_string()).contains(name.as_str()));
            assert!(any, "no node exports {name}");
            continue;
        }
        assert!(body.contains(name.as_str()), "the dashboard draws {name}, which the node does not export");
    }

    // An async tap, after a write and its shipping.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let backing = site.path().join("disk0.raw");
    let tap = spawn_serving(Command::new(REWIND).args([
        "tap", "--group", "vm1", "--disk", "disk0", "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--mode", "async", "--metrics-listen", &metrics, "--config", site.config().to_str().unwrap(),
    ]));
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 0x11 0 64k", "-c", "flush"]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let body = scrape(&metrics);
        let missing: Vec<&String> = tap_metrics.iter().filter(|n| !body.contains(n.as_str())).collect();
        if missing.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the dashboard draws {missing:?}, which the tap does not export");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
