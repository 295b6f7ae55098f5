//! Plain data shared by every function: names, telemetry readings, devices.

mod device;
mod telemetry;
mod thing;

pub use device::{
    validate_label, Device, DeviceRegistration, DeviceState, InvalidLabel, MAX_LABEL_LEN, UNREGISTERED_CLASS,
};
pub use telemetry::{MessageId, Metric, Reading, ReadingFlags, StoredReading};
pub use thing::{InvalidThingName, ThingName};
