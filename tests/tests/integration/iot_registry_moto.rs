//! The IoT control-plane adapter (`IotControlPlane`: ports `CertificateRegistry` and
//! `CertificateControl`, SigV4 over the SDK's connector) on the moto server, with real
//! certificates (rcgen): list, describe, attachments both ways, status changes; then a whole
//! reconciliation into a Certificates table on moto, and a decommission.
//!
//! moto's registry is shared by every test on the server, so each test names its own things
//! and looks only at its own certificates. moto never pages ListCertificates and never
//! throttles: paging and throttling are checked on the wire against a scripted server
//! (`adapters::aws::iot` unit tests) and through the reconciler with a throttling registry
//! (`certs::reconcile` unit tests).

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::aws::IotControlPlane;
use fleet_shared::certs::decommission::{self, decommission};
use fleet_shared::certs::reconcile::{self, reconcile, Finding};
use fleet_shared::certs::test_certs;
use fleet_shared::model::{AllowlistEntry, CertStatus, CertificateId, Enrolment, ThingName};
use fleet_shared::ports::{
    Allowlist, AuditEvent, CertificateControl, CertificateInventory, CertificateRegistry, ProvisioningAudit,
};
use fleet_tests::moto;

const DAY_S: i64 = 86_400;

async fn iot() -> Result<IotControlPlane> {
    Ok(IotControlPlane::new(&moto::sdk_config().await?)?)
}

fn fresh_thing(role: &str) -> Result<ThingName> {
    static N: AtomicU32 = AtomicU32::new(0);
    Ok(ThingName::parse(&format!("{role}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))?)
}

/// A certificate valid until now + `days_left`, registered with `status`, attached to `things`.
async fn registered(
    iot: &IotControlPlane,
    days_left: i64,
    status: CertStatus,
    things: &[&ThingName],
) -> Result<CertificateId> {
    static SERIAL: AtomicU32 = AtomicU32::new(1);
    let now = fleet_shared::time::now_ms() / 1000;
    let serial = u64::from(SERIAL.fetch_add(1, Ordering::Relaxed)) + (u64::from(std::process::id()) << 20);
    let pem = test_certs::pem("fleet-test", serial, now - 300 * DAY_S, now + days_left * DAY_S);
    let id = iot.register_certificate(&pem, status).await?;
    ensure!(id == fleet_shared::certs::parse_pem(&pem)?.id, "moto's id is not the SHA-256 of the DER");
    for thing in things {
        iot.create_thing(thing).await?;
        let arn = iot.describe_certificate(&id).await?.context("registered, not described")?.listed.arn;
        iot.attach(thing, &arn).await?;
    }
    Ok(id)
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn lists_describes_follows_attachments_and_changes_status() -> Result<()> {
    let iot = iot().await?;
    let (a, b) = (fresh_thing("reg-a")?, fresh_thing("reg-b")?);
    let id = registered(&iot, 90, CertStatus::Active, &[&a, &b]).await?;

    let mut listed = Vec::new();
    let mut marker = None;
    loop {
        let page = iot.list_certificates(marker.as_deref(), 250).await?;
        listed.extend(page.certificates);
        match page.next {
            Some(m) => marker = Some(m),
            None => break,
        }
    }
    let mine = listed.iter().find(|c| c.id == id).context("not listed")?;
    assert_eq!(mine.status, CertStatus::Active);
    assert!(mine.arn.ends_with(&format!(":cert/{id}")), "{}", mine.arn);

    let described = iot.describe_certificate(&id).await?.context("not described")?;
    assert!(described.pem.contains("BEGIN CERTIFICATE"));
    let mut things = iot.certificate_things(&mine.arn).await?;
    things.sort();
    assert_eq!(things, vec![a.clone(), b.clone()]);
    assert_eq!(iot.thing_certificates(&a).await?, vec![id.clone()]);

    iot.set_certificate_status(&id, CertStatus::Inactive).await?;
    let after = iot.describe_certificate(&id).await?.context("gone")?;
    assert_eq!(after.listed.status, CertStatus::Inactive);
    let missing = CertificateId::of_der(b"never registered");
    assert!(iot.describe_certificate(&missing).await?.is_none(), "a missing certificate is None");
    Ok(())
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn reconciliation_adopts_into_dynamodb_and_reports_the_findings() -> Result<()> {
    // GIVEN on moto: an inactive certificate still attached, one shared by two things, and a
    // device whose only certificate expired yesterday; an empty Certificates table
    let iot = iot().await?;
    let table = moto::fresh_adapters().await?.certs;
    let (lone, s1, s2, dead) =
        (fresh_thing("rec-lone")?, fresh_thing("rec-s1")?, fresh_thing("rec-s2")?, fresh_thing("rec-dead")?);
    let inactive = registered(&iot, 100, CertStatus::Inactive, &[&lone]).await?;
    let shared = registered(&iot, 100, CertStatus::Active, &[&s1, &s2]).await?;
    let expired = registered(&iot, -1, CertStatus::Active, &[&dead]).await?;
    // WHEN reconciled
    let now = fleet_shared::time::now_ms();
    let r = reconcile(&iot, &table, None, now, &reconcile::Options::default()).await?;
    // THEN all three are adopted with the PEM's dates, and each finding is there
    for id in [&inactive, &shared, &expired] {
        ensure!(table.certificate(id).await?.is_some(), "{id} not adopted");
    }
    let exp = table.certificate(&expired).await?.context("expired cert")?;
    ensure!(exp.not_after_ms < now && exp.thing.as_ref() == Some(&dead), "{exp:?}");
    let mine: Vec<&Finding> = r
        .findings
        .iter()
        .filter(|f| match f {
            Finding::InactiveAttached { certificate, .. }
            | Finding::SharedCertificate { certificate, .. } => [&inactive, &shared].contains(&certificate),
            Finding::OnlyCertificateExpired { thing, .. } => thing == &dead,
        })
        .collect();
    let kinds: Vec<&str> = mine.iter().map(|f| f.kind()).collect();
    assert_eq!(kinds, ["inactive_attached", "shared_certificate", "only_certificate_expired"]);
    Ok(())
}

/// `thing`'s serial on the allowlist, not provisioned yet.
async fn allow(table: &impl Allowlist, thing: &ThingName) -> Result<()> {
    let entry = AllowlistEntry {
        serial: thing.clone(),
        class: "meter".into(),
        region: "eu".into(),
        added_ms: 0,
        enrolment: Enrolment::Allowed,
    };
    Ok(table.allow(&[entry]).await?)
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn decommission_deactivates_the_certificate_in_aws_iot() -> Result<()> {
    let iot = iot().await?;
    let table = moto::fresh_adapters().await?.certs;
    let thing = fresh_thing("dec")?;
    allow(&table, &thing).await?;
    let id = registered(&iot, 100, CertStatus::Active, &[&thing]).await?;
    let ports = decommission::Ports { allowlist: &table, registry: &iot, inventory: &table, audit: &table };
    let done = decommission(ports, &thing, fleet_shared::time::now_ms()).await?;
    assert_eq!(done.deactivated, vec![id.clone()]);
    let status = iot.describe_certificate(&id).await?.context("gone")?.listed.status;
    assert_eq!(status, CertStatus::Inactive);
    let entry = table.entry(&thing).await?.context("entry gone")?;
    assert!(matches!(entry.enrolment, Enrolment::Decommissioned { .. }), "{entry:?}");
    Ok(())
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn a_rotated_device_connecting_with_its_new_certificate_retires_the_old_one_in_aws_iot() -> Result<()> {
    // GIVEN a serial provisioned with `old`, rotated to `new`: both ACTIVE and attached
    let iot = iot().await?;
    let table = moto::fresh_adapters().await?.certs;
    let thing = fresh_thing("rot")?;
    allow(&table, &thing).await?;
    let old = registered(&iot, 10, CertStatus::Active, &[&thing]).await?;
    let new = registered(&iot, 365, CertStatus::Active, &[&thing]).await?;
    table.enrol(&thing, &old, 1).await?;
    table.rotate(&thing, &old, &new, 2).await?;
    // (as the provisioning hook audits a rotation)
    let rotation = AuditEvent {
        at_ms: 2,
        serial: thing.to_string(),
        claim_certificate: old.to_string(),
        certificate: Some(new.to_string()),
        outcome: fleet_shared::certs::hook::ROTATED.into(),
        reason: None,
    };
    table.audit(&rotation).await?;
    let ports =
        || decommission::Ports { allowlist: &table, registry: &iot, inventory: &table, audit: &table };
    let status = async |id| -> Result<CertStatus> {
        Ok(iot.describe_certificate(id).await?.context("gone")?.listed.status)
    };
    // WHEN presence sees it connect with the old one: nothing is retired
    let now = fleet_shared::time::now_ms();
    let on_old = decommission::retire_on_connect(ports(), &thing, old.as_str(), now).await?;
    ensure!(on_old.is_none(), "{on_old:?}");
    assert_eq!((status(&old).await?, status(&new).await?), (CertStatus::Active, CertStatus::Active));
    // WHEN it connects with the new one: the old one is INACTIVE in AWS IoT, the new one kept
    let on_new = decommission::retire_on_connect(ports(), &thing, new.as_str(), now).await?;
    let retired = on_new.context("nothing retired")?;
    assert_eq!((&retired.kept, &retired.deactivated), (&new, &vec![old.clone()]));
    assert_eq!((status(&old).await?, status(&new).await?), (CertStatus::Inactive, CertStatus::Active));
    Ok(())
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn the_accounts_data_endpoint_is_described_for_command_dispatch() -> Result<()> {
    // command-dispatch publishes there when the stack's IotDataEndpoint is empty.
    let endpoint = iot().await?.data_endpoint().await?;
    anyhow::ensure!(endpoint.starts_with("https://") && endpoint.contains("-ats.iot."), "{endpoint}");
    Ok(())
}
