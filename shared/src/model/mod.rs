//! Plain data shared by every function: names, telemetry readings, devices, twins, jobs.

mod cert;
mod device;
mod job;
mod telemetry;
mod thing;
mod twin;

pub use cert::{
    AllowlistEntry, CertStatus, Certificate, CertificateDetail, CertificateId, CertificatePage, Enrolment,
    InvalidCertificateId, RegisteredCertificate,
};
pub use device::{
    validate_label, Device, DeviceRegistration, DeviceState, InvalidLabel, MAX_LABEL_LEN, UNREGISTERED_CLASS,
};
pub use job::{
    ExecutionStatus, InvalidJob, InvalidJobId, JobCounts, JobId, JobProgress, JobStatus, NewJob,
    MAX_JOB_DOCUMENT_BYTES, MAX_JOB_ID_LEN, MAX_JOB_TARGETS, MAX_JOB_TIMEOUT_MINUTES, MAX_PER_MINUTE,
};
pub use telemetry::{MessageId, Metric, Reading, ReadingFlags, StoredReading};
pub use thing::{InvalidThingName, ThingName, MAX_THING_NAME_LEN};
pub use twin::{
    fingerprint, Divergence, DriftHistory, DriftSummary, Heard, InvalidShadowName, ShadowName, StaleAction,
    Twin, VersionDrift, MAX_SHADOW_NAME_LEN,
};
