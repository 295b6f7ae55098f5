//! The message broker, with what IoT Core puts around it.
//!
//! mqtt5's broker (MQTT 3.1.1 and 5 on one port, as IoT Core) does the protocol; this module
//! gives it IoT Core's behaviour through mqtt5's hooks:
//! - **identity and policy**: every connect, publish and subscribe is checked against the
//!   template's device policy ([`crate::policy`]); the MQTT username `operator` stands for an
//!   IAM principal (a person or tool, not a device) and is not bound by it. Without TLS there
//!   is no client certificate, so a client names the certificate it stands for in its MQTT
//!   username, `cert/<certificate id>` ([`CERTIFICATE_USERNAME_PREFIX`]): the fleet's claim
//!   certificate makes it a claim holder, bound by the template's claim policy (client ids
//!   `claim-*`, never a device's; the provisioning topics only); any other certificate must be ACTIVE in the local registry
//!   and attached to the thing named by the client id, as IoT Core maps a certificate to its
//!   thing. A client without a username is a device whose thing is its client id (no
//!   certificate is checked: the local IoT Core's default, which `mosquitto_pub -i <thing>`
//!   and the demo use; so a decommissioned device can still connect that way, and a
//!   certificate made inactive does not end a session already open: the checks are at
//!   connect). One claim session at a time may subscribe to the provisioning answers (they
//!   carry private keys, and this broker cannot answer one connection only);
//! - **fleet provisioning**: requests on the provisioning topics are answered by
//!   [`crate::provisioning`] (and reach no subscriber or rule);
//! - **jobs**: requests on `$aws/things/<t>/jobs/…` are answered by [`crate::jobs`] (and reach
//!   no subscriber or rule); its timer publishes what changed out of band (notices to devices,
//!   job and job execution events, which also go to the rules engine);
//! - **intake**: every publish is handed to the rules engine, with its client id, *before* the
//!   broker acknowledges it, so an acknowledged message is never lost;
//! - **lifecycle events**: connects and disconnects are published on `$aws/events/presence/…`
//!   to subscribers and to the rules engine;
//! - **stopping**: [`Broker::stop_intake`] refuses new connections and leaves new publishes
//!   unacknowledged (the client keeps them and sends them again to the next broker), then waits
//!   until every publish already admitted is in the rules engine's queue.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::model::{CertStatus, CertificateId, ThingName};
use fleet_shared::time;
use mqtt5::broker::config::StorageBackend;
use mqtt5::broker::router::MessageRouter;
use mqtt5::broker::{
    AuthProvider, AuthResult, BrokerConfig, BrokerEventHandler, BrokerShutdownHandle, ClientConnectEvent,
    ClientDisconnectEvent, ClientPublishEvent, MqttBroker, PublishAction, StorageConfig,
};
use mqtt5::packet::connect::ConnectPacket;
use mqtt5::packet::publish::PublishPacket;
use mqtt5::protocol::v5::reason_codes::ReasonCode;
use mqtt5::QoS;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::jobs::{self, Jobs, JobsRequest, Publication, Publish};
use crate::lifecycle::{self, DisconnectReason, Sessions};
use crate::policy::{Action, IotPolicy};
use crate::provisioning::{Provisioning, Request as ProvisioningRequest};
use crate::shadow::{ShadowRequest, Shadows};
use crate::stats::Stats;

/// The MQTT username of an operator's client: not a device, not bound by the device policy.
pub const OPERATOR_USERNAME: &str = "operator";
/// The MQTT username of a client standing for a certificate: `cert/<certificate id>`.
pub const CERTIFICATE_USERNAME_PREFIX: &str = "cert/";
/// Publishes the broker may hand over before the rules engine has taken them; beyond this the
/// publishers wait for their acknowledgements. (The queues behind the rules engine are
/// unbounded, as SQS is, so a function slower than the publishers grows them.)
const INTAKE_CAPACITY: usize = 16_384;
/// How long the broker's own shutdown (disconnecting every client) may take.
const BROKER_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A publish as the rules engine sees it.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// `None` for messages the IoT Core itself publishes (lifecycle events).
    pub client_id: Option<Arc<str>>,
}

pub struct BrokerOptions {
    pub addr: SocketAddr,
    /// `None`: every client may do anything (no policy in the template).
    pub policy: Option<IotPolicy>,
    pub max_payload_bytes: usize,
    /// The shadows to start with ([`Shadows::restore`]) and where their changes go.
    pub shadows: Shadows,
    pub shadow_store: Option<SqliteStore>,
    /// The claim certificate's policy (`None`: a claim holder may do anything).
    pub claim_policy: Option<IotPolicy>,
    /// The fleet-provisioning service, and through it the claim certificate; `None`: no
    /// provisioning, and no certificate names a client (`cert/…` usernames are refused).
    pub provisioning: Option<Arc<Provisioning>>,
    /// The Jobs service (`None`: jobs topics are plain topics).
    pub jobs: Option<Arc<Jobs>>,
}

pub struct Broker {
    pub addr: SocketAddr,
    iot: Arc<IotCore>,
    shutdown: BrokerShutdownHandle,
    task: JoinHandle<()>,
    /// The Jobs service's timer (sweep, and what changed out of band).
    jobs_timer: Option<JoinHandle<()>>,
}

/// The hooks' shared state: policy, the intake and its gate, sessions for lifecycle events.
struct IotCore {
    intake: mpsc::Sender<Inbound>,
    policy: Option<IotPolicy>,
    stopping: AtomicBool,
    stop_requested: Notify,
    /// Publishes past the gate and not yet in the intake.
    admitting: AtomicUsize,
    addresses: Mutex<HashMap<String, IpAddr>>,
    sessions: Mutex<Sessions>,
    shadows: Mutex<Shadows>,
    /// Where shadow changes are kept across restarts (`None`: memory only).
    shadow_store: Option<SqliteStore>,
    claim_policy: Option<IotPolicy>,
    provisioning: Option<Arc<Provisioning>>,
    jobs: Option<Arc<Jobs>>,
    /// `cert/<claim certificate id>`: the username of a claim holder.
    claim_user: Option<String>,
    /// The claim session that may receive provisioning answers now (see
    /// [`IotCore::claim_may_listen`]).
    answer_listener: tokio::sync::Mutex<Option<String>>,
    router: OnceLock<Arc<MessageRouter>>,
    stats: Arc<Stats>,
    max_payload_bytes: usize,
}

impl IotCore {
    fn is_claim(&self, user: Option<&str>) -> bool {
        user.is_some() && user == self.claim_user.as_deref()
    }

    /// IoT Core answers fleet-provisioning requests to the requesting connection only; this
    /// broker can only publish to every subscriber, and the answers carry private keys. So one
    /// claim session at a time may subscribe to a filter that can match them: another claim
    /// session's subscription is refused until the first disconnects. (Under a template whose
    /// claim policy lets the claim take any client id, a device that has provisioned and
    /// connects again with its own certificate under the same client id no longer holds it: it
    /// is the client id's newest session that must be a claim session.)
    async fn claim_may_listen(&self, client_id: &str, filter: &str) -> bool {
        if !may_match_provisioning_answers(filter) {
            return true;
        }
        // Held across the check and the claim, so two sessions subscribing at once cannot both
        // pass.
        let mut holder = self.answer_listener.lock().await;
        if let Some(other) = holder.as_deref().filter(|h| *h != client_id) {
            let claim = self.claim_user.as_deref().and_then(|u| u.strip_prefix(CERTIFICATE_USERNAME_PREFIX));
            let claim_connected = claim.is_some()
                && self.sessions.lock().unwrap_or_else(|p| p.into_inner()).newest_principal(other) == claim;
            let connected = claim_connected
                && match self.router.get() {
                    Some(router) => router.is_connected(other).await,
                    None => false,
                };
            if connected {
                warn!(client_id, other, filter, "refused: another claim session listens for provisioning answers (the local IoT Core cannot answer one connection only)");
                return false;
            }
        }
        *holder = Some(client_id.to_owned());
        true
    }

    fn device_may(&self, action: Action, resource: &str, client_id: &str, user: Option<&str>) -> bool {
        if user == Some(OPERATOR_USERNAME) {
            return true;
        }
        let policy = if self.is_claim(user) { &self.claim_policy } else { &self.policy };
        let allowed = policy.as_ref().is_none_or(|p| p.allows(action, resource, client_id));
        if !allowed {
            self.stats.refused_by_policy.fetch_add(1, SeqCst);
            warn!(client_id, ?action, resource, "refused by the device policy");
        }
        allowed
    }

    /// Hand a message to the rules engine unless intake has stopped; `false` if it has.
    async fn admit(&self, inbound: Inbound) -> bool {
        self.admitting.fetch_add(1, SeqCst);
        let admitted = !self.stopping.load(SeqCst) && self.intake.send(inbound).await.is_ok();
        self.admitting.fetch_sub(1, SeqCst);
        admitted
    }

    /// A lifecycle event: to subscribers, and to the rules engine.
    async fn publish_event(&self, topic: String, event: &impl serde::Serialize) {
        let Ok(payload) = serde_json::to_vec(event) else { return };
        self.publish_own(topic, Bytes::from(payload)).await;
    }

    /// Whether the certificate a `cert/<id>` username names may connect as `client_id`: the
    /// claim certificate (bound by the claim policy), or a certificate attached to the thing
    /// `client_id`; either must be ACTIVE in the local registry.
    async fn certificate_admits(&self, id: &str, client_id: &str) -> Result<bool, fleet_shared::StoreError> {
        let (Some(provisioning), Ok(id)) = (&self.provisioning, CertificateId::parse(id)) else {
            return Ok(false);
        };
        let store = provisioning.store();
        if store.local_certificate_status(&id).await? != Some(CertStatus::Active) {
            return Ok(false);
        }
        if id == provisioning.claim {
            return Ok(true);
        }
        let Ok(thing) = ThingName::parse(client_id) else { return Ok(false) };
        store.local_certificate_attached(&thing, &id).await
    }

    /// A message the IoT Core publishes to subscribers only (no rule sees it).
    async fn publish_to_subscribers(&self, topic: String, payload: Bytes) {
        if let Some(router) = self.router.get() {
            let packet = PublishPacket::new(topic, payload, QoS::AtLeastOnce);
            router.route_message(&packet, None).await;
        }
    }

    /// A message the IoT Core itself publishes: to subscribers, and to the rules engine.
    async fn publish_own(&self, topic: String, payload: Bytes) {
        if let Some(router) = self.router.get() {
            let packet = PublishPacket::new(topic.clone(), payload.clone(), QoS::AtLeastOnce);
            router.route_message(&packet, None).await;
        }
        self.admit(Inbound { topic: topic.into(), payload, client_id: None }).await;
    }
}

/// The Jobs service publishes through the broker: answers and notices to subscribers, events
/// to subscribers and the rules engine (as lifecycle events). An event the rules engine can no
/// longer take (intake stopped) is reported undelivered, so it is published again after a
/// restart.
impl Publish for IotCore {
    async fn publish(&self, message: Publication) -> bool {
        let payload = Bytes::from(message.payload);
        if !message.to_rules {
            self.publish_to_subscribers(message.topic, payload).await;
            return true;
        }
        self.publish_to_subscribers(message.topic.clone(), payload.clone()).await;
        self.admit(Inbound { topic: message.topic.into(), payload, client_id: None }).await
    }
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl AuthProvider for IotCore {
    fn authenticate<'a>(
        &'a self,
        connect: &'a ConnectPacket,
        client_addr: SocketAddr,
    ) -> Boxed<'a, mqtt5::Result<AuthResult>> {
        Box::pin(async move {
            if self.stopping.load(SeqCst) {
                return Ok(AuthResult::fail(ReasonCode::ServerUnavailable));
            }
            let user = connect.username.as_deref();
            // A device's client id is its thing name. Anything else (`+`, `#`, `*`, ...) would
            // turn the policy's thing-name variable into a wildcard.
            if self.policy.is_some()
                && user != Some(OPERATOR_USERNAME)
                && fleet_shared::model::ThingName::parse(&connect.client_id).is_err()
            {
                self.stats.refused_by_policy.fetch_add(1, SeqCst);
                warn!(client_id = connect.client_id, "refused: a device's client id must be a thing name");
                return Ok(AuthResult::fail(ReasonCode::ClientIdentifierNotValid));
            }
            if let Some(id) = user.and_then(|u| u.strip_prefix(CERTIFICATE_USERNAME_PREFIX)) {
                match self.certificate_admits(id, &connect.client_id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        self.stats.refused_by_policy.fetch_add(1, SeqCst);
                        warn!(client_id = connect.client_id, certificate = id, "refused: the certificate is not ACTIVE, or not the claim and not attached to this thing");
                        return Ok(AuthResult::fail(ReasonCode::NotAuthorized));
                    }
                    Err(e) => {
                        warn!(client_id = connect.client_id, error = %e, "refused: the certificate registry could not be read");
                        return Ok(AuthResult::fail(ReasonCode::ServerUnavailable));
                    }
                }
            }
            let resource = format!("client/{}", connect.client_id);
            if !self.device_may(Action::Connect, &resource, &connect.client_id, user) {
                return Ok(AuthResult::fail(ReasonCode::NotAuthorized));
            }
            self.addresses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(connect.client_id.clone(), client_addr.ip());
            Ok(match user {
                Some(u) => AuthResult::success_with_user(u),
                None => AuthResult::success(),
            })
        })
    }

    fn authorize_publish<'a>(
        &'a self,
        client_id: &str,
        user: Option<&'a str>,
        topic: &'a str,
    ) -> Boxed<'a, bool> {
        // The shadow and jobs services' answers (accepted, rejected, delta, documents, notify)
        // are IoT Core's to publish: a device may only subscribe to them, as on AWS.
        let answer = crate::shadow::is_answer_topic(topic)
            || crate::provisioning::is_answer_topic(topic)
            || (self.jobs.is_some() && jobs::is_answer_topic(topic));
        let reserved = answer && user != Some(OPERATOR_USERNAME);
        if reserved {
            self.stats.refused_by_policy.fetch_add(1, SeqCst);
            warn!(client_id, topic, "refused: shadow, jobs and provisioning answers are subscribe-only");
        }
        let allowed =
            !reserved && self.device_may(Action::Publish, &format!("topic/{topic}"), client_id, user);
        Box::pin(async move { allowed })
    }

    fn authorize_subscribe<'a>(
        &'a self,
        client_id: &str,
        user: Option<&'a str>,
        filter: &'a str,
    ) -> Boxed<'a, bool> {
        let allowed = self.device_may(Action::Subscribe, &format!("topicfilter/{filter}"), client_id, user);
        let claim = self.is_claim(user);
        let client_id = client_id.to_owned();
        Box::pin(async move { allowed && (!claim || self.claim_may_listen(&client_id, filter).await) })
    }
}

/// The hooks need the shared state from both traits; mqtt5 takes each as its own `Arc`.
struct Hooks(Arc<IotCore>);

impl BrokerEventHandler for Hooks {
    fn on_client_publish<'a>(&'a self, event: ClientPublishEvent) -> Boxed<'a, PublishAction> {
        Box::pin(async move {
            // IoT Core's limit is on the payload (the packet limit leaves room for the topic):
            // exactly 128 KiB goes through, one byte more is refused and reaches no rule.
            if event.payload.len() > self.0.max_payload_bytes {
                self.0.stats.payload_too_large.fetch_add(1, SeqCst);
                warn!(
                    client_id = &*event.client_id,
                    topic = &*event.topic,
                    bytes = event.payload.len(),
                    "CLIENT_ERROR PAYLOAD_LIMIT_EXCEEDED: message payload exceeds size limit for message type"
                );
                return PublishAction::Handled;
            }
            // The shadow service answers requests on its topics (accepted/rejected, delta,
            // documents), as IoT Core's Device Shadow service does. While stopping, a request is
            // neither applied nor acknowledged: the device sends it again to the next broker,
            // which applies it once.
            if let Some(request) = ShadowRequest::parse(&event.topic) {
                if self.0.stopping.load(SeqCst) {
                    std::future::pending::<()>().await;
                }
                let now_s = fleet_shared::time::now_ms() / 1000;
                let (answers, changes) = {
                    let mut shadows = self.0.shadows.lock().unwrap_or_else(|p| p.into_inner());
                    let answers = shadows.handle(&request, &event.payload, now_s);
                    (answers, shadows.take_changes())
                };
                // Stored before it is answered, as AWS answers only what it has stored.
                if let Some(store) = &self.0.shadow_store {
                    for change in changes {
                        if let Err(e) = store.save_local_shadow(change).await {
                            warn!(error = %e, topic = &*event.topic, "shadow change not stored: it will not survive a restart");
                        }
                    }
                }
                for (topic, payload) in answers {
                    self.0.publish_own(topic, Bytes::from(payload)).await;
                }
            }
            // The Jobs service answers requests on its topics; a request reaches no one else. While
            // stopping, a request is left unacknowledged like any other publish (the device sends
            // it again to the next broker).
            if let (Some(jobs), Some(request)) = (&self.0.jobs, JobsRequest::parse(&event.topic)) {
                if self.0.stopping.load(SeqCst) {
                    std::future::pending::<()>().await;
                }
                jobs.serve(&request, &event.payload, time::now_ms(), &*self.0).await;
                return PublishAction::Handled;
            }
            // Fleet provisioning answers requests on its topics; a request reaches no one else
            // (CreateKeysAndCertificate's answer carries a private key).
            if let (Some(provisioning), Some(request)) =
                (&self.0.provisioning, ProvisioningRequest::parse(&event.topic))
            {
                // The certificate the session connected with is the claim: the fleet's claim
                // certificate, or a device's own (a rotation; it was checked ACTIVE and
                // attached to the thing at connect).
                let user = event.user_id.as_deref();
                let claim = if self.0.is_claim(user) {
                    Some(provisioning.claim.clone())
                } else {
                    user.and_then(|u| u.strip_prefix(CERTIFICATE_USERNAME_PREFIX))
                        .and_then(|id| CertificateId::parse(id).ok())
                };
                let answers = provisioning
                    .handle(&request, &event.client_id, claim.as_ref(), &event.payload, time::now_ms())
                    .await;
                for (topic, payload) in answers {
                    self.0.publish_to_subscribers(topic, Bytes::from(payload)).await;
                }
                return PublishAction::Handled;
            }
            // Basic Ingest goes to its rule only: no subscriber ever sees it.
            let basic_ingest = event.topic.starts_with(crate::rules::BASIC_INGEST_PREFIX);
            let inbound =
                Inbound { topic: event.topic, payload: event.payload, client_id: Some(event.client_id) };
            if self.0.admit(inbound).await {
                return if basic_ingest { PublishAction::Handled } else { PublishAction::Continue };
            }
            // Intake has stopped: never acknowledge. The client keeps the message and sends it
            // again to the next broker; the connection ends when the process does.
            std::future::pending().await
        })
    }

    fn on_client_connect<'a>(&'a self, event: ClientConnectEvent) -> Boxed<'a, ()> {
        Box::pin(async move {
            let iot = &self.0;
            let ip = iot.addresses.lock().unwrap_or_else(|p| p.into_inner()).remove(&*event.client_id);
            // As IoT Core names it: a device's certificate id; another client, its local user.
            let user = event.user_id.as_deref();
            let principal = match user.and_then(|u| u.strip_prefix(CERTIFICATE_USERNAME_PREFIX)) {
                Some(certificate) => certificate.to_owned(),
                None => format!("local/{}", user.unwrap_or(&event.client_id)),
            };
            let connected = iot.sessions.lock().unwrap_or_else(|p| p.into_inner()).connect(
                &event.client_id,
                &principal,
                ip,
                time::now_ms(),
            );
            iot.publish_event(lifecycle::connected_topic(&event.client_id), &connected).await;
        })
    }

    fn on_client_disconnect<'a>(&'a self, event: ClientDisconnectEvent) -> Boxed<'a, ()> {
        Box::pin(async move {
            // mqtt5 reports a client's DISCONNECT (with its reason code) and protocol errors;
            // everything else arrives as an unexpected `UnspecifiedError`, so a keep-alive
            // timeout is reported as CONNECTION_LOST here.
            let reason = match event.reason {
                _ if !event.unexpected => DisconnectReason::ClientInitiatedDisconnect,
                ReasonCode::DisconnectWithWillMessage => DisconnectReason::ClientInitiatedDisconnect,
                _ if self.0.stopping.load(SeqCst) => DisconnectReason::ServerInitiatedDisconnect,
                ReasonCode::KeepAliveTimeout => DisconnectReason::MqttKeepAliveTimeout,
                ReasonCode::SessionTakenOver => DisconnectReason::DuplicateClientid,
                ReasonCode::ProtocolError | ReasonCode::MalformedPacket => DisconnectReason::ClientError,
                _ => DisconnectReason::ConnectionLost,
            };
            let disconnected = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner()).disconnect(
                &event.client_id,
                !event.unexpected,
                reason,
                time::now_ms(),
            );
            match disconnected {
                Some(d) => self.0.publish_event(lifecycle::disconnected_topic(&event.client_id), &d).await,
                None => debug!(client_id = %event.client_id, "disconnect of a session never seen connecting"),
            }
        })
    }
}

impl Broker {
    /// Bind and start the broker; publishes go to `intake`'s receiver.
    pub async fn start(opts: BrokerOptions, stats: Arc<Stats>) -> anyhow::Result<(Broker, Intake)> {
        let (intake, intake_rx) = mpsc::channel(INTAKE_CAPACITY);
        let iot = Arc::new(IotCore {
            intake,
            policy: opts.policy,
            stopping: AtomicBool::new(false),
            stop_requested: Notify::new(),
            admitting: AtomicUsize::new(0),
            addresses: Mutex::default(),
            sessions: Mutex::default(),
            shadows: Mutex::new(opts.shadows),
            shadow_store: opts.shadow_store,
            claim_user: opts
                .provisioning
                .as_ref()
                .map(|p| format!("{CERTIFICATE_USERNAME_PREFIX}{}", p.claim)),
            claim_policy: opts.claim_policy,
            provisioning: opts.provisioning,
            jobs: opts.jobs,
            answer_listener: tokio::sync::Mutex::default(),
            router: OnceLock::new(),
            stats,
            max_payload_bytes: opts.max_payload_bytes,
        });
        let config = BrokerConfig::default()
            .with_bind_address(opts.addr)
            .with_max_clients(100_000)
            // IoT Core keeps a persistent session for an hour by default.
            .with_session_expiry(Duration::from_secs(3600))
            // IoT Core takes QoS 0 and 1 only.
            .with_maximum_qos(1)
            // The payload limit plus room for the topic, packet id and MQTT 5 properties.
            .with_max_packet_size(opts.max_payload_bytes + 4096)
            .with_storage(StorageConfig::new().with_backend(StorageBackend::Memory).with_persistence(false))
            .with_sys_topics_enabled(false)
            .with_event_handler(Arc::new(Hooks(Arc::clone(&iot))));
        let mut broker = MqttBroker::with_config(config)
            .await
            .map_err(|e| anyhow::anyhow!("MQTT listener {}: {e}", opts.addr))?
            .with_auth_provider(Arc::clone(&iot) as Arc<dyn AuthProvider>);
        let _ = iot.router.set(broker.router());
        let addr = broker.local_addr().unwrap_or(opts.addr);
        let shutdown = broker.shutdown_handle();
        let mut ready = broker.ready_receiver();
        let task = tokio::spawn(async move {
            if let Err(e) = broker.run().await {
                warn!(error = %e, "MQTT broker stopped");
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
            .await
            .map_err(|_| anyhow::anyhow!("MQTT broker on {addr} did not become ready"))?
            .map_err(|_| anyhow::anyhow!("MQTT broker on {addr} stopped while starting"))?;
        let jobs_timer = iot.jobs.clone().map(|jobs| {
            let iot = Arc::clone(&iot);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(jobs::TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    // Once intake stops, events could no longer reach the rules engine.
                    if iot.stopping.load(SeqCst) {
                        break;
                    }
                    jobs.tick(time::now_ms(), &*iot).await;
                }
            })
        });
        let intake = Intake { rx: intake_rx, iot: Arc::clone(&iot) };
        Ok((Broker { addr, iot, shutdown, task, jobs_timer }, intake))
    }

    /// Refuse new connections and leave new publishes unacknowledged; the [`Intake`] then ends
    /// once every publish already admitted has been taken from it.
    pub fn stop_intake(&self) {
        self.iot.stopping.store(true, SeqCst);
        self.iot.stop_requested.notify_one();
    }

    /// Disconnect every client and stop listening (bounded: connections whose publish was left
    /// unacknowledged end with the process).
    pub async fn stop(self) {
        if let Some(timer) = &self.jobs_timer {
            timer.abort();
        }
        self.shutdown.shutdown();
        let _ = tokio::time::timeout(BROKER_STOP_TIMEOUT, self.task).await;
    }
}

/// The publishes the broker admitted, in order, for the rules engine.
pub struct Intake {
    rx: mpsc::Receiver<Inbound>,
    iot: Arc<IotCore>,
}

impl Intake {
    /// The next publish; `None` once intake has stopped and everything admitted was taken.
    pub async fn next(&mut self) -> Option<Inbound> {
        loop {
            if !self.iot.stopping.load(SeqCst) {
                tokio::select! {
                    m = self.rx.recv() => return m,
                    () = self.iot.stop_requested.notified() => continue,
                }
            }
            // Stopping: an admission that started before the gate closed may still be sending.
            // Once none is, nothing more can arrive and what is queued is all there is.
            let settled = self.iot.admitting.load(SeqCst) == 0;
            match self.rx.try_recv() {
                Ok(m) => return Some(m),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) if settled => return None,
                Err(TryRecvError::Empty) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
}

/// Whether a topic filter can match an answer of the fleet-provisioning MQTT API
/// (`$aws/certificates/create/…`, `$aws/provisioning-templates/…`). Wildcards at the first
/// level never match `$` topics.
fn may_match_provisioning_answers(filter: &str) -> bool {
    let mut levels = filter.split('/');
    levels.next() == Some("$aws")
        && matches!(levels.next(), Some("certificates" | "provisioning-templates" | "+" | "#"))
}

#[cfg(test)]
mod answer_filter_tests {
    use super::may_match_provisioning_answers as m;

    #[test]
    fn filters_that_can_reach_provisioning_answers() {
        for yes in [
            "$aws/certificates/create/json/+",
            "$aws/certificates/#",
            "$aws/+/create/json/accepted",
            "$aws/#",
            "$aws/provisioning-templates/t/provision/json/accepted",
        ] {
            assert!(m(yes), "{yes}");
        }
        for no in [
            "#",
            "+/certificates/create/json/accepted",
            "$aws/things/t/shadow/update/accepted",
            "dt/fleet/x/telemetry",
        ] {
            assert!(!m(no), "{no}");
        }
    }
}

#[cfg(test)]
mod stopping_tests {
    use super::*;
    use anyhow::Context as _;
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
    use serde_json::Value;

    /// The next event `want` picks, within 10 s.
    async fn until<T>(
        events: &mut EventLoop,
        mut want: impl FnMut(&Event) -> Option<T>,
    ) -> anyhow::Result<T> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(t) = want(&events.poll().await?) {
                    return anyhow::Ok(t);
                }
            }
        })
        .await?
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shadow_request_arriving_while_stopping_is_neither_applied_nor_acknowledged(
    ) -> anyhow::Result<()> {
        // GIVEN a broker, and a device whose first shadow update was applied and acknowledged
        let opts = BrokerOptions {
            addr: "127.0.0.1:0".parse()?,
            policy: None,
            max_payload_bytes: 128 * 1024,
            shadows: Shadows::default(),
            shadow_store: None,
            claim_policy: None,
            provisioning: None,
            jobs: None,
        };
        let (broker, _intake) = Broker::start(opts, Arc::new(Stats::default())).await?;
        let (device, mut events) =
            AsyncClient::new(MqttOptions::new("d1", "127.0.0.1", broker.addr.port()), 16);
        device.subscribe("$aws/things/d1/shadow/update/+", QoS::AtLeastOnce).await?;
        until(&mut events, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await?;
        let update = "$aws/things/d1/shadow/update";
        device.publish(update, QoS::AtLeastOnce, false, r#"{"state":{"reported":{"x":1}}}"#).await?;
        // (accepted, then documents; the acknowledgement before, between or after them)
        let (mut accepted, mut documents, mut acknowledged) = (None, false, false);
        until(&mut events, |e| {
            match e {
                Event::Incoming(Packet::Publish(p)) if p.topic.ends_with("/update/accepted") => {
                    accepted = serde_json::from_slice::<Value>(&p.payload).ok();
                }
                Event::Incoming(Packet::Publish(p)) if p.topic.ends_with("/update/documents") => {
                    documents = true
                }
                Event::Incoming(Packet::PubAck(_)) => acknowledged = true,
                _ => {}
            }
            (documents && acknowledged).then_some(())
        })
        .await?;
        assert_eq!(accepted.context("accepted")?["version"], 1);

        // WHEN the broker starts stopping and the device sends a second update
        broker.stop_intake();
        device.publish(update, QoS::AtLeastOnce, false, r#"{"state":{"reported":{"x":2}}}"#).await?;

        // THEN neither an answer nor an acknowledgement comes (the device keeps the update for
        // the next broker)
        let heard = tokio::time::timeout(
            Duration::from_millis(500),
            until(&mut events, |e| match e {
                Event::Incoming(Packet::Publish(p)) => Some(p.topic.clone()),
                Event::Incoming(Packet::PubAck(_)) => Some("PUBACK".to_owned()),
                _ => None,
            }),
        )
        .await;
        assert!(heard.is_err(), "heard {heard:?} for an update sent while stopping");
        // AND the shadow is still at version 1
        let get = ShadowRequest::parse("$aws/things/d1/shadow/get").context("get topic")?;
        let answers = broker.iot.shadows.lock().unwrap_or_else(|p| p.into_inner()).handle(&get, b"", 0);
        let current: Value = serde_json::from_slice(&answers[0].1)?;
        assert_eq!((&current["version"], &current["state"]["reported"]["x"]), (&1.into(), &1.into()));
        Ok(())
    }
}
