//! [`Store`]: the backend `Config` selects, built once per cold start, implementing every port
//! by delegating to the AWS or the embedded adapters (static dispatch, no boxing).

use std::collections::HashMap;

use crate::config::{Backend, Config};
use crate::error::StoreError;
use crate::ingest::{ArchiveObject, QuarantineLine};
use crate::model::{Device, DeviceRegistration, DeviceState, StoredReading, ThingName};
use crate::ports::{
    ArchiveReader, DeviceAdmin, DeviceRegistry, FleetQuery, Quarantine, RawArchive, TelemetrySink,
    WriteStatus,
};

#[cfg(feature = "aws")]
use crate::adapters::aws::AwsStore;
#[cfg(feature = "embedded")]
use crate::adapters::embedded::SqliteStore;

#[derive(Clone)]
pub enum Store {
    #[cfg(feature = "aws")]
    Aws(AwsStore),
    #[cfg(feature = "embedded")]
    Embedded(SqliteStore),
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("backend {0} is not compiled into this binary (cargo feature missing)")]
    NotCompiled(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Connect the configured backend: one `aws_config` load, or one SQLite open.
    pub async fn connect(config: &Config) -> Result<Self, StartupError> {
        match &config.backend {
            #[cfg(feature = "aws")]
            Backend::Aws(resources) => Ok(Store::Aws(AwsStore::from_env(resources.clone()).await?)),
            #[cfg(not(feature = "aws"))]
            Backend::Aws(_) => Err(StartupError::NotCompiled("aws")),
            #[cfg(feature = "embedded")]
            Backend::Embedded { db_path } => Ok(Store::Embedded(SqliteStore::open(db_path)?)),
            #[cfg(not(feature = "embedded"))]
            Backend::Embedded { .. } => Err(StartupError::NotCompiled("embedded")),
        }
    }
}

/// Forward a call to whichever backend this is.
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            #[cfg(feature = "aws")]
            Store::Aws($s) => $call,
            #[cfg(feature = "embedded")]
            Store::Embedded($s) => $call,
        }
    };
}

impl DeviceRegistry for Store {
    async fn get_many(&self, things: &[ThingName]) -> Result<HashMap<ThingName, Device>, StoreError> {
        delegate!(self, s => s.get_many(things).await)
    }
    async fn record_states(&self, states: &[(ThingName, DeviceState)]) -> Vec<(ThingName, StoreError)> {
        delegate!(self, s => s.record_states(states).await)
    }
}

impl TelemetrySink for Store {
    async fn write(&self, readings: &[StoredReading]) -> Result<Vec<WriteStatus>, StoreError> {
        delegate!(self, s => s.write(readings).await)
    }
}

impl RawArchive for Store {
    async fn put_raw(&self, object: &ArchiveObject) -> Result<(), StoreError> {
        delegate!(self, s => s.put_raw(object).await)
    }
}

impl ArchiveReader for Store {
    async fn archive_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        delegate!(self, s => s.archive_keys(prefix).await)
    }
    async fn archive_object(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        delegate!(self, s => s.archive_object(key).await)
    }
}

impl Quarantine for Store {
    async fn put_quarantined(&self, lines: &[QuarantineLine], received_ms: i64) -> Result<(), StoreError> {
        delegate!(self, s => s.put_quarantined(lines, received_ms).await)
    }
}

impl DeviceAdmin for Store {
    async fn register(&self, devices: &[(ThingName, DeviceRegistration)]) -> Result<(), StoreError> {
        delegate!(self, s => s.register(devices).await)
    }
    async fn device(&self, thing: &ThingName) -> Result<Option<Device>, StoreError> {
        delegate!(self, s => s.device(thing).await)
    }
    async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        delegate!(self, s => s.devices().await)
    }
}

impl FleetQuery for Store {
    async fn telemetry(
        &self,
        thing: &ThingName,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredReading>, StoreError> {
        delegate!(self, s => s.telemetry(thing, since_ms, limit).await)
    }
    async fn quarantined(&self, since_ms: i64) -> Result<Vec<QuarantineLine>, StoreError> {
        delegate!(self, s => s.quarantined(since_ms).await)
    }
}
