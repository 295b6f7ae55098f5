//! The ingest function's metrics, as EMF lines: one line of totals per batch, one per
//! quarantine reason.

use super::{BatchOutcome, Reason};
use crate::metrics::{MetricSet, Unit};

/// The per-batch ingest metrics: one line of totals, one line per quarantine reason.
pub fn ingest_batch_metrics(
    function: &str,
    outcome: &BatchOutcome,
    duration_ms: f64,
    timestamp_ms: i64,
) -> Vec<MetricSet> {
    let mut lines = vec![MetricSet {
        timestamp_ms,
        dimensions: vec![("Function", function.to_owned())],
        values: vec![
            ("Messages", outcome.messages as f64, Unit::Count),
            ("Accepted", outcome.accepted as f64, Unit::Count),
            ("Readings", outcome.readings as f64, Unit::Count),
            ("Duplicates", outcome.duplicates as f64, Unit::Count),
            ("Quarantined", outcome.quarantined.len() as f64, Unit::Count),
            ("SkewCorrected", outcome.skew_corrected as f64, Unit::Count),
            ("Late", outcome.late as f64, Unit::Count),
            ("UnknownDevices", outcome.unknown_devices as f64, Unit::Count),
            ("Failed", outcome.failed.len() as f64, Unit::Count),
            ("BatchDuration", duration_ms, Unit::Milliseconds),
        ],
    }];
    // Messages per reason: a message with several problems counts once under each reason it
    // has (so the lines may add up to more than `Quarantined`), never twice under one.
    let mut by_reason: Vec<(Reason, usize)> = Vec::new();
    for q in &outcome.quarantined {
        for (i, p) in q.problems.iter().enumerate() {
            if q.problems[..i].iter().any(|earlier| earlier.reason == p.reason) {
                continue;
            }
            match by_reason.iter_mut().find(|(r, _)| *r == p.reason) {
                Some((_, n)) => *n += 1,
                None => by_reason.push((p.reason, 1)),
            }
        }
    }
    by_reason.sort();
    for (reason, n) in by_reason {
        lines.push(MetricSet {
            timestamp_ms,
            dimensions: vec![("Function", function.to_owned()), ("Reason", reason.as_str().to_owned())],
            values: vec![("QuarantinedByReason", n as f64, Unit::Count)],
        });
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{Problem, QuarantinedMessage};
    use crate::metrics::NAMESPACE;
    use serde_json::Value;

    #[test]
    fn emits_totals_and_one_line_per_quarantine_reason() -> anyhow::Result<()> {
        // GIVEN a batch with two malformed messages and one spoofed one
        let q = |r| QuarantinedMessage {
            message_id: "m".into(),
            thing: None,
            fw: None,
            problems: vec![Problem::new(r, None, "x")],
        };
        let outcome = BatchOutcome {
            messages: 5,
            accepted: 2,
            quarantined: vec![q(Reason::MalformedJson), q(Reason::MalformedJson), q(Reason::ThingMismatch)],
            ..BatchOutcome::default()
        };
        // WHEN
        let lines: Vec<String> = ingest_batch_metrics("ingest-telemetry", &outcome, 12.5, 1_764_000_000_000)
            .iter()
            .map(MetricSet::to_emf_line)
            .collect();
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

    #[test]
    fn a_message_counts_once_under_each_of_its_reasons() {
        // GIVEN one message with two out-of-range metrics and a bad firmware string
        let problems = [Reason::ValueOutOfRange, Reason::ValueOutOfRange, Reason::InvalidLabel]
            .map(|r| Problem::new(r, None, "x"))
            .to_vec();
        let outcome = BatchOutcome {
            messages: 1,
            quarantined: vec![QuarantinedMessage { message_id: "m".into(), thing: None, fw: None, problems }],
            ..BatchOutcome::default()
        };
        // THEN it is one message under each reason, not two under the first
        let lines = ingest_batch_metrics("ingest-telemetry", &outcome, 1.0, 0);
        let counts: Vec<(String, f64)> =
            lines[1..].iter().map(|l| (l.dimensions[1].1.clone(), l.values[0].1)).collect();
        assert_eq!(counts.len(), 2, "{counts:?}");
        assert!(counts.iter().all(|(_, n)| *n == 1.0), "{counts:?}");
    }
}
