//! Any bytes a peer sends as a request frame: a typed error or a value,
//! never a panic; a decoded value encodes back to a frame that decodes to it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewind_wire::frame::{decode_frame, encode_frame};
use rewind_wire::rpc::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode_frame::<Request>(data) {
        let again = encode_frame(&request).expect("a decoded request encodes");
        assert_eq!(decode_frame::<Request>(&again).expect("round trip"), request);
    }
});
