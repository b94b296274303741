//! Point-in-time replay: NOT BUILT YET (issue "Point-in-time replay").
//!
//! What will live here: resolving a target (LSN, time, bookmark, backup) to
//! an LSN, and reconstructing a disk at that LSN from a block-source trait
//! that `node` implements over `raft-store`'s read API, to a raw image or a
//! read-only / copy-on-write NBD export. Replay never writes the log.
