//! CloudWatch Embedded Metric Format lines: metrics as structured log lines, no SDK call.
//! Every function emits through [`emf_line`]; what it counts lives with its capability
//! (e.g. `ingest::metrics`).

use serde_json::{json, Map, Value};

pub const NAMESPACE: &str = "Fleetline";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
    Seconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
            Unit::Seconds => "Seconds",
        }
    }
}

/// One EMF line: the given dimensions and metrics, at `timestamp_ms`.
pub fn emf_line(timestamp_ms: i64, dimensions: &[(&str, &str)], metrics: &[(&str, f64, Unit)]) -> String {
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [dimensions.iter().map(|(k, _)| *k).collect::<Vec<_>>()],
                "Metrics": metrics.iter().map(|(n, _, u)| json!({"Name": n, "Unit": u.as_str()})).collect::<Vec<_>>(),
            }]
        }),
    );
    for (k, v) in dimensions {
        root.insert((*k).into(), Value::from(*v));
    }
    for (n, v, _) in metrics {
        root.insert((*n).into(), Value::from(*v));
    }
    Value::Object(root).to_string()
}

/// One set of metrics sharing dimensions and a timestamp: one EMF line.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSet {
    pub timestamp_ms: i64,
    pub dimensions: Vec<(&'static str, String)>,
    pub values: Vec<(&'static str, f64, Unit)>,
}

impl MetricSet {
    pub fn to_emf_line(&self) -> String {
        self.to_emf_line_in(None)
    }

    /// The EMF line with the deployment's `Stage` as the first dimension, so two stages in one
    /// account never add up into one metric (or one alarm).
    pub fn to_emf_line_in(&self, stage: Option<&str>) -> String {
        let dims: Vec<(&str, &str)> = stage
            .map(|s| ("Stage", s))
            .into_iter()
            .chain(self.dimensions.iter().map(|(k, v)| (*k, v.as_str())))
            .collect();
        emf_line(self.timestamp_ms, &dims, &self.values)
    }

    pub fn dimension(&self, name: &str) -> Option<&str> {
        self.dimensions.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
}

/// Where a function's metrics go: stdout as EMF in Lambda (CloudWatch reads them from the
/// log), a collector in the local stack (its dashboard counts them), nowhere in tests.
#[derive(Clone, Default)]
pub enum MetricsOut {
    /// EMF on stdout, every metric with the deployment's `Stage` dimension.
    Stdout {
        stage: String,
    },
    #[default]
    Off,
    Collect(std::sync::Arc<dyn Fn(&MetricSet) + Send + Sync>),
}

impl std::fmt::Debug for MetricsOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MetricsOut::Stdout { .. } => "Stdout",
            MetricsOut::Off => "Off",
            MetricsOut::Collect(_) => "Collect",
        })
    }
}

impl MetricsOut {
    /// EMF on stdout for the stage `FLEET_STAGE` names (the template sets it for every function).
    pub fn stdout(env: &crate::Env) -> Result<Self, crate::env::ConfigError> {
        Ok(MetricsOut::Stdout { stage: env.required("FLEET_STAGE")? })
    }

    pub fn emit(&self, sets: &[MetricSet]) {
        match self {
            MetricsOut::Stdout { stage } => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                for s in sets {
                    let _ = writeln!(out, "{}", s.to_emf_line_in(Some(stage)));
                }
                let _ = out.flush();
            }
            MetricsOut::Off => {}
            MetricsOut::Collect(f) => sets.iter().for_each(|s| f(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declares_dimensions_and_metrics_in_the_emf_header() -> serde_json::Result<()> {
        let line = emf_line(5, &[("Function", "f")], &[("Count", 2.0, Unit::Count)]);
        let v: Value = serde_json::from_str(&line)?;
        assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0][0], "Function");
        assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"], "Count");
        assert_eq!(
            (v["Function"].as_str(), v["Count"].as_f64(), v["_aws"]["Timestamp"].as_i64()),
            (Some("f"), Some(2.0), Some(5))
        );
        Ok(())
    }

    #[test]
    fn a_deployed_function_puts_its_stage_first_in_every_metric() -> anyhow::Result<()> {
        let set = MetricSet {
            timestamp_ms: 5,
            dimensions: vec![("Function", "f".to_owned())],
            values: vec![("Failed", 1.0, Unit::Count)],
        };
        let v: Value = serde_json::from_str(&set.to_emf_line_in(Some("prod")))?;
        assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0], json!(["Stage", "Function"]));
        assert_eq!((v["Stage"].as_str(), v["Function"].as_str()), (Some("prod"), Some("f")));
        let missing = MetricsOut::stdout(&crate::Env::from_pairs(&[])).err();
        assert_eq!(missing, Some(crate::env::ConfigError::Missing("FLEET_STAGE")));
        Ok(())
    }
}
