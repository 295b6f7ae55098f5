//! The local stack's HTTP side: a JSON API and the dashboard pages.
//!
//! | route | answers |
//! |---|---|
//! | `GET /` | dashboard: fleet overview |
//! | `GET /devices/{thing}` | dashboard: one device, metrics charted |
//! | `GET /twins` | dashboard: drifting twins, oldest drift first (at most [`dashboard::TWIN_ROWS`]) |
//! | `GET /twins/{thing}?shadow=` | dashboard: one twin (classic shadow unless `shadow` names one) |
//! | `GET /slo` | dashboard: fleet-health's last evaluation, the fleet's SLIs charted from the SLO ledger |
//! | `GET /ota` | dashboard: OTA campaigns and certificate rotations counted by state; listed those not ended first, newest first (at most [`dashboard::ota::CAMPAIGN_ROWS`]) |
//! | `GET /ota/{id}` | dashboard: one campaign, its rollout settings, jobs and newest log lines |
//! | `GET /api/slo` | fleet-health's last evaluation (`HealthReport`, at most [`MAX_PAGE`] cohorts, the fleet first); 404 before its first run |
//! | `GET /api/health` | fleet health summary (JSON) |
//! | `GET /api/devices?limit=&cursor=` | devices by thing name |
//! | `GET /api/devices/{thing}/telemetry?since_ms=&limit=&cursor=` | a device's readings, oldest first |
//! | `GET /api/quarantine?reason=&limit=&cursor=` | quarantined messages, oldest first, optionally of one reason |
//! | `GET /api/campaigns?limit=&cursor=` | OTA campaigns (as `fleetctl --json ota show` prints them) by id, at most [`MAX_CAMPAIGN_PAGE`] a page |
//!
//! Every list is one page: `{"items":[...],"next":"<cursor>"}`, at most `limit` items
//! (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]); pass `next` as `cursor` for the next page.
//! `next` is absent on the last page. A response never holds more than one page in memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::health::ledger::HealthReport;
use fleet_shared::health::slo::Catalog;
use fleet_shared::health::tally::Cohort;
use fleet_shared::ingest::{QuarantineLine, Reason};
use fleet_shared::model::{Device, ShadowName, StoredReading, ThingName};
use fleet_shared::ota::campaign::Campaign;
use fleet_shared::ports::{CampaignStore, DeviceAdmin, SloReader, TelemetryQuery, TwinStore};
use fleet_shared::time;
use serde::{Deserialize, Serialize};

use crate::dashboard;
use crate::stats::{Snapshot, Stats};

/// Items per page when `limit` is not given, and the most a page holds.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1_000;
/// The most campaigns a page of `/api/campaigns` holds.
pub const MAX_CAMPAIGN_PAGE: usize = 100;

/// One page of a list.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Deserialize)]
struct PageParams {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `limit`: the default page when absent, at most [`MAX_PAGE`].
fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(0) => Err(bad_request("limit must be at least 1".to_owned())),
        Some(n) => Ok(n.min(MAX_PAGE)),
    }
}

/// Fetch one more than a page to know whether there is a next one; `cursor_of` the last item.
fn page<T>(mut items: Vec<T>, limit: usize, cursor_of: impl Fn(&T) -> String) -> Page<T> {
    let more = items.len() > limit;
    items.truncate(limit);
    let next = if more { items.last().map(cursor_of) } else { None };
    Page { items, next }
}

fn bad_request(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

fn bad_cursor(cursor: &str) -> ApiError {
    bad_request(format!("cursor {cursor:?} is not one this API gave out"))
}

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

async fn api_devices(
    State(state): State<AppState>,
    Query(p): Query<PageParams>,
) -> Result<Json<Page<Device>>, ApiError> {
    let limit = page_limit(p.limit)?;
    let devices = state.store.devices_page(p.cursor.clone(), limit + 1).await?;
    Ok(Json(page(devices, limit, |d| d.thing.as_str().to_owned())))
}

#[derive(Deserialize)]
struct TelemetryParams {
    since_ms: Option<i64>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn api_telemetry(
    State(state): State<AppState>,
    Path(t): Path<String>,
    Query(q): Query<TelemetryParams>,
) -> Result<Json<Page<StoredReading>>, ApiError> {
    let limit = page_limit(q.limit)?;
    // cursor = "<time_ms>.<boot>.<seq>" of the last reading of the previous page
    let after = match &q.cursor {
        None => None,
        Some(c) => {
            let mut parts = c.splitn(3, '.');
            let mut next = || parts.next().ok_or_else(|| bad_cursor(c));
            let (t, b, s) = (next()?, next()?, next()?);
            Some((
                t.parse().map_err(|_| bad_cursor(c))?,
                b.parse().map_err(|_| bad_cursor(c))?,
                s.parse().map_err(|_| bad_cursor(c))?,
            ))
        }
    };
    let readings = state.store.telemetry_page(&thing(&t)?, q.since_ms.unwrap_or(0), after, limit + 1).await?;
    Ok(Json(page(readings, limit, |r| {
        format!("{}.{}.{}", r.reading.time_ms, r.reading.id.boot, r.reading.id.seq)
    })))
}

#[derive(Deserialize)]
struct QuarantineQuery {
    reason: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn api_quarantine(
    State(state): State<AppState>,
    Query(q): Query<QuarantineQuery>,
) -> Result<Json<Page<QuarantineLine>>, ApiError> {
    let limit = page_limit(q.limit)?;
    let reason = match q.reason.as_deref() {
        None => None,
        Some(r) => Some(
            Reason::ALL
                .into_iter()
                .find(|x| x.as_str() == r)
                .ok_or_else(|| bad_request(format!("unknown reason {r:?}")))?,
        ),
    };
    // cursor = "<received_ms>.<row id>" of the last line of the previous page
    let after = match &q.cursor {
        None => None,
        Some(c) => {
            let (t, id) = c.split_once('.').ok_or_else(|| bad_cursor(c))?;
            Some((t.parse().map_err(|_| bad_cursor(c))?, id.to_owned()))
        }
    };
    let rows = state.store.quarantine_page(reason, after, limit + 1).await?;
    let Page { items, next } = page(rows, limit, |(id, l)| format!("{}.{id}", l.received_ms));
    Ok(Json(Page { items: items.into_iter().map(|(_, l)| l).collect(), next }))
}

async fn page_fleet(State(state): State<AppState>) -> Result<maud::Markup, ApiError> {
    let devices = state.store.devices().await?;
    let quarantine = state.store.quarantine_counts().await?;
    let now = time::now_ms();
    // The count only (the drift index's summary): the list is /twins' business.
    let drifting = state.store.drift_summary().await?.drifting;
    let health = fleet_health(&devices, quarantine, &state, now);
    Ok(dashboard::fleet_page(&health, &devices, drifting, now))
}

/// The oldest drifts, through the drift index: one more than a page lists, to tell whether
/// there are more.
async fn drifting(state: &AppState, now: i64) -> Result<dashboard::Drifting, ApiError> {
    let twins = state.store.drifting_since(now, dashboard::TWIN_ROWS + 1).await?;
    let summary = state.store.drift_summary().await?;
    Ok(dashboard::Drifting::from_oldest(twins, summary.drifting))
}

async fn page_twins(State(state): State<AppState>) -> Result<maud::Markup, ApiError> {
    let now = time::now_ms();
    Ok(dashboard::twins_page(&drifting(&state, now).await?, now))
}

#[derive(Deserialize)]
struct TwinParams {
    /// A named shadow; absent or empty: the classic one.
    shadow: Option<String>,
}

async fn page_twin(
    State(state): State<AppState>,
    Path(t): Path<String>,
    Query(q): Query<TwinParams>,
) -> Result<Response, ApiError> {
    let thing = thing(&t)?;
    let shadow = ShadowName::parse(q.shadow.as_deref().unwrap_or(""))
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(match state.store.twin(&thing, &shadow).await? {
        Some(twin) => dashboard::twin_page(&twin, time::now_ms()).into_response(),
        None => (StatusCode::NOT_FOUND, dashboard::no_twin_page(&thing, &shadow)).into_response(),
    })
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

/// `/slo`: the last evaluation, and the fleet's ledger rows its charts are drawn from (one
/// read per minute charted: [`dashboard::slo_chart_minutes`], whatever the fleet's size).
async fn page_slo(State(state): State<AppState>) -> Result<maud::Markup, ApiError> {
    let Some(report) = state.store.latest_health().await? else {
        return Ok(dashboard::no_slo_page());
    };
    let catalog = Catalog::builtin();
    let fleet = Cohort::fleet();
    let mut rows = dashboard::LedgerSamples::new();
    for m in dashboard::slo_chart_minutes(&catalog, report.minute) {
        rows.insert(m, state.store.row_at(&fleet, m).await?.map(|(_, tally)| tally));
    }
    Ok(dashboard::slo_page(&catalog, &report, &rows, time::now_ms()))
}

async fn page_campaigns(State(state): State<AppState>) -> Result<maud::Markup, ApiError> {
    let campaigns = state.store.campaigns_to_show(dashboard::ota::CAMPAIGN_ROWS).await?;
    let counts = state.store.campaign_counts().await?;
    Ok(dashboard::ota::campaigns_page(&campaigns, &counts, time::now_ms()))
}

async fn page_campaign(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(match state.store.campaign(&id).await? {
        Some(c) => dashboard::ota::campaign_page(&c, time::now_ms()).into_response(),
        None => (StatusCode::NOT_FOUND, dashboard::ota::no_campaign_page(&id)).into_response(),
    })
}

async fn api_campaigns(
    State(state): State<AppState>,
    Query(p): Query<PageParams>,
) -> Result<Json<Page<Campaign>>, ApiError> {
    // A campaign holds up to 100 log lines and two signed manifests: smaller pages.
    let limit = page_limit(p.limit)?.min(MAX_CAMPAIGN_PAGE);
    let (items, next) = state.store.campaigns_page(p.cursor.clone(), limit).await?;
    Ok(Json(Page { items, next }))
}

/// `/api/slo`: the last evaluation, at most [`MAX_PAGE`] cohorts (the report lists the fleet
/// first); `cohorts_omitted` says how many more it held.
#[derive(Debug, Serialize)]
struct SloAnswer {
    #[serde(flatten)]
    report: HealthReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    cohorts_omitted: Option<usize>,
}

async fn api_slo(State(state): State<AppState>) -> Result<Json<SloAnswer>, ApiError> {
    let Some(mut report) = state.store.latest_health().await? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "no fleet health report yet: fleet-health has not run (it runs every minute)".to_owned(),
        ));
    };
    let omitted = report.cohorts.len().saturating_sub(MAX_PAGE);
    report.cohorts.truncate(MAX_PAGE);
    Ok(Json(SloAnswer { report, cohorts_omitted: (omitted > 0).then_some(omitted) }))
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page_fleet))
        .route("/devices/{thing}", get(page_device))
        .route("/twins", get(page_twins))
        .route("/twins/{thing}", get(page_twin))
        .route("/slo", get(page_slo))
        .route("/ota", get(page_campaigns))
        .route("/ota/{id}", get(page_campaign))
        .route("/api/health", get(api_health))
        .route("/api/devices", get(api_devices))
        .route("/api/devices/{thing}/telemetry", get(api_telemetry))
        .route("/api/quarantine", get(api_quarantine))
        .route("/api/slo", get(api_slo))
        .route("/api/campaigns", get(api_campaigns))
        .with_state(state)
}

pub async fn serve(listener: tokio::net::TcpListener, state: AppState) {
    if let Err(e) = axum::serve(listener, router(state)).await {
        tracing::warn!(error = %e, "HTTP server stopped");
    }
}
