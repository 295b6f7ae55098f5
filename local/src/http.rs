//! The local stack's HTTP side: a JSON API and the dashboard pages.
//!
//! | route | answers |
//! |---|---|
//! | `GET /` | dashboard: fleet overview |
//! | `GET /devices/{thing}` | dashboard: one device, metrics charted |
//! | `GET /api/health` | fleet health summary (JSON) |
//! | `GET /api/devices` | every device (JSON) |
//! | `GET /api/devices/{thing}/telemetry?since_ms=&limit=` | a device's readings, oldest first |
//! | `GET /api/quarantine?reason=` | quarantined messages, optionally of one reason |

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::model::{Device, ThingName};
use fleet_shared::ports::{DeviceAdmin, QuarantineReader, TelemetryQuery};
use fleet_shared::time;
use serde::{Deserialize, Serialize};

use crate::dashboard;
use crate::stats::{Snapshot, Stats};

/// A device is online when it was heard from within this window.
pub const ONLINE_WINDOW_MS: i64 = 60_000;
/// Telemetry is fresh when the newest reading arrived within this window.
pub const FRESHNESS_WINDOW_MS: i64 = 5 * 60_000;

#[derive(Clone)]
pub struct AppState {
    pub store: SqliteStore,
    pub stats: Arc<Stats>,
    pub started_ms: i64,
}

/// The fleet at a glance.
#[derive(Debug, Serialize)]
pub struct FleetHealth {
    pub devices: usize,
    pub registered: usize,
    pub unregistered: usize,
    pub online: usize,
    pub stale: usize,
    pub never_seen: usize,
    /// Share of registered devices whose telemetry is fresh (0..1).
    pub telemetry_freshness: f64,
    pub quarantined_by_reason: BTreeMap<String, u64>,
    pub uptime_s: i64,
    pub pipeline: Snapshot,
}

pub fn fleet_health(
    devices: &[Device],
    quarantine: BTreeMap<String, u64>,
    state: &AppState,
    now: i64,
) -> FleetHealth {
    let last_rx = |d: &Device| d.state.as_ref().map(|s| s.last_rx_ms);
    let online = devices.iter().filter(|d| last_rx(d).is_some_and(|t| now - t <= ONLINE_WINDOW_MS)).count();
    let never_seen = devices.iter().filter(|d| d.state.is_none()).count();
    let registered: Vec<&Device> = devices.iter().filter(|d| d.registration.is_some()).collect();
    let fresh =
        registered.iter().filter(|d| last_rx(d).is_some_and(|t| now - t <= FRESHNESS_WINDOW_MS)).count();
    FleetHealth {
        devices: devices.len(),
        registered: registered.len(),
        unregistered: devices.len() - registered.len(),
        online,
        stale: devices.len() - online - never_seen,
        never_seen,
        telemetry_freshness: if registered.is_empty() { 0.0 } else { fresh as f64 / registered.len() as f64 },
        quarantined_by_reason: quarantine,
        uptime_s: (now - state.started_ms) / 1000,
        pipeline: state.stats.snapshot(now),
    }
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<fleet_shared::StoreError> for ApiError {
    fn from(e: fleet_shared::StoreError) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

fn thing(s: &str) -> Result<ThingName, ApiError> {
    ThingName::parse(s).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn health_of(state: &AppState) -> Result<FleetHealth, ApiError> {
    let devices = state.store.devices().await?;
    let quarantine = state.store.quarantine_counts().await?;
    Ok(fleet_health(&devices, quarantine, state, time::now_ms()))
}

async fn api_health(State(state): State<AppState>) -> Result<Json<FleetHealth>, ApiError> {
    Ok(Json(health_of(&state).await?))
}

async fn api_devices(State(state): State<AppState>) -> Result<Json<Vec<Device>>, ApiError> {
    Ok(Json(state.store.devices().await?))
}

#[derive(Deserialize)]
struct TelemetryParams {
    since_ms: Option<i64>,
    limit: Option<usize>,
}

async fn api_telemetry(
    State(state): State<AppState>,
    Path(t): Path<String>,
    Query(q): Query<TelemetryParams>,
) -> Result<Response, ApiError> {
    let readings =
        state.store.telemetry(&thing(&t)?, q.since_ms.unwrap_or(0), q.limit.unwrap_or(1000)).await?;
    Ok(Json(readings).into_response())
}

#[derive(Deserialize)]
struct QuarantineQuery {
    reason: Option<String>,
}

async fn api_quarantine(
    State(state): State<AppState>,
    Query(q): Query<QuarantineQuery>,
) -> Result<Response, ApiError> {
    let mut lines = state.store.quarantined(0).await?;
    if let Some(r) = q.reason {
        lines.retain(|l| l.reasons.iter().any(|p| p.reason.as_str() == r));
    }
    Ok(Json(lines).into_response())
}

async fn page_fleet(State(state): State<AppState>) -> Result<maud::Markup, ApiError> {
    let devices = state.store.devices().await?;
    let quarantine = state.store.quarantine_counts().await?;
    let now = time::now_ms();
    let health = fleet_health(&devices, quarantine, &state, now);
    Ok(dashboard::fleet_page(&health, &devices, now))
}

async fn page_device(State(state): State<AppState>, Path(t): Path<String>) -> Result<Response, ApiError> {
    let thing = thing(&t)?;
    let Some(device) = state.store.device(&thing).await? else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no device {thing}")));
    };
    // The readings up to the newest one, charted over the last stretch of time.
    let since = device.state.as_ref().map_or(0, |s| s.last_ts_ms - dashboard::CHART_SPAN_MS);
    let readings = state.store.telemetry(&thing, since, 50_000).await?;
    let tail = &readings[readings.len().saturating_sub(dashboard::CHART_POINTS)..];
    Ok(dashboard::device_page(&device, tail, time::now_ms()).into_response())
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page_fleet))
        .route("/devices/{thing}", get(page_device))
        .route("/api/health", get(api_health))
        .route("/api/devices", get(api_devices))
        .route("/api/devices/{thing}/telemetry", get(api_telemetry))
        .route("/api/quarantine", get(api_quarantine))
        .with_state(state)
}

pub async fn serve(listener: tokio::net::TcpListener, state: AppState) {
    if let Err(e) = axum::serve(listener, router(state)).await {
        tracing::warn!(error = %e, "HTTP server stopped");
    }
}
