//! Which handler runs for which function of the template, on the embedded backend: a function
//! added to `infra/template.yaml` runs on the local IoT Core with one line here. Each handler
//! is built as its `main.rs` builds it on the embedded backend, except that its metrics feed
//! the local IoT Core's counters instead of stdout, and twin-sync gets the local IoT Core's
//! shadow service (over MQTT) where its `main.rs` has none.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use fleet_shared::adapters::embedded::MqttPublisher;
use fleet_shared::lambda::{EmbeddedBackend, StartupError};
use fleet_shared::metrics::MetricsOut;

use crate::functions::{lambda, Functions};
use crate::shadow_client::LazyMqttShadows;

/// `mqtt`: the local IoT Core's MQTT listener once it listens, where twin-sync reaches the
/// shadow service.
pub fn functions(
    backend: &EmbeddedBackend,
    metrics: &MetricsOut,
    mqtt: Arc<OnceLock<SocketAddr>>,
) -> Result<Functions, StartupError> {
    let mut f = Functions::default();
    f.add(
        "IngestTelemetryFunction",
        lambda(
            ingest(backend, metrics)?,
            |d, e| async move { ingest_telemetry::handler::handle(&d, e).await },
        ),
    );
    f.add(
        "TwinSyncFunction",
        lambda(twin_sync(backend, metrics, Arc::clone(&mqtt))?, |d, e| async move {
            twin_sync::handler::handle(&d, e).await
        }),
    );
    f.add(
        "ProvisioningHookFunction",
        lambda(provisioning_hook(backend, metrics)?, |d, e| async move {
            provisioning_hook::handler::handle(&d, e).await
        }),
    );
    f.add(
        "CertExpiryCheckFunction",
        lambda(cert_expiry_check(backend, metrics)?, |d, e| async move {
            cert_expiry_check::handler::handle(&d, e).await
        }),
    );
    f.add(
        "PresenceFunction",
        lambda(presence(backend, metrics)?, |d, e| async move { presence::handler::handle(&d, e).await }),
    );
    f.add(
        "CommandDispatchFunction",
        lambda(command_dispatch(backend, metrics, Arc::clone(&mqtt))?, |d, e| async move {
            command_dispatch::handler::handle(&d, e).await
        }),
    );
    f.add(
        "CommandAckFunction",
        lambda(
            command_ack(backend, metrics)?,
            |d, e| async move { command_ack::handler::handle(&d, e).await },
        ),
    );
    f.add(
        "FleetHealthFunction",
        lambda(
            fleet_health(backend, metrics)?,
            |d, e| async move { fleet_health::handler::handle(&d, e).await },
        ),
    );
    f.add(
        "OtaOrchestratorFunction",
        lambda(ota_orchestrator(backend, metrics)?, |d, e| async move {
            ota_orchestrator::handler::handle(&d, e).await
        }),
    );
    Ok(f)
}

/// Campaigns tick on the local IoT Core's jobs, trusting its firmware key (`FLEET_FIRMWARE_KEYS`).
fn ota_orchestrator(
    b: &EmbeddedBackend,
    metrics: &MetricsOut,
) -> Result<Arc<ota_orchestrator::handler::EmbeddedDeps>, StartupError> {
    let mut deps = ota_orchestrator::handler::EmbeddedDeps::on_embedded(b)?;
    deps.metrics = metrics.clone();
    Ok(Arc::new(deps))
}

/// Commands go out through the broker, as an operator publishes, once it listens.
fn command_dispatch(
    b: &EmbeddedBackend,
    metrics: &MetricsOut,
    mqtt: Arc<OnceLock<SocketAddr>>,
) -> Result<Arc<command_dispatch::handler::EmbeddedDeps>, StartupError> {
    let mut deps = command_dispatch::handler::EmbeddedDeps::embedded(b, MqttPublisher::new(mqtt))?;
    deps.metrics = metrics.clone();
    Ok(Arc::new(deps))
}

fn command_ack(
    b: &EmbeddedBackend,
    metrics: &MetricsOut,
) -> Result<Arc<command_ack::handler::EmbeddedDeps>, StartupError> {
    let mut deps = command_ack::handler::EmbeddedDeps::on_embedded(b)?;
    deps.metrics = metrics.clone();
    Ok(Arc::new(deps))
}

fn fleet_health(
    b: &EmbeddedBackend,
    metrics: &MetricsOut,
) -> Result<Arc<fleet_health::handler::EmbeddedDeps>, StartupError> {
    let mut deps = fleet_health::handler::EmbeddedDeps::on_embedded(b)?;
    deps.metrics = metrics.clone();
    Ok(Arc::new(deps))
}

fn presence(
    b: &EmbeddedBackend,
    metrics: &MetricsOut,
) -> Result<Arc<presence::handler::EmbeddedDeps>, StartupError> {
    let mut deps = presence::handler::EmbeddedDeps::on_embedded(b)?;
    deps.metrics = metrics.clone();
    Ok(Arc::new(deps))
}

fn cert_expiry_check(
    b: &EmbeddedBackend,
    metrics: &MetricsOut,
) -> Result<Arc<cert_expiry_check::handler::EmbeddedDeps>, StartupError> {
    let mut deps = cert_expiry_check::handler::EmbeddedDeps::on_embedded(b)?;
    deps.metrics = metrics.clone();
    Ok(Arc::new(deps))
}

fn provisioning_hook(
    b: &EmbeddedBackend,
    metrics: &MetricsOut,
) -> Result<Arc<provisioning_hook::handler::EmbeddedDeps>, StartupError> {
    let mut deps = provisioning_hook::handler::EmbeddedDeps::on_embedded(b)?;
    deps.metrics = metrics.clone();
    Ok(Arc::new(deps))
}

fn ingest(
    b: &EmbeddedBackend,
    metrics: &MetricsOut,
) -> Result<Arc<ingest_telemetry::handler::EmbeddedDeps>, StartupError> {
    let mut deps = ingest_telemetry::handler::EmbeddedDeps::on_embedded(b)?;
    deps.metrics = metrics.clone();
    Ok(Arc::new(deps))
}

fn twin_sync(
    b: &EmbeddedBackend,
    metrics: &MetricsOut,
    mqtt: Arc<OnceLock<SocketAddr>>,
) -> Result<Arc<twin_sync::handler::EmbeddedDeps<LazyMqttShadows>>, StartupError> {
    let deps = twin_sync::handler::EmbeddedDeps::on_embedded(b)?;
    Ok(Arc::new(twin_sync::handler::Deps {
        twins: deps.twins,
        shadows: Some(LazyMqttShadows::new(mqtt)),
        clock: deps.clock,
        metrics: metrics.clone(),
    }))
}
