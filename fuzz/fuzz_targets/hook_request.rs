//! libFuzzer target: `fleet_fuzz::hook_request_case` on any bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fleet_fuzz::hook_request_case(data);
});
