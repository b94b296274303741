//! What a backup takes from outside: a compressed append's bytes (any
//! length claimed), and a `--changed-areas` file with the blocks it plans
//! from it. A typed error or a value, never a panic; planned runs stay
//! inside the disk, in order.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewind_wire::rpc::Request;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 8 {
        let raw_len = u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 25);
        let _ = rewind_wire::frame::expand_append(Request::AppendZstd { raw_len, data: data[8..].to_vec() });
    }
    let disk = 1 << 24;
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(areas) = rewind_cdp_ingest::backup::parse_changed_areas(text, disk) {
            let runs = rewind_cdp_ingest::backup::block_runs(&areas, &areas[..areas.len() / 2], disk);
            let mut at = 0;
            for r in runs {
                assert!(r.first >= at && r.first < r.end && r.end <= disk / 4096, "{r:?}");
                at = r.end;
            }
        }
    }
});
