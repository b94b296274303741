//! The NBD client against a real server: `qemu-nbd` serving a qcow2 image
//! with a persistent dirty bitmap, the way a backup reads its source. The
//! extents of `base:allocation` and of `qemu:dirty-bitmap:NAME`, and the
//! bytes read, must agree with what `qemu-io` wrote.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use rewind_nbd::client::{parse_uri, Client, Placed, STATE_DIRTY, STATE_HOLE, STATE_ZERO};

const MIB: u64 = 1 << 20;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(image: &Path, socket: &Path, bitmap: &str) -> Server {
    let child = Command::new("qemu-nbd")
        .args(["--read-only", "-f", "qcow2", "-x", "src", "-k", socket.to_str().unwrap(), "-B", bitmap, "--persistent", image.to_str().unwrap()])
        .spawn()
        .expect("qemu-nbd (apt-get install -y qemu-utils)");
    // At most 20 s, in 20 ms steps.
    for _ in 0..1000 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(socket.exists(), "qemu-nbd did not listen");
    Server(child)
}

/// Every extent of a context over the whole export.
async fn all_extents(c: &mut Client, context: u32) -> Vec<Placed> {
    let mut out: Vec<Placed> = Vec::new();
    let mut at = 0;
    while at < c.size {
        let got = c.block_status(context, at, (c.size - at).min(1 << 30) as u32).await.unwrap();
        at = got.last().map(|p| p.offset + p.len).unwrap();
        out.extend(got);
    }
    out
}

/// The byte ranges whose flags satisfy `keep`, merged.
fn ranges(extents: &[Placed], keep: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in extents.iter().filter(|e| keep(e.flags)) {
        match out.last_mut() {
            Some(last) if last.1 == e.offset => last.1 += e.len,
            _ => out.push((e.offset, e.offset + e.len)),
        }
    }
    out
}

#[tokio::test]
async fn qemu_nbd_extents_bitmaps_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("src.qcow2");
    let img = image.to_str().unwrap();
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", img, "64M"]));
    // Data before the bitmap exists: allocated, not dirty.
    run(Command::new("qemu-io").args(["-f", "qcow2", img, "-c", "write -P 0x11 0 2M"]));
    run(Command::new("qemu-img").args(["bitmap", "--add", img, "b0"]));
    // After it: dirty. A zeroed range reads as zeroes without data.
    run(Command::new("qemu-io").args(["-f", "qcow2", img, "-c", "write -P 0x22 8M 1M", "-c", "write -z 16M 2M", "-c", "write -P 0x33 1M 64k"]));

    let socket = dir.path().join("nbd.sock");
    let _server = serve(&image, &socket, "b0");
    let uri = parse_uri(&format!("nbd+unix:///src?socket={}", socket.display())).unwrap();
    let mut c = Client::connect(&uri, &["base:allocation", "qemu:dirty-bitmap:b0"], None).await.unwrap();
    assert_eq!(c.size, 64 * MIB);
    let alloc = c.context("base:allocation").expect("base:allocation agreed");
    let dirty = c.context("qemu:dirty-bitmap:b0").expect("the bitmap's context agreed");

    let a = all_extents(&mut c, alloc).await;
    assert_eq!(a.iter().map(|e| e.len).sum::<u64>(), 64 * MIB, "extents cover the disk once: {a:?}");
    let data = ranges(&a, |f| f & STATE_ZERO == 0);
    assert_eq!(data, vec![(0, 2 * MIB), (8 * MIB, 9 * MIB)], "data extents: {a:?}");
    let holes = ranges(&a, |f| f & STATE_HOLE != 0);
    assert!(holes.iter().any(|(s, e)| *s <= 32 * MIB && *e >= 40 * MIB), "a never-written range is a hole: {holes:?}");
    // The bitmap (64 KiB granularity by default) marks what came after it.
    let d = all_extents(&mut c, dirty).await;
    let dirty_ranges = ranges(&d, |f| f & STATE_DIRTY != 0);
    assert_eq!(dirty_ranges, vec![(MIB, MIB + 64 * 1024), (8 * MIB, 9 * MIB), (16 * MIB, 18 * MIB)], "dirty extents: {d:?}");

    // Reads: data, a hole's zeroes, and across the boundary.
    assert_eq!(c.read(8 * MIB, 4096).await.unwrap(), vec![0x22; 4096]);
    assert_eq!(c.read(40 * MIB, 65536).await.unwrap(), vec![0; 65536]);
    let across = c.read(MIB + 60 * 1024, 8192).await.unwrap();
    assert_eq!(&across[..4096], &[0x33; 4096][..]);
    assert_eq!(&across[4096..], &[0x11; 4096][..]);
    let whole = c.read(0, 32 << 20).await.unwrap();
    assert_eq!(whole.len(), 32 << 20);
    // Out of range is refused by the client before it asks.
    assert!(c.read(64 * MIB - 4096, 8192).await.is_err());
    c.disconnect().await.unwrap();

    // A bitmap that does not exist: the server agrees to no such context.
    let c = Client::connect(&uri, &["base:allocation", "qemu:dirty-bitmap:nope"], None).await.unwrap();
    assert!(c.context("qemu:dirty-bitmap:nope").is_none());
    // qemu-nbd serves one client at a time unless told otherwise.
    c.disconnect().await.unwrap();
    // A wrong export name is refused with the server's reason.
    let wrong = parse_uri(&format!("nbd+unix:///other?socket={}", socket.display())).unwrap();
    let e = Client::connect(&wrong, &[], None).await.err().expect("no such export");
    assert!(e.to_string().contains("refused export \"other\""), "{e}");
}
