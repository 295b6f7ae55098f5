//! Ports: small traits in domain types, one per capability and IAM grant. The AWS and the
//! embedded adapters implement the same traits and pass the same contract tests.
//!
//! | trait | AWS grant (template) |
//! |---|---|
//! | [`DeviceRegistry`] | `dynamodb:BatchGetItem`, `dynamodb:UpdateItem` on the Devices table |
//! | [`TelemetrySink`] | `timestream:WriteRecords` on the telemetry table (+ `DescribeEndpoints`) |
//! | [`RawArchive`] | `s3:PutObject` on `raw/*` |
//! | [`Quarantine`] | `s3:PutObject` on `quarantine/*` |
//! | [`ArchiveReader`] | `s3:ListBucket`, `s3:GetObject` on `raw/*` (replay, operators) |
//! | [`DeviceAdmin`] | `dynamodb:BatchWriteItem`, `Scan`, `GetItem` (operators, fleetctl) |
//! | [`FleetQuery`] | `timestream:Select`, `s3:ListBucket`/`GetObject` on `quarantine/*` (operators) |

use std::collections::HashMap;
use std::future::Future;

use crate::error::StoreError;
use crate::ingest::{ArchiveObject, QuarantineLine};
use crate::model::{Device, DeviceRegistration, DeviceState, StoredReading, ThingName};

/// What the ingest pipeline reads and writes about devices.
pub trait DeviceRegistry: Send + Sync {
    /// Look up many things at once (enrichment). Unknown things are simply absent.
    fn get_many(
        &self,
        things: &[ThingName],
    ) -> impl Future<Output = Result<HashMap<ThingName, Device>, StoreError>> + Send;

    /// Record each device's newest state, at most one write per device, never replacing a
    /// newer stored state (`last_ts_ms`). Creates the device item for unregistered things.
    /// Returns the devices whose write failed.
    fn record_states(
        &self,
        states: &[(ThingName, DeviceState)],
    ) -> impl Future<Output = Vec<(ThingName, StoreError)>> + Send;
}

/// How the hot store took one reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteStatus {
    /// Newly stored.
    Written,
    /// Already stored (same `(thing, boot, seq)`): nothing changed.
    Duplicate,
    /// Outside the time range the store accepts: kept in the archive only.
    TooLate,
    /// Not stored; retrying may succeed.
    Failed(String),
}

/// The hot time-series store.
pub trait TelemetrySink: Send + Sync {
    /// Write readings; the result has one status per input, in order. `Err` means no status
    /// is known and every reading should be retried.
    fn write(
        &self,
        readings: &[StoredReading],
    ) -> impl Future<Output = Result<Vec<WriteStatus>, StoreError>> + Send;
}

/// The cold archive of raw payloads: the source of truth that replays read.
pub trait RawArchive: Send + Sync {
    fn put_raw(&self, object: &ArchiveObject) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Reading the raw archive back: the source of truth a replay re-ingests.
pub trait ArchiveReader: Send + Sync {
    /// Keys of the archive objects under `prefix` (e.g. `raw/dt=2025-11-24/`), every page, in key order.
    fn archive_keys(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// One object's bytes (gzip NDJSON).
    fn archive_object(&self, key: &str) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send;
}

/// Where payloads that cannot be stored go, with their reasons.
pub trait Quarantine: Send + Sync {
    fn put_quarantined(
        &self,
        lines: &[QuarantineLine],
        received_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Operator writes and reads of the device registry.
pub trait DeviceAdmin: Send + Sync {
    fn register(
        &self,
        devices: &[(ThingName, DeviceRegistration)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn device(&self, thing: &ThingName) -> impl Future<Output = Result<Option<Device>, StoreError>> + Send;
    /// Every device, all pages, sorted by thing name.
    fn devices(&self) -> impl Future<Output = Result<Vec<Device>, StoreError>> + Send;
}

/// Operator reads of stored telemetry and quarantine.
pub trait FleetQuery: Send + Sync {
    /// A thing's readings with `time_ms >= since_ms`, oldest first, at most `limit`.
    fn telemetry(
        &self,
        thing: &ThingName,
        since_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredReading>, StoreError>> + Send;
    /// Quarantined messages received at or after `since_ms`, oldest first.
    fn quarantined(
        &self,
        since_ms: i64,
    ) -> impl Future<Output = Result<Vec<QuarantineLine>, StoreError>> + Send;
}
