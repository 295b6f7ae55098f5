//! Fleet provisioning by claim, as AWS IoT serves it over MQTT (the device provisioning MQTT API).
//!
//! A device holding the fleet's claim certificate publishes:
//! - `$aws/certificates/create/json` (CreateKeysAndCertificate; an empty payload or `{}`): the
//!   local CA ([`crate::ca`]) makes a new key pair and certificate, registers it in the local
//!   registry as `PENDING_ACTIVATION`, and answers on `…/create/json/accepted` with
//!   `{certificateId, certificatePem, privateKey, certificateOwnershipToken}`;
//! - `$aws/provisioning-templates/<name>/provision/json` (RegisterThing;
//!   `{certificateOwnershipToken, parameters}`): the token is checked, the template's
//!   pre-provisioning hook is invoked through [`Functions`] with the event IoT Core sends
//!   (`{claimCertificateId, certificateId, certificatePem, templateArn, clientId, parameters}`,
//!   the template ARN in the local form, [`LOCAL_ARN_PREFIX`]), and only if it answers
//!   `allowProvisioning: true` is the template run with the device's parameters and the hook's
//!   `parameterOverrides`: the thing created (attributes merged), the certificate attached to
//!   it and set to the template's status. The answer is `…/provision/json/accepted` with
//!   `{deviceConfiguration, thingName}`.
//!
//! Errors are answered on `…/rejected` as AWS shapes them, `{statusCode, errorCode,
//! errorMessage}`: 400 `InvalidPayload` (not JSON, or not the request's shape), 400
//! `InvalidCertificateOwnershipToken` (empty, unknown, expired, already used, or issued to
//! another client), 400 `InvalidParameters` (a parameter the template needs is missing, or the
//! thing name is not one), 403 `AccessDenied` (the hook refused), 404 `ResourceNotFound` (no
//! such template), 500 `InternalFailure` (the hook failed or took longer than 5 s, or the
//! local registry failed). The codes AWS documents are used where it documents them; the
//! messages are ours.
//!
//! The ownership token is 256 random bits, kept by the service with the certificate it proves
//! and the client id that asked for it: only that client may use it, within an hour
//! ([`ProvisioningOptions::token_lifetime`], as AWS documents), and only once (a refused or
//! failed RegisterThing leaves it usable, so the device may try again). A token that expires
//! unused takes its certificate with it, if that is still `PENDING_ACTIVATION` and attached to
//! nothing, as on AWS. Tokens live in memory: a restart invalidates them.
//!
//! - `$aws/certificates/create-from-csr/json` (CreateCertificateFromCsr;
//!   `{certificateSigningRequest}`, a PKCS#10 request in PEM whose signature must verify): the
//!   local CA signs a certificate for the request's public key (the device keeps its private
//!   key; subject and extensions are the CA's, as AWS's), registered `PENDING_ACTIVATION`, and
//!   answers `{certificateId, certificatePem, certificateOwnershipToken}`; RegisterThing takes
//!   that token as it takes CreateKeysAndCertificate's.
//!
//! A provisioned device may call these two over its own connection to rotate its certificate
//! (the template's `DevicePolicy` allows them): the certificate it connected with is then the
//! claim the hook sees, as on AWS, and the hook admits it for its own thing only.
//!
//! Not emulated: the CBOR payload format (use `json`); template constructs other than parameters with
//! defaults, `Ref`, a thing's `ThingName` and `AttributePayload`, a certificate's `Status` and a
//! `DeviceConfiguration` (anything else fails at start-up, naming it); the template's policy
//! (locally every provisioned device is held to the template's device policy); and answers
//! go to every connection subscribed to the answer topic, where AWS answers only the
//! requesting connection (mqtt5 has no delivery to one connection). Because the answers carry
//! private keys, the broker lets one claim session at a time subscribe to a filter that can
//! match them (`crate::broker`): claim clients provision one after another, as
//! `fleetctl demo --provision` does. Devices rotating at the same time each see the others'
//! CreateCertificateFromCsr and RegisterThing answers (no key travels in them, and a token
//! works only for the client it was issued to): match answers by `certificateId`/`thingName`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_shared::adapters::embedded::{SqliteStore, LOCAL_ARN_PREFIX};
use fleet_shared::certs::hook::HookResponse;
use fleet_shared::model::{CertStatus, CertificateId, ThingName};
use fleet_shared::ports::CertificateControl;
use fleet_shared::Env;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use crate::ca::{CaError, LocalCa, ISSUED_COMMON_NAME};
use crate::functions::Functions;
use crate::template::ProvisioningTemplate;

/// AWS IoT waits this long for the pre-provisioning hook.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Unused certificates (and their tokens) one client may hold at a time.
pub const MAX_PENDING_PER_CLIENT: usize = 5;
/// How long AWS keeps an ownership token.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// The validity of issued certificates unless `FLEET_LOCAL_CERT_VALIDITY_DAYS` says otherwise.
pub const DEFAULT_VALIDITY_DAYS: i64 = 365;
/// The variable (of [`crate::LocalOptions::env`]) that sets it.
pub const VALIDITY_VARIABLE: &str = "FLEET_LOCAL_CERT_VALIDITY_DAYS";

/// The CreateKeysAndCertificate request topic (JSON).
pub const CREATE_TOPIC: &str = "$aws/certificates/create/json";
/// The CreateCertificateFromCsr request topic (JSON).
pub const CREATE_FROM_CSR_TOPIC: &str = "$aws/certificates/create-from-csr/json";
/// Longest certificate signing request taken (AWS's request limit for the field).
pub const MAX_CSR_BYTES: usize = 4096;

/// The RegisterThing request topic of `template` (JSON).
pub fn provision_topic(template: &str) -> String {
    format!("$aws/provisioning-templates/{template}/provision/json")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisioningOptions {
    /// How long issued certificates are valid.
    pub certificate_validity: Duration,
    pub token_lifetime: Duration,
}

impl Default for ProvisioningOptions {
    fn default() -> Self {
        let days = DEFAULT_VALIDITY_DAYS.unsigned_abs();
        Self { certificate_validity: Duration::from_secs(days * 86_400), token_lifetime: TOKEN_LIFETIME }
    }
}

impl ProvisioningOptions {
    /// From the local IoT Core's variables: [`VALIDITY_VARIABLE`] (days, default 365).
    pub fn from_env(env: &Env) -> Result<Self, fleet_shared::env::ConfigError> {
        let days = env.positive(VALIDITY_VARIABLE, DEFAULT_VALIDITY_DAYS)?.unsigned_abs();
        Ok(Self { certificate_validity: Duration::from_secs(days * 86_400), ..Self::default() })
    }
}

/// What a publish on a provisioning topic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    CreateKeysAndCertificate,
    CreateCertificateFromCsr,
    RegisterThing { template: String },
}

impl Request {
    /// A request topic (JSON payload format); answers and other formats are not requests.
    pub fn parse(topic: &str) -> Option<Self> {
        let parts: Vec<&str> = topic.split('/').collect();
        match parts.as_slice() {
            ["$aws", "certificates", "create", "json"] => Some(Request::CreateKeysAndCertificate),
            ["$aws", "certificates", "create-from-csr", "json"] => Some(Request::CreateCertificateFromCsr),
            ["$aws", "provisioning-templates", t, "provision", "json"] if !t.is_empty() => {
                Some(Request::RegisterThing { template: (*t).to_owned() })
            }
            _ => None,
        }
    }

    fn topic(&self) -> String {
        match self {
            Request::CreateKeysAndCertificate => CREATE_TOPIC.to_owned(),
            Request::CreateCertificateFromCsr => CREATE_FROM_CSR_TOPIC.to_owned(),
            Request::RegisterThing { template } => provision_topic(template),
        }
    }
}

/// An answer topic of the provisioning API (`…/accepted`, `…/rejected`, any payload format):
/// the service's to publish, never a client's.
pub fn is_answer_topic(topic: &str) -> bool {
    let parts: Vec<&str> = topic.split('/').collect();
    match parts.as_slice() {
        ["$aws", "certificates", "create" | "create-from-csr", _, answer]
        | ["$aws", "provisioning-templates", _, "provision", _, answer] => {
            matches!(*answer, "accepted" | "rejected")
        }
        _ => false,
    }
}

/// A value in a template body: a literal, or `{"Ref": parameter}`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Literal(String),
    Ref(String),
}

impl Term {
    fn parse(v: &Value, at: &str) -> Result<Self, String> {
        match v {
            Value::String(s) => Ok(Term::Literal(s.clone())),
            Value::Object(m) if m.len() == 1 => match m.get("Ref") {
                Some(Value::String(p)) => Ok(Term::Ref(p.clone())),
                _ => Err(format!(
                    "{at}: {} is not supported locally (a string or a Ref)",
                    Value::Object(m.clone())
                )),
            },
            other => Err(format!("{at}: {other} is not supported locally (a string or a Ref)")),
        }
    }

    fn resolve(&self, params: &BTreeMap<String, String>) -> Result<String, String> {
        match self {
            Term::Literal(s) => Ok(s.clone()),
            Term::Ref(p) => params.get(p).cloned().ok_or_else(|| format!("Missing value for parameter {p}")),
        }
    }
}

/// A provisioning template's body, in the subset the local IoT Core runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateBody {
    /// Parameter name → default.
    parameters: BTreeMap<String, Option<String>>,
    thing_name: Term,
    attributes: BTreeMap<String, Term>,
    certificate_status: Term,
    device_configuration: BTreeMap<String, Term>,
}

/// What running a template gives.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    thing: ThingName,
    attributes: BTreeMap<String, String>,
    certificate_status: CertStatus,
    device_configuration: Map<String, Value>,
}

/// The parameter IoT Core fills with the new certificate's id.
const CERTIFICATE_ID_PARAMETER: &str = "AWS::IoT::Certificate::Id";

impl TemplateBody {
    /// Parse a `TemplateBody` (JSON); anything the local IoT Core would not run as AWS does is
    /// an error naming it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| format!("TemplateBody is not JSON: {e}"))?;
        let mut parameters = BTreeMap::new();
        for (name, p) in doc.get("Parameters").and_then(Value::as_object).into_iter().flatten() {
            let default = match p.get("Default") {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => return Err(format!("parameter {name}: Default {other} is not a string")),
            };
            parameters.insert(name.clone(), default);
        }
        let mut thing = None;
        let mut certificate_status = None;
        let resources =
            doc.get("Resources").and_then(Value::as_object).ok_or("TemplateBody has no Resources")?;
        for (id, r) in resources {
            let props = r.get("Properties").cloned().unwrap_or_else(|| json!({}));
            match r.get("Type").and_then(Value::as_str) {
                Some("AWS::IoT::Thing") => {
                    let name = props
                        .get("ThingName")
                        .ok_or_else(|| format!("resource {id}: no ThingName"))
                        .and_then(|v| Term::parse(v, &format!("resource {id} ThingName")))?;
                    let mut attributes = BTreeMap::new();
                    for (k, v) in
                        props.get("AttributePayload").and_then(Value::as_object).into_iter().flatten()
                    {
                        attributes
                            .insert(k.clone(), Term::parse(v, &format!("resource {id} attribute {k}"))?);
                    }
                    if thing.replace((name, attributes)).is_some() {
                        return Err("more than one AWS::IoT::Thing".into());
                    }
                }
                Some("AWS::IoT::Certificate") => {
                    match props.get("CertificateId").map(|v| Term::parse(v, &format!("resource {id}"))) {
                        Some(Ok(Term::Ref(p))) if p == CERTIFICATE_ID_PARAMETER => {}
                        _ => {
                            return Err(format!(
                                "resource {id}: only CertificateId {{\"Ref\": \"{CERTIFICATE_ID_PARAMETER}\"}} is supported locally"
                            ))
                        }
                    }
                    let status = props.get("Status").map_or(Ok(Term::Literal("ACTIVE".into())), |v| {
                        Term::parse(v, &format!("resource {id} Status"))
                    })?;
                    certificate_status = Some(status);
                }
                // Locally every device is held to the template's device policy.
                Some("AWS::IoT::Policy") => {}
                other => return Err(format!("resource {id}: type {other:?} is not supported locally")),
            }
        }
        let (thing_name, attributes) = thing.ok_or("TemplateBody creates no AWS::IoT::Thing")?;
        let mut device_configuration = BTreeMap::new();
        for (k, v) in doc.get("DeviceConfiguration").and_then(Value::as_object).into_iter().flatten() {
            device_configuration.insert(k.clone(), Term::parse(v, &format!("DeviceConfiguration {k}"))?);
        }
        Ok(TemplateBody {
            parameters,
            thing_name,
            attributes,
            certificate_status: certificate_status.ok_or("TemplateBody has no AWS::IoT::Certificate")?,
            device_configuration,
        })
    }

    /// Run the template with `given` parameters (the device's, overridden by the hook's) for
    /// the certificate `id`.
    fn resolve(&self, given: &BTreeMap<String, String>, id: &CertificateId) -> Result<Resolved, String> {
        let mut params = BTreeMap::new();
        for (name, default) in &self.parameters {
            if let Some(v) = given.get(name).or(default.as_ref()) {
                params.insert(name.clone(), v.clone());
            }
        }
        params.insert(CERTIFICATE_ID_PARAMETER.to_owned(), id.to_string());
        let name = self.thing_name.resolve(&params)?;
        let thing = ThingName::parse(&name).map_err(|e| format!("Invalid thing name {name:?}: {e}"))?;
        let attributes = self
            .attributes
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.resolve(&params)?)))
            .collect::<Result<_, String>>()?;
        let status = self.certificate_status.resolve(&params)?;
        let certificate_status = match CertStatus::parse(&status) {
            Some(s @ (CertStatus::Active | CertStatus::Inactive)) => s,
            _ => return Err(format!("Invalid certificate status {status:?} (ACTIVE or INACTIVE)")),
        };
        let device_configuration = self
            .device_configuration
            .iter()
            .map(|(k, t)| Ok((k.clone(), Value::String(t.resolve(&params)?))))
            .collect::<Result<_, String>>()?;
        Ok(Resolved { thing, attributes, certificate_status, device_configuration })
    }
}

/// An error answer, `{statusCode, errorCode, errorMessage}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Rejection {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    fn invalid_payload(message: impl Into<String>) -> Self {
        Self::new(400, "InvalidPayload", message)
    }
    fn token(message: &str) -> Self {
        Self::new(400, "InvalidCertificateOwnershipToken", message)
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalFailure", message)
    }
}

/// A topic and payload the service publishes.
pub type Answer = (String, Vec<u8>);

/// A certificate issued by CreateKeysAndCertificate whose token has not been used yet.
#[derive(Debug, Clone)]
struct Pending {
    certificate: CertificateId,
    pem: String,
    client_id: String,
    expires_ms: i64,
}

/// The fleet-provisioning service of one local IoT Core.
pub struct Provisioning {
    store: SqliteStore,
    functions: Arc<Functions>,
    templates: Vec<ProvisioningTemplate>,
    ca: LocalCa,
    /// The claim certificate's id (the claim devices present).
    pub claim: CertificateId,
    options: ProvisioningOptions,
    tokens: Mutex<HashMap<String, Pending>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterThingRequest {
    #[serde(default)]
    certificate_ownership_token: String,
    #[serde(default)]
    parameters: Option<BTreeMap<String, String>>,
}

fn new_token() -> Result<String, Rejection> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Rejection::internal(format!("no randomness for a token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Provisioning {
    pub fn new(
        store: SqliteStore,
        functions: Arc<Functions>,
        templates: Vec<ProvisioningTemplate>,
        ca: LocalCa,
        claim: CertificateId,
        options: ProvisioningOptions,
    ) -> Self {
        Self { store, functions, templates, ca, claim, options, tokens: Mutex::default() }
    }

    /// The local CA's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// The local registry the service writes (certificates, things).
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// Answer `request` from `client_id`, presenting `claim` (the claim certificate's id, or
    /// `None` for a client that presented none), at `now_ms`.
    pub async fn handle(
        &self,
        request: &Request,
        client_id: &str,
        claim: Option<&CertificateId>,
        payload: &[u8],
        now_ms: i64,
    ) -> Vec<Answer> {
        self.expire(now_ms).await;
        let base = request.topic();
        let outcome = match request {
            Request::CreateKeysAndCertificate => self.create(client_id, payload, now_ms).await,
            Request::CreateCertificateFromCsr => self.create_from_csr(client_id, payload, now_ms).await,
            Request::RegisterThing { template } => {
                self.register(template, client_id, claim, payload, now_ms).await
            }
        };
        let answer = match outcome {
            Ok(body) => (format!("{base}/accepted"), body),
            Err(r) => {
                warn!(client_id, topic = %base, status = r.status, code = r.code, message = %r.message, "provisioning request rejected");
                let body = json!({"statusCode": r.status, "errorCode": r.code, "errorMessage": r.message});
                (format!("{base}/rejected"), body)
            }
        };
        vec![(answer.0, answer.1.to_string().into_bytes())]
    }

    /// Forget expired tokens, and delete their certificates if still unused.
    async fn expire(&self, now_ms: i64) {
        let expired: Vec<Pending> = {
            let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<String> =
                tokens.iter().filter(|(_, p)| p.expires_ms <= now_ms).map(|(t, _)| t.clone()).collect();
            gone.iter().filter_map(|t| tokens.remove(t)).collect()
        };
        for p in expired {
            if let Err(e) = self.store.delete_pending_local_certificate(&p.certificate).await {
                warn!(certificate = %p.certificate, error = %e, "expired certificate not deleted");
            }
        }
    }

    async fn create(&self, client_id: &str, payload: &[u8], now_ms: i64) -> Result<Value, Rejection> {
        if !payload.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice::<Value>(payload) {
                Ok(Value::Object(_)) => {}
                Ok(_) => {
                    return Err(Rejection::invalid_payload("The payload must be empty or a JSON object"))
                }
                Err(e) => return Err(Rejection::invalid_payload(format!("Payload is not valid JSON: {e}"))),
            }
        }
        self.within_pending_limit(client_id, now_ms)?;
        let issued = self
            .ca
            .issue(ISSUED_COMMON_NAME, now_ms, self.options.certificate_validity)
            .map_err(|e| Rejection::internal(e.to_string()))?;
        let token = self.register_pending(client_id, &issued.id, &issued.cert_pem, now_ms).await?;
        Ok(json!({
            "certificateId": issued.id,
            "certificatePem": issued.cert_pem,
            "privateKey": issued.key_pem,
            "certificateOwnershipToken": token,
        }))
    }

    async fn create_from_csr(
        &self,
        client_id: &str,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Value, Rejection> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Body {
            certificate_signing_request: String,
        }
        let body: Body = serde_json::from_slice(payload).map_err(|e| {
            Rejection::invalid_payload(format!(
                "Payload is not {{\"certificateSigningRequest\": \"<PEM>\"}}: {e}"
            ))
        })?;
        let csr = body.certificate_signing_request;
        if csr.len() > MAX_CSR_BYTES {
            return Err(Rejection::invalid_payload(format!(
                "certificateSigningRequest is {} bytes, over {MAX_CSR_BYTES}",
                csr.len()
            )));
        }
        self.within_pending_limit(client_id, now_ms)?;
        let (id, pem) =
            self.ca.issue_for_csr(&csr, now_ms, self.options.certificate_validity).map_err(|e| match e {
                CaError::Request(why) => {
                    Rejection::invalid_payload(format!("certificateSigningRequest: {why}"))
                }
                other => Rejection::internal(other.to_string()),
            })?;
        let token = self.register_pending(client_id, &id, &pem, now_ms).await?;
        Ok(json!({"certificateId": id, "certificatePem": pem, "certificateOwnershipToken": token}))
    }

    /// A client looping on certificate creation would grow the registry and the tokens for an
    /// hour each: a few unused certificates per client at a time.
    fn within_pending_limit(&self, client_id: &str, now_ms: i64) -> Result<(), Rejection> {
        let outstanding = {
            let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            tokens.values().filter(|p| p.client_id == client_id && p.expires_ms > now_ms).count()
        };
        if outstanding >= MAX_PENDING_PER_CLIENT {
            return Err(Rejection::new(
                429,
                "ThrottlingException",
                format!(
                    "{outstanding} certificates created by this client wait for RegisterThing: use one, or wait for their tokens to expire"
                ),
            ));
        }
        Ok(())
    }

    /// Register a new certificate `PENDING_ACTIVATION` (before it is answered: a device never
    /// holds a certificate IoT Core lacks) and give its ownership token.
    async fn register_pending(
        &self,
        client_id: &str,
        id: &CertificateId,
        pem: &str,
        now_ms: i64,
    ) -> Result<String, Rejection> {
        self.store
            .register_local_certificate(pem, CertStatus::PendingActivation, now_ms)
            .await
            .map_err(|e| Rejection::internal(format!("certificate not registered: {e}")))?;
        let token = new_token()?;
        let lifetime = i64::try_from(self.options.token_lifetime.as_millis()).unwrap_or(i64::MAX);
        let pending = Pending {
            certificate: id.clone(),
            pem: pem.to_owned(),
            client_id: client_id.to_owned(),
            expires_ms: now_ms.saturating_add(lifetime),
        };
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(token.clone(), pending);
        info!(client_id, certificate = %id, "certificate created (PENDING_ACTIVATION)");
        Ok(token)
    }

    /// Take the token's pending certificate out (so one token provisions once); it is put back
    /// if provisioning does not complete.
    fn take_token(&self, token: &str, client_id: &str, now_ms: i64) -> Result<Pending, Rejection> {
        if token.is_empty() {
            return Err(Rejection::token("Certificate ownership token cannot be empty."));
        }
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pending) = tokens.get(token) else {
            return Err(Rejection::token("Certificate ownership token is invalid, expired or already used."));
        };
        if pending.expires_ms <= now_ms {
            return Err(Rejection::token("Certificate ownership token has expired."));
        }
        if pending.client_id != client_id {
            return Err(Rejection::token("Certificate ownership token was not issued to this client."));
        }
        tokens.remove(token).ok_or_else(|| Rejection::token("Certificate ownership token is invalid."))
    }

    fn put_back(&self, token: String, pending: Pending) {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(token, pending);
    }

    async fn register(
        &self,
        template_name: &str,
        client_id: &str,
        claim: Option<&CertificateId>,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Value, Rejection> {
        let request: RegisterThingRequest = serde_json::from_slice(payload).map_err(|e| {
            Rejection::invalid_payload(format!("Payload is not a RegisterThing request: {e}"))
        })?;
        let template = self.templates.iter().find(|t| t.name == template_name).ok_or_else(|| {
            Rejection::new(404, "ResourceNotFound", format!("No provisioning template {template_name}"))
        })?;
        let token = request.certificate_ownership_token;
        let pending = self.take_token(&token, client_id, now_ms)?;
        let parameters = request.parameters.unwrap_or_default();
        match self.provision(template, client_id, claim, &pending, parameters, now_ms).await {
            Ok(answer) => Ok(answer),
            Err(r) => {
                self.put_back(token, pending);
                Err(r)
            }
        }
    }

    async fn provision(
        &self,
        template: &ProvisioningTemplate,
        client_id: &str,
        claim: Option<&CertificateId>,
        pending: &Pending,
        mut parameters: BTreeMap<String, String>,
        now_ms: i64,
    ) -> Result<Value, Rejection> {
        if let Some(hook) = &template.hook {
            let event = json!({
                "claimCertificateId": claim.map(CertificateId::as_str).unwrap_or_default(),
                "certificateId": pending.certificate,
                "certificatePem": pending.pem,
                "templateArn": format!("{LOCAL_ARN_PREFIX}:provisioningtemplate/{}", template.name),
                "clientId": client_id,
                "parameters": parameters,
            });
            let answer = tokio::time::timeout(HOOK_TIMEOUT, self.functions.invoke(hook, &event))
                .await
                .map_err(|_| {
                    Rejection::internal(format!(
                        "The pre-provisioning hook {hook} did not answer within {HOOK_TIMEOUT:?}"
                    ))
                })?
                .map_err(|e| Rejection::internal(format!("The pre-provisioning hook {hook} failed: {e}")))?;
            let answer: HookResponse = serde_json::from_value(answer).map_err(|e| {
                Rejection::internal(format!("The pre-provisioning hook {hook} answered no decision: {e}"))
            })?;
            if !answer.allow_provisioning {
                return Err(Rejection::new(
                    403,
                    "AccessDenied",
                    format!("Provisioning was refused by the pre-provisioning hook {hook}"),
                ));
            }
            for (k, v) in answer.parameter_overrides {
                let v = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                parameters.insert(k, v);
            }
        }
        let resolved = template
            .body
            .resolve(&parameters, &pending.certificate)
            .map_err(|m| Rejection::new(400, "InvalidParameters", m))?;
        let failed = |what: &'static str| {
            move |e: fleet_shared::StoreError| Rejection::internal(format!("{what}: {e}"))
        };
        self.store
            .create_local_thing(&resolved.thing, &resolved.attributes, now_ms)
            .await
            .map_err(failed("thing not created"))?;
        self.store
            .attach_local_certificate(&resolved.thing, &pending.certificate)
            .await
            .map_err(failed("certificate not attached"))?;
        self.store
            .set_certificate_status(&pending.certificate, resolved.certificate_status)
            .await
            .map_err(failed("certificate not activated"))?;
        info!(client_id, thing = %resolved.thing, certificate = %pending.certificate, "thing provisioned");
        Ok(json!({"deviceConfiguration": resolved.device_configuration, "thingName": resolved.thing}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_topics_only() {
        assert_eq!(Request::parse("$aws/certificates/create/json"), Some(Request::CreateKeysAndCertificate));
        assert_eq!(
            Request::parse("$aws/certificates/create-from-csr/json"),
            Some(Request::CreateCertificateFromCsr)
        );
        assert_eq!(
            Request::parse("$aws/provisioning-templates/fleetline-dev-devices/provision/json"),
            Some(Request::RegisterThing { template: "fleetline-dev-devices".into() })
        );
        for t in [
            "$aws/certificates/create/json/accepted",
            "$aws/certificates/create/cbor",
            "$aws/certificates/create-from-csr/json/accepted",
            "$aws/certificates/create-from-csr/cbor",
            "$aws/provisioning-templates//provision/json",
            "$aws/provisioning-templates/t/provision/json/rejected",
            "dt/fleet/d1/telemetry",
        ] {
            assert_eq!(Request::parse(t), None, "{t}");
        }
        assert!(is_answer_topic("$aws/certificates/create/json/accepted"));
        assert!(is_answer_topic("$aws/certificates/create-from-csr/json/rejected"));
        assert!(!is_answer_topic("$aws/certificates/create-from-csr/json"));
        assert!(is_answer_topic("$aws/provisioning-templates/t/provision/cbor/rejected"));
        assert!(!is_answer_topic("$aws/certificates/create/json"));
        assert!(!is_answer_topic("$aws/things/t/shadow/update/accepted"));
    }

    const BODY: &str = r#"{
        "Parameters": {
            "SerialNumber": {"Type": "String"},
            "DeviceClass": {"Type": "String", "Default": "unclassified"},
            "AWS::IoT::Certificate::Id": {"Type": "String"}
        },
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Ref": "SerialNumber"}, "AttributePayload": {"class": {"Ref": "DeviceClass"}}}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "p"}}
        },
        "DeviceConfiguration": {"class": {"Ref": "DeviceClass"}}
    }"#;

    #[test]
    fn runs_a_template_with_defaults_and_refuses_what_it_cannot_resolve() -> Result<(), String> {
        let body = TemplateBody::parse(BODY)?;
        let id = CertificateId::of_der(b"x");
        let given = BTreeMap::from([("SerialNumber".to_owned(), "dev-1".to_owned())]);
        let r = body.resolve(&given, &id)?;
        assert_eq!(r.thing.as_str(), "dev-1");
        assert_eq!(r.attributes["class"], "unclassified", "the default");
        assert_eq!(
            (r.certificate_status, &r.device_configuration["class"]),
            (CertStatus::Active, &json!("unclassified"))
        );
        assert!(body.resolve(&BTreeMap::new(), &id).unwrap_err().contains("SerialNumber"));
        let bad = BTreeMap::from([("SerialNumber".to_owned(), "no spaces allowed".to_owned())]);
        assert!(body.resolve(&bad, &id).unwrap_err().contains("Invalid thing name"));
        let join = BODY.replace(r#"{"Ref": "SerialNumber"}"#, r#"{"Fn::Join": ["", ["a"]]}"#);
        assert!(TemplateBody::parse(&join).unwrap_err().contains("not supported locally"));
        assert!(TemplateBody::parse("{").unwrap_err().contains("not JSON"));
        Ok(())
    }
}
