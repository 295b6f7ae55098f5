//! CloudWatch Embedded Metric Format lines: metrics as structured log lines, no SDK call.

use serde_json::{json, Map, Value};

use crate::ingest::{BatchOutcome, Reason};

pub const NAMESPACE: &str = "Fleetline";

#[derive(Debug, Clone, Copy)]
pub enum Unit {
    Count,
    Milliseconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
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

/// The per-batch ingest metrics: one line of totals, one line per quarantine reason.
pub fn ingest_batch_lines(
    function: &str,
    outcome: &BatchOutcome,
    duration_ms: f64,
    timestamp_ms: i64,
) -> Vec<String> {
    let dims = [("Function", function)];
    let mut lines = vec![emf_line(
        timestamp_ms,
        &dims,
        &[
            ("Messages", outcome.messages as f64, Unit::Count),
            ("Accepted", outcome.accepted as f64, Unit::Count),
            ("Duplicates", outcome.duplicates as f64, Unit::Count),
            ("Quarantined", outcome.quarantined.len() as f64, Unit::Count),
            ("SkewCorrected", outcome.skew_corrected as f64, Unit::Count),
            ("Late", outcome.late as f64, Unit::Count),
            ("UnknownDevices", outcome.unknown_devices as f64, Unit::Count),
            ("Failed", outcome.failed.len() as f64, Unit::Count),
            ("BatchDuration", duration_ms, Unit::Milliseconds),
        ],
    )];
    let mut by_reason: Vec<(Reason, usize)> = Vec::new();
    for q in &outcome.quarantined {
        for p in &q.problems {
            match by_reason.iter_mut().find(|(r, _)| *r == p.reason) {
                Some((_, n)) => *n += 1,
                None => by_reason.push((p.reason, 1)),
            }
        }
    }
    by_reason.sort();
    for (reason, n) in by_reason {
        lines.push(emf_line(
            timestamp_ms,
            &[("Function", function), ("Reason", reason.as_str())],
            &[("QuarantinedByReason", n as f64, Unit::Count)],
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{Problem, QuarantinedMessage};

    #[test]
    fn emits_totals_and_one_line_per_quarantine_reason() -> anyhow::Result<()> {
        // GIVEN a batch with two malformed messages and one spoofed one
        let q = |r| QuarantinedMessage {
            message_id: "m".into(),
            thing: None,
            problems: vec![Problem::new(r, None, "x")],
        };
        let outcome = BatchOutcome {
            messages: 5,
            accepted: 2,
            quarantined: vec![q(Reason::MalformedJson), q(Reason::MalformedJson), q(Reason::ThingMismatch)],
            ..BatchOutcome::default()
        };
        // WHEN
        let lines = ingest_batch_lines("ingest-telemetry", &outcome, 12.5, 1_764_000_000_000);
        // THEN
        assert_eq!(lines.len(), 3);
        let totals: Value = serde_json::from_str(&lines[0])?;
        assert_eq!(totals["Accepted"], 2.0);
        assert_eq!(totals["Quarantined"], 3.0);
        assert_eq!(totals["BatchDuration"], 12.5);
        assert_eq!(totals["_aws"]["CloudWatchMetrics"][0]["Namespace"], NAMESPACE);
        let malformed: Value = serde_json::from_str(&lines[1])?;
        assert_eq!(malformed["Reason"], "malformed_json");
        assert_eq!(malformed["QuarantinedByReason"], 2.0);
        assert_eq!(malformed["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0][1], "Reason");
        Ok(())
    }
}
