//! Reading configuration from the environment, once per cold start. Each function and each
//! adapter reads only its own variables through [`Env`]; a missing one is an error naming it.
//! Nothing falls back silently. Tests build an [`Env`] from a map.
//!
//! | variable | read by | meaning |
//! |---|---|---|
//! | `FLEET_BACKEND` | every function, fleetctl | `aws` or `embedded` |
//! | `FLEET_DB` | embedded backend | SQLite file path |
//! | `FLEET_DEVICES_TABLE` | `DevicesTable` | DynamoDB Devices table |
//! | `FLEET_STAGE` | `MetricsOut::stdout`, init-failure metric | the deployment stage: `Stage` dimension of every custom metric |
//! | `FLEET_HOT_STORE` | `HotStore`, `TelemetryReader` | `timestream` or `none` (the template's `HotStore`) |
//! | `FLEET_TELEMETRY_DB`, `FLEET_TELEMETRY_TABLE` | `TimestreamSink`, `TimestreamQuery` | Timestream database and table (`timestream` only) |
//! | `FLEET_ARCHIVE_BUCKET` | `S3Archive` | S3 bucket for `raw/` and `quarantine/` |
//! | `FLEET_SKEW_TOLERANCE_S`, `FLEET_HOT_WINDOW_DAYS` | ingest-telemetry | its time rules (`IngestPolicy::from_env`) |
//! | `FLEET_REGISTRATION_CACHE_S` | ingest-telemetry | how long it keeps the registrations it read (`registration_cache_ttl`) |
//!
//! AWS endpoints follow the SDK's own `AWS_ENDPOINT_URL*` variables.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is not set")]
    Missing(&'static str),
    #[error("environment variable {var}={value:?} is invalid: expected {expected}")]
    Invalid { var: &'static str, value: String, expected: &'static str },
}

type Lookup = dyn Fn(&str) -> Option<String> + Send + Sync;

/// A source of variables: the process environment, or a map in tests.
#[derive(Clone)]
pub struct Env {
    get: Arc<Lookup>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Env")
    }
}

impl Env {
    pub fn process() -> Self {
        Self::from_fn(|k| std::env::var(k).ok())
    }

    pub fn from_fn(get: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        Self { get: Arc::new(get) }
    }

    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::from_fn(move |k| map.get(k).cloned())
    }

    /// A set, non-empty variable.
    pub fn optional(&self, var: &str) -> Option<String> {
        (self.get)(var).filter(|v| !v.is_empty())
    }

    pub fn required(&self, var: &'static str) -> Result<String, ConfigError> {
        self.optional(var).ok_or(ConfigError::Missing(var))
    }

    /// A positive whole number, or `default` when unset.
    pub fn positive(&self, var: &'static str, default: i64) -> Result<i64, ConfigError> {
        match self.optional(var) {
            None => Ok(default),
            Some(v) => v.parse::<i64>().ok().filter(|n| *n > 0).ok_or(ConfigError::Invalid {
                var,
                value: v,
                expected: "a positive integer",
            }),
        }
    }

    /// Which backend `FLEET_BACKEND` names.
    pub fn backend(&self) -> Result<BackendKind, ConfigError> {
        match self.required("FLEET_BACKEND")?.as_str() {
            "aws" => Ok(BackendKind::Aws),
            "embedded" => Ok(BackendKind::Embedded { db_path: PathBuf::from(self.required("FLEET_DB")?) }),
            other => Err(ConfigError::Invalid {
                var: "FLEET_BACKEND",
                value: other.to_owned(),
                expected: "aws or embedded",
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    Aws,
    Embedded { db_path: PathBuf },
}

impl BackendKind {
    pub fn name(&self) -> &'static str {
        match self {
            BackendKind::Aws => "aws",
            BackendKind::Embedded { .. } => "embedded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_backend_is_an_error_naming_the_variable() {
        let err = Env::from_pairs(&[]).backend().unwrap_err();
        assert_eq!(err, ConfigError::Missing("FLEET_BACKEND"));
        assert!(err.to_string().contains("FLEET_BACKEND"));
    }

    #[test]
    fn unknown_backend_is_an_error_naming_the_variable() {
        let err = Env::from_pairs(&[("FLEET_BACKEND", "sqlite")]).backend().unwrap_err();
        assert!(err.to_string().contains("FLEET_BACKEND=\"sqlite\""), "{err}");
    }

    #[test]
    fn embedded_backend_needs_its_database_file() -> Result<(), ConfigError> {
        let err = Env::from_pairs(&[("FLEET_BACKEND", "embedded")]).backend().unwrap_err();
        assert_eq!(err, ConfigError::Missing("FLEET_DB"));
        let kind =
            Env::from_pairs(&[("FLEET_BACKEND", "embedded"), ("FLEET_DB", "/tmp/x.sqlite")]).backend()?;
        assert_eq!(kind, BackendKind::Embedded { db_path: "/tmp/x.sqlite".into() });
        Ok(())
    }

    #[test]
    fn aws_backend_requires_no_resource_variable_of_its_own() -> Result<(), ConfigError> {
        // Resources are read by the adapters a function builds, not by the backend choice.
        assert_eq!(Env::from_pairs(&[("FLEET_BACKEND", "aws")]).backend()?, BackendKind::Aws);
        Ok(())
    }

    #[test]
    fn rejects_a_non_numeric_or_non_positive_number() {
        let env = Env::from_pairs(&[("A", "a year"), ("B", "0"), ("C", "7")]);
        assert!(matches!(env.positive("A", 1), Err(ConfigError::Invalid { var: "A", .. })));
        assert!(env.positive("B", 1).is_err());
        assert_eq!((env.positive("C", 1), env.positive("D", 3)), (Ok(7), Ok(3)));
    }
}
