//! The device side of a certificate rotation job (feature `sim`, like [`super::device`]): what
//! a device does with a `fleetline.rotate_cert` job ([`super::engine::rotation_document`]),
//! written to be ported to firmware as it stands.
//!
//! 1. It makes a new key pair, which never leaves it, and asks CreateCertificateFromCsr
//!    (`$aws/certificates/create-from-csr/json`) over its current connection.
//! 2. Accepted, it calls RegisterThing (`$aws/provisioning-templates/<template>/provision/json`)
//!    with the ownership token and its own serial: with its current certificate as the claim,
//!    the pre-provisioning hook admits a rotation and moves the serial to the new certificate.
//! 3. Accepted, it stores the new certificate and key durably ([`Step::Rotated`]: the caller's
//!    part), connects with them, and only then reports the execution SUCCEEDED, from the new
//!    connection (`statusDetails.result = rotated`, `statusDetails.certificate`): its first
//!    connection with the new certificate is what retires the old one, so it never goes back to
//!    the old pair.
//!
//! Either request rejected, the execution is FAILED `rotation_refused` with the service's
//! error in the detail, and the device keeps its current certificate. The answers come on the
//! request topics' `/accepted` and `/rejected`, which the device subscribes to. An accepted
//! answer that is not for this device (a certificate for another key, a registration of
//! another thing) is ignored: IoT Core answers the requesting connection only, the local IoT
//! Core every subscriber, and either way a device installs only a certificate for its own key.

use rcgen::{CertificateParams, DnType, KeyPair};
use serde_json::{json, Value};

/// CreateCertificateFromCsr's request topic.
pub const CREATE_FROM_CSR_TOPIC: &str = "$aws/certificates/create-from-csr/json";
/// `statusDetails.reason` of a rotation the service refused.
pub const ROTATION_REFUSED: &str = "rotation_refused";
/// `statusDetails.result` of a rotation done.
pub const ROTATED: &str = "rotated";

/// RegisterThing's request topic for provisioning template `template`.
pub fn register_topic(template: &str) -> String {
    format!("$aws/provisioning-templates/{template}/provision/json")
}

/// The new credentials a rotation gave the device: to be stored before they are used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCertificate {
    pub certificate_id: String,
    pub certificate_pem: String,
    pub private_key_pem: String,
}

/// What a rotation does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Publish `payload` on `topic`, and wait for its answer.
    Ask { topic: String, payload: String },
    /// Done: store these, connect with them, then report SUCCEEDED from that connection.
    Rotated(NewCertificate),
    /// The service refused: report FAILED [`ROTATION_REFUSED`] with this detail.
    Refused(String),
    /// Not this rotation's message.
    Ignore,
}

/// One rotation in flight (steps 1-3 of the module doc).
pub struct Rotation {
    thing: String,
    template: String,
    key: KeyPair,
    /// CreateCertificateFromCsr's answer, once accepted: (id, PEM).
    certificate: Option<(String, String)>,
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Rotation")
            .field("thing", &self.thing)
            .field("certificate", &self.certificate.as_ref().map(|(id, _)| id))
            .finish_non_exhaustive()
    }
}

impl Rotation {
    /// Ask for a certificate for `key`, made for this rotation, for `thing` (step 1).
    pub fn start(thing: &str, template: &str, key: KeyPair) -> Result<(Self, Step), rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, thing);
        let csr = params.serialize_request(&key)?.pem()?;
        let ask = Step::Ask {
            topic: CREATE_FROM_CSR_TOPIC.to_owned(),
            payload: json!({ "certificateSigningRequest": csr }).to_string(),
        };
        let rotation =
            Self { thing: thing.to_owned(), template: template.to_owned(), key, certificate: None };
        Ok((rotation, ask))
    }

    /// The topic filters whose messages [`Self::receive`] reads (`template`'s RegisterThing).
    pub fn subscriptions(template: &str) -> Vec<String> {
        vec![format!("{CREATE_FROM_CSR_TOPIC}/+"), format!("{}/+", register_topic(template))]
    }

    /// Whether `topic` is an answer on one of [`Self::subscriptions`].
    /// (Called on every message a device gets: it builds no topic.)
    pub fn is_answer(template: &str, topic: &str) -> bool {
        let register = || {
            topic
                .strip_prefix("$aws/provisioning-templates/")?
                .strip_prefix(template)?
                .strip_prefix("/provision/json")
        };
        topic
            .strip_prefix(CREATE_FROM_CSR_TOPIC)
            .or_else(register)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|answer| !answer.is_empty() && !answer.contains('/'))
    }

    /// An answer on one of [`Self::subscriptions`].
    pub fn receive(&mut self, topic: &str, payload: &[u8]) -> Step {
        let body: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let register = register_topic(&self.template);
        let (request, answer) = match topic.rsplit_once('/') {
            Some((request, answer)) if request == CREATE_FROM_CSR_TOPIC || request == register => {
                (request, answer)
            }
            _ => return Step::Ignore,
        };
        if answer == "rejected" {
            let error = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
            let what = if request == register { "RegisterThing" } else { "CreateCertificateFromCsr" };
            return Step::Refused(format!("{what}: {} {}", error("errorCode"), error("errorMessage")));
        }
        if answer != "accepted" {
            return Step::Ignore;
        }
        let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
        if request == CREATE_FROM_CSR_TOPIC {
            if self.certificate.is_some() {
                return Step::Ignore; // ours came already
            }
            let (Some(id), Some(pem), Some(token)) =
                (text("certificateId"), text("certificatePem"), text("certificateOwnershipToken"))
            else {
                return Step::Refused("CreateCertificateFromCsr answered without a certificate".into());
            };
            if !self.is_for_my_key(&pem) {
                return Step::Ignore;
            }
            self.certificate = Some((id, pem));
            let payload = json!({
                "certificateOwnershipToken": token,
                "parameters": { "SerialNumber": self.thing },
            });
            return Step::Ask { topic: register, payload: payload.to_string() };
        }
        if text("thingName").as_deref() != Some(self.thing.as_str()) {
            return Step::Ignore;
        }
        match self.certificate.take() {
            Some((certificate_id, certificate_pem)) => Step::Rotated(NewCertificate {
                certificate_id,
                certificate_pem,
                private_key_pem: self.key.serialize_pem(),
            }),
            // RegisterThing accepted before any certificate: another request's answer.
            None => Step::Ignore,
        }
    }

    /// The key this rotation asks a certificate for.
    #[cfg(test)]
    pub(crate) fn key(&self) -> &KeyPair {
        &self.key
    }

    /// Whether `pem` certifies this rotation's key (its SubjectPublicKeyInfo is the key's).
    fn is_for_my_key(&self, pem: &str) -> bool {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let Ok((_, block)) = x509_parser::pem::parse_x509_pem(pem.as_bytes()) else { return false };
        let Ok((_, cert)) = X509Certificate::from_der(&block.contents) else { return false };
        cert.public_key().subject_public_key.data.as_ref() == self.key.public_key_raw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `key`.
    fn certificate_for(key: &KeyPair) -> Result<String, rcgen::Error> {
        Ok(CertificateParams::new(vec!["device".to_owned()])?.self_signed(key)?.pem())
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn only_the_answers_to_its_own_requests_are_a_rotations() {
        let fleet = "$aws/provisioning-templates/fleet/provision/json";
        for topic in ["$aws/certificates/create-from-csr/json/accepted", &format!("{fleet}/rejected")] {
            assert!(Rotation::is_answer("fleet", topic), "{topic}");
        }
        for topic in [
            "$aws/certificates/create-from-csr/json",
            "$aws/certificates/create/json/accepted",
            "$aws/provisioning-templates/other/provision/json/accepted",
            &format!("{fleet}/accepted/more"),
            &format!("{fleet}/"),
        ] {
            assert!(!Rotation::is_answer("fleet", topic), "{topic}");
        }
    }

    #[test]
    fn a_rotation_asks_for_a_certificate_registers_it_and_hands_over_the_new_credentials() -> TestResult {
        // GIVEN a rotation started: a CSR for a key made here
        let (mut r, ask) = Rotation::start("sensor-1", "fleet", KeyPair::generate()?)?;
        let Step::Ask { topic, payload } = ask else { return Err(format!("{ask:?}").into()) };
        assert_eq!(topic, CREATE_FROM_CSR_TOPIC);
        let csr: Value = serde_json::from_str(&payload)?;
        assert!(csr["certificateSigningRequest"].as_str().is_some_and(|c| c.contains("CERTIFICATE REQUEST")));
        // WHEN a certificate for another device's key comes first (the local IoT Core answers
        // every subscriber), THEN it is not taken
        let others = certificate_for(&KeyPair::generate()?)?;
        let created =
            json!({"certificateId": "c1", "certificatePem": others, "certificateOwnershipToken": "t1"});
        let csr_accepted = format!("{CREATE_FROM_CSR_TOPIC}/accepted");
        assert_eq!(r.receive(&csr_accepted, created.to_string().as_bytes()), Step::Ignore);
        // WHEN its own certificate is created, THEN it registers it for its own serial
        let pem = certificate_for(&r.key)?;
        let created = json!({"certificateId": "c2", "certificatePem": pem, "certificateOwnershipToken": "t"});
        let next = r.receive(&csr_accepted, created.to_string().as_bytes());
        let Step::Ask { topic, payload } = next else { return Err(format!("{next:?}").into()) };
        assert_eq!(topic, register_topic("fleet"));
        let body: Value = serde_json::from_str(&payload)?;
        assert_eq!(
            body,
            json!({"certificateOwnershipToken": "t", "parameters": {"SerialNumber": "sensor-1"}})
        );
        // WHEN another thing's registration is accepted, THEN it waits on; when its own is, the
        // new certificate and its key are handed over
        let accepted = format!("{}/accepted", register_topic("fleet"));
        assert_eq!(r.receive(&accepted, br#"{"thingName":"sensor-2"}"#), Step::Ignore);
        let done = r.receive(&accepted, br#"{"thingName":"sensor-1"}"#);
        let Step::Rotated(new) = done else { return Err(format!("{done:?}").into()) };
        assert_eq!((new.certificate_id.as_str(), new.certificate_pem.as_str()), ("c2", pem.as_str()));
        assert!(new.private_key_pem.contains("PRIVATE KEY"));
        // AND the key never shows in its debug output
        assert!(!format!("{r:?}").contains("PRIVATE"));
        Ok(())
    }

    #[test]
    fn a_refusal_or_a_malformed_answer_fails_the_rotation_and_other_topics_are_ignored() -> TestResult {
        // GIVEN a rotation under way
        let (mut r, _) = Rotation::start("sensor-1", "fleet", KeyPair::generate()?)?;
        // WHEN other topics, a garbled answer and a refusal come, THEN it ignores the first,
        // and fails on the others with what the service said
        assert_eq!(r.receive("dt/fleet/sensor-1/telemetry", b"{}"), Step::Ignore);
        assert_eq!(r.receive(&format!("{}/accepted", register_topic("other")), b"{}"), Step::Ignore);
        let garbled = r.receive(&format!("{CREATE_FROM_CSR_TOPIC}/accepted"), b"not json");
        assert!(
            matches!(garbled, Step::Refused(ref d) if d.contains("without a certificate")),
            "{garbled:?}"
        );
        let refused = r.receive(
            &format!("{}/rejected", register_topic("fleet")),
            br#"{"statusCode":403,"errorCode":"AccessDenied","errorMessage":"not_provisioned"}"#,
        );
        assert_eq!(refused, Step::Refused("RegisterThing: AccessDenied not_provisioned".into()));
        Ok(())
    }
}
