//! Sample events (the files in `events/ingest-telemetry/`) as inbound messages: an SQS batch
//! (`Records[].body`) or one rule payload object. Used by `fleetctl ingest` and tests; the
//! Lambda itself decodes its trigger with `aws_lambda_events`.

use serde::Deserialize;
use serde_json::Value;

use super::archive::content_id;
use super::batch::Inbound;

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

#[derive(Deserialize)]
struct SqsEventText {
    #[serde(rename = "Records")]
    records: Vec<SqsRecordText>,
}

#[derive(Deserialize)]
struct SqsRecordText {
    #[serde(rename = "messageId")]
    message_id: Option<String>,
    #[serde(default)]
    attributes: SqsAttributes,
    #[serde(default)]
    body: String,
}

#[derive(Default, Deserialize)]
struct SqsAttributes {
    #[serde(rename = "SentTimestamp")]
    sent_timestamp: Option<String>,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "Records")]
    records: Option<serde::de::IgnoredAny>,
    rx_ms: Option<Value>,
}

/// The messages of one sample event; `now_ms` stands in for a missing `SentTimestamp`.
pub fn messages_from_event(text: &str, now_ms: i64) -> Result<Vec<OwnedInbound>, serde_json::Error> {
    let probe: Probe = serde_json::from_str(text)?;
    if probe.records.is_some() {
        let event: SqsEventText = serde_json::from_str(text)?;
        return Ok(event
            .records
            .into_iter()
            .enumerate()
            .map(|(i, r)| OwnedInbound {
                message_id: r.message_id.unwrap_or_else(|| format!("record-{i}")),
                received_ms: r.attributes.sent_timestamp.and_then(|t| t.parse().ok()).unwrap_or(now_ms),
                body: r.body.into_bytes(),
            })
            .collect());
    }
    Ok(vec![direct_message(text.as_bytes(), probe.rx_ms.and_then(|v| v.as_i64()), now_ms)])
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
