//! A peer for the ingest benchmark: a 3-node NATS JetStream cluster on
//! 127.0.0.1 (Debian's `nats-server`), a replicas=3 file-storage stream, and
//! a minimal client of NATS's text protocol that publishes with
//! acknowledgements (PubAck) and keeps a window of publishes in flight.
//! Only what the benchmark needs; it is not a general NATS client.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// One nats-server process, killed when dropped.
pub struct NatsNode {
    /// Stopped when the node is dropped.
    pub child: crate::Killed,
    pub port: u16,
}

pub fn server_version() -> Option<String> {
    let out = std::process::Command::new("nats-server").arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Starts a 3-node JetStream cluster with its data under `dir`.
pub fn start_cluster(dir: &Path, free_port: impl Fn() -> anyhow::Result<u16>) -> anyhow::Result<Vec<NatsNode>> {
    if server_version().is_none() {
        bail!("nats-server is not installed: run `bash ops/setup-peers.sh` (Debian's nats-server package)");
    }
    let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let routes: Vec<String> = route_ports.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let store: PathBuf = dir.join(format!("n{}", i + 1));
        std::fs::create_dir_all(&store)?;
        let conf = format!(
            "server_name: n{n}\nlisten: 127.0.0.1:{cp}\nmax_payload: 4194304\njetstream {{ store_dir: \"{store}\", max_memory_store: 268435456, max_file_store: 17179869184 }}\ncluster {{ name: bench, listen: 127.0.0.1:{rp}, routes: [{routes}] }}\n",
            n = i + 1,
            cp = client_ports[i],
            store = store.display(),
            rp = route_ports[i],
            routes = routes.join(", ")
        );
        let path = dir.join(format!("n{}.conf", i + 1));
        std::fs::write(&path, conf)?;
        let log = std::fs::File::create(dir.join(format!("n{}.log", i + 1)))?;
        let child = std::process::Command::new("nats-server")
            .args(["-c", path.to_str().unwrap()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start nats-server")?;
        nodes.push(NatsNode { child: crate::Killed(child), port: client_ports[i] });
    }
    Ok(nodes)
}

/// A connection speaking just enough NATS to publish with acks.
pub struct Conn {
    writer: tokio::net::tcp::OwnedWriteHalf,
    /// Replies to our inbox: (token, payload).
    replies: mpsc::Receiver<(u64, Vec<u8>)>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

const INBOX: &str = "_INBOX.bench";

impl Conn {
    pub async fn connect(port: u16) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.with_context(|| format!("connect to nats on {port}"))?;
        stream.set_nodelay(true)?;
        let (rd, mut writer) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut info = String::new();
        rd.read_line(&mut info).await?;
        if !info.starts_with("INFO ") {
            bail!("nats said {info:?}, not INFO");
        }
        writer.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n").await?;
        writer.write_all(format!("SUB {INBOX}.* 1\r\nPING\r\n").as_bytes()).await?;
        let (tx, replies) = mpsc::channel(4096);
        let (pong_tx, mut pong_rx) = mpsc::channel(1);
        let reader = tokio::spawn(async move {
            let mut line = String::new();
            let mut first_pong = Some(pong_tx);
            loop {
                line.clear();
                if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.first().copied() {
                    Some("MSG") => {
                        // MSG <subject> <sid> [reply] <bytes>
                        let len: usize = words.last().and_then(|w| w.parse().ok()).unwrap_or(0);
                        let mut payload = vec![0u8; len + 2];
                        if rd.read_exact(&mut payload).await.is_err() {
                            return;
                        }
                        payload.truncate(len);
                        let token = words.get(1).and_then(|s| s.rsplit('.').next()).and_then(|t| t.parse().ok()).unwrap_or(u64::MAX);
                        if tx.send((token, payload)).await.is_err() {
                            return;
                        }
                    }
                    Some("PONG") => {
                        if let Some(t) = first_pong.take() {
                            let _ = t.send(()).await;
                        }
                    }
                    Some("PING") => {
                        // Answered by the writer side through the reply channel.
                        let _ = tx.send((u64::MAX - 1, Vec::new())).await;
                    }
                    Some("-ERR") => {
                        let _ = tx.send((u64::MAX, line.clone().into_bytes())).await;
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), pong_rx.recv()).await.context("nats did not answer PING")?;
        Ok(Conn { writer, replies, reader })
    }

    async fn publish(&mut self, subject: &str, token: u64, payload: &[u8]) -> anyhow::Result<()> {
        let head = format!("PUB {subject} {INBOX}.{token} {}\r\n", payload.len());
        self.writer.write_all(head.as_bytes()).await?;
        self.writer.write_all(payload).await?;
        self.writer.write_all(b"\r\n").await?;
        Ok(())
    }

    /// The next reply; answers server PINGs on the way.
    async fn reply(&mut self, within: Duration) -> anyhow::Result<(u64, Vec<u8>)> {
        loop {
            let r = tokio::time::timeout(within, self.replies.recv()).await.context("no reply from nats")?.context("nats closed the connection")?;
            match r.0 {
                t if t == u64::MAX - 1 => self.writer.write_all(b"PONG\r\n").await?,
                u64::MAX => bail!("nats: {}", String::from_utf8_lossy(&r.1).trim()),
                _ => return Ok(r),
            }
        }
    }

    /// A JetStream API request; returns the JSON reply.
    async fn request(&mut self, subject: &str, body: &str, token: u64) -> anyhow::Result<serde_json::Value> {
        self.publish(subject, token, body.as_bytes()).await?;
        let (t, payload) = self.reply(Duration::from_secs(10)).await?;
        if t != token {
            bail!("reply to {t} while waiting for {token}");
        }
        Ok(serde_json::from_slice(&payload)?)
    }
}

/// Creates the replicas=3 file stream `BENCH` on subjects `bench.>`,
/// retrying while the cluster elects its meta leader.
pub async fn create_stream(port: u16) -> anyhow::Result<()> {
    let config = r#"{"name":"BENCH","subjects":["bench.>"],"storage":"file","num_replicas":3,"retention":"limits","discard":"old","max_msg_size":4194304}"#;
    let started = Instant::now();
    let mut token = 1u64 << 40;
    loop {
        let attempt = async {
            let mut c = Conn::connect(port).await?;
            token += 1;
            let reply = c.request("$JS.API.STREAM.CREATE.BENCH", config, token).await?;
            match reply.get("error") {
                None => Ok(()),
                Some(e) => bail!("{e}"),
            }
        }
        .await;
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                tracing::debug!("stream not created yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context("create the JetStream stream")),
        }
    }
}

pub struct Published {
    pub records: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

/// Publishes `records` records of `size` bytes (stopping early after
/// `time_max`) with `window` in flight, each acknowledged by JetStream.
pub async fn publish(port: u16, size: usize, records: u64, window: usize, time_max: Duration) -> anyhow::Result<Published> {
    let mut c = Conn::connect(port).await?;
    let payload: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31)).collect();
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let started = Instant::now();
    let (mut next, mut acked) = (0u64, 0u64);
    while acked < next || (next < records && started.elapsed() < time_max) {
        while next < records && sent_at.len() < window && started.elapsed() < time_max {
            c.publish(&format!("bench.{}", next % 16), next, &payload).await?;
            sent_at.insert(next, Instant::now());
            next += 1;
        }
        let (token, reply) = c.reply(Duration::from_secs(30)).await?;
        let at = sent_at.remove(&token).with_context(|| format!("an ack for {token}, which is not in flight"))?;
        let v: serde_json::Value = serde_json::from_slice(&reply)?;
        if let Some(e) = v.get("error") {
            bail!("JetStream refused record {token}: {e}");
        }
        latency_us.record((at.elapsed().as_micros() as u64).max(1)).ok();
        acked += 1;
    }
    Ok(Published { records: acked, bytes: acked * size as u64, elapsed: started.elapsed(), latency_us })
}
