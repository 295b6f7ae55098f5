//! [`ShadowService`] over MQTT: an operator's client of a running local IoT Core's shadow
//! service (what `fleetctl twin set` uses on the embedded backend; on AWS the same port is
//! iot-data). Each request carries a `clientToken`; its answer is the `accepted` or `rejected`
//! message with that token. The client subscribes to a shadow's answer topics (once per
//! connection) before its first request on the same connection, so the broker has the
//! subscription when the answer comes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_shared::model::{ShadowName, ThingName};
use fleet_shared::ports::{ShadowCallError, ShadowService, ShadowState};
use fleet_shared::StoreError;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::broker::OPERATOR_USERNAME;

/// How long a request waits for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<(bool, Value)>>>>;

pub struct MqttShadows {
    client: AsyncClient,
    waiting: Waiting,
    /// Answer topics already subscribed to (a subscription lasts as long as the session:
    /// cleared when the broker starts a new one). Held while a SUBSCRIBE is queued, so no
    /// request of another task overtakes it.
    subscribed: Arc<tokio::sync::Mutex<HashSet<String>>>,
    next: AtomicU64,
    id: String,
}

fn base(thing: &ThingName, shadow: &ShadowName) -> String {
    if shadow.is_classic() {
        format!("$aws/things/{thing}/shadow")
    } else {
        format!("$aws/things/{thing}/shadow/name/{}", shadow.as_str())
    }
}

impl MqttShadows {
    /// Connect as the operator to the local IoT Core's MQTT listener.
    pub fn connect(mqtt: SocketAddr) -> Self {
        static CLIENTS: AtomicU64 = AtomicU64::new(0);
        let id = format!("shadow-client-{}-{}", std::process::id(), CLIENTS.fetch_add(1, Ordering::Relaxed));
        let mut opts = MqttOptions::new(id.clone(), mqtt.ip().to_string(), mqtt.port());
        opts.set_credentials(OPERATOR_USERNAME, "");
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(100);
        let (client, mut events) = AsyncClient::new(opts, 256);
        let waiting: Waiting = Arc::default();
        let answers = Arc::clone(&waiting);
        let subscribed: Arc<tokio::sync::Mutex<HashSet<String>>> = Arc::default();
        let session = Arc::clone(&subscribed);
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                        session.lock().await.clear()
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let accepted = p.topic.ends_with("/accepted");
                        let Ok(body) = serde_json::from_slice::<Value>(&p.payload) else { continue };
                        let Some(token) = body["clientToken"].as_str() else { continue };
                        let waiter = answers.lock().unwrap_or_else(|e| e.into_inner()).remove(token);
                        if let Some(w) = waiter {
                            let _ = w.send((accepted, body));
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    // Every handle is gone: nobody can ask anything any more.
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Self { client, waiting, subscribed, next: AtomicU64::new(0), id }
    }

    /// Send `body` on `<base>/<op>` and wait for the answer with its clientToken.
    async fn request(&self, base: &str, op: &str, mut body: Value) -> Result<(bool, Value), StoreError> {
        let token = match body["clientToken"].as_str() {
            Some(t) => t.to_owned(),
            None => format!("{}-{}", self.id, self.next.fetch_add(1, Ordering::Relaxed)),
        };
        body["clientToken"] = token.clone().into();
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(token.clone(), tx);
        let send = async {
            {
                let mut subscribed = self.subscribed.lock().await;
                for answer in ["accepted", "rejected"] {
                    let topic = format!("{base}/{op}/{answer}");
                    if subscribed.insert(topic.clone()) {
                        self.client.subscribe(topic, QoS::AtLeastOnce).await?;
                    }
                }
            }
            self.client.publish(format!("{base}/{op}"), QoS::AtLeastOnce, false, body.to_string()).await
        };
        if let Err(e) = send.await {
            self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&token);
            return Err(StoreError::transient("mqtt shadow request", e));
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => {
                self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&token);
                Err(StoreError::transient(
                    "mqtt shadow request",
                    format!("no answer on {base}/{op} within {ANSWER_TIMEOUT:?}: is fleetctl local running?"),
                ))
            }
        }
    }
}

impl Drop for MqttShadows {
    fn drop(&mut self) {
        // Disconnect rather than leave the connection to time out (and the task to redial).
        let _ = self.client.try_disconnect();
    }
}

/// [`MqttShadows`] connected on first use, to an address known later: the local IoT Core
/// builds its functions before its broker listens, and twin-sync writes shadows only when a
/// release policy fires.
#[derive(Default)]
pub struct LazyMqttShadows {
    addr: Arc<std::sync::OnceLock<SocketAddr>>,
    client: tokio::sync::OnceCell<MqttShadows>,
}

impl LazyMqttShadows {
    /// Connects to whatever `addr` holds when first used.
    pub fn new(addr: Arc<std::sync::OnceLock<SocketAddr>>) -> Self {
        Self { addr, client: tokio::sync::OnceCell::new() }
    }

    async fn get(&self) -> Result<&MqttShadows, StoreError> {
        let addr = *self.addr.get().ok_or_else(|| {
            StoreError::transient("mqtt shadows", "the local IoT Core is not listening yet")
        })?;
        Ok(self.client.get_or_init(|| async move { MqttShadows::connect(addr) }).await)
    }
}

impl ShadowService for LazyMqttShadows {
    async fn get_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
    ) -> Result<Option<ShadowState>, StoreError> {
        self.get().await?.get_shadow(thing, shadow).await
    }

    async fn update_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
        request: &Value,
    ) -> Result<u64, ShadowCallError> {
        self.get().await?.update_shadow(thing, shadow, request).await
    }

    async fn delete_shadow(&self, thing: &ThingName, shadow: &ShadowName) -> Result<Option<u64>, StoreError> {
        self.get().await?.delete_shadow(thing, shadow).await
    }
}

fn rejection(body: &Value) -> (u16, String) {
    let code = body["code"].as_u64().and_then(|c| u16::try_from(c).ok()).unwrap_or(500);
    (code, body["message"].as_str().unwrap_or_default().to_owned())
}

impl ShadowService for MqttShadows {
    async fn get_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
    ) -> Result<Option<ShadowState>, StoreError> {
        let (accepted, body) = self.request(&base(thing, shadow), "get", json!({})).await?;
        if !accepted {
            return match rejection(&body) {
                (404, _) => Ok(None),
                (code, message) => {
                    Err(StoreError::permanent("mqtt shadow get", format!("{code}: {message}")))
                }
            };
        }
        Ok(Some(ShadowState::from_document(&body)))
    }

    async fn update_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
        request: &Value,
    ) -> Result<u64, ShadowCallError> {
        let (accepted, body) = self.request(&base(thing, shadow), "update", request.clone()).await?;
        if accepted {
            return Ok(body["version"].as_u64().unwrap_or(0));
        }
        match rejection(&body) {
            (409, _) => Err(ShadowCallError::Conflict),
            (code, message) => Err(ShadowCallError::Rejected { code, message }),
        }
    }

    async fn delete_shadow(&self, thing: &ThingName, shadow: &ShadowName) -> Result<Option<u64>, StoreError> {
        let (accepted, body) = self.request(&base(thing, shadow), "delete", json!({})).await?;
        if accepted {
            return Ok(Some(body["version"].as_u64().unwrap_or(0)));
        }
        match rejection(&body) {
            (404, _) => Ok(None),
            (code, message) => Err(StoreError::permanent("mqtt shadow delete", format!("{code}: {message}"))),
        }
    }
}
