//! Cross-site disaster recovery: which site is a consistency group's
//! primary, under which epoch, and how to reach the other site.
//!
//! A linked group lives at two sites, each with its own Raft quorum. Both
//! hold a [`DrRecord`] for it in their replicated state. The site named
//! `primary` takes the group's appends; the other one pulls the primary's
//! committed events and commits them under the same LSNs, times and
//! digests. `epoch` grows by one at every failover or switchover; a site
//! that sees a higher epoch at its peer adopts it, so at most one site
//! takes writes for a group in any epoch.

use rkyv::{Archive, Deserialize, Serialize};

use crate::event::{check_name, InvalidInput, LoggedEvent};

/// How one site reaches the other: the peer's node addresses and a client
/// identity the peer's CA signed. Trusted for this link only: the peer's CA
/// is never added to the site's own trust.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SiteLink {
    /// Node addresses of the peer site (HOST:PORT).
    pub addrs: Vec<String>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A consistency group's DR state at one site.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DrRecord {
    /// This site's name, and the peer's.
    pub local: String,
    pub remote: String,
    /// The site that takes writes in `epoch`: `local` or `remote`.
    pub primary: String,
    /// Grows by one at each failover or switchover, from 1 at the link.
    pub epoch: u64,
    /// A lag (seconds of event time) over this is an alarm; 0: none.
    pub rpo_alarm_ms: u64,
    /// Payload bytes per second the secondary pulls at most; 0: no cap.
    pub max_rate_bytes: u64,
    pub link: SiteLink,
}

impl DrRecord {
    /// Whether this site takes the group's writes.
    pub fn is_primary(&self) -> bool {
        self.primary == self.local
    }

    /// Checks names and sizes; the rest is checked where it is applied.
    pub fn check(&self) -> Result<(), InvalidInput> {
        check_name(&self.local)?;
        check_name(&self.remote)?;
        check_name(&self.primary)?;
        if self.local == self.remote || (self.primary != self.local && self.primary != self.remote) || self.epoch == 0 {
            return Err(InvalidInput::BadLink {
                why: format!(
                    "local {:?}, remote {:?}, primary {:?}, epoch {}: the sites must differ, the primary be one of them, and epochs start at 1",
                    self.local, self.remote, self.primary, self.epoch
                ),
            });
        }
        let pem_bytes = self.link.ca_pem.len() + self.link.cert_pem.len() + self.link.key_pem.len();
        if self.link.addrs.is_empty() || self.link.addrs.len() > crate::limits::LINK_ADDRS_MAX || pem_bytes > crate::limits::LINK_PEM_BYTES_MAX {
            return Err(InvalidInput::BadLink {
                why: format!(
                    "{} peer addresses ({} at most, 1 at least) and {pem_bytes} bytes of certificates ({} at most)",
                    self.link.addrs.len(),
                    crate::limits::LINK_ADDRS_MAX,
                    crate::limits::LINK_PEM_BYTES_MAX
                ),
            });
        }
        Ok(())
    }

    /// The same record with the peer's side of it: what the other site
    /// stores for the same link and epoch.
    pub fn mirrored(&self, link: SiteLink) -> DrRecord {
        DrRecord { local: self.remote.clone(), remote: self.local.clone(), link, ..self.clone() }
    }
}

/// What a site tells about a group's DR state: no keys, and the log's head.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DrInfo {
    pub group: String,
    /// None: the group is not linked at this site.
    pub local: Option<String>,
    pub remote: Option<String>,
    pub primary: Option<String>,
    pub epoch: u64,
    pub rpo_alarm_ms: u64,
    pub last_lsn: u64,
    pub last_time_ns: u64,
    /// The time of LSN 1 (0 with no events).
    pub first_time_ns: u64,
    pub payload_bytes: u64,
    pub digest_hex: String,
    /// The chain digest at the LSN asked for (`DrState::digest_at`), if
    /// this site holds that LSN.
    pub digest_at_hex: Option<String>,
    /// What this site's leader last learned of the peer.
    pub peer: Option<PeerView>,
}

/// The peer site as this site's leader last saw it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub epoch: u64,
    pub primary: Option<String>,
    pub last_lsn: u64,
    pub last_time_ns: u64,
    pub first_time_ns: u64,
    pub payload_bytes: u64,
    /// How long ago, in ms; u64::MAX: never reached.
    pub seen_ms_ago: u64,
    /// Why the last attempt failed, if it did; or why shipping stopped
    /// (the histories diverged).
    pub problem: Option<String>,
    /// Whether the two chains agree at the older of the two heads.
    pub chains_agree: Option<bool>,
}

/// A piece of the primary's log, as the secondary pulls it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Shipment {
    pub events: Vec<LoggedEvent>,
    /// The chain digest after the last event of `events`.
    pub digest: [u8; 32],
    /// The primary's DR state and head when it answered.
    pub epoch: u64,
    pub primary: String,
    pub last_lsn: u64,
}

/// A shipment in which the whole 4 KiB blocks the secondary holds already
/// travel as hashes: the primary elides a block its own history held
/// before the shipment's first LSN (so the secondary, holding the same
/// history, does too, unless its collector freed it), or one that travels
/// inline earlier in the same shipment. An elided block's bytes are zeroes
/// in `shipment`; `elided` says where it was, its blake3, and where the
/// same block travels inline, if it does. The secondary fills the others
/// from its content index and asks for any it lacks with
/// `Request::ShipBlocks`. Blocks of zeroes are never elided.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HashedShipment {
    pub shipment: Shipment,
    pub elided: Vec<Elided>,
}

/// A block's place in a shipment: the index of its event, and its offset
/// in that event's payload.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub event: u32,
    pub offset: u32,
}

/// One elided block.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elided {
    pub at: Place,
    pub hash: [u8; 32],
    /// Where the same bytes travel inline in this shipment.
    pub copy_of: Option<Place>,
}

/// Where a block the secondary lacks lies at the primary: bytes
/// `offset..offset + 4 KiB` of the payload of the write at `lsn`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockAt {
    pub lsn: u64,
    pub offset: u32,
}

/// The blocks of a `Request::ShipBlocks`, in the order asked.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ShippedBlocks {
    pub blocks: Vec<Vec<u8>>,
}
