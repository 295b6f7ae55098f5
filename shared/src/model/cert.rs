//! Device certificates, as the inventory keeps them, and the provisioning allowlist.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ThingName;

/// An AWS IoT certificate id: the SHA-256 of the certificate's DER, 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CertificateId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid certificate id {0:?}: expected 64 lowercase hex digits")]
pub struct InvalidCertificateId(pub String);

impl CertificateId {
    pub fn parse(s: &str) -> Result<Self, InvalidCertificateId> {
        Self::try_from(s.to_owned())
    }

    /// The id AWS IoT gives a certificate: SHA-256 of its DER.
    pub fn of_der(der: &[u8]) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(der);
        Self(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id in a certificate ARN (`arn:aws:iot:<region>:<account>:cert/<id>`); `None` for
    /// other principals (Cognito identities, policies).
    pub fn of_arn(arn: &str) -> Option<Self> {
        let (_, id) = arn.rsplit_once(":cert/")?;
        Self::parse(id).ok()
    }
}

impl TryFrom<String> for CertificateId {
    type Error = InvalidCertificateId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(Self(s))
        } else {
            Err(InvalidCertificateId(s))
        }
    }
}

impl From<CertificateId> for String {
    fn from(c: CertificateId) -> Self {
        c.0
    }
}

impl fmt::Display for CertificateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A certificate's status in AWS IoT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertStatus {
    Active,
    Inactive,
    Revoked,
    PendingTransfer,
    RegisterInactive,
    PendingActivation,
}

impl CertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CertStatus::Active => "ACTIVE",
            CertStatus::Inactive => "INACTIVE",
            CertStatus::Revoked => "REVOKED",
            CertStatus::PendingTransfer => "PENDING_TRANSFER",
            CertStatus::RegisterInactive => "REGISTER_INACTIVE",
            CertStatus::PendingActivation => "PENDING_ACTIVATION",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            CertStatus::Active,
            CertStatus::Inactive,
            CertStatus::Revoked,
            CertStatus::PendingTransfer,
            CertStatus::RegisterInactive,
            CertStatus::PendingActivation,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// One certificate in the inventory: what its PEM says, the thing it was issued to, its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub id: CertificateId,
    pub thing: Option<ThingName>,
    /// The certificate's serial number, hex (`a1:b2:...` as x509 tools print it).
    pub serial: String,
    pub issuer: String,
    pub subject: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub status: CertStatus,
    /// When the inventory recorded it.
    pub recorded_ms: i64,
}

/// Where a device serial number stands in provisioning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Enrolment {
    /// On the allowlist, not provisioned yet.
    Allowed,
    /// Provisioned: its thing and the one certificate it was provisioned with.
    Provisioned { thing: ThingName, certificate: CertificateId, at_ms: i64 },
    /// Taken out of service: never provisioned again.
    Decommissioned { at_ms: i64 },
}

/// An allowlist entry: a device serial number that may provision, with what it becomes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowlistEntry {
    /// The device's serial number (the provisioning template's `SerialNumber`; the thing name).
    pub serial: ThingName,
    pub class: String,
    pub region: String,
    pub added_ms: i64,
    #[serde(flatten)]
    pub enrolment: Enrolment,
}

/// A certificate as AWS IoT's registry lists it (ListCertificates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredCertificate {
    pub id: CertificateId,
    pub arn: String,
    pub status: CertStatus,
    pub created_ms: i64,
}

/// One page of the registry's certificates, and the marker of the next (`None`: the last).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertificatePage {
    pub certificates: Vec<RegisteredCertificate>,
    pub next: Option<String>,
}

/// A certificate described by the registry (DescribeCertificate): its listing and its PEM.
/// The validity the registry reports is not used: the PEM's own dates are the truth (moto's
/// are synthetic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateDetail {
    #[serde(flatten)]
    pub listed: RegisteredCertificate,
    pub pem: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_ids_are_64_lowercase_hex_digits_and_come_from_the_der() {
        let id = CertificateId::of_der(b"not really DER");
        assert_eq!(id.as_str().len(), 64);
        assert!(CertificateId::parse(id.as_str()).is_ok());
        assert!(CertificateId::parse(&id.as_str().to_uppercase()).is_err());
        assert!(CertificateId::parse("abc").is_err());
        assert_eq!(CertStatus::parse("REVOKED"), Some(CertStatus::Revoked));
        assert_eq!(CertStatus::parse("revoked"), None);
    }
}
