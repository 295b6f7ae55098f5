//! AWS adapters, one per resource, each built from the one `SdkConfig` a process loads:
//! [`DevicesTable`] (DynamoDB), [`TimestreamSink`] / [`TimestreamQuery`] (Timestream),
//! [`S3Archive`] (S3 `raw/` and `quarantine/`), [`TwinsTable`] (DynamoDB), [`CertificatesTable`]
//! (DynamoDB: allowlist, certificate inventory, provisioning audit), [`CampaignsTable`]
//! (DynamoDB: OTA campaigns), [`IotJobs`] (AWS IoT Jobs' control plane, through
//! [`SignedClient`]). A function builds only the adapters its ports
//! need, and each adapter reads only its own variables (`from_env`). SDK ↔ domain mapping
//! happens only here; service limits are named constants next to the adapter that respects
//! them. Endpoints follow the SDK's `AWS_ENDPOINT_URL*` variables.

pub mod campaigns;
pub mod certs;
pub mod commands;
#[cfg(feature = "test-support")]
pub mod counting;
pub mod devices;
pub mod health;
pub mod hot_store;
pub mod iot;
pub mod jobs;
pub mod s3;
#[cfg(feature = "shadows")]
pub mod shadows;
pub mod signed;
pub mod timestream;
#[cfg(feature = "operator")]
pub mod timestream_query;
pub mod twins;

use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use backon::{BackoffBuilder, ExponentialBuilder};

use crate::error::StoreError;

pub use campaigns::CampaignsTable;
pub use certs::CertificatesTable;
pub use commands::CommandsTable;
pub use devices::{registration_cache_ttl, DevicesTable, REGISTRATION_CACHE_TTL};
pub use health::{HealthTable, PresenceTables};
#[cfg(feature = "operator")]
pub use hot_store::TelemetryReader;
pub use hot_store::{HotStore, HotStoreKind};
pub use iot::IotControlPlane;
pub use jobs::IotJobs;
pub use s3::S3Archive;
#[cfg(feature = "shadows")]
pub use shadows::IotDataShadows;
pub use signed::{LambdaInvoker, SignedClient, SsmParameter};
pub use timestream::TimestreamSink;
#[cfg(feature = "operator")]
pub use timestream_query::TimestreamQuery;
pub use twins::TwinsTable;

/// Resubmissions of the unprocessed part of a batch call (UnprocessedItems/Keys).
pub const MAX_BATCH_RETRIES: usize = 8;
/// Concurrent requests one adapter call may have in flight.
pub const MAX_CONCURRENT_REQUESTS: usize = 8;

/// Load the SDK configuration once per process (region, credentials, endpoint overrides).
pub async fn load_sdk_config() -> SdkConfig {
    aws_config::load_defaults(BehaviorVersion::latest()).await
}

/// Whether an endpoint override applies to a service (all services, or just this one).
pub(crate) fn endpoint_overridden(config: &SdkConfig, service_var: &str) -> bool {
    config.endpoint_url().is_some() || std::env::var_os(service_var).is_some()
}

/// Error codes that mean "slow down and try again", across the services used here.
const RETRYABLE_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
    "InternalServerError",
    "InternalServerException",
    "ServiceUnavailable",
    "TransactionConflictException",
];

/// Keep the SDK error as the source, classified: can a retry help?
pub(crate) fn classify<E>(op: &'static str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(se) => {
            se.raw().status().is_server_error()
                || se.err().code().is_some_and(|c| RETRYABLE_CODES.contains(&c))
        }
        _ => false,
    };
    if transient {
        StoreError::transient(op, err)
    } else {
        StoreError::permanent(op, err)
    }
}

/// Delays before resubmitting the unprocessed part of a batch call: exponential from 25 ms,
/// capped at 1 s, with full jitter so concurrent invocations do not retry in lockstep.
pub(crate) fn batch_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(25))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(MAX_BATCH_RETRIES)
        .with_jitter()
        .build()
}

/// Every item a Query returns (all pages), each through `read` (`None` skips it), at most `limit`.
pub(crate) async fn query_items<T>(
    req: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
    op: &'static str,
    limit: usize,
    read: impl Fn(
        &std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
    ) -> Result<Option<T>, StoreError>,
) -> Result<Vec<T>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut pages = req.limit(limit.min(1_000) as i32).into_paginator().send();
    let mut out = Vec::new();
    while let Some(page) = pages.next().await {
        for item in page.map_err(|e| classify(op, e))?.items() {
            out.extend(read(item)?);
            if out.len() >= limit {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

/// BatchWriteItem of `requests` (≤ 25) to one table, resubmitting UnprocessedItems with backoff.
pub(crate) async fn batch_write(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    mut requests: Vec<aws_sdk_dynamodb::types::WriteRequest>,
) -> Result<(), StoreError> {
    const OP: &str = "dynamodb batch write";
    let mut delays = batch_backoff();
    loop {
        let out = client
            .batch_write_item()
            .request_items(table, requests)
            .send()
            .await
            .map_err(|e| classify(OP, e))?;
        match out.unprocessed_items.and_then(|mut u| u.remove(table)).filter(|r| !r.is_empty()) {
            None => return Ok(()),
            Some(rest) => {
                requests = rest;
                let Some(delay) = delays.next() else {
                    return Err(StoreError::transient(OP, "unprocessed items remained after retries"));
                };
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(all(test, feature = "operator"))]
mod mock_tests;

#[cfg(test)]
mod scripted;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_backoff_is_bounded_and_jittered() {
        let a: Vec<Duration> = batch_backoff().collect();
        let b: Vec<Duration> = batch_backoff().collect();
        assert_eq!(a.len(), MAX_BATCH_RETRIES);
        assert!(a.iter().all(|d| *d <= Duration::from_secs(2)), "{a:?}");
        assert_ne!(a, b, "two runs of jittered backoff should not match delay for delay");
    }
}
