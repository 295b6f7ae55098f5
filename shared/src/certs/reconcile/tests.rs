//! Reconciliation over the local registry (SQLite) with real certificates (rcgen): adoption
//! with the PEM's dates, status changes, each finding, paging within a budget, and retries
//! after throttling.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use super::*;
use crate::adapters::embedded::{local_certificate_arn, SqliteStore};
use crate::certs::test_certs;
use crate::model::CertificatePage;
use crate::ports::{CertificateControl, CertificateInventory};

const DAY_S: i64 = 86_400;
/// 2025-11-24T16:00:00Z.
const NOW_S: i64 = 1_764_000_000;
const NOW_MS: i64 = NOW_S * 1000;

fn thing(name: &str) -> ThingName {
    ThingName::parse(name).expect("thing name")
}

/// Register a certificate valid until `NOW + days_left`, attached to `things`.
async fn registered(
    db: &SqliteStore,
    n: u64,
    days_left: i64,
    status: CertStatus,
    things: &[&str],
) -> CertificateId {
    let pem = test_certs::pem(&format!("dev-{n}"), n, NOW_S - 300 * DAY_S, NOW_S + days_left * DAY_S);
    let id = db.register_local_certificate(&pem, status, NOW_MS - 1).await.expect("registered");
    for t in things {
        db.attach_local_certificate(&thing(t), &id).await.expect("attached");
    }
    id
}

fn fast() -> Options {
    Options { first_backoff: Duration::from_millis(1), ..Options::default() }
}

#[tokio::test]
async fn adopts_what_the_hook_never_saw_with_the_dates_of_its_pem() {
    // GIVEN two certificates in the registry, one of them already in the inventory
    let db = SqliteStore::in_memory().expect("db");
    let known = registered(&db, 1, 200, CertStatus::Active, &["dev-1"]).await;
    let outside = registered(&db, 2, 100, CertStatus::Active, &["dev-2"]).await;
    let first = reconcile(&db, &db, None, NOW_MS, &fast()).await.expect("reconciled");
    assert_eq!((first.listed, first.described, first.adopted), (2, 2, 2));
    // WHEN reconciled again
    let again = reconcile(&db, &db, None, NOW_MS, &fast()).await.expect("reconciled");
    // THEN nothing is described twice, and the adopted record carries the PEM's notAfter
    assert_eq!((again.listed, again.described, again.adopted, again.updated), (2, 0, 0, 0));
    let adopted = db.certificate(&outside).await.expect("read").expect("adopted");
    assert_eq!(adopted.not_after_ms, (NOW_S + 100 * DAY_S) * 1000);
    assert_eq!(adopted.thing, Some(thing("dev-2")));
    assert!(db.certificate(&known).await.expect("read").is_some());
    assert!(again.findings.is_empty(), "{:?}", again.findings);
}

#[tokio::test]
async fn a_status_changed_in_the_registry_is_followed() {
    let db = SqliteStore::in_memory().expect("db");
    let id = registered(&db, 1, 200, CertStatus::Active, &[]).await;
    reconcile(&db, &db, None, NOW_MS, &fast()).await.expect("reconciled");
    db.set_certificate_status(&id, CertStatus::Revoked).await.expect("revoked");
    let r = reconcile(&db, &db, None, NOW_MS, &fast()).await.expect("reconciled");
    assert_eq!(r.updated, 1);
    assert_eq!(db.certificate(&id).await.expect("read").expect("kept").status, CertStatus::Revoked);
}

#[tokio::test]
async fn each_finding_is_reported_once_and_healthy_devices_are_not() {
    // GIVEN an inactive certificate still attached, one certificate on two things, a device
    // whose only certificate expired, one whose two certificates both expired, and one with
    // an expired certificate next to a valid one
    let db = SqliteStore::in_memory().expect("db");
    let inactive = registered(&db, 1, 200, CertStatus::Inactive, &["dev-1"]).await;
    let shared = registered(&db, 2, 200, CertStatus::Active, &["dev-2", "dev-3"]).await;
    let lone = registered(&db, 4, -1, CertStatus::Active, &["dev-4"]).await;
    let a = registered(&db, 5, -2, CertStatus::Active, &["dev-5"]).await;
    let b = registered(&db, 6, -3, CertStatus::Active, &["dev-5"]).await;
    registered(&db, 7, -1, CertStatus::Active, &["dev-7"]).await;
    registered(&db, 8, 300, CertStatus::Active, &["dev-7"]).await;
    // WHEN reconciled, two certificates a page
    let r = reconcile(&db, &db, None, NOW_MS, &Options { page_size: 2, ..fast() }).await.expect("reconciled");
    // THEN exactly these findings
    let (first_of_5, nf5) = if a < b { (a, -2) } else { (b, -3) };
    let mut expected = vec![
        Finding::InactiveAttached {
            certificate: inactive,
            status: CertStatus::Inactive,
            things: vec![thing("dev-1")],
        },
        Finding::SharedCertificate { certificate: shared, things: vec![thing("dev-2"), thing("dev-3")] },
        Finding::OnlyCertificateExpired {
            thing: thing("dev-4"),
            certificate: lone,
            not_after_ms: (NOW_S - DAY_S) * 1000,
        },
        Finding::OnlyCertificateExpired {
            thing: thing("dev-5"),
            certificate: first_of_5,
            not_after_ms: (NOW_S + nf5 * DAY_S) * 1000,
        },
    ];
    expected.sort();
    assert_eq!(r.findings, expected);
    assert_eq!(r.listed, 7);
    assert_eq!(r.counts().get("only_certificate_expired"), Some(&2));
}

#[tokio::test]
async fn a_budget_stops_between_pages_and_the_marker_continues_to_the_same_end() {
    // GIVEN 7 certificates, 3 a page, and a registry slower than the budget
    let db = SqliteStore::in_memory().expect("db");
    for n in 0..7 {
        registered(&db, n, 100, CertStatus::Active, &[]).await;
    }
    let slow = Slow { inner: &db };
    let opts = Options { page_size: 3, budget: Some(Duration::from_millis(5)), ..fast() };
    // WHEN reconciled in slices, each continuing from the last one's marker
    let mut marker = None;
    let (mut listed, mut slices) = (0, 0);
    loop {
        let slice = reconcile(&slow, &db, marker, NOW_MS, &opts).await.expect("slice");
        listed += slice.listed;
        slices += 1;
        if slice.finished() {
            break;
        }
        marker = slice.next_marker;
    }
    // THEN one page a slice, every certificate listed once
    assert_eq!((listed, slices), (7, 3));
}

/// A registry whose pages take longer than the test's budget.
struct Slow<'a> {
    inner: &'a SqliteStore,
}

impl CertificateRegistry for Slow<'_> {
    async fn list_certificates(
        &self,
        marker: Option<&str>,
        size: usize,
    ) -> Result<CertificatePage, StoreError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.inner.list_certificates(marker, size).await
    }
    async fn describe_certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<crate::model::CertificateDetail>, StoreError> {
        self.inner.describe_certificate(id).await
    }
    async fn certificate_things(&self, arn: &str) -> Result<Vec<ThingName>, StoreError> {
        self.inner.certificate_things(arn).await
    }
    async fn thing_certificates(&self, thing: &ThingName) -> Result<Vec<CertificateId>, StoreError> {
        self.inner.thing_certificates(thing).await
    }
}

/// A registry that throttles every other call.
struct Throttling<'a> {
    inner: &'a SqliteStore,
    calls: AtomicU64,
    throttled: AtomicU64,
}

impl Throttling<'_> {
    fn throttle(&self) -> Result<(), StoreError> {
        if self.calls.fetch_add(1, SeqCst).is_multiple_of(2) {
            self.throttled.fetch_add(1, SeqCst);
            return Err(StoreError::transient("test", "ThrottlingException: Rate exceeded"));
        }
        Ok(())
    }
}

impl CertificateRegistry for Throttling<'_> {
    async fn list_certificates(
        &self,
        marker: Option<&str>,
        size: usize,
    ) -> Result<CertificatePage, StoreError> {
        self.throttle()?;
        self.inner.list_certificates(marker, size).await
    }
    async fn describe_certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<crate::model::CertificateDetail>, StoreError> {
        self.throttle()?;
        self.inner.describe_certificate(id).await
    }
    async fn certificate_things(&self, arn: &str) -> Result<Vec<ThingName>, StoreError> {
        self.throttle()?;
        self.inner.certificate_things(arn).await
    }
    async fn thing_certificates(&self, thing: &ThingName) -> Result<Vec<CertificateId>, StoreError> {
        self.throttle()?;
        self.inner.thing_certificates(thing).await
    }
}

#[tokio::test]
async fn throttled_calls_are_retried_and_change_nothing_in_the_result() {
    let db = SqliteStore::in_memory().expect("db");
    for n in 0..5 {
        registered(&db, n, if n == 0 { -1 } else { 100 }, CertStatus::Active, &[&format!("dev-{n}")]).await;
    }
    let calm = SqliteStore::in_memory().expect("db");
    let expected =
        reconcile(&db, &calm, None, NOW_MS, &Options { page_size: 2, ..fast() }).await.expect("calm");

    let throttling = Throttling { inner: &db, calls: AtomicU64::new(0), throttled: AtomicU64::new(0) };
    let inventory = SqliteStore::in_memory().expect("db");
    let r =
        reconcile(&throttling, &inventory, None, NOW_MS, &Options { page_size: 2, concurrency: 1, ..fast() })
            .await
            .expect("reconciled despite throttling");
    assert!(throttling.throttled.load(SeqCst) > 5);
    assert_eq!(r.retried, throttling.throttled.load(SeqCst));
    assert_eq!((r.listed, r.adopted, &r.findings), (expected.listed, expected.adopted, &expected.findings));
}

#[tokio::test]
async fn a_permanent_error_fails_the_reconciliation() {
    struct Denied;
    impl CertificateRegistry for Denied {
        async fn list_certificates(&self, _: Option<&str>, _: usize) -> Result<CertificatePage, StoreError> {
            Err(StoreError::permanent("iot ListCertificates", "AccessDeniedException"))
        }
        async fn describe_certificate(
            &self,
            _: &CertificateId,
        ) -> Result<Option<crate::model::CertificateDetail>, StoreError> {
            unreachable!()
        }
        async fn certificate_things(&self, _: &str) -> Result<Vec<ThingName>, StoreError> {
            unreachable!()
        }
        async fn thing_certificates(&self, _: &ThingName) -> Result<Vec<CertificateId>, StoreError> {
            unreachable!()
        }
    }
    let db = SqliteStore::in_memory().expect("db");
    let e = reconcile(&Denied, &db, None, NOW_MS, &fast()).await.expect_err("denied");
    assert!(e.to_string().contains("AccessDeniedException"));
}

#[test]
fn local_arns_name_their_certificate() {
    let id = CertificateId::of_der(b"x");
    assert_eq!(CertificateId::of_arn(&local_certificate_arn(&id)), Some(id));
}

/// A registry whose second page never answers (a throttled page that outlasts the budget).
struct Stuck<'a> {
    inner: &'a SqliteStore,
}

impl CertificateRegistry for Stuck<'_> {
    async fn list_certificates(
        &self,
        marker: Option<&str>,
        size: usize,
    ) -> Result<CertificatePage, StoreError> {
        if marker.is_some() {
            std::future::pending::<()>().await;
        }
        self.inner.list_certificates(marker, size).await
    }
    async fn describe_certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<crate::model::CertificateDetail>, StoreError> {
        self.inner.describe_certificate(id).await
    }
    async fn certificate_things(&self, arn: &str) -> Result<Vec<ThingName>, StoreError> {
        self.inner.certificate_things(arn).await
    }
    async fn thing_certificates(&self, thing: &ThingName) -> Result<Vec<CertificateId>, StoreError> {
        self.inner.thing_certificates(thing).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_page_that_outlasts_the_budget_is_cut_off_and_done_again_next_time() {
    let db = SqliteStore::in_memory().expect("db");
    for n in 0..4 {
        registered(&db, n, 100, CertStatus::Active, &[]).await;
    }
    let opts = Options { page_size: 2, budget: Some(Duration::from_secs(60)), ..fast() };
    let first = reconcile(&Stuck { inner: &db }, &db, None, NOW_MS, &opts).await.expect("slice");
    // The first page done, the second cut off after the budget and the grace: continue there.
    assert!(first.unfinished && first.listed == 2, "{first:?}");
    let second = reconcile(&db, &db, first.next_marker, NOW_MS, &opts).await.expect("slice");
    assert!(second.finished() && second.listed == 2, "{second:?}");
}

/// A registry that refuses one certificate's attachments for good.
struct DeniedOne<'a> {
    inner: &'a SqliteStore,
    denied: String,
}

impl CertificateRegistry for DeniedOne<'_> {
    async fn list_certificates(
        &self,
        marker: Option<&str>,
        size: usize,
    ) -> Result<CertificatePage, StoreError> {
        self.inner.list_certificates(marker, size).await
    }
    async fn describe_certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<crate::model::CertificateDetail>, StoreError> {
        self.inner.describe_certificate(id).await
    }
    async fn certificate_things(&self, arn: &str) -> Result<Vec<ThingName>, StoreError> {
        if arn == self.denied {
            return Err(StoreError::permanent("iot ListPrincipalThings", "AccessDeniedException"));
        }
        self.inner.certificate_things(arn).await
    }
    async fn thing_certificates(&self, thing: &ThingName) -> Result<Vec<CertificateId>, StoreError> {
        self.inner.thing_certificates(thing).await
    }
}

#[tokio::test]
async fn a_certificate_refused_for_good_is_reported_and_the_sweep_goes_on() {
    let db = SqliteStore::in_memory().expect("db");
    let denied = registered(&db, 1, 100, CertStatus::Active, &[]).await;
    registered(&db, 2, 100, CertStatus::Active, &[]).await;
    let registry = DeniedOne { inner: &db, denied: local_certificate_arn(&denied) };
    let r = reconcile(&registry, &db, None, NOW_MS, &fast()).await.expect("the sweep goes on");
    assert_eq!((r.listed, r.adopted), (2, 1));
    assert_eq!(r.failed.iter().map(|f| &f.certificate).collect::<Vec<_>>(), vec![&denied]);
}
