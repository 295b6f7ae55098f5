//! The embedded backend: every port on one SQLite file (WAL mode, migrated schema), for the
//! local stack, `cargo lambda watch --features embedded` and tests. No AWS account needed.

mod campaigns;
mod certs;
mod commands;
mod health;
mod jobs;
mod local_shadows;
#[cfg(feature = "mqtt")]
mod mqtt;
mod presence;
mod registry;
mod sqlite;
mod twins;

pub use jobs::{
    DeviceStatus, ExecutionEvent, ExecutionUpdate, JobEvent, JobExecution, JobOutbox, JobsError, StartNext,
    StatusDetails, SweepReport, ThingNotice, UpdateRefused,
};
pub use local_shadows::LocalShadow;
#[cfg(feature = "mqtt")]
pub use mqtt::{MqttPublisher, LOCAL_OPERATOR_USERNAME};
pub use registry::{local_certificate_arn, LocalCredentials, LocalThing, LOCAL_ARN_PREFIX};
pub use sqlite::{ContentConflict, SqliteStore};
