//! The canonical telemetry reading every schema version is upcast to.

use serde::{Deserialize, Serialize};

use super::ThingName;

/// Identity of one device message: `seq` is per boot and monotonic, so redelivery of the
/// same message always carries the same `(thing, boot, seq)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId {
    pub thing: ThingName,
    pub boot: u32,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
}

/// Facts the pipeline found about a reading's time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadingFlags {
    /// Device time was too far ahead of arrival: stored at `rx_ms` instead.
    pub skew_corrected: bool,
    /// Older than the hot store accepts: kept in the archive only.
    pub late: bool,
}

/// One validated, upcast reading (schema-independent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub id: MessageId,
    /// The time the reading is stored at: device time, or `rx_ms` when skew-corrected.
    pub time_ms: i64,
    /// Time as the device reported it (never re-stamped).
    pub device_time_ms: i64,
    /// Arrival time at IoT Core (`timestamp()` in the rule).
    pub rx_ms: i64,
    pub fw: Option<String>,
    pub metrics: Vec<Metric>,
    pub battery_pct: Option<f64>,
    pub uptime_s: Option<u64>,
    /// Test traffic, kept but tagged so dashboards can filter it.
    pub test: bool,
    pub flags: ReadingFlags,
    /// Envelope version the device sent (1 or 2).
    pub schema_version: u8,
}

/// A reading enriched with what the registry knows about its device, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredReading {
    #[serde(flatten)]
    pub reading: Reading,
    /// Device class from the registry, or `unregistered`.
    pub class: String,
    pub region: Option<String>,
    /// Version of that enrichment (the registration's time; 1 for unregistered things). The
    /// hot store keys a record by the message alone and versions it by this, so a replay after
    /// a re-registration updates the record in place instead of starting a second series, and
    /// a different payload under the same key is a conflict.
    #[serde(default = "first_version")]
    pub enrichment_version: i64,
}

fn first_version() -> i64 {
    1
}

impl StoredReading {
    pub fn is_registered(&self) -> bool {
        self.class != super::UNREGISTERED_CLASS
    }
}
