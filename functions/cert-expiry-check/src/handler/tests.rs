//! Handler tests: `events/cert-expiry-check/` through the handler on the embedded (SQLite,
//! in-memory) store, with certificates at the class boundaries, and a fleet of 100,000
//! certificates of which 1 % expire, where the check reads only those.

use anyhow::{Context as _, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::certs::expiry::ExpiryClass;
use fleet_shared::model::{CertStatus, Certificate, CertificateId, ThingName};
use fleet_shared::ports::{ArchiveReader, CertMarks};
use lambda_runtime::{Context, LambdaEvent};

use super::*;

const DAILY: &str = include_str!("../../../../events/cert-expiry-check/scheduled-daily.json");
const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;

/// 2025-11-24T16:00:00Z, the event's time.
fn fixed_clock() -> i64 {
    1_764_000_000_000
}

fn deps() -> Result<EmbeddedDeps> {
    let db = SqliteStore::in_memory()?;
    Ok(Deps {
        inventory: db.clone(),
        devices: db.clone(),
        reports: db.clone(),
        registry: db.clone(),
        progress: db,
        threshold: Threshold::default(),
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    })
}

fn cert(n: u32, not_after_ms: i64, status: CertStatus) -> Certificate {
    Certificate {
        id: CertificateId::of_der(&n.to_be_bytes()),
        thing: ThingName::parse(&format!("dev-{n}")).ok(),
        serial: format!("{n:x}"),
        issuer: "CN=Fleetline CA".into(),
        subject: format!("CN=dev-{n}"),
        not_before_ms: 0,
        not_after_ms,
        status,
        recorded_ms: 0,
    }
}

async fn check(deps: &EmbeddedDeps) -> Result<CheckSummary, Retryable> {
    let payload = RawValue::from_string(DAILY.to_owned()).expect("JSON");
    match handle(deps, LambdaEvent::new(payload, Context::default())).await? {
        Answer::Check(summary) => Ok(summary),
        other => panic!("the daily event ran {other:?}"),
    }
}

#[tokio::test]
async fn the_boundaries_fall_in_their_classes_and_devices_are_marked() -> Result<()> {
    // GIVEN certificates with exactly 30 days left, 29 d 23 h, 6 days, expired a second ago,
    // expired 8 days ago (outside the look-back), and a revoked one expiring tomorrow
    let deps = deps()?;
    let now = fixed_clock();
    let certs = [
        cert(1, now + 30 * DAY_MS, CertStatus::Active),
        cert(2, now + 30 * DAY_MS - HOUR_MS, CertStatus::Active),
        cert(3, now + 6 * DAY_MS, CertStatus::Active),
        cert(4, now - 1000, CertStatus::Active),
        cert(5, now - 8 * DAY_MS, CertStatus::Active),
        cert(6, now + DAY_MS, CertStatus::Revoked),
    ];
    for c in &certs {
        deps.inventory.record(c).await?;
    }
    // WHEN the daily check runs
    let s = check(&deps).await?;
    // THEN one of each class; the revoked one is counted apart; what lies outside the window
    // (30 days left exactly; 8 days expired) is not even read
    assert_eq!((s.expired, s.critical, s.warning, s.not_active), (1, 1, 1, 1));
    assert_eq!((s.read, s.devices_marked), (4, 3));
    // AND each device carries its class and rotation due
    let mark = |n: u32| {
        let thing = ThingName::parse(&format!("dev-{n}")).expect("thing");
        let devices = &deps.devices;
        async move { devices.cert_status(&thing).await }
    };
    assert_eq!(mark(4).await?.map(|m| (m.class, m.rotation_due)), Some((ExpiryClass::Expired, true)));
    assert_eq!(mark(3).await?.map(|m| m.class), Some(ExpiryClass::Critical));
    assert_eq!(mark(2).await?.map(|m| m.class), Some(ExpiryClass::Warning));
    assert!(mark(1).await?.is_none() && mark(6).await?.is_none());
    // AND the findings report is next to the archive, most urgent first
    assert_eq!(s.report, "reports/cert-expiry/2025-11-24.json");
    let report: ExpiryReport = serde_json::from_slice(&deps.reports.archive_object(&s.report).await?)?;
    let order: Vec<ExpiryClass> = report.findings.iter().map(|f| f.class).collect();
    assert_eq!(order, [ExpiryClass::Expired, ExpiryClass::Critical, ExpiryClass::Warning]);
    assert_eq!(report.threshold_days, 30);
    Ok(())
}

#[tokio::test]
async fn a_device_with_several_certificates_in_the_window_is_marked_once_with_the_most_urgent() -> Result<()>
{
    // GIVEN dev-7 with an expired certificate and one in warning (a rotation under way)
    let deps = deps()?;
    let now = fixed_clock();
    let mut warning = cert(70, now + 20 * DAY_MS, CertStatus::Active);
    warning.thing = ThingName::parse("dev-7").ok();
    deps.inventory.record_many(&[cert(7, now - 1000, CertStatus::Active), warning]).await?;
    // WHEN the check runs
    let s = check(&deps).await?;
    // THEN both are findings, the device is marked once, with the expired one
    assert_eq!((s.expired, s.warning, s.devices_marked), (1, 1, 1));
    let mark = deps.devices.cert_status(&ThingName::parse("dev-7")?).await?.context("marked")?;
    assert_eq!(mark.class, ExpiryClass::Expired);
    Ok(())
}

#[tokio::test]
async fn of_100_000_certificates_with_1_percent_expiring_the_check_reads_only_those() -> Result<()> {
    // GIVEN 100,000 certificates: 1,000 expiring within 30 days, the rest in one to three years
    let deps = deps()?;
    let now = fixed_clock();
    let fleet: Vec<Certificate> = (0..100_000u32)
        .map(|n| {
            let days = if n % 100 == 0 { i64::from(n % 29 + 1) } else { 365 + i64::from(n % 700) };
            cert(n, now + days * DAY_MS, CertStatus::Active)
        })
        .collect();
    deps.inventory.record_many(&fleet).await?;
    // WHEN the daily check runs
    let s = check(&deps).await?;
    // THEN it read the 1,000 in its window, and no more
    assert_eq!(s.read, 1_000);
    assert_eq!(s.critical + s.warning, 1_000);
    Ok(())
}

#[tokio::test]
async fn a_threshold_outside_device_defenders_range_is_refused_at_start() {
    let env = |v: &str| Env::from_pairs(&[("FLEET_CERT_EXPIRY_THRESHOLD_DAYS", v)]);
    assert!(threshold_from(&env("29")).is_err());
    assert!(threshold_from(&env("abc")).is_err());
    assert_eq!(threshold_from(&env("90")).map(|t| t.as_days()).ok(), Some(90));
    assert_eq!(threshold_from(&Env::from_pairs(&[])).map(|t| t.as_days()).ok(), Some(30));
}

/// A report store that is always busy.
struct Busy;

impl Reports for Busy {
    async fn put_report(&self, _: &str, _: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::transient("report put", "throttled"))
    }
    async fn report(&self, _: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }
}

#[tokio::test]
async fn a_report_that_cannot_be_written_fails_the_check_for_a_retry() -> Result<()> {
    let db = SqliteStore::in_memory()?;
    let deps = Deps {
        inventory: db.clone(),
        devices: db.clone(),
        registry: db.clone(),
        progress: db,
        reports: Busy,
        threshold: Threshold::default(),
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    };
    let payload = RawValue::from_string(DAILY.to_owned()).expect("JSON");
    let err =
        handle(&deps, LambdaEvent::new(payload, Context::default())).await.err().context("must fail")?;
    assert_eq!(fleet_shared::lambda::ErrorType::error_type(&err), "Retryable");
    Ok(())
}

const RECONCILE: &str = include_str!("../../../../events/cert-expiry-check/reconcile-weekly.json");

async fn invoke(deps: &EmbeddedDeps, event: &str) -> Result<Answer, Retryable> {
    let payload = RawValue::from_string(event.to_owned()).expect("JSON");
    handle(deps, LambdaEvent::new(payload, Context::default())).await
}

#[tokio::test]
async fn the_reconcile_task_adopts_reports_and_waits_a_week_before_the_next_sweep() -> Result<()> {
    // GIVEN a certificate the local registry issued outside the hook, attached to dev-9
    let deps = deps()?;
    let now_s = fixed_clock() / 1000;
    let pem = fleet_shared::certs::test_certs::pem("dev-9", 9, now_s - 86_400, now_s + 3 * 86_400);
    let id = deps.registry.register_local_certificate(&pem, CertStatus::Active, fixed_clock()).await?;
    deps.registry.attach_local_certificate(&ThingName::parse("dev-9")?, &id).await?;
    // WHEN the weekly schedule's event arrives
    let Answer::Reconcile(slice) = invoke(&deps, RECONCILE).await? else { panic!("not a reconciliation") };
    // THEN one finished slice adopted it, with a report and the sweep recorded
    assert!(slice.finished && slice.slice == 1, "{slice:?}");
    let result = slice.result.context("no result")?;
    assert_eq!((result.listed, result.adopted), (1, 1));
    assert_eq!(
        deps.inventory.certificate(&id).await?.context("not adopted")?.thing,
        ThingName::parse("dev-9").ok()
    );
    let report = slice.report.context("no report")?;
    assert!(report.starts_with("reports/cert-reconcile/2025-11-24T16:00:00"), "{report}");
    assert!(!deps.reports.archive_objects("reports/cert-reconcile/").await?.is_empty());
    // AND the next trigger within the week does nothing but say when the next sweep is due
    let Answer::Reconcile(skipped) = invoke(&deps, RECONCILE).await? else { panic!("not a reconciliation") };
    assert_eq!(skipped.next_sweep_ms, Some(fixed_clock() + SWEEP_EVERY_MS));
    assert!(skipped.result.is_none(), "{skipped:?}");
    // AND the daily check, run after it, sees the adopted certificate as critical
    let daily = check(&deps).await?;
    assert_eq!((daily.critical, daily.read), (1, 1));
    Ok(())
}

#[tokio::test]
async fn an_unknown_task_or_an_event_that_is_not_an_object_is_refused() {
    let deps = deps().expect("deps");
    for event in [r#"{"task":"rotate"}"#, r#""reconcile""#] {
        let err = invoke(&deps, event).await.expect_err(event);
        assert!(err.to_string().contains("task") || err.to_string().contains("event"), "{err}");
    }
}

fn next_day() -> i64 {
    fixed_clock() + DAY_MS
}

#[tokio::test]
async fn a_device_whose_expiring_certificate_was_deactivated_loses_its_mark_the_next_day() -> Result<()> {
    // GIVEN dev-1 marked today for a certificate expiring in 3 days, dev-2 for one in 4 days
    let mut deps = deps()?;
    let (c1, c2) = (
        cert(1, fixed_clock() + 3 * DAY_MS, CertStatus::Active),
        cert(2, fixed_clock() + 4 * DAY_MS, CertStatus::Active),
    );
    deps.inventory.record_many(&[c1.clone(), c2]).await?;
    let first = check(&deps).await?;
    assert_eq!((first.devices_marked, first.devices_cleared), (2, 0));
    // WHEN dev-1 rotates (its old certificate deactivated) and the check runs the next day
    deps.inventory.record(&Certificate { status: CertStatus::Inactive, ..c1 }).await?;
    deps.clock = next_day;
    let second = check(&deps).await?;
    // THEN dev-1's mark is gone, dev-2's stays
    assert_eq!((second.devices_marked, second.devices_cleared), (1, 1));
    assert!(deps.devices.cert_status(&ThingName::parse("dev-1")?).await?.is_none());
    assert!(deps.devices.cert_status(&ThingName::parse("dev-2")?).await?.is_some());
    Ok(())
}

fn in_seven_days() -> i64 {
    fixed_clock() + 7 * DAY_MS
}

fn in_eight_and_a_half_days() -> i64 {
    fixed_clock() + 8 * DAY_MS + 12 * HOUR_MS
}

#[tokio::test]
async fn a_device_whose_certificate_expired_beyond_the_look_back_keeps_its_mark() -> Result<()> {
    // GIVEN dev-3 marked for a certificate expiring tomorrow, which nobody rotates, and the
    // check run again a week later (expired 6 days ago: still in the window, still marked)
    let mut deps = deps()?;
    deps.inventory.record(&cert(3, fixed_clock() + DAY_MS, CertStatus::Active)).await?;
    assert_eq!(check(&deps).await?.devices_marked, 1);
    deps.clock = in_seven_days;
    assert_eq!(check(&deps).await?.devices_marked, 1);
    // WHEN it runs a day and a half later: expired 7.5 days ago, out of the window
    deps.clock = in_eight_and_a_half_days;
    let later = check(&deps).await?;
    // THEN the device keeps its mark: it is cut off, not fixed
    assert_eq!((later.devices_marked, later.devices_cleared), (0, 0));
    assert!(deps.devices.cert_status(&ThingName::parse("dev-3")?).await?.is_some());
    Ok(())
}
