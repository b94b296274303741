//! Replay over the network while the faults run: production's replay
//! reader (`rewind_replay::read_bytes`, which asks for the disk in pieces and
//! checks each) reads a whole disk as of an acknowledged LSN from any node,
//! through the simulated network. The node answers with production's
//! request service (`ReadDisk`): it refuses an LSN it has not applied yet,
//! and otherwise sends the runs of the blocks its block index gives. The
//! bytes are checked against the byte model at the end of the seed
//! (`check::replays`).

use std::time::Duration;

use rewind_replay::{read_bytes, BlockSource, BoxFuture, Piece, SourceError};
use rewind_wire::rpc::{ErrorKind, Request, Response};

use crate::model::{Shared, DISKS, DISK_BYTES, GROUP, NODES, REPLAY_ADDR};
use crate::net::deliver;
use crate::rng::Rng;
use crate::{rt, service_of, world, Raft};

/// Bytes one read asks for (production's limit is larger; smaller pieces
/// make more messages to lose).
const PIECE_BYTES: u64 = 256 << 10;
const BLOCK: u64 = 4096;

/// One disk as of one LSN on one node.
struct SimSource {
    node: u64,
    disk: &'static str,
    lsn: u64,
}

/// A node's answer to a read, from production's request service.
async fn read_piece(raft: Raft, disk: &'static str, lsn: u64, offset: u64, len: u64) -> Result<Piece, SourceError> {
    let service = service_of(raft).map_err(SourceError::Unreachable)?;
    let request = Request::ReadDisk { group: GROUP.into(), disk: disk.into(), lsn, offset, len };
    match service.handle(request).await {
        Response::DiskPiece { len, runs } => Ok(Piece { len, runs }),
        Response::Error(e) if e.kind == ErrorKind::Internal => Err(SourceError::Damaged(e.message)),
        Response::Error(e) => Err(SourceError::Refused(e.message)),
        other => Err(SourceError::BadPiece(format!("unexpected reply {other:?}"))),
    }
}

impl BlockSource for SimSource {
    fn size(&self) -> u64 {
        DISK_BYTES
    }

    fn piece_bytes(&self) -> u64 {
        PIECE_BYTES
    }

    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Piece, SourceError>> {
        let (node, disk, lsn) = (self.node, self.disk, self.lsn);
        let call = move |raft: Raft, (offset, len): (u64, u64)| read_piece(raft, disk, lsn, offset, len);
        // The simulated network's futures stay on the executor's thread;
        // the reader gets a handle it can hold anywhere.
        let answer = rt::spawn_local(deliver(REPLAY_ADDR, node, "read-disk", (offset, len), Duration::from_secs(2), call));
        Box::pin(async move {
            match answer.await {
                Ok(Ok(piece)) => Ok(piece),
                Ok(Err(e)) => Err(SourceError::Refused(format!("node {node}: {e}"))),
                Err(e) => Err(SourceError::Unreachable(e.to_string())),
            }
        })
    }
}

/// A replay that came back whole: which disk, as of which LSN, from which
/// node, and a digest of each 4 KiB block.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub node: u64,
    pub disk: &'static str,
    pub lsn: u64,
    pub blocks: Vec<[u8; 32]>,
}

pub fn block_digests(bytes: &[u8]) -> Vec<[u8; 32]> {
    bytes.chunks(BLOCK as usize).map(|b| *blake3::hash(b).as_bytes()).collect()
}

/// Every 0.5-3 s of the fault window, replays a disk as of an acknowledged
/// LSN from a node picked at random. A refusal (not applied yet) or a read
/// lost on the network ends that replay; it is not retried.
pub async fn replayer(mut rng: Rng, end_ns: u64, history: Shared) {
    while rt::now_ns() < end_ns {
        rt::sleep(Duration::from_millis(rng.range(500, 3000))).await;
        let acked: Vec<u64> = history.borrow().acked.iter().map(|a| a.3).filter(|l| *l > 0).collect();
        if acked.is_empty() {
            continue;
        }
        let lsn = acked[rng.range(0, acked.len() as u64) as usize];
        let node = NODES[rng.range(0, NODES.len() as u64) as usize];
        let disk = DISKS[rng.range(0, DISKS.len() as u64) as usize];
        let source = SimSource { node, disk, lsn };
        match read_bytes(&source, 0, DISK_BYTES).await {
            Ok(bytes) => {
                world::trace(format!("replayed {disk} at LSN {lsn} from n{node}"));
                history.borrow_mut().replays.push(Replayed { node, disk, lsn, blocks: block_digests(&bytes) });
            }
            Err(e) => world::trace(format!("replay of {disk} at LSN {lsn} from n{node} failed: {e}")),
        }
    }
}
