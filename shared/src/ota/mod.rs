//! OTA campaigns: signed firmware manifests ([`manifest`]), the campaign state machine that
//! rolls one out in stages over IoT Jobs ([`campaign`]) and the engine that ticks it against
//! the ports ([`engine`]), and the health gate a stage asks before it widens ([`gate`]).
//!
//! A stage of a rollout puts new firmware on a canary cohort (e.g. `sensor/*/1.5.0`) while the
//! rest of the same devices (`sensor/*/1.4.2`) are the control. The gate compares the two over
//! the same window with fleet health's own numbers ([`crate::health::gate::burn_rate`]) and
//! answers advance, wait or roll back, with the readings it judged.
//!
//! A device's side of a job (feature `sim`, [`device`]): check the document and the manifest,
//! then install or refuse, answering IoT Jobs with a status and a reason code; and its side of a
//! certificate rotation job ([`rotate`]).

pub mod campaign;
#[cfg(feature = "sim")]
pub mod device;
pub mod engine;
pub mod gate;
pub mod manifest;
#[cfg(feature = "sim")]
pub mod rotate;

/// `n` registered sensors (`sensor-000`…, class `sensor`, region `eu-west`) on `fw`: the fleet
/// the OTA tests roll out over.
#[cfg(any(test, feature = "test-support"))]
pub fn test_sensors(n: usize, fw: &str) -> Vec<(crate::model::ThingName, crate::model::DeviceRegistration)> {
    (0..n)
        .map(|i| {
            let reg = crate::model::DeviceRegistration {
                class: "sensor".into(),
                region: "eu-west".into(),
                fw: fw.into(),
                registered_at_ms: 0,
            };
            (crate::model::ThingName::parse(&format!("sensor-{i:03}")).expect("a valid thing name"), reg)
        })
        .collect()
}
