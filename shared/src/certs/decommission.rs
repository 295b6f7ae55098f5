//! Taking a device out of service: its serial number is marked decommissioned on the allowlist
//! (the hook never provisions it again), every certificate attached to its thing is set
//! `INACTIVE` in AWS IoT's registry (the device can no longer connect) and in the inventory, and
//! the decision joins the serial number's audit trail. Nothing is deleted: the entry, the
//! certificates and the trail stay as history. Running it again finishes what a failed run
//! left (each step is idempotent).
//!
//! Retiring after a rotation ([`retire_superseded`]) is the same for every certificate attached
//! to the thing except the one its serial is provisioned with, which must be `ACTIVE` and in
//! use: the device's latest session, as presence recorded it from IoT Core's lifecycle events,
//! authenticated with it ([`InUse`]). Else nothing is touched: a device that has its new
//! certificate but still connects with the old one (it has not stored the new one yet, or went
//! back to the old) would be cut off. The serial stays provisioned.

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::health::presence::Presence;
use crate::model::{AllowlistEntry, CertStatus, CertificateId, Enrolment, ThingName};
use crate::ports::{
    Allowlist, AuditEvent, CertificateControl, CertificateInventory, CertificateRegistry, ProvisioningAudit,
};

/// What decommissioning did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decommissioned {
    pub thing: ThingName,
    /// The allowlist entry before (`None`: the serial was never on the allowlist).
    pub entry_before: Option<AllowlistEntry>,
    /// Certificates set `INACTIVE` now.
    pub deactivated: Vec<CertificateId>,
    /// Certificates that were already inactive or revoked (revoked is final in AWS IoT).
    pub already_inactive: Vec<CertificateId>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecommissionError {
    #[error("{0} is neither on the allowlist nor has a certificate attached: nothing to decommission")]
    Unknown(ThingName),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The ports decommissioning goes through.
pub struct Ports<'a, A, R, I, P> {
    pub allowlist: &'a A,
    pub registry: &'a R,
    pub inventory: &'a I,
    pub audit: &'a P,
}

pub async fn decommission<A, R, I, P>(
    ports: Ports<'_, A, R, I, P>,
    thing: &ThingName,
    now_ms: i64,
) -> Result<Decommissioned, DecommissionError>
where
    A: Allowlist,
    R: CertificateRegistry + CertificateControl,
    I: CertificateInventory,
    P: ProvisioningAudit,
{
    // First the allowlist, so the device cannot provision again while its certificates go. (A
    // provisioning the hook admitted just before gets its certificate attached and activated by
    // IoT after the hook answered, possibly after the list below: running it again takes it.)
    let entry_before = ports.allowlist.decommission(thing, now_ms).await?;
    let attached = ports.registry.thing_certificates(thing).await?;
    if entry_before.is_none() && attached.is_empty() {
        return Err(DecommissionError::Unknown(thing.clone()));
    }
    let mut out = Decommissioned {
        thing: thing.clone(),
        entry_before,
        deactivated: Vec::new(),
        already_inactive: Vec::new(),
    };
    for id in attached {
        match deactivate(&ports, &id, now_ms).await? {
            Some(true) => out.deactivated.push(id),
            Some(false) => out.already_inactive.push(id),
            None => {} // deleted since it was listed
        }
    }
    ports
        .audit
        .audit(&AuditEvent {
            at_ms: now_ms,
            serial: thing.to_string(),
            claim_certificate: String::new(),
            certificate: out.deactivated.first().map(ToString::to_string),
            outcome: "decommissioned".to_owned(),
            reason: Some(format!(
                "deactivated [{}]; already inactive [{}]",
                ids(&out.deactivated),
                ids(&out.already_inactive)
            )),
        })
        .await?;
    Ok(out)
}

fn ids(v: &[CertificateId]) -> String {
    v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// Set `id` `INACTIVE` in the registry and the inventory: `Some(true)` done now, `Some(false)`
/// it already was inactive or revoked, `None` it is gone.
async fn deactivate<A, R, I, P>(
    ports: &Ports<'_, A, R, I, P>,
    id: &CertificateId,
    now_ms: i64,
) -> Result<Option<bool>, StoreError>
where
    R: CertificateRegistry + CertificateControl,
    I: CertificateInventory,
{
    let status = match ports.registry.describe_certificate(id).await? {
        Some(d) => d.listed.status,
        None => return Ok(None),
    };
    if matches!(status, CertStatus::Inactive | CertStatus::Revoked) {
        return Ok(Some(false));
    }
    ports.registry.set_certificate_status(id, CertStatus::Inactive).await?;
    if let Some(mut cert) = ports.inventory.certificate(id).await? {
        cert.status = CertStatus::Inactive;
        cert.recorded_ms = now_ms;
        ports.inventory.record(&cert).await?;
    }
    Ok(Some(true))
}

/// What retiring a rotated device's superseded certificates did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    pub thing: ThingName,
    /// The certificate its serial is provisioned with: kept.
    pub kept: CertificateId,
    /// Certificates set `INACTIVE` now.
    pub deactivated: Vec<CertificateId>,
    /// Certificates that were already inactive or revoked.
    pub already_inactive: Vec<CertificateId>,
    /// Certificates attached to the thing and left as they are: on a device's connection
    /// ([`retire_on_connect`]), those no rotation of its serial superseded.
    #[serde(default)]
    pub left: Vec<CertificateId>,
}

impl Retired {
    /// `thing` with `kept`, before anything was done.
    fn nothing(thing: &ThingName, kept: CertificateId) -> Self {
        Self {
            thing: thing.clone(),
            kept,
            deactivated: Vec::new(),
            already_inactive: Vec::new(),
            left: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    #[error("{0} is not provisioned: none of its certificates is the current one")]
    NotProvisioned(ThingName),
    #[error("{thing}'s current certificate {current} is {status:?}, not ACTIVE: retiring the others would cut the device off")]
    CurrentNotActive { thing: ThingName, current: CertificateId, status: Option<CertStatus> },
    #[error("{0}'s certificate changed while its certificates were listed (a rotation): run it again")]
    Moved(ThingName),
    #[error(
        "{thing} has not connected with its current certificate {current} yet (its latest session \
         used {}): retiring the others could cut it off; run it again once it has reconnected",
        latest.as_deref().unwrap_or("no certificate recorded")
    )]
    NotInUse { thing: ThingName, current: CertificateId, latest: Option<String> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What shows that a device uses its current certificate, before the others are retired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InUse {
    /// The credential its latest session authenticated with, as presence recorded it (`None`:
    /// none recorded): it must be the current certificate.
    LatestSession(Option<String>),
    /// An operator vouches for it (`fleetctl devices retire-certs --force`), e.g. for a device
    /// whose latest session was recorded before presence kept principals.
    Vouched,
}

impl InUse {
    /// What a device's presence says (`None`: no lifecycle event of it recorded).
    pub fn from_presence(presence: Option<&Presence>) -> Self {
        InUse::LatestSession(presence.and_then(|p| p.principal.clone()))
    }

    fn check(&self, thing: &ThingName, current: &CertificateId) -> Result<(), RetireError> {
        let latest = match self {
            InUse::Vouched => return Ok(()),
            InUse::LatestSession(principal) => principal.clone(),
        };
        if latest.as_deref() == Some(current.as_str()) {
            return Ok(());
        }
        Err(RetireError::NotInUse { thing: thing.clone(), current: current.clone(), latest })
    }
}

/// Which of a thing's other certificates retiring deactivates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every one attached (an operator's decision: `fleetctl devices retire-certs`).
    Attached,
    /// Only those a rotation of its serial superseded (the `from` of its `rotated` audit
    /// events): one attached by other means is left alone.
    Superseded,
}

/// After a rotation: deactivate the certificates attached to `thing` that `scope` names, never
/// the one its serial is provisioned with, if that one is `ACTIVE` and `in_use`; audited
/// `retired` when it deactivated one. Idempotent.
pub async fn retire_superseded<A, R, I, P>(
    ports: Ports<'_, A, R, I, P>,
    thing: &ThingName,
    in_use: &InUse,
    scope: Scope,
    now_ms: i64,
) -> Result<Retired, RetireError>
where
    A: Allowlist,
    R: CertificateRegistry + CertificateControl,
    I: CertificateInventory,
    P: ProvisioningAudit,
{
    let current = match ports.allowlist.entry(thing).await? {
        Some(AllowlistEntry { enrolment: Enrolment::Provisioned { certificate, .. }, .. }) => certificate,
        _ => return Err(RetireError::NotProvisioned(thing.clone())),
    };
    in_use.check(thing, &current)?;
    let attached = ports.registry.thing_certificates(thing).await?;
    if attached.iter().all(|id| *id == current) {
        return Ok(Retired::nothing(thing, current)); // nothing else attached
    }
    let status = ports.registry.describe_certificate(&current).await?.map(|d| d.listed.status);
    if status != Some(CertStatus::Active) {
        return Err(RetireError::CurrentNotActive { thing: thing.clone(), current, status });
    }
    // A rotation finishing meanwhile would have moved the serial to a certificate the list may
    // hold: read the entry again, and touch nothing if it moved.
    match ports.allowlist.entry(thing).await? {
        Some(AllowlistEntry { enrolment: Enrolment::Provisioned { certificate, .. }, .. })
            if certificate == current => {}
        _ => return Err(RetireError::Moved(thing.clone())),
    }
    let mut out = Retired::nothing(thing, current);
    let superseded: Option<std::collections::BTreeSet<String>> = match scope {
        Scope::Attached => None,
        Scope::Superseded => Some(
            ports
                .audit
                .trail(thing.as_str())
                .await?
                .into_iter()
                .filter(|e| e.outcome == crate::certs::hook::ROTATED)
                .map(|e| e.claim_certificate)
                .collect(),
        ),
    };
    for id in attached {
        if id == out.kept {
            continue;
        }
        if superseded.as_ref().is_some_and(|s| !s.contains(id.as_str())) {
            out.left.push(id);
            continue;
        }
        match deactivate(&ports, &id, now_ms).await? {
            Some(true) => out.deactivated.push(id),
            Some(false) => out.already_inactive.push(id),
            None => {}
        }
    }
    if out.deactivated.is_empty() {
        return Ok(out); // nothing changed: nothing for the trail
    }
    ports
        .audit
        .audit(&AuditEvent {
            at_ms: now_ms,
            serial: thing.to_string(),
            claim_certificate: String::new(),
            certificate: Some(out.kept.to_string()),
            outcome: "retired".to_owned(),
            reason: Some(format!(
                "kept {}; deactivated [{}]; already inactive [{}]",
                out.kept,
                ids(&out.deactivated),
                ids(&out.already_inactive)
            )),
        })
        .await?;
    Ok(out)
}

/// `thing` connected with `principal`, another credential than its previous session's (presence
/// saw it): if that is the certificate its serial is provisioned with, the certificates a
/// rotation of its serial superseded (its `rotated` audit events' `from`) are retired now, the
/// device having shown that it uses the new one; any other certificate attached to the thing is
/// left alone. A device connecting with anything else, or a serial not provisioned, is left
/// alone (`Ok(None)`), as is one a second rotation moved meanwhile (its next connect decides).
/// A device that never rotated costs a read of its entry and of its thing's certificates.
pub async fn retire_on_connect<A, R, I, P>(
    ports: Ports<'_, A, R, I, P>,
    thing: &ThingName,
    principal: &str,
    now_ms: i64,
) -> Result<Option<Retired>, StoreError>
where
    A: Allowlist,
    R: CertificateRegistry + CertificateControl,
    I: CertificateInventory,
    P: ProvisioningAudit,
{
    let in_use = InUse::LatestSession(Some(principal.to_owned()));
    match retire_superseded(ports, thing, &in_use, Scope::Superseded, now_ms).await {
        Ok(retired) => Ok(Some(retired)),
        Err(RetireError::Store(e)) => Err(e),
        // Connected with something else than its current certificate, or not provisioned: the
        // usual case for a claim session or a device that has not rotated.
        Err(why @ (RetireError::NotInUse { .. } | RetireError::NotProvisioned(_))) => {
            tracing::debug!(%thing, %why, "nothing to retire on connect");
            Ok(None)
        }
        Err(why) => {
            tracing::warn!(%thing, %why, "superseded certificates not retired on connect");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::embedded::SqliteStore;
    use crate::certs::test_certs;
    use crate::model::Certificate;

    const NOW_S: i64 = 1_764_000_000;

    /// A device's presence whose latest session authenticated with `certificate`.
    fn session_with(certificate: &CertificateId) -> Presence {
        let event = crate::health::presence::LifecycleEvent {
            client_id: "sensor-2".into(),
            timestamp: NOW_S * 1000,
            event_type: crate::health::presence::Kind::Connected,
            version_number: 1,
            session_identifier: None,
            disconnect_reason: None,
            client_initiated_disconnect: None,
            principal_identifier: Some(certificate.to_string()),
        };
        crate::health::presence::fold(None, [&event]).expect("a presence")
    }

    /// `serial` on the allowlist (not provisioned), with one certificate of each of `statuses`
    /// registered, attached to its thing and in the inventory: the store, the thing, the ids.
    async fn allowed_with(
        serial: &str,
        statuses: &[CertStatus],
    ) -> (SqliteStore, ThingName, Vec<CertificateId>) {
        let db = SqliteStore::in_memory().expect("db");
        let thing = ThingName::parse(serial).expect("name");
        db.allow(&[AllowlistEntry {
            serial: thing.clone(),
            class: "meter".into(),
            region: "eu".into(),
            added_ms: 0,
            enrolment: Enrolment::Allowed,
        }])
        .await
        .expect("allowed");
        let mut ids = Vec::new();
        for (n, &status) in (1..).zip(statuses) {
            let pem = test_certs::pem(serial, n, NOW_S - 100, NOW_S + 86_400 * 100);
            let id = db.register_local_certificate(&pem, status, 0).await.expect("registered");
            db.attach_local_certificate(&thing, &id).await.expect("attached");
            let p = crate::certs::parse_pem(&pem).expect("pem");
            db.record(&Certificate {
                id: id.clone(),
                thing: Some(thing.clone()),
                serial: p.serial,
                issuer: p.issuer,
                subject: p.subject,
                not_before_ms: p.not_before_ms,
                not_after_ms: p.not_after_ms,
                status,
                recorded_ms: 0,
            })
            .await
            .expect("recorded");
            ids.push(id);
        }
        (db, thing, ids)
    }

    #[tokio::test]
    async fn a_decommissioned_device_loses_its_certificates_and_keeps_its_history() {
        // GIVEN sensor-1, provisioned, with two certificates attached (one already revoked)
        let (db, thing, ids) = allowed_with("sensor-1", &[CertStatus::Active, CertStatus::Revoked]).await;
        let ports = || Ports { allowlist: &db, registry: &db, inventory: &db, audit: &db };
        // WHEN it is decommissioned
        let d = decommission(ports(), &thing, NOW_S * 1000).await.expect("decommissioned");
        // THEN the active certificate is inactive in the registry and the inventory, the
        // revoked one untouched, the allowlist says decommissioned, the trail says why
        assert_eq!((d.deactivated, d.already_inactive), (vec![ids[0].clone()], vec![ids[1].clone()]));
        assert_eq!(db.local_certificate_status(&ids[0]).await.expect("read"), Some(CertStatus::Inactive));
        assert_eq!(db.local_certificate_status(&ids[1]).await.expect("read"), Some(CertStatus::Revoked));
        assert_eq!(
            db.certificate(&ids[0]).await.expect("read").map(|c| c.status),
            Some(CertStatus::Inactive)
        );
        let entry = db.entry(&thing).await.expect("read").expect("kept");
        assert!(matches!(entry.enrolment, Enrolment::Decommissioned { .. }), "{entry:?}");
        let trail = db.trail("sensor-1").await.expect("trail");
        assert_eq!(trail.last().map(|e| e.outcome.as_str()), Some("decommissioned"));
        // AND again: nothing left to deactivate, still decommissioned
        let again = decommission(ports(), &thing, NOW_S * 1000).await.expect("again");
        assert!(again.deactivated.is_empty() && again.already_inactive.len() == 2, "{again:?}");
        // AND a thing nobody knows is an error, not a silent success
        let ghost = ThingName::parse("ghost").expect("name");
        assert!(matches!(decommission(ports(), &ghost, 0).await, Err(DecommissionError::Unknown(_))));
    }

    #[tokio::test]
    async fn after_a_rotation_the_superseded_certificate_is_retired_and_the_current_one_kept() {
        // GIVEN sensor-2 rotated from certificate 1 to certificate 2, both ACTIVE and attached
        let (db, thing, ids) = allowed_with("sensor-2", &[CertStatus::Active, CertStatus::Active]).await;
        let ports = || Ports { allowlist: &db, registry: &db, inventory: &db, audit: &db };
        // (not provisioned yet: nothing is the current certificate, nothing is touched)
        let early = retire_superseded(ports(), &thing, &InUse::Vouched, Scope::Attached, 1).await;
        assert!(matches!(early, Err(RetireError::NotProvisioned(_))), "{early:?}");
        assert_eq!(db.enrol(&thing, &ids[0], 1).await.expect("enrol"), crate::ports::Enrolled::Yes);
        assert_eq!(
            db.rotate(&thing, &ids[0], &ids[1], 2).await.expect("rotate"),
            crate::ports::Enrolled::Yes
        );
        // (while its latest session is unknown or used certificate 1, nothing is touched)
        for latest in [None, Some(session_with(&ids[0]))] {
            let in_use = InUse::from_presence(latest.as_ref());
            let refused = retire_superseded(ports(), &thing, &in_use, Scope::Attached, 3).await;
            assert!(
                matches!(&refused, Err(RetireError::NotInUse { current, .. }) if *current == ids[1]),
                "{latest:?}: {refused:?}"
            );
            assert_eq!(db.local_certificate_status(&ids[0]).await.expect("read"), Some(CertStatus::Active));
        }
        // WHEN it has connected with certificate 2 and its superseded certificates are retired
        let in_use = InUse::from_presence(Some(&session_with(&ids[1])));
        let r = retire_superseded(ports(), &thing, &in_use, Scope::Attached, NOW_S * 1000)
            .await
            .expect("retired");
        // THEN certificate 1 is INACTIVE, certificate 2 (the current one) still ACTIVE, the
        // serial still provisioned with it, the trail says so
        assert_eq!((&r.kept, &r.deactivated, r.already_inactive.len()), (&ids[1], &vec![ids[0].clone()], 0));
        assert_eq!(db.local_certificate_status(&ids[0]).await.expect("read"), Some(CertStatus::Inactive));
        assert_eq!(db.local_certificate_status(&ids[1]).await.expect("read"), Some(CertStatus::Active));
        let entry = db.entry(&thing).await.expect("read").expect("kept");
        assert!(
            matches!(entry.enrolment, Enrolment::Provisioned { ref certificate, .. } if *certificate == ids[1])
        );
        let trail = db.trail("sensor-2").await.expect("trail");
        assert_eq!(trail.last().map(|e| e.outcome.as_str()), Some("retired"));
        // AND again: nothing left to do
        let again =
            retire_superseded(ports(), &thing, &in_use, Scope::Attached, NOW_S * 1000).await.expect("again");
        assert!(again.deactivated.is_empty() && again.already_inactive == vec![ids[0].clone()], "{again:?}");
        // AND with the current certificate not ACTIVE nothing is touched
        db.set_certificate_status(&ids[1], CertStatus::Inactive).await.expect("deactivated");
        db.set_certificate_status(&ids[0], CertStatus::Active).await.expect("reactivated");
        let refused =
            retire_superseded(ports(), &thing, &InUse::Vouched, Scope::Attached, NOW_S * 1000).await;
        assert!(matches!(refused, Err(RetireError::CurrentNotActive { .. })), "{refused:?}");
        assert_eq!(db.local_certificate_status(&ids[0]).await.expect("read"), Some(CertStatus::Active));
    }
}
