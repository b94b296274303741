//! Any bytes a node answers with: a typed error or a value, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewind_wire::frame::decode_frame;
use rewind_wire::rpc::Response;

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame::<Response>(data);
});
