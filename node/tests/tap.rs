//! The tap with real NBD clients from Debian's packages: qemu-io, qemu-img,
//! nbdcopy, fio (nbd engine) and nbdinfo. After each client the backing file
//! equals a reference, and replaying the log onto a zeroed image gives the
//! same bytes. Also: a leader dying under fio, Unix sockets, two taps into
//! one group, a restarted sync tap's epochs, and local processes that flood
//! the tap. The async tap's journal under failures is in `tap_async.rs`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use rewind_wire::rpc::DiskSpec;

/// Runs one client against a fresh disk through the tap and checks the
/// backing file against `reference` and against the replayed log.
async fn check_client(site: &Site, dir: &Path, name: &str, client: impl FnOnce(&str), reference: impl FnOnce(&Path)) {
    let group = format!("g-{name}");
    site.client.create_group(&group, vec![DiskSpec { name: "d0".into(), size_bytes: DISK_BYTES, sector_bytes: 512 }]).await.unwrap();
    let backing = dir.join(format!("{name}.raw"));
    {
        let tap = start_tap(site, &group, "d0", &backing);
        client(&tap.uri);
    }
    let reference_path = dir.join(format!("{name}.ref"));
    zeroed(&reference_path);
    reference(&reference_path);
    compare(&backing, &reference_path);
    let events = log_of(site, &group).await;
    assert!(!events.is_empty(), "{name}: nothing was journaled");
    let replayed = dir.join(format!("{name}.replayed"));
    replay_onto(&events, "d0", &replayed);
    compare(&replayed, &backing);
    // The same through `rewind replay`, from the last node.
    let cli = dir.join(format!("{name}.cli-replay"));
    let out = site.cli(&["replay", &group, "--disk", "d0", "--latest", "--node", "3", "--out", cli.to_str().unwrap()]);
    assert!(out.status.success(), "replay: {}", String::from_utf8_lossy(&out.stderr));
    compare(&cli, &backing);
    eprintln!("{name}: {} events journaled; backing file = reference = replayed log", events.len());
}

fn qemu_io_script() -> Vec<&'static str> {
    vec![
        "write -P 0x11 0 1M",
        "write -P 0x22 4096 8192",
        "write -P 0x33 1000 3000",
        "write -z 65536 131072",
        "discard 2M 1M",
        "write -P 0x44 2560k 4096",
        "aio_write -P 0x55 8M 64k",
        "aio_write -P 0x66 8M 4k",
        "aio_flush",
        "write -P 0x77 -f 63M 1M",
        "flush",
    ]
}

fn qemu_io(target: &str) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", target]);
    for c in qemu_io_script() {
        cmd.args(["-c", c]);
    }
    run(&mut cmd);
}

fn source_image(dir: &Path) -> PathBuf {
    let src = dir.join("source.raw");
    if !src.exists() {
        zeroed(&src);
        run(Command::new("qemu-io").args(["-f", "raw", src.to_str().unwrap(), "-c", "write -P 0xa5 0 5M", "-c", "write -P 0x5a 20M 3M", "-c", "write -P 0x01 63M 512k"]));
    }
    src
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nbd_clients_write_through_the_tap() {
    let site = Site::up(&[]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();

    check_client(&site, &d, "qemu-io", qemu_io, |r| qemu_io(r.to_str().unwrap())).await;

    let src = source_image(&d);
    let s = src.clone();
    check_client(
        &site,
        &d,
        "qemu-img",
        |uri| {
            run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", s.to_str().unwrap(), uri]));
        },
        |r| std::fs::copy(&src, r).map(|_| ()).unwrap(),
    )
    .await;

    let src = source_image(&d);
    let s = src.clone();
    check_client(
        &site,
        &d,
        "nbdcopy",
        |uri| {
            run(Command::new("nbdcopy").args(["--request-size=1048576", "--requests=16", s.to_str().unwrap(), uri]));
        },
        |r| std::fs::copy(&src, r).map(|_| ()).unwrap(),
    )
    .await;

    // fio: random writes with a fixed seed, then the same job on a plain file.
    let fio = |target: &[&str]| {
        let mut cmd = Command::new("fio");
        cmd.args(["--name=w", "--rw=randwrite", "--bs=4k", "--size=16M", "--iodepth=16", "--randseed=42", "--refill_buffers=1", "--norandommap", "--io_size=8M", "--output-format=terse"]);
        cmd.args(target);
        run(&mut cmd);
    };
    check_client(
        &site,
        &d,
        "fio",
        |uri| fio(&["--ioengine=nbd", &format!("--uri={uri}")]),
        |r| fio(&["--ioengine=psync", &format!("--filename={}", r.display())]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_and_bad_requests() {
    let (site, dir, backing) = site_with_disk().await;
    let tap = start_tap(&site, "g", "d0", &backing);
    let info = run(Command::new("nbdinfo").args(["--json", &tap.uri]));
    let json: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &json["exports"][0];
    assert_eq!(export["export-size"], DISK_BYTES);
    for cap in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(export[cap], true, "{cap} in {info}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_minimum"], 512, "the disk's sector size is the smallest block: {info}");
    // A 3-byte write, and a sector-sized one off a sector boundary: EINVAL,
    // nothing journaled.
    {
        use std::io::{Read, Write};
        let addr = tap_addr(&tap);
        let mut s = nbd_connect(&addr);
        for (handle, offset, len) in [(1u64, 0u64, 3u32), (2, 100, 512)] {
            let mut w = 0x25609513u32.to_be_bytes().to_vec();
            w.extend_from_slice(&0u16.to_be_bytes());
            w.extend_from_slice(&1u16.to_be_bytes());
            w.extend_from_slice(&handle.to_be_bytes());
            w.extend_from_slice(&offset.to_be_bytes());
            w.extend_from_slice(&len.to_be_bytes());
            w.extend(std::iter::repeat_n(7u8, len as usize));
            s.write_all(&w).unwrap();
            let mut r = [0u8; 16];
            s.read_exact(&mut r).unwrap();
            assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 22, "an unaligned write ({offset}+{len}) gets EINVAL");
        }
    }
    // Out of range: an error from the server, nothing journaled.
    let bad = Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 1 64M 4096"]).output().unwrap();
    let text = String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert!(text.contains("error") || !bad.status.success(), "out-of-range write was not refused: {text}");
    // An unknown export name is refused by name.
    let wrong = tap.uri.replace("/d0", "/nope");
    let out = Command::new("nbdinfo").arg(&wrong).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"), "{}", String::from_utf8_lossy(&out.stderr));
    // A second tap on the same backing file is refused, saying why.
    let second = Command::new(REWIND)
        .args(["tap", "--group", "g", "--disk", "d0", "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--config", site.config().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use by another tap"), "{}", String::from_utf8_lossy(&second.stderr));
    // A good write after the bad ones still works and is the only event.
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 9 0 4096"]));
    let events = log_of(&site, "g").await;
    assert_eq!(events.len(), 1, "{events:?}");

    // Bad replay targets: a clear error and exit status 1.
    let out_path = dir.path().join("r.raw");
    let out = out_path.to_str().unwrap();
    for (args, says) in [
        (vec!["replay", "g", "--disk", "d0", "--at", "2", "--out", out], "beyond the log"),
        (vec!["replay", "g", "--disk", "d0", "--at-bookmark", "nope", "--out", out], "no bookmark \"nope\""),
        (vec!["replay", "g", "--disk", "d0", "--at-time", "2001-01-01T00:00:00Z", "--out", out], "before the window"),
        (vec!["replay", "g", "--disk", "d0", "--at-time", "last tuesday", "--out", out], "RFC 3339"),
        (vec!["replay", "g", "--disk", "d0", "--at", "0", "--out", out], "LSNs start at 1"),
        (vec!["replay", "g", "--disk", "nope", "--latest", "--out", out], "has no disk"),
        (vec!["replay", "nope", "--disk", "d0", "--latest", "--out", out], "no consistency group"),
    ] {
        let r = site.cli(&args);
        assert_eq!(r.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(site.cli(&["replay", "g", "--disk", "d0", "--out", out]).status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_survives_the_leader_dying_and_nothing_acknowledged_is_lost() {
    let (site, dir, backing) = site_with_disk().await;
    let tap = start_tap(&site, "g", "d0", &backing);
    let fio = Command::new("fio")
        .args(["--name=w", "--ioengine=nbd", &format!("--uri={}", tap.uri), "--rw=randwrite", "--bs=4k", "--size=64M", "--io_size=48M", "--iodepth=16", "--randseed=5", "--refill_buffers=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the leader once writes are flowing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let killed = loop {
        let leader = site.leader().await;
        let lsn = leader.shards[0].groups.iter().find(|g| g.name == "g").map_or(0, |g| g.last_lsn);
        if lsn > 200 {
            kill9(leader.pid);
            break leader.id;
        }
        assert!(std::time::Instant::now() < deadline, "fio wrote nothing");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let out = fio.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("err= 0"), "fio failed after the leader died:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    drop(tap);
    rewind_node::dev::start_node(site.path(), killed).await.unwrap();
    // Every write fio had acknowledged is in the backing file; the log,
    // replayed, gives exactly the backing file, on every replica.
    let events = log_of(&site, "g").await;
    let replayed = dir.path().join("replayed.raw");
    replay_onto(&events, "d0", &replayed);
    compare(&replayed, &backing);
    eprintln!("leader node {killed} killed mid-run; fio finished with err=0; {} events journaled, log = disk on all replicas", events.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tap_listens_on_a_unix_socket() {
    let (site, dir, backing) = site_with_disk().await;
    let socket = dir.path().join("tap.sock");
    let config = site.config();
    let mut child = Command::new(REWIND)
        .args(["tap", "--group", "g", "--disk", "d0", "--backing", backing.to_str().unwrap(), "--socket", socket.to_str().unwrap(), "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let uri = line.split_whitespace().find(|w| w.starts_with("nbd+unix://")).unwrap_or_else(|| panic!("{line:?}")).to_string();
    let _tap = TapProcess { child, uri: uri.clone() };
    run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x42 4096 65536", "-c", "flush"]));
    let events = log_of(&site, "g").await;
    assert_eq!(events.len(), 1);
    let reference = dir.path().join("ref.raw");
    zeroed(&reference);
    run(Command::new("qemu-io").args(["-f", "raw", reference.to_str().unwrap(), "-c", "write -P 0x42 4096 65536"]));
    compare(&backing, &reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_taps_into_one_group_make_one_order() {
    let site = Site::up(&[]);
    let dir = tempfile::tempdir().unwrap();
    let disks = ["d0", "d1"].map(|name| DiskSpec { name: name.into(), size_bytes: DISK_BYTES, sector_bytes: 512 });
    site.client.create_group("cg", disks.to_vec()).await.unwrap();
    let backing: Vec<PathBuf> = ["d0", "d1"].iter().map(|d| dir.path().join(format!("{d}.raw"))).collect();
    let taps: Vec<TapProcess> = ["d0", "d1"].iter().zip(&backing).map(|(d, b)| start_tap(&site, "cg", d, b)).collect();
    let fios: Vec<Child> = taps
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Command::new("fio")
                .args(["--name=w", "--ioengine=nbd", &format!("--uri={}", t.uri), "--rw=randwrite", "--bs=4k", "--size=32M", "--io_size=8M", "--iodepth=8", &format!("--randseed={}", i + 1)])
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut f in fios {
        assert!(f.wait().unwrap().success());
    }
    drop(taps);
    let events = log_of(&site, "cg").await;
    let on = |d: &str| events.iter().filter(|e| e.event.disk() == Some(d)).count();
    assert_eq!(on("d0") + on("d1"), events.len());
    assert!(on("d0") > 0 && on("d1") > 0);
    // Both disks' writes share one order: they interleave in LSN order.
    let switches = events.windows(2).filter(|w| w[0].event.disk() != w[1].event.disk()).count();
    assert!(switches > 1, "the two disks' writes did not interleave");
    for (disk, b) in ["d0", "d1"].iter().zip(&backing) {
        let replayed = dir.path().join(format!("{disk}.replayed"));
        replay_onto(&events, disk, &replayed);
        compare(&replayed, b);
    }
    eprintln!("{} events of two disks in one order ({switches} switches between disks)", events.len());
}

/// Raw NBD by hand: a write, then bad requests, then a client that goes
/// away in the middle of a write. Each bad request gets its error, the torn
/// write is never journaled, and the acknowledged one is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_request_loses_nothing_acknowledged() {
    use std::io::{Read, Write};
    let (site, dir, backing) = site_with_disk().await;
    let tap = start_tap(&site, "g", "d0", &backing);
    let addr = tap.uri.trim_start_matches("nbd://").split('/').next().unwrap().to_string();
    let connect = || nbd_connect(&addr);
    let request = |kind: u16, handle: u64, offset: u64, len: u32| {
        let mut r = 0x25609513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    };
    let reply = |s: &mut std::net::TcpStream, handle: u64| -> u32 {
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x67446698);
        assert_eq!(u64::from_be_bytes(r[8..].try_into().unwrap()), handle);
        u32::from_be_bytes(r[4..8].try_into().unwrap())
    };
    let mut s = connect();
    let mut w = request(1, 1, 8192, 4096);
    w.extend_from_slice(&[0xab; 4096]);
    s.write_all(&w).unwrap();
    assert_eq!(reply(&mut s, 1), 0, "a good write");
    s.write_all(&request(99, 2, 0, 0)).unwrap();
    assert_eq!(reply(&mut s, 2), 22, "an unknown command gets EINVAL");
    s.write_all(&request(0, 3, DISK_BYTES - 512, 4096)).unwrap();
    assert_eq!(reply(&mut s, 3), 22, "a read past the end gets EINVAL");
    let mut w = request(1, 4, DISK_BYTES, 512);
    w.extend_from_slice(&[1; 512]);
    s.write_all(&w).unwrap();
    assert_eq!(reply(&mut s, 4), 28, "a write past the end gets ENOSPC");
    s.write_all(&request(0, 5, 0, 64 << 20)).unwrap();
    assert_eq!(reply(&mut s, 5), 75, "an oversized read gets EOVERFLOW");
    // A write whose payload stops half way, then the client is gone.
    let mut torn = request(1, 6, 1 << 20, 65536);
    torn.extend_from_slice(&[0xcd; 30000]);
    s.write_all(&torn).unwrap();
    drop(s);
    // The tap still serves, and the log holds the one good write.
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "read -P 0xab 8192 4096", "-c", "read -P 0 1M 64k"]));
    let events = log_of(&site, "g").await;
    assert_eq!(events.len(), 1, "{events:?}");
    drop(tap);
    let reference = dir.path().join("ref.raw");
    zeroed(&reference);
    run(Command::new("qemu-io").args(["-f", "raw", reference.to_str().unwrap(), "-c", "write -P 0xab 8192 4096"]));
    compare(&backing, &reference);
}

/// A sync tap keeps its producer identity beside the backing file, and each
/// start (after SIGKILL too) ships in the next epoch of it, so the site
/// refuses anything a dead process left on its way. A damaged identity
/// file stops the tap with a message, and is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sync_tap_ships_in_the_next_epoch_of_its_identity() {
    use rewind_wire::event::{seq_epoch, seq_number};
    use rewind_wire::rpc::{Request, Response};
    let (site, dir, backing) = site_with_disk().await;
    let id_file = dir.path().join("d0.raw.tap-id");
    let identity = || {
        let text = std::fs::read_to_string(&id_file).unwrap();
        let mut w = text.split_whitespace();
        (u64::from_str_radix(w.next().unwrap(), 16).unwrap(), w.next().unwrap().parse::<u32>().unwrap())
    };
    let last_seq = |client_id| {
        let client = site.client.clone();
        async move {
            match client.call_leader(&Request::ProducerState { group: "g".into(), client_id }).await.unwrap() {
                Response::Producer { last_seq } => last_seq,
                other => panic!("{other:?}"),
            }
        }
    };
    let write = |uri: &str, pattern: &str, at: &str| {
        run(Command::new("qemu-io").args(["-f", "raw", uri, "-c", &format!("write -P {pattern} {at} 64k"), "-c", "flush"]));
    };
    let tap = start_tap_with(&site, "g", "d0", &backing, &[]);
    write(&tap.uri, "0x31", "0");
    let (client_id, epoch) = identity();
    assert_eq!(epoch, 1);
    let first = last_seq(client_id).await;
    assert_eq!((seq_epoch(first), seq_number(first) >= 1), (1, true), "last_seq {first:#x}");
    kill9(tap.child.id());
    drop(tap);
    for round in 2..=3u32 {
        let tap = start_tap_with(&site, "g", "d0", &backing, &[]);
        write(&tap.uri, &format!("0x3{round}"), &format!("{}k", 64 * round));
        assert_eq!(identity(), (client_id, round), "the same identity, the next epoch");
        let seq = last_seq(client_id).await;
        assert_eq!(seq_epoch(seq), round, "last_seq {seq:#x}");
        drop(tap);
    }
    let events = log_of(&site, "g").await;
    let replayed = dir.path().join("replayed.raw");
    replay_onto(&events, "d0", &replayed);
    compare(&replayed, &backing);
    // A damaged identity file: the tap refuses to start and leaves it alone.
    std::fs::write(&id_file, "not an identity\n").unwrap();
    let config = site.config();
    let out = Command::new(REWIND)
        .args(["tap", "--group", "g", "--disk", "d0", "--backing", backing.to_str().unwrap(), "--listen", "127.0.0.1:0", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("tap identity file") && err.contains("move it away"), "{err}");
    assert_eq!(std::fs::read_to_string(&id_file).unwrap(), "not an identity\n");
    eprintln!("three sync tap processes shipped as {client_id:016x} in epochs 1, 2 and 3; {} events replay to the backing file", events.len());
}

/// A raw NBD client past the handshake (fixed newstyle, no zeroes, then
/// NBD_OPT_EXPORT_NAME "d0"), with a 30 s read timeout.
fn nbd_connect(addr: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&2u32.to_be_bytes());
    opt.extend_from_slice(b"d0");
    s.write_all(&opt).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), DISK_BYTES);
    s
}

fn tap_addr(tap: &TapProcess) -> String {
    tap.uri.trim_start_matches("nbd://").split('/').next().unwrap().to_string()
}

fn alive(tap: &mut TapProcess) -> bool {
    tap.child.try_wait().unwrap().is_none()
}

/// Issue 18, items 6 and 7: local processes that flood the tap with idle
/// connections, past its file limit and past its connection cap, or that
/// pipeline huge reads and never read the replies. The tap lives on, its
/// memory stays bounded, and a well-behaved client writes and reads
/// through it meanwhile and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_connections_and_unread_replies_do_not_stop_the_tap() {
    use std::io::{Read, Write};
    let (site, dir, backing) = site_with_disk().await;
    let config = site.config();
    let b = backing.to_str().unwrap();
    // 1. A tap with 64 file descriptors and no connection cap to speak of:
    // the flood makes accept() fail with EMFILE, which used to end it.
    let mut tap = spawn_serving(Command::new("bash").args([
        "-c",
        &format!("ulimit -n 64 && exec {REWIND} tap --group g --disk d0 --backing {b} --listen 127.0.0.1:0 --max-connections 1000 --config {}", config.display()),
    ]));
    let addr = tap_addr(&tap);
    let idle: Vec<std::net::TcpStream> = (0..200).filter_map(|_| std::net::TcpStream::connect(&addr).ok()).collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(alive(&mut tap), "the tap died under a flood of {} connections", idle.len());
    drop(idle);
    std::thread::sleep(std::time::Duration::from_millis(300));
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 0x41 0 1M", "-c", "read -P 0x41 0 1M"]));
    assert!(alive(&mut tap));
    drop(tap);

    // 2. A cap of 2: a third connection is closed at once; idle ones that
    // never finish the handshake are dropped after 10 s.
    let mut tap = start_tap_with(&site, "g", "d0", &backing, &["--max-connections", "2"]);
    let addr = tap_addr(&tap);
    let idle: Vec<std::net::TcpStream> = (0..2).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut third = std::net::TcpStream::connect(&addr).unwrap();
    third.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 18];
    assert!(matches!(third.read(&mut buf), Ok(0) | Err(_)), "a connection past the cap got a greeting");
    std::thread::sleep(rewind_nbd::server::HANDSHAKE_TIMEOUT + std::time::Duration::from_secs(1));
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "read -P 0x41 0 1M"]));
    drop(idle);

    // 3. Forty pipelined 32 MiB reads whose replies are never read: the
    // tap holds at most 64 MiB of them, and serves another client meanwhile.
    let rss_before = peak_rss_kib(tap.child.id());
    let mut greedy = nbd_connect(&addr);
    for handle in 0..40u64 {
        let mut r = 0x25609513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&0u64.to_be_bytes());
        r.extend_from_slice(&(32u32 << 20).to_be_bytes());
        greedy.write_all(&r).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    run(Command::new("qemu-io").args(["-f", "raw", &tap.uri, "-c", "write -P 0x42 1M 1M", "-c", "flush", "-c", "read -P 0x42 1M 1M"]));
    let rss = peak_rss_kib(tap.child.id());
    assert!(alive(&mut tap));
    assert!(rss < rss_before + (200 << 10), "the tap's peak memory grew from {rss_before} KiB to {rss} KiB under unread replies");
    drop(greedy);
    drop(tap);
    // Every acknowledged write is in the log and on the disk.
    let events = log_of(&site, "g").await;
    let replayed = dir.path().join("replayed.raw");
    replay_onto(&events, "d0", &replayed);
    compare(&replayed, &backing);
    eprintln!("peak RSS {rss_before} KiB before the unread reads, {rss} KiB after");
}
