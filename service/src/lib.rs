//! A node's request handling, one home for both of its shells: `node`'s
//! QUIC server and the simulation's network call the same [`Service`], so a
//! bug in dispatch, in the append path or in a read is a bug the
//! simulation can find.
//!
//! The service is generic over openraft's type config and state machine
//! and over [`ReadState`], the applied state it reads ([`ServiceTypes`]
//! names the three). It handles what clients ask of a node: appends
//! (submitted to Raft in arrival order, answered once committed and
//! applied), group creation, group state, events, producer state, restore
//! points, target resolution (LSN, time, bookmark, latest), disk reads as
//! of an LSN, and membership changes with their guards.
//!
//! Invariants kept here:
//! * an append is answered `Appended` only with the LSN range its entry got
//!   once committed and applied;
//! * a read that must see every acknowledged write (`on_leader`, producer
//!   state) runs on the leader after a linearizable read index;
//! * a disk is read only as of an LSN this replica has applied;
//! * every error is typed ([`ServiceError`]) and becomes one `RpcError`.
//!
//! This crate never opens a socket, a file or a clock of its own; Raft's
//! own RPCs, snapshots, node status and tap reports stay with the shell.

pub mod access;
pub mod dr;

use std::collections::{BTreeMap, BTreeSet};

use openraft::alias::{OneshotReceiverOf, WriteResponderOf};
use openraft::async_runtime::WatchReceiver;
use openraft::errors::RaftError;
use openraft::raft::ClientWriteResult;
use openraft::storage::RaftStateMachine;
use openraft::type_config::TypeConfigExt;
use openraft::{BasicNode, Instant, RaftTypeConfig};
use rewind_raft_store::apply::GroupRecord;
use rewind_raft_store::ReadState;
use rewind_wire::event::EventBatch;
use rewind_wire::raft::{Command, CommandReply, Member};
use rewind_wire::rpc::{BackupState, BookmarkInfo, ErrorKind, GroupState, PointsInfo, Request, Response, RpcError, Target};
use rewind_wire::timefmt::format_time_ns;

/// Where a write's result arrives.
pub type WriteReceiver<C> = OneshotReceiverOf<C, ClientWriteResult<C>>;

/// The three types a service runs over.
pub trait ServiceTypes: Send + Sync + Sized + 'static {
    type C: RaftTypeConfig<D = Command, R = CommandReply, NodeId = u64, Node = BasicNode>;
    type SM: RaftStateMachine<Self::C>;
    type Read: ReadState;
    /// A responder for one write and the receiver of its result.
    fn responder() -> (WriteResponderOf<Self::C>, WriteReceiver<Self::C>);
    /// The site's clock (nanoseconds since the Unix epoch): what a lock's
    /// end and a new event's time are checked against.
    fn wall_ns() -> u64;
}

pub type RaftOf<T> = openraft::Raft<<T as ServiceTypes>::C, <T as ServiceTypes>::SM>;

/// Why a request was not done; each becomes one `RpcError` of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// Malformed, or over a limit: retrying will not help.
    #[error("{0}")]
    BadRequest(String),
    /// Not the leader; `leader` is the one this node knows of.
    #[error("{message}")]
    NotLeader { message: String, leader: Option<Member> },
    /// The state machine or the site's rules refuse it.
    #[error("{0}")]
    Refused(String),
    /// Not now (no quorum, not applied yet, shutting down): retry.
    #[error("{0}")]
    Unavailable(String),
    /// The node failed (a read error, a damaged record).
    #[error("{0}")]
    Internal(String),
}

impl From<access::Denied> for ServiceError {
    fn from(d: access::Denied) -> ServiceError {
        ServiceError::Refused(d.to_string())
    }
}

impl From<ServiceError> for Response {
    fn from(e: ServiceError) -> Response {
        let (kind, message, leader) = match e {
            ServiceError::BadRequest(m) => (ErrorKind::BadRequest, m, None),
            ServiceError::NotLeader { message, leader } => (ErrorKind::NotLeader, message, leader),
            ServiceError::Refused(m) => (ErrorKind::Refused, m, None),
            ServiceError::Unavailable(m) => (ErrorKind::Unavailable, m, None),
            ServiceError::Internal(m) => (ErrorKind::Internal, m, None),
        };
        Response::Error(RpcError { kind, message, leader })
    }
}

/// The client's answer for a state machine's reply.
pub fn reply_response(reply: CommandReply) -> Response {
    match reply {
        CommandReply::Created => Response::Done,
        CommandReply::Appended { lsn_first, lsn_last } => Response::Appended { lsn_first, lsn_last },
        CommandReply::Refused { reason } => ServiceError::Refused(reason).into(),
        CommandReply::OutOfOrder { expected_seq } => ServiceError::Unavailable(format!("out of order: resend from sequence {expected_seq}")).into(),
    }
}

/// A group's retention as a client sees it, from its records here.
pub fn retention_info(g: &GroupRecord, r: &rewind_raft_store::retention::RetentionRecord, gc: &rewind_raft_store::gc::GcRecord) -> rewind_wire::rpc::RetentionInfo {
    rewind_wire::rpc::RetentionInfo {
        keep_ns: r.keep_ns,
        keep_bytes: r.keep_bytes,
        lock_until_ns: r.lock_until_ns,
        window_bytes: r.window_bytes(g),
        gc_debt_bytes: gc.debt(r),
        freed_bytes: gc.collected_bytes,
        rewritten_bytes: gc.rewritten_bytes,
        stored_bytes: (g.payload_bytes + gc.rewritten_bytes).saturating_sub(gc.collected_bytes + gc.rewritten_freed_bytes),
    }
}

/// A group's state as a client sees it.
pub fn group_state(g: &GroupRecord, retention: rewind_wire::rpc::RetentionInfo) -> GroupState {
    GroupState {
        retention,
        name: g.name.clone(),
        last_lsn: g.last_lsn,
        digest_hex: blake3::Hash::from_bytes(g.digest).to_hex().to_string(),
        disks: g.disks.clone(),
        events: g.events,
        payload_bytes: g.payload_bytes,
    }
}

/// A batch handed to Raft, or an answer known at once.
pub enum PendingAppend<T: ServiceTypes> {
    Ready(Response),
    Waiting { rx: WriteReceiver<T::C>, started: openraft::alias::InstantOf<T::C>, bytes: u64 },
}

/// One shard replica's request handling.
pub struct Service<T: ServiceTypes> {
    /// This node's id.
    pub id: u64,
    pub raft: RaftOf<T>,
    pub reader: T::Read,
}

impl<T: ServiceTypes> Clone for Service<T> {
    fn clone(&self) -> Self {
        Service { id: self.id, raft: self.raft.clone(), reader: self.reader.clone() }
    }
}

/// Known bugs the simulation puts back to show it finds them. Built only
/// with the `simulation-bugs` feature; every switch is off unless set.
#[cfg(feature = "simulation-bugs")]
pub mod bugs {
    use std::sync::atomic::AtomicBool;

    /// A node serves a disk read at an LSN it has not applied yet: the
    /// check `ReadDisk` makes is skipped, so it answers with the disk as of
    /// what it has applied.
    pub static REPLAY_BEFORE_APPLIED: AtomicBool = AtomicBool::new(false);
    /// The fork search answers one LSN past the last shared one: a
    /// failback keeps the first diverged event in the group.
    pub static FORK_ONE_LATE: AtomicBool = AtomicBool::new(false);
    /// DR's hashes-first shipping fills a block the secondary already
    /// holds in one sector off.
    pub static DEDUPE_FILL_ASKEW: AtomicBool = AtomicBool::new(false);
}

fn no_group(group: &str) -> ServiceError {
    ServiceError::Refused(format!("no consistency group {group:?}"))
}

/// The refusal for a disk a group does not have, naming the ones it has.
pub fn no_disk(group: &str, disk: &str, g: &[rewind_wire::rpc::DiskSpec]) -> String {
    format!("group {group:?} has no disk {disk:?} (it has: {})", g.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "))
}

impl<T: ServiceTypes> Service<T> {
    pub fn new(id: u64, raft: RaftOf<T>, reader: T::Read) -> Service<T> {
        Service { id, raft, reader }
    }

    /// Handles one client request. Raft's own RPCs, snapshots, appends
    /// (see [`Service::submit_append`]), status and tap reports belong to
    /// the shell and are refused here.
    pub async fn handle(&self, request: Request) -> Response {
        self.try_handle(request).await.unwrap_or_else(Response::from)
    }

    async fn try_handle(&self, request: Request) -> Result<Response, ServiceError> {
        match request {
            Request::CreateGroup { group, disks, time_ns } => self.write(Command::CreateGroup { group, disks, time_ns }).await,
            Request::DeleteGroup { group } => self.write(Command::DeleteGroup { group, time_ns: T::wall_ns() }).await,
            Request::GroupState { group } => self.group_state(group).await,
            Request::ReadEvents { group, lsn_first, count_max } => self.read_events(group, lsn_first, count_max).await,
            Request::ProducerState { group, client_id } => self.producer_state(group, client_id).await,
            Request::Points { group, on_leader } => {
                self.leader_read(on_leader).await?;
                self.points(group).await
            }
            Request::Resolve { group, target, on_leader } => {
                self.leader_read(on_leader).await?;
                self.resolve(group, target).await
            }
            Request::ReadDisk { group, disk, lsn, offset, len } => self.read_disk(group, disk, lsn, offset, len).await,
            Request::Backups { group, on_leader } => {
                self.leader_read(on_leader).await?;
                let internal = self.internal();
                self.read(move |r| {
                    r.group(&group).map_err(&internal)?.ok_or_else(|| no_group(&group))?;
                    Ok(Response::Backups(r.backups(&group, rewind_wire::limits::BACKUPS_LISTED_MAX).map_err(&internal)?))
                })
                .await
            }
            Request::BlockHashes { group, disk, lsn, block_first, count } => self.block_hashes(group, disk, lsn, block_first, count).await,
            Request::FindBlocks { group, hashes, lsn } => {
                use rewind_wire::limits::FIND_BLOCKS_MAX;
                if hashes.is_empty() || !hashes.len().is_multiple_of(32) || hashes.len() / 32 > FIND_BLOCKS_MAX {
                    return Err(ServiceError::BadRequest(format!("{} bytes of hashes; 1..={FIND_BLOCKS_MAX} hashes of 32 bytes", hashes.len())));
                }
                let id = self.id;
                let internal = self.internal();
                self.read(move |r| {
                    let g = r.group(&group).map_err(&internal)?.ok_or_else(|| no_group(&group))?;
                    if lsn > g.last_lsn {
                        return Err(ServiceError::Unavailable(format!("node {id} has applied group {group:?} to LSN {}, not yet {lsn}", g.last_lsn)));
                    }
                    let first = r.retention(&group).map_err(&internal)?.first();
                    let hashes: Vec<[u8; 32]> = hashes.chunks_exact(32).map(|h| h.try_into().expect("32 bytes")).collect();
                    Ok(Response::Found(r.locate_blocks(&group, &hashes, first).map_err(&internal)?))
                })
                .await
            }
            Request::DrState { group, digest_at } => {
                self.leader_read(true).await?;
                self.dr_state(group, digest_at).await
            }
            Request::Ship { group, lsn_first } => {
                self.leader_read(true).await?;
                self.ship(group, lsn_first).await
            }
            Request::ShipHashed { group, lsn_first } => {
                self.leader_read(true).await?;
                self.read(move |r| Ok(Response::HashedShipment(Box::new(dr::hashed_shipment(&r, &group, lsn_first)?)))).await
            }
            Request::ShipBlocks { group, wanted } => {
                // The blocks are of committed events the secondary was
                // shipped, so this replica's applied state holds them once
                // it is the leader's.
                self.leader_read(true).await?;
                self.read(move |r| Ok(Response::Blocks(dr::ship_blocks(&r, &group, &wanted)?))).await
            }
            Request::DrSet { group, record } => {
                record.check().map_err(|e| ServiceError::BadRequest(e.to_string()))?;
                self.write(Command::DrSet { group, record }).await
            }
            Request::DrSwitch { group, from_epoch, to } => self.dr_switch(group, from_epoch, to).await,
            Request::DrFork { group, branch, fork_lsn } => self.write(Command::Fork { group, branch, fork_lsn }).await.map(|r| match r {
                Response::Done => Response::Appended { lsn_first: fork_lsn + 1, lsn_last: fork_lsn },
                other => other,
            }),
            Request::ClusterInit { members } => self.init(members).await,
            Request::AddLearner { member } => self.add_learner(member).await,
            Request::ChangeVoters { voters } => self.change_voters(voters).await,
            Request::RemoveLearner { id } => self.remove_learner(id).await,
            Request::Append { .. } => Err(ServiceError::BadRequest("appends travel on their own stream".into())),
            Request::SnapshotChunk { .. } => Err(ServiceError::BadRequest("snapshot chunk without a snapshot header".into())),
            other => Err(ServiceError::BadRequest(format!("node {} serves {} in its transport, not here", self.id, other.name()))),
        }
    }

    fn leader_hint(&self, leader: Option<u64>) -> Option<Member> {
        let leader = leader?;
        let m = self.raft.metrics().borrow_watched().membership_config.clone();
        m.membership().get_node(&leader).map(|n| Member { id: leader, addr: n.addr.clone() })
    }

    /// The error for a failed write or read index: NotLeader with a hint
    /// when Raft says to forward, else by how bad it is.
    pub fn write_error<E>(&self, e: RaftError<T::C, E>) -> ServiceError
    where
        E: std::fmt::Display + std::fmt::Debug + openraft::TryAsRef<openraft::errors::ForwardToLeader<T::C>>,
    {
        if let Some(f) = e.forward_to_leader() {
            return ServiceError::NotLeader { message: format!("node {} is not the leader", self.id), leader: self.leader_hint(f.leader_id) };
        }
        match e {
            RaftError::APIError(e) => ServiceError::Unavailable(e.to_string()),
            RaftError::Fatal(e) => ServiceError::Internal(e.to_string()),
        }
    }

    async fn write(&self, command: Command) -> Result<Response, ServiceError> {
        let r = self.raft.client_write(command).await.map_err(|e| self.write_error(e))?;
        Ok(reply_response(r.data))
    }

    /// Validates a batch and hands it to Raft without waiting for the
    /// commit. Call it in stream order: a producer's batches enter the log
    /// in the order they are submitted.
    pub async fn submit_append(&self, batch: EventBatch) -> PendingAppend<T> {
        if let Err(e) = batch.check() {
            return PendingAppend::Ready(ServiceError::BadRequest(e.to_string()).into());
        }
        if let Err(why) = check_times(&batch, T::wall_ns()) {
            return PendingAppend::Ready(ServiceError::BadRequest(why).into());
        }
        let bytes = batch.payload_bytes() as u64;
        let (responder, rx) = T::responder();
        match self.raft.client_write_ff(Command::Append(batch), Some(responder)).await {
            Ok(()) => PendingAppend::Waiting { rx, started: T::C::now(), bytes },
            Err(fatal) => PendingAppend::Ready(ServiceError::Internal(fatal.to_string()).into()),
        }
    }

    /// The reply to one submitted batch, once Raft has answered.
    pub async fn finish_append(&self, pending: PendingAppend<T>) -> Response {
        let (rx, started, bytes) = match pending {
            PendingAppend::Ready(r) => return r,
            PendingAppend::Waiting { rx, started, bytes } => (rx, started, bytes),
        };
        let Ok(result) = rx.await else {
            return ServiceError::Unavailable("raft stopped before answering; resend".into()).into();
        };
        match result {
            Ok(r) => {
                let response = reply_response(r.data);
                if matches!(response, Response::Appended { .. }) {
                    metrics::histogram!("rewind_commit_latency_seconds").record(started.elapsed().as_secs_f64());
                    metrics::counter!("rewind_ingested_bytes_total").increment(bytes);
                }
                response
            }
            Err(e) => self.write_error(RaftError::APIError(e)).into(),
        }
    }

    /// For a read that must reflect every acknowledged write: refuses on a
    /// follower (with the leader's address), and on the leader waits until
    /// everything committed before the read is applied.
    pub async fn leader_read(&self, on_leader: bool) -> Result<(), ServiceError> {
        if !on_leader {
            return Ok(());
        }
        self.raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex).await.map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// Runs a read of the applied state where blocking is allowed.
    async fn read<R: Send + 'static>(&self, f: impl FnOnce(T::Read) -> Result<R, ServiceError> + Send + 'static) -> Result<R, ServiceError> {
        self.reader.clone().run_blocking(f).await.map_err(|e| ServiceError::Internal(e.to_string()))?
    }

    fn internal(&self) -> impl Fn(std::io::Error) -> ServiceError + Send + 'static {
        let id = self.id;
        move |e| ServiceError::Internal(format!("node {id}: {e}"))
    }

    async fn group_state(&self, group: String) -> Result<Response, ServiceError> {
        let internal = self.internal();
        self.read(move |r| match r.group(&group).map_err(&internal)? {
            Some(g) => {
                let info = retention_info(&g, &r.retention(&group).map_err(&internal)?, &r.gc(&group).map_err(&internal)?);
                Ok(Response::Group(group_state(&g, info)))
            }
            None => Err(no_group(&group)),
        })
        .await
    }

    async fn read_events(&self, group: String, lsn_first: u64, count_max: u32) -> Result<Response, ServiceError> {
        use rewind_wire::limits::{READ_EVENTS_BYTES_MAX, READ_EVENTS_MAX};
        let count = (count_max as usize).clamp(1, READ_EVENTS_MAX);
        let internal = self.internal();
        self.read(move |r| Ok(Response::Events(r.events(&group, lsn_first, count, READ_EVENTS_BYTES_MAX).map_err(internal)?))).await
    }

    async fn producer_state(&self, group: String, client_id: u64) -> Result<Response, ServiceError> {
        self.leader_read(true).await?;
        let internal = self.internal();
        self.read(move |r| Ok(Response::Producer { last_seq: r.producer(client_id, &group).map_err(internal)?.map_or(0, |p| p.last_seq) })).await
    }

    async fn points(&self, group: String) -> Result<Response, ServiceError> {
        let internal = self.internal();
        self.read(move |r| {
            let g = r.group(&group).map_err(&internal)?.ok_or_else(|| no_group(&group))?;
            let retention = r.retention(&group).map_err(&internal)?;
            let (first_lsn, first_time_ns, last_time_ns) = if g.last_lsn == 0 {
                (0, 0, 0)
            } else {
                let first = retention.first();
                (first, r.time_of(&group, first).map_err(&internal)?.unwrap_or(retention.first_time_ns), g.last_time_ns)
            };
            let mut bookmarks: Vec<BookmarkInfo> = r
                .bookmarks(&group, rewind_wire::limits::POINTS_BOOKMARKS_MAX)
                .map_err(&internal)?
                .into_iter()
                .filter(|b| retention.keeps(b.lsn))
                .map(|b| {
                    let keep_until_ns = retention.pins.iter().find(|p| p.name == b.name && p.lsn == b.lsn).map_or(0, |p| p.until_ns);
                    BookmarkInfo { name: b.name, lsn: b.lsn, time_ns: b.time_ns, app_consistent: b.app_consistent, keep_until_ns }
                })
                .collect();
            bookmarks.reverse();
            let info = retention_info(&g, &retention, &r.gc(&group).map_err(&internal)?);
            Ok(Response::Points(PointsInfo { group, first_lsn, last_lsn: g.last_lsn, first_time_ns, last_time_ns, bookmarks, disks: g.disks, retention: info }))
        })
        .await
    }

    async fn resolve(&self, group: String, target: Target) -> Result<Response, ServiceError> {
        let id = self.id;
        let leads = self.raft.metrics().borrow_watched().current_leader == Some(id);
        let internal = self.internal();
        self.read(move |r| {
            let g = r.group(&group).map_err(&internal)?.ok_or_else(|| no_group(&group))?;
            let lsn = resolve_lsn(&r, &g, &target, leads, id).map_err(|e| match e {
                Resolve::Io(e) => internal(e),
                Resolve::Refused(m) => ServiceError::Refused(m),
                Resolve::NotApplied(m) => ServiceError::Unavailable(m),
            })?;
            let time_ns = r.time_of(&group, lsn).map_err(&internal)?.unwrap_or(0);
            Ok(Response::Resolved { lsn, time_ns })
        })
        .await
    }

    async fn read_disk(&self, group: String, disk: String, lsn: u64, offset: u64, len: u64) -> Result<Response, ServiceError> {
        use rewind_wire::limits::READ_DISK_BYTES_MAX;
        if len == 0 || len > READ_DISK_BYTES_MAX {
            return Err(ServiceError::BadRequest(format!("read of {len} bytes; 1..={READ_DISK_BYTES_MAX} per request")));
        }
        let id = self.id;
        let internal = self.internal();
        self.read(move |r| {
            let g = r.group(&group).map_err(&internal)?.ok_or_else(|| no_group(&group))?;
            let spec = g.disks.iter().find(|d| d.name == disk).ok_or_else(|| ServiceError::Refused(no_disk(&group, &disk, &g.disks)))?;
            #[cfg(feature = "simulation-bugs")]
            let skip = bugs::REPLAY_BEFORE_APPLIED.load(std::sync::atomic::Ordering::Relaxed);
            #[cfg(not(feature = "simulation-bugs"))]
            let skip = false;
            if lsn > g.last_lsn && !skip {
                return Err(ServiceError::Unavailable(format!("node {id} has applied group {group:?} to LSN {}, not yet {lsn}", g.last_lsn)));
            }
            if offset.checked_add(len).is_none_or(|end| end > spec.size_bytes) {
                return Err(ServiceError::BadRequest(format!("range {offset}+{len} is past the end of disk {disk:?} ({} bytes)", spec.size_bytes)));
            }
            // A point inside a backup of this disk reads it as of the
            // backup's start: a half-imported backup is never visible.
            let backups = r.backups(&group, usize::MAX).map_err(&internal)?;
            let at = rewind_raft_store::backups::read_lsn(&backups, &disk, lsn);
            if at != lsn && !r.retention(&group).map_err(&internal)?.keeps(at) {
                return Err(ServiceError::Refused(format!(
                    "LSN {lsn} lies inside a backup of disk {disk:?} that began at LSN {at}, before the window of group {group:?}: the disk as of then is released"
                )));
            }
            let runs = r.read_disk(&group, &disk, at, offset, len).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    return ServiceError::Refused(e.to_string());
                }
                tracing::error!("read of disk {disk:?} in group {group:?} at LSN {lsn} failed: {e}");
                internal(e)
            })?;
            Ok(Response::DiskPiece { len, runs })
        })
        .await
    }

    /// Block hashes of a disk for a backup's importer (`lsn` 0: the newest,
    /// after a linearizable read, so every acknowledged write is in them).
    async fn block_hashes(&self, group: String, disk: String, lsn: u64, first: u64, count: u32) -> Result<Response, ServiceError> {
        use rewind_wire::limits::BLOCK_HASHES_MAX;
        if count == 0 || count > BLOCK_HASHES_MAX {
            return Err(ServiceError::BadRequest(format!("hashes of {count} blocks; 1..={BLOCK_HASHES_MAX} per request")));
        }
        if lsn == 0 {
            self.leader_read(true).await?;
        }
        let id = self.id;
        let internal = self.internal();
        self.read(move |r| {
            let g = r.group(&group).map_err(&internal)?.ok_or_else(|| no_group(&group))?;
            let spec = g.disks.iter().find(|d| d.name == disk).ok_or_else(|| ServiceError::Refused(no_disk(&group, &disk, &g.disks)))?;
            let at = if lsn == 0 { g.last_lsn } else { lsn };
            if at > g.last_lsn {
                return Err(ServiceError::Unavailable(format!("node {id} has applied group {group:?} to LSN {}, not yet {at}", g.last_lsn)));
            }
            let blocks = spec.size_bytes.div_ceil(rewind_raft_store::blocks::BLOCK_BYTES);
            if first.checked_add(u64::from(count)).is_none_or(|end| end > blocks) {
                return Err(ServiceError::BadRequest(format!("blocks {first}+{count} are past the end of disk {disk:?} ({blocks} blocks of 4 KiB)")));
            }
            if at > 0 && !r.retention(&group).map_err(&internal)?.keeps(at) {
                return Err(ServiceError::Refused(format!("LSN {at} is outside the window of group {group:?}")));
            }
            let hashes = r.block_hashes(&group, &disk, at, first, u64::from(count)).map_err(&internal)?;
            Ok(Response::BlockHashes { lsn: at, hashes: hashes.concat() })
        })
        .await
    }

    /// A group's DR state and head here; `peer` is left for the shell,
    /// which knows what its DR loop saw.
    async fn dr_state(&self, group: String, digest_at: Option<u64>) -> Result<Response, ServiceError> {
        self.read(move |r| Ok(Response::Dr(Box::new(dr::dr_info(&r, &group, digest_at)?)))).await
    }

    /// Makes `to` the group's primary in the epoch after `from_epoch`.
    async fn dr_switch(&self, group: String, from_epoch: u64, to: String) -> Result<Response, ServiceError> {
        self.leader_read(true).await?;
        let internal = self.internal();
        let g = group.clone();
        let record = self.read(move |r| r.dr(&g).map_err(internal)).await?;
        let record = record.ok_or_else(|| ServiceError::Refused(format!("group {group:?} is not linked to another site")))?;
        if record.epoch != from_epoch {
            return Err(ServiceError::Refused(format!(
                "group {group:?} is at epoch {} (primary {:?}), not {from_epoch}: another failover or switchover came first",
                record.epoch, record.primary
            )));
        }
        if to != record.local && to != record.remote {
            return Err(ServiceError::BadRequest(format!("site {to:?} is neither end of group {group:?}'s link ({:?}, {:?})", record.local, record.remote)));
        }
        let next = rewind_wire::dr::DrRecord { primary: to, epoch: from_epoch + 1, ..record };
        self.write(Command::DrSet { group, record: next }).await
    }

    /// The group's committed events from `lsn_first` on, for the other
    /// site (the caller made a read index first).
    async fn ship(&self, group: String, lsn_first: u64) -> Result<Response, ServiceError> {
        self.read(move |r| Ok(Response::Shipped(Box::new(dr::shipment(&r, &group, lsn_first)?)))).await
    }

    async fn init(&self, members: Vec<Member>) -> Result<Response, ServiceError> {
        let nodes: BTreeMap<u64, BasicNode> = members.iter().map(|m| (m.id, BasicNode { addr: m.addr.clone() })).collect();
        self.raft.initialize(nodes).await.map_err(|e| ServiceError::Refused(format!("initialize: {e}")))?;
        Ok(Response::Done)
    }

    /// Refuses a membership change this node must not start now.
    fn membership_guard(&self) -> Result<(), ServiceError> {
        let m = self.raft.metrics().borrow_watched().clone();
        match rewind_raft_store::membership_change_refusal(&m) {
            Some(why) => Err(ServiceError::NotLeader { message: why, leader: None }),
            None => Ok(()),
        }
    }

    async fn add_learner(&self, member: Member) -> Result<Response, ServiceError> {
        // A node's address is where its peers dial it: one that does not
        // parse would be retried forever.
        if let Err(e) = rewind_wire::addr::HostPort::parse(&member.addr) {
            return Err(ServiceError::BadRequest(format!("node {}: {e}", member.id)));
        }
        self.membership_guard()?;
        self.raft.add_learner(member.id, BasicNode { addr: member.addr }, true).await.map_err(|e| self.write_error(e))?;
        Ok(Response::Done)
    }

    async fn remove_learner(&self, id: u64) -> Result<Response, ServiceError> {
        self.membership_guard()?;
        let m = self.raft.metrics().borrow_watched().membership_config.clone();
        let membership = m.membership();
        if membership.voter_ids().any(|v| v == id) {
            return Err(ServiceError::Refused(format!("node {id} is a voter, not a learner: change the voters to remove it")));
        }
        if !membership.learner_ids().any(|l| l == id) {
            return Err(ServiceError::Refused(format!("node {id} is not a member of the site")));
        }
        let change = openraft::ChangeMembers::RemoveNodes(BTreeSet::from([id]));
        self.raft.change_membership(change, false).await.map_err(|e| self.write_error(e))?;
        Ok(Response::Done)
    }

    async fn change_voters(&self, voters: Vec<u64>) -> Result<Response, ServiceError> {
        if voters.is_empty() {
            return Err(ServiceError::BadRequest("a site needs at least one voter".into()));
        }
        let voters: BTreeSet<u64> = voters.into_iter().collect();
        self.membership_guard()?;
        let m = self.raft.metrics().borrow_watched().clone();
        if let Some(to) = rewind_raft_store::self_removal_handover(&m, &voters) {
            // Hand leadership over first; the client follows the hint and
            // the next leader makes the change.
            self.raft.trigger().transfer_leader(to).await.map_err(|e| ServiceError::Internal(e.to_string()))?;
            return Err(ServiceError::NotLeader {
                message: format!("node {} leads and is leaving the voters: it hands leadership to node {to}, which makes the change", self.id),
                leader: self.leader_hint(Some(to)),
            });
        }
        self.raft.change_membership(voters, false).await.map_err(|e| self.write_error(e))?;
        Ok(Response::Done)
    }
}

enum Resolve {
    Io(std::io::Error),
    Refused(String),
    NotApplied(String),
}

impl From<std::io::Error> for Resolve {
    fn from(e: std::io::Error) -> Resolve {
        Resolve::Io(e)
    }
}

/// Refuses a batch with an event time too far ahead of the site's clock
/// (it would move a retention window and a lock's end early), and a
/// policy event whose time is far from it either way.
fn check_times(batch: &EventBatch, wall_ns: u64) -> Result<(), String> {
    use rewind_wire::limits::{EVENT_TIME_AHEAD_MAX_NS, POLICY_TIME_SKEW_MAX_NS};
    for e in &batch.events {
        if e.time_ns > wall_ns.saturating_add(EVENT_TIME_AHEAD_MAX_NS) {
            return Err(format!(
                "event time {} is {} s ahead of the site's clock ({}); check the sender's clock",
                format_time_ns(e.time_ns),
                (e.time_ns - wall_ns) / 1_000_000_000,
                format_time_ns(wall_ns)
            ));
        }
        if e.event.is_policy() && e.time_ns.abs_diff(wall_ns) > POLICY_TIME_SKEW_MAX_NS {
            return Err(format!(
                "a retention, lock or pin event must carry the current time; {} is {} s from the site's clock ({})",
                format_time_ns(e.time_ns),
                e.time_ns.abs_diff(wall_ns) / 1_000_000_000,
                format_time_ns(wall_ns)
            ));
        }
    }
    Ok(())
}

/// The LSN a target names in group `g` on this replica. `leads`: this node
/// leads, so an LSN beyond its log is beyond the site's.
fn resolve_lsn<R: ReadState>(r: &R, g: &GroupRecord, target: &Target, leads: bool, id: u64) -> Result<u64, Resolve> {
    let retention = r.retention(&g.name)?;
    let lsn = resolve_in_log(r, g, target, leads, id, retention.first())?;
    if lsn > 0 && !retention.keeps(lsn) {
        let what = match target {
            Target::TimeNs(t) => format!("time {} (LSN {lsn})", format_time_ns(*t)),
            Target::Bookmark(b) => format!("bookmark {b:?} (LSN {lsn}, not pinned)"),
            Target::Backup(b) => format!("backup {b:?} (LSN {lsn})"),
            _ => format!("LSN {lsn}"),
        };
        return Err(Resolve::Refused(retention.outside(&g.name, lsn, g.last_lsn).replacen(&format!("LSN {lsn}"), &what, 1)));
    }
    Ok(lsn)
}

fn resolve_in_log<R: ReadState>(r: &R, g: &GroupRecord, target: &Target, leads: bool, id: u64, first: u64) -> Result<u64, Resolve> {
    let group = &g.name;
    let window = if g.last_lsn == 0 { "it has no events yet".to_string() } else { format!("its window is LSN {first}..={}", g.last_lsn) };
    Ok(match target {
        Target::Latest if g.last_lsn == 0 => return Err(Resolve::Refused(format!("group {group:?} has no events yet"))),
        Target::Latest => g.last_lsn,
        Target::Lsn(0) => return Err(Resolve::Refused(format!("LSNs start at 1; {window}"))),
        Target::Lsn(n) if *n > g.last_lsn && leads => return Err(Resolve::Refused(format!("LSN {n} is beyond the log of group {group:?} ({window})"))),
        Target::Lsn(n) if *n > g.last_lsn => {
            return Err(Resolve::NotApplied(format!("LSN {n} is beyond what node {id} has applied of group {group:?} ({window})")))
        }
        Target::Lsn(n) => *n,
        Target::TimeNs(t) => match r.lsn_at_time(group, *t)? {
            Some(l) => l,
            None => {
                let first = if g.last_lsn > 0 { r.time_of(group, first)? } else { None };
                return Err(Resolve::Refused(match first {
                    Some(f) => format!("time {} is before the window of group {group:?}: its first event is at {} ({window})", format_time_ns(*t), format_time_ns(f)),
                    None => format!("group {group:?} has no events yet"),
                }));
            }
        },
        Target::Backup(name) => {
            let backups = r.backups(group, usize::MAX)?;
            match backups.iter().find(|b| &b.name == name) {
                Some(b) if b.state == BackupState::Committed => b.end_lsn,
                Some(b) if b.state == BackupState::Open => {
                    return Err(Resolve::Refused(format!("backup {name:?} of group {group:?} is open (since LSN {}): it is a restore point only once it commits (resume it with `rewind backup --resume`)", b.begin_lsn)))
                }
                Some(b) => return Err(Resolve::Refused(format!("backup {name:?} of group {group:?} was aborted at LSN {}: it is no restore point", b.end_lsn))),
                None => return Err(Resolve::Refused(format!("group {group:?} has no backup {name:?} ({} backups; see `rewind points {group}`)", backups.len()))),
            }
        }
        Target::Bookmark(name) => {
            let marks = r.bookmarks(group, usize::MAX)?;
            match marks.iter().rev().find(|b| &b.name == name) {
                Some(b) => b.lsn,
                None => return Err(Resolve::Refused(format!("group {group:?} has no bookmark {name:?} ({} bookmarks; see `rewind points {group}`)", marks.len()))),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use rewind_wire::event::{Event, EventBatch, TimedEvent};

    fn batch(time_ns: u64, event: Event) -> EventBatch {
        EventBatch { group: "g".into(), client_id: 1, seq: 1, events: vec![TimedEvent { time_ns, event }] }
    }

    /// An event time far ahead of the site's clock would move a retention
    /// window (and a lock's end) early; a policy event must carry now.
    #[test]
    fn event_times_ahead_of_the_clock_and_stale_policy_events_are_refused() {
        let now = 1_000_000_000_000_000_000u64;
        let s = 1_000_000_000u64;
        let write = || Event::Write { disk: "d".into(), offset: 0, data: vec![1] };
        assert!(super::check_times(&batch(now + 299 * s, write()), now).is_ok());
        assert!(super::check_times(&batch(now + 301 * s, write()), now).unwrap_err().contains("ahead of the site's clock"));
        assert!(super::check_times(&batch(now - 3600 * s, write()), now).is_ok(), "an async tap ships old events");
        let lock = || Event::Lock { until_ns: now + 3600 * s };
        assert!(super::check_times(&batch(now - 30 * s, lock()), now).is_ok());
        assert!(super::check_times(&batch(now - 120 * s, lock()), now).unwrap_err().contains("must carry the current time"));
    }
}
