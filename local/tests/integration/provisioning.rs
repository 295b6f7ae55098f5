//! Fleet provisioning by claim on the local IoT Core, with real MQTT clients: a claim holder
//! gets its own key pair and certificate from the local CA (CreateKeysAndCertificate), the
//! pre-provisioning hook decides (RegisterThing), and the device then publishes as its thing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use fleet_local::provisioning::{Provisioning, Request, CREATE_FROM_CSR_TOPIC, CREATE_TOPIC, TOKEN_LIFETIME};
use fleet_local::LocalStack;
use fleet_shared::certs::decommission::{retire_superseded, InUse, RetireError, Scope};
use fleet_shared::certs::hook::CLAIM_CLIENT_PREFIX;
use fleet_shared::health::presence::Presence;
use fleet_shared::model::{AllowlistEntry, CertStatus, CertificateId, Enrolment, ThingName};
use fleet_shared::ports::{Allowlist, DeviceAdmin, PresenceReader};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{json, Value};

use crate::support::{client, eventually, start, until};

/// The template's provisioning template, deployed with `Stage=dev`.
const TEMPLATE: &str = "fleetline-dev-devices";

fn provisioning(stack: &LocalStack) -> Result<Arc<Provisioning>> {
    stack.provisioning.clone().context("the template has a provisioning template")
}

pub(crate) async fn allow(stack: &LocalStack, serial: &str) -> Result<()> {
    let entry = AllowlistEntry {
        serial: ThingName::parse(serial)?,
        class: "env-sensor".into(),
        region: "eu-west".into(),
        added_ms: 1,
        enrolment: Enrolment::Allowed,
    };
    stack.store.allow(&[entry]).await?;
    Ok(())
}

/// A claim session of the device `serial`: client id `claim-<serial>`, as the claim policy wants.
fn claim_session(stack: &LocalStack, serial: &str) -> Result<(AsyncClient, EventLoop)> {
    let claim = &provisioning(stack)?.claim;
    Ok(client(stack, &format!("{CLAIM_CLIENT_PREFIX}{serial}"), Some(&format!("cert/{claim}"))))
}

/// A claim holder, subscribed to the provisioning answers.
async fn claim_holder(stack: &LocalStack, serial: &str) -> Result<(AsyncClient, EventLoop)> {
    let (c, mut events) = claim_session(stack, serial)?;
    c.subscribe(format!("{CREATE_TOPIC}/+"), QoS::AtLeastOnce).await?;
    c.subscribe(format!("$aws/provisioning-templates/{TEMPLATE}/provision/json/+"), QoS::AtLeastOnce).await?;
    for _ in 0..2 {
        let codes = until(&mut events, |e| match e {
            Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await?;
        anyhow::ensure!(
            codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
            "{serial}: subscription refused: {codes:?}"
        );
    }
    Ok((c, events))
}

/// Publish `body` on `topic` and wait for the answer: (`accepted` or `rejected`, its body).
async fn ask(c: &AsyncClient, events: &mut EventLoop, topic: &str, body: String) -> Result<(String, Value)> {
    c.publish(topic, QoS::AtLeastOnce, false, body).await?;
    let prefix = format!("{topic}/");
    until(events, |e| match e {
        Event::Incoming(Packet::Publish(p)) if p.topic.starts_with(&prefix) => {
            let answer = p.topic[prefix.len()..].to_owned();
            Some((answer, serde_json::from_slice(&p.payload).unwrap_or(Value::Null)))
        }
        _ => None,
    })
    .await
}

fn register_topic() -> String {
    format!("$aws/provisioning-templates/{TEMPLATE}/provision/json")
}

fn register_body(token: &Value, serial: &str) -> String {
    json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": serial}}).to_string()
}

/// That `cert_pem` was signed by the CA of `ca_pem`: its issuer is the CA's subject and the
/// CA's key verifies its signature (ECDSA P-256, the local CA's key).
fn chains_to(cert_pem: &str, ca_pem: &str) -> Result<()> {
    let (_, cert) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())?;
    let (_, ca) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())?;
    let (cert, ca) = (cert.parse_x509()?, ca.parse_x509()?);
    ensure!(cert.issuer() == ca.subject(), "issuer {} is not the CA {}", cert.issuer(), ca.subject());
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        ca.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(cert.tbs_certificate.as_ref(), cert.signature_value.data.as_ref())
        .map_err(|_| anyhow::anyhow!("the CA's key does not verify the certificate's signature"))
}

fn reading() -> String {
    let now = fleet_shared::time::now_ms();
    format!(r#"{{"v":1,"seq":1,"boot":1,"ts":{now},"fw":"1.4.2","m":{{"temp_c":21.5}}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_holder_provisions_its_own_certificate_and_thing_then_publishes_as_that_thing() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let service = provisioning(&stack)?;
    allow(&stack, "sensor-p01").await?;
    let refused_before = stack.stats.snapshot(0).refused_by_policy;

    // GIVEN a device holding only the claim, subscribed to the answers
    let (claim, mut claim_events) = claim_holder(&stack, "sensor-p01").await?;
    // WHEN it asks for keys and a certificate
    let (answer, created) = ask(&claim, &mut claim_events, CREATE_TOPIC, String::new()).await?;
    ensure!(answer == "accepted", "{answer}: {created}");
    let cert_pem = created["certificatePem"].as_str().context("certificatePem")?;
    let id = CertificateId::parse(created["certificateId"].as_str().context("certificateId")?)?;
    ensure!(created["privateKey"].as_str().is_some_and(|k| k.contains("PRIVATE KEY")), "{created}");
    // THEN the certificate is real, chains to the local CA, and waits for RegisterThing
    let parsed = fleet_shared::certs::parse_pem(cert_pem)?;
    assert_eq!(parsed.id, id, "the id is the SHA-256 of the DER");
    chains_to(cert_pem, service.ca_pem())?;
    assert_eq!(stack.store.local_certificate_status(&id).await?, Some(CertStatus::PendingActivation));
    let days = (parsed.not_after_ms - parsed.not_before_ms) / 86_400_000;
    assert_eq!(days, 365, "the default validity");

    // WHEN it registers its thing with the ownership token
    let (answer, registered) = ask(
        &claim,
        &mut claim_events,
        &register_topic(),
        register_body(&created["certificateOwnershipToken"], "sensor-p01"),
    )
    .await?;
    // THEN the hook allowed it: the thing exists with the hook's class and region, the
    // certificate is ACTIVE and attached, and the device is registered
    ensure!(answer == "accepted", "{answer}: {registered}");
    assert_eq!(registered, json!({"deviceConfiguration": {}, "thingName": "sensor-p01"}));
    let thing = ThingName::parse("sensor-p01")?;
    let local = stack.store.local_thing(&thing).await?.context("the thing")?;
    assert_eq!(
        (local.attributes["class"].as_str(), local.attributes["region"].as_str()),
        ("env-sensor", "eu-west")
    );
    assert_eq!(stack.store.local_certificate_status(&id).await?, Some(CertStatus::Active));
    assert!(stack.store.local_certificate_attached(&thing, &id).await?);
    let device = stack.store.device(&thing).await?.context("registered by the hook")?;
    assert_eq!(device.class(), "env-sensor");

    // AND the claim itself may not publish telemetry (the claim policy)
    claim.publish("dt/fleet/sensor-p01/telemetry", QoS::AtLeastOnce, false, reading()).await?;
    until(&mut claim_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    assert_eq!(stack.stats.snapshot(0).refused_by_policy, refused_before + 1);
    claim.disconnect().await?;

    // WHEN the device connects with its own certificate and publishes telemetry
    let (device, mut device_events) = client(&stack, "sensor-p01", Some(&format!("cert/{id}")));
    device.publish("dt/fleet/sensor-p01/telemetry", QoS::AtLeastOnce, false, reading()).await?;
    until(&mut device_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    // AND another client presents that certificate under another thing's name
    let (_other, mut other_events) = client(&stack, "sensor-p02", Some(&format!("cert/{id}")));
    let other = tokio::time::timeout(Duration::from_secs(10), other_events.poll()).await?;
    // THEN its telemetry is stored under its thing, and the certificate opens no other thing
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stack.store.device(&thing).await?.and_then(|d| d.state).is_none() {
        if tokio::time::Instant::now() > deadline {
            bail!("sensor-p01's telemetry was not stored");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(other.is_err(), "a certificate attached to sensor-p01 connected as sensor-p02: {other:?}");
    stack.shutdown().await
}

/// A certificate signing request (PEM) for `key`, as a device makes one.
fn csr_of(key: &rcgen::KeyPair) -> Result<String> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "sensor-c01");
    Ok(params.serialize_request(key)?.pem()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_keeps_its_own_key_gets_a_certificate_for_its_csr_and_provisions_with_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let service = provisioning(&stack)?;
    allow(&stack, "sensor-c01").await?;
    // GIVEN a claim holder that made its own key pair, subscribed to the CSR answers too
    let (claim, mut events) = claim_holder(&stack, "sensor-c01").await?;
    claim.subscribe(format!("{CREATE_FROM_CSR_TOPIC}/+"), QoS::AtLeastOnce).await?;
    until(&mut events, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await?;
    let key = rcgen::KeyPair::generate()?;
    // WHEN it sends a certificate signing request for that key
    let body = json!({"certificateSigningRequest": csr_of(&key)?}).to_string();
    let (answer, created) = ask(&claim, &mut events, CREATE_FROM_CSR_TOPIC, body).await?;
    // THEN it gets a certificate for its own public key, chained to the local CA, pending
    // activation, and no private key travels
    ensure!(answer == "accepted", "{answer}: {created}");
    ensure!(created.get("privateKey").is_none(), "{created}");
    let cert_pem = created["certificatePem"].as_str().context("certificatePem")?;
    let id = CertificateId::parse(created["certificateId"].as_str().context("certificateId")?)?;
    chains_to(cert_pem, service.ca_pem())?;
    let (_, der) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())?;
    let cert = der.parse_x509()?;
    assert_eq!(cert.public_key().subject_public_key.data.as_ref(), key.public_key_raw(), "the CSR's key");
    let cn = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or_default();
    assert_eq!(cn, fleet_local::ca::ISSUED_COMMON_NAME, "the subject is the CA's, not the request's");
    assert_eq!(fleet_shared::certs::parse_pem(cert_pem)?.id, id);
    assert_eq!(stack.store.local_certificate_status(&id).await?, Some(CertStatus::PendingActivation));
    // WHEN it registers its thing with that token, THEN the certificate is ACTIVE and attached
    let token = &created["certificateOwnershipToken"];
    let (answer, registered) =
        ask(&claim, &mut events, &register_topic(), register_body(token, "sensor-c01")).await?;
    ensure!(answer == "accepted", "{answer}: {registered}");
    let thing = ThingName::parse("sensor-c01")?;
    assert_eq!(stack.store.local_certificate_status(&id).await?, Some(CertStatus::Active));
    assert!(stack.store.local_certificate_attached(&thing, &id).await?);
    claim.disconnect().await?;
    // AND the device connects with it and publishes as its thing
    let (device, mut device_events) = client(&stack, "sensor-c01", Some(&format!("cert/{id}")));
    device.publish("dt/fleet/sensor-c01/telemetry", QoS::AtLeastOnce, false, reading()).await?;
    until(&mut device_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;

    // AND requests that are not a verifiable CSR are rejected, naming why, and register nothing
    let pem = csr_of(&key)?;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64::engine::general_purpose::STANDARD.decode(b64)?;
    let last = der.len() - 1;
    der[last] ^= 1; // a bit of the signature
    let forged = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(&der)
    );
    let now = fleet_shared::time::now_ms();
    for (body, why) in [
        (json!({"certificateSigningRequest": forged}).to_string(), "signature"),
        (json!({"certificateSigningRequest": "not a request"}).to_string(), "certificateSigningRequest"),
        (json!({"certificateSigningRequest": "x".repeat(5000)}).to_string(), "over 4096"),
        ("{}".to_owned(), "certificateSigningRequest"),
        (json!({"certificateSigningRequest": pem, "extra": 1}).to_string(), "extra"),
        ("{not json".to_owned(), "certificateSigningRequest"),
    ] {
        let answer = direct(&service, &Request::CreateCertificateFromCsr, "sensor-c02", &body, now).await?;
        assert_eq!(code(&answer), ("rejected", Some(400), Some("InvalidPayload")), "{body}");
        let message = answer.1["errorMessage"].as_str().unwrap_or_default().to_lowercase();
        assert!(message.contains(&why.to_lowercase()), "{body}: {message}");
    }
    // AND a key AWS IoT does not take (Ed25519) is refused for its key
    let ed25519 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let body = json!({"certificateSigningRequest": csr_of(&ed25519)?}).to_string();
    let answer = direct(&service, &Request::CreateCertificateFromCsr, "sensor-c02", &body, now).await?;
    assert_eq!(code(&answer), ("rejected", Some(400), Some("InvalidPayload")), "{}", answer.1);
    assert!(answer.1["errorMessage"].as_str().is_some_and(|m| m.contains("neither EC")), "{}", answer.1);
    // AND none of those seven made a pending certificate: the client may still hold five, each
    // from one P-384 key's CSR, each certifying that key on its curve with its own serial
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
    let body = json!({"certificateSigningRequest": csr_of(&p384)?}).to_string();
    let mut serials = std::collections::BTreeSet::new();
    for _ in 0..fleet_local::provisioning::MAX_PENDING_PER_CLIENT {
        let (answer, created) =
            direct(&service, &Request::CreateCertificateFromCsr, "sensor-c02", &body, now).await?;
        assert_eq!(answer, "accepted", "{created}");
        let pem = created["certificatePem"].as_str().context("certificatePem")?;
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes())?;
        let cert = der.parse_x509()?;
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), p384.public_key_raw());
        let curve = cert.public_key().algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        assert_eq!(curve.map(|o| o.to_id_string()).as_deref(), Some("1.3.132.0.34"), "secp384r1");
        serials.insert(cert.raw_serial().to_vec());
    }
    assert_eq!(serials.len(), fleet_local::provisioning::MAX_PENDING_PER_CLIENT, "serials repeat");
    drop(service);
    stack.shutdown().await
}

/// A device connected with `cert`, subscribed to the CSR and RegisterThing answers.
async fn rotating_device(
    stack: &LocalStack,
    thing: &str,
    cert: &CertificateId,
) -> Result<(AsyncClient, EventLoop)> {
    let (c, mut events) = client(stack, thing, Some(&format!("cert/{cert}")));
    for filter in [format!("{CREATE_FROM_CSR_TOPIC}/+"), format!("{}/+", register_topic())] {
        c.subscribe(filter, QoS::AtLeastOnce).await?;
        let codes = until(&mut events, |e| match e {
            Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await?;
        ensure!(
            codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
            "{thing}: subscription refused: {codes:?}"
        );
    }
    Ok((c, events))
}

/// The presence of `thing` once its latest session is recorded as authenticated with `cert`.
async fn presence_with(stack: &LocalStack, thing: &ThingName, cert: &CertificateId) -> Result<Presence> {
    eventually(async || {
        let p = stack.store.presence(thing).await?;
        Ok(p.filter(|p| p.principal.as_deref() == Some(cert.as_str())))
    })
    .await
    .with_context(|| format!("presence never recorded {thing} connected with {cert}"))
}

/// Provision `serial` through the claim with a key it keeps: its certificate's id.
pub(crate) async fn provision_with_csr(stack: &LocalStack, serial: &str) -> Result<CertificateId> {
    let (claim, mut events) = claim_holder(stack, serial).await?;
    claim.subscribe(format!("{CREATE_FROM_CSR_TOPIC}/+"), QoS::AtLeastOnce).await?;
    until(&mut events, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await?;
    let body = json!({"certificateSigningRequest": csr_of(&rcgen::KeyPair::generate()?)?}).to_string();
    let (answer, created) = ask(&claim, &mut events, CREATE_FROM_CSR_TOPIC, body).await?;
    ensure!(answer == "accepted", "{answer}: {created}");
    let token = &created["certificateOwnershipToken"];
    let (answer, registered) =
        ask(&claim, &mut events, &register_topic(), register_body(token, serial)).await?;
    ensure!(answer == "accepted", "{answer}: {registered}");
    claim.disconnect().await?;
    // Gone before the next claim session may listen for answers (one at a time).
    let _ =
        tokio::time::timeout(Duration::from_secs(2), async { while events.poll().await.is_ok() {} }).await;
    Ok(CertificateId::parse(created["certificateId"].as_str().context("certificateId")?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioned_device_rotates_its_certificate_over_its_own_connection() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let service = provisioning(&stack)?;
    allow(&stack, "sensor-r01").await?;
    allow(&stack, "sensor-r02").await?;
    // GIVEN sensor-r01 provisioned with `old`, connected with it
    let old = provision_with_csr(&stack, "sensor-r01").await?;
    let (device, mut events) = rotating_device(&stack, "sensor-r01", &old).await?;
    // WHEN it asks for a certificate for a new key of its own, and registers with its own
    // certificate as the claim
    let key = rcgen::KeyPair::generate()?;
    let body = json!({"certificateSigningRequest": csr_of(&key)?}).to_string();
    let (answer, created) = ask(&device, &mut events, CREATE_FROM_CSR_TOPIC, body).await?;
    ensure!(answer == "accepted", "{answer}: {created}");
    let new = CertificateId::parse(created["certificateId"].as_str().context("certificateId")?)?;
    let token = created["certificateOwnershipToken"].clone();
    let (answer, registered) =
        ask(&device, &mut events, &register_topic(), register_body(&token, "sensor-r01")).await?;
    // THEN it is accepted for its thing, the new certificate ACTIVE and attached beside the old
    ensure!(answer == "accepted", "{answer}: {registered}");
    assert_eq!(registered["thingName"], "sensor-r01");
    let thing = ThingName::parse("sensor-r01")?;
    for id in [&old, &new] {
        assert_eq!(stack.store.local_certificate_status(id).await?, Some(CertStatus::Active), "{id}");
        assert!(stack.store.local_certificate_attached(&thing, id).await?, "{id}");
    }
    // AND the allowlist holds the new certificate, the trail the rotation
    let e = stack.store.entry(&thing).await?.context("entry")?;
    assert!(
        matches!(&e.enrolment, Enrolment::Provisioned { certificate, .. } if *certificate == new),
        "{e:?}"
    );
    let trail = fleet_shared::ports::ProvisioningAudit::trail(&stack.store, "sensor-r01").await?;
    let last = trail.last().context("trail")?;
    assert_eq!(last.outcome, "rotated", "{trail:?}");
    // AND its certificate cannot provision another serial, even one only allowed
    let body = json!({"certificateSigningRequest": csr_of(&key)?}).to_string();
    let (_, other) = ask(&device, &mut events, CREATE_FROM_CSR_TOPIC, body).await?;
    let token = &other["certificateOwnershipToken"];
    let (answer, refused) =
        ask(&device, &mut events, &register_topic(), register_body(token, "sensor-r02")).await?;
    ensure!(answer == "rejected" && refused["errorCode"] == "AccessDenied", "{answer}: {refused}");
    let r02 = stack.store.entry(&ThingName::parse("sensor-r02")?).await?.context("r02")?;
    assert_eq!(r02.enrolment, Enrolment::Allowed);
    // AND its old certificate is not retired while its latest session used it (presence, from
    // the lifecycle event IoT Core published when it connected, names the old certificate)
    let db = &stack.store;
    let ports =
        || fleet_shared::certs::decommission::Ports { allowlist: db, registry: db, inventory: db, audit: db };
    let on_old = InUse::from_presence(Some(&presence_with(&stack, &thing, &old).await?));
    let early =
        retire_superseded(ports(), &thing, &on_old, Scope::Attached, fleet_shared::time::now_ms()).await;
    ensure!(matches!(early, Err(RetireError::NotInUse { .. })), "{early:?}");
    assert_eq!(stack.store.local_certificate_status(&old).await?, Some(CertStatus::Active));
    device.disconnect().await?;
    // AND the device connects with the new certificate and publishes as its thing
    let (renewed, mut renewed_events) = client(&stack, "sensor-r01", Some(&format!("cert/{new}")));
    renewed.publish("dt/fleet/sensor-r01/telemetry", QoS::AtLeastOnce, false, reading()).await?;
    until(&mut renewed_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    renewed.disconnect().await?;
    // AND as the presence function records that connection, the superseded certificate is
    // retired on its own (as `fleetctl devices retire-certs` would, audited `retired`): it can
    // no longer connect, the new one still can
    presence_with(&stack, &thing, &new).await?;
    eventually(async || {
        Ok((stack.store.local_certificate_status(&old).await? == Some(CertStatus::Inactive)).then_some(()))
    })
    .await
    .context("the old certificate was not retired")?;
    let trail = fleet_shared::ports::ProvisioningAudit::trail(&stack.store, "sensor-r01").await?;
    assert_eq!(trail.last().map(|e| e.outcome.as_str()), Some("retired"), "{trail:?}");
    let again =
        retire_superseded(ports(), &thing, &InUse::Vouched, Scope::Attached, fleet_shared::time::now_ms())
            .await?;
    assert_eq!(
        (&again.kept, &again.deactivated, &again.already_inactive),
        (&new, &vec![], &vec![old.clone()])
    );
    let (_stale, mut stale_events) = client(&stack, "sensor-r01", Some(&format!("cert/{old}")));
    let refused = until(&mut stale_events, |e| match e {
        Event::Incoming(Packet::ConnAck(ack)) => Some(ack.code),
        _ => None,
    })
    .await;
    ensure!(
        !matches!(refused, Ok(rumqttc::ConnectReturnCode::Success)),
        "the retired certificate connected: {refused:?}"
    );
    let (current, mut current_events) = client(&stack, "sensor-r01", Some(&format!("cert/{new}")));
    current.publish("dt/fleet/sensor-r01/telemetry", QoS::AtLeastOnce, false, reading()).await?;
    until(&mut current_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    drop(service);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_not_on_the_allowlist_is_refused_by_the_hook_and_gets_no_thing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    // GIVEN a claim holder asking for a serial nobody allowed
    let (claim, mut events) = claim_holder(&stack, "rogue-1").await?;
    let (_, created) = ask(&claim, &mut events, CREATE_TOPIC, "{}".into()).await?;
    let id = CertificateId::parse(created["certificateId"].as_str().context("certificateId")?)?;
    // WHEN it registers
    let (answer, refused) = ask(
        &claim,
        &mut events,
        &register_topic(),
        register_body(&created["certificateOwnershipToken"], "rogue-1"),
    )
    .await?;
    // THEN it is rejected with the hook's refusal, and nothing was provisioned
    assert_eq!(answer, "rejected", "{refused}");
    assert_eq!(
        (refused["statusCode"].as_u64(), refused["errorCode"].as_str()),
        (Some(403), Some("AccessDenied"))
    );
    assert!(
        refused["errorMessage"].as_str().is_some_and(|m| m.contains("pre-provisioning hook")),
        "{refused}"
    );
    let thing = ThingName::parse("rogue-1")?;
    assert_eq!(stack.store.local_thing(&thing).await?, None);
    assert!(!stack.store.local_certificate_attached(&thing, &id).await?);
    assert_eq!(stack.store.local_certificate_status(&id).await?, Some(CertStatus::PendingActivation));
    assert!(stack.store.device(&thing).await?.is_none());
    stack.shutdown().await
}

/// The answer of one request made straight to the service: (`accepted`/`rejected`, body).
async fn direct(
    p: &Provisioning,
    request: &Request,
    client_id: &str,
    body: &str,
    now_ms: i64,
) -> Result<(String, Value)> {
    let claim = p.claim.clone();
    let answers = p.handle(request, client_id, Some(&claim), body.as_bytes(), now_ms).await;
    let [(topic, payload)] = answers.as_slice() else { bail!("one answer expected: {answers:?}") };
    let kind = topic.rsplit('/').next().unwrap_or_default().to_owned();
    Ok((kind, serde_json::from_slice(payload)?))
}

fn code(answer: &(String, Value)) -> (&str, Option<u64>, Option<&str>) {
    (answer.0.as_str(), answer.1["statusCode"].as_u64(), answer.1["errorCode"].as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_tokens_are_bound_to_their_client_used_once_and_expire() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let p = provisioning(&stack)?;
    allow(&stack, "sensor-t01").await?;
    let create = Request::CreateKeysAndCertificate;
    let register = Request::RegisterThing { template: TEMPLATE.into() };
    let now = fleet_shared::time::now_ms();
    let (_, created) = direct(&p, &create, "sensor-t01", "", now).await?;
    let token = &created["certificateOwnershipToken"];
    assert_eq!(token.as_str().map(str::len), Some(64), "256 random bits");

    // A wrong token, an empty one, and the right one from another client are rejected
    let bad =
        code(&direct(&p, &register, "sensor-t01", &register_body(&json!("f00"), "sensor-t01"), now).await?)
            .2
            .map(str::to_owned);
    assert_eq!(bad.as_deref(), Some("InvalidCertificateOwnershipToken"));
    let empty = direct(&p, &register, "sensor-t01", &register_body(&json!(""), "sensor-t01"), now).await?;
    assert_eq!(code(&empty), ("rejected", Some(400), Some("InvalidCertificateOwnershipToken")));
    let stolen = direct(&p, &register, "sensor-t99", &register_body(token, "sensor-t01"), now).await?;
    assert_eq!(code(&stolen), ("rejected", Some(400), Some("InvalidCertificateOwnershipToken")));
    // The right client provisions once; the token is then used up
    let ok = direct(&p, &register, "sensor-t01", &register_body(token, "sensor-t01"), now).await?;
    assert_eq!(ok.0, "accepted", "{}", ok.1);
    let again = direct(&p, &register, "sensor-t01", &register_body(token, "sensor-t01"), now).await?;
    assert_eq!(code(&again), ("rejected", Some(400), Some("InvalidCertificateOwnershipToken")));

    // A token unused for an hour has expired, and its pending certificate is gone
    let (_, late) = direct(&p, &create, "sensor-t02", "", now).await?;
    let late_id = CertificateId::parse(late["certificateId"].as_str().context("id")?)?;
    let hour = i64::try_from(TOKEN_LIFETIME.as_millis())?;
    let expired = direct(
        &p,
        &register,
        "sensor-t02",
        &register_body(&late["certificateOwnershipToken"], "sensor-t02"),
        now + hour,
    )
    .await?;
    assert_eq!(code(&expired), ("rejected", Some(400), Some("InvalidCertificateOwnershipToken")));
    assert_eq!(stack.store.local_certificate_status(&late_id).await?, None, "deleted with its token");
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_rejected_with_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let p = provisioning(&stack)?;
    let now = fleet_shared::time::now_ms();
    let register = Request::RegisterThing { template: TEMPLATE.into() };
    for (request, body) in [
        (&Request::CreateKeysAndCertificate, "{not json"),
        (&Request::CreateKeysAndCertificate, "[1]"),
        (&register, "{not json"),
        (&register, r#"{"certificateOwnershipToken": 7}"#),
        (&register, r#"{"certificateOwnershipToken": "t", "parameters": {"SerialNumber": 1}}"#),
        (&register, "\u{0}\u{ff}"),
    ] {
        let answer = direct(&p, request, "sensor-m01", body, now).await?;
        assert_eq!(code(&answer), ("rejected", Some(400), Some("InvalidPayload")), "{body}");
        assert!(answer.1["errorMessage"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }
    let unknown = Request::RegisterThing { template: "no-such-template".into() };
    let answer = direct(&p, &unknown, "sensor-m01", &register_body(&json!("t"), "x"), now).await?;
    assert_eq!(code(&answer), ("rejected", Some(404), Some("ResourceNotFound")));
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_and_the_claim_survive_a_restart() -> Result<()> {
    // GIVEN a certificate issued before a restart
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("fleet.sqlite");
    let stack = start(&db).await?;
    let before = provisioning(&stack)?;
    let (_, old) =
        direct(&before, &Request::CreateKeysAndCertificate, "d1", "", fleet_shared::time::now_ms()).await?;
    let (ca, claim) = (before.ca_pem().to_owned(), before.claim.clone());
    drop(before);
    stack.shutdown().await?;
    // WHEN the local IoT Core starts again on the same file
    let stack = start(&db).await?;
    let after = provisioning(&stack)?;
    let (_, new) =
        direct(&after, &Request::CreateKeysAndCertificate, "d1", "", fleet_shared::time::now_ms()).await?;
    // THEN it has the same CA and claim, and both certificates chain to that CA
    assert_eq!((after.ca_pem(), &after.claim), (ca.as_str(), &claim));
    chains_to(old["certificatePem"].as_str().context("old pem")?, &ca)?;
    chains_to(new["certificatePem"].as_str().context("new pem")?, &ca)?;
    drop(after);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_claim_session_cannot_listen_for_answers_carrying_private_keys() -> Result<()> {
    // GIVEN one claim session subscribed to the provisioning answers
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let (first, mut first_events) = claim_holder(&stack, "sensor-l01").await?;
    // WHEN another claim session subscribes to them, even through a wildcard
    let (eavesdropper, mut events) = claim_session(&stack, "sensor-l02")?;
    eavesdropper.subscribe("$aws/certificates/#", QoS::AtLeastOnce).await?;
    let refused = until(&mut events, |e| match e {
        Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes.clone()),
        _ => None,
    })
    .await?;
    // THEN it is refused, and the first session still gets its certificate
    assert!(
        refused.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)),
        "the second listener must be refused: {refused:?}"
    );
    let (answer, created) = ask(&first, &mut first_events, CREATE_TOPIC, "{}".into()).await?;
    assert_eq!(answer, "accepted", "{created}");
    // AND once the first session has gone, the next claim session may listen
    first.disconnect().await?;
    let _ =
        tokio::time::timeout(Duration::from_secs(2), async { while first_events.poll().await.is_ok() {} })
            .await;
    claim_holder(&stack, "sensor-l03").await?;
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_cannot_take_a_devices_client_id_and_the_next_claim_session_may_listen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let claim = provisioning(&stack)?.claim.clone();
    allow(&stack, "sensor-q01").await?;
    // GIVEN sensor-q01 provisioned by claim, then connected with its own certificate (as
    // `fleetctl demo --provision` devices do, one after another)
    let cert = provision_with_csr(&stack, "sensor-q01").await?;
    let (device, mut device_events) = client(&stack, "sensor-q01", Some(&format!("cert/{cert}")));
    device.publish("dt/fleet/sensor-q01/telemetry", QoS::AtLeastOnce, false, reading()).await?;
    until(&mut device_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    // WHEN the claim, which every device carries, connects under the device's client id
    let (_intruder, mut intruder_events) = client(&stack, "sensor-q01", Some(&format!("cert/{claim}")));
    let answer = until(&mut intruder_events, |e| match e {
        Event::Incoming(Packet::ConnAck(ack)) => Some(ack.code),
        _ => None,
    })
    .await;
    // THEN it is refused (the claim policy allows client ids `claim-*` only), and the device's
    // session goes on
    ensure!(
        !matches!(answer, Ok(rumqttc::ConnectReturnCode::Success)),
        "the claim took the device's client id: {answer:?}"
    );
    device.publish("dt/fleet/sensor-q01/telemetry", QoS::AtLeastOnce, false, reading()).await?;
    until(&mut device_events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    // AND the next device's claim session may listen for the provisioning answers (sensor-q01's
    // has gone), while another one may not as long as it is connected
    let (_next, _next_events) = claim_holder(&stack, "sensor-q02").await?;
    let (eavesdropper, mut events) = claim_session(&stack, "sensor-q03")?;
    eavesdropper.subscribe(format!("{CREATE_TOPIC}/+"), QoS::AtLeastOnce).await?;
    let refused = until(&mut events, |e| match e {
        Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes.clone()),
        _ => None,
    })
    .await?;
    assert!(refused.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)), "{refused:?}");
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_creating_certificates_in_a_loop_is_throttled() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let p = provisioning(&stack)?;
    let create = Request::CreateKeysAndCertificate;
    let now = fleet_shared::time::now_ms();
    for _ in 0..fleet_local::provisioning::MAX_PENDING_PER_CLIENT {
        assert_eq!(direct(&p, &create, "sensor-loop", "", now).await?.0, "accepted");
    }
    let throttled = direct(&p, &create, "sensor-loop", "", now).await?;
    assert_eq!(code(&throttled), ("rejected", Some(429), Some("ThrottlingException")));
    // Another client is not held back by it.
    assert_eq!(direct(&p, &create, "sensor-other", "", now).await?.0, "accepted");
    stack.shutdown().await
}
