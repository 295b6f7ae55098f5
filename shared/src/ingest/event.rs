//! The one rule that tells an SQS batch from a rule payload, and the inbound messages of
//! either. The Lambda handler, `fleetctl ingest` and the tests all decode events here.
//!
//! - A rule payload always carries the rule-added `thing` (`topic(3) AS thing`): an object
//!   with a top-level `thing` is a direct invocation, whatever else it holds, so a device
//!   cannot make its payload pass for a batch of other devices' messages.
//! - Otherwise an object whose `Records` is a non-empty array with at least one
//!   `eventSource: "aws:sqs"` element is an SQS batch. Every element becomes a message;
//!   one that is not an SQS message (null, no body) is quarantined, never reinterpreted.
//! - Anything else is a direct payload (and is quarantined by the envelope rules if bad).

use serde::Deserialize;
use serde_json::value::RawValue;

use super::archive::content_id;
use super::batch::Inbound;

pub const SQS_EVENT_SOURCE: &str = "aws:sqs";

/// An inbound message that owns its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedInbound {
    pub message_id: String,
    pub received_ms: i64,
    pub body: Vec<u8>,
}

impl OwnedInbound {
    pub fn borrow(&self) -> Inbound<'_> {
        Inbound { message_id: &self.message_id, received_ms: self.received_ms, body: &self.body }
    }
}

/// What invoked the function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// An SQS batch: one message per record, ids as SQS gave them (for batch item failures).
    Sqs(Vec<OwnedInbound>),
    /// One rule payload (IoT rule → Lambda action).
    Direct(OwnedInbound),
}

impl Trigger {
    pub fn messages(&self) -> &[OwnedInbound] {
        match self {
            Trigger::Sqs(m) => m,
            Trigger::Direct(m) => std::slice::from_ref(m),
        }
    }
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "Records", borrow, default)]
    records: Option<&'a RawValue>,
    #[serde(borrow, default)]
    thing: Option<&'a RawValue>,
    #[serde(default)]
    rx_ms: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct SqsRecord {
    #[serde(rename = "messageId")]
    message_id: Option<String>,
    #[serde(rename = "eventSource")]
    event_source: Option<String>,
    #[serde(default)]
    attributes: SqsAttributes,
    body: Option<String>,
}

#[derive(Default, Deserialize)]
struct SqsAttributes {
    #[serde(rename = "SentTimestamp")]
    sent_timestamp: Option<String>,
}

/// Decode an event; `now_ms` stands in for a missing arrival time.
pub fn parse_event(text: &str, now_ms: i64) -> Trigger {
    let probe = serde_json::from_str::<Probe<'_>>(text).ok();
    let Some(probe) = probe else {
        // Not a JSON object (or not JSON at all): a direct payload, quarantined by the rules.
        return Trigger::Direct(direct_message(text.as_bytes(), None, now_ms));
    };
    let records = probe.records.and_then(|r| serde_json::from_str::<Vec<&RawValue>>(r.get()).ok());
    let sqs_records = match (&probe.thing, &records) {
        (None, Some(records)) if !records.is_empty() => {
            let parsed: Vec<Option<SqsRecord>> =
                records.iter().map(|r| serde_json::from_str::<SqsRecord>(r.get()).ok()).collect();
            let any_sqs =
                parsed.iter().flatten().any(|r| r.event_source.as_deref() == Some(SQS_EVENT_SOURCE));
            any_sqs.then_some(parsed)
        }
        _ => None,
    };
    match sqs_records {
        Some(records) => Trigger::Sqs(
            records
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    let r = r.unwrap_or_default();
                    OwnedInbound {
                        message_id: r.message_id.unwrap_or_else(|| format!("record-{i}")),
                        received_ms: r
                            .attributes
                            .sent_timestamp
                            .and_then(|t| t.parse().ok())
                            .unwrap_or(now_ms),
                        // A record that is not an SQS message has no body: quarantined as malformed.
                        body: r.body.unwrap_or_default().into_bytes(),
                    }
                })
                .collect(),
        ),
        None => {
            Trigger::Direct(direct_message(text.as_bytes(), probe.rx_ms.and_then(|v| v.as_i64()), now_ms))
        }
    }
}

/// The messages of one sample event (`events/<fn>/*.json`), as the handler would see them.
pub fn messages_from_event(text: &str, now_ms: i64) -> Vec<OwnedInbound> {
    match parse_event(text, now_ms) {
        Trigger::Sqs(m) => m,
        Trigger::Direct(m) => vec![m],
    }
}

/// A direct rule invocation's one message. Its id and time come from the payload itself
/// (content hash, the rule's `rx_ms`), so a retried invocation maps to the same archive keys
/// and quarantine rows.
pub fn direct_message(body: &[u8], rx_ms: Option<i64>, now_ms: i64) -> OwnedInbound {
    OwnedInbound {
        message_id: format!("direct-{}", content_id(body)),
        received_ms: rx_ms.unwrap_or(now_ms),
        body: body.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_with_the_rule_thing_is_direct_even_when_it_looks_like_a_batch() {
        // GIVEN a device payload that imitates an SQS event
        let spoof = r#"{"thing":"dev-1","rx_ms":5,"Records":[{"eventSource":"aws:sqs","messageId":"m","body":"{}"}]}"#;
        // THEN it is one direct message carrying the whole payload
        let Trigger::Direct(m) = parse_event(spoof, 0) else { panic!("read as a batch") };
        assert_eq!((m.received_ms, m.body.as_slice()), (5, spoof.as_bytes()));
    }

    #[test]
    fn an_sqs_batch_keeps_every_record_including_broken_ones() {
        let event = r#"{"Records":[
            {"eventSource":"aws:sqs","messageId":"a","attributes":{"SentTimestamp":"7"},"body":"{\"v\":1}"},
            null,
            {"eventSource":"aws:kinesis","messageId":"c"}]}"#;
        let Trigger::Sqs(m) = parse_event(event, 1) else { panic!("not a batch") };
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].message_id.as_str(), m[0].received_ms, m[0].body.as_slice()),
            ("a", 7, &b"{\"v\":1}"[..])
        );
        assert_eq!((m[1].message_id.as_str(), m[1].body.len()), ("record-1", 0));
        assert_eq!((m[2].message_id.as_str(), m[2].body.len()), ("c", 0));
    }

    #[test]
    fn records_without_an_sqs_source_and_non_objects_are_direct() {
        assert!(matches!(parse_event(r#"{"Records":[{"eventSource":"aws:s3"}]}"#, 0), Trigger::Direct(_)));
        assert!(matches!(parse_event(r#"{"Records":[]}"#, 0), Trigger::Direct(_)));
        assert!(matches!(parse_event("not json", 0), Trigger::Direct(_)));
    }
}
