//! Cross-site DR in the node crate, in two parts:
//!
//! * `link`: what runs inside a node. While it leads its site, one task per
//!   linked group talks to the peer site (DR state, shipments fetched
//!   ahead and committed with `Command::Replicate`, adopting a higher
//!   epoch), publishes the lag, and answers a failback's fork-point
//!   question; shipments travel zstd-compressed.
//! * `ops`: what an operator's command does over a client of its own site:
//!   `dr link`, `dr status`'s state, `failover`, `failback`, `switchover`.
//!
//! The rules themselves (what a round of a link does, the fork search,
//! how replicated events and epochs apply) live in `rewind_service::dr`
//! and `rewind_raft_store::apply`.

mod link;
mod ops;

pub use link::*;
pub use ops::*;
