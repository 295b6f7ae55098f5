//! Fleet health (pure): each device's connectivity from IoT Core's lifecycle events
//! ([`presence`]), the counters functions add as they work ([`tally`], [`signals`]), the SLO
//! catalog with burn rates and alerts ([`slo`]), and the cumulative ledger fleet-health keeps
//! per cohort and minute ([`ledger`]), which answers "burn rate of SLO S for cohort C over
//! window W" in two reads ([`gate`]).

pub mod backfill;
pub mod gate;
pub mod ledger;
pub mod presence;
pub mod signals;
pub mod slo;
pub mod tally;
