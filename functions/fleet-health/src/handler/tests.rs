//! Handler tests on the embedded (SQLite, in-memory) store: devices report through the same
//! health signals ingest and presence add, and the handler runs every minute, as scheduled.

use anyhow::{Context as _, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::health::presence::{Kind, Place, Presence};
use fleet_shared::health::signals;
use fleet_shared::health::tally::HealthDelta;
use fleet_shared::model::{Device, DeviceRegistration, DeviceState, ThingName};
use fleet_shared::ports::{HealthCounters, HealthLedger, LedgerRow, SloReader};
use lambda_runtime::{Context, LambdaEvent};

use super::*;

const SCHEDULED: &str = include_str!("../../../../events/fleet-health/scheduled.json");

/// Minute 29,400,000 (2025-11-24T16:00Z): a whole hour.
const START_MINUTE: i64 = 29_400_000;

fn deps() -> Result<Deps<SqliteStore>> {
    Ok(Deps {
        ledger: SqliteStore::in_memory()?,
        catalog: Catalog::builtin(),
        clock: || (START_MINUTE + 1) * MINUTE_MS + GRACE_MS,
        metrics: MetricsOut::Off,
    })
}

/// A small fleet: `n` sensors in eu-west, each device's stored state as ingest would hold it.
struct Fleet {
    devices: Vec<Device>,
}

impl Fleet {
    fn new(n: usize) -> Self {
        let devices = (0..n)
            .map(|i| Device {
                thing: ThingName::parse(&format!("sensor-{i:03}")).expect("thing"),
                registration: Some(DeviceRegistration {
                    class: "sensor".into(),
                    region: "eu-west".into(),
                    fw: "1.0".into(),
                    registered_at_ms: 1,
                }),
                state: None,
            })
            .collect();
        Self { devices }
    }

    /// The first `reporting` devices send one message each during `minute`; what ingest counts.
    async fn report(&mut self, store: &SqliteStore, minute: i64, reporting: usize) -> Result<()> {
        let mut delta = HealthDelta::default();
        let at = minute * MINUTE_MS + 5_000;
        for d in self.devices.iter_mut().take(reporting) {
            let state = DeviceState {
                last_ts_ms: at,
                last_rx_ms: at,
                boot: 1,
                seq: 1,
                battery_pct: Some(80.0),
                fw: Some("1.0".into()),
            };
            signals::telemetry(&mut delta, Some(d), &state);
            d.state = Some(state);
        }
        let cohort = Cohort::of(self.devices.first(), None);
        signals::received(&mut delta, at, &cohort, reporting as i64, 0);
        store.add_health(&delta).await?;
        Ok(())
    }

    /// Every device connects (what presence counts).
    async fn connect_all(&self, store: &SqliteStore) -> Result<()> {
        let mut delta = HealthDelta::default();
        for d in &self.devices {
            let p = Presence {
                connected: true,
                place: Place { version: 1, kind: Kind::Connected, at_ms: 0 },
                session_started_ms: Some(0),
                session_ms: None,
                disconnect_reason: None,
                session: None,
                counted_in: Some(Cohort::of(Some(d), None).without_fw()),
                principal: None,
            };
            signals::presence(&mut delta, None, &p);
        }
        store.add_health(&delta).await?;
        Ok(())
    }
}

/// Run the handler as the schedule does, just after `minute` ended.
async fn tick(deps: &Deps<SqliteStore>, minute: i64) -> Result<Answer> {
    Ok(run(deps, (minute + 1) * MINUTE_MS + GRACE_MS).await?)
}

#[tokio::test]
async fn the_scheduled_event_closes_the_minute_that_ended_and_stores_the_evaluation() -> Result<()> {
    // GIVEN 10 connected sensors, 8 of which reported in the minute that just ended
    let deps = deps()?;
    let mut fleet = Fleet::new(10);
    fleet.connect_all(&deps.ledger).await?;
    fleet.report(&deps.ledger, START_MINUTE, 8).await?;
    // WHEN the schedule's event arrives
    let payload = RawValue::from_string(SCHEDULED.to_owned())?;
    let answer = handle(&deps, LambdaEvent::new(payload, Context::default())).await?;
    // THEN that minute is closed, and the fleet's evaluation is stored
    assert_eq!(answer.closed_through, Some(START_MINUTE));
    assert_eq!(answer.minutes_closed, 1);
    let report = deps.ledger.latest_health().await?.context("a report")?;
    let fleet_health = report.cohorts.iter().find(|c| c.cohort == Cohort::fleet()).context("fleet")?;
    assert_eq!(fleet_health.last_hour.devices_fresh, 8);
    assert_eq!(fleet_health.last_hour.devices_active, 8, "the 2 silent ones were never seen");
    assert_eq!(fleet_health.last_hour.devices_connected, 10);
    let freshness = fleet_health.slos.iter().find(|s| s.slo == "freshness").context("freshness")?;
    assert_eq!((freshness.good, freshness.total), (8, 8));
    // ... and the class in its region is evaluated too
    assert!(report.cohorts.iter().any(|c| c.cohort.to_string() == "sensor/eu-west/*"));
    // A second run in the same minute closes nothing new, and leaves the evaluation alone.
    assert_eq!(tick(&deps, START_MINUTE).await?.minutes_closed, 0);
    assert_eq!(deps.ledger.latest_health().await?.as_ref(), Some(&report));
    Ok(())
}

#[tokio::test]
async fn a_freshness_outage_pages_and_the_page_stops_after_recovery() -> Result<()> {
    // GIVEN 20 sensors reporting every minute for 2 hours, then none for 70 minutes (the
    // ingest path is down), then all again
    let deps = deps()?;
    let mut fleet = Fleet::new(20);
    fleet.connect_all(&deps.ledger).await?;
    let mut paged_at = None;
    let mut last_page = None;
    for i in 0..240 {
        let minute = START_MINUTE + i;
        let outage = (120..190).contains(&i);
        fleet.report(&deps.ledger, minute, if outage { 0 } else { 20 }).await?;
        let answer = tick(&deps, minute).await?;
        let paging = answer.firing.iter().any(|f| f == "freshness page */*/*");
        if paging {
            paged_at.get_or_insert(i);
            last_page = Some(i);
        }
        // THEN nothing fires while the fleet is healthy
        if i < 120 {
            assert!(answer.firing.is_empty(), "minute {i}: {:?}", answer.firing);
        }
    }
    // ... the page fires within 45 minutes of the outage's start and stops within 5 of its end
    let paged_at = paged_at.context("the outage pages")?;
    assert!((120..165).contains(&paged_at), "paged at minute {paged_at}");
    assert!(last_page.is_some_and(|l| l < 195), "still paging at {last_page:?}");
    // ... and the same numbers are what an OTA gate reads
    let end = START_MINUTE + 239;
    let gate = fleet_shared::health::gate::burn_rate(
        &deps.ledger,
        &deps.catalog,
        "freshness",
        &Cohort::fleet(),
        60,
        end,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let report = deps.ledger.latest_health().await?.context("report")?;
    let stored = report.cohorts.iter().find(|c| c.cohort == Cohort::fleet()).context("fleet")?;
    let fresh = stored.slos.iter().find(|s| s.slo == "freshness").context("freshness")?;
    let hour = fresh.burn_rates.iter().find(|(w, _)| *w == 60).and_then(|(_, r)| *r);
    assert_eq!(gate.burn_rate, hour);
    Ok(())
}

#[tokio::test]
async fn devices_that_reported_again_before_the_close_still_count_fresh() -> Result<()> {
    // GIVEN 5 devices reporting every few seconds: by the time minute M is closed (10 s after
    // it ended) each has moved its newest data into minute M+1, across an hour boundary
    let deps = deps()?;
    let mut fleet = Fleet::new(5);
    let m = START_MINUTE + 59; // 16:59; M+1 is 17:00
    fleet.report(&deps.ledger, m - 1, 5).await?;
    fleet.report(&deps.ledger, m, 5).await?;
    fleet.report(&deps.ledger, m + 1, 5).await?;
    // WHEN minute M is closed
    tick(&deps, m).await?;
    // THEN all 5 were fresh and active at the close
    let report = deps.ledger.latest_health().await?.context("report")?;
    let fleet_health = report.cohorts.iter().find(|c| c.cohort == Cohort::fleet()).context("fleet")?;
    assert_eq!((fleet_health.last_hour.devices_fresh, fleet_health.last_hour.devices_active), (5, 5));
    Ok(())
}

#[tokio::test]
async fn minutes_missed_are_closed_on_the_next_run_up_to_an_hour() -> Result<()> {
    let deps = deps()?;
    let mut fleet = Fleet::new(3);
    fleet.report(&deps.ledger, START_MINUTE, 3).await?;
    tick(&deps, START_MINUTE).await?;
    // WHEN the function does not run for 5 minutes
    let answer = tick(&deps, START_MINUTE + 5).await?;
    // THEN the next run closes all 5
    assert_eq!((answer.minutes_closed, answer.minutes_skipped), (5, 0));
    // AND after 3 hours without a run, it closes the last hour and skips the rest
    let answer = tick(&deps, START_MINUTE + 5 + 180).await?;
    assert_eq!((answer.minutes_closed, answer.minutes_skipped), (MAX_CATCH_UP, 180 - MAX_CATCH_UP));
    Ok(())
}

#[tokio::test]
async fn minutes_closed_late_keep_their_counts_and_do_not_book_todays_levels() -> Result<()> {
    // GIVEN 10 connected devices reporting every minute, and fleet-health down for 30 minutes
    let deps = deps()?;
    let mut fleet = Fleet::new(10);
    fleet.connect_all(&deps.ledger).await?;
    for i in 0..40 {
        fleet.report(&deps.ledger, START_MINUTE + i, 10).await?;
        if !(5..35).contains(&i) {
            tick(&deps, START_MINUTE + i).await?;
        }
    }
    // THEN freshness and connectivity stay perfect (the catch-up sampled no levels) and the
    // messages of the missed minutes are all counted
    let report = deps.ledger.latest_health().await?.context("report")?;
    let fleet_health = report.cohorts.iter().find(|c| c.cohort == Cohort::fleet()).context("fleet")?;
    for slo in ["freshness", "connectivity"] {
        let s = fleet_health.slos.iter().find(|s| s.slo == slo).context("slo")?;
        assert_eq!(s.sli, Some(1.0), "{slo}: {s:?}");
        assert!(s.firing.is_empty(), "{slo}: {s:?}");
    }
    let ingest = fleet_health.slos.iter().find(|s| s.slo == "ingest").context("ingest")?;
    assert_eq!(ingest.total, 400);
    Ok(())
}

#[test]
fn a_cohort_active_again_after_a_quiet_day_has_its_last_row_renewed() {
    let row = |minute: i64, received: i64| {
        let mut t = Tally::default();
        t.add(counter::RECEIVED, received);
        (minute, t)
    };
    let cohort = |fw: &str| Cohort::new("sensor", "eu-west", fw);
    let now = START_MINUTE;
    // GIVEN a cohort quiet for a day, one quiet for a minute short of it, one active a minute
    // ago, and one quiet for a day that stays quiet
    let before: BTreeMap<Cohort, LedgerRow> = [
        (cohort("1.0"), row(now - RENEW_AFTER_QUIET_MINUTES, 10)),
        (cohort("1.1"), row(now - RENEW_AFTER_QUIET_MINUTES + 1, 20)),
        (cohort("1.2"), row(now - 1, 30)),
        (cohort("1.3"), row(now - 5 * RENEW_AFTER_QUIET_MINUTES, 40)),
    ]
    .into();
    // WHEN the first three and a new cohort have rows at this minute
    let rows: Vec<(Cohort, Tally)> =
        ["1.0", "1.1", "1.2", "2.0"].iter().map(|fw| (cohort(fw), row(now, 99).1)).collect();
    // THEN only the one quiet for a day has its last row renewed, as it was
    assert_eq!(quiet_rows(&before, &rows, now), [(cohort("1.0"), row(now - RENEW_AFTER_QUIET_MINUTES, 10))]);
}

#[test]
fn windows_are_named_as_the_alarms_name_them() {
    assert_eq!(window_name(5), "5m");
    assert_eq!(window_name(30), "30m");
    assert_eq!(window_name(60), "1h");
    assert_eq!(window_name(360), "6h");
    assert_eq!(window_name(28 * 24 * 60), "28d");
}

#[tokio::test]
async fn metrics_carry_burn_rates_per_slo_cohort_and_window() -> Result<()> {
    let deps = deps()?;
    let mut fleet = Fleet::new(4);
    fleet.report(&deps.ledger, START_MINUTE, 4).await?;
    tick(&deps, START_MINUTE).await?;
    let report = deps.ledger.latest_health().await?.context("report")?;
    let sets = metrics(&report);
    let burn = sets
        .iter()
        .find(|s| {
            s.dimension("Slo") == Some("freshness")
                && s.dimension("Cohort") == Some("*/*/*")
                && s.dimension("Window") == Some("1h")
        })
        .context("the fleet's 1h freshness burn rate")?;
    assert_eq!(burn.values, vec![("BurnRate", 0.0, Unit::Count)]);
    // No commands yet: no command burn rate (an alarm treats missing data as not breaching).
    assert!(!sets
        .iter()
        .any(|s| s.dimension("Slo") == Some("command-latency") && s.dimension("Window").is_some()));
    Ok(())
}

/// The SQLite ledger, recording what the handler renews (rows there never expire, so SQLite
/// itself renews nothing).
struct Renewals {
    store: SqliteStore,
    /// Each call: the minute, and the rows renewed.
    renewed: std::sync::Mutex<Vec<Renewal>>,
}

type Renewal = (i64, Vec<(Cohort, LedgerRow)>);

impl SloReader for Renewals {
    async fn row_at(&self, cohort: &Cohort, minute: i64) -> Result<Option<LedgerRow>, StoreError> {
        self.store.row_at(cohort, minute).await
    }

    async fn heads(&self) -> Result<BTreeMap<Cohort, LedgerRow>, StoreError> {
        self.store.heads().await
    }

    async fn latest_health(&self) -> Result<Option<HealthReport>, StoreError> {
        self.store.latest_health().await
    }
}

impl HealthLedger for Renewals {
    async fn buckets(
        &self,
        buckets: &[Bucket],
    ) -> Result<BTreeMap<Bucket, BTreeMap<Cohort, Tally>>, StoreError> {
        self.store.buckets(buckets).await
    }

    async fn closed_through(&self) -> Result<Option<i64>, StoreError> {
        self.store.closed_through().await
    }

    async fn close_minute(&self, minute: i64, rows: &[(Cohort, Tally)]) -> Result<(), StoreError> {
        self.store.close_minute(minute, rows).await
    }

    async fn renew_rows(&self, minute: i64, rows: &[(Cohort, LedgerRow)]) -> Result<(), StoreError> {
        self.renewed.lock().expect("not poisoned").push((minute, rows.to_vec()));
        self.store.renew_rows(minute, rows).await
    }

    async fn put_health(&self, report: &HealthReport) -> Result<(), StoreError> {
        self.store.put_health(report).await
    }
}

#[tokio::test]
async fn a_cohort_reporting_again_after_a_quiet_day_has_its_last_rows_renewed_in_that_minute() -> Result<()> {
    // GIVEN two sensors that reported in one minute, closed into the ledger
    let ledger = Renewals { store: SqliteStore::in_memory()?, renewed: Default::default() };
    let deps = Deps { ledger, catalog: Catalog::builtin(), clock: time::now_ms, metrics: MetricsOut::Off };
    let mut fleet = Fleet::new(2);
    fleet.report(&deps.ledger.store, START_MINUTE, 2).await?;
    run(&deps, (START_MINUTE + 1) * MINUTE_MS + GRACE_MS).await?;
    let first = deps.ledger.store.heads().await?;
    // WHEN they report again an hour after a quiet day, and the minute is closed
    let again = START_MINUTE + RENEW_AFTER_QUIET_MINUTES + 60;
    fleet.report(&deps.ledger.store, again, 2).await?;
    run(&deps, (again + 1) * MINUTE_MS + GRACE_MS).await?;
    // THEN their cohort's rows (base and aggregates) as they were are renewed, in that minute
    let renewed = deps.ledger.renewed.lock().expect("not poisoned").clone();
    assert_eq!(renewed.len(), 1, "{renewed:?}");
    let (minute, rows) = &renewed[0];
    assert_eq!(*minute, again);
    let cohort = Cohort::new("sensor", "eu-west", "1.0");
    assert!(rows.iter().any(|(c, _)| *c == cohort), "{rows:?}");
    assert!(rows.iter().all(|(c, row)| first.get(c) == Some(row) && row.0 == START_MINUTE), "{rows:?}");
    Ok(())
}
