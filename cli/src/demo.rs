//! `fleetctl demo`: the local stack plus simulated devices as real MQTT clients, a live
//! progress line, and a report whose counts must reconcile: every message a device
//! published (and the broker acknowledged) is stored, absorbed as a duplicate, or quarantined.
//! Devices publish the ways real fleets do, a quarter each: v1 one reading per message, v2
//! one reading per message, v2 packs of `--pack` readings, and v1 through Basic Ingest
//! (`$aws/rules/<telemetry rule>/dt/fleet/<thing>/telemetry`, not billed as messaging).
//!
//! With `--provision`, devices start with only the fleet's provisioning claim: their serials
//! go on the allowlist (as an operator puts them there), and each device, as its claim holder,
//! asks for keys and a certificate (CreateKeysAndCertificate), registers its thing
//! (RegisterThing, which the pre-provisioning hook allows), then connects with its new
//! certificate (MQTT username `cert/<id>`) and publishes as that thing. Devices provision one
//! at a time: the local IoT Core answers every subscribed claim holder, not only the asker.
//!
//! Devices take OTA jobs over IoT Jobs' device API as real ones do
//! ([`fleet_shared::ota::device`]): told on `notify-next` (and asking `start-next` when they
//! connect), they check the job's manifest under the local firmware key (`<db>.firmware-key`)
//! and the synthetic image ([`demo_image`]), then install it, rebooting on the new firmware
//! (their telemetry and shadow then report it, as that firmware's devices do), or refuse it,
//! and answer the execution. With `--ota FROM:TO` the demo also creates a campaign per class of
//! the devices on FROM, and runs the local ota-orchestrator every `--ota-every` (15 s) while
//! devices publish, so stage 1 goes out during the demo (0s leaves it to the 5-minute schedule).
//!
//! With `--rotate` (which implies `--provision`) the local IoT Core issues certificates valid
//! [`ROTATE_VALIDITY_DAYS`] days (unless `FLEET_LOCAL_CERT_VALIDITY_DAYS` says otherwise), so
//! once every device has provisioned, the daily expiry check (run then by the demo) finds them
//! inside its 30-day threshold and marks them `rotation_due`; the demo then creates a
//! certificate rotation campaign per class and firmware, ticked as `--ota`'s are. Each device
//! told to rotate makes a new key, gets a certificate for it over its own connection
//! (CreateCertificateFromCsr, RegisterThing), reconnects with it once nothing it published is
//! awaiting an acknowledgement, and reports the job done from the new session.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fleet_shared::commands::sim::{Action, SimulatedCommands};
use fleet_shared::commands::{request_topic, CommandStatus, CommandVerifier, ReplayState, VerifierConfig};
use fleet_shared::ingest::sim::{firmware, thing_name, DeviceSim, Quirks};
use fleet_shared::model::{validate_label, AllowlistEntry, DeviceRegistration, Enrolment, ThingName};
use fleet_shared::ota::campaign::{Campaign, CampaignSpec, Preconditions};
use fleet_shared::ota::device::{
    demo_image, DeviceFirmware, Publish, SimulatedJobs, DEFAULT_MIN_BATTERY_PCT,
};
use fleet_shared::ota::manifest::{ManifestSigner, ManifestVerifier, UnsignedManifest};
use fleet_shared::ports::{Allowlist, CampaignStore, CommandStore, DeviceAdmin, TwinStore};
use fleet_shared::{time, ErrorKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;

use fleet_local::broker::CERTIFICATE_USERNAME_PREFIX;
use fleet_local::provisioning::{provision_topic, CREATE_TOPIC, VALIDITY_VARIABLE};
use fleet_local::rules::BASIC_INGEST_PREFIX;
use fleet_local::{LocalOptions, LocalStack};

const CLASSES: [&str; 3] = ["env-sensor", "air-quality", "gateway"];
const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
/// The topic filter of the telemetry rule, whose Basic Ingest topic some devices use.
const TELEMETRY_TOPIC_FILTER: &str = "dt/fleet/+/telemetry";
/// How long the report waits for the pipeline to settle what was acknowledged.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The template's logical id of the function that ticks OTA campaigns.
const OTA_ORCHESTRATOR: &str = "OtaOrchestratorFunction";
/// How long a device waits for each provisioning answer.
const PROVISIONING_TIMEOUT: Duration = Duration::from_secs(10);
/// The template's logical id of the daily certificate expiry check.
const CERT_EXPIRY_CHECK: &str = "CertExpiryCheckFunction";
/// `--rotate`: the validity of the certificates devices provision with, inside the expiry
/// check's default 30-day threshold.
pub const ROTATE_VALIDITY_DAYS: &str = "20";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: usize,
    pub duration: Duration,
    /// Messages per second per device.
    pub rate: f64,
    /// Readings per message for the devices that send v2 packs.
    pub pack: usize,
    pub keep_running: bool,
    pub seed: u64,
    pub quirks: Quirks,
    /// `--provision`: devices start with the claim and provision themselves.
    pub provision: bool,
    /// `--ota FROM:TO`: create a campaign per class of the devices on FROM.
    pub ota: Option<OtaUpgrade>,
    /// `--ota-every`: how often the demo ticks the campaigns (zero: never, the schedule does).
    pub ota_every: Duration,
    /// `--rotate`: rotate the devices' certificates once they have provisioned (see the module
    /// docs); needs `provision`.
    pub rotate: bool,
}

/// `--ota FROM:TO`: the firmware a campaign takes the demo's devices from, and to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtaUpgrade {
    pub from_fw: String,
    pub to_fw: String,
}

impl OtaUpgrade {
    /// `FROM:TO`, two different firmware labels.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (from_fw, to_fw) =
            text.split_once(':').ok_or_else(|| format!("{text:?}: expected FROM:TO, e.g. 1.4.2:1.5.0"))?;
        validate_label("firmware", from_fw).map_err(|e| e.to_string())?;
        validate_label("firmware", to_fw).map_err(|e| e.to_string())?;
        if from_fw == to_fw {
            return Err(format!("{text:?}: FROM and TO are the same firmware"));
        }
        Ok(Self { from_fw: from_fw.to_owned(), to_fw: to_fw.to_owned() })
    }
}

/// What the devices did with OTA jobs (summed from each device's [`SimulatedJobs`]).
#[derive(Default)]
struct OtaCounts {
    installed: u64,
    already_installed: u64,
    rejected: BTreeMap<&'static str, u64>,
    failed: BTreeMap<&'static str, u64>,
    updates_refused: u64,
}

#[derive(Default)]
struct Counters {
    provisioned: AtomicU64,
    /// Devices that gave up provisioning.
    provision_failed: AtomicU64,
    /// Devices that connected with the certificate a rotation gave them.
    rotated: AtomicU64,
    published: AtomicU64,
    acked: AtomicU64,
    connection_errors: AtomicU64,
    /// Signed commands the devices obeyed, and refused by reason (a replay, a bad signature).
    commands_obeyed: AtomicU64,
    commands_refused: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    ota: Mutex<OtaCounts>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub devices: usize,
    /// Devices that provisioned themselves by claim (`--provision`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provisioned: Option<u64>,
    pub duration_s: f64,
    pub rate_per_device: f64,
    pub published: u64,
    pub stored: u64,
    /// Readings in the stored messages (a pack holds several).
    pub readings: u64,
    pub duplicates: u64,
    pub quarantined: u64,
    pub quarantined_by_reason: std::collections::BTreeMap<String, u64>,
    pub dead_lettered: u64,
    pub reconciled: bool,
    /// Published messages over the whole run, including ramp-up and the final drain.
    pub throughput_msgs_per_s: f64,
    /// The lowest settled-messages rate over any full 10 s window while devices published.
    pub sustained_msgs_per_s: Option<f64>,
    pub telemetry_freshness: f64,
    /// Desired writes the operator sent through the shadows.
    pub desired_writes: usize,
    /// Twins whose desired state is not reported (the desired firmware awaits OTA).
    pub twins_drifting: usize,
    /// Signed commands the operator sent (a ping to each of the first devices), the devices
    /// obeyed, the acks that settled them, and the commands devices refused, by reason.
    pub commands_sent: usize,
    pub commands_obeyed: u64,
    pub commands_settled: usize,
    pub commands_refused: std::collections::BTreeMap<String, u64>,
    /// OTA job executions the devices answered: firmware installed, already running the
    /// firmware (succeeded without installing), refused (REJECTED) and failed by reason, and
    /// answers the Jobs service refused (the job was cancelled meanwhile).
    pub ota_installed: u64,
    pub ota_already_installed: u64,
    pub ota_rejected: BTreeMap<String, u64>,
    pub ota_failed: BTreeMap<String, u64>,
    pub ota_updates_refused: u64,
    /// Devices that rotated their certificate (`--rotate`) and connected with the new one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificates_rotated: Option<u64>,
    /// Campaigns `--ota` created (or found from an earlier demo on the same database).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ota_campaigns: Vec<String>,
    /// Where each of them stands when the demo ends: its state, and devices targeted of its
    /// population.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ota_campaign_states: BTreeMap<String, String>,
    /// Times the demo ran the ota-orchestrator (`--ota-every`).
    pub ota_ticks: u64,
    /// Devices by the firmware their newest stored telemetry reports.
    pub firmware_reported: BTreeMap<String, u64>,
    pub latency_p50_ms: Option<u32>,
    pub latency_p99_ms: Option<u32>,
    pub dashboard: String,
}

fn class_and_region(i: usize) -> (&'static str, &'static str) {
    (CLASSES[i % CLASSES.len()], REGIONS[(i / CLASSES.len()) % REGIONS.len()])
}

async fn register(stack: &LocalStack, devices: usize) -> Result<()> {
    let now = time::now_ms();
    let regs: Vec<(ThingName, DeviceRegistration)> = (0..devices)
        .map(|i| {
            let (class, region) = class_and_region(i);
            let reg = DeviceRegistration {
                class: class.into(),
                region: region.into(),
                fw: if i % 2 == 0 { "1.4.2".into() } else { "2.0.1".into() },
                registered_at_ms: now,
            };
            Ok((ThingName::parse(&fleet_shared::ingest::sim::thing_name(i))?, reg))
        })
        .collect::<Result<_>>()?;
    stack.store.register(&regs).await?;
    Ok(())
}

/// Put the devices' serials on the provisioning allowlist, with their class and region.
async fn allow(stack: &LocalStack, devices: usize) -> Result<()> {
    let now = time::now_ms();
    let entries: Vec<AllowlistEntry> = (0..devices)
        .map(|i| {
            let (class, region) = class_and_region(i);
            Ok(AllowlistEntry {
                serial: ThingName::parse(&fleet_shared::ingest::sim::thing_name(i))?,
                class: class.into(),
                region: region.into(),
                added_ms: now,
                enrolment: Enrolment::Allowed,
            })
        })
        .collect::<Result<_>>()?;
    stack.store.allow(&entries).await?;
    Ok(())
}

/// What devices need to provision: the claim they hold and the template they address.
#[derive(Clone)]
struct Claim {
    username: String,
    template: String,
    /// One device provisions at a time (answers go to every subscribed claim holder).
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

impl Claim {
    fn of(stack: &LocalStack) -> Result<Self> {
        let provisioning =
            stack.provisioning.as_ref().context("the template has no provisioning template")?;
        let template = stack.template.provisioning.first().context("no provisioning template")?.name.clone();
        Ok(Claim {
            username: format!("{}{}", fleet_local::broker::CERTIFICATE_USERNAME_PREFIX, provisioning.claim),
            template,
            one_at_a_time: Arc::default(),
        })
    }

    /// Provision `thing` as its claim holder: CreateKeysAndCertificate, then RegisterThing
    /// with the serial and firmware; the MQTT username of the new certificate.
    async fn provision(&self, mqtt: std::net::SocketAddr, thing: &str, fw: &str) -> Result<String> {
        let _turn = self.one_at_a_time.lock().await;
        let client_id = format!("{}{thing}", fleet_shared::certs::hook::CLAIM_CLIENT_PREFIX);
        let mut opts = MqttOptions::new(client_id, mqtt.ip().to_string(), mqtt.port());
        opts.set_credentials(self.username.clone(), "");
        let (client, mut events) = AsyncClient::new(opts, 16);
        let register = provision_topic(&self.template);
        client.subscribe(format!("{CREATE_TOPIC}/+"), QoS::AtLeastOnce).await?;
        client.subscribe(format!("{register}/+"), QoS::AtLeastOnce).await?;
        client.publish(CREATE_TOPIC, QoS::AtLeastOnce, false, "{}").await?;
        let created = tokio::time::timeout(PROVISIONING_TIMEOUT, answer(&mut events, CREATE_TOPIC)).await??;
        let request = serde_json::json!({
            "certificateOwnershipToken": created["certificateOwnershipToken"],
            "parameters": {"SerialNumber": thing, "Firmware": fw},
        });
        client.publish(register.as_str(), QoS::AtLeastOnce, false, request.to_string()).await?;
        tokio::time::timeout(PROVISIONING_TIMEOUT, answer(&mut events, &register)).await??;
        let _ = client.disconnect().await;
        // Until the connection is closed: the next device's claim session may listen for
        // answers only once this one is gone (the local IoT Core answers every listener).
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while events.poll().await.is_ok() {} })
            .await;
        let id = created["certificateId"].as_str().context("no certificateId")?;
        Ok(format!("{}{id}", fleet_local::broker::CERTIFICATE_USERNAME_PREFIX))
    }
}

/// What the operator wants of the fleet, through the devices' shadows (as `fleetctl twin set`
/// will): every 5th device in `eco` mode (devices obey), every 10th on firmware 2.1.0 (which
/// only an OTA campaign installs, so it stays a drift). Returns how many desired writes were sent.
async fn operator_desires(mqtt: std::net::SocketAddr, devices: usize) -> usize {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut opts = MqttOptions::new("demo-operator", mqtt.ip().to_string(), mqtt.port());
    opts.set_credentials(fleet_local::broker::OPERATOR_USERNAME, "");
    opts.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let poll = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let mut sent = 0;
    for i in (0..devices).step_by(5) {
        let mut desired = serde_json::json!({"mode": "eco"});
        if i % 10 == 0 {
            desired["fw"] = "2.1.0".into();
        }
        let topic = format!("$aws/things/{}/shadow/update", fleet_shared::ingest::sim::thing_name(i));
        let body = serde_json::json!({"state": {"desired": desired}, "clientToken": "demo-operator"});
        if client.publish(topic, QoS::AtLeastOnce, false, body.to_string()).await.is_ok() {
            sent += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poll).await;
    sent
}

/// How simulated device `i` publishes: its simulator and its topic.
fn device_kind(i: usize, opts: &DemoOptions, basic_ingest_rule: &str) -> (DeviceSim, String) {
    let sim = DeviceSim::new(i, opts.quirks, opts.seed);
    let topic = format!("dt/fleet/{}/telemetry", sim.thing);
    match i % 4 {
        1 => (sim, topic),
        3 => (sim.packing(opts.pack), topic),
        2 => (sim, format!("{BASIC_INGEST_PREFIX}{basic_ingest_rule}/{topic}")),
        _ => (sim, topic),
    }
}

/// The provisioning service's answer to a request on `topic`: its body if accepted.
async fn answer(events: &mut rumqttc::EventLoop, topic: &str) -> Result<serde_json::Value> {
    let prefix = format!("{topic}/");
    loop {
        match events.poll().await? {
            Event::Incoming(Packet::Publish(p)) if p.topic.starts_with(&prefix) => {
                let body: serde_json::Value = serde_json::from_slice(&p.payload)?;
                if p.topic.ends_with("/rejected") {
                    bail!("{topic} rejected: {body}");
                }
                return Ok(body);
            }
            Event::Incoming(Packet::SubAck(s))
                if s.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                bail!("the claim may not subscribe to the provisioning answers");
            }
            _ => {}
        }
    }
}

/// One simulated device: provision first if it holds only the claim, connect, sample at
/// `period` until `stop`, publish what the device sends (a pack goes out when full), then wait
/// for every ack. Meanwhile it obeys signed commands and takes OTA jobs, rotating its
/// certificate when one tells it to (then reconnecting with the new one).
///
/// After any reconnection (a rotation, a connection error) the new session is a clean one: the
/// device subscribes again and asks for its next job, and what it had published without an
/// acknowledgement yet goes out again first (rumqttc drops it on a clean session).
#[allow(clippy::too_many_arguments)]
async fn device(
    mut sim: DeviceSim,
    topic: String,
    mqtt: std::net::SocketAddr,
    period: Duration,
    offset: Duration,
    stop: Instant,
    counters: Arc<Counters>,
    claim: Option<Claim>,
    commands: SimulatedCommands,
    mut jobs: SimulatedJobs,
) {
    let mut opts = MqttOptions::new(sim.thing.clone(), mqtt.ip().to_string(), mqtt.port());
    // The certificate the current session authenticates with (a provisioned device's).
    let mut certificate: Option<String> = None;
    if let Some(claim) = claim {
        match claim.provision(mqtt, &sim.thing, firmware(sim.index)).await {
            Ok(username) => {
                counters.provisioned.fetch_add(1, Relaxed);
                certificate = username.strip_prefix(CERTIFICATE_USERNAME_PREFIX).map(str::to_owned);
                opts.set_credentials(username, "");
            }
            Err(e) => {
                counters.provision_failed.fetch_add(1, Relaxed);
                eprintln!("\n  {} did not provision: {e:#}", sim.thing);
                return;
            }
        }
    }
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let mine = Arc::new(AtomicU64::new(0));
    let acked = Arc::clone(&mine);
    let loop_counters = Arc::clone(&counters);
    // The device keeps its shadow: it reports its firmware and mode, and obeys a desired mode
    // (firmware changes only through OTA, so a desired firmware stays a drift). Shadow traffic
    // is QoS 0: only telemetry is acknowledged and counted.
    let shadow = format!("$aws/things/{}/shadow/update", sim.thing);
    let requests = request_topic(&sim.thing);
    // Shadow deltas, signed commands, and IoT Jobs' (and rotations') answers.
    let filters: Vec<(String, QoS)> =
        [(format!("{shadow}/delta"), QoS::AtMostOnce), (requests.clone(), QoS::AtLeastOnce)]
            .into_iter()
            .chain(jobs.subscriptions().into_iter().map(|f| (f, QoS::AtLeastOnce)))
            .collect();
    for (filter, qos) in &filters {
        let _ = client.subscribe(filter.clone(), *qos).await;
    }
    let reported = serde_json::json!({"state": {"reported": {"fw": firmware(sim.index), "mode": "normal"}}});
    let _ = client.publish(shadow.clone(), QoS::AtMostOnce, false, reported.to_string()).await;
    // Signed commands: verified, obeyed, acknowledged (fleet_shared::commands::sim).
    let commands = Arc::new(std::sync::Mutex::new(commands));
    let reboots = Arc::new(AtomicU64::new(0));
    let (device_commands, reboot_requests) = (Arc::clone(&commands), Arc::clone(&reboots));
    // OTA jobs over IoT Jobs' device API (fleet_shared::ota::device): the device asks for its
    // next job once connected (one queued while it was away is not announced again), then on
    // every notify-next. An install waits for the next sample: the device reboots on the new
    // firmware, then answers SUCCEEDED. Jobs traffic is QoS 0, like the shadow's.
    if let Some(c) = &certificate {
        jobs.connected_with(c);
    }
    let jobs = Arc::new(Mutex::new(jobs));
    let ask = jobs.lock().expect("lock").start_next();
    let _ = client.publish(ask.topic, QoS::AtMostOnce, false, ask.payload).await;
    let installs: Arc<Mutex<Option<Install>>> = Arc::default();
    let last_sent: Arc<Mutex<Vec<u8>>> = Arc::default();
    let (device_jobs, install_requests, sent) =
        (Arc::clone(&jobs), Arc::clone(&installs), Arc::clone(&last_sent));
    let responder = client.clone();
    let delta_shadow = shadow.clone();
    let events = tokio::spawn(async move {
        let mut connects = 0u32;
        // What the last connection left unsent or unacknowledged that a new one sends again.
        let mut carried: Vec<rumqttc::Request> = Vec::new();
        // A rotation's new certificate, used once nothing published awaits an acknowledgement
        // (a message stored but acknowledged on the old connection only would be counted twice),
        // and not once the demo is ending.
        let mut rotate_to: Option<String> = None;
        // The certificate before a rotation, until a session on the new one is up; and the
        // connection attempts the new one failed.
        let mut fallback: Option<(String, u32)> = None;
        loop {
            if rotate_to.is_some() && eventloop.state.inflight() == 0 && Instant::now() < stop {
                let new = rotate_to.take().unwrap_or_default();
                eventloop.mqtt_options.set_credentials(format!("{CERTIFICATE_USERNAME_PREFIX}{new}"), "");
                fallback = certificate.replace(new).map(|old| (old, 0));
                // Leave; the next poll connects with the new certificate.
                eventloop.clean();
                carried.extend(resendable(&mut eventloop.pending));
            }
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connects += 1;
                    if fallback.take().is_some() {
                        loop_counters.rotated.fetch_add(1, Relaxed);
                    }
                    // A clean session: subscribe again and ask for the next job, ahead of what
                    // the last connection left, which then follows in its order.
                    let mut first = Vec::new();
                    if connects > 1 {
                        let filters =
                            filters.iter().map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), *q));
                        first.push(rumqttc::Request::Subscribe(rumqttc::Subscribe::new_many(filters)));
                        let ask = {
                            let mut jobs = device_jobs.lock().expect("lock");
                            if let Some(c) = &certificate {
                                jobs.connected_with(c);
                            }
                            jobs.start_next()
                        };
                        let ask = rumqttc::Publish::new(ask.topic, QoS::AtMostOnce, ask.payload);
                        first.push(rumqttc::Request::Publish(ask));
                    }
                    for request in first.into_iter().chain(carried.drain(..)).rev() {
                        eventloop.pending.push_front(request);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked.fetch_add(1, Relaxed);
                    loop_counters.acked.fetch_add(1, Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == requests => {
                    let answer = device_commands.lock().expect("lock").receive(&p.payload, time::now_ms());
                    match answer.action {
                        Some(Action::Reboot) => {
                            reboot_requests.fetch_add(1, Relaxed);
                            loop_counters.commands_obeyed.fetch_add(1, Relaxed);
                        }
                        Some(Action::Ping) => {
                            loop_counters.commands_obeyed.fetch_add(1, Relaxed);
                        }
                        None => {}
                    }
                    // QoS 0: the broker's PUBACKs here count telemetry only.
                    if let Some(ack) = answer.ack {
                        let _ = responder.try_publish(answer.topic, QoS::AtMostOnce, false, ack.to_json());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p)))
                    if device_jobs.lock().expect("lock").handles(&p.topic) =>
                {
                    let battery = battery_of(&sent.lock().expect("lock"));
                    let reaction = {
                        let mut jobs = device_jobs.lock().expect("lock");
                        jobs.set_battery(battery);
                        jobs.receive(&p.topic, &p.payload)
                    };
                    // A rotation done (or a job handed to the session on the old certificate):
                    // store the new pair (here: keep it in memory) and come back with it.
                    if let Some(new) =
                        reaction.rotate.filter(|n| certificate.as_deref() != Some(&n.certificate_id))
                    {
                        rotate_to = Some(new.certificate_id);
                    }
                    match (reaction.install, reaction.publish) {
                        (Some(fw), update) => {
                            *install_requests.lock().expect("lock") = Some(Install { fw, update })
                        }
                        (None, Some(m)) => {
                            // The answer to a job being installed goes out once it runs.
                            let installing = install_requests
                                .lock()
                                .expect("lock")
                                .as_ref()
                                .is_some_and(|i| i.update.as_ref().is_some_and(|u| u.topic == m.topic));
                            if !installing {
                                let _ = responder.try_publish(m.topic, QoS::AtMostOnce, false, m.payload);
                            }
                        }
                        (None, None) => {}
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic.ends_with("/update/delta") => {
                    let delta: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                    if let Some(mode) = delta["state"]["mode"].as_str() {
                        let report = serde_json::json!({"state": {"reported": {"mode": mode}}});
                        let _ = responder.try_publish(
                            delta_shadow.clone(),
                            QoS::AtMostOnce,
                            false,
                            report.to_string(),
                        );
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    carried.extend(resendable(&mut eventloop.pending));
                    // A new certificate refused three times: back to the one before.
                    if let Some((old, failures)) = fallback.as_mut() {
                        *failures += 1;
                        if *failures >= 3 {
                            tracing::warn!(error = %e, "the rotated certificate is refused; back to the old one");
                            let old = std::mem::take(old);
                            eventloop
                                .mqtt_options
                                .set_credentials(format!("{CERTIFICATE_USERNAME_PREFIX}{old}"), "");
                            certificate = Some(old);
                            fallback = None;
                        }
                    }
                    loop_counters.connection_errors.fetch_add(1, Relaxed);
                    tracing::debug!(error = %e, "device connection error; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = 0u64;
    // The firmware installed by OTA jobs, with the boot each started on.
    let mut installed: Vec<(u32, String)> = Vec::new();
    while Instant::now() < stop {
        tick.tick().await;
        install(&mut sim, &mut installed, &installs, &client, &shadow).await;
        if reboots.swap(0, Relaxed) > 0 {
            sim.reboot();
        }
        for payload in sim.tick(time::now_ms()) {
            let payload = on_firmware(payload, &installed);
            last_sent.lock().expect("lock").clone_from(&payload);
            if client.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await.is_ok() {
                published += 1;
                counters.published.fetch_add(1, Relaxed);
            }
        }
    }
    // An install decided after the last sample is still carried out and answered.
    install(&mut sim, &mut installed, &installs, &client, &shadow).await;
    if let Some(held) = sim.flush() {
        let held = on_firmware(held, &installed);
        if client.publish(topic.clone(), QoS::AtLeastOnce, false, held).await.is_ok() {
            published += 1;
            counters.published.fetch_add(1, Relaxed);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while mine.load(Relaxed) < published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = client.disconnect().await;
    let mut events = events;
    if tokio::time::timeout(Duration::from_secs(2), &mut events).await.is_err() {
        events.abort();
    }
    let refused = std::mem::take(&mut commands.lock().expect("lock").refused);
    let mut all = counters.commands_refused.lock().expect("lock");
    for (code, n) in refused {
        *all.entry(code).or_default() += n;
    }
    let jobs = jobs.lock().expect("lock");
    let mut ota = counters.ota.lock().expect("lock");
    ota.installed += jobs.installed;
    ota.already_installed += jobs.already_installed;
    ota.updates_refused += jobs.updates_refused;
    for (code, n) in &jobs.rejected {
        *ota.rejected.entry(code).or_default() += n;
    }
    for (code, n) in &jobs.failed {
        *ota.failed.entry(code).or_default() += n;
    }
}

/// Firmware an OTA job checked, to be installed on the device's next sample, and the job's
/// answer, sent once it runs.
struct Install {
    fw: String,
    update: Option<Publish>,
}

/// Carry out a pending install: reboot on the new firmware, report it in the shadow, answer
/// the job.
async fn install(
    sim: &mut DeviceSim,
    installed: &mut Vec<(u32, String)>,
    pending: &Mutex<Option<Install>>,
    client: &AsyncClient,
    shadow: &str,
) {
    let Some(Install { fw, update }) = pending.lock().expect("lock").take() else { return };
    sim.reboot();
    let reported = serde_json::json!({"state": {"reported": {"fw": fw}}});
    installed.push((sim.boot(), fw));
    let _ = client.publish(shadow, QoS::AtMostOnce, false, reported.to_string()).await;
    if let Some(m) = update {
        let _ = client.publish(m.topic, QoS::AtMostOnce, false, m.payload).await;
    }
}

/// `payload` as the device sends it on the firmware it runs: the simulator writes the firmware
/// the device shipped with, so from the boot an install started on, the installed one (earlier
/// boots' messages, resent as duplicates, keep theirs).
fn on_firmware(payload: Vec<u8>, installed: &[(u32, String)]) -> Vec<u8> {
    if installed.is_empty() {
        return payload;
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&payload) else { return payload };
    let Some(boot) = v.get("boot").and_then(serde_json::Value::as_u64) else { return payload };
    let Some((_, fw)) = installed.iter().rev().find(|(from, _)| u64::from(*from) <= boot) else {
        return payload;
    };
    if v.get("fw").is_none() {
        return payload;
    }
    v["fw"] = fw.as_str().into();
    serde_json::to_vec(&v).unwrap_or(payload)
}

/// The battery a payload reports (`bat`), if it is one the device could send.
fn battery_of(payload: &[u8]) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v.get("bat")?.as_f64()
}

/// The operator pings the first devices with signed commands (through command-dispatch, as
/// `fleetctl command send` does) once they are connected; the number sent.
async fn operator_commands(stack: &LocalStack, devices: usize) -> usize {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut sent = 0;
    for i in 0..devices.min(COMMANDED_DEVICES) {
        let request = serde_json::json!({"thing": thing_name(i), "name": "ping", "ttl_s": 30});
        match stack.invoke("CommandDispatchFunction", &request).await {
            Ok(_) => sent += 1,
            Err(e) => eprintln!("\n  command to {} not sent: {e:#}", thing_name(i)),
        }
    }
    sent
}

/// What a new (clean) session sends again of what the last one left in `pending`: telemetry
/// (QoS 1) not yet acknowledged, and a disconnect asked for. The rest (subscriptions, the
/// device's QoS 0 requests to IoT Jobs and to provisioning) belonged to the old session: the
/// new one subscribes and asks for its job afresh.
fn resendable(pending: &mut std::collections::VecDeque<rumqttc::Request>) -> Vec<rumqttc::Request> {
    pending
        .drain(..)
        .filter(|r| match r {
            rumqttc::Request::Publish(p) => p.qos != QoS::AtMostOnce,
            rumqttc::Request::Disconnect(_) => true,
            _ => false,
        })
        .collect()
}

/// Simulated device `sim`'s OTA jobs: its class, the firmware it ships with, and the firmware
/// keys it trusts; with `rotation`, the provisioning template it rotates its certificate with.
fn device_jobs(sim: &DeviceSim, trusted: &ManifestVerifier, rotation: Option<&str>) -> SimulatedJobs {
    let (class, _) = class_and_region(sim.index);
    let device = DeviceFirmware {
        class: class.to_owned(),
        fw: firmware(sim.index).to_owned(),
        battery_pct: None,
        min_battery_pct: DEFAULT_MIN_BATTERY_PCT,
    };
    let jobs = SimulatedJobs::new(sim.thing.clone(), device, trusted.clone());
    match rotation {
        Some(template) => jobs.with_rotation(template),
        None => jobs,
    }
}

/// `--rotate`, once every device has provisioned: the daily expiry check marks the devices
/// whose certificates expire within its threshold `rotation_due`, then a rotation campaign per
/// class and firmware of the demo's devices (stages of 10, 50 and 100 %, no soak, no battery or
/// last-seen precondition) rotates them. The ids of the campaigns, those left from an earlier
/// demo on the same database included.
async fn start_rotations(stack: &LocalStack, devices: usize) -> Result<Vec<String>> {
    stack.run_schedule(CERT_EXPIRY_CHECK).await.context("the certificate expiry check")?;
    let cohorts: BTreeSet<(&str, &str)> =
        (0..devices).map(|i| (class_and_region(i).0, firmware(i))).collect();
    let now = time::now_ms();
    let mut ids = Vec::new();
    for (class, fw) in cohorts {
        let id = format!("demo-rotate-{class}-{}", fw.replace('.', "_"));
        let mut spec = CampaignSpec::rotation(&id, class, fw);
        spec.stages = vec![10, 50, 100];
        spec.soak_minutes = 0;
        spec.preconditions = Preconditions { min_battery_pct: None, seen_within_minutes: None };
        match stack.store.put_campaign(&Campaign::rotation(spec, now)?).await {
            Ok(_) => eprintln!("\n  campaign {id}: new certificates for {class} {fw} devices due one"),
            Err(e) if e.kind == ErrorKind::Conflict => {
                eprintln!(
                    "\n  campaign {id} exists already (an earlier demo on this database): left as it is"
                );
            }
            Err(e) => return Err(e).with_context(|| format!("storing campaign {id}")),
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Where a demo image would be downloaded from (nothing serves it: devices make
/// [`demo_image`] themselves).
fn demo_image_url(class: &str, fw: &str) -> String {
    format!("https://firmware.demo.invalid/{class}/{fw}.bin")
}

/// `--ota`: a campaign per class of the devices on `from_fw`, taking them to `to_fw`, with
/// manifests of [`demo_image`] signed by `key`, sized for a demo (stages of 10, 50 and 100 %,
/// a minute's soak, a 5-minute gate window of at least 20 events, no battery or last-seen
/// precondition). Ticked by the demo's loop (`--ota-every`), not here. The ids of the
/// campaigns, those left from an earlier demo on the same database included.
async fn create_campaigns(
    stack: &LocalStack,
    key: &ManifestSigner,
    devices: usize,
    upgrade: &OtaUpgrade,
) -> Result<Vec<String>> {
    let OtaUpgrade { from_fw, to_fw } = upgrade;
    let classes: BTreeSet<&str> =
        (0..devices).filter(|&i| firmware(i) == from_fw).map(|i| class_and_region(i).0).collect();
    if classes.is_empty() {
        bail!("--ota {from_fw}:{to_fw}: no demo device runs {from_fw} (they run 1.4.2 and 2.0.1)");
    }
    let now = time::now_ms();
    let mut ids = Vec::new();
    for class in classes {
        let id = format!("demo-{class}-{}", to_fw.replace('.', "_"));
        let manifest = |fw: &str| {
            let image = demo_image(class, fw);
            key.sign(UnsignedManifest::for_image(fw, class, demo_image_url(class, fw), &image))
                .map_err(|e| anyhow!("the manifest of {class}/{fw}: {} ({e})", e.code()))
        };
        let mut spec = CampaignSpec::new(&id, class, from_fw, to_fw);
        spec.stages = vec![10, 50, 100];
        spec.soak_minutes = 1;
        spec.preconditions = Preconditions { min_battery_pct: None, seen_within_minutes: None };
        spec.gate.window_minutes = 5;
        spec.gate.min_events = 20;
        let campaign = Campaign::new(spec, manifest(to_fw)?, manifest(from_fw)?, now)?;
        match stack.store.put_campaign(&campaign).await {
            Ok(_) => eprintln!("  campaign {id}: {class} {from_fw} -> {to_fw}, pending until its first tick"),
            Err(e) if e.kind == ErrorKind::Conflict => {
                eprintln!("  campaign {id} exists already (an earlier demo on this database): left as it is");
            }
            Err(e) => return Err(e).with_context(|| format!("storing campaign {id}")),
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Where each campaign stands: its state, and devices targeted of its population.
async fn campaign_states(stack: &LocalStack, ids: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for id in ids {
        if let Some(c) = stack.store.campaign(id).await? {
            let why = c.paused.as_deref().map(|why| format!(": {why}")).unwrap_or_default();
            out.insert(
                id.clone(),
                format!("{}: {} of {} devices targeted{why}", c.state_text(), c.targeted, c.population),
            );
        }
    }
    Ok(out)
}

/// Devices the operator sends a signed command to.
const COMMANDED_DEVICES: usize = 10;

/// Commands to the first `devices` that an ack settled.
async fn settled_commands(stack: &LocalStack, devices: usize) -> Result<usize> {
    let mut n = 0;
    for i in 0..devices {
        let thing = ThingName::parse(&thing_name(i))?;
        n += stack
            .store
            .commands_of(&thing, 100)
            .await?
            .iter()
            .filter(|c| c.status != CommandStatus::Sent)
            .count();
    }
    Ok(n)
}

/// Messages the ingest function has settled: stored, absorbed as duplicates, or quarantined,
/// or given up on (dead-lettered).
fn settled(stack: &LocalStack) -> u64 {
    let s = &stack.stats;
    s.metric("Accepted") + s.metric("Duplicates") + s.metric("Quarantined") + s.dead_lettered.load(Relaxed)
}

fn progress(started: Instant, counters: &Counters, stack: &LocalStack) {
    let s = stack.stats.snapshot(time::now_ms());
    eprint!(
        "\r  {:>5.1}s  sent {:>8}  stored {:>8}  duplicates {:>6}  quarantined {:>6}  {:>8.0} msgs/s   ",
        started.elapsed().as_secs_f64(),
        counters.acked.load(Relaxed),
        s.metric("Accepted"),
        s.metric("Duplicates"),
        s.metric("Quarantined"),
        s.messages_per_s
    );
}

pub async fn run(mut local_opts: LocalOptions, opts: DemoOptions, json: bool) -> Result<()> {
    if opts.devices == 0 || opts.rate <= 0.0 {
        bail!("--devices and --rate must be positive");
    }
    if opts.rotate && !opts.provision {
        bail!("--rotate needs --provision: only devices with certificates of their own rotate them");
    }
    if opts.rotate {
        let env = local_opts.env.clone();
        local_opts.env = fleet_shared::Env::from_fn(move |var| match env.optional(var) {
            None if var == VALIDITY_VARIABLE => Some(ROTATE_VALIDITY_DAYS.to_owned()),
            other => other,
        });
    }
    let stack = fleet_local::start(&local_opts).await?;
    let claim = if opts.provision {
        allow(&stack, opts.devices).await?;
        Some(Claim::of(&stack)?)
    } else {
        register(&stack, opts.devices).await?;
        None
    };
    // Devices trust the local firmware key; `--ota` signs its campaigns' manifests with it.
    let firmware_key = fleet_local::firmware_signer(&local_opts.db)?;
    let trusted = ManifestVerifier::new(vec![(firmware_key.kid().to_owned(), firmware_key.verifying_key())]);
    let mut campaigns = match &opts.ota {
        Some(upgrade) => create_campaigns(&stack, &firmware_key, opts.devices, upgrade).await?,
        None => Vec::new(),
    };
    let dashboard = format!("http://{}/", stack.http);
    eprintln!(
        "fleetline demo: {} devices x {} msg/s for {:?}; MQTT {} (3.1.1 and 5); dashboard {dashboard}",
        opts.devices, opts.rate, opts.duration, stack.mqtt
    );

    let rule = stack
        .rules()
        .iter()
        .find(|r| r.statement.from == TELEMETRY_TOPIC_FILTER)
        .context("the template has no telemetry rule")?
        .deployed_name
        .clone();
    let counters = Arc::new(Counters::default());
    let period = Duration::from_secs_f64(1.0 / opts.rate);
    let started = Instant::now();
    let stop = started + opts.duration;
    let (kid, key) = stack.command_key.clone();
    let tasks: Vec<_> = (0..opts.devices)
        .map(|i| {
            let (sim, topic) = device_kind(i, &opts, &rule);
            let offset = period.mul_f64(i as f64 / opts.devices as f64);
            let claim = claim.clone();
            let config = VerifierConfig::new(sim.thing.clone(), vec![(kid.clone(), key)]);
            let verifier = CommandVerifier::new(config, ReplayState::default()).expect("the default window");
            let commands = SimulatedCommands::new(sim.thing.clone(), verifier);
            let rotation = claim.as_ref().filter(|_| opts.rotate).map(|c| c.template.as_str());
            let jobs = device_jobs(&sim, &trusted, rotation);
            tokio::spawn(device(
                sim,
                topic,
                stack.mqtt,
                period,
                offset,
                stop,
                Arc::clone(&counters),
                claim,
                commands,
                jobs,
            ))
        })
        .collect();
    let operator = tokio::spawn(operator_desires(stack.mqtt, opts.devices));
    let commands_sent = operator_commands(&stack, opts.devices).await;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut sustained: Option<f64> = None;
    // `--ota-every`: the orchestrator's scheduled event, sooner than its 5 minutes.
    let (mut next_ota, mut ota_ticks) = (started + opts.ota_every, 0u64);
    let mut rotations_started = !opts.rotate;
    while !tasks.iter().all(|t| t.is_finished()) {
        ticker.tick().await;
        let (provisioned, failed) =
            (counters.provisioned.load(Relaxed), counters.provision_failed.load(Relaxed));
        if !rotations_started && provisioned + failed == opts.devices as u64 {
            if failed > 0 {
                eprintln!("\n  {failed} devices did not provision: the others rotate");
            }
            rotations_started = true;
            match start_rotations(&stack, opts.devices).await {
                Ok(ids) => campaigns.extend(ids),
                Err(e) => eprintln!("\n  rotation not started: {e:#}"),
            }
        }
        let ticking = !campaigns.is_empty() && !opts.ota_every.is_zero();
        if ticking && Instant::now() >= next_ota && Instant::now() < stop {
            next_ota += opts.ota_every;
            ota_ticks += 1;
            if let Err(e) = stack.run_schedule(OTA_ORCHESTRATOR).await {
                eprintln!("\n  ota-orchestrator: {e:#}");
            }
        }
        progress(started, &counters, &stack);
        if started.elapsed() >= Duration::from_secs(11) && Instant::now() <= stop {
            let rate = stack.stats.rate(time::now_ms());
            sustained = Some(sustained.map_or(rate, |s: f64| s.min(rate)));
        }
    }
    for t in tasks {
        t.await.context("device task")?;
    }
    let desired = operator.await.context("operator task")?;
    let publishing = started.elapsed();
    // Wait for the pipeline to settle everything the broker acknowledged.
    let acked = counters.acked.load(Relaxed);
    let settle_deadline = Instant::now() + SETTLE_TIMEOUT;
    while settled(&stack) < acked && Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress(started, &counters, &stack);
    eprintln!();

    let now = time::now_ms();
    let devices = stack.store.devices().await?;
    let state = fleet_local::http::AppState {
        store: stack.store.clone(),
        stats: Arc::clone(&stack.stats),
        started_ms: now,
    };
    let health =
        fleet_local::http::fleet_health(&devices, stack.store.quarantine_counts().await?, &state, now);
    let s = stack.stats.snapshot(now);
    let mut firmware_reported = BTreeMap::new();
    for fw in devices.iter().filter_map(|d| d.state.as_ref()?.fw.clone()) {
        *firmware_reported.entry(fw).or_default() += 1;
    }
    let ota_campaign_states = campaign_states(&stack, &campaigns).await?;
    let ota = std::mem::take(&mut *counters.ota.lock().expect("lock"));
    let codes = |m: BTreeMap<&'static str, u64>| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let report = Report {
        devices: opts.devices,
        provisioned: claim.as_ref().map(|_| counters.provisioned.load(Relaxed)),
        duration_s: publishing.as_secs_f64(),
        rate_per_device: opts.rate,
        published: acked,
        stored: s.metric("Accepted"),
        readings: s.metric("Readings"),
        duplicates: s.metric("Duplicates"),
        quarantined: s.metric("Quarantined"),
        quarantined_by_reason: s.metrics_by_dimension.get("QuarantinedByReason").cloned().unwrap_or_default(),
        dead_lettered: s.dead_lettered,
        reconciled: acked == s.metric("Accepted") + s.metric("Duplicates") + s.metric("Quarantined")
            && s.dead_lettered == 0,
        throughput_msgs_per_s: acked as f64 / publishing.as_secs_f64(),
        sustained_msgs_per_s: sustained,
        telemetry_freshness: health.telemetry_freshness,
        desired_writes: desired,
        twins_drifting: stack.store.drifting_since(now, 1_000_000).await?.len(),
        commands_sent,
        commands_obeyed: counters.commands_obeyed.load(Relaxed),
        commands_settled: settled_commands(&stack, opts.devices.min(COMMANDED_DEVICES)).await?,
        commands_refused: counters
            .commands_refused
            .lock()
            .expect("lock")
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
        ota_installed: ota.installed,
        ota_already_installed: ota.already_installed,
        ota_rejected: codes(ota.rejected),
        ota_failed: codes(ota.failed),
        ota_updates_refused: ota.updates_refused,
        certificates_rotated: opts.rotate.then(|| counters.rotated.load(Relaxed)),
        ota_campaign_states,
        ota_campaigns: campaigns,
        ota_ticks,
        firmware_reported,
        latency_p50_ms: s.latency_p50_ms,
        latency_p99_ms: s.latency_p99_ms,
        dashboard: dashboard.clone(),
    };
    print_report(&report, counters.connection_errors.load(Relaxed), json)?;

    if opts.keep_running {
        eprintln!("stack keeps running: dashboard {dashboard}; Ctrl-C or SIGTERM to stop");
        crate::signals::first_stop_signal().await?;
        crate::signals::exit_on_second_signal();
    }
    stack.shutdown().await?;
    if report.provisioned.is_some_and(|n| n != opts.devices as u64) {
        bail!("only {:?} of {} devices provisioned", report.provisioned, opts.devices);
    }
    if !report.reconciled {
        bail!("counts do not reconcile: published {} != stored + duplicates + quarantined", report.published);
    }
    Ok(())
}

fn print_report(r: &Report, connection_errors: u64, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let ms = |v: Option<u32>| v.map_or("-".into(), |v| format!("{v} ms"));
    println!("Fleetline demo report");
    println!(
        "  devices x rate             {} x {} readings/s for {:.1} s",
        r.devices, r.rate_per_device, r.duration_s
    );
    if let Some(n) = r.provisioned {
        println!("  provisioned by claim       {n} of {} devices (own certificate and thing)", r.devices);
    }
    println!("  published (broker-acked)   {}", r.published);
    println!("  stored                     {} messages, {} readings", r.stored, r.readings);
    println!("  duplicates absorbed        {}", r.duplicates);
    println!("  quarantined                {}", r.quarantined);
    if r.quarantined_by_reason.len() > 1 {
        println!("    by reason (a message may have several):");
    }
    for (reason, n) in &r.quarantined_by_reason {
        println!("    {reason:<24} {n}");
    }
    println!(
        "  reconciliation             {} (published = stored + duplicates + quarantined{})",
        if r.reconciled { "OK" } else { "MISMATCH" },
        if r.dead_lettered > 0 { format!("; {} dead-lettered", r.dead_lettered) } else { String::new() }
    );
    println!("  throughput                 {:.0} msgs/s over the run", r.throughput_msgs_per_s);
    if let Some(s) = r.sustained_msgs_per_s {
        println!("  sustained                  {s:.0} msgs/s (lowest full 10 s window while publishing)");
    }
    println!("  telemetry freshness        {:.0}% of registered devices", r.telemetry_freshness * 100.0);
    println!(
        "  twins                      {} desired writes, {} twins drifting (fleetctl twin drift)",
        r.desired_writes, r.twins_drifting
    );
    let refused: Vec<String> = r.commands_refused.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!(
        "  signed commands            {} sent, {} obeyed, {} acks settled them; refused: {}",
        r.commands_sent,
        r.commands_obeyed,
        r.commands_settled,
        if refused.is_empty() { "none".to_owned() } else { refused.join(", ") }
    );
    let by_code = |m: &BTreeMap<String, u64>| {
        let all: Vec<String> = m.iter().map(|(k, v)| format!("{v} {k}")).collect();
        if all.is_empty() {
            "none".to_owned()
        } else {
            all.join(", ")
        }
    };
    println!(
        "  OTA jobs                   {} installed, {} already installed; rejected: {}; failed: {}{}",
        r.ota_installed,
        r.ota_already_installed,
        by_code(&r.ota_rejected),
        by_code(&r.ota_failed),
        if r.ota_updates_refused > 0 {
            format!("; {} answers refused by IoT Jobs", r.ota_updates_refused)
        } else {
            String::new()
        }
    );
    if let Some(n) = r.certificates_rotated {
        println!(
            "  certificates rotated       {n} of {} devices (new key and certificate, reconnected with them)",
            r.devices
        );
    }
    let firmware: Vec<String> = r.firmware_reported.iter().map(|(fw, n)| format!("{n} on {fw}")).collect();
    println!(
        "  firmware reported          {}",
        if firmware.is_empty() { "-".to_owned() } else { firmware.join(", ") }
    );
    if !r.ota_campaigns.is_empty() {
        let ticked = match r.ota_ticks {
            0 => "left to ota-orchestrator's schedule".to_owned(),
            n => format!("ota-orchestrator run {n} times by the demo"),
        };
        println!("  OTA campaigns              {ticked} (fleetctl ota show <id>)");
        for (id, state) in &r.ota_campaign_states {
            println!("    {id:<26} {state}");
        }
    }
    println!("  latency (rx -> stored)     p50 {}, p99 {}", ms(r.latency_p50_ms), ms(r.latency_p99_ms));
    if connection_errors > 0 {
        println!("  MQTT connection errors     {connection_errors}");
    }
    println!("  dashboard                  {}", r.dashboard);
    Ok(())
}

#[cfg(test)]
mod tests {
    use rumqttc::{Disconnect, Publish, Request, Subscribe};

    use super::*;

    #[test]
    fn a_new_session_sends_again_unacknowledged_telemetry_and_a_disconnect_and_nothing_else() {
        // GIVEN what a connection left: telemetry on both topics, a QoS 0 job request, a
        // subscription, and the device's disconnect
        let publish = |topic: &str, qos| Request::Publish(Publish::new(topic, qos, "x"));
        let mut pending: std::collections::VecDeque<Request> = [
            publish("dt/fleet/t/telemetry", QoS::AtLeastOnce),
            publish("$aws/things/t/jobs/start-next", QoS::AtMostOnce),
            Request::Subscribe(Subscribe::new("$aws/things/t/jobs/notify-next", QoS::AtLeastOnce)),
            publish("$aws/rules/r/dt/fleet/t/telemetry", QoS::AtLeastOnce),
            Request::Disconnect(Disconnect),
        ]
        .into();
        // WHEN the new session takes what to send again
        let kept = resendable(&mut pending);
        // THEN the telemetry (in order) and the disconnect, nothing of the old session's own
        let kept: Vec<String> = kept
            .iter()
            .map(|r| match r {
                Request::Publish(p) => p.topic.clone(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kept,
            ["dt/fleet/t/telemetry", "$aws/rules/r/dt/fleet/t/telemetry", "Disconnect(Disconnect)"]
        );
        assert!(pending.is_empty());
    }
}
