//! The local IoT Core's certificate authority: where the certificates fleet provisioning hands
//! out come from, as AWS IoT's own CA signs the certificates of `CreateKeysAndCertificate`.
//!
//! Made (rcgen) on the first start and kept in the local database (`local_credentials`), key
//! included, so every certificate it issued stays verifiable after a restart; a second process
//! starting on the same file adopts the one kept first. Keys are ECDSA P-256 (AWS issues RSA
//! 2048 keys: P-256 keeps a hundred simulated devices provisioning in well under a second, and
//! the SDKs and IoT Core accept both). The CA also issues the fleet's claim certificate once.

use std::time::Duration;

use fleet_shared::adapters::embedded::{LocalCredentials, SqliteStore};
use fleet_shared::model::{CertStatus, CertificateId};
use fleet_shared::StoreError;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SerialNumber, SignatureAlgorithm,
};

/// Where the CA's certificate and key are kept (`local_credentials`).
const CA_CREDENTIALS: &str = "ca";
/// Where the claim certificate and its key are kept.
const CLAIM_CREDENTIALS: &str = "claim";
/// The CA's subject: fixed, so the issuer rebuilt from the kept key after a restart names
/// itself exactly as the kept certificate does.
const CA_COMMON_NAME: &str = "Fleetline local IoT Core CA";
const ORGANIZATION: &str = "Fleetline (local)";
/// AWS IoT names the certificates it issues this way; ours say they are local.
pub const ISSUED_COMMON_NAME: &str = "Fleetline local IoT Certificate";
/// The CA's and the claim certificate's validity.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The public key a certificate signing request asks a certificate for, as rcgen signs one.
struct RequestedKey {
    /// The subjectPublicKey bits (an EC point, or an RSAPublicKey).
    raw: Vec<u8>,
    /// Names the key's type (and curve) in the certificate.
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for RequestedKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// prime256v1 and secp384r1, the curves AWS IoT takes.
const P256: &str = "1.2.840.10045.3.1.7";
const P384: &str = "1.3.132.0.34";

/// Read a PKCS#10 request (PEM), check its signature, and take its key: EC on P-256 or P-384,
/// or RSA of at least 2048 bits, as AWS IoT accepts. The key's type comes from the key itself,
/// never from the request's signature algorithm; the request's subject and extensions are
/// ignored, as AWS ignores them.
fn requested_key(csr_pem: &str) -> Result<RequestedKey, String> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;

    let (_, pem) =
        x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
    if pem.label != "CERTIFICATE REQUEST" {
        return Err(format!("a PEM {:?} block, not a CERTIFICATE REQUEST", pem.label));
    }
    let (_, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| format!("not a PKCS#10 request: {e}"))?;
    csr.verify_signature().map_err(|e| format!("its signature does not verify: {e}"))?;
    let spki = &csr.certification_request_info.subject_pki;
    let alg = match spki.parsed().map_err(|e| format!("its public key: {e}"))? {
        PublicKey::EC(_) => {
            let curve =
                spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
            match curve.as_deref() {
                Some(P256) => &rcgen::PKCS_ECDSA_P256_SHA256,
                Some(P384) => &rcgen::PKCS_ECDSA_P384_SHA384,
                other => return Err(format!("an EC key on curve {other:?}: P-256 or P-384 only")),
            }
        }
        PublicKey::RSA(rsa) if rsa.key_size() >= 2048 => &rcgen::PKCS_RSA_SHA256,
        PublicKey::RSA(rsa) => return Err(format!("an RSA key of {} bits: 2048 at least", rsa.key_size())),
        _ => return Err("its key is neither EC (P-256, P-384) nor RSA".into()),
    };
    Ok(RequestedKey { raw: spki.subject_public_key.data.to_vec(), alg })
}

/// A device certificate's parameters: client authentication, valid from `now_ms` (whole
/// seconds) for `validity`, with a random 127-bit serial number (unique per issuer, as RFC 5280
/// asks, even for two certificates of one key).
fn leaf_params(common_name: &str, now_ms: i64, validity: Duration) -> Result<CertificateParams, CaError> {
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(|e| CaError::Randomness(e.to_string()))?;
    serial[0] &= 0x7f; // a positive INTEGER
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = at(now_ms)?;
    params.not_after = validity_end(now_ms, validity)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("local CA: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("local CA: {0}")]
    Store(#[from] StoreError),
    #[error("local CA: {0} is out of range")]
    Time(i64),
    /// The certificate signing request is not one, its signature does not verify, or its key
    /// is not one AWS IoT takes.
    #[error("the certificate signing request: {0}")]
    Request(String),
    #[error("local CA: no randomness for a serial number: {0}")]
    Randomness(String),
}

/// A certificate the CA issued, with its new private key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// As AWS IoT gives it: SHA-256 of the DER.
    pub id: CertificateId,
    pub cert_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
}

pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate: what a device (or a test) verifies issued certificates against.
    pub cert_pem: String,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").field("subject", &CA_COMMON_NAME).finish_non_exhaustive()
    }
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn at(ms: i64) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).map_err(|_| CaError::Time(ms))
}

fn validity_end(from_ms: i64, validity: Duration) -> Result<time::OffsetDateTime, CaError> {
    let ms = i64::try_from(validity.as_millis()).map_err(|_| CaError::Time(i64::MAX))?;
    at(from_ms.checked_add(ms).ok_or(CaError::Time(i64::MAX))?)
}

impl LocalCa {
    /// The CA kept in `store`, or a new one kept there now.
    pub async fn open(store: &SqliteStore, now_ms: i64) -> Result<Self, CaError> {
        let kept = match store.local_credentials(CA_CREDENTIALS).await? {
            Some(kept) => kept,
            None => {
                let key = KeyPair::generate()?;
                let mut params = ca_params()?;
                params.not_before = at(now_ms)?;
                params.not_after = validity_end(now_ms, CA_VALIDITY)?;
                let cert = params.self_signed(&key)?;
                let made = LocalCredentials { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
                store.keep_local_credentials(CA_CREDENTIALS, &made, now_ms).await?
            }
        };
        let key = KeyPair::from_pem(&kept.key_pem)?;
        Ok(LocalCa { issuer: Issuer::new(ca_params()?, key), cert_pem: kept.cert_pem })
    }

    /// A new key pair and a certificate for it, valid from `now_ms` (whole seconds) for
    /// `validity`, signed by this CA.
    pub fn issue(&self, common_name: &str, now_ms: i64, validity: Duration) -> Result<Issued, CaError> {
        let key = KeyPair::generate()?;
        let cert = leaf_params(common_name, now_ms, validity)?.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            id: CertificateId::of_der(cert.der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for the public key of `csr_pem` (a PKCS#10 request in PEM, its signature
    /// checked: whoever asks holds the key), valid from `now_ms` for `validity`, signed by this
    /// CA. As AWS IoT's CreateCertificateFromCsr, only the key is taken from the request: the
    /// subject and extensions are the CA's (those of [`LocalCa::issue`]). Returns the
    /// certificate's id and PEM.
    pub fn issue_for_csr(
        &self,
        csr_pem: &str,
        now_ms: i64,
        validity: Duration,
    ) -> Result<(CertificateId, String), CaError> {
        let key = requested_key(csr_pem).map_err(CaError::Request)?;
        let cert = leaf_params(ISSUED_COMMON_NAME, now_ms, validity)?.signed_by(&key, &self.issuer)?;
        Ok((CertificateId::of_der(cert.der()), cert.pem()))
    }

    /// The fleet's claim certificate: issued on the first start, kept, and registered ACTIVE in
    /// the local registry (an operator deactivates it there to stop all provisioning by claim).
    pub async fn claim(&self, store: &SqliteStore, now_ms: i64) -> Result<(CertificateId, Issued), CaError> {
        let kept = match store.local_credentials(CLAIM_CREDENTIALS).await? {
            Some(kept) => kept,
            None => {
                let made = self.issue("Fleetline local provisioning claim", now_ms, CA_VALIDITY)?;
                let made = LocalCredentials { cert_pem: made.cert_pem, key_pem: made.key_pem };
                store.keep_local_credentials(CLAIM_CREDENTIALS, &made, now_ms).await?
            }
        };
        let id = store.register_local_certificate(&kept.cert_pem, CertStatus::Active, now_ms).await?;
        Ok((id.clone(), Issued { id, cert_pem: kept.cert_pem, key_pem: kept.key_pem }))
    }
}
