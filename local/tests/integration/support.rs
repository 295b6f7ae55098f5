//! What the local IoT Core's tests share: a stack on ephemeral ports, an MQTT client of it,
//! waiting (10 s at most) for an MQTT event or a condition, and the dashboard alone on a store,
//! read with plain HTTP GETs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fleet_local::http::{serve, AppState};
use fleet_local::stats::Stats;
use fleet_local::{LocalOptions, LocalStack};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::time;
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

/// The dashboard on a free loopback port.
pub async fn dashboard(store: &SqliteStore) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let state =
        AppState { store: store.clone(), stats: Arc::new(Stats::default()), started_ms: time::now_ms() };
    tokio::spawn(serve(listener, state));
    Ok(addr)
}

/// A plain HTTP/1.1 GET: the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
        let status = head.split(' ').nth(1).context("no status")?.parse()?;
        Ok((status, body.to_owned()))
    })
    .await?
}
