//! Named upper bounds on everything that can arrive from outside.

/// Largest frame body (after the header) a peer may send. Raft append
/// requests are cut by bytes to stay under it.
pub const FRAME_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Largest payload of one event batch (one Raft entry), summed over its events.
pub const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Most events in one batch.
pub const BATCH_EVENTS_MAX: usize = 16 * 1024;

/// Largest single write payload. Larger guest writes are split by the client.
pub const WRITE_BYTES_MAX: usize = 1024 * 1024;

/// Longest consistency-group, disk, bookmark or backup name.
pub const NAME_BYTES_MAX: usize = 64;

/// Most disks in one consistency group.
pub const GROUP_DISKS_MAX: usize = 256;

/// Largest snapshot chunk sent in one frame.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Largest disk size, 64 TiB.
pub const DISK_BYTES_MAX: u64 = 64 << 40;

/// Most events one read-events reply carries.
pub const READ_EVENTS_MAX: usize = 4096;

/// Most payload bytes one read-events reply carries (at least one event is
/// always returned).
pub const READ_EVENTS_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Batches one producer may have in flight; the state machine remembers the
/// replies of this many recent sequence numbers per producer.
pub const PRODUCER_WINDOW_MAX: usize = 256;

/// Longest refusal reason kept in a producer's reply window.
pub const REASON_BYTES_MAX: usize = 256;

/// Most disk bytes one read-disk reply carries.
pub const READ_DISK_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Most bookmarks a group keeps pinned at once.
pub const PINS_MAX: usize = 256;

/// How far ahead of the site's clock an event's time may be: a later time
/// would move a retention window (and a lock's end) early.
pub const EVENT_TIME_AHEAD_MAX_NS: u64 = 300 * 1_000_000_000;

/// How far a policy event's time (retention, lock, pin) may be from the
/// site's clock, either way.
pub const POLICY_TIME_SKEW_MAX_NS: u64 = 60 * 1_000_000_000;

/// Most events one apply moves a group's window over, and most events
/// (and payload bytes) one collector step frees.
pub const WINDOW_STEP_EVENTS_MAX: u64 = 4096;
pub const GC_STEP_EVENTS_MAX: usize = 256;
pub const GC_STEP_BYTES_MAX: u64 = 4 << 20;

/// Most bookmarks one points reply lists (the newest).
pub const POINTS_BOOKMARKS_MAX: usize = 1000;

/// Bytes of group states one status reply carries at most, well inside a
/// frame; the rest are counted, not sent (`rewind points GROUP` has each).
pub const STATUS_GROUPS_BYTES_MAX: usize = 8 << 20;

/// Most 4 KiB blocks one revert event covers (32 MiB of disk, and at most
/// that much materialised when it applies): a failover to a past point
/// sends one event per range.
pub const REVERT_BLOCKS_MAX: u64 = 8192;
/// Blocks one `BlockHashes` request asks for (32 MiB of disk, 256 KiB of
/// hashes).
pub const BLOCK_HASHES_MAX: u32 = 8192;
/// Blocks one `Copy` event copies (4 MiB of disk, 16 KiB of pairs).
pub const COPY_BLOCKS_MAX: usize = 1024;
/// Hashes one `FindBlocks` request asks about.
pub const FIND_BLOCKS_MAX: usize = 8192;
/// Backups one `Backups` reply lists (the newest ones).
pub const BACKUPS_LISTED_MAX: usize = 4096;

/// Most node addresses a DR link names for its peer site.
pub const LINK_ADDRS_MAX: usize = 16;

/// Most bytes of certificates and key a DR link carries.
pub const LINK_PEM_BYTES_MAX: usize = 64 * 1024;

/// Most events and payload bytes one cross-site shipment carries.
pub const SHIP_EVENTS_MAX: usize = 4096;
pub const SHIP_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Blocks one `ShipBlocks` asks for: a shipment's worth (8 MiB).
pub const SHIP_BLOCKS_MAX: usize = SHIP_BYTES_MAX / 4096;

/// Payload bytes, events and block keys one failback step moves at most
/// into its branch (one Raft entry's work).
pub const FORK_BYTES_MAX: u64 = 16 * 1024 * 1024;
pub const FORK_EVENTS_MAX: u64 = 1024;
pub const FORK_BLOCKS_MAX: u64 = 65536;
