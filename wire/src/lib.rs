//! Every type that crosses a process boundary in rewind, and the one framing
//! that carries them.
//!
//! * [`event`]: the events of a consistency group's log (writes, zeroes, trims,
//!   backup markers, bookmarks, disk lifecycle) and the batches a client
//!   appends.
//! * [`raft`]: plain mirrors of the Raft messages (votes, log ids, entries,
//!   membership) so that the consensus library's own types never reach a
//!   socket or a disk unvalidated.
//! * [`rpc`]: requests and replies between nodes and from clients.
//! * [`dr`]: a group's cross-site state (primary site, epoch, the link).
//! * [`frame`]: length-prefixed, versioned, checksummed rkyv frames.
//! * [`timefmt`]: event times as people write them (RFC 3339 in and out).
//!
//! Invariants kept here:
//! * decoding never panics on any input: a bad frame is a typed
//!   [`frame::FrameError`];
//! * every frame body is checked against its blake3 checksum before rkyv
//!   validation (bytecheck) and before use;
//! * every size that can arrive from outside has a named upper bound in
//!   [`limits`].
//!
//! This crate does no I/O and has no async code.

pub mod addr;
pub mod dr;
pub mod event;
pub mod frame;
pub mod limits;
pub mod raft;
pub mod rpc;
pub mod timefmt;

pub use event::{Event, EventBatch, LoggedEvent, TimedEvent};
pub use frame::{decode_body, decode_frame, encode_frame, Decode, Encode, FrameError, FrameHeader};
