//! Sample events (the files in `events/ingest-telemetry/`) as inbound messages: an SQS batch
//! (`Records[].body`) or one rule payload object. Used by `fleetctl ingest` and tests; the
//! Lambda itself decodes its trigger with `aws_lambda_events`.

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
        Inbound {
            message_id: &self.message_id,
            received_ms: self.received_ms,
            body: &self.body,
        }
    }
}

/// The messages of one sample event; `now_ms` stands in for a missing `SentTimestamp`.
pub fn messages_from_event(text: &str, now_ms: i64) -> Result<Vec<OwnedInbound>, serde_json::Error> {
    let event: Value = serde_json::from_str(text)?;
    Ok(match event.get("Records").and_then(Value::as_array) {
        Some(records) => records
            .iter()
            .enumerate()
            .map(|(i, r)| OwnedInbound {
                message_id: r["messageId"]
                    .as_str()
                    .map_or_else(|| format!("record-{i}"), str::to_owned),
                received_ms: r["attributes"]["SentTimestamp"]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(now_ms),
                body: r["body"].as_str().unwrap_or_default().as_bytes().to_vec(),
            })
            .collect(),
        None => vec![OwnedInbound {
            message_id: format!("direct-{}", content_id(text.as_bytes())),
            received_ms: event["rx_ms"].as_i64().unwrap_or(now_ms),
            body: text.as_bytes().to_vec(),
        }],
    })
}
