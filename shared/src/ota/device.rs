//! The device side of an OTA job (feature `sim`, like [`crate::commands::sim`]): what a device
//! does with a job IoT Jobs hands it, written to be ported to firmware as it stands, and the
//! simulated devices of `fleetctl demo` that run it over AWS IoT Jobs' device MQTT API.
//!
//! # What a device does with a job, in this order
//!
//! [`run_job`] is a pure function of the job document, what the device knows of itself
//! ([`DeviceFirmware`]), the firmware keys it trusts and a way to download an image. It answers
//! the update to send ([`JobUpdate`]: the execution's status and `statusDetails`) and what to
//! do ([`Action`]). Every refusal has a stable code in `statusDetails.reason`, with a
//! human-readable `statusDetails.detail`:
//!
//! 1. The job document is one JSON object whose `operation` is `fleetline.ota`
//!    ([`OTA_OPERATION`]), else REJECTED `unsupported_operation` (another kind of job); it
//!    carries a `manifest` that [`FirmwareManifest::parse`] accepts, else REJECTED
//!    `malformed_document` (also for a document that is not one JSON object, or names
//!    `operation` or `manifest` twice; the detail names the manifest's own code).
//! 2. The manifest verifies under a trusted firmware key ([`ManifestVerifier::verify`]), else
//!    REJECTED `unknown_kid` or `bad_signature`; only now does the device act on it. It is for
//!    the device's own class, else REJECTED `class_mismatch`.
//! 3. A device already running the manifest's firmware reports SUCCEEDED without installing
//!    (`statusDetails.result = already_installed`, `statusDetails.fw`), whatever its battery:
//!    installing nothing is always safe, so a rollback to the firmware a device already runs is
//!    harmless. Otherwise a battery below the device's threshold is REJECTED `battery_low`
//!    (a device without a battery reading, e.g. mains-powered, is not checked).
//! 4. The image is downloaded from `url` (a failed download is FAILED `download_failed`) and
//!    checked with [`check_image`] before anything is written (FAILED `size_mismatch` or
//!    `digest_mismatch`). Then it is installed: the device reboots on the new firmware (a new
//!    `boot`, the new `fw` in its telemetry) and reports SUCCEEDED with
//!    `statusDetails.result = installed` and `statusDetails.fw`.
//!
//! The caller carries out the action *before* it sends the update: a device reports SUCCEEDED
//! once it runs the new firmware. REJECTED means the device would not try (the job is not for
//! it, or not now); FAILED means it tried and the image was not the released one.
//!
//! # Over MQTT
//!
//! [`SimulatedJobs`] is one device's side of AWS IoT Jobs' device API: it subscribes to
//! `$aws/things/<t>/jobs/notify-next`, `…/start-next/accepted|rejected` and
//! `…/+/update/accepted|rejected`; asks `…/start-next` when it connects (jobs queued while it
//! was away are not announced again) and whenever `notify-next` names an execution; runs
//! [`run_job`] on the started execution's `jobDocument`; and answers on
//! `…/jobs/<jobId>/update` with the status, `statusDetails` and the `expectedVersion` it
//! started, counting what it did.
//!
//! A device built [`SimulatedJobs::with_rotation`] also carries out certificate rotation jobs
//! (`fleetline.rotate_cert`, [`super::rotate`]): it rotates over its connection, hands the new
//! certificate and key to its caller ([`Reaction::rotate`]: store them, reconnect with them),
//! and reports SUCCEEDED when the job comes back to it on the new connection (`start-next`
//! returns the execution in progress). Without it, such a job is REJECTED
//! `unsupported_operation`, as any other it does not know.
//!
//! For the demo, images are synthetic: [`demo_image`] is a fixed-size byte pattern derived from
//! class and firmware, so a manifest signed over `demo_image(class, fw)` checks out, and one
//! whose digest or size is another's fails.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::de::{Deserializer, Error as _, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::engine::{OTA_OPERATION, ROTATE_OPERATION};
use super::manifest::{check_image, FirmwareManifest, ManifestVerifier};
use super::rotate::{NewCertificate, Rotation, Step, ROTATED, ROTATION_REFUSED};
use crate::model::JobId;

/// `statusDetails.reason` of a job that is not a Fleetline OTA job.
pub const UNSUPPORTED_OPERATION: &str = "unsupported_operation";
/// `statusDetails.reason` of an OTA job document without a well-formed manifest.
pub const MALFORMED_DOCUMENT: &str = "malformed_document";
/// `statusDetails.reason` of a manifest for another device class.
pub const CLASS_MISMATCH: &str = "class_mismatch";
/// `statusDetails.reason` of an install refused for the battery.
pub const BATTERY_LOW: &str = "battery_low";
/// `statusDetails.reason` of an image that could not be downloaded.
pub const DOWNLOAD_FAILED: &str = "download_failed";
/// `statusDetails.result` of a SUCCEEDED job that installed the firmware.
pub const INSTALLED: &str = "installed";
/// `statusDetails.result` of a SUCCEEDED job for the firmware the device already runs.
pub const ALREADY_INSTALLED: &str = "already_installed";

/// The battery below which a device refuses to install, unless told otherwise.
pub const DEFAULT_MIN_BATTERY_PCT: f64 = 20.0;

/// The size of every [`demo_image`].
pub const DEMO_IMAGE_BYTES: usize = 4096;

/// IoT Jobs' limit on a `statusDetails` value, in characters.
const MAX_DETAIL_CHARS: usize = 1024;

/// The status a device gives an execution it has run (IoT Jobs' terminal statuses a device
/// may set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtaStatus {
    Succeeded,
    Failed,
    Rejected,
}

impl OtaStatus {
    /// AWS's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Rejected => "REJECTED",
        }
    }
}

/// What the device tells IoT Jobs about an execution.
#[derive(Debug, Clone, PartialEq)]
pub struct JobUpdate {
    pub status: OtaStatus,
    /// The stable code of a REJECTED or FAILED execution (also `statusDetails.reason`).
    pub reason: Option<&'static str>,
    /// `statusDetails`: `reason` and `detail`, or `result` and `fw`. Values are 1-1024
    /// characters without control characters, as UpdateJobExecution takes them.
    pub details: BTreeMap<String, String>,
}

impl JobUpdate {
    fn refused(status: OtaStatus, reason: &'static str, detail: impl Into<String>) -> Self {
        let details = BTreeMap::from([
            ("reason".to_owned(), reason.to_owned()),
            ("detail".to_owned(), detail_text(&detail.into())),
        ]);
        Self { status, reason: Some(reason), details }
    }

    fn succeeded(result: &'static str, fw: &str) -> Self {
        let details =
            BTreeMap::from([("result".to_owned(), result.to_owned()), ("fw".to_owned(), fw.to_owned())]);
        Self { status: OtaStatus::Succeeded, reason: None, details }
    }

    /// The body of an UpdateJobExecution request (`…/jobs/<jobId>/update`): applied only while
    /// the execution is at `expected_version` (the one the device started), when given.
    pub fn request(&self, expected_version: Option<u64>, client_token: &str) -> Value {
        let mut body = json!({
            "status": self.status.as_str(),
            "statusDetails": self.details,
            "clientToken": client_token,
        });
        if let Some(v) = expected_version {
            body["expectedVersion"] = json!(v);
        }
        body
    }
}

/// What the device does besides answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Install the checked image and reboot on firmware `fw`.
    Install {
        fw: String,
    },
}

/// The answer to one job: what to do, then what to report.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub update: JobUpdate,
    pub action: Action,
}

impl Outcome {
    fn only(update: JobUpdate) -> Self {
        Self { update, action: Action::Nothing }
    }
}

/// What a device knows of itself when a job arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceFirmware {
    pub class: String,
    /// The firmware it runs.
    pub fw: String,
    /// Its battery now; `None` when it has none (mains-powered), which is never too low.
    pub battery_pct: Option<f64>,
    /// No install below this battery.
    pub min_battery_pct: f64,
}

/// An image that could not be downloaded (network, storage); the execution is FAILED.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct DownloadFailed(pub String);

/// The fields of a job document an OTA job needs, from one JSON object (others, such as
/// `campaign`, are ignored); `operation` or `manifest` twice, however spelled, is an error.
struct Document<'a> {
    operation: Option<Value>,
    manifest: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Document<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Document<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document<'de>, A::Error> {
                let mut doc = Document { operation: None, manifest: None };
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "operation" if doc.operation.is_some() => {
                            return Err(A::Error::duplicate_field("operation"))
                        }
                        "operation" => doc.operation = Some(map.next_value()?),
                        "manifest" if doc.manifest.is_some() => {
                            return Err(A::Error::duplicate_field("manifest"))
                        }
                        "manifest" => doc.manifest = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(doc)
            }
        }
        deserializer.deserialize_map(Object)
    }
}

/// Run one job (module doc, steps 1-4): `document` is the execution's `jobDocument` as JSON
/// text, `fetch` downloads the image a verified manifest describes.
pub fn run_job(
    document: &str,
    device: &DeviceFirmware,
    trusted: &ManifestVerifier,
    fetch: impl FnOnce(&FirmwareManifest) -> Result<Vec<u8>, DownloadFailed>,
) -> Outcome {
    let reject =
        |reason, detail: String| Outcome::only(JobUpdate::refused(OtaStatus::Rejected, reason, detail));
    let fail = |reason, detail: String| Outcome::only(JobUpdate::refused(OtaStatus::Failed, reason, detail));

    // 1. An OTA job with a well-formed manifest.
    let doc: Document = match serde_json::from_str(document) {
        Ok(doc) => doc,
        Err(e) => return reject(MALFORMED_DOCUMENT, format!("the job document is not one JSON object: {e}")),
    };
    match &doc.operation {
        Some(Value::String(op)) if op == OTA_OPERATION => {}
        Some(op) => return reject(UNSUPPORTED_OPERATION, format!("operation {op} is not {OTA_OPERATION}")),
        None => {
            return reject(UNSUPPORTED_OPERATION, format!("no operation: this is not a {OTA_OPERATION} job"))
        }
    }
    let Some(raw) = doc.manifest else {
        return reject(MALFORMED_DOCUMENT, "the job document has no manifest".into());
    };
    let manifest = match FirmwareManifest::parse(raw.get().as_bytes()) {
        Ok(m) => m,
        Err(e) => return reject(MALFORMED_DOCUMENT, format!("manifest {}: {e}", e.code())),
    };

    // 2. Signed by a trusted key, for this device's class.
    if let Err(e) = trusted.verify(&manifest) {
        return reject(e.code(), e.to_string());
    }
    if manifest.class() != device.class {
        return reject(
            CLASS_MISMATCH,
            format!("the firmware is for class {}, this device is a {}", manifest.class(), device.class),
        );
    }

    // 3. Preconditions.
    if manifest.fw() == device.fw {
        return Outcome::only(JobUpdate::succeeded(ALREADY_INSTALLED, &device.fw));
    }
    if let Some(battery) = device.battery_pct.filter(|b| *b < device.min_battery_pct) {
        return reject(
            BATTERY_LOW,
            format!("battery {battery:.0}% is below the {:.0}% an install needs", device.min_battery_pct),
        );
    }

    // 4. Download, check, install.
    let image = match fetch(&manifest) {
        Ok(image) => image,
        Err(e) => return fail(DOWNLOAD_FAILED, format!("{}: {e}", manifest.url())),
    };
    if let Err(e) = check_image(&manifest, &image) {
        return fail(e.code(), e.to_string());
    }
    Outcome {
        update: JobUpdate::succeeded(INSTALLED, manifest.fw()),
        action: Action::Install { fw: manifest.fw().to_owned() },
    }
}

/// `text` as a `statusDetails` value: control characters as spaces, at most 1024 characters,
/// never empty.
fn detail_text(text: &str) -> String {
    let clean: String =
        text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_DETAIL_CHARS).collect();
    if clean.trim().is_empty() {
        "-".to_owned()
    } else {
        clean
    }
}

/// The synthetic image of firmware `fw` for `class`: [`DEMO_IMAGE_BYTES`] bytes, SHA-256 in
/// counter mode over the two labels, so every (class, fw) has its own and the same every time.
pub fn demo_image(class: &str, fw: &str) -> Vec<u8> {
    let mut image = Vec::with_capacity(DEMO_IMAGE_BYTES);
    let mut block = 0u32;
    while image.len() < DEMO_IMAGE_BYTES {
        let mut h = Sha256::new();
        h.update(b"fleetline-demo-image\0");
        for label in [class, fw] {
            h.update((label.len() as u64).to_be_bytes());
            h.update(label.as_bytes());
        }
        h.update(block.to_be_bytes());
        image.extend_from_slice(&h.finalize());
        block += 1;
    }
    image.truncate(DEMO_IMAGE_BYTES);
    image
}

/// A message a device publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: String,
}

/// What one message makes a device do: install first (reboot on `install`), or store the
/// certificate a rotation gave it and connect with it (`rotate`), then publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaction {
    pub install: Option<String>,
    pub rotate: Option<NewCertificate>,
    pub publish: Option<Publish>,
}

impl Reaction {
    fn publish(p: Publish) -> Self {
        Self { publish: Some(p), ..Self::default() }
    }
}

/// A device's certificate rotations ([`super::rotate`]): the one in flight, and the last done.
#[derive(Debug)]
struct Rotations {
    /// The provisioning template RegisterThing is asked of.
    template: String,
    /// (job, the execution's version, the rotation, the session it asked on).
    current: Option<(String, Option<u64>, Rotation, u64)>,
    /// (job, the new credentials): reported SUCCEEDED once the device is back with them.
    /// Firmware keeps this with the new pair, durably: a device that reboots after storing
    /// them reports the job done instead of rotating again.
    done: Option<(String, NewCertificate)>,
    /// The certificate the current session authenticated with, as the caller says
    /// ([`SimulatedJobs::connected_with`]).
    session: Option<String>,
    /// Sessions so far: a rotation asked on an earlier one lost its answers with it.
    sessions: u64,
}

/// An execution as `start-next/accepted` carries it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Execution<'a> {
    job_id: String,
    #[serde(default)]
    version_number: Option<u64>,
    #[serde(default, borrow)]
    job_document: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Started<'a> {
    #[serde(default, borrow)]
    execution: Option<Execution<'a>>,
}

#[derive(Deserialize)]
struct Notified {
    #[serde(default)]
    execution: Option<Value>,
}

/// One simulated device's OTA jobs over AWS IoT Jobs' device MQTT API (module doc, "Over
/// MQTT"), with the synthetic images of [`demo_image`], and its counts.
#[derive(Debug)]
pub struct SimulatedJobs {
    thing: String,
    /// `$aws/things/<t>/jobs/`
    prefix: String,
    device: DeviceFirmware,
    trusted: ManifestVerifier,
    requests: u64,
    /// The last job answered and its update: if it comes back (the update was lost or is
    /// still on its way), the same update is sent again, not the job run twice.
    answered: Option<(String, Publish)>,
    /// Jobs that installed firmware.
    pub installed: u64,
    /// Jobs for the firmware the device already ran.
    pub already_installed: u64,
    /// Jobs refused, by reason code.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Jobs whose install failed, by reason code.
    pub failed: BTreeMap<&'static str, u64>,
    /// Updates the Jobs service refused (the job was cancelled meanwhile, a stale version).
    pub updates_refused: u64,
    /// Certificate rotations done (jobs `fleetline.rotate_cert`).
    pub rotated: u64,
    rotations: Option<Rotations>,
}

impl SimulatedJobs {
    pub fn new(thing: impl Into<String>, device: DeviceFirmware, trusted: ManifestVerifier) -> Self {
        let thing = thing.into();
        Self {
            prefix: format!("$aws/things/{thing}/jobs/"),
            thing,
            device,
            trusted,
            requests: 0,
            answered: None,
            installed: 0,
            already_installed: 0,
            rejected: BTreeMap::new(),
            failed: BTreeMap::new(),
            updates_refused: 0,
            rotated: 0,
            rotations: None,
        }
    }

    /// A device whose firmware carries out certificate rotation jobs, registering with the
    /// provisioning template `template` (without this, it rejects them `unsupported_operation`).
    pub fn with_rotation(mut self, template: impl Into<String>) -> Self {
        self.rotations = Some(Rotations {
            template: template.into(),
            current: None,
            done: None,
            session: None,
            sessions: 0,
        });
        self
    }

    /// The certificate this connection authenticated with (a rotating device says so on each
    /// connect): a rotation is reported done only from a session on its new certificate.
    pub fn connected_with(&mut self, certificate: &str) {
        if let Some(r) = self.rotations.as_mut() {
            r.session = Some(certificate.to_owned());
            r.sessions += 1;
        }
    }

    /// The firmware the device runs now.
    pub fn fw(&self) -> &str {
        &self.device.fw
    }

    /// What the device's battery reads now.
    pub fn set_battery(&mut self, pct: Option<f64>) {
        self.device.battery_pct = pct;
    }

    /// The topic filters to subscribe to.
    pub fn subscriptions(&self) -> Vec<String> {
        [
            "notify-next",
            "start-next/accepted",
            "start-next/rejected",
            "+/update/accepted",
            "+/update/rejected",
        ]
        .map(|rest| format!("{}{rest}", self.prefix))
        .into_iter()
        .chain(self.rotations.iter().flat_map(|r| Rotation::subscriptions(&r.template)))
        .collect()
    }

    /// Whether a message on `topic` is for [`Self::receive`]: this thing's jobs topics, and for a
    /// device that rotates, the answers to its rotation's requests.
    pub fn handles(&self, topic: &str) -> bool {
        topic.starts_with(&self.prefix)
            || self.rotations.as_ref().is_some_and(|r| Rotation::is_answer(&r.template, topic))
    }

    /// StartNextPendingJobExecution: sent on connecting, and when `notify-next` names one.
    pub fn start_next(&mut self) -> Publish {
        let token = self.token();
        Publish {
            topic: format!("{}start-next", self.prefix),
            payload: json!({ "clientToken": token }).to_string(),
        }
    }

    fn token(&mut self) -> String {
        self.requests += 1;
        format!("{}-{}", self.thing, self.requests)
    }

    /// A message on one of [`Self::subscriptions`]; anything else, or a payload that is not
    /// the service's, is ignored.
    pub fn receive(&mut self, topic: &str, payload: &[u8]) -> Reaction {
        let Some(rest) = topic.strip_prefix(&self.prefix) else {
            return self.rotation_answer(topic, payload);
        };
        let Ok(text) = std::str::from_utf8(payload) else { return Reaction::default() };
        match rest {
            "notify-next" => match serde_json::from_str::<Notified>(text) {
                Ok(Notified { execution: Some(_) }) => Reaction::publish(self.start_next()),
                _ => Reaction::default(),
            },
            "start-next/accepted" => match serde_json::from_str::<Started>(text) {
                Ok(Started { execution: Some(e) }) => self.run(&e),
                _ => Reaction::default(),
            },
            _ if rest.ends_with("/update/rejected") => {
                self.updates_refused += 1;
                Reaction::default()
            }
            _ => Reaction::default(),
        }
    }

    fn run(&mut self, e: &Execution) -> Reaction {
        if !JobId::is_valid(&e.job_id) {
            return Reaction::default();
        }
        if let Some((job, update)) = &self.answered {
            if *job == e.job_id {
                return Reaction::publish(update.clone());
            }
        }
        let document = e.job_document.map_or("null", RawValue::get);
        let rotate = serde_json::from_str::<Document>(document)
            .is_ok_and(|d| d.operation.as_ref().and_then(Value::as_str) == Some(ROTATE_OPERATION));
        if rotate && self.rotations.is_some() {
            return self.rotate(e);
        }
        let outcome = run_job(document, &self.device, &self.trusted, |m| Ok(demo_image(m.class(), m.fw())));
        let install = match outcome.action {
            Action::Install { fw } => {
                self.installed += 1;
                self.device.fw.clone_from(&fw);
                Some(fw)
            }
            Action::Nothing => {
                match (outcome.update.status, outcome.update.reason) {
                    (OtaStatus::Succeeded, _) => self.already_installed += 1,
                    (OtaStatus::Rejected, Some(r)) => *self.rejected.entry(r).or_default() += 1,
                    (OtaStatus::Failed, Some(r)) => *self.failed.entry(r).or_default() += 1,
                    (_, None) => {}
                }
                None
            }
        };
        let update = self.update(&e.job_id, e.version_number, &outcome.update);
        Reaction { install, publish: Some(update), ..Reaction::default() }
    }

    /// The UpdateJobExecution request answering `job`, remembered to be sent again if the job
    /// comes back.
    fn update(&mut self, job: &str, version: Option<u64>, update: &JobUpdate) -> Publish {
        let token = self.token();
        let update = Publish {
            topic: format!("{}{job}/update", self.prefix),
            payload: update.request(version, &token).to_string(),
        };
        self.answered = Some((job.to_owned(), update.clone()));
        update
    }

    /// A rotation job started (or back after the device reconnected with its new certificate).
    fn rotate(&mut self, e: &Execution) -> Reaction {
        let Some(r) = self.rotations.as_mut() else { return Reaction::default() };
        if let Some((_, new)) = r.done.as_ref().filter(|(job, _)| *job == e.job_id) {
            if r.session.as_deref().is_some_and(|s| s != new.certificate_id) {
                // Still on the old certificate: connect with the new one first.
                return Reaction { rotate: Some(new.clone()), ..Reaction::default() };
            }
            // Back on the new certificate: now the rotation is done.
            let details = BTreeMap::from([
                ("result".to_owned(), ROTATED.to_owned()),
                ("certificate".to_owned(), new.certificate_id.clone()),
            ]);
            let done = JobUpdate { status: OtaStatus::Succeeded, reason: None, details };
            return Reaction::publish(self.update(&e.job_id, e.version_number, &done));
        }
        // The job again while its rotation is under way on this session (IoT Jobs notifies the
        // execution in progress too): it goes on. On a later session, the answer it waits for
        // was lost with the connection it asked on (IoT Core answers that connection only), so
        // it starts over with a new key; the certificate asked for before is never registered.
        if r.current.as_ref().is_some_and(|(job, _, _, asked_on)| *job == e.job_id && *asked_on == r.sessions)
        {
            return Reaction::default();
        }
        let key = match rcgen::KeyPair::generate() {
            Ok(key) => key,
            Err(err) => {
                r.current = None;
                let update =
                    JobUpdate::refused(OtaStatus::Failed, ROTATION_REFUSED, format!("no key: {err}"));
                *self.failed.entry(ROTATION_REFUSED).or_default() += 1;
                return Reaction::publish(self.update(&e.job_id, e.version_number, &update));
            }
        };
        match Rotation::start(&self.thing, &r.template, key) {
            Ok((rotation, step)) => {
                r.current = Some((e.job_id.clone(), e.version_number, rotation, r.sessions));
                self.rotation_step(step)
            }
            Err(err) => {
                let update =
                    JobUpdate::refused(OtaStatus::Failed, ROTATION_REFUSED, format!("no key: {err}"));
                *self.failed.entry(ROTATION_REFUSED).or_default() += 1;
                Reaction::publish(self.update(&e.job_id, e.version_number, &update))
            }
        }
    }

    /// An answer to the rotation in flight, if any.
    fn rotation_answer(&mut self, topic: &str, payload: &[u8]) -> Reaction {
        let step = match self.rotations.as_mut().and_then(|r| r.current.as_mut()) {
            Some((_, _, rotation, _)) => rotation.receive(topic, payload),
            None => return Reaction::default(),
        };
        self.rotation_step(step)
    }

    fn rotation_step(&mut self, step: Step) -> Reaction {
        match step {
            Step::Ask { topic, payload } => Reaction::publish(Publish { topic, payload }),
            Step::Ignore => Reaction::default(),
            Step::Rotated(new) => {
                let Some(r) = self.rotations.as_mut() else { return Reaction::default() };
                let Some((job, _, _, _)) = r.current.take() else { return Reaction::default() };
                r.done = Some((job, new.clone()));
                self.rotated += 1;
                Reaction { rotate: Some(new), ..Reaction::default() }
            }
            Step::Refused(detail) => {
                let Some((job, version, _, _)) = self.rotations.as_mut().and_then(|r| r.current.take())
                else {
                    return Reaction::default();
                };
                *self.failed.entry(ROTATION_REFUSED).or_default() += 1;
                let update = JobUpdate::refused(OtaStatus::Failed, ROTATION_REFUSED, detail);
                Reaction::publish(self.update(&job, version, &update))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ota::engine::job_document;
    use crate::ota::manifest::{ManifestSigner, UnsignedManifest};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const URL: &str = "https://firmware.example.com/sensor/1.5.0.bin";

    fn signer(seed: u8, kid: &str) -> Result<ManifestSigner, Box<dyn std::error::Error>> {
        Ok(ManifestSigner::from_bytes(kid, &[seed; 32])?)
    }

    /// A device trusting `fw1` (seed 1).
    fn trusted() -> Result<ManifestVerifier, Box<dyn std::error::Error>> {
        let key = signer(1, "fw1")?;
        Ok(ManifestVerifier::new(vec![(key.kid().to_owned(), key.verifying_key())]))
    }

    fn sensor(fw: &str, battery: Option<f64>) -> DeviceFirmware {
        DeviceFirmware {
            class: "sensor".into(),
            fw: fw.into(),
            battery_pct: battery,
            min_battery_pct: DEFAULT_MIN_BATTERY_PCT,
        }
    }

    /// The job document of `fw` for `class` over `image`, signed by `key`.
    fn job(
        key: &ManifestSigner,
        class: &str,
        fw: &str,
        image: &[u8],
    ) -> Result<String, Box<dyn std::error::Error>> {
        let manifest = key.sign(UnsignedManifest::for_image(fw, class, URL, image))?;
        Ok(job_document("c1", &manifest).to_string())
    }

    fn demo(m: &FirmwareManifest) -> Result<Vec<u8>, DownloadFailed> {
        Ok(demo_image(m.class(), m.fw()))
    }

    /// (status, reason, action) of an outcome.
    fn summary(o: &Outcome) -> (OtaStatus, Option<&str>, &Action) {
        (o.update.status, o.update.details.get("reason").map(String::as_str), &o.action)
    }

    #[test]
    fn installs_a_signed_image_for_its_class_and_reports_the_new_firmware() -> TestResult {
        // GIVEN a sensor on 1.4.2 and a job for sensor firmware 1.5.0 signed by a trusted key
        let doc = job(&signer(1, "fw1")?, "sensor", "1.5.0", &demo_image("sensor", "1.5.0"))?;

        // WHEN it runs the job
        let outcome = run_job(&doc, &sensor("1.4.2", Some(80.0)), &trusted()?, demo);

        // THEN it installs 1.5.0 and reports SUCCEEDED with the firmware it now runs
        assert_eq!(outcome.action, Action::Install { fw: "1.5.0".into() });
        assert_eq!(outcome.update.status, OtaStatus::Succeeded);
        assert_eq!(
            outcome.update.details,
            BTreeMap::from([("fw".into(), "1.5.0".into()), ("result".into(), "installed".into())])
        );
        Ok(())
    }

    #[test]
    fn rejects_a_manifest_signed_by_a_key_it_does_not_trust() -> TestResult {
        // GIVEN jobs signed by an impostor calling its key fw1, and by an unknown key fw9
        let image = demo_image("sensor", "1.5.0");
        let forged = job(&signer(9, "fw1")?, "sensor", "1.5.0", &image)?;
        let unknown = job(&signer(9, "fw9")?, "sensor", "1.5.0", &image)?;

        // WHEN the device runs them
        let device = sensor("1.4.2", Some(80.0));
        let outcomes = [&forged, &unknown].map(|doc| run_job(doc, &device, &trusted().expect("key"), demo));

        // THEN both are refused with the manifest's codes, and nothing is installed
        assert_eq!(summary(&outcomes[0]), (OtaStatus::Rejected, Some("bad_signature"), &Action::Nothing));
        assert_eq!(summary(&outcomes[1]), (OtaStatus::Rejected, Some("unknown_kid"), &Action::Nothing));
        assert_eq!(outcomes[1].update.reason, Some("unknown_kid"));
        Ok(())
    }

    #[test]
    fn rejects_firmware_signed_for_another_class() -> TestResult {
        // GIVEN a trusted job for gateway firmware
        let doc = job(&signer(1, "fw1")?, "gateway", "1.5.0", &demo_image("gateway", "1.5.0"))?;

        // WHEN a sensor runs it
        let outcome = run_job(&doc, &sensor("1.4.2", Some(80.0)), &trusted()?, demo);

        // THEN it refuses it as another class's
        assert_eq!(summary(&outcome), (OtaStatus::Rejected, Some("class_mismatch"), &Action::Nothing));
        assert!(outcome.update.details["detail"].contains("gateway"), "{:?}", outcome.update);
        Ok(())
    }

    #[test]
    fn rejects_an_install_on_a_low_battery_but_not_without_a_battery() -> TestResult {
        // GIVEN a trusted job for 1.5.0
        let doc = job(&signer(1, "fw1")?, "sensor", "1.5.0", &demo_image("sensor", "1.5.0"))?;

        // WHEN a sensor at 12 % runs it, and one on mains power
        let low = run_job(&doc, &sensor("1.4.2", Some(12.0)), &trusted()?, demo);
        let mains = run_job(&doc, &sensor("1.4.2", None), &trusted()?, demo);

        // THEN the first refuses for its battery; the second installs
        assert_eq!(summary(&low), (OtaStatus::Rejected, Some("battery_low"), &Action::Nothing));
        assert_eq!(mains.action, Action::Install { fw: "1.5.0".into() });
        Ok(())
    }

    #[test]
    fn fails_an_image_that_is_not_the_one_the_manifest_describes() -> TestResult {
        // GIVEN trusted manifests over another image of the same size, and of another size
        let key = signer(1, "fw1")?;
        let other = job(&key, "sensor", "1.5.0", &demo_image("sensor", "1.5.1"))?;
        let shorter = job(&key, "sensor", "1.5.0", &demo_image("sensor", "1.5.0")[1..])?;

        // WHEN the device downloads the released 1.5.0 image for each, and when the download fails
        let device = sensor("1.4.2", Some(80.0));
        let digest = run_job(&other, &device, &trusted()?, demo);
        let size = run_job(&shorter, &device, &trusted()?, demo);
        let offline =
            run_job(&other, &device, &trusted()?, |_| Err(DownloadFailed("connection refused".into())));

        // THEN each fails with its code and nothing is installed
        assert_eq!(summary(&digest), (OtaStatus::Failed, Some("digest_mismatch"), &Action::Nothing));
        assert_eq!(summary(&size), (OtaStatus::Failed, Some("size_mismatch"), &Action::Nothing));
        assert_eq!(summary(&offline), (OtaStatus::Failed, Some("download_failed"), &Action::Nothing));
        assert!(offline.update.details["detail"].contains("connection refused"));
        Ok(())
    }

    #[test]
    fn succeeds_without_installing_the_firmware_it_already_runs_even_on_a_low_battery() -> TestResult {
        // GIVEN a sensor on 1.4.2 at 5 %, and a rollback job to 1.4.2 whose image it never fetches
        let doc = job(&signer(1, "fw1")?, "sensor", "1.4.2", &demo_image("sensor", "1.4.2"))?;
        let mut fetched = false;

        // WHEN it runs the job
        let outcome = run_job(&doc, &sensor("1.4.2", Some(5.0)), &trusted()?, |m| {
            fetched = true;
            demo(m)
        });

        // THEN it reports SUCCEEDED as already installed, without downloading or installing
        assert_eq!(summary(&outcome), (OtaStatus::Succeeded, None, &Action::Nothing));
        assert_eq!(
            outcome.update.details,
            BTreeMap::from([("fw".into(), "1.4.2".into()), ("result".into(), "already_installed".into())])
        );
        assert!(!fetched);
        Ok(())
    }

    #[test]
    fn rejects_documents_that_are_not_ota_jobs_or_carry_no_valid_manifest() -> TestResult {
        // GIVEN a valid document, and documents broken in one way each
        let valid: Value = serde_json::from_str(&job(
            &signer(1, "fw1")?,
            "sensor",
            "1.5.0",
            &demo_image("sensor", "1.5.0"),
        )?)?;
        let text = valid.to_string();
        let with = |key: &str, v: Value| {
            let mut d = valid.clone();
            d[key] = v;
            d.to_string()
        };
        let mut bad_size = valid.clone();
        bad_size["manifest"]["size"] = json!(0);
        let cases: Vec<(&str, String, &str)> = vec![
            ("another operation", with("operation", json!("install")), "unsupported_operation"),
            ("an operation that is no string", with("operation", json!(7)), "unsupported_operation"),
            ("no operation", r#"{"manifest":{}}"#.into(), "unsupported_operation"),
            ("no manifest", r#"{"operation":"fleetline.ota"}"#.into(), "malformed_document"),
            ("a null manifest", with("manifest", Value::Null), "malformed_document"),
            ("a manifest that is a string", with("manifest", json!("{}")), "malformed_document"),
            ("a broken manifest field", bad_size.to_string(), "malformed_document"),
            (
                "operation twice",
                text.replacen('{', r#"{"operation":"fleetline.ota","#, 1),
                "malformed_document",
            ),
            (
                "manifest twice, once escaped",
                text.replacen('{', r#"{"m\u0061nifest":{},"#, 1),
                "malformed_document",
            ),
            ("not JSON", "fleetline.ota".into(), "malformed_document"),
            ("an array", format!("[{text}]"), "malformed_document"),
            ("null (no document)", "null".into(), "malformed_document"),
        ];

        // WHEN the device runs each
        let device = sensor("1.4.2", Some(80.0));
        let got: Vec<(&str, Option<&str>, OtaStatus, Action)> = cases
            .iter()
            .map(|(case, doc, _)| {
                let o = run_job(doc, &device, &trusted().expect("key"), demo);
                (*case, o.update.reason, o.update.status, o.action)
            })
            .collect();

        // THEN each is REJECTED with its reason and nothing is installed
        let expected: Vec<(&str, Option<&str>, OtaStatus, Action)> = cases
            .iter()
            .map(|(case, _, reason)| (*case, Some(*reason), OtaStatus::Rejected, Action::Nothing))
            .collect();
        assert_eq!(got, expected);
        Ok(())
    }

    #[test]
    fn status_details_stay_within_what_update_job_execution_accepts() -> TestResult {
        // GIVEN documents whose refusals quote long and control-character-laden input
        let long = format!("{{\"operation\":\"{}\"}}", "x\n".repeat(2_000));
        let garbage = "\u{7}".repeat(3_000);

        // WHEN a device runs them
        let device = sensor("1.4.2", Some(80.0));
        let outcomes = [&long, &garbage].map(|doc| run_job(doc, &device, &trusted().expect("key"), demo));

        // THEN every detail is 1-1024 characters without a control character
        for o in &outcomes {
            for (k, v) in &o.update.details {
                let n = v.chars().count();
                assert!((1..=1024).contains(&n) && !v.chars().any(char::is_control), "{k}: {v:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn demo_images_are_fixed_size_deterministic_and_distinct_per_class_and_firmware() {
        let a = demo_image("sensor", "1.5.0");
        assert_eq!(a.len(), DEMO_IMAGE_BYTES);
        assert_eq!(a, demo_image("sensor", "1.5.0"));
        assert_ne!(a, demo_image("sensor", "1.5.1"));
        assert_ne!(a, demo_image("gateway", "1.5.0"));
        // The labels are length-prefixed: moving a character between them is another image.
        assert_ne!(demo_image("ab", "c"), demo_image("a", "bc"));
    }

    /// The Jobs service's `start-next/accepted` answer for `job` at `version`.
    fn started(job: &str, version: u64, document: &str) -> String {
        format!(
            r#"{{"timestamp":1,"execution":{{"jobId":"{job}","thingName":"sensor-1","status":"IN_PROGRESS","versionNumber":{version},"executionNumber":1,"jobDocument":{document}}}}}"#
        )
    }

    #[test]
    fn a_simulated_device_starts_the_job_it_is_told_of_installs_and_answers_once() -> TestResult {
        // GIVEN a simulated sensor on 1.4.2
        let mut device = SimulatedJobs::new("sensor-1", sensor("1.4.2", Some(80.0)), trusted()?);
        let prefix = "$aws/things/sensor-1/jobs";
        assert!(device.subscriptions().contains(&format!("{prefix}/+/update/rejected")));
        let doc = job(&signer(1, "fw1")?, "sensor", "1.5.0", &demo_image("sensor", "1.5.0"))?;

        // WHEN notify-next names an execution
        let told = device
            .receive(&format!("{prefix}/notify-next"), br#"{"timestamp":1,"execution":{"jobId":"c1-s1"}}"#);
        // THEN it asks to start its next execution
        let ask = told.publish.ok_or("no start-next")?;
        assert_eq!((ask.topic.as_str(), told.install), ("$aws/things/sensor-1/jobs/start-next", None));

        // WHEN the execution is started with the job document
        let answer =
            device.receive(&format!("{prefix}/start-next/accepted"), started("c1-s1", 2, &doc).as_bytes());
        // THEN it installs 1.5.0 and reports SUCCEEDED on the job's update topic, at the
        // version it started
        assert_eq!(answer.install.as_deref(), Some("1.5.0"));
        let update = answer.publish.ok_or("no update")?;
        assert_eq!(update.topic, "$aws/things/sensor-1/jobs/c1-s1/update");
        let body: Value = serde_json::from_str(&update.payload)?;
        assert_eq!(
            (&body["status"], &body["statusDetails"], &body["expectedVersion"]),
            (&json!("SUCCEEDED"), &json!({"fw": "1.5.0", "result": "installed"}), &json!(2))
        );
        assert_eq!((device.fw(), device.installed), ("1.5.0", 1));

        // WHEN the same execution comes back before the update landed, and the update is refused
        let again =
            device.receive(&format!("{prefix}/start-next/accepted"), started("c1-s1", 2, &doc).as_bytes());
        device.receive(&format!("{prefix}/c1-s1/update/rejected"), br#"{"code":"InvalidStateTransition"}"#);
        // THEN the same update is sent again, nothing is installed or counted twice
        assert_eq!(again, Reaction::publish(update));
        assert_eq!((device.installed, device.already_installed, device.updates_refused), (1, 0, 1));
        Ok(())
    }

    #[test]
    fn a_simulated_device_counts_refusals_and_ignores_what_is_not_for_it() -> TestResult {
        // GIVEN a simulated sensor, and a job signed by a key it does not trust
        let mut device = SimulatedJobs::new("sensor-1", sensor("1.4.2", Some(80.0)), trusted()?);
        let prefix = "$aws/things/sensor-1/jobs";
        let forged = job(&signer(9, "fw1")?, "sensor", "1.5.0", &demo_image("sensor", "1.5.0"))?;

        // WHEN it is started, then messages arrive that carry no job or are not the service's
        let refused =
            device.receive(&format!("{prefix}/start-next/accepted"), started("j1", 2, &forged).as_bytes());
        let ignored = [
            device.receive(&format!("{prefix}/notify-next"), br#"{"timestamp":1}"#),
            device.receive(&format!("{prefix}/start-next/accepted"), br#"{"timestamp":1}"#),
            device.receive(&format!("{prefix}/start-next/accepted"), b"\xff{"),
            device.receive(&format!("{prefix}/start-next/accepted"), started("j/2", 2, "{}").as_bytes()),
            device.receive("$aws/things/sensor-2/jobs/notify-next", br#"{"execution":{}}"#),
        ];

        // THEN the forged job is REJECTED and counted by reason; the rest change nothing
        let body: Value = serde_json::from_str(&refused.publish.ok_or("no update")?.payload)?;
        assert_eq!(
            (&body["status"], &body["statusDetails"]["reason"]),
            (&json!("REJECTED"), &json!("bad_signature"))
        );
        assert_eq!(refused.install, None);
        assert_eq!(ignored, std::array::from_fn(|_| Reaction::default()));
        assert_eq!(device.rejected, BTreeMap::from([("bad_signature", 1)]));
        assert_eq!((device.fw(), device.installed), ("1.4.2", 0));
        Ok(())
    }

    /// `start-next/accepted` handing `thing` the rotation job `job` of campaign c1.
    fn started_rotation(job: &str) -> (String, Vec<u8>) {
        let body = json!({"execution": {"jobId": job, "versionNumber": 1,
                          "jobDocument": crate::ota::engine::rotation_document("c1")}});
        ("$aws/things/sensor-1/jobs/start-next/accepted".to_owned(), body.to_string().into_bytes())
    }

    #[test]
    fn a_rotation_starts_over_when_its_job_comes_back_and_is_reported_only_from_the_new_certificate(
    ) -> TestResult {
        // GIVEN a sensor that rotates, on certificate old-1, handed a rotation job
        let mut jobs =
            SimulatedJobs::new("sensor-1", sensor("1.4.2", Some(80.0)), trusted()?).with_rotation("fleet");
        jobs.connected_with("old-1");
        let (topic, body) = started_rotation("rot-s1");
        let first = jobs.receive(&topic, &body).publish.ok_or("no CSR request")?;
        assert_eq!(first.topic, crate::ota::rotate::CREATE_FROM_CSR_TOPIC);
        // WHEN the job is handed again on the same session, THEN the rotation goes on
        assert_eq!(jobs.receive(&topic, &body), Reaction::default());
        // WHEN the connection drops before the answer, and the job comes back on the next one
        jobs.connected_with("old-1");
        let again = jobs.receive(&topic, &body).publish.ok_or("no new CSR request")?;
        // THEN it asks again, for a new key
        assert_eq!(again.topic, first.topic);
        assert_ne!(again.payload, first.payload, "a new key, a new CSR");
        // WHEN its certificate comes and is registered
        let key = jobs
            .rotations
            .as_ref()
            .and_then(|r| r.current.as_ref())
            .map(|(_, _, r, _)| r.key())
            .ok_or("key")?;
        let pem = rcgen::CertificateParams::new(vec!["sensor-1".to_owned()])?.self_signed(key)?.pem();
        let created =
            json!({"certificateId": "new-1", "certificatePem": pem, "certificateOwnershipToken": "t"});
        let register = jobs.receive(
            &format!("{}/accepted", crate::ota::rotate::CREATE_FROM_CSR_TOPIC),
            created.to_string().as_bytes(),
        );
        let register = register.publish.ok_or("no RegisterThing")?;
        let done = jobs.receive(&format!("{}/accepted", register.topic), br#"{"thingName":"sensor-1"}"#);
        // THEN it hands over the new credentials, and reports nothing yet
        assert_eq!(done.rotate.as_ref().map(|n| n.certificate_id.as_str()), Some("new-1"));
        assert!(done.publish.is_none());
        // WHEN the job comes back on a session still on the old certificate, THEN it is told
        // to connect with the new one again; on the new one, it reports SUCCEEDED
        let stale = jobs.receive(&topic, &body);
        assert!(stale.publish.is_none() && stale.rotate.is_some(), "{stale:?}");
        jobs.connected_with("new-1");
        let update = jobs.receive(&topic, &body).publish.ok_or("no update")?;
        let update: Value = serde_json::from_str(&update.payload)?;
        assert_eq!(update["status"], "SUCCEEDED");
        assert_eq!(update["statusDetails"], json!({"result": "rotated", "certificate": "new-1"}));
        assert_eq!(jobs.rotated, 1);
        Ok(())
    }
}
