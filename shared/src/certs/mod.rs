//! Device certificates (pure): reading a certificate's PEM, when it expires and how urgently,
//! and whether the pre-provisioning hook lets a device provision.
//!
//! - [`parse_pem`]: the dates, serial, issuer and subject of a PEM certificate (x509-parser),
//!   and the id AWS IoT gives it (SHA-256 of the DER). Never panics on any input.
//! - [`expiry`]: expired / critical (< 7 days) / warning (< threshold, 30–3652 days as Device
//!   Defender allows), and the expiry index's day buckets.
//! - [`hook`]: the provisioning decision: allowed only for a serial number on the allowlist,
//!   not decommissioned, not provisioned with another certificate, presenting a certificate
//!   that is currently valid and whose id matches its PEM.
//! - [`reconcile`]: the inventory against AWS IoT's registry (adopting certificates made
//!   outside the hook, following status changes, Device-Defender-style findings), at bounded
//!   concurrency with backoff, in budgeted slices. Not pure: it runs over two ports.
//! - [`decommission`]: a device out of service (allowlist mark, certificates inactive, audit).

pub mod decommission;
pub mod expiry;
pub mod hook;
pub mod reconcile;

use x509_parser::prelude::*;

use crate::model::CertificateId;

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCert {
    pub id: CertificateId,
    pub serial: String,
    pub issuer: String,
    pub subject: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// Why a PEM is not a certificate Fleetline can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    #[error("not a PEM block: {0}")]
    NotPem(String),
    #[error("PEM block is {0:?}, expected CERTIFICATE")]
    WrongLabel(String),
    #[error("not an X.509 certificate: {0}")]
    NotX509(String),
    #[error("{0} bytes after the certificate")]
    Trailing(usize),
}

/// Parse one PEM certificate.
pub fn parse_pem(pem: &str) -> Result<ParsedCert, PemError> {
    let (_, block) = parse_x509_pem(pem.as_bytes()).map_err(|e| PemError::NotPem(e.to_string()))?;
    if block.label != "CERTIFICATE" {
        return Err(PemError::WrongLabel(block.label));
    }
    let (rest, cert) =
        X509Certificate::from_der(&block.contents).map_err(|e| PemError::NotX509(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PemError::Trailing(rest.len()));
    }
    let validity = cert.validity();
    Ok(ParsedCert {
        id: CertificateId::of_der(&block.contents),
        serial: cert.raw_serial_as_string(),
        issuer: cert.issuer().to_string(),
        subject: cert.subject().to_string(),
        not_before_ms: validity.not_before.timestamp().saturating_mul(1000),
        not_after_ms: validity.not_after.timestamp().saturating_mul(1000),
    })
}

#[cfg(any(test, feature = "test-support"))]
pub mod test_certs {
    //! Real certificates with chosen validity, made with rcgen.

    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SerialNumber};

    /// A self-signed certificate for `cn`, valid from `not_before_s` to `not_after_s` (Unix s).
    pub fn pem(cn: &str, serial: u64, not_before_s: i64, not_after_s: i64) -> String {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.serial_number = Some(SerialNumber::from(serial.to_be_bytes().to_vec()));
        params.not_before = time::OffsetDateTime::from_unix_timestamp(not_before_s).expect("time");
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after_s).expect("time");
        let key = KeyPair::generate().expect("key pair");
        params.self_signed(&key).expect("certificate").pem()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dates_serial_issuer_and_the_aws_id_from_a_real_certificate() {
        // GIVEN a certificate valid from 2025-01-01 to 2026-01-01
        let pem = test_certs::pem("sensor-001", 0x0102, 1_735_689_600, 1_767_225_600);
        // WHEN it is parsed
        let c = parse_pem(&pem).expect("parses");
        // THEN its dates (ms), serial and names are what it was made with
        assert_eq!((c.not_before_ms, c.not_after_ms), (1_735_689_600_000, 1_767_225_600_000));
        assert!(c.serial.ends_with("01:02"), "{}", c.serial);
        assert_eq!((c.issuer.as_str(), c.subject.as_str()), ("CN=sensor-001", "CN=sensor-001"));
        // AND its id is the SHA-256 of the DER inside the PEM
        let (_, block) = parse_x509_pem(pem.as_bytes()).expect("pem");
        assert_eq!(c.id, CertificateId::of_der(&block.contents));
    }

    #[test]
    fn anything_else_is_a_clear_error_never_a_panic() {
        let key_pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(parse_pem(key_pem), Err(PemError::WrongLabel(l)) if l == "PRIVATE KEY"));
        assert!(matches!(parse_pem("hello"), Err(PemError::NotPem(_))));
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(parse_pem(garbage), Err(PemError::NotX509(_))));
        for bytes in
            [&b""[..], b"-----BEGIN CERTIFICATE-----", b"\xff\xfe", b"-----BEGIN CERTIFICATE-----\n====\n"]
        {
            let _ = parse_pem(&String::from_utf8_lossy(bytes));
        }
    }
}
