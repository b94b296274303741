//! `backup`: `rewind backup` of a qcow2 image served by qemu-nbd (a full
//! backup of an image half random data and half never written, then an
//! incremental from its dirty bitmap after 5% of it was rewritten), beside
//! `nbdcopy` of the same source to a local file (the read limit) and
//! `restic backup` of the same bytes as a raw image.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use rewind_node::client::Client;
use rewind_node::config::ClientConfig;

use crate::harness::*;
use crate::Cli;

const MIB: u64 = 1 << 20;

/// A read-only qemu-nbd of `image` (with `bitmap`), stopped when dropped.
struct Served {
    pid: u32,
    uri: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        for _ in 0..500 {
            if unsafe { libc::kill(self.pid as i32, 0) } != 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn serve(dir: &Path, image: &Path, writable: bool, bitmap: Option<&str>) -> anyhow::Result<Served> {
    let sock = dir.join("src.sock");
    let pidf = dir.join("src.pid");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "qcow2", "--persistent", "-e", "4", "--fork", "--pid-file", pidf.to_str().unwrap(), "-k", sock.to_str().unwrap()]);
    if !writable {
        cmd.arg("--read-only");
    }
    if let Some(b) = bitmap {
        cmd.args(["-B", b]);
    }
    run_ok(cmd.arg(image)).context("qemu-nbd (install qemu-utils with ops/setup-debian.sh)")?;
    let pid = std::fs::read_to_string(&pidf)?.trim().parse()?;
    Ok(Served { pid, uri: format!("nbd+unix:///?socket={}", sock.display()) })
}

/// Seconds nbdcopy takes to copy the source to a local sparse file.
fn nbdcopy_s(uri: &str, out: &Path) -> anyhow::Result<f64> {
    let _ = std::fs::remove_file(out);
    let started = Instant::now();
    run_ok(Command::new("nbdcopy").args([uri, out.to_str().unwrap()])).context("nbdcopy (install libnbd-bin)")?;
    let s = started.elapsed().as_secs_f64();
    std::fs::remove_file(out)?;
    Ok(s)
}

/// `rewind backup --json`, timed.
fn rewind_backup(client: &Path, uri: &str, args: &[&str]) -> anyhow::Result<(f64, serde_json::Value)> {
    let started = Instant::now();
    let out = run_ok(Command::new(rewind_binary()?).args(["backup", "--group", "bench", "--disk", "d0", "--from", uri, "--json", "--config", client.to_str().unwrap()]).args(args))?;
    Ok((started.elapsed().as_secs_f64(), serde_json::from_slice(&out.stdout)?))
}

/// restic: (seconds, bytes the repository grew by) for one backup.
fn restic_backup(repo: &Path, file: &Path) -> anyhow::Result<(f64, u64)> {
    let restic = |args: &[&str]| -> anyhow::Result<()> {
        run_ok(Command::new("restic").args(["--repo", repo.to_str().unwrap(), "--quiet", "--no-cache"]).args(args).env("RESTIC_PASSWORD", "rewind-bench"))
            .context("restic (install it with `bash ops/setup-peers.sh`)")?;
        Ok(())
    };
    if !repo.exists() {
        restic(&["init"])?;
    }
    let before = dir_bytes(repo)?;
    let started = Instant::now();
    restic(&["backup", file.to_str().unwrap()])?;
    let s = started.elapsed().as_secs_f64();
    Ok((s, dir_bytes(repo)? - before))
}

fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() { dir_bytes(&e.path())? } else { m.len() };
    }
    Ok(total)
}

/// Writes `bytes` of random data in 1 MiB pieces, every other MiB of the
/// first `2 * bytes` of a raw file of `size` (the rest never written).
fn half_random(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; MIB as usize];
    for i in (0..size / MIB).step_by(2) {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        f.write_all_at(&buf, i * MIB)?;
    }
    Ok(())
}

pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let size: u64 = if cli.smoke { 64 * MIB } else { 1 << 30 };
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let dir = work.path().join("site");
    let client_path = one_disk_site(&dir, size).await?;
    let result = async {
        let _client = Client::new(&ClientConfig::load(&client_path)?)?;
        let w = work.path();
        let raw = w.join("src.raw");
        let img = w.join("src.qcow2");
        half_random(&raw, size, 7)?;
        run_ok(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), img.to_str().unwrap()]))?;
        run_ok(Command::new("qemu-img").args(["bitmap", "--add", img.to_str().unwrap(), "b1"]))?;
        let repo = w.join("restic-repo");
        let copy = w.join("copy.raw");

        // Full.
        let (full_copy_s, (full_s, full), (restic_full_s, restic_full)) = {
            let src = serve(w, &img, false, None)?;
            let c = nbdcopy_s(&src.uri, &copy)?;
            let r = rewind_backup(&client_path, &src.uri, &["--full", "--name", "full"])?;
            drop(src);
            (c, r, restic_backup(&repo, &raw)?)
        };
        eprintln!("backup: full {full}");

        // 5% rewritten with random data (fio through qemu-nbd), recorded by b1.
        {
            let rw = serve(w, &img, true, None)?;
            run_ok(Command::new("fio").args([
                "--name=guest",
                "--ioengine=nbd",
                &format!("--uri={}", rw.uri),
                "--rw=randwrite",
                "--bs=64k",
                &format!("--size={size}"),
                &format!("--io_size={}", size / 20),
                "--randseed=11",
                "--refill_buffers",
                "--iodepth=8",
                "--end_fsync=1",
            ]))
            .context("fio (install it with ops/setup-debian.sh)")?;
        }
        run_ok(Command::new("qemu-img").args(["convert", "-q", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]))?;
        let (incr_copy_s, (incr_s, incr), (restic_incr_s, restic_incr)) = {
            let src = serve(w, &img, false, Some("b1"))?;
            let c = nbdcopy_s(&src.uri, &copy)?;
            let r = rewind_backup(&client_path, &src.uri, &["--bitmap", "b1", "--name", "incr"])?;
            drop(src);
            (c, r, restic_backup(&repo, &raw)?)
        };
        eprintln!("backup: incremental {incr}");
        // And the same full backup again, of the changed image: every block
        // read, only the changed ones sent.
        let (again_s, again) = {
            let src = serve(w, &img, false, None)?;
            rewind_backup(&client_path, &src.uri, &["--full", "--name", "full-again"])?
        };

        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0) as f64;
        let mb = |b: f64, s: f64| b / 1e6 / s.max(1e-9);
        let mut lines = vec![
            format!("## backup: a {} MiB qcow2 image, half random data (1 MiB pieces) and half never written, served read-only by qemu-nbd on a Unix socket; a local 3-node site; one run each\n", size >> 20),
            "Read limit: `nbdcopy` of the same source to a local sparse file (it reads the allocated extents; MB/s of the disk's size). restic: `restic backup` of the same bytes as a raw file into a local repository (zstd `auto`, content-defined chunks), which reads the whole file each time.\n".into(),
            "| backup | rewind s | rewind MB/s read (of allocated) | rewind MB/s of the disk | rewind speed ÷ nbdcopy | bytes read MiB | bytes new (stored) MiB | on the wire MiB | dedupe: read ÷ new | compression: new ÷ wire | nbdcopy s | restic s | restic repository growth MiB | rewind stored ÷ restic |".into(),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".into(),
        ];
        let row = |name: &str, s: f64, v: &serde_json::Value, copy_s: f64, restic: Option<(f64, u64)>| {
            let (read, new, wire) = (n(v, "bytes_read"), n(v, "bytes_sent"), n(v, "bytes_wire"));
            format!(
                "| {name} | {s:.2} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} |",
                mb(read, s),
                mb(size as f64, s),
                copy_s / s.max(1e-9),
                read / MIB as f64,
                new / MIB as f64,
                wire / MIB as f64,
                if new > 0.0 { format!("{:.1}", read / new) } else { "all known".into() },
                if wire > 0.0 { format!("{:.2}", new / wire) } else { "-".into() },
                if copy_s > 0.0 { format!("{copy_s:.2}") } else { "-".into() },
                restic.map_or("-".into(), |(s, _)| format!("{s:.2}")),
                restic.map_or("-".into(), |(_, b)| format!("{:.1}", b as f64 / MIB as f64)),
                restic.map_or("-".into(), |(_, b)| format!("{:.2}", new / (b as f64).max(1.0))),
            )
        };
        lines.push(row("full", full_s, &full, full_copy_s, Some((restic_full_s, restic_full))));
        lines.push(row("incremental, 5% rewritten (dirty bitmap)", incr_s, &incr, incr_copy_s, Some((restic_incr_s, restic_incr))));
        lines.push(row("full again after the 5% (every block compared)", again_s, &again, full_copy_s, None));
        lines.push(String::new());
        lines.push("The blocks travel zstd-compressed (level 1) and are stored as sent, uncompressed; the random data here does not compress. rewind's stored bytes are the payload of the events (each replica holds them, written about three times by today's store: issue \"History store v2\").".into());
        out.record("backup.full.mb_s_read", mb(n(&full, "bytes_read"), full_s));
        out.record("backup.full.vs_nbdcopy", full_copy_s / full_s.max(1e-9));
        out.record("backup.incr.mb_s_read", mb(n(&incr, "bytes_read"), incr_s));
        out.emit(&lines.join("\n"));
        anyhow::Ok(())
    }
    .await;
    rewind_node::dev::down(&dir, true)?;
    result
}
