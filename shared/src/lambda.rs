//! What every Lambda function shares: cold-start wiring (tracing, the backend chosen once by
//! `FLEET_BACKEND`, one `aws_config` load), the SQS partial-batch response, and the mapping
//! of a handler's typed error to a `lambda_runtime::Diagnostic`. A function's crate holds only
//! what is its own: its `Deps`, its handler and its tests.

use std::fmt::Display;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse};
use lambda_runtime::Diagnostic;

use crate::env::{BackendKind, ConfigError, Env};
use crate::error::StoreError;

#[cfg(feature = "test-support")]
pub mod emulator;

/// Start the tracing subscriber Lambda expects (JSON when the template sets `LogFormat: JSON`).
pub fn init_tracing() {
    lambda_runtime::tracing::init_default_subscriber();
}

/// The backend a function runs on, connected once per cold start. A function's `Deps` takes
/// what it uses from it: AWS adapters from the one `SdkConfig`, or the one SQLite database.
/// Built once per process, so the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    #[cfg(feature = "aws")]
    Aws(AwsBackend),
    #[cfg(feature = "embedded")]
    Embedded(EmbeddedBackend),
}

/// One `aws_config` load; every adapter derives its client from it.
#[cfg(feature = "aws")]
pub struct AwsBackend {
    pub sdk: aws_config::SdkConfig,
    pub env: Env,
}

/// The embedded database every port of a function shares.
#[cfg(feature = "embedded")]
pub struct EmbeddedBackend {
    pub db: crate::adapters::embedded::SqliteStore,
    pub env: Env,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("FLEET_BACKEND={0} is not compiled into this binary (build it with the cargo feature \"{0}\")")]
    NotCompiled(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(feature = "aws")]
impl From<crate::adapters::aws::timestream::TimestreamStartError> for StartupError {
    fn from(e: crate::adapters::aws::timestream::TimestreamStartError) -> Self {
        use crate::adapters::aws::timestream::TimestreamStartError as T;
        match e {
            T::Config(c) => StartupError::Config(c),
            T::Store(s) => StartupError::Store(s),
        }
    }
}

impl Backend {
    /// Read `FLEET_BACKEND` and connect it.
    pub async fn from_env() -> Result<Self, StartupError> {
        Self::connect(Env::process()).await
    }

    pub async fn connect(env: Env) -> Result<Self, StartupError> {
        match env.backend()? {
            #[cfg(feature = "aws")]
            BackendKind::Aws => {
                Ok(Backend::Aws(AwsBackend { sdk: crate::adapters::aws::load_sdk_config().await, env }))
            }
            #[cfg(feature = "embedded")]
            BackendKind::Embedded { db_path } => Ok(Backend::Embedded(EmbeddedBackend {
                db: crate::adapters::embedded::SqliteStore::open(&db_path)?,
                env,
            })),
            #[allow(unreachable_patterns)]
            other => Err(StartupError::NotCompiled(other.name())),
        }
    }
}

/// The EMF line of a cold start that failed: `InitFailed` = 1 for this stage and function
/// (the template alarms on it). The stage is `unknown` when `FLEET_STAGE` itself is missing.
pub fn init_failed_line(function: &str, env: &Env, timestamp_ms: i64) -> String {
    let stage = env.optional("FLEET_STAGE").unwrap_or_else(|| "unknown".to_owned());
    crate::metrics::emf_line(
        timestamp_ms,
        &[("Stage", stage.as_str()), ("Function", function)],
        &[("InitFailed", 1.0, crate::metrics::Unit::Count)],
    )
}

/// Report a cold start that cannot become ready, then hand the error back for `main` to
/// return (Lambda then records the init failure): the error in the log, and the
/// `InitFailed` metric, so a broken deploy pages someone instead of failing every event quietly.
pub fn init_failed<E: Display>(function: &str, env: &Env, error: E) -> E {
    use std::io::Write;
    tracing::error!(function, error = %error, "cold start failed");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", init_failed_line(function, env, crate::time::now_ms()));
    let _ = out.flush();
    error
}

/// The SQS answer naming exactly the messages to retry (`ReportBatchItemFailures`).
pub fn batch_response<'a>(failed_message_ids: impl IntoIterator<Item = &'a str>) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    for id in failed_message_ids {
        let mut failure = BatchItemFailure::default();
        failure.item_identifier = id.to_owned();
        response.batch_item_failures.push(failure);
    }
    response
}

/// A handler error with a stable `errorType` for Lambda (retries, destinations, alarms).
pub trait ErrorType: Display {
    /// e.g. `"Retryable"`, `"InvalidEvent"`, `"InvalidPayload"`.
    fn error_type(&self) -> &'static str;
}

/// The `Diagnostic` Lambda reports for a handler error.
pub fn diagnostic(e: &impl ErrorType) -> Diagnostic {
    Diagnostic { error_type: e.error_type().to_owned(), error_message: e.to_string() }
}

/// How a handler fails on purpose: a store failed transiently, so the event must come again
/// (Lambda retries a direct invocation; `errorType: Retryable`). Bad input is answered, never
/// raised; an SQS batch names its failed messages instead.
#[derive(Debug, thiserror::Error)]
#[error("{what}, retry: {source}")]
pub struct Retryable {
    /// What did not happen, e.g. "telemetry not stored".
    pub what: &'static str,
    #[source]
    pub source: std::sync::Arc<StoreError>,
}

impl ErrorType for Retryable {
    fn error_type(&self) -> &'static str {
        "Retryable"
    }
}

impl From<Retryable> for Diagnostic {
    fn from(e: Retryable) -> Self {
        diagnostic(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_response_names_only_the_given_messages() {
        let r = batch_response(["m-2", "m-5"]);
        let ids: Vec<&str> = r.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
        assert_eq!(ids, ["m-2", "m-5"]);
        assert!(batch_response([]).batch_item_failures.is_empty());
    }

    #[tokio::test]
    async fn an_unknown_backend_fails_start_up_naming_the_variable() {
        let err = Backend::connect(Env::from_pairs(&[("FLEET_BACKEND", "mysql")])).await.err();
        assert!(err.is_some_and(|e| e.to_string().contains("FLEET_BACKEND")));
    }

    struct Boom;
    impl Display for Boom {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("store down")
        }
    }
    impl ErrorType for Boom {
        fn error_type(&self) -> &'static str {
            "Retryable"
        }
    }

    #[test]
    fn a_failed_cold_start_counts_init_failed_for_its_stage_and_function() -> serde_json::Result<()> {
        let env = Env::from_pairs(&[("FLEET_STAGE", "prod")]);
        let v: serde_json::Value = serde_json::from_str(&init_failed_line("ingest-telemetry", &env, 7))?;
        assert_eq!(v["InitFailed"], 1.0);
        assert_eq!((v["Stage"].as_str(), v["Function"].as_str()), (Some("prod"), Some("ingest-telemetry")));
        assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"], "InitFailed");
        let v: serde_json::Value = serde_json::from_str(&init_failed_line("f", &Env::from_pairs(&[]), 7))?;
        assert_eq!(v["Stage"], "unknown");
        Ok(())
    }

    #[test]
    fn diagnostics_carry_the_stable_error_type() {
        let d = diagnostic(&Boom);
        assert_eq!((d.error_type.as_str(), d.error_message.as_str()), ("Retryable", "store down"));
    }
}
