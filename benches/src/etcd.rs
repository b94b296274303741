//! A peer for the ingest benchmark: a 3-node etcd cluster on 127.0.0.1
//! (Debian's `etcd-server`), written two ways: through its native gRPC API
//! (`etcdserverpb.KV/Put` over one HTTP/2 channel, the requests in flight
//! multiplexed on it, with tonic: the path etcd's own clients take), and
//! through its JSON gateway (`POST /v3/kv/put`, HTTP/1.1 keep-alive, one
//! connection per request in flight), which adds JSON and base64 work.
//! etcd fsyncs its WAL before it answers, so its acknowledgements are
//! durable like ours.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct EtcdNode {
    /// Stopped when the node is dropped.
    pub child: crate::Killed,
    pub port: u16,
}

pub fn server_version() -> Option<String> {
    let out = std::process::Command::new("etcd").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.replace("etcd Version: ", "etcd "))
}

/// Starts a 3-member cluster with its data under `dir`.
pub fn start_cluster(dir: &Path, free_port: impl Fn() -> anyhow::Result<u16>) -> anyhow::Result<Vec<EtcdNode>> {
    if server_version().is_none() {
        bail!("etcd is not installed: run `bash ops/setup-peers.sh` (Debian's etcd-server package)");
    }
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let cluster: Vec<String> = (0..3).map(|i| format!("e{}=http://127.0.0.1:{}", i + 1, peer[i])).collect();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let log = std::fs::File::create(dir.join(format!("e{}.log", i + 1)))?;
        let child = std::process::Command::new("etcd")
            .args([
                "--name",
                &format!("e{}", i + 1),
                "--data-dir",
                dir.join(format!("e{}", i + 1)).to_str().unwrap(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "rewind-bench",
                "--max-request-bytes",
                "10485760",
                "--quota-backend-bytes",
                "8589934592",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start etcd")?;
        nodes.push(EtcdNode { child: crate::Killed(child), port: client[i] });
    }
    Ok(nodes)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

/// One keep-alive HTTP/1.1 connection to the gateway.
struct Conn {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    async fn connect(port: u16) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port)).await.with_context(|| format!("connect to etcd on {port}"))?;
        s.set_nodelay(true)?;
        let (rd, wr) = s.into_split();
        Ok(Conn { rd: BufReader::new(rd), wr })
    }

    /// POSTs `body` to `path`; returns the status and the body.
    async fn post(&mut self, path: &str, body: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let head = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
        self.wr.write_all(head.as_bytes()).await?;
        self.wr.write_all(body.as_bytes()).await?;
        let mut line = String::new();
        self.rd.read_line(&mut line).await?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("bad status line {line:?}"))?;
        let (mut len, mut chunked) = (None, false);
        loop {
            line.clear();
            if self.rd.read_line(&mut line).await? == 0 {
                bail!("etcd closed the connection");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().ok();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.rd.read_line(&mut line).await?;
                let n = usize::from_str_radix(line.trim(), 16).with_context(|| format!("bad chunk size {line:?}"))?;
                let mut chunk = vec![0u8; n + 2];
                self.rd.read_exact(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
        } else {
            let n = len.context("a reply with neither length nor chunks")?;
            out.resize(n, 0);
            self.rd.read_exact(&mut out).await?;
        }
        Ok((status, out))
    }
}

/// Waits until a put through `port` succeeds (the cluster has a leader).
pub async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let r = async {
            let mut c = Conn::connect(port).await?;
            let body = format!("{{\"key\":\"{}\",\"value\":\"{}\"}}", base64(b"ready"), base64(b"1"));
            match c.post("/v3/kv/put", &body).await? {
                (200, _) => Ok(()),
                (s, b) => bail!("status {s}: {}", String::from_utf8_lossy(&b)),
            }
        }
        .await;
        match r {
            Ok(()) => return Ok(()),
            Err(_) if started.elapsed() < Duration::from_secs(60) => tokio::time::sleep(Duration::from_millis(300)).await,
            Err(e) => return Err(e.context("etcd did not become ready within 60 s")),
        }
    }
}

pub struct Put {
    pub records: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

/// Puts `records` values of `size` bytes (distinct keys), `window`
/// connections each with one request in flight, stopping after `time_max`.
pub async fn put(port: u16, size: usize, records: u64, window: usize, time_max: Duration) -> anyhow::Result<Put> {
    let value = Arc::new(base64(&(0..size).map(|i| (i as u8).wrapping_mul(29)).collect::<Vec<u8>>()));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..window.max(1) {
        let (value, next) = (value.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::connect(port).await?;
            let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let mut done = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= records || started.elapsed() >= time_max {
                    return Ok::<_, anyhow::Error>((done, h));
                }
                let body = format!("{{\"key\":\"{}\",\"value\":\"{value}\"}}", base64(format!("bench/{i:012}").as_bytes()));
                let t = Instant::now();
                match c.post("/v3/kv/put", &body).await? {
                    (200, _) => {}
                    (s, b) => bail!("etcd refused put {i}: status {s}: {}", String::from_utf8_lossy(&b)),
                }
                h.record((t.elapsed().as_micros() as u64).max(1)).ok();
                done += 1;
            }
        }));
    }
    gather(tasks, size, started).await
}

/// One writer task: the records it put and their latencies.
type Writer = tokio::task::JoinHandle<anyhow::Result<(u64, Histogram<u64>)>>;

/// Waits for the writers and adds up what they did.
async fn gather(tasks: Vec<Writer>, size: usize, started: Instant) -> anyhow::Result<Put> {
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut done = 0;
    for t in tasks {
        let (n, h) = t.await??;
        done += n;
        latency_us.add(&h).ok();
    }
    Ok(Put { records: done, bytes: done * size as u64, elapsed: started.elapsed(), latency_us })
}

/// etcd's `PutRequest` (api/etcdserverpb/rpc.proto): key = 1, value = 2;
/// the fields left out (lease, prev_kv, ignore_value, ignore_lease) are
/// their defaults.
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// etcd's `PutResponse`: its header (field 1) is not read.
#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

/// Puts `records` values of `size` bytes (distinct keys) through etcd's
/// gRPC API: one channel, `window` requests in flight on it, stopping
/// after `time_max`.
pub async fn put_grpc(port: u16, size: usize, records: u64, window: usize, time_max: Duration) -> anyhow::Result<Put> {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))?.connect().await.context("connecting to etcd's gRPC API")?;
    let value: Arc<Vec<u8>> = Arc::new((0..size).map(|i| (i as u8).wrapping_mul(29)).collect());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..window.max(1) {
        let (value, next) = (value.clone(), next.clone());
        let mut client = tonic::client::Grpc::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let mut done = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= records || started.elapsed() >= time_max {
                    return Ok::<_, anyhow::Error>((done, h));
                }
                let request = PutRequest { key: format!("bench/{i:012}").into_bytes(), value: value.to_vec() };
                let t = Instant::now();
                client.ready().await.map_err(|e| anyhow::anyhow!("etcd's gRPC channel: {e}"))?;
                let codec = tonic::codec::ProstCodec::<PutRequest, PutResponse>::default();
                let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
                client.unary(tonic::Request::new(request), path, codec).await.map_err(|s| anyhow::anyhow!("etcd refused put {i}: {s}"))?;
                h.record((t.elapsed().as_micros() as u64).max(1)).ok();
                done += 1;
            }
        }));
    }
    gather(tasks, size, started).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_rfc_examples() {
        for (plain, coded) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")] {
            assert_eq!(super::base64(plain.as_bytes()), coded);
        }
    }
}
