//! The fuzz cases, shared by the libFuzzer targets (`fuzz_targets/`, feature `fuzzing`) and by
//! the corpus replay test that runs in CI: the ingest decoder and the SQS-event entry point
//! (`decode`, `sqs_event`), PEM certificates and the provisioning hook's store-free checks
//! (`cert_pem`, `hook_request`).

use fleet_shared::certs::expiry::{classify, ExpiryClass, Threshold};
use fleet_shared::certs::hook::{self, HookRequest, Refusal};
use fleet_shared::certs::{parse_pem, ParsedCert, PemError};
use fleet_shared::ingest::envelope::{MAX_FW_LEN, MAX_METRICS, MAX_READINGS_PER_MESSAGE};
use fleet_shared::ingest::{decode, parse_event, plan, strict, IngestPolicy, OwnedInbound, Trigger};
use fleet_shared::model::{AllowlistEntry, CertificateId, Enrolment, ThingName};

const NOW_MS: i64 = 1_764_000_001_000;

const DAY_MS: i64 = 86_400_000;
/// The earliest and latest instants an X.509 validity can state (GeneralizedTime years 0000 and
/// 9999), a day of UTC offset either side. Dates inside keep the hook's and the expiry check's
/// arithmetic (`not_after - now`, `now ± window`) far from overflowing.
const X509_EARLIEST_MS: i64 = -62_167_219_200_000 - DAY_MS;
const X509_LATEST_MS: i64 = 253_402_300_799_000 + DAY_MS;

/// The envelope decoder on any bytes: a reading that keeps the envelope's promises, or at
/// least one reason; never a panic, never an unbounded recursion.
pub fn decode_case(data: &[u8]) {
    match decode(data, &IngestPolicy::default(), NOW_MS) {
        Ok(readings) => {
            assert!(strict::check(data).is_ok(), "stored a payload the structural check refuses");
            assert!(!readings.is_empty() && readings.len() <= MAX_READINGS_PER_MESSAGE);
            for r in &readings {
                assert!(!r.metrics.is_empty() && r.metrics.len() <= MAX_METRICS);
                assert!(r.metrics.iter().all(|m| m.value.is_finite()));
                assert!(r.fw.as_deref().is_none_or(|fw| {
                    fw.len() <= MAX_FW_LEN && fleet_shared::model::validate_label("fw", fw).is_ok()
                }));
                assert!(r.uptime_s.is_none_or(|u| u <= i64::MAX as u64) && r.id.seq <= i64::MAX as u64);
            }
        }
        Err(rejection) => assert!(!rejection.problems.is_empty()),
    }
}

/// The Lambda entry point's event rule on any text, then batch planning: every message the
/// event yields ends in exactly one bucket (reading, in-batch duplicate, quarantined).
pub fn sqs_event_case(data: &[u8]) {
    // Lambda hands the function UTF-8 JSON text.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let messages = match parse_event(text, NOW_MS) {
        Trigger::Sqs(m) => m,
        Trigger::Direct(m) => vec![m],
    };
    let inbound: Vec<_> = messages.iter().map(OwnedInbound::borrow).collect();
    let p = plan(&inbound, &IngestPolicy::default(), NOW_MS);
    assert!(p.accounts_for(messages.len()), "a message in no bucket or in two");
    assert!(p.quarantined.iter().all(|q| !q.problems.is_empty()));
}

/// `certs::parse_pem` on any bytes, as text (lossily converted; UTF-8 bytes are their own
/// text): a certificate or a `PemError`, never a panic. A certificate read is the one in the
/// PEM block, its id the SHA-256 of that block's DER (as AWS IoT computes ids); its dates are
/// whole seconds an X.509 validity can state, and the hook (valid from notBefore through
/// notAfter) and the expiry check (expired only after notAfter) read them alike.
pub fn cert_pem_case(data: &[u8]) -> Result<ParsedCert, PemError> {
    let text = String::from_utf8_lossy(data);
    let parsed = parse_pem(&text);
    match &parsed {
        Ok(cert) => {
            let (label, der) = pem_block(&text).expect("a certificate read from no complete PEM block");
            assert_eq!(
                label.split('-').next(),
                Some("CERTIFICATE"),
                "a certificate read from a {label:?} block"
            );
            assert_eq!(cert.id, CertificateId::of_der(&der), "the id is not the SHA-256 of the PEM's DER");
            dates_agree(&text, cert);
        }
        Err(PemError::WrongLabel(label)) => assert_ne!(label, "CERTIFICATE"),
        Err(PemError::Trailing(n)) => assert!(*n > 0, "no trailing bytes reported as trailing"),
        Err(PemError::NotPem(_) | PemError::NotX509(_)) => {}
    }
    parsed
}

/// A certificate's dates as whole seconds within X.509's range, checked by the hook at each
/// edge of its validity and by the expiry check at its end.
fn dates_agree(pem: &str, cert: &ParsedCert) {
    let (nb, na) = (cert.not_before_ms, cert.not_after_ms);
    for ms in [nb, na] {
        assert!(
            ms % 1000 == 0 && (X509_EARLIEST_MS..=X509_LATEST_MS).contains(&ms),
            "{ms} ms is no X.509 time"
        );
    }
    let request = HookRequest {
        claim_certificate_id: String::new(),
        certificate_id: cert.id.to_string(),
        certificate_pem: pem.to_owned(),
        template_arn: String::new(),
        client_id: String::new(),
        parameters: Default::default(),
    };
    for now in [nb - 1, nb, na, na + 1, NOW_MS] {
        match hook::check_certificate(&request, now) {
            Ok(checked) => {
                assert!(nb <= now && now <= na, "allowed at {now}, outside {nb}..={na}");
                assert_eq!(&checked, cert, "the hook read the PEM differently");
            }
            Err(Refusal::NotValidNow { not_before_ms, not_after_ms }) => {
                assert!(now < nb || now > na, "refused at {now}, inside {nb}..={na}");
                assert_eq!((not_before_ms, not_after_ms), (nb, na));
            }
            Err(other) => panic!("the hook refuses a certificate parse_pem reads: {other}"),
        }
    }
    let threshold = Threshold::default();
    assert_ne!(classify(na, na, threshold), Some(ExpiryClass::Expired), "expired at notAfter, still valid");
    assert_eq!(classify(na, na + 1, threshold), Some(ExpiryClass::Expired), "not expired after notAfter");
}

/// The label and DER of the first PEM block, read as x509-parser (which `parse_pem` uses)
/// reads PEM, written out independently so the id is checked against the bytes rather than
/// against the same call: the first line starting `-----BEGIN `, then the base64 lines, each
/// without trailing whitespace, up to a line starting `-----END `.
fn pem_block(text: &str) -> Option<(&str, Vec<u8>)> {
    let mut lines = text.split_inclusive('\n');
    let begin = lines.find(|l| l.starts_with("-----BEGIN "))?;
    let label = begin["-----BEGIN ".len()..].split("-----").next()?;
    let mut base64 = String::new();
    for line in lines {
        if line.starts_with("-----END ") {
            return Some((label, base64_decode(&base64)?));
        }
        base64.push_str(line.trim_end());
    }
    None
}

/// Standard padded base64 (RFC 4648 §4), in groups of four, padding allowed at the end of
/// any group; unused trailing bits are ignored.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for group in text.as_bytes().chunks(4) {
        let data = group.iter().position(|&c| c == b'=').unwrap_or(4);
        if group[data..].iter().any(|&c| c != b'=') {
            return None;
        }
        let mut bits = 0u32;
        for &c in &group[..data] {
            bits = bits << 6 | value(c)?;
        }
        bits <<= 6 * (4 - data);
        out.extend_from_slice(&bits.to_be_bytes()[1..][..data * 6 / 8]);
    }
    Some(out)
}

/// The provisioning hook's path that needs no store, on any bytes as text (lossily
/// converted): the event read or refused as malformed, its serial number and its certificate
/// checked at a fixed clock and, when both pass, admitted or refused by each kind of allowlist
/// entry. Returns the first refusal's reason code in the handler's order, or `None` when only
/// the allowlist can still refuse; never a panic.
pub fn hook_request_case(data: &[u8]) -> Option<&'static str> {
    let request = match hook::parse_request(&String::from_utf8_lossy(data)) {
        Ok(r) => r,
        Err(refusal) => {
            assert_eq!(refusal.code(), "malformed_event");
            return Some(refusal.code());
        }
    };
    let asked = request.parameters.get("SerialNumber").and_then(|v| v.as_str());
    let serial = hook::serial_of(&request);
    match &serial {
        Ok(s) => assert_eq!(Some(s.as_str()), asked, "a serial number the request did not ask for"),
        Err(r) => assert_eq!(r, &Refusal::BadSerial(asked.unwrap_or_default().to_owned())),
    }
    let checked = hook::check_certificate(&request, NOW_MS);
    match (&checked, &parse_pem(&request.certificate_pem)) {
        (Ok(cert), Ok(read)) => {
            assert_eq!(cert, read, "the hook read the PEM differently");
            assert_eq!(cert.id.as_str(), request.certificate_id);
            assert!(
                cert.not_before_ms <= NOW_MS && NOW_MS <= cert.not_after_ms,
                "allowed outside its validity"
            );
        }
        (Err(Refusal::BadCertificate(_)), Err(_)) => {}
        (Err(Refusal::CertificateMismatch { given, actual }), Ok(read)) => {
            assert_eq!((given, actual), (&request.certificate_id, &read.id));
            assert_ne!(given, actual.as_str(), "refused a matching id");
        }
        (Err(Refusal::NotValidNow { not_before_ms, not_after_ms }), Ok(read)) => {
            assert_eq!((*not_before_ms, *not_after_ms), (read.not_before_ms, read.not_after_ms));
            assert!(NOW_MS < read.not_before_ms || NOW_MS > read.not_after_ms, "refused inside its validity");
        }
        (outcome, read) => panic!("check_certificate answered {outcome:?} for a PEM read as {read:?}"),
    }
    match (serial, checked) {
        (Err(refusal), _) | (Ok(_), Err(refusal)) => Some(refusal.code()),
        (Ok(serial), Ok(cert)) => {
            admission(&serial, &cert.id);
            None
        }
    }
}

/// Each kind of allowlist entry for a request that passed the store-free checks: a new device
/// and a retry admitted (with the entry's class and region), everything else refused.
fn admission(serial: &ThingName, certificate: &CertificateId) {
    let entry = |enrolment| AllowlistEntry {
        serial: serial.clone(),
        class: "env-sensor".into(),
        region: "eu-west".into(),
        added_ms: 1,
        enrolment,
    };
    let claim = "c".repeat(64);
    let admit = |e: Option<&AllowlistEntry>| hook::admit(serial, e, certificate, &claim).map(|_| ());
    let other = CertificateId::of_der(b"another device's certificate");
    let allowed = entry(Enrolment::Allowed);
    assert_eq!(admit(Some(&allowed)), Ok(()));
    let answer = hook::allow(&allowed);
    assert!(answer.allow_provisioning);
    assert_eq!(
        ["DeviceClass", "DeviceRegion"].map(|k| answer.parameter_overrides.get(k).and_then(|v| v.as_str())),
        [Some("env-sensor"), Some("eu-west")]
    );
    let mine = Enrolment::Provisioned { thing: serial.clone(), certificate: certificate.clone(), at_ms: 2 };
    assert_eq!(admit(Some(&entry(mine))), Ok(()), "a retry");
    let taken = Enrolment::Provisioned { thing: serial.clone(), certificate: other.clone(), at_ms: 2 };
    assert_eq!(
        admit(Some(&entry(taken))),
        Err(Refusal::AlreadyProvisioned { serial: serial.to_string(), certificate: other })
    );
    assert_eq!(
        admit(Some(&entry(Enrolment::Decommissioned { at_ms: 3 }))).map_err(|r| r.code()),
        Err("decommissioned")
    );
    assert_eq!(admit(None), Err(Refusal::UnknownSerial(serial.to_string())));
}
