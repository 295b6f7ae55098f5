//! libFuzzer target: `fleet_fuzz::sqs_event_case` on any bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fleet_fuzz::sqs_event_case(data));
