//! `rewind backup` with real QEMU tools: qcow2 images with persistent dirty
//! bitmaps, written by `fio --ioengine=nbd` and `qemu-io`, served by
//! `qemu-nbd`, copied for reference by `nbdcopy`, compared by `qemu-img
//! compare` with `rewind replay --at-backup`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use std::time::{Duration, Instant};

use common::{compare, run, Site};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

/// A `qemu-nbd` (or nbdkit) serving an image on a Unix socket, killed
/// when dropped.
struct QemuNbd {
    pid: u32,
    uri: String,
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        // At most 10 s for it to go (and write its bitmaps back).
        for _ in 0..500 {
            if unsafe { libc::kill(self.pid as i32, 0) } != 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Serves `image` (qcow2) on a socket in `dir`; read-only unless
/// `writable`; with dirty bitmap `bitmap` exported if given. qemu-nbd's
/// `--fork` returns once it serves, or fails (it refuses an inconsistent
/// bitmap): then the error is its message.
fn try_serve(dir: &Path, image: &Path, writable: bool, bitmap: Option<&str>) -> Result<QemuNbd, String> {
    let k = rand_suffix();
    let socket = dir.join(format!("nbd-{k}.sock"));
    let pid_file = dir.join(format!("nbd-{k}.pid"));
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "qcow2", "--persistent", "-e", "4", "--fork", "--pid-file", pid_file.to_str().unwrap(), "-k", socket.to_str().unwrap()]);
    if !writable {
        cmd.arg("--read-only");
    }
    if let Some(b) = bitmap {
        cmd.args(["-B", b]);
    }
    let out = cmd.arg(image).output().expect("qemu-nbd (apt-get install -y qemu-utils)");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    Ok(QemuNbd { pid, uri: format!("nbd+unix:///?socket={}", socket.display()) })
}

fn rand_suffix() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn serve(dir: &Path, image: &Path, writable: bool, bitmap: Option<&str>) -> QemuNbd {
    try_serve(dir, image, writable, bitmap).unwrap()
}

fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

fn qemu_io(image: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2", image.to_str().unwrap()]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(&mut cmd);
}

/// fio's NBD engine writes random 64 KiB blocks over the first `span` bytes.
fn fio_writes(uri: &str, span: u64, bytes: u64, seed: u64) {
    run(Command::new("fio").args([
        "--name=guest",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=64k",
        &format!("--size={span}"),
        &format!("--io_size={bytes}"),
        &format!("--randseed={seed}"),
        "--refill_buffers",
        "--buffer_compress_percentage=0",
        "--iodepth=4",
        "--end_fsync=1",
        "--runtime=60",
    ]));
}

/// The reference: the source copied by nbdcopy to a raw file.
fn reference(src: &QemuNbd, out: &Path) {
    run(Command::new("nbdcopy").args([&src.uri, out.to_str().unwrap()]));
}

/// `rewind backup ... --json`: its summary.
fn backup(site: &Site, uri: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["backup", "--group", "vm1", "--disk", "d0", "--from", uri, "--json"];
    full.extend_from_slice(args);
    let out = site.cli(&full);
    assert!(out.status.success(), "rewind backup {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("backup --json");
    eprintln!("backup {args:?}: {v}");
    v
}

fn replay_backup(site: &Site, name: &str, disk: &str, out: &Path) {
    let o = site.cli(&["replay", "vm1", "--disk", disk, "--at-backup", name, "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "replay --at-backup {name}: {}", String::from_utf8_lossy(&o.stderr));
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn name(v: &serde_json::Value) -> String {
    v["name"].as_str().unwrap().to_string()
}

fn points(site: &Site) -> serde_json::Value {
    let out = site.cli(&["points", "vm1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The cycle a user runs: a qcow2 image with a bitmap, written by fio and
/// qemu-io; a full backup, then incrementals with bitmap rotation (the next
/// bitmap added before each backup, the one backed up removed after it).
/// Each backup's replay equals nbdcopy's copy of the source at that moment.
/// An unchanged disk's incremental stores nothing; a discarded range is
/// recorded as zeroes, not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incrementals_with_bitmap_rotation_replay_exactly() {
    let (site, dir, img) = fresh().await;
    let image = img.to_str().unwrap();
    qemu_img(&["bitmap", "--add", image, "b0"]);
    {
        let rw = serve(dir.path(), &img, true, None);
        fio_writes(&rw.uri, 32 * MIB, 12 * MIB, 1);
    }
    qemu_io(&img, &["write -P 0x5a 40M 3M", "write -z 48M 1M"]);

    let mut taken: Vec<(String, PathBuf)> = Vec::new();
    // The full backup; b1 records what changes from here on.
    qemu_img(&["bitmap", "--add", image, "b1"]);
    let full = {
        let src = serve(dir.path(), &img, false, None);
        let r = reference_path(dir.path(), 0);
        reference(&src, &r);
        let v = backup(&site, &src.uri, &["--full", "--name", "full-0"]);
        taken.push((name(&v), r));
        v
    };
    qemu_img(&["bitmap", "--remove", image, "b0"]);
    assert_eq!(full["mode"], "full");
    assert!(n(&full, "bytes_new") >= 15 * MIB, "the full backup sends what was written: {full}");
    assert!(n(&full, "bytes_read") < DISK - 16 * MIB, "unallocated extents are not read: {full}");
    // The 3 MiB of one repeated byte travel compressed; fio's random bytes do not shrink.
    assert!(n(&full, "bytes_wire") + 2 * MIB < n(&full, "bytes_sent"), "the blocks travel compressed: {full}");

    // Three incrementals: fio and qemu-io writes; no change at all; a
    // discard of half the disk.
    let rounds: [&dyn Fn(&QemuNbd); 3] = [
        &|rw: &QemuNbd| {
            fio_writes(&rw.uri, 64 * MIB, 4 * MIB, 2);
        },
        &|_: &QemuNbd| {},
        &|_: &QemuNbd| {},
    ];
    let mut summaries = Vec::new();
    for (i, write) in rounds.iter().enumerate() {
        let k = i + 1;
        {
            let rw = serve(dir.path(), &img, true, None);
            write(&rw);
        }
        match k {
            1 => qemu_io(&img, &["write -P 0x77 1M 256k"]),
            3 => qemu_io(&img, &["discard 0 32M"]),
            _ => {}
        }
        qemu_img(&["bitmap", "--add", image, &format!("b{}", k + 1)]);
        let src = serve(dir.path(), &img, false, Some(&format!("b{k}")));
        let r = reference_path(dir.path(), k);
        reference(&src, &r);
        let v = backup(&site, &src.uri, &["--bitmap", &format!("b{k}"), "--name", &format!("incr-{k}")]);
        drop(src);
        qemu_img(&["bitmap", "--remove", image, &format!("b{k}")]);
        assert_eq!(v["base"], taken.last().unwrap().0.as_str(), "an incremental names its parent");
        taken.push((name(&v), r));
        summaries.push(v);
    }
    // Round 1 changed about 4.25 MiB: only that is read.
    assert!(n(&summaries[0], "bytes_covered") < 8 * MIB, "{}", summaries[0]);
    // Round 2 changed nothing: nothing covered, nothing stored.
    assert_eq!((n(&summaries[1], "bytes_covered"), n(&summaries[1], "bytes_sent")), (0, 0), "{}", summaries[1]);
    // Round 3 discarded 32 MiB: recorded as zeroes, under 1 MiB stored.
    assert!(n(&summaries[2], "bytes_sent") < MIB, "{}", summaries[2]);
    assert!(n(&summaries[2], "bytes_zero") >= 16 * MIB, "{}", summaries[2]);

    // Every backup is a restore point equal to its reference.
    let p = points(&site);
    let listed: Vec<&str> = p["backups"].as_array().unwrap().iter().filter(|b| b["state"] == "committed").map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(listed, taken.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>());
    for (name, r) in &taken {
        let out = dir.path().join(format!("{name}.out"));
        replay_backup(&site, name, "d0", &out);
        compare(r, &out);
    }
}

/// A local site with an empty group "vm1", a folder, and a qcow2 image of
/// `DISK` bytes in it, never written.
async fn fresh() -> (Site, tempfile::TempDir, PathBuf) {
    let site = Site::up(&[]);
    site.client.create_group("vm1", vec![]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), &DISK.to_string()]);
    (site, dir, img)
}

fn reference_path(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("ref-{k}.raw"))
}

/// A full backup of a disk the tap journals sends almost nothing: its
/// blocks are the group's already. A group with a tap on one disk and
/// backups of another replays both as of the same point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backup_of_a_tapped_disk_sends_almost_nothing() {
    let site = Site::up(&[]);
    let disks = vec![rewind_wire::rpc::DiskSpec { name: "a".into(), size_bytes: DISK, sector_bytes: 512 }];
    site.client.create_group("vm1", disks).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("a.raw");
    std::fs::File::create(&backing).unwrap().set_len(DISK).unwrap();
    {
        let tap = common::start_tap(&site, "vm1", "a", &backing);
        fio_writes(&tap.uri, DISK, 24 * MIB, 3);
    }
    // The tap's backing file, as a qcow2 source (qemu-img convert keeps
    // the bytes; zero clusters become unallocated).
    let img = dir.path().join("a.qcow2");
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", backing.to_str().unwrap(), img.to_str().unwrap()]);
    let src = serve(dir.path(), &img, false, None);
    let mut full = vec!["backup", "--group", "vm1", "--disk", "a", "--from", &src.uri, "--json", "--full"];
    let out = site.cli(&full);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{v}");
    let read = n(&v, "bytes_read");
    assert!(read >= 16 * MIB, "{v}");
    assert!(n(&v, "bytes_sent") * 100 < read, "a full backup of a tapped disk sends under 1% of what it reads: {v}");
    // A clone of that disk as another disk of the group: its blocks lie
    // in disk a, so they travel as references, and read back the same.
    let out = site.cli(&["backup", "--group", "vm1", "--disk", "c", "--from", &src.uri, "--json", "--full", "--name", "clone"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{c}");
    assert!(n(&c, "bytes_referenced") >= 16 * MIB && n(&c, "bytes_sent") * 100 < n(&c, "bytes_read"), "a clone's blocks travel as references: {c}");
    let clone = dir.path().join("c.out");
    replay_backup(&site, "clone", "c", &clone);
    compare(&backing, &clone);

    // Disk b gets backups while disk a keeps its tap.
    let bimg = dir.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", bimg.to_str().unwrap(), "16M"]);
    qemu_io(&bimg, &["write -P 0x42 0 5M"]);
    let bsrc = serve(dir.path(), &bimg, false, None);
    full = vec!["backup", "--group", "vm1", "--disk", "b", "--from", &bsrc.uri, "--json", "--full", "--name", "b-1"];
    let out = site.cli(&full);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bref = dir.path().join("b.ref");
    reference(&bsrc, &bref);
    let a_then = dir.path().join("a.then");
    std::fs::copy(&backing, &a_then).unwrap();
    {
        let tap = common::start_tap(&site, "vm1", "a", &backing);
        fio_writes(&tap.uri, DISK, 2 * MIB, 4);
    }
    for (disk, want) in [("a", &a_then), ("b", &bref)] {
        let out = dir.path().join(format!("{disk}.out"));
        replay_backup(&site, "b-1", disk, &out);
        compare(want, &out);
    }
    // And the tap's later writes are in the latest point, not the backup's.
    let latest = dir.path().join("a.latest");
    let o = site.cli(&["replay", "vm1", "--disk", "a", "--latest", "--out", latest.to_str().unwrap()]);
    assert!(o.status.success());
    compare(&backing, &latest);
    drop(src);
}

/// A source that serves a raw file at `rate` (nbdkit's rate filter), so a
/// backup takes long enough to be cut off on purpose.
fn slow_source(dir: &Path, raw: &Path, rate: &str) -> QemuNbd {
    let socket = dir.join(format!("slow-{}.sock", rand_suffix()));
    let pid_file = dir.join(format!("slow-{}.pid", rand_suffix()));
    // Without -f, nbdkit returns once it serves.
    run(Command::new("nbdkit").args([
        "-P",
        pid_file.to_str().unwrap(),
        "-U",
        socket.to_str().unwrap(),
        "--filter=rate",
        "file",
        &format!("file={}", raw.display()),
        &format!("rate={rate}"),
    ]));
    // The daemon writes its pid file once it accepts connections.
    for _ in 0..1000 {
        if let Ok(pid) = std::fs::read_to_string(&pid_file).unwrap_or_default().trim().parse() {
            return QemuNbd { pid, uri: format!("nbd+unix:///?socket={}", socket.display()) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nbdkit wrote no pid file");
}

/// Starts `rewind backup` in the background; returns once the site shows
/// its backup open with more than `events` events after it began.
fn start_backup(site: &Site, uri: &str, name: &str, events: u64) -> Child {
    let config = site.config();
    let mut importer = Command::new(common::REWIND)
        .args(["backup", "--group", "vm1", "--disk", "d0", "--from", uri, "--full", "--name", name, "--json", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let begun = Instant::now();
    loop {
        let p = points(site);
        let last = p["window"]["last_lsn"].as_u64().unwrap_or(0);
        let open = p["backups"].as_array().unwrap().iter().find(|b| b["name"] == name && b["state"] == "open").map(|b| b["begin_lsn"].as_u64().unwrap());
        if open.is_some_and(|b| last > b + events) {
            return importer;
        }
        assert!(begun.elapsed() < Duration::from_secs(60), "the backup never got going: {p}");
        assert!(importer.try_wait().unwrap().is_none(), "the backup ended before it could be cut off");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The source killed mid-backup: the backup stays open, is no restore
/// point, and points inside it read the disk as before it; a rerun without
/// `--resume` is refused, with it completes the backup. A bitmap left
/// inconsistent by `kill -9` of a writing qemu-nbd gets the clear message
/// (exit 3), and `--fallback-full` sends only the changed bytes (and at
/// most a block per changed extent more). `--abort` drops an open backup
/// and reverts what it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_backup_resumes_and_an_inconsistent_bitmap_falls_back() {
    let (site, dir, img) = fresh().await;
    let image = img.to_str().unwrap();
    {
        let rw = serve(dir.path(), &img, true, None);
        fio_writes(&rw.uri, DISK, 48 * MIB, 5);
    }
    qemu_img(&["bitmap", "--add", image, "b1"]);
    let r0 = reference_path(dir.path(), 0);
    qemu_img(&["convert", "-q", "-f", "qcow2", "-O", "raw", image, r0.to_str().unwrap()]);

    // The source dies once the backup has sent a few batches.
    let slow = slow_source(dir.path(), &r0, "8M");
    let importer = start_backup(&site, &slow.uri, "full-0", 3);
    common::kill9(slow.pid);
    let out = importer.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "cut off: exit 4: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stays open") && err.contains("--resume"), "{err}");
    drop(slow);
    let p = points(&site);
    assert_eq!(p["backups"][0]["state"], "open", "{p}");
    let refused = site.cli(&["replay", "vm1", "--disk", "d0", "--at-backup", "full-0", "--out", dir.path().join("x").to_str().unwrap()]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("is open"), "{}", String::from_utf8_lossy(&refused.stderr));
    // The latest point reads the disk as before the backup: zeroes.
    let latest = dir.path().join("latest.raw");
    let o = site.cli(&["replay", "vm1", "--disk", "d0", "--latest", "--out", latest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let zeros = dir.path().join("zeros.raw");
    std::fs::File::create(&zeros).unwrap().set_len(DISK).unwrap();
    compare(&zeros, &latest);
    // Without --resume a new backup is refused; with it, it completes.
    let src = serve(dir.path(), &img, false, None);
    let again = site.cli(&["backup", "--group", "vm1", "--disk", "d0", "--from", &src.uri, "--full"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let v = backup(&site, &src.uri, &["--full", "--resume"]);
    assert_eq!((v["name"].as_str(), v["resumed"].as_bool()), (Some("full-0"), Some(true)));
    assert!(n(&v, "bytes_unchanged") > 0, "the resumed backup sends only what it had not: {v}");
    drop(src);
    replay_backup(&site, "full-0", "d0", &dir.path().join("full-0.out"));
    compare(&r0, &dir.path().join("full-0.out"));

    // kill -9 of a writing qemu-nbd leaves bitmap b1 inconsistent.
    {
        let rw = serve(dir.path(), &img, true, None);
        fio_writes(&rw.uri, DISK, 3 * MIB, 6);
        common::kill9(rw.pid);
    }
    let refused = try_serve(dir.path(), &img, false, Some("b1"));
    assert!(refused.is_err(), "qemu-nbd refuses an inconsistent bitmap");
    let src = serve(dir.path(), &img, false, None);
    let out = site.cli(&["backup", "--group", "vm1", "--disk", "d0", "--from", &src.uri, "--bitmap", "b1"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inconsistent") && err.contains("--fallback-full"), "{err}");
    let r1 = reference_path(dir.path(), 1);
    reference(&src, &r1);
    let v = backup(&site, &src.uri, &["--bitmap", "b1", "--fallback-full", "--name", "fallback-1"]);
    assert_eq!(v["mode"], "full (bitmap fallback)");
    // fio wrote 3 MiB in 64 KiB pieces: at most 48 extents.
    assert!(n(&v, "bytes_sent") <= 3 * MIB + 48 * 4096, "{v}");
    drop(src);
    replay_backup(&site, "fallback-1", "d0", &dir.path().join("fallback-1.out"));
    compare(&r1, &dir.path().join("fallback-1.out"));

    // An abort reverts what an open backup wrote.
    let r2 = reference_path(dir.path(), 2);
    std::fs::copy(&r1, &r2).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&r2).unwrap();
        f.write_all_at(&vec![0x99; 24 * MIB as usize], 0).unwrap();
    }
    let slow = slow_source(dir.path(), &r2, "8M");
    let mut importer = start_backup(&site, &slow.uri, "dropped", 2);
    common::kill9(importer.id());
    let _ = importer.wait();
    drop(slow);
    let o = site.cli(&["backup", "--group", "vm1", "--disk", "d0", "--abort"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
    let p = points(&site);
    assert!(p["backups"].as_array().unwrap().iter().any(|b| b["name"] == "dropped" && b["state"] == "aborted"), "{p}");
    let latest = dir.path().join("after-abort.raw");
    let o = site.cli(&["replay", "vm1", "--disk", "d0", "--latest", "--out", latest.to_str().unwrap()]);
    assert!(o.status.success());
    compare(&r1, &latest);
}

/// The README's hourly recipe, `ops/backup-image.sh`: the first run adds a
/// bitmap and takes a full backup; the next rotates the bitmap and backs
/// up only what changed; each replays equal to the image then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hourly_script_rotates_bitmaps() {
    let (site, dir, img) = fresh().await;
    let image = img.to_str().unwrap();
    qemu_io(&img, &["write -P 0x11 0 4M"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/backup-image.sh");
    let config = site.config();
    let state = dir.path().join("state");
    let hourly = || {
        run(Command::new("bash").arg(&script).env("REWIND", common::REWIND).args([
            "--image",
            image,
            "--group",
            "vm1",
            "--disk",
            "d0",
            "--config",
            config.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
        ]))
    };
    let mut taken = Vec::new();
    for round in 0..3 {
        if round > 0 {
            qemu_io(&img, &[&format!("write -P 0x{:x} {}M 1M", 0x20 + round, 8 * round)]);
        }
        let out = hourly();
        assert!(out.contains(if round == 0 { "(full)" } else { "(bitmap, incremental to" }), "{out}");
        let r = reference_path(dir.path(), round);
        qemu_img(&["convert", "-q", "-f", "qcow2", "-O", "raw", image, r.to_str().unwrap()]);
        taken.push(r);
    }
    let p = points(&site);
    let backups = p["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 3, "{p}");
    assert!(backups[1]["bytes"].as_u64().unwrap() <= 2 * MIB, "an incremental covers what changed: {p}");
    for (b, r) in backups.iter().zip(&taken) {
        let out = dir.path().join(format!("{}.raw", b["name"].as_str().unwrap()));
        replay_backup(&site, b["name"].as_str().unwrap(), "d0", &out);
        compare(r, &out);
    }
    let info = run(Command::new("qemu-img").args(["info", image]));
    assert!(info.contains("rewind-3") && !info.contains("rewind-2"), "one bitmap is kept, the next: {info}");
}

/// An `nbds://` source: qemu-nbd with x509 TLS credentials from the site's
/// CA, requiring a client certificate. The backup trusts the site's CA and
/// presents the client config's certificate by default; a plaintext
/// attempt and a wrong CA are clear errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nbds_source_with_tls_is_backed_up() {
    let (site, dir, img) = fresh().await;
    let certs = site.path().join("certs");
    let made = common::rewind(&["certs", "--dir", certs.to_str().unwrap(), "--name", "src", "--role", "reader", "--san", "127.0.0.1"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    for (from, to) in [("ca.pem", "ca-cert.pem"), ("src.pem", "server-cert.pem"), ("src.key", "server-key.pem")] {
        std::fs::copy(certs.join(from), creds.join(to)).unwrap();
    }
    qemu_io(&img, &["write -P 0x3c 0 6M", "write -P 0x4d 30M 2M"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pid_file = dir.path().join("tls.pid");
    run(Command::new("qemu-nbd").args([
        "--read-only",
        "-f",
        "qcow2",
        "--persistent",
        "--fork",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--object",
        &format!("tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on", creds.display()),
        "--tls-creds",
        "tls0",
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        img.to_str().unwrap(),
    ]));
    let _server = QemuNbd { pid: std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap(), uri: String::new() };
    let plain = site.cli(&["backup", "--group", "vm1", "--disk", "d0", "--from", &format!("nbd://127.0.0.1:{port}"), "--full"]);
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success() && err.contains("TLS is required"), "{err}");
    let wrong_ca = site.cli(&["backup", "--group", "vm1", "--disk", "d0", "--from", &format!("nbds://127.0.0.1:{port}"), "--full", "--tls-ca", dir.path().join("creds/server-cert.pem").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&wrong_ca.stderr);
    assert!(!wrong_ca.status.success() && err.contains("TLS"), "{err}");
    let v = backup(&site, &format!("nbds://127.0.0.1:{port}"), &["--full", "--name", "tls-full"]);
    assert_eq!(n(&v, "bytes_new"), 8 * MIB, "{v}");
    let reference = dir.path().join("ref.raw");
    qemu_img(&["convert", "-q", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), reference.to_str().unwrap()]);
    replay_backup(&site, "tls-full", "d0", &dir.path().join("out.raw"));
    compare(&reference, &dir.path().join("out.raw"));
}
