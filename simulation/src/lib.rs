//! Deterministic simulation of whole sites: NOT BUILT YET (issue
//! "Deterministic simulation").
//!
//! What will live here: one seeded process running N nodes, clients and taps
//! over simulated time, network and disk, with injected faults and the
//! checkers (no acknowledged event lost, replicas agree, replay equals a
//! model). It drives the same core code as production through traits.
