//! Taking a device out of service: its serial number is marked decommissioned on the allowlist
//! (the hook never provisions it again), every certificate attached to its thing is set
//! `INACTIVE` in AWS IoT's registry (the device can no longer connect) and in the inventory, and
//! the decision joins the serial number's audit trail. Nothing is deleted: the entry, the
//! certificates and the trail stay as history. Running it again finishes what a failed run
//! left (each step is idempotent).

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::model::{AllowlistEntry, CertStatus, CertificateId, ThingName};
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
    // First the allowlist, so the device cannot provision again while its certificates go (a
    // provisioning finishing meanwhile attaches its certificate before the list below).
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
        let status = match ports.registry.describe_certificate(&id).await? {
            Some(d) => d.listed.status,
            None => continue, // deleted since it was listed
        };
        if matches!(status, CertStatus::Inactive | CertStatus::Revoked) {
            out.already_inactive.push(id);
            continue;
        }
        ports.registry.set_certificate_status(&id, CertStatus::Inactive).await?;
        if let Some(mut cert) = ports.inventory.certificate(&id).await? {
            cert.status = CertStatus::Inactive;
            cert.recorded_ms = now_ms;
            ports.inventory.record(&cert).await?;
        }
        out.deactivated.push(id);
    }
    let ids = |v: &[CertificateId]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::embedded::SqliteStore;
    use crate::certs::test_certs;
    use crate::model::{Certificate, Enrolment};

    const NOW_S: i64 = 1_764_000_000;

    #[tokio::test]
    async fn a_decommissioned_device_loses_its_certificates_and_keeps_its_history() {
        // GIVEN sensor-1, provisioned, with two certificates attached (one already revoked)
        let db = SqliteStore::in_memory().expect("db");
        let thing = ThingName::parse("sensor-1").expect("name");
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
        for (n, status) in [(1, CertStatus::Active), (2, CertStatus::Revoked)] {
            let pem = test_certs::pem("sensor-1", n, NOW_S - 100, NOW_S + 86_400 * 100);
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
}
