//! Any bytes an NBD server sends a backup's client: option reply headers,
//! meta context and export info replies, structured reply chunk headers
//! and payloads, and URIs. A typed error or a value, never a panic; a
//! parsed header is within the client's limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewind_nbd::client::{
    parse_chunk, parse_chunk_header, parse_export_info, parse_meta_context, parse_option_reply_header, parse_uri, CHUNK_BYTES_MAX, CHUNK_HEADER_BYTES,
    OPTION_REPLY_BYTES_MAX, OPTION_REPLY_HEADER_BYTES,
};

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.get(..OPTION_REPLY_HEADER_BYTES) {
        if let Ok(h) = parse_option_reply_header(head.try_into().expect("a header")) {
            assert!(h.len <= OPTION_REPLY_BYTES_MAX);
        }
    }
    if let Some(head) = data.get(..CHUNK_HEADER_BYTES) {
        if let Ok(h) = parse_chunk_header(head.try_into().expect("a header")) {
            assert!(h.len <= CHUNK_BYTES_MAX);
        }
    }
    if let Some((kind, rest)) = data.split_first_chunk::<2>() {
        let _ = parse_chunk(u16::from_be_bytes(*kind), rest);
    }
    let _ = parse_export_info(data);
    let _ = parse_meta_context(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_uri(s);
    }
});
