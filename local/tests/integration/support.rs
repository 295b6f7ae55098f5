//! What the local IoT Core's tests share: a stack on ephemeral ports, an MQTT client of it, and
//! waiting (10 s at most) for an MQTT event or a condition.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fleet_local::{LocalOptions, LocalStack};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions};

const PATIENCE: Duration = Duration::from_secs(10);

/// A local IoT Core on `db`, listening on free loopback ports.
pub async fn start(db: &Path) -> Result<LocalStack> {
    fleet_local::start(&LocalOptions::ephemeral(db)).await
}

/// An MQTT client of `stack` (not yet connected: poll its event loop), with `username` when set.
pub fn client(stack: &LocalStack, id: &str, username: Option<&str>) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", stack.mqtt.port());
    if let Some(u) = username {
        opts.set_credentials(u, "");
    }
    AsyncClient::new(opts, 16)
}

/// Subscribe to each of `filters`, and wait until every subscription is acknowledged.
pub async fn subscribed(client: &AsyncClient, events: &mut EventLoop, filters: &[String]) -> Result<()> {
    for filter in filters {
        client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await?;
    }
    let mut acked = 0;
    while acked < filters.len() {
        let event = tokio::time::timeout(PATIENCE, events.poll()).await.context("suback")??;
        acked += usize::from(matches!(event, Event::Incoming(rumqttc::Packet::SubAck(_))));
    }
    Ok(())
}

/// Polls `events` until `want` picks one.
pub async fn until<T>(events: &mut EventLoop, mut want: impl FnMut(&Event) -> Option<T>) -> Result<T> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll()).await.context("timed out")??;
        if let Some(t) = want(&event) {
            return Ok(t);
        }
    }
}

/// Asks `check` every 50 ms until it answers something.
pub async fn eventually<T>(mut check: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(t) = check().await? {
            return Ok(t);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
