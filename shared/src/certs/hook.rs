//! The fleet-provisioning pre-provisioning hook's decision (pure): AWS IoT calls the hook with
//! the device's claim, its new certificate and the template parameters, and provisions only
//! on `allowProvisioning: true`, with the hook's `parameterOverrides`.
//!
//! A device may provision when its serial number (`parameters.SerialNumber`, which becomes the
//! thing name) is on the allowlist, not decommissioned, and not already provisioned with
//! another certificate (the same certificate again is a retry, and allowed); and when the
//! certificate it presents is a readable X.509 certificate whose id is the SHA-256 of its DER
//! (as AWS computes ids) and is valid now. Every refusal has a reason code.
//!
//! Certificate rotation goes the same way, as AWS documents it: a provisioned device connects
//! with its current certificate, asks CreateCertificateFromCsr for a new one, and calls
//! RegisterThing with its current certificate as the claim. The hook sees `claimCertificateId`
//! equal to the certificate the serial is provisioned with, and admits the request as a
//! rotation ([`Admission::Rotate`]): only the holder of that certificate's key can present it
//! (IoT Core authenticated the connection with it), so no other device can take the serial.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{parse_pem, ParsedCert};
use crate::model::{AllowlistEntry, CertificateId, Enrolment, ThingName};

/// Unknown serials one claim certificate may ask for before it is reported as suspicious.
pub const SUSPICIOUS_UNKNOWN_SERIALS: u64 = 5;

/// The audit outcome of a rotation: its `claim_certificate` is the certificate it superseded
/// (what [`crate::certs::decommission`] retires once the device uses the new one).
pub const ROTATED: &str = "rotated";

/// The hook's input, as AWS IoT sends it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookRequest {
    pub claim_certificate_id: String,
    pub certificate_id: String,
    pub certificate_pem: String,
    pub template_arn: String,
    pub client_id: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// The hook's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookResponse {
    pub allow_provisioning: bool,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameter_overrides: Map<String, Value>,
}

impl HookResponse {
    pub fn refuse() -> Self {
        Self { allow_provisioning: false, parameter_overrides: Map::new() }
    }
}

/// Why a device may not provision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed hook event: {0}")]
    MalformedEvent(String),
    #[error(
        "no SerialNumber parameter, or not a valid thing name of at most {MAX_SERIAL_LEN} characters \
         (one starting {CLAIM_CLIENT_PREFIX:?} is a claim session's client id, never a serial): {0:?}"
    )]
    BadSerial(String),
    #[error("serial number {0} is not on the allowlist")]
    UnknownSerial(String),
    #[error("serial number {0} is decommissioned")]
    Decommissioned(String),
    #[error("serial number {serial} is already provisioned with certificate {certificate}")]
    AlreadyProvisioned { serial: String, certificate: CertificateId },
    #[error(
        "the claim is the certificate of thing {claim_thing}, which may rotate its own certificate only"
    )]
    ClaimOfAnotherThing { claim_thing: String },
    #[error("serial number {0} is no longer provisioned (reset while it rotated): ask again")]
    NotProvisioned(String),
    #[error("unreadable certificate: {0}")]
    BadCertificate(String),
    #[error("certificate id {given} is not the certificate's ({actual})")]
    CertificateMismatch { given: String, actual: CertificateId },
    #[error("certificate not valid now (valid {not_before_ms}..{not_after_ms} ms)")]
    NotValidNow { not_before_ms: i64, not_after_ms: i64 },
}

impl Refusal {
    /// A stable reason code (logs, metrics, the audit trail).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::MalformedEvent(_) => "malformed_event",
            Refusal::BadSerial(_) => "bad_serial",
            Refusal::UnknownSerial(_) => "unknown_serial",
            Refusal::Decommissioned(_) => "decommissioned",
            Refusal::AlreadyProvisioned { .. } => "already_provisioned",
            Refusal::NotProvisioned(_) => "not_provisioned",
            Refusal::ClaimOfAnotherThing { .. } => "claim_of_another_thing",
            Refusal::BadCertificate(_) => "bad_certificate",
            Refusal::CertificateMismatch { .. } => "certificate_mismatch",
            Refusal::NotValidNow { .. } => "certificate_not_valid_now",
        }
    }
}

/// Read the hook event; a malformed one is a refusal, never a panic.
pub fn parse_request(event: &str) -> Result<HookRequest, Refusal> {
    serde_json::from_str(event).map_err(|e| Refusal::MalformedEvent(e.to_string()))
}

/// The client ids a session with the fleet's claim certificate may connect under
/// (`ClaimPolicy` allows `client/claim-*` only). The claim is in every device's hands, so a
/// claim session that could take any client id could take a running device's over (IoT Core
/// disconnects the older session of a client id); no serial, hence no thing, starts with it.
pub const CLAIM_CLIENT_PREFIX: &str = "claim-";

/// Longest serial: its claim session's client id, `claim-<serial>`, within IoT Core's 128
/// characters.
pub const MAX_SERIAL_LEN: usize = crate::model::MAX_THING_NAME_LEN - CLAIM_CLIENT_PREFIX.len();

/// A serial number: a valid thing name outside the claim sessions' client ids
/// ([`CLAIM_CLIENT_PREFIX`]), since a device's client id is its thing name, and short enough
/// to provision by claim ([`MAX_SERIAL_LEN`]).
pub fn serial(raw: &str) -> Result<ThingName, Refusal> {
    ThingName::parse(raw)
        .ok()
        .filter(|t| !t.as_str().starts_with(CLAIM_CLIENT_PREFIX) && t.as_str().len() <= MAX_SERIAL_LEN)
        .ok_or_else(|| Refusal::BadSerial(raw.to_owned()))
}

/// The serial number a request provisions (the template's `SerialNumber` parameter).
pub fn serial_of(request: &HookRequest) -> Result<ThingName, Refusal> {
    serial(request.parameters.get("SerialNumber").and_then(Value::as_str).unwrap_or_default())
}

/// The certificate a request presents, checked: readable, its id the one given, valid at `now_ms`.
pub fn check_certificate(request: &HookRequest, now_ms: i64) -> Result<ParsedCert, Refusal> {
    let cert = parse_pem(&request.certificate_pem).map_err(|e| Refusal::BadCertificate(e.to_string()))?;
    if cert.id.as_str() != request.certificate_id {
        return Err(Refusal::CertificateMismatch { given: request.certificate_id.clone(), actual: cert.id });
    }
    if now_ms < cert.not_before_ms || now_ms > cert.not_after_ms {
        return Err(Refusal::NotValidNow {
            not_before_ms: cert.not_before_ms,
            not_after_ms: cert.not_after_ms,
        });
    }
    Ok(cert)
}

/// How the allowlist admits a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A first provisioning (or its retry: the serial is provisioned with this certificate).
    Enrol,
    /// A rotation: the device claims with `from`, the certificate its serial is provisioned
    /// with, and asks for the new one.
    Rotate { from: CertificateId },
}

/// Whether the allowlist lets `serial` provision with `certificate`, the request claiming with
/// `claim` (the certificate the device connected with).
pub fn admit(
    serial: &ThingName,
    entry: Option<&AllowlistEntry>,
    certificate: &CertificateId,
    claim: &str,
) -> Result<Admission, Refusal> {
    let Some(entry) = entry else { return Err(Refusal::UnknownSerial(serial.to_string())) };
    match &entry.enrolment {
        Enrolment::Allowed => Ok(Admission::Enrol),
        Enrolment::Provisioned { certificate: c, .. } if c == certificate => Ok(Admission::Enrol),
        Enrolment::Provisioned { certificate: c, .. } if c.as_str() == claim => {
            Ok(Admission::Rotate { from: c.clone() })
        }
        Enrolment::Provisioned { certificate: c, .. } => {
            Err(Refusal::AlreadyProvisioned { serial: serial.to_string(), certificate: c.clone() })
        }
        Enrolment::Decommissioned { .. } => Err(Refusal::Decommissioned(serial.to_string())),
    }
}

/// The answer allowing `entry`'s device: its class and region for the template.
pub fn allow(entry: &AllowlistEntry) -> HookResponse {
    let mut overrides = Map::new();
    overrides.insert("DeviceClass".into(), entry.class.clone().into());
    overrides.insert("DeviceRegion".into(), entry.region.clone().into());
    HookResponse { allow_provisioning: true, parameter_overrides: overrides }
}

#[cfg(test)]
mod tests {
    use super::super::test_certs;
    use super::*;

    const NOW_S: i64 = 1_764_000_000;

    fn request(pem: &str, id: &str, serial: &str) -> HookRequest {
        let mut parameters = Map::new();
        parameters.insert("SerialNumber".into(), serial.into());
        HookRequest {
            claim_certificate_id: "c".repeat(64),
            certificate_id: id.to_owned(),
            certificate_pem: pem.to_owned(),
            template_arn: "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/fleetline-dev-devices"
                .into(),
            client_id: serial.to_owned(),
            parameters,
        }
    }

    fn entry(serial: &str, enrolment: Enrolment) -> AllowlistEntry {
        AllowlistEntry {
            serial: ThingName::parse(serial).expect("serial"),
            class: "env-sensor".into(),
            region: "eu-west".into(),
            added_ms: 1,
            enrolment,
        }
    }

    #[test]
    fn a_valid_certificate_whose_id_matches_passes_and_anything_else_is_refused_with_a_reason() {
        let pem = test_certs::pem("dev-1", 7, NOW_S - 60, NOW_S + 86_400);
        let id = parse_pem(&pem).expect("pem").id;
        assert!(check_certificate(&request(&pem, id.as_str(), "dev-1"), NOW_S * 1000).is_ok());
        let wrong = check_certificate(&request(&pem, &"0".repeat(64), "dev-1"), NOW_S * 1000);
        assert_eq!(wrong.map_err(|r| r.code()), Err("certificate_mismatch"));
        let future = test_certs::pem("dev-1", 7, NOW_S + 60, NOW_S + 86_400);
        let fid = parse_pem(&future).expect("pem").id;
        let early = check_certificate(&request(&future, fid.as_str(), "dev-1"), NOW_S * 1000);
        assert_eq!(early.map_err(|r| r.code()), Err("certificate_not_valid_now"), "notBefore in the future");
        let garbage = check_certificate(
            &request("-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----", "x", "d"),
            0,
        );
        assert_eq!(garbage.map_err(|r| r.code()), Err("bad_certificate"));
    }

    #[test]
    fn the_allowlist_admits_new_and_retrying_devices_only() {
        let serial = ThingName::parse("dev-1").expect("serial");
        let mine = CertificateId::of_der(b"mine");
        let other = CertificateId::of_der(b"other");
        let claim = "c".repeat(64);
        let provisioned =
            Enrolment::Provisioned { thing: serial.clone(), certificate: mine.clone(), at_ms: 5 };
        let allowed = entry("dev-1", Enrolment::Allowed);
        assert_eq!(admit(&serial, Some(&allowed), &mine, &claim), Ok(Admission::Enrol));
        let retry = admit(&serial, Some(&entry("dev-1", provisioned.clone())), &mine, &claim);
        assert_eq!(retry, Ok(Admission::Enrol), "a retry");
        let code = |r: Result<Admission, Refusal>| r.map_err(|e| e.code());
        assert_eq!(
            code(admit(&serial, Some(&entry("dev-1", provisioned)), &other, &claim)),
            Err("already_provisioned")
        );
        let decommissioned = entry("dev-1", Enrolment::Decommissioned { at_ms: 9 });
        assert_eq!(code(admit(&serial, Some(&decommissioned), &mine, mine.as_str())), Err("decommissioned"));
        assert_eq!(code(admit(&serial, None, &mine, &claim)), Err("unknown_serial"));
    }

    #[test]
    fn a_device_claiming_with_its_provisioned_certificate_rotates_and_no_other_claim_does() {
        // GIVEN dev-1 provisioned with `old`
        let serial = ThingName::parse("dev-1").expect("serial");
        let (old, new) = (CertificateId::of_der(b"old"), CertificateId::of_der(b"new"));
        let provisioned = entry(
            "dev-1",
            Enrolment::Provisioned { thing: serial.clone(), certificate: old.clone(), at_ms: 5 },
        );
        // WHEN it claims with `old` for `new`: a rotation from `old`
        assert_eq!(
            admit(&serial, Some(&provisioned), &new, old.as_str()),
            Ok(Admission::Rotate { from: old.clone() })
        );
        // a claim certificate, or another device's certificate, asking for dev-1 is refused
        let stranger = CertificateId::of_der(b"stranger");
        for claim in ["c".repeat(64), stranger.to_string()] {
            let refused = admit(&serial, Some(&provisioned), &new, &claim);
            assert_eq!(refused.map_err(|r| r.code()), Err("already_provisioned"), "claim {claim}");
        }
        // a serial only allowed, or decommissioned, never rotates
        let allowed = entry("dev-1", Enrolment::Allowed);
        assert_eq!(admit(&serial, Some(&allowed), &new, old.as_str()), Ok(Admission::Enrol));
        let gone = entry("dev-1", Enrolment::Decommissioned { at_ms: 9 });
        assert_eq!(
            admit(&serial, Some(&gone), &new, old.as_str()).map_err(|r| r.code()),
            Err("decommissioned")
        );
    }

    #[test]
    fn malformed_events_and_serials_are_refusals() {
        assert_eq!(parse_request("{").map_err(|r| r.code()), Err("malformed_event"));
        assert_eq!(parse_request(r#"{"certificateId":"x"}"#).map_err(|r| r.code()), Err("malformed_event"));
        let mut r = request("", "", "dev-1");
        assert_eq!(serial_of(&r).map(|s| s.to_string()), Ok("dev-1".to_owned()));
        r.parameters.insert("SerialNumber".into(), "has space".into());
        assert_eq!(serial_of(&r).map_err(|e| e.code()), Err("bad_serial"));
        // a claim session's client id is never a serial, so no thing can be taken over by one
        r.parameters.insert("SerialNumber".into(), "claim-dev-1".into());
        assert_eq!(serial_of(&r).map_err(|e| e.code()), Err("bad_serial"));
        assert_eq!(serial("claimed-1").map(|s| s.to_string()), Ok("claimed-1".to_owned()));
        // its claim session's client id must fit IoT Core's 128 characters
        assert!(serial(&"s".repeat(MAX_SERIAL_LEN)).is_ok());
        assert_eq!(serial(&"s".repeat(MAX_SERIAL_LEN + 1)).map_err(|e| e.code()), Err("bad_serial"));
        r.parameters.clear();
        assert_eq!(serial_of(&r).map_err(|e| e.code()), Err("bad_serial"));
        let allowed = allow(&entry("dev-1", Enrolment::Allowed));
        assert!(allowed.allow_provisioning);
        assert_eq!(allowed.parameter_overrides["DeviceClass"], "env-sensor");
        assert_eq!(
            serde_json::to_value(HookResponse::refuse()).expect("json"),
            serde_json::json!({"allowProvisioning": false})
        );
    }
}
