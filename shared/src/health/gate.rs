//! The question OTA gates ask: "burn rate of SLO S for cohort C over window W", answered from
//! the same ledger rows fleet-health's alarms read, in two reads per cohort.
//!
//! A cohort is a base cohort (`class/region/firmware`), a stored aggregate (`*/*/*`,
//! `class/region/*`), or any other pattern with `*` (e.g. `sensor/*/1.5.0`: a canary's new
//! firmware in every region), which sums the base cohorts it includes. Comparing a canary
//! with its control group is two calls: [`burn_rate`] for each cohort over the same window.

use serde::{Deserialize, Serialize};

use super::slo::{Catalog, Events};
use super::tally::Cohort;
use crate::error::StoreError;
use crate::ports::SloReader;

/// An SLO's events and burn rate for a cohort over a window ending at a minute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BurnReading {
    pub slo: String,
    pub cohort: Cohort,
    pub window_minutes: i64,
    /// The last minute of the window (the ledger's newest closed minute).
    pub minute: i64,
    pub good: i64,
    pub total: i64,
    /// `None`: no events in the window (a gate decides what that means: usually "wait").
    pub burn_rate: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("no SLO named {0:?} in infra/slos.json")]
    UnknownSlo(String),
    #[error("window of {0} minutes: expected 1 minute to the SLO window")]
    BadWindow(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Burn rate of `slo` for `cohort` over the `window_minutes` ending at `minute` (normally the
/// last minute fleet-health closed).
pub async fn burn_rate<R: SloReader>(
    reader: &R,
    catalog: &Catalog,
    slo: &str,
    cohort: &Cohort,
    window_minutes: i64,
    minute: i64,
) -> Result<BurnReading, GateError> {
    let def = catalog.slo(slo).ok_or_else(|| GateError::UnknownSlo(slo.to_owned()))?;
    if !(1..=catalog.window_minutes()).contains(&window_minutes) {
        return Err(GateError::BadWindow(window_minutes));
    }
    let heads = reader.heads().await?;
    let members: Vec<&Cohort> = if heads.contains_key(cohort) {
        vec![cohort]
    } else {
        heads.keys().filter(|c| !c.is_aggregate() && cohort.includes(c)).collect()
    };
    let mut events = Events::default();
    for c in members {
        let Some((_, end)) = reader.row_at(c, minute).await? else { continue };
        let start = reader.row_at(c, minute - window_minutes).await?;
        let e = def.events(&end.since(&start.map(|(_, t)| t).unwrap_or_default()));
        events.good += e.good;
        events.total += e.total;
    }
    Ok(BurnReading {
        slo: slo.to_owned(),
        cohort: cohort.clone(),
        window_minutes,
        minute,
        good: events.good,
        total: events.total,
        burn_rate: def.burn_rate(events),
    })
}
