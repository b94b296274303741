//! Any bytes read back from disk as a Raft entry or a logged event: a typed
//! error or a value, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewind_wire::event::LoggedEvent;
use rewind_wire::frame::decode_record;
use rewind_wire::raft::Entry;

fuzz_target!(|data: &[u8]| {
    let _ = decode_record::<Entry>(data);
    let _ = decode_record::<LoggedEvent>(data);
});
