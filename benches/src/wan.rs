//! A WAN between two sites, in user space: a UDP relay on loopback that
//! holds every datagram for a one-way delay, drops a share of them, and
//! serialises them at a rate cap. This machine's kernel has no `sch_netem`,
//! so `tc` cannot add delay or random loss; QUIC runs over UDP, so a relay
//! in front of each node of the primary site gives the secondary's pulls
//! a long, fat, lossy path. Bounded: each direction queues at most
//! `QUEUE_MAX` datagrams (more are dropped, as a router's queue does).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Datagrams queued per direction at most.
const QUEUE_MAX: usize = 16384;

/// The link's shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) one_way: Duration,
    /// Share of datagrams dropped, 0..1.
    pub(crate) loss: f64,
    /// Bytes per second each direction carries at most.
    pub(crate) rate: u64,
}

/// One relay: datagrams to `addr` reach the target through the shape.
pub(crate) struct Relay {
    pub(crate) addr: SocketAddr,
    cut: Arc<AtomicBool>,
    pub(crate) bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Drops every datagram while cut.
    pub(crate) fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends what it is given after the shape's delay, in order, at its rate.
fn shaper(socket: Arc<UdpSocket>, shape: Shape, cut: Arc<AtomicBool>, bytes: Arc<AtomicU64>, seed: u64) -> mpsc::Sender<(Vec<u8>, SocketAddr)> {
    let (tx, mut rx) = mpsc::channel::<(Vec<u8>, SocketAddr, Instant)>(QUEUE_MAX);
    let (in_tx, mut in_rx) = mpsc::channel::<(Vec<u8>, SocketAddr)>(QUEUE_MAX);
    // Admission: loss, the rate's serialisation, then the delay.
    tokio::spawn(async move {
        let mut free_at = Instant::now();
        let mut x = seed | 1;
        while let Some((d, to)) = in_rx.recv().await {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if cut.load(Ordering::Relaxed) || (x % 1_000_000) as f64 / 1e6 < shape.loss {
                continue;
            }
            let now = Instant::now();
            free_at = free_at.max(now) + Duration::from_secs_f64(d.len() as f64 / shape.rate as f64);
            if free_at > now + Duration::from_millis(500) {
                // The queue behind the bottleneck is full: tail drop.
                free_at -= Duration::from_secs_f64(d.len() as f64 / shape.rate as f64);
                continue;
            }
            bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            if tx.try_send((d, to, free_at + shape.one_way)).is_err() {
                continue;
            }
        }
    });
    tokio::spawn(async move {
        while let Some((d, to, at)) = rx.recv().await {
            // The timer ticks by the millisecond: sleep only for datagrams
            // not due yet, so a burst that is due goes out at once.
            if at > Instant::now() + Duration::from_micros(500) {
                tokio::time::sleep_until(at.into()).await;
            }
            let _ = socket.send_to(&d, to).await;
        }
    });
    in_tx
}

/// Starts a relay on a free loopback port in front of `target`.
pub(crate) async fn relay(target: SocketAddr, shape: Shape, seed: u64) -> anyhow::Result<Relay> {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let addr = front.local_addr()?;
    let cut = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let to_clients = shaper(front.clone(), shape, cut.clone(), bytes.clone(), seed);
    let (cut2, bytes2) = (cut.clone(), bytes.clone());
    let task = tokio::spawn(async move {
        // One upstream socket per client, so replies find their way back.
        let mut upstream: HashMap<SocketAddr, mpsc::Sender<(Vec<u8>, SocketAddr)>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        let mut n_clients = 0u64;
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else { return };
            if !upstream.contains_key(&from) {
                if upstream.len() >= 256 {
                    continue;
                }
                let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                let up = Arc::new(up);
                n_clients += 1;
                let to_target = shaper(up.clone(), shape, cut2.clone(), bytes2.clone(), seed ^ n_clients);
                let back = to_clients.clone();
                let up2 = up.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok((n, _)) = up2.recv_from(&mut buf).await {
                        if back.send((buf[..n].to_vec(), from)).await.is_err() {
                            return;
                        }
                    }
                });
                upstream.insert(from, to_target);
            }
            let _ = upstream[&from].send((buf[..n].to_vec(), target)).await;
        }
    });
    Ok(Relay { addr, cut, bytes, task })
}
