//! The hot store is a deploy-time choice (the template's `HotStore` parameter, given to every
//! function as `FLEET_HOT_STORE`):
//! - `timestream`: readings are also written to Timestream for LiveAnalytics and read back
//!   with its query API;
//! - `none`: the raw archive (written first, always) is the only store. Nothing touches
//!   Timestream — no client, no endpoint discovery at cold start — and telemetry is read back
//!   from the archive ([`ArchiveTelemetry`]) or, fleet-wide, with Athena over the Glue table.
//!
//! Without a hot store there is no cross-batch duplicate detection: a redelivered message is
//! counted as accepted again and is archived again (same line). Queries collapse repeats on
//! `(thing, boot, seq)`; [`ArchiveTelemetry`] does, and the README's Athena queries do.

use aws_config::SdkConfig;

use super::timestream::TimestreamStartError;
use super::TimestreamSink;
use crate::env::{ConfigError, Env};
use crate::ingest::IngestPolicy;
use crate::model::StoredReading;
use crate::ports::{TelemetrySink, WriteStatus};

/// Which hot store a deployment has: `FLEET_HOT_STORE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotStoreKind {
    Timestream,
    None,
}

impl HotStoreKind {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        match env.required("FLEET_HOT_STORE")?.as_str() {
            "timestream" => Ok(Self::Timestream),
            "none" => Ok(Self::None),
            other => Err(ConfigError::Invalid {
                var: "FLEET_HOT_STORE",
                value: other.to_owned(),
                expected: "timestream or none",
            }),
        }
    }

    /// The ingest time rules for this store: without a hot store nothing is too old.
    pub fn policy(self, policy: IngestPolicy) -> IngestPolicy {
        match self {
            Self::Timestream => policy,
            Self::None => policy.unbounded_hot_window(),
        }
    }
}

/// Where ingest writes after the archive.
#[derive(Debug, Clone)]
pub enum HotStore {
    Timestream(TimestreamSink),
    /// No hot store: the archive, written before the sink is called, holds the reading.
    None,
}

impl HotStore {
    /// `FLEET_HOT_STORE`, and for `timestream` the sink's own variables.
    pub async fn from_env(sdk: &SdkConfig, env: &Env) -> Result<Self, TimestreamStartError> {
        Ok(match HotStoreKind::from_env(env)? {
            HotStoreKind::Timestream => Self::Timestream(TimestreamSink::from_env(sdk, env).await?),
            HotStoreKind::None => Self::None,
        })
    }
}

impl TelemetrySink for HotStore {
    async fn write(&self, readings: &[StoredReading]) -> Vec<WriteStatus> {
        match self {
            Self::Timestream(sink) => sink.write(readings).await,
            Self::None => vec![WriteStatus::Written; readings.len()],
        }
    }
}

/// Reading back (operators only: cargo feature `operator`).
#[cfg(feature = "operator")]
mod reader {
    use aws_config::SdkConfig;

    use super::HotStoreKind;
    use crate::adapters::aws::{DevicesTable, S3Archive, TimestreamQuery};
    use crate::env::{ConfigError, Env};
    use crate::error::StoreError;
    use crate::ingest::{ArchiveTelemetry, IngestPolicy};
    use crate::model::{StoredReading, ThingName};
    use crate::ports::TelemetryQuery;

    /// Where stored telemetry is read back from: the deployed hot store, or the archive.
    /// Built once per command: the size difference between the variants costs nothing.
    #[allow(clippy::large_enum_variant)]
    pub enum TelemetryReader {
        Timestream(TimestreamQuery),
        Archive(ArchiveTelemetry<S3Archive, DevicesTable>),
    }

    impl TelemetryReader {
        /// `FLEET_HOT_STORE`; Timestream's variables, or the archive bucket and Devices table.
        pub fn from_env(sdk: &SdkConfig, env: &Env, policy: IngestPolicy) -> Result<Self, ConfigError> {
            Ok(match HotStoreKind::from_env(env)? {
                HotStoreKind::Timestream => Self::Timestream(TimestreamQuery::from_env(sdk, env)?),
                HotStoreKind::None => Self::Archive(ArchiveTelemetry {
                    archive: S3Archive::from_env(sdk, env)?,
                    registry: DevicesTable::from_env(sdk, env)?,
                    policy: HotStoreKind::None.policy(policy),
                    clock: crate::time::now_ms,
                }),
            })
        }
    }

    impl TelemetryQuery for TelemetryReader {
        async fn telemetry(
            &self,
            thing: &ThingName,
            since_ms: i64,
            limit: usize,
        ) -> Result<Vec<StoredReading>, StoreError> {
            match self {
                Self::Timestream(q) => q.telemetry(thing, since_ms, limit).await,
                Self::Archive(a) => a.telemetry(thing, since_ms, limit).await,
            }
        }
    }
}
#[cfg(feature = "operator")]
pub use reader::TelemetryReader;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hot_store_is_named_by_its_variable() {
        let kind = |v: &str| HotStoreKind::from_env(&Env::from_pairs(&[("FLEET_HOT_STORE", v)]));
        assert_eq!(kind("none"), Ok(HotStoreKind::None));
        assert_eq!(kind("timestream"), Ok(HotStoreKind::Timestream));
        assert!(matches!(kind("influx"), Err(ConfigError::Invalid { var: "FLEET_HOT_STORE", .. })));
        assert_eq!(
            HotStoreKind::from_env(&Env::from_pairs(&[])),
            Err(ConfigError::Missing("FLEET_HOT_STORE"))
        );
    }

    #[test]
    fn without_a_hot_store_nothing_is_late() {
        let policy = HotStoreKind::None.policy(IngestPolicy::default());
        assert!(policy.hot_window_ms > IngestPolicy::default().hot_window_ms * 1000);
        assert_eq!(HotStoreKind::Timestream.policy(IngestPolicy::default()), IngestPolicy::default());
    }

    #[tokio::test]
    async fn building_without_a_hot_store_reads_no_timestream_variable_and_makes_no_call() {
        // No FLEET_TELEMETRY_* and no endpoint: a Timestream client would fail or call out.
        let sdk = SdkConfig::builder().behavior_version(aws_config::BehaviorVersion::latest()).build();
        let env = Env::from_pairs(&[("FLEET_HOT_STORE", "none")]);
        assert!(matches!(HotStore::from_env(&sdk, &env).await, Ok(HotStore::None)));
    }
}
