//! [`CommandPublisher`] on the local IoT Core's broker: an operator's MQTT connection per
//! publish (commands are rare), answered when the broker acknowledges the QoS 1 publish.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::error::StoreError;
use crate::ports::CommandPublisher;

/// The local IoT Core's operator: may publish and subscribe on any topic (fleetctl, functions).
pub const LOCAL_OPERATOR_USERNAME: &str = "operator";

/// How long a publish waits for the broker's acknowledgement.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes to the broker listening at the address `addr` holds (set once it listens).
#[derive(Clone)]
pub struct MqttPublisher {
    addr: Arc<OnceLock<SocketAddr>>,
}

impl MqttPublisher {
    pub fn new(addr: Arc<OnceLock<SocketAddr>>) -> Self {
        Self { addr }
    }

    /// A broker at a known address.
    pub fn at(addr: SocketAddr) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(addr);
        Self { addr: Arc::new(cell) }
    }
}

impl CommandPublisher for MqttPublisher {
    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<(), StoreError> {
        const OP: &str = "mqtt publish";
        let addr = *self
            .addr
            .get()
            .ok_or_else(|| StoreError::transient(OP, "the local IoT Core is not listening yet"))?;
        let id = format!("publisher-{}-{}", std::process::id(), crate::time::now_ms());
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_credentials(LOCAL_OPERATOR_USERNAME, "");
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut events) = AsyncClient::new(opts, 8);
        client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .map_err(|e| StoreError::transient(OP, e))?;
        let acked = tokio::time::timeout(PUBLISH_TIMEOUT, async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                    Ok(Event::Incoming(Packet::ConnAck(c)))
                        if c.code != rumqttc::ConnectReturnCode::Success =>
                    {
                        return Err(StoreError::permanent(
                            OP,
                            format!("the broker refused the operator: {:?}", c.code),
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(StoreError::transient(OP, e)),
                }
            }
        })
        .await
        .map_err(|_| StoreError::transient(OP, format!("no acknowledgement within {PUBLISH_TIMEOUT:?}")))?;
        let _ = client.disconnect().await;
        // Let the DISCONNECT go out (the broker would otherwise log a lost connection).
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while let Ok(e) = events.poll().await {
                if matches!(e, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
        acked
    }
}
