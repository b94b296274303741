//! Bytes that passed a checksum but are not a valid archive (a buggy or
//! hostile peer computes the checksum too): rkyv validation must refuse
//! them with an error, never a panic or an out-of-bounds read.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewind_wire::event::LoggedEvent;
use rewind_wire::frame::from_archive;
use rewind_wire::raft::Entry;
use rewind_wire::rpc::{Request, Response};

fuzz_target!(|data: &[u8]| {
    let _ = from_archive::<Request>(data);
    let _ = from_archive::<Response>(data);
    let _ = from_archive::<Entry>(data);
    let _ = from_archive::<LoggedEvent>(data);
});
