//! The tap and the CBT importer: NOT BUILT YET (issue "CDP tap").
//!
//! What will live here: an NBD server in front of a disk's backing file that
//! journals every WRITE, WRITE_ZEROES and TRIM into the disk's consistency
//! group (sync and async modes, bounded local journal, back-pressure), and an
//! NBD client that imports full and dirty-bitmap backups. It will append
//! through a log-sink trait of its own that `node` implements; it never
//! touches Raft internals.
