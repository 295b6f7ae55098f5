//! The device's answer on `cmd/fleet/<thing>/res`.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::envelope::{strict_object, CMD_ID};
use super::{Malformed, Rejection};

/// What became of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    Succeeded,
    Failed,
    /// Refused by [`super::CommandVerifier`]; `reason` is the [`Rejection::code`].
    Rejected,
}

/// `{"cmd_id":..,"status":"succeeded|failed|rejected","reason":..,"result":{..}}`, the last two
/// optional (a `rejected` ack always has a reason).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandAck {
    pub cmd_id: String,
    pub status: AckStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some_strict_object")]
    pub result: Option<Map<String, Value>>,
}

impl CommandAck {
    /// Reads an ack strictly: no unknown or repeated field (nor key in `result`), a valid
    /// `cmd_id`, and a reason on every rejection.
    pub fn parse(raw: &[u8]) -> Result<Self, Malformed> {
        let ack: Self = serde_json::from_slice(raw)?;
        CMD_ID.check("cmd_id", &ack.cmd_id)?;
        if ack.status == AckStatus::Rejected && ack.reason.is_none() {
            return Err(Malformed::Field { field: "reason", rule: "present when status is rejected" });
        }
        Ok(ack)
    }

    /// The `rejected` ack for the command `raw`, echoing the `cmd_id` it claims; `None` when it
    /// has no readable one (the device then has nobody to answer and drops it).
    pub fn rejected(raw: &[u8], why: &Rejection) -> Option<Self> {
        #[derive(Deserialize)]
        struct Claimed {
            cmd_id: String,
        }
        let Claimed { cmd_id } = serde_json::from_slice(raw).ok()?;
        CMD_ID.check("cmd_id", &cmd_id).ok()?;
        Some(Self { cmd_id, status: AckStatus::Rejected, reason: Some(why.code().to_owned()), result: None })
    }

    /// Compact JSON, as published.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("strings and a JSON map always serialize")
    }
}

fn some_strict_object<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Map<String, Value>>, D::Error> {
    strict_object(de).map(Some)
}
