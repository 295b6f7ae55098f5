//! libFuzzer target: `fleet_fuzz::cert_pem_case` on any bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fleet_fuzz::cert_pem_case(data);
});
