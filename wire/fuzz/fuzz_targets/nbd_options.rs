//! Any bytes a local NBD client sends during the handshake: client flags,
//! an option header, NBD_OPT_GO data. A typed error or a value, never a
//! panic; a parsed option header is within the option limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewind_nbd::protocol::{parse_client_flags, parse_go, parse_option_header, OPTION_BYTES_MAX, OPTION_HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Some(flags) = data.get(..4) {
        let _ = parse_client_flags(flags.try_into().expect("4 bytes"));
    }
    if let Some(head) = data.get(..OPTION_HEADER_BYTES) {
        if let Ok(h) = parse_option_header(head.try_into().expect("a header")) {
            assert!(h.len <= OPTION_BYTES_MAX);
        }
    }
    if let Ok(go) = parse_go(data) {
        assert!(go.name.len() + 2 * go.info.len() + 6 <= data.len());
    }
});
