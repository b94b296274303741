//! The simulated world's fixed shape: its groups, disks, nodes and network
//! addresses, and the history the checkers read. Every other file imports
//! from here; this file imports none of them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use rewind_wire::event::Event;

/// The clients' consistency group and its disks.
pub const GROUP: &str = "cg";
pub const DISKS: [&str; 2] = ["d0", "d1"];
pub const DISK_BYTES: u64 = 2 << 20;
pub const SECTOR: u64 = 512;
/// The node processes (three voters and a spare); a node's network address
/// is its id.
pub const NODES: [u64; 4] = [1, 2, 3, 4];
/// Client ids start here; a client's network address is its id.
pub const CLIENT_BASE: u64 = 100;
/// The bookmark the harness pins (it keeps its point beyond the window).
pub const PINNED: &str = "pinned";

/// The tap's consistency group and its one disk.
pub const TAP_GROUP: &str = "tg";
pub const TAP_DISK: &str = "t0";
pub const TAP_DISK_BYTES: u64 = 1 << 20;
/// The tap's process in the executor: its tasks die together.
pub const TAP_NODE: u64 = 50;
/// The tap's network address.
pub const TAP_ADDR: u64 = 150;
/// The async tap's shipper's network address.
pub const SHIPPER_ADDR: u64 = 151;
/// The replaying client's network address.
pub const REPLAY_ADDR: u64 = 160;
/// The tap's producer identity; a process's epoch is its instance number.
/// (With `--bug tap-unfenced` a process's identity is this plus its
/// instance number, in epoch 0.)
pub const TAP_PRODUCER_BASE: u64 = 1000;
/// The async journal's producer identity (epoch 0: one journal, one
/// numbering).
pub const JOURNAL_PRODUCER: u64 = 2000;
/// The journal's bound on bytes not yet committed on the site: a few of
/// the tap's batches, so an outage of the site stalls the guest.
pub const JOURNAL_BYTES_MAX: u64 = 512 << 10;
/// Counted with the faults, for coverage, but left out of their total
/// (as is every kind whose name says "not a fault").
pub const JOURNAL_FULL: &str = "tap journal full (back-pressure, not a fault)";
/// A tap that would not start over a damaged journal: the answer to a
/// fault, counted for coverage.
pub const JOURNAL_REFUSED: &str = "tap refused a damaged journal (an answer, not a fault)";
/// How long a producer tries without progress before it fails its batches
/// (production's client deadline).
pub const PRODUCER_DEADLINE: Duration = Duration::from_secs(30);

/// Batches sent and answered, for the checkers.
#[derive(Default)]
pub struct History {
    /// (client, seq) -> the batch's events.
    pub submitted: BTreeMap<(u64, u64), Vec<Event>>,
    /// (client, seq, lsn_first, lsn_last); LSN 0: acknowledged without one.
    pub acked: Vec<(u64, u64, u64, u64)>,
    /// Problems a client saw (a valid batch refused, a sequence gap).
    pub client_errors: Vec<String>,
    /// Raft safety violations seen while running.
    pub safety: Vec<String>,
    /// The guest's requests to the tap, in the order it sent them.
    pub tap_ops: Vec<crate::tap::GuestOp>,
    /// (tap producer, seq) -> the batch's events.
    pub tap_batches: BTreeMap<(u64, u64), Vec<Event>>,
    /// Replays over the network that came back whole, while faults ran.
    pub replays: Vec<crate::replay::Replayed>,
    /// What the backup importer did.
    pub backups: Vec<crate::backup::Done>,
}

pub type Shared = Rc<RefCell<History>>;

/// The (client, seq) a batch's first event carries.
pub fn read_tag(event: &Event) -> Option<(u64, u64)> {
    match event {
        Event::Write { data, .. } if data.len() >= 16 => Some((
            u64::from_le_bytes(data[..8].try_into().expect("8")),
            u64::from_le_bytes(data[8..16].try_into().expect("8")),
        )),
        _ => None,
    }
}

