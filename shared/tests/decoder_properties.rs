//! Properties of the ingest decoder over generated input:
//! - any valid envelope (v1 or v2, compact or pretty-printed, with the rule's fields), once
//!   archived and read back from the archive as a replay reads it, decodes to the same reading;
//! - for any byte string, and any SQS event text, decoding returns a reading or reasons and
//!   never panics.

use fleet_shared::ingest::envelope::{MAX_METRICS, MIN_VALID_TIME_MS, RESERVED_METRIC_NAMES};
use fleet_shared::ingest::{decode, decode_lines, parse_event, plan, raw_object, IngestPolicy, OwnedInbound};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const RX: i64 = 1_764_000_000_000;

/// A valid envelope as the rule forwards it: the device's fields plus thing, topic, rx_ms, client_id.
fn envelope() -> impl Strategy<Value = (Value, bool)> {
    let thing = "[a-z][a-z0-9-]{0,23}";
    let metric_name = "[a-z][a-z0-9_]{0,11}";
    let metrics = proptest::collection::btree_map(metric_name, -1.0e9f64..1.0e9, 1..MAX_METRICS.min(8))
        .prop_filter("reserved metric names are refused by design", |m| {
            m.keys().all(|k| {
                !RESERVED_METRIC_NAMES.contains(&k.as_str())
                    && !k.starts_with("ts_")
                    && !k.starts_with("measure_value")
            })
        });
    (
        thing,
        1u64..u32::MAX as u64,
        0u32..1000,
        MIN_VALID_TIME_MS..RX,
        "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,3}",
        metrics,
        proptest::option::of(0.0f64..=100.0),
        proptest::option::of(0u64..(i64::MAX as u64)),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(thing, seq, boot, ts, fw, metrics, bat, up_s, test, v2, pretty)| {
            let mut o = Map::new();
            o.insert("v".into(), json!(if v2 { 2 } else { 1 }));
            o.insert("seq".into(), json!(seq));
            o.insert("boot".into(), json!(boot));
            o.insert("fw".into(), json!(fw));
            if v2 {
                o.insert("bt".into(), json!(ts));
                let e: Vec<Value> = metrics.iter().map(|(n, v)| json!({"n": n, "v": v})).collect();
                o.insert("e".into(), Value::Array(e));
            } else {
                o.insert("ts".into(), json!(ts));
                o.insert("m".into(), json!(metrics));
            }
            if let Some(b) = bat {
                o.insert("bat".into(), json!(b));
            }
            if let Some(u) = up_s {
                o.insert("up_s".into(), json!(u));
            }
            o.insert("test".into(), json!(test));
            o.insert("thing".into(), json!(thing));
            o.insert("topic".into(), json!(format!("dt/fleet/{thing}/telemetry")));
            o.insert("rx_ms".into(), json!(RX));
            o.insert("client_id".into(), json!(thing));
            (Value::Object(o), pretty)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_valid_envelope_archived_and_replayed_yields_the_same_reading((envelope, pretty) in envelope()) {
        let body = if pretty { serde_json::to_vec_pretty(&envelope) } else { serde_json::to_vec(&envelope) }
            .expect("serialises");
        let policy = IngestPolicy::default();
        let now = RX + 1_000;
        let first = decode(&body, &policy, now);
        prop_assert!(first.is_ok(), "a valid envelope was refused: {:?}\n{}", first, String::from_utf8_lossy(&body));
        // The archive stores it as one NDJSON line (newlines folded), gzip, content-addressed.
        let object = raw_object([body.as_slice()], RX).expect("one line");
        let lines = decode_lines(object.body()).expect("the archive object reads back");
        prop_assert_eq!(lines.len(), 1);
        let replayed = decode(&lines[0], &policy, now);
        prop_assert_eq!(first, replayed);
    }

    #[test]
    fn any_bytes_decode_to_a_reading_or_reasons_never_a_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(rejection) = decode(&body, &IngestPolicy::default(), RX) {
            prop_assert!(!rejection.problems.is_empty());
        }
    }

    #[test]
    fn json_like_text_decodes_to_a_reading_or_reasons_never_a_panic(
        body in "[{}\\[\\]\",:0-9a-z\\\\. -]{0,200}|\\{\"v\":[12],[\"a-z0-9:,{}\\[\\]\\\\.-]{0,200}\\}"
    ) {
        if let Err(rejection) = decode(body.as_bytes(), &IngestPolicy::default(), RX) {
            prop_assert!(!rejection.problems.is_empty());
        }
    }

    #[test]
    fn any_event_text_becomes_messages_that_each_end_in_one_bucket(text in "\\{\"Records\":\\[[\"a-zA-Z0-9:,{}\\[\\] .-]{0,200}\\]\\}|[ -~]{0,200}") {
        let messages: Vec<OwnedInbound> = match parse_event(&text, RX) {
            fleet_shared::ingest::Trigger::Sqs(m) => m,
            fleet_shared::ingest::Trigger::Direct(m) => vec![m],
        };
        let inbound: Vec<_> = messages.iter().map(OwnedInbound::borrow).collect();
        let p = plan(&inbound, &IngestPolicy::default(), RX);
        prop_assert!(p.accounts_for(messages.len()), "a message in no bucket or in two");
    }
}
