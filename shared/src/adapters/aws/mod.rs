//! AWS adapters: DynamoDB (devices), Timestream (hot telemetry), S3 (raw archive and
//! quarantine). SDK ↔ domain mapping happens only here. One `aws_config` load per process;
//! every client derives from it. Endpoints follow the SDK's `AWS_ENDPOINT_URL*` variables.

#[cfg(feature = "test-support")]
pub mod counting;
pub mod dynamodb;
pub mod s3;
pub mod timestream;

use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

use crate::config::AwsResources;
use crate::error::StoreError;

/// Attempts for a batch call whose unprocessed part is resubmitted (UnprocessedItems/Keys).
pub const MAX_BATCH_ATTEMPTS: u32 = 8;
/// Concurrent requests one adapter call may have in flight.
pub const MAX_CONCURRENT_REQUESTS: usize = 8;

/// All AWS clients, derived from one `SdkConfig`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AwsStore {
    pub(crate) dynamodb: aws_sdk_dynamodb::Client,
    pub(crate) timestream: aws_sdk_timestreamwrite::Client,
    /// Built on first use: only operators query, and a function should not pay for the
    /// query endpoint discovery at every cold start.
    timestream_query: tokio::sync::OnceCell<aws_sdk_timestreamquery::Client>,
    /// The config the query client is built from (`None` when it was injected ready).
    sdk_config: Option<std::sync::Arc<SdkConfig>>,
    pub(crate) s3: aws_sdk_s3::Client,
    pub(crate) resources: AwsResources,
}

impl AwsStore {
    /// Load the SDK config from the environment once and build every client from it.
    pub async fn from_env(resources: AwsResources) -> Result<Self, StoreError> {
        let config = aws_config::load_defaults(BehaviorVersion::latest()).await;
        Self::from_sdk_config(&config, resources).await
    }

    /// Timestream needs endpoint discovery against real AWS; discovery would replace an
    /// endpoint override (a moto server) with AWS's own host, so it is only enabled when no
    /// override is set.
    pub async fn from_sdk_config(config: &SdkConfig, resources: AwsResources) -> Result<Self, StoreError> {
        let overridden =
            |service_var: &str| config.endpoint_url().is_some() || std::env::var_os(service_var).is_some();
        let mut timestream = aws_sdk_timestreamwrite::Client::new(config);
        if !overridden("AWS_ENDPOINT_URL_TIMESTREAM_WRITE") {
            let (client, reload) = timestream
                .with_endpoint_discovery_enabled()
                .await
                .map_err(|e| StoreError::transient("timestream endpoint discovery", e))?;
            tokio::spawn(reload.reload_task());
            timestream = client;
        }
        // Custom S3 endpoints (moto, MinIO) are addressed path-style; AWS itself virtual-host style.
        let s3_config = aws_sdk_s3::config::Builder::from(config)
            .force_path_style(overridden("AWS_ENDPOINT_URL_S3"))
            .build();
        Ok(Self {
            dynamodb: aws_sdk_dynamodb::Client::new(config),
            timestream,
            timestream_query: tokio::sync::OnceCell::new(),
            sdk_config: Some(std::sync::Arc::new(config.clone())),
            s3: aws_sdk_s3::Client::from_conf(s3_config),
            resources,
        })
    }

    /// The Timestream query client, with endpoint discovery unless an endpoint override is set.
    pub(crate) async fn query_client(&self) -> Result<&aws_sdk_timestreamquery::Client, StoreError> {
        self.timestream_query
            .get_or_try_init(|| async {
                let config = self
                    .sdk_config
                    .as_ref()
                    .ok_or_else(|| StoreError::permanent("timestream query", "no query client configured"))?;
                let client = aws_sdk_timestreamquery::Client::new(config);
                if config.endpoint_url().is_some()
                    || std::env::var_os("AWS_ENDPOINT_URL_TIMESTREAM_QUERY").is_some()
                {
                    return Ok(client);
                }
                let (client, reload) = client
                    .with_endpoint_discovery_enabled()
                    .await
                    .map_err(|e| StoreError::transient("timestream-query endpoint discovery", e))?;
                tokio::spawn(reload.reload_task());
                Ok(client)
            })
            .await
    }

    /// Build from ready clients (tests inject mocked or loopback clients here).
    pub fn from_clients(
        dynamodb: aws_sdk_dynamodb::Client,
        timestream: aws_sdk_timestreamwrite::Client,
        timestream_query: aws_sdk_timestreamquery::Client,
        s3: aws_sdk_s3::Client,
        resources: AwsResources,
    ) -> Self {
        Self {
            dynamodb,
            timestream,
            timestream_query: tokio::sync::OnceCell::new_with(Some(timestream_query)),
            sdk_config: None,
            s3,
            resources,
        }
    }
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

/// Exponential backoff before resubmitting the unprocessed part of a batch call.
pub(crate) async fn backoff(attempt: u32) {
    let ms = (25u64 << attempt.min(6)).min(1_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[cfg(test)]
mod mock_tests;
