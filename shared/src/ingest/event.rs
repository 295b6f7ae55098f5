//! The one rule that tells an SQS batch from a rule payload, and the inbound messages of
//! either. The Lambda handler, `fleetctl ingest` and the tests all decode events here.
//!
//! - A rule payload always carries the rule-added `thing` (`topic(3) AS thing`): an object
//!   with a top-level `thing` is a direct invocation, whatever else it holds, so a device
//!   cannot make its payload pass for a batch of other devices' messages.
//! - Otherwise an object with `Records` is an SQS batch, whatever its records hold: it is never
//!   reinterpreted as one direct payload. Every element becomes a message; one that is not an
//!   SQS message (null, another `eventSource`, no string `body`) is quarantined as
//!   `malformed_record` with its raw JSON, and its valid neighbours are stored as usual.
//! - Anything else is a direct payload (and is quarantined by the envelope rules if bad).

use serde::Deserialize;
use serde_json::value::RawValue;

use super::archive::content_id;
use super::batch::Inbound;
use super::reason::{Problem, Reason};

pub const SQS_EVENT_SOURCE: &str = "aws:sqs";

/// An inbound message that owns its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedInbound {
    pub message_id: String,
    pub received_ms: i64,
    pub body: Vec<u8>,
    /// What the trigger got wrong about this message, if anything (see [`Inbound::defect`]).
    pub defect: Option<Problem>,
}

impl OwnedInbound {
    /// A message as delivered (no defect).
    pub fn new(message_id: impl Into<String>, received_ms: i64, body: impl Into<Vec<u8>>) -> Self {
        Self { message_id: message_id.into(), received_ms, body: body.into(), defect: None }
    }

    pub fn borrow(&self) -> Inbound<'_> {
        Inbound {
            message_id: &self.message_id,
            received_ms: self.received_ms,
            body: &self.body,
            defect: self.defect.as_ref(),
        }
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

#[derive(Deserialize)]
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

/// The common case in one pass: an SQS event whose every record is a well-formed SQS message
/// (its source and sent time borrowed from the event: they never hold escapes; one that does
/// takes the careful path).
#[derive(Deserialize)]
struct WellFormedSqsEvent<'a> {
    #[serde(rename = "Records", borrow)]
    records: Vec<WellFormedRecord<'a>>,
    #[serde(default)]
    thing: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct WellFormedRecord<'a> {
    #[serde(rename = "messageId")]
    message_id: Option<String>,
    #[serde(rename = "eventSource")]
    event_source: Option<&'a str>,
    #[serde(default, borrow)]
    attributes: WellFormedAttributes<'a>,
    body: Option<String>,
}

#[derive(Default, Deserialize)]
struct WellFormedAttributes<'a> {
    #[serde(rename = "SentTimestamp")]
    sent_timestamp: Option<&'a str>,
}

impl WellFormedSqsEvent<'_> {
    /// The messages, if there is no `thing` and every record has an id, the SQS source and a body.
    fn into_messages(self, now_ms: i64) -> Option<Vec<OwnedInbound>> {
        if self.thing.is_some() {
            return None;
        }
        self.records
            .into_iter()
            .map(|r| match (r.message_id, r.event_source, r.body) {
                (Some(id), Some(SQS_EVENT_SOURCE), Some(body)) => Some(OwnedInbound {
                    message_id: id,
                    received_ms: r.attributes.sent_timestamp.and_then(|t| t.parse().ok()).unwrap_or(now_ms),
                    body: body.into_bytes(),
                    defect: None,
                }),
                _ => None,
            })
            .collect()
    }
}

/// Decode an event; `now_ms` stands in for a missing arrival time.
pub fn parse_event(text: &str, now_ms: i64) -> Trigger {
    // Fast path; anything else (a direct payload, a defective record) takes the careful path,
    // which gives every record its own fate.
    if let Some(messages) =
        serde_json::from_str::<WellFormedSqsEvent>(text).ok().and_then(|e| e.into_messages(now_ms))
    {
        return Trigger::Sqs(messages);
    }
    let probe = serde_json::from_str::<Probe<'_>>(text).ok();
    let Some(probe) = probe else {
        // Not a JSON object (or not JSON at all): a direct payload, quarantined by the rules.
        return Trigger::Direct(direct_message(text.as_bytes(), None, now_ms));
    };
    match (&probe.thing, probe.records) {
        (None, Some(records)) => Trigger::Sqs(sqs_messages(records, now_ms)),
        _ => Trigger::Direct(direct_message(text.as_bytes(), probe.rx_ms.and_then(|v| v.as_i64()), now_ms)),
    }
}

/// Every record of an SQS event as a message; what is not an SQS message carries its defect.
fn sqs_messages(records: &RawValue, now_ms: i64) -> Vec<OwnedInbound> {
    let defective = |id: String, raw: &str, detail: String| OwnedInbound {
        message_id: id,
        received_ms: now_ms,
        body: raw.as_bytes().to_vec(),
        defect: Some(Problem::new(Reason::MalformedRecord, None, detail)),
    };
    let Ok(records) = serde_json::from_str::<Vec<&RawValue>>(records.get()) else {
        let detail = "the event's Records is not an array".to_owned();
        return vec![defective(
            format!("records-{}", content_id(records.get().as_bytes())),
            records.get(),
            detail,
        )];
    };
    records
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            // A stable id for a record without one, so a retried event maps to the same rows.
            let fallback = || format!("record-{i}-{}", content_id(raw.get().as_bytes()));
            let record = match serde_json::from_str::<SqsRecord>(raw.get()) {
                Ok(r) => r,
                Err(_) => {
                    return defective(
                        fallback(),
                        raw.get(),
                        format!("record {i} is not an SQS message object"),
                    )
                }
            };
            let id = record.message_id.clone().unwrap_or_else(fallback);
            match (record.event_source.as_deref(), record.body) {
                (Some(SQS_EVENT_SOURCE), Some(body)) => OwnedInbound {
                    message_id: id,
                    received_ms: record
                        .attributes
                        .sent_timestamp
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(now_ms),
                    body: body.into_bytes(),
                    defect: None,
                },
                (Some(SQS_EVENT_SOURCE), None) => {
                    defective(id, raw.get(), format!("record {i} has no string body"))
                }
                (source, _) => defective(
                    id,
                    raw.get(),
                    format!("record {i} has eventSource {source:?}, not {SQS_EVENT_SOURCE:?}"),
                ),
            }
        })
        .collect()
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
    OwnedInbound::new(format!("direct-{}", content_id(body)), rx_ms.unwrap_or(now_ms), body)
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
    fn an_sqs_batch_keeps_every_record_and_marks_the_ones_that_are_not_sqs_messages() {
        let event = r#"{"Records":[
            {"eventSource":"aws:sqs","messageId":"a","attributes":{"SentTimestamp":"7"},"body":"{\"v\":1}"},
            null,
            {"eventSource":"aws:kinesis","messageId":"c","body":"{\"v\":1}"},
            {"eventSource":"aws:sqs","messageId":"d"}]}"#;
        let Trigger::Sqs(m) = parse_event(event, 1) else { panic!("not a batch") };
        assert_eq!(m.len(), 4);
        assert_eq!(
            (m[0].message_id.as_str(), m[0].received_ms, m[0].body.as_slice(), m[0].defect.is_none()),
            ("a", 7, &b"{\"v\":1}"[..], true)
        );
        // The broken ones keep what arrived, and say what is wrong with it.
        assert!(m[1].message_id.starts_with("record-1-"), "{}", m[1].message_id);
        assert_eq!(m[1].body, b"null");
        assert_eq!(m[2].message_id, "c");
        let defect = |i: usize| m[i].defect.as_ref().map(|p| (p.reason, p.detail.clone()));
        assert_eq!(defect(1).map(|d| d.0), Some(Reason::MalformedRecord));
        assert!(defect(2).is_some_and(|d| d.1.contains("aws:kinesis")), "{:?}", defect(2));
        assert!(defect(3).is_some_and(|d| d.1.contains("no string body")), "{:?}", defect(3));
        // A retried event gives the broken records the same ids.
        let Trigger::Sqs(again) = parse_event(event, 99) else { panic!("not a batch") };
        assert_eq!(again[1].message_id, m[1].message_id);
    }

    #[test]
    fn escapes_where_sqs_never_writes_them_give_the_same_messages() {
        // The fast path borrows eventSource and SentTimestamp; escaped, they take the careful one.
        let plain = r#"{"Records":[{"eventSource":"aws:sqs","messageId":"a","attributes":{"SentTimestamp":"7"},"body":"{}"}]}"#;
        let escaped = r#"{"Records":[{"eventSource":"aws:sq\u0073","messageId":"a","attributes":{"SentTimestamp":"\u0037"},"body":"{}"}]}"#;
        let expected = Trigger::Sqs(vec![OwnedInbound::new("a", 7, &b"{}"[..])]);
        assert_eq!(parse_event(plain, 1), expected);
        assert_ne!(plain, escaped);
        assert_eq!(parse_event(escaped, 1), expected);
    }

    #[test]
    fn an_event_with_records_is_never_read_as_one_direct_payload() {
        for event in
            [r#"{"Records":[{"eventSource":"aws:s3"}]}"#, r#"{"Records":[null]}"#, r#"{"Records":{}}"#]
        {
            let Trigger::Sqs(m) = parse_event(event, 0) else { panic!("{event} read as a direct payload") };
            assert!(m.len() == 1 && m[0].defect.is_some(), "{event}: {m:?}");
        }
        assert_eq!(parse_event(r#"{"Records":[]}"#, 0), Trigger::Sqs(Vec::new()));
        assert!(matches!(parse_event("not json", 0), Trigger::Direct(_)));
        assert!(matches!(parse_event(r#"{"v":1}"#, 0), Trigger::Direct(_)));
    }
}
