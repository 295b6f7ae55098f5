//! Configuration, read once per cold start from the environment, and the backend it selects.
//!
//! | variable | required | meaning |
//! |---|---|---|
//! | `FLEET_BACKEND` | always | `aws` or `embedded`; nothing falls back silently |
//! | `FLEET_DB` | embedded | SQLite file path |
//! | `FLEET_DEVICES_TABLE` | aws | DynamoDB Devices table |
//! | `FLEET_TELEMETRY_DB`, `FLEET_TELEMETRY_TABLE` | aws | Timestream database and table |
//! | `FLEET_ARCHIVE_BUCKET` | aws | S3 bucket for `raw/` and `quarantine/` |
//! | `FLEET_SKEW_TOLERANCE_S` | no (300) | device clock ahead of arrival by more than this is skew |
//! | `FLEET_HOT_WINDOW_DAYS` | no (aws: 365, embedded: unlimited) | how far back the hot store accepts writes (Timestream magnetic retention) |
//!
//! AWS endpoints follow the SDK's own `AWS_ENDPOINT_URL*` variables.

use std::path::PathBuf;

use crate::ingest::IngestPolicy;

/// A window no reading is older than (about 10,000 years): "the store takes any time".
pub const UNLIMITED_WINDOW_DAYS: i64 = 10_000 * 366;
const MS_PER_DAY: i64 = 86_400_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsResources {
    pub devices_table: String,
    pub telemetry_database: String,
    pub telemetry_table: String,
    pub archive_bucket: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Aws(AwsResources),
    Embedded { db_path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub backend: Backend,
    pub policy: IngestPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is not set")]
    Missing(&'static str),
    #[error("environment variable {var}={value:?} is invalid: expected {expected}")]
    Invalid { var: &'static str, value: String, expected: &'static str },
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Build from any variable source (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let need = |k: &'static str| get(k).filter(|v| !v.is_empty()).ok_or(ConfigError::Missing(k));
        let number = |k: &'static str, default: i64| -> Result<i64, ConfigError> {
            match get(k).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(v) => v.parse::<i64>().ok().filter(|n| *n > 0).ok_or(ConfigError::Invalid {
                    var: k,
                    value: v,
                    expected: "a positive integer",
                }),
            }
        };
        let backend = match need("FLEET_BACKEND")?.as_str() {
            "aws" => Backend::Aws(AwsResources {
                devices_table: need("FLEET_DEVICES_TABLE")?,
                telemetry_database: need("FLEET_TELEMETRY_DB")?,
                telemetry_table: need("FLEET_TELEMETRY_TABLE")?,
                archive_bucket: need("FLEET_ARCHIVE_BUCKET")?,
            }),
            "embedded" => Backend::Embedded { db_path: PathBuf::from(need("FLEET_DB")?) },
            other => {
                return Err(ConfigError::Invalid {
                    var: "FLEET_BACKEND",
                    value: other.to_owned(),
                    expected: "aws or embedded",
                })
            }
        };
        let defaults = IngestPolicy::default();
        // Timestream takes writes as far back as its magnetic retention; SQLite takes any time.
        let default_window_days = match backend {
            Backend::Aws(_) => defaults.hot_window_ms / MS_PER_DAY,
            Backend::Embedded { .. } => UNLIMITED_WINDOW_DAYS,
        };
        Ok(Config {
            backend,
            policy: IngestPolicy {
                max_future_skew_ms: number("FLEET_SKEW_TOLERANCE_S", defaults.max_future_skew_ms / 1000)?
                    * 1000,
                hot_window_ms: number("FLEET_HOT_WINDOW_DAYS", default_window_days)?
                    .min(UNLIMITED_WINDOW_DAYS)
                    * MS_PER_DAY,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn missing_backend_is_an_error_naming_the_variable() {
        let err = Config::from_lookup(lookup(&[])).unwrap_err();
        assert_eq!(err, ConfigError::Missing("FLEET_BACKEND"));
        assert!(err.to_string().contains("FLEET_BACKEND"));
    }

    #[test]
    fn unknown_backend_is_an_error_naming_the_variable() {
        let err = Config::from_lookup(lookup(&[("FLEET_BACKEND", "sqlite")])).unwrap_err();
        assert!(err.to_string().contains("FLEET_BACKEND=\"sqlite\""), "{err}");
    }

    #[test]
    fn aws_backend_names_the_first_missing_resource() {
        let err = Config::from_lookup(lookup(&[("FLEET_BACKEND", "aws"), ("FLEET_DEVICES_TABLE", "d")]))
            .unwrap_err();
        assert_eq!(err, ConfigError::Missing("FLEET_TELEMETRY_DB"));
    }

    #[test]
    fn embedded_backend_reads_db_path_and_policy() -> Result<(), ConfigError> {
        let c = Config::from_lookup(lookup(&[
            ("FLEET_BACKEND", "embedded"),
            ("FLEET_DB", "/tmp/x.sqlite"),
            ("FLEET_SKEW_TOLERANCE_S", "60"),
        ]))?;
        assert_eq!(c.backend, Backend::Embedded { db_path: "/tmp/x.sqlite".into() });
        assert_eq!(c.policy.max_future_skew_ms, 60_000);
        assert_eq!(c.policy.hot_window_ms, UNLIMITED_WINDOW_DAYS * MS_PER_DAY);
        Ok(())
    }

    #[test]
    fn rejects_a_non_numeric_policy_value() {
        let err = Config::from_lookup(lookup(&[
            ("FLEET_BACKEND", "embedded"),
            ("FLEET_DB", "x"),
            ("FLEET_HOT_WINDOW_DAYS", "a year"),
        ]))
        .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { var: "FLEET_HOT_WINDOW_DAYS", .. }));
    }
}
