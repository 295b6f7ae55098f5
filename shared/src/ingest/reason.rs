//! The fixed vocabulary of reasons a payload is quarantined for.
//!
//! | code | meaning |
//! |---|---|
//! | `malformed_json` | the bytes are not a JSON object |
//! | `malformed_record` | an SQS event record that is not an SQS message (null, another `eventSource`, no string `body`) |
//! | `invalid_utf8` | the bytes are not UTF-8 (JSON text must be), e.g. inside a string |
//! | `duplicate_key` | an object, at any depth, names one key twice (parsers disagree on which wins) |
//! | `nesting_too_deep` | objects/arrays nested deeper than the envelope allows ([`MAX_NESTING`](super::envelope::MAX_NESTING)) |
//! | `payload_too_large` | larger than IoT Core's 128 KiB message limit |
//! | `unsupported_version` | `v` is not a known envelope version (1, 2) |
//! | `missing_field` | a required field is absent or `null` |
//! | `wrong_type` | a field has the wrong JSON type (e.g. a string seq) |
//! | `invalid_thing_name` | the rule's `thing` is not a valid AWS IoT thing name |
//! | `thing_mismatch` | `client_id` or the payload's own device id disagrees with the topic's thing (spoofing) |
//! | `non_finite_value` | a metric is NaN or ±Infinity |
//! | `invalid_metric_name` | a metric name breaks the naming rule, is reserved, or repeats |
//! | `too_many_metrics` | more metrics than one hot-store record can carry |
//! | `too_many_readings` | a v2 pack with more readings (distinct `t`) than one message may carry |
//! | `no_metrics` | the reading carries no metric at all |
//! | `value_out_of_range` | a number outside its domain (battery beyond 0–100, seq or up_s beyond 2^63-1) |
//! | `invalid_label` | a device-supplied label (`fw`) with characters outside its documented charset |
//! | `timestamp_out_of_range` | device or arrival time before 2000-01-01 or negative |
//! | `conflict` | the store already holds a different reading under the same `(thing, boot, seq)` |
//! | `store_rejected` | a store refused the reading for good (validation, access, missing resource) |

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    MalformedJson,
    MalformedRecord,
    InvalidUtf8,
    DuplicateKey,
    NestingTooDeep,
    PayloadTooLarge,
    UnsupportedVersion,
    MissingField,
    WrongType,
    InvalidThingName,
    ThingMismatch,
    NonFiniteValue,
    InvalidMetricName,
    TooManyMetrics,
    TooManyReadings,
    NoMetrics,
    ValueOutOfRange,
    TimestampOutOfRange,
    InvalidLabel,
    Conflict,
    StoreRejected,
}

impl Reason {
    pub const ALL: [Reason; 21] = [
        Reason::MalformedJson,
        Reason::MalformedRecord,
        Reason::InvalidUtf8,
        Reason::DuplicateKey,
        Reason::NestingTooDeep,
        Reason::PayloadTooLarge,
        Reason::UnsupportedVersion,
        Reason::MissingField,
        Reason::WrongType,
        Reason::InvalidThingName,
        Reason::ThingMismatch,
        Reason::NonFiniteValue,
        Reason::InvalidMetricName,
        Reason::TooManyMetrics,
        Reason::TooManyReadings,
        Reason::NoMetrics,
        Reason::ValueOutOfRange,
        Reason::TimestampOutOfRange,
        Reason::InvalidLabel,
        Reason::Conflict,
        Reason::StoreRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedJson => "malformed_json",
            Reason::MalformedRecord => "malformed_record",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::DuplicateKey => "duplicate_key",
            Reason::NestingTooDeep => "nesting_too_deep",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::UnsupportedVersion => "unsupported_version",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::InvalidThingName => "invalid_thing_name",
            Reason::ThingMismatch => "thing_mismatch",
            Reason::NonFiniteValue => "non_finite_value",
            Reason::InvalidMetricName => "invalid_metric_name",
            Reason::TooManyMetrics => "too_many_metrics",
            Reason::TooManyReadings => "too_many_readings",
            Reason::NoMetrics => "no_metrics",
            Reason::ValueOutOfRange => "value_out_of_range",
            Reason::TimestampOutOfRange => "timestamp_out_of_range",
            Reason::InvalidLabel => "invalid_label",
            Reason::Conflict => "conflict",
            Reason::StoreRejected => "store_rejected",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing wrong with a payload: the reason code, the field it concerns, and a human detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub reason: Reason,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub field: Option<String>,
    pub detail: String,
}

impl Problem {
    pub fn new(reason: Reason, field: impl Into<Option<String>>, detail: impl Into<String>) -> Self {
        Self { reason, field: field.into(), detail: detail.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_names_match_the_documented_codes() -> serde_json::Result<()> {
        for r in Reason::ALL {
            assert_eq!(serde_json::to_string(&r)?, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<Reason>(&format!("\"{r}\""))?, r);
        }
        Ok(())
    }
}
