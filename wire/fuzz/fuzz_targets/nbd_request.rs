//! Any 28 bytes a local NBD client sends as a transmission request: a
//! typed error or a request, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewind_nbd::protocol::{parse_request, REQUEST_HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.get(..REQUEST_HEADER_BYTES) {
        let _ = parse_request(head.try_into().expect("a request header"));
    }
});
