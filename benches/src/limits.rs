//! `limits`: the machine's own ceilings (durable writes, O_DIRECT reads,
//! QUIC on loopback), measured in the same run as our figures.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use crate::harness::*;
use crate::Cli;

/// Sends `bytes` over one QUIC stream between two endpoints on 127.0.0.1
/// with rewind's TLS (mutual, from a fresh site CA) and transport settings;
/// returns MB/s as the receiver saw it.
pub(crate) async fn quinn_loopback(dir: &Path, bytes: u64) -> anyhow::Result<f64> {
    use rewind_node::config::TlsFiles;
    rewind_node::tls::make_ca(dir, "ca")?;
    use rewind_service::access::Access;
    rewind_node::tls::make_leaf(dir, "server", &rewind_node::tls::LeafSpec::loopback(Access::Node, 1))?;
    rewind_node::tls::make_leaf(dir, "client", &rewind_node::tls::LeafSpec::loopback(Access::Node, 1))?;
    let files = |name: &str| TlsFiles { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
    let server = quinn::Endpoint::server(rewind_node::tls::server_config(&files("server"))?, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let client = rewind_node::transport::client_endpoint(&addr.into(), rewind_node::tls::client_config(&files("client"))?)?;
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut recv = conn.accept_uni().await?;
        let started = Instant::now();
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        while let Some(n) = recv.read(&mut buf).await? {
            got += n as u64;
        }
        let secs = started.elapsed().as_secs_f64();
        conn.close(0u32.into(), b"done");
        Ok::<_, anyhow::Error>(got as f64 / 1e6 / secs)
    });
    let conn = client.connect(addr, "localhost")?.await?;
    let mut send = conn.open_uni().await?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut sent = 0u64;
    while sent < bytes {
        send.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    send.finish()?;
    let mb_s = receiver.await??;
    client.wait_idle().await;
    Ok(mb_s)
}

pub(crate) async fn run(cli: &Cli, out: &mut Report) -> anyhow::Result<()> {
    let seconds = if cli.smoke { 1 } else { 5 };
    let work = tempfile::Builder::new().prefix("rewind-bench-").tempdir_in(std::env::var("REWIND_BENCH_DIR").unwrap_or("/var/tmp".into()))?;
    let file = work.path().join("limit.dat");
    let mut lines = vec![
        format!("## limits: this machine's ceilings, measured in the same run (fio {seconds} s per row on the benchmark folder's file system; quinn over loopback)
"),
        "| measure | MB/s | IOPS | what it bounds |".into(),
        "|---|---|---|---|".into(),
    ];
    for bs in ["4k", "64k", "1m"] {
        eprintln!("limits: fio write {bs} with fdatasync after each");
        let (mb, iops) = fio_file(&file, "write", bs, &["--fdatasync=1"], seconds)?;
        out.record(&format!("limit.fdatasync.{bs}"), mb);
        lines.push(format!("| sequential write {bs}, fdatasync after each | {mb:.1} | {iops:.0} | a durable write at queue depth 1 (log, journal) |"));
    }
    eprintln!("limits: fio O_DIRECT read 1m");
    // Lay the file out first, so the reads hit the disk, not holes.
    fio_file(&file, "write", "1m", &["--end_fsync=1", "--time_based=0", "--runtime=0"], seconds).ok();
    let (mb, iops) = fio_file(&file, "read", "1m", &["--direct=1"], seconds)?;
    out.record("limit.direct_read", mb);
    lines.push(format!("| sequential read 1m, O_DIRECT | {mb:.1} | {iops:.0} | replay reading the store cold |"));
    std::fs::remove_file(&file).ok();
    eprintln!("limits: quinn loopback");
    let bytes = if cli.smoke { 64u64 << 20 } else { 2u64 << 30 };
    let mb = quinn_loopback(work.path(), bytes).await?;
    out.record("limit.quic", mb);
    lines.push(format!("| QUIC over loopback, one stream, rewind's TLS and windows ({} MiB) | {mb:.1} | | every byte between nodes, and replay's reads |", bytes >> 20));
    out.emit(&lines.join("\n"));
    Ok(())
}
