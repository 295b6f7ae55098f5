//! The rollout gate: canary against control, per SLO, over one window.
//!
//! For each SLO the policy names, the canary's burn rate is compared with the control's over
//! the same `window_minutes` ending at the same minute:
//! - too few canary events to judge: **wait** (a quiet canary proves nothing);
//! - the canary burns budget (burn rate > 1) *and* more than `max_ratio` times the control
//!   (or the control burns none): **roll back**, the new firmware is the likely cause; but
//!   with fewer than [`MIN_BAD_EVENTS`] bad canary events, **wait** (one bad event among 600
//!   is already 1.67x a 99.9 % objective: chance, until more follow);
//! - a control with fewer than `min_events` events is no baseline (one bad event among 50 is
//!   20x): the canary is then held to its budget, as if the control burned exactly 1x;
//! - the canary burns more than `max_burn` but so does the control: **wait**, the fleet has
//!   an incident the firmware did not cause, and no rollout should widen into it;
//! - otherwise the SLO passes. The gate advances only when every SLO passes.
//!
//! The window ends at the last minute fleet-health closed; the engine waits instead of judging
//! when that minute is more than [`MAX_HEALTH_AGE_MINUTES`] old.

use serde::{Deserialize, Serialize};

use crate::health::gate::{burn_rate, BurnReading, GateError};
use crate::health::slo::Catalog;
use crate::health::tally::Cohort;
use crate::ports::SloReader;

/// A rollback needs at least this many bad canary events in the window. Fewer can be chance;
/// the gate waits instead, and the window moves on: a fluke leaves it, a fault adds more.
pub const MIN_BAD_EVENTS: i64 = 3;

/// fleet-health closes each minute 10 s after it ends. A newest closed minute older than this
/// means it is failing or behind; the gate then waits rather than judge a window that may end
/// before the stage it is asked about began.
pub const MAX_HEALTH_AGE_MINUTES: i64 = 5;

/// What a campaign's gate checks, and how strictly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatePolicy {
    /// SLOs from `infra/slos.json` to compare (e.g. `ingest`, `freshness`). `connectivity` is
    /// counted per class and region only (presence events carry no firmware), so a canary that
    /// differs from its control by firmware has no events of it.
    pub slos: Vec<String>,
    /// The window both cohorts are read over, in minutes (1 to the SLO window).
    pub window_minutes: i64,
    /// Canary events an SLO needs in the window before the gate judges it.
    pub min_events: i64,
    /// A canary burning more than this many times the control's rate (and budget at all) is
    /// rolled back.
    pub max_ratio: f64,
    /// Above this burn rate nothing widens, whoever burns (the ticket alert's 6x by default).
    pub max_burn: f64,
}

impl GatePolicy {
    /// Why this policy cannot judge anything, if it cannot.
    pub fn check(&self, catalog: &Catalog) -> Result<(), String> {
        if self.slos.is_empty() {
            return Err("the gate needs at least one SLO".into());
        }
        if let Some(unknown) = self.slos.iter().find(|s| catalog.slo(s).is_none()) {
            return Err(format!("no SLO named {unknown:?} in infra/slos.json"));
        }
        if !(1..=catalog.window_minutes()).contains(&self.window_minutes) {
            return Err(format!(
                "a gate window of {} minutes: expected 1 minute to the SLOs' window ({} minutes)",
                self.window_minutes,
                catalog.window_minutes()
            ));
        }
        if self.min_events < 1 {
            return Err(format!(
                "min_events {}: at least 1 (a canary without events proves nothing)",
                self.min_events
            ));
        }
        for (name, value) in [("max_ratio", self.max_ratio), ("max_burn", self.max_burn)] {
            if !(value.is_finite() && value >= 1.0) {
                return Err(format!("{name} {value}: expected a number of at least 1"));
            }
        }
        Ok(())
    }
}

impl Default for GatePolicy {
    fn default() -> Self {
        Self {
            slos: vec!["ingest".into(), "freshness".into()],
            window_minutes: 60,
            min_events: 100,
            max_ratio: 2.0,
            max_burn: 6.0,
        }
    }
}

/// One SLO's readings for both cohorts, and what the gate made of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub canary: BurnReading,
    pub control: BurnReading,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", content = "reason", rename_all = "snake_case")]
pub enum Verdict {
    Advance,
    Wait(String),
    RollBack(String),
}

impl Verdict {
    /// The gate's answer over all SLOs: roll back if any says so, else wait if any waits.
    pub fn of_all<'a>(verdicts: impl IntoIterator<Item = &'a Verdict>) -> Verdict {
        let mut wait = None;
        for v in verdicts {
            match v {
                Verdict::RollBack(_) => return v.clone(),
                Verdict::Wait(_) if wait.is_none() => wait = Some(v.clone()),
                _ => {}
            }
        }
        wait.unwrap_or(Verdict::Advance)
    }
}

/// Judge one SLO's pair of readings (pure).
pub fn judge(policy: &GatePolicy, canary: &BurnReading, control: &BurnReading) -> Verdict {
    let slo = &canary.slo;
    if canary.total < policy.min_events {
        return Verdict::Wait(format!(
            "{slo}: the canary has {} events in {} min, {} needed",
            canary.total, canary.window_minutes, policy.min_events
        ));
    }
    let c = canary.burn_rate.unwrap_or(0.0);
    let (k, control_burns) = if control.total >= policy.min_events {
        let k = control.burn_rate.unwrap_or(0.0);
        (k, format!("the control {k:.2}x"))
    } else {
        let thin = format!(
            "the control has {} events, too few to compare: its budget (1x) stands in",
            control.total
        );
        (1.0, thin)
    };
    if c > 1.0 && c > policy.max_ratio * k {
        let bad = canary.total - canary.good;
        if bad < MIN_BAD_EVENTS {
            return Verdict::Wait(format!(
                "{slo}: the canary burns {c:.2}x its budget, {control_burns}, but from {bad} bad events in \
                 {}: fewer than {MIN_BAD_EVENTS}, too few to blame the firmware yet",
                canary.total
            ));
        }
        return Verdict::RollBack(format!(
            "{slo}: the canary burns {c:.2}x its budget, {control_burns} (limit {}x the control's)",
            policy.max_ratio
        ));
    }
    if c > policy.max_burn {
        return Verdict::Wait(format!(
            "{slo}: the canary burns {c:.2}x and {control_burns}: a fleet-wide burn above {}x, not the firmware's",
            policy.max_burn
        ));
    }
    Verdict::Advance
}

/// Read both cohorts for every SLO of `policy` over the window ending at `minute`, and judge.
pub async fn evaluate<R: SloReader>(
    reader: &R,
    catalog: &Catalog,
    policy: &GatePolicy,
    canary: &Cohort,
    control: &Cohort,
    minute: i64,
) -> Result<(Verdict, Vec<Comparison>), GateError> {
    let mut comparisons = Vec::with_capacity(policy.slos.len());
    for slo in &policy.slos {
        let canary = burn_rate(reader, catalog, slo, canary, policy.window_minutes, minute).await?;
        let control = burn_rate(reader, catalog, slo, control, policy.window_minutes, minute).await?;
        let verdict = judge(policy, &canary, &control);
        comparisons.push(Comparison { canary, control, verdict });
    }
    let verdict = Verdict::of_all(comparisons.iter().map(|c| &c.verdict));
    Ok((verdict, comparisons))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::error::StoreError;
    use crate::health::ledger::HealthReport;
    use crate::health::tally::{counter, Tally};
    use crate::ports::LedgerRow;

    /// Ledger rows by cohort: cumulative tallies at minutes.
    #[derive(Default)]
    struct Rows(BTreeMap<Cohort, Vec<LedgerRow>>);

    impl Rows {
        /// `cohort` received `per_minute` messages a minute, `bad` of them quarantined, over
        /// minutes `0..minutes`.
        fn ingest(mut self, cohort: &str, minutes: i64, per_minute: i64, bad: i64) -> Self {
            let rows = (0..minutes)
                .map(|m| {
                    let mut t = Tally::default();
                    t.add(counter::RECEIVED, per_minute * (m + 1));
                    t.add(counter::QUARANTINED, bad * (m + 1));
                    (m, t)
                })
                .collect();
            self.0.insert(cohort.parse().expect("cohort"), rows);
            self
        }
    }

    impl SloReader for Rows {
        async fn row_at(&self, cohort: &Cohort, minute: i64) -> Result<Option<LedgerRow>, StoreError> {
            let rows = self.0.get(cohort).map(Vec::as_slice).unwrap_or_default();
            Ok(rows.iter().rev().find(|(m, _)| *m <= minute).cloned())
        }

        async fn heads(&self) -> Result<BTreeMap<Cohort, LedgerRow>, StoreError> {
            Ok(self.0.iter().filter_map(|(c, rows)| Some((c.clone(), rows.last()?.clone()))).collect())
        }

        async fn latest_health(&self) -> Result<Option<HealthReport>, StoreError> {
            Ok(None)
        }
    }

    fn policy() -> GatePolicy {
        GatePolicy { slos: vec!["ingest".into()], window_minutes: 60, ..GatePolicy::default() }
    }

    fn cohort(s: &str) -> Cohort {
        s.parse().expect("cohort")
    }

    async fn gate(rows: &Rows) -> (Verdict, Vec<Comparison>) {
        let catalog = Catalog::builtin();
        evaluate(rows, &catalog, &policy(), &cohort("sensor/*/1.5.0"), &cohort("sensor/*/1.4.2"), 119)
            .await
            .expect("evaluated")
    }

    #[tokio::test]
    async fn a_canary_as_healthy_as_its_control_advances() {
        // GIVEN canary and control both quarantining 1 in 2,000 (the ingest SLO allows 1 in 1,000)
        let rows = Rows::default()
            .ingest("sensor/eu-west/1.5.0", 120, 1_000, 0)
            .ingest("sensor/us-east/1.5.0", 120, 1_000, 1)
            .ingest("sensor/eu-west/1.4.2", 120, 2_000, 1);
        let (verdict, comparisons) = gate(&rows).await;
        assert_eq!(verdict, Verdict::Advance, "{comparisons:?}");
        // the canary pattern summed both regions' rows over the last hour
        assert_eq!((comparisons[0].canary.good, comparisons[0].canary.total), (119_940, 120_000));
        let burn = comparisons[0].canary.burn_rate.expect("events");
        assert!((burn - 0.5).abs() < 1e-9, "{burn}");
    }

    #[tokio::test]
    async fn a_canary_burning_while_its_control_does_not_is_rolled_back() {
        // GIVEN the new firmware quarantines 1 % of its messages, the old one none
        let rows = Rows::default().ingest("sensor/eu-west/1.5.0", 120, 1_000, 10).ingest(
            "sensor/eu-west/1.4.2",
            120,
            1_000,
            0,
        );
        let (verdict, _) = gate(&rows).await;
        let Verdict::RollBack(reason) = verdict else { panic!("{verdict:?}") };
        assert!(reason.contains("ingest: the canary burns 10.00x"), "{reason}");
    }

    #[tokio::test]
    async fn a_fleet_wide_burn_holds_the_rollout_without_blaming_the_canary() {
        // GIVEN both cohorts quarantine 1 % (an ingest incident, not the firmware)
        let rows = Rows::default().ingest("sensor/eu-west/1.5.0", 120, 1_000, 10).ingest(
            "sensor/eu-west/1.4.2",
            120,
            1_000,
            10,
        );
        let (verdict, _) = gate(&rows).await;
        let Verdict::Wait(reason) = verdict else { panic!("{verdict:?}") };
        assert!(reason.contains("fleet-wide"), "{reason}");
    }

    #[tokio::test]
    async fn a_canary_too_quiet_to_judge_waits() {
        // GIVEN a canary of one device sending a message a minute: 60 events in the hour
        let rows = Rows::default().ingest("sensor/eu-west/1.5.0", 120, 1, 1).ingest(
            "sensor/eu-west/1.4.2",
            120,
            1_000,
            0,
        );
        let (verdict, _) = gate(&rows).await;
        let Verdict::Wait(reason) = verdict else { panic!("{verdict:?}") };
        assert!(reason.contains("60 events in 60 min, 100 needed"), "{reason}");
    }

    #[test]
    fn any_roll_back_wins_then_any_wait() {
        let wait = Verdict::Wait("w".into());
        let back = Verdict::RollBack("r".into());
        assert_eq!(Verdict::of_all([&Verdict::Advance, &wait, &back]), back);
        assert_eq!(Verdict::of_all([&Verdict::Advance, &wait]), wait);
        assert_eq!(Verdict::of_all([&Verdict::Advance, &Verdict::Advance]), Verdict::Advance);
        assert_eq!(Verdict::of_all([]), Verdict::Advance);
    }

    /// An ingest reading (objective 99.9 %): `total` events, `bad` of them bad.
    fn reading(total: i64, bad: i64) -> BurnReading {
        let burn_rate = (total > 0).then(|| bad as f64 / total as f64 / 0.001);
        BurnReading {
            slo: "ingest".into(),
            cohort: Cohort::fleet(),
            window_minutes: 60,
            minute: 0,
            good: total - bad,
            total,
            burn_rate,
        }
    }

    #[test]
    fn a_control_without_events_is_no_excuse() {
        // a canary burning 3x against a control with no events at all is rolled back
        let v = judge(&policy(), &reading(5_000, 15), &reading(0, 0));
        let Verdict::RollBack(reason) = v else { panic!("{v:?}") };
        assert!(reason.contains("the control has 0 events, too few to compare"), "{reason}");
        // and a canary within its budget advances whatever the control does
        assert_eq!(judge(&policy(), &reading(10_000, 9), &reading(500, 0)), Verdict::Advance);
    }

    #[test]
    fn a_control_too_small_to_compare_neither_shields_nor_condemns_the_canary() {
        // GIVEN late in a campaign a control of 50 messages, one of them bad (20x)
        let control = reading(50, 1);
        // WHEN the canary quarantines 0.5 % of 10,000 (5x): THEN it is held to its budget and
        // rolled back, where 2x the control's 20x would have let it through
        let v = judge(&policy(), &reading(10_000, 50), &control);
        assert!(matches!(v, Verdict::RollBack(_)), "{v:?}");
        // AND a control of 3 clean events condemns no canary within 2x its budget
        assert_eq!(judge(&policy(), &reading(10_000, 15), &reading(3, 0)), Verdict::Advance);
    }

    #[test]
    fn one_bad_event_is_not_yet_a_reason_to_roll_back() {
        // GIVEN a canary of 600 events in the hour against a clean control
        let control = reading(100_000, 0);
        // WHEN one of them is bad (1.67x): THEN the gate waits for more evidence
        let v = judge(&policy(), &reading(600, 1), &control);
        let Verdict::Wait(reason) = v else { panic!("{v:?}") };
        assert!(reason.contains("from 1 bad events in 600: fewer than 3"), "{reason}");
        // WHEN three are: THEN it rolls back
        assert!(matches!(judge(&policy(), &reading(600, 3), &control), Verdict::RollBack(_)));
    }

    #[test]
    fn a_policy_that_cannot_judge_is_refused() {
        let catalog = Catalog::builtin();
        assert_eq!(policy().check(&catalog), Ok(()));
        assert_eq!(GatePolicy::default().check(&catalog), Ok(()));
        let refused = |p: GatePolicy, says: &str| {
            let why = p.check(&catalog).expect_err("refused");
            assert!(why.contains(says), "{why}");
        };
        refused(GatePolicy { min_events: 0, ..policy() }, "min_events 0");
        refused(GatePolicy { window_minutes: 0, ..policy() }, "window of 0 minutes");
        refused(GatePolicy { window_minutes: catalog.window_minutes() + 1, ..policy() }, "expected 1 minute");
        refused(GatePolicy { slos: vec![], ..policy() }, "at least one SLO");
        refused(GatePolicy { slos: vec!["ingets".into()], ..policy() }, "no SLO named \"ingets\"");
        refused(GatePolicy { max_ratio: f64::NAN, ..policy() }, "max_ratio NaN");
        refused(GatePolicy { max_burn: 0.5, ..policy() }, "max_burn 0.5");
    }
}
