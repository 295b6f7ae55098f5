//! Devices: what an operator registered, and what telemetry last told about them.

use serde::{Deserialize, Serialize};

use super::ThingName;

/// Class given to readings from things that were never registered.
pub const UNREGISTERED_CLASS: &str = "unregistered";

/// Longest class, region or firmware label: they become Timestream dimensions, and every
/// reading must fit one 2 KB record.
pub const MAX_LABEL_LEN: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: expected 1-{MAX_LABEL_LEN} characters of [A-Za-z0-9._-]")]
pub struct InvalidLabel {
    pub what: &'static str,
    pub value: String,
}

/// Check a class, region or firmware label.
pub fn validate_label(what: &'static str, value: &str) -> Result<(), InvalidLabel> {
    let ok = !value.is_empty()
        && value.len() <= MAX_LABEL_LEN
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidLabel { what, value: value.to_owned() })
    }
}

/// What an operator (or the provisioning hook) says about a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRegistration {
    pub class: String,
    pub region: String,
    /// Firmware the device was provisioned with.
    pub fw: String,
    pub registered_at_ms: i64,
}

/// What the newest telemetry said. Only ever replaced by a strictly newer reading
/// (ordered by `last_ts_ms`), so out-of-order delivery cannot move it backwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Stored time of the newest reading.
    pub last_ts_ms: i64,
    /// Arrival time of that reading.
    pub last_rx_ms: i64,
    pub boot: u32,
    pub seq: u64,
    pub battery_pct: Option<f64>,
    /// Firmware the device last reported.
    pub fw: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub thing: ThingName,
    /// `None` for a thing only known from its telemetry.
    pub registration: Option<DeviceRegistration>,
    pub state: Option<DeviceState>,
}

impl Device {
    pub fn class(&self) -> &str {
        self.registration.as_ref().map_or(UNREGISTERED_CLASS, |r| r.class.as_str())
    }

    pub fn region(&self) -> Option<&str> {
        self.registration.as_ref().map(|r| r.region.as_str())
    }
}
