//! Handler tests: every event of `events/provisioning-hook/` through the handler on the
//! embedded (SQLite, in-memory) store, real certificates made with rcgen for the rest, and a
//! failing store for the retry path.

use anyhow::{Context as _, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::lambda::ErrorType;
use fleet_shared::model::{AllowlistEntry, CertificateId, Enrolment, ThingName};
use lambda_runtime::{Context, LambdaEvent};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use super::*;

const ALLOWED: &str = include_str!("../../../../events/provisioning-hook/allowed-serial.json");
const UNKNOWN: &str = include_str!("../../../../events/provisioning-hook/unknown-serial.json");
const MISMATCH: &str = include_str!("../../../../events/provisioning-hook/certificate-mismatch.json");
const MALFORMED: &str = include_str!("../../../../events/provisioning-hook/malformed.json");

/// 2025-11-24T16:00:00Z: inside the sample certificates' validity (2025–2045).
fn fixed_clock() -> i64 {
    1_764_000_000_000
}

type Store = SqliteStore;

async fn deps() -> Result<EmbeddedDeps> {
    let db = SqliteStore::in_memory()?;
    db.allow(&[entry("sensor-101"), entry("sensor-102")]).await?;
    Ok(Deps {
        allowlist: db.clone(),
        inventory: db.clone(),
        audit: db.clone(),
        registry: db,
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    })
}

fn entry(serial: &str) -> AllowlistEntry {
    AllowlistEntry {
        serial: ThingName::parse(serial).expect("serial"),
        class: "env-sensor".into(),
        region: "eu-west".into(),
        added_ms: 1,
        enrolment: Enrolment::Allowed,
    }
}

async fn invoke<A: Allowlist, I: CertificateInventory, P: ProvisioningAudit, R: DeviceAdmin>(
    deps: &Deps<A, I, P, R>,
    event: &str,
) -> Result<HookResponse, Retryable> {
    let payload = RawValue::from_string(event.to_owned()).expect("JSON");
    handle(deps, LambdaEvent::new(payload, Context::default())).await
}

/// A hook event for `serial` presenting a fresh certificate valid from `from_s` to `to_s`.
fn event(serial: &str, from_s: i64, to_s: i64) -> String {
    claimed(serial, from_s, to_s, &"c".repeat(64)).0
}

/// A hook event for `serial` claiming with `claim` and presenting a fresh certificate valid
/// from `from_s` to `to_s`, and that certificate's id.
fn claimed(serial: &str, from_s: i64, to_s: i64, claim: &str) -> (String, CertificateId) {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, serial);
    params.distinguished_name = dn;
    params.not_before = ::time::OffsetDateTime::from_unix_timestamp(from_s).expect("time");
    params.not_after = ::time::OffsetDateTime::from_unix_timestamp(to_s).expect("time");
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    let id = CertificateId::of_der(cert.der());
    let event = serde_json::json!({
        "claimCertificateId": claim, "certificateId": id.as_str(), "certificatePem": cert.pem(),
        "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/t", "clientId": serial,
        "parameters": {"SerialNumber": serial}})
    .to_string();
    (event, id)
}

const NOW_S: i64 = 1_764_000_000;

#[tokio::test]
async fn an_allowlisted_serial_provisions_with_its_class_and_region_and_is_recorded() -> Result<()> {
    let deps = deps().await?;
    // WHEN sensor-101 provisions with the sample certificate
    let r = invoke(&deps, ALLOWED).await?;
    // THEN it may, with its class and region for the template
    assert!(r.allow_provisioning);
    assert_eq!(
        (&r.parameter_overrides["DeviceClass"], &r.parameter_overrides["DeviceRegion"]),
        (&"env-sensor".into(), &"eu-west".into())
    );
    // AND the serial is enrolled with that certificate, which the inventory holds with its dates
    let id = CertificateId::parse("26efb32a10cd4c652187b4fa4b1863a787119b0c7d44ceaa3b666b00fecb9deb")?;
    let serial = ThingName::parse("sensor-101")?;
    let e = deps.allowlist.entry(&serial).await?.context("entry")?;
    assert!(
        matches!(&e.enrolment, Enrolment::Provisioned { certificate, .. } if *certificate == id),
        "{e:?}"
    );
    let c = deps.inventory.certificate(&id).await?.context("certificate recorded")?;
    assert_eq!((c.not_before_ms, c.not_after_ms), (1_735_689_600_000, 2_366_841_600_000));
    assert_eq!((c.thing.as_ref(), c.status), (Some(&serial), fleet_shared::model::CertStatus::Active));
    // AND the device is registered, with the firmware the template parameters named
    let d = deps.registry.device(&serial).await?.and_then(|d| d.registration).context("registered")?;
    assert_eq!((d.class.as_str(), d.region.as_str(), d.fw.as_str()), ("env-sensor", "eu-west", "1.4.2"));
    // AND the same request again (a retry) is allowed again; the trail holds both
    assert!(invoke(&deps, ALLOWED).await?.allow_provisioning);
    let trail = deps.audit.trail("sensor-101").await?;
    assert_eq!(trail.iter().map(|e| e.outcome.as_str()).collect::<Vec<_>>(), ["allowed", "allowed"]);
    Ok(())
}

#[tokio::test]
async fn a_provisioned_device_claiming_with_its_certificate_rotates_to_a_new_one() -> Result<()> {
    // GIVEN sensor-102 provisioned with `old` (firmware 2.0.1 registered)
    let deps = deps().await?;
    let serial = ThingName::parse("sensor-102")?;
    let (first, old) = claimed("sensor-102", NOW_S - 60, NOW_S + 86_400, &"c".repeat(64));
    let first =
        first.replace(r#""SerialNumber":"sensor-102""#, r#""SerialNumber":"sensor-102","Firmware":"2.0.1""#);
    assert!(invoke(&deps, &first).await?.allow_provisioning);
    // WHEN it claims with `old` for a new certificate
    let (rotation, new) = claimed("sensor-102", NOW_S - 60, NOW_S + 400 * 86_400, old.as_str());
    let r = invoke(&deps, &rotation).await?;
    // THEN it may, with its class and region for the template
    assert!(r.allow_provisioning);
    assert_eq!(r.parameter_overrides["DeviceClass"], "env-sensor");
    // AND its serial is provisioned with the new certificate, which the inventory holds
    let e = deps.allowlist.entry(&serial).await?.context("entry")?;
    assert!(
        matches!(&e.enrolment, Enrolment::Provisioned { certificate, .. } if *certificate == new),
        "{e:?}"
    );
    let c = deps.inventory.certificate(&new).await?.context("new certificate recorded")?;
    assert_eq!((c.thing.as_ref(), c.status), (Some(&serial), fleet_shared::model::CertStatus::Active));
    // AND its registration is left as it was (the rotation names no firmware)
    let d = deps.registry.device(&serial).await?.and_then(|d| d.registration).context("registered")?;
    assert_eq!(d.fw, "2.0.1");
    // AND the trail says it rotated, from what
    let trail = deps.audit.trail("sensor-102").await?;
    let last = trail.last().context("trail")?;
    assert_eq!(
        (last.outcome.as_str(), last.reason.clone()),
        ("rotated", Some(format!("from certificate {old}")))
    );
    // AND the same request again is a retry (allowed), recorded as the rotation it is, the
    // registration still untouched; claiming with the superseded `old` for yet another
    // certificate is refused: the serial is `new`'s now
    assert!(invoke(&deps, &rotation).await?.allow_provisioning);
    let last = deps.audit.trail("sensor-102").await?.pop().context("trail")?;
    assert_eq!(last.outcome, "rotated", "{last:?}");
    let d = deps.registry.device(&serial).await?.and_then(|d| d.registration).context("registered")?;
    assert_eq!(d.fw, "2.0.1", "a retried rotation re-registered the device");
    let (again, _) = claimed("sensor-102", NOW_S - 60, NOW_S + 86_400, old.as_str());
    assert!(!invoke(&deps, &again).await?.allow_provisioning);
    let last = deps.audit.trail("sensor-102").await?.pop().context("trail")?;
    assert!(last.reason.as_deref().is_some_and(|r| r.starts_with("already_provisioned")), "{last:?}");
    // AND its certificate cannot claim another serial, not even one only allowed
    let (other, _) = claimed("sensor-101", NOW_S - 60, NOW_S + 86_400, new.as_str());
    assert!(!invoke(&deps, &other).await?.allow_provisioning);
    let last = deps.audit.trail("sensor-101").await?.pop().context("trail")?;
    assert!(last.reason.as_deref().is_some_and(|r| r.starts_with("claim_of_another_thing")), "{last:?}");
    let e = deps.allowlist.entry(&ThingName::parse("sensor-101")?).await?.context("entry")?;
    assert_eq!(e.enrolment, Enrolment::Allowed);
    // AND a claim that is no certificate id at all (the local IoT Core's anonymous client) is
    // refused as malformed
    let (anonymous, _) = claimed("sensor-101", NOW_S - 60, NOW_S + 86_400, "");
    assert!(!invoke(&deps, &anonymous).await?.allow_provisioning);
    let last = deps.audit.trail("sensor-101").await?.pop().context("trail")?;
    assert!(last.reason.as_deref().is_some_and(|r| r.starts_with("malformed_event")), "{last:?}");
    Ok(())
}

#[tokio::test]
async fn every_refusal_has_its_reason_in_the_audit_trail() -> Result<()> {
    let deps = deps().await?;
    // WHEN an unknown serial, a certificate id that is not the PEM's, and a malformed event come
    for e in [UNKNOWN, MISMATCH, MALFORMED] {
        let r = invoke(&deps, e).await?;
        // THEN each is refused, with no overrides
        assert_eq!(serde_json::to_value(&r)?, serde_json::json!({"allowProvisioning": false}));
    }
    let reasons =
        |t: Vec<AuditEvent>| t.into_iter().map(|e| e.reason.unwrap_or_default()).collect::<Vec<_>>();
    let unknown = reasons(deps.audit.trail("sensor-999").await?);
    assert!(unknown.len() == 1 && unknown[0].starts_with("unknown_serial"), "{unknown:?}");
    let mismatch = reasons(deps.audit.trail("sensor-101").await?);
    assert!(mismatch.len() == 1 && mismatch[0].starts_with("certificate_mismatch"), "{mismatch:?}");
    let malformed = reasons(deps.audit.trail(INVALID_SERIAL).await?);
    assert!(malformed.len() == 1 && malformed[0].starts_with("malformed_event"), "{malformed:?}");
    // AND sensor-101 is still only allowed, not provisioned
    let e = deps.allowlist.entry(&ThingName::parse("sensor-101")?).await?.context("entry")?;
    assert_eq!(e.enrolment, Enrolment::Allowed);
    // AND a claim that is no certificate id at all (the local IoT Core's anonymous client) is
    // refused as malformed
    let (anonymous, _) = claimed("sensor-101", NOW_S - 60, NOW_S + 86_400, "");
    assert!(!invoke(&deps, &anonymous).await?.allow_provisioning);
    let last = deps.audit.trail("sensor-101").await?.pop().context("trail")?;
    assert!(last.reason.as_deref().is_some_and(|r| r.starts_with("malformed_event")), "{last:?}");
    Ok(())
}

#[tokio::test]
async fn a_second_certificate_for_a_provisioned_serial_and_a_decommissioned_serial_are_refused() -> Result<()>
{
    let deps = deps().await?;
    assert!(invoke(&deps, &event("sensor-102", NOW_S - 60, NOW_S + 86_400)).await?.allow_provisioning);
    // WHEN another certificate claims sensor-102, and sensor-101 is decommissioned then claimed
    let again = invoke(&deps, &event("sensor-102", NOW_S - 60, NOW_S + 86_400)).await?;
    deps.allowlist.decommission(&ThingName::parse("sensor-101")?, 5).await?;
    let gone = invoke(&deps, ALLOWED).await?;
    // THEN both are refused, each with its reason
    assert!(!again.allow_provisioning && !gone.allow_provisioning);
    let last_reason = |t: Vec<AuditEvent>| t.last().and_then(|e| e.reason.clone()).unwrap_or_default();
    assert!(last_reason(deps.audit.trail("sensor-102").await?).starts_with("already_provisioned"));
    assert!(last_reason(deps.audit.trail("sensor-101").await?).starts_with("decommissioned"));
    Ok(())
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() -> Result<()> {
    let deps = deps().await?;
    let expired = invoke(&deps, &event("sensor-101", NOW_S - 86_400, NOW_S - 1)).await?;
    let early = invoke(&deps, &event("sensor-102", NOW_S + 60, NOW_S + 86_400)).await?;
    assert!(!expired.allow_provisioning && !early.allow_provisioning);
    for serial in ["sensor-101", "sensor-102"] {
        let reason = deps.audit.trail(serial).await?.pop().and_then(|e| e.reason).unwrap_or_default();
        assert!(reason.starts_with("certificate_not_valid_now"), "{serial}: {reason}");
    }
    Ok(())
}

#[tokio::test]
async fn a_claim_asking_for_unknown_serials_is_counted_and_reported() -> Result<()> {
    let deps = deps().await?;
    // WHEN one claim certificate asks for serials that are not on the list, one short of
    // the threshold, then once more
    for n in 0..SUSPICIOUS_UNKNOWN_SERIALS - 1 {
        let r = invoke(&deps, &event(&format!("probe-{n}"), NOW_S - 60, NOW_S + 86_400)).await?;
        assert!(!r.allow_provisioning);
    }
    assert!(deps.audit.suspicious_claims().await?.is_empty(), "below the threshold");
    for n in SUSPICIOUS_UNKNOWN_SERIALS - 1..SUSPICIOUS_UNKNOWN_SERIALS {
        let r = invoke(&deps, &event(&format!("probe-{n}"), NOW_S - 60, NOW_S + 86_400)).await?;
        assert!(!r.allow_provisioning);
    }
    // THEN it is reported with its count
    let suspicious = deps.audit.suspicious_claims().await?;
    assert_eq!(suspicious, [("c".repeat(64), SUSPICIOUS_UNKNOWN_SERIALS)]);
    Ok(())
}

/// An allowlist that is always busy.
struct Busy;

impl Allowlist for Busy {
    async fn entry(&self, _: &ThingName) -> Result<Option<AllowlistEntry>, StoreError> {
        Err(StoreError::transient("allowlist get", "throttled"))
    }
    async fn allow(&self, _: &[AllowlistEntry]) -> Result<(), StoreError> {
        Err(StoreError::transient("allowlist add", "throttled"))
    }
    async fn disallow(&self, _: &ThingName) -> Result<bool, StoreError> {
        Err(StoreError::transient("allowlist remove", "throttled"))
    }
    async fn entries(&self, _: Option<&ThingName>, _: usize) -> Result<Vec<AllowlistEntry>, StoreError> {
        Err(StoreError::transient("allowlist list", "throttled"))
    }
    async fn enrol(&self, _: &ThingName, _: &CertificateId, _: i64) -> Result<Enrolled, StoreError> {
        Err(StoreError::transient("allowlist enrol", "throttled"))
    }
    async fn rotate(
        &self,
        _: &ThingName,
        _: &CertificateId,
        _: &CertificateId,
        _: i64,
    ) -> Result<Enrolled, StoreError> {
        Err(StoreError::transient("allowlist rotate", "throttled"))
    }
    async fn reset(&self, _: &ThingName) -> Result<bool, StoreError> {
        Err(StoreError::transient("allowlist reset", "throttled"))
    }
    async fn decommission(&self, _: &ThingName, _: i64) -> Result<Option<AllowlistEntry>, StoreError> {
        Err(StoreError::transient("allowlist decommission", "throttled"))
    }
}

#[tokio::test]
async fn a_busy_allowlist_fails_the_invocation_for_a_retry() -> Result<()> {
    let db: Store = SqliteStore::in_memory()?;
    let deps = Deps {
        allowlist: Busy,
        inventory: db.clone(),
        audit: db.clone(),
        registry: db,
        clock: fixed_clock,
        metrics: MetricsOut::Off,
    };
    let err = invoke(&deps, ALLOWED).await.err().context("a busy store must fail the hook")?;
    assert_eq!(err.error_type(), "Retryable");
    Ok(())
}
