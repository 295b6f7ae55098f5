//! The local stack: IoT Core on one laptop. In one process: an MQTT broker (rumqttd; MQTT
//! 3.1.1 and 5), a rules engine running the topic rules of `infra/template.yaml`, the
//! function handlers in-process on the embedded (SQLite) backend, local SQS-style batching
//! with retries and a dead-letter count, and an HTTP API + dashboard.

pub mod dashboard;
pub mod http;
pub mod sql;
pub mod stats;
pub mod template;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::ingest::IngestPolicy;
use fleet_shared::metrics::MetricsOut;
use fleet_shared::time;
use ingest_telemetry::handler::{self, EmbeddedDeps};
use lambda_runtime::{Context as LambdaContext, LambdaEvent};
use rumqttd::{Broker, Notification};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use self::stats::Stats;
use self::template::{Rule, Target};

/// The template compiled into fleetctl, used when `infra/template.yaml` is not at hand.
pub const BUILT_IN_TEMPLATE: &str = include_str!("../../../infra/template.yaml");
/// Deliveries of one message before it goes to the dead-letter queue (the template's maxReceiveCount).
const MAX_RECEIVES: u32 = 5;
/// How long the rules engine must see no publish before a shutdown counts as drained.
const QUIET_BEFORE_STOP: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub bind: std::net::IpAddr,
    pub mqtt_port: u16,
    pub mqtt5_port: u16,
    pub http_port: u16,
    pub db: PathBuf,
    /// `None`: `infra/template.yaml` if present, else the built-in copy.
    pub template: Option<PathBuf>,
    /// Longest a local queue waits to fill a batch.
    pub batch_window: Duration,
    /// The functions' time rules (from the same variables as in the cloud).
    pub policy: IngestPolicy,
}

/// The functions the local stack can run, by SAM logical id.
fn known_function(logical_id: &str) -> Result<()> {
    match logical_id {
        "IngestTelemetryFunction" => Ok(()),
        other => bail!("function {other} has no local handler in fleetctl"),
    }
}

/// One message waiting in a local queue.
struct Queued {
    id: u64,
    body: String,
    sent_ms: i64,
    receives: u32,
}

pub struct LocalStack {
    pub stats: Arc<Stats>,
    pub store: SqliteStore,
    pub mqtt: SocketAddr,
    pub mqtt5: SocketAddr,
    pub http: SocketAddr,
    pub rules: Vec<Rule>,
    pub template_source: String,
    stop_rules: watch::Sender<bool>,
    drain_queues: watch::Sender<bool>,
    rules_task: JoinHandle<()>,
    queue_tasks: Vec<JoinHandle<()>>,
    http_task: JoinHandle<()>,
}

fn load_rules(opts: &LocalOptions) -> Result<(Vec<Rule>, String)> {
    let default = Path::new("infra/template.yaml");
    let (text, source) = match &opts.template {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None if default.exists() => (std::fs::read_to_string(default)?, default.display().to_string()),
        None => (BUILT_IN_TEMPLATE.to_owned(), "built-in infra/template.yaml".to_owned()),
    };
    let rules = template::parse(&text).with_context(|| source.clone())?;
    // Scheduled functions run on local timers once one has a local handler; until then a
    // schedule stops start-up rather than being skipped silently.
    if let Some(s) = template::schedules(&text).with_context(|| source.clone())?.first() {
        known_function(&s.function)
            .with_context(|| format!("schedule {} of {}", s.expression, s.function))?;
        bail!("schedule {} of {}: timers have no scheduled handler to call yet", s.expression, s.function);
    }
    for rule in &rules {
        for t in &rule.targets {
            match t {
                Target::Queue { function, .. } | Target::Function { function } => {
                    known_function(function).with_context(|| format!("topic rule {}", rule.name))?
                }
            }
        }
    }
    Ok((rules, source))
}

fn broker_config(opts: &LocalOptions) -> Result<rumqttd::Config> {
    let server = |name: &str, port: u16| {
        serde_json::json!({
            "name": name,
            "listen": SocketAddr::new(opts.bind, port).to_string(),
            "next_connection_delay_ms": 0,
            "connections": {
                "connection_timeout_ms": 60000,
                "max_payload_size": fleet_shared::ingest::envelope::MAX_PAYLOAD_BYTES,
                "max_inflight_count": 500,
                "dynamic_filters": true
            }
        })
    };
    let config = serde_json::json!({
        "id": 0,
        "router": {
            "max_connections": 20000,
            "max_outgoing_packet_count": 2000,
            "max_segment_size": 104857600,
            "max_segment_count": 10
        },
        "v4": { "1": server("mqtt-3.1.1", opts.mqtt_port) },
        "v5": { "1": server("mqtt-5", opts.mqtt5_port) }
    });
    serde_json::from_value(config).context("broker configuration")
}

/// Wait until `addr` accepts TCP connections (the broker binds on its own threads).
async fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("MQTT listener {addr} did not come up (port in use?)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub async fn start(opts: &LocalOptions) -> Result<LocalStack> {
    let (rules, template_source) = load_rules(opts)?;
    let store = SqliteStore::open(&opts.db)?;
    let stats = Arc::new(Stats::default());
    // The function's metrics feed the stack's counters, as its EMF lines feed CloudWatch.
    let metric_stats = Arc::clone(&stats);
    let metrics = MetricsOut::Collect(Arc::new(move |set| metric_stats.record_metrics(set)));
    let deps = Arc::new(EmbeddedDeps::embedded(store.clone(), opts.policy, metrics));

    // HTTP first: a taken port fails before anything else starts.
    let http_listener = tokio::net::TcpListener::bind(SocketAddr::new(opts.bind, opts.http_port))
        .await
        .with_context(|| format!("HTTP port {}", opts.http_port))?;
    let http = http_listener.local_addr()?;

    // Broker on its own threads, with an in-process link for the rules engine.
    let mut broker = Broker::new(broker_config(opts)?);
    let (mut link_tx, mut link_rx) = broker.link("fleetline-rules-engine").context("broker link")?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                warn!(error = %e, "MQTT broker stopped");
            }
        })
        .context("broker thread")?;
    link_tx.subscribe("#").context("rules engine subscription")?;
    let mqtt = SocketAddr::new(opts.bind, opts.mqtt_port);
    let mqtt5 = SocketAddr::new(opts.bind, opts.mqtt5_port);
    wait_listening(mqtt).await?;
    wait_listening(mqtt5).await?;

    // One local queue (and consumer) per queue target.
    let (drain_queues, drain_rx) = watch::channel(false);
    let mut queues: Vec<(String, mpsc::UnboundedSender<Queued>)> = Vec::new();
    let mut queue_tasks = Vec::new();
    for rule in &rules {
        for t in &rule.targets {
            if let Target::Queue { queue, batch_size, .. } = t {
                if queues.iter().any(|(q, _)| q == queue) {
                    continue;
                }
                let (tx, rx) = mpsc::unbounded_channel();
                queue_tasks.push(tokio::spawn(consume_queue(
                    rx,
                    tx.clone(),
                    *batch_size,
                    opts.batch_window,
                    Arc::clone(&deps),
                    Arc::clone(&stats),
                    drain_rx.clone(),
                )));
                queues.push((queue.clone(), tx));
            }
        }
    }

    let (stop_rules, mut stop_rx) = watch::channel(false);
    let engine_rules = rules.clone();
    let engine_stats = Arc::clone(&stats);
    let engine_deps = Arc::clone(&deps);
    let rules_task = tokio::spawn(async move {
        let mut next_id = 0u64;
        let mut stopping = false;
        loop {
            let notification = if stopping {
                match tokio::time::timeout(QUIET_BEFORE_STOP, link_rx.next()).await {
                    Ok(n) => n,
                    Err(_) => break,
                }
            } else {
                tokio::select! {
                    n = link_rx.next() => n,
                    _ = stop_rx.changed() => { stopping = true; continue; }
                }
            };
            match notification {
                Ok(Some(Notification::Forward(f))) => {
                    let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                    route(
                        &engine_rules,
                        &queues,
                        &engine_deps,
                        &engine_stats,
                        &topic,
                        &f.publish.payload,
                        &mut next_id,
                    )
                    .await;
                }
                Ok(Some(Notification::Unschedule)) => {
                    if link_rx.wake().await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "rules engine link closed");
                    break;
                }
            }
        }
    });

    let state =
        http::AppState { store: store.clone(), stats: Arc::clone(&stats), started_ms: time::now_ms() };
    let http_task = tokio::spawn(http::serve(http_listener, state));

    Ok(LocalStack {
        stats,
        store,
        mqtt,
        mqtt5,
        http,
        rules,
        template_source,
        stop_rules,
        drain_queues,
        rules_task,
        queue_tasks,
        http_task,
    })
}

/// Evaluate every rule on one publish and hand the outputs to their targets.
async fn route(
    rules: &[Rule],
    queues: &[(String, mpsc::UnboundedSender<Queued>)],
    deps: &EmbeddedDeps,
    stats: &Stats,
    topic: &str,
    payload: &[u8],
    next_id: &mut u64,
) {
    let now = time::now_ms();
    // IoT Core evaluates SQL on JSON payloads; a non-JSON payload reaches `SELECT *` actions
    // unchanged, so the function sees (and quarantines) the original bytes.
    let json: Option<Value> = serde_json::from_slice(payload).ok();
    let mut routed = false;
    for rule in rules {
        let body = match &json {
            Some(v) => {
                let m = sql::Message { topic, payload: v, client_id: None, now_ms: now };
                match rule.statement.apply(&m) {
                    Some(out) => Value::Object(out).to_string(),
                    None => continue,
                }
            }
            None if rule.statement.filter.is_none() && sql::topic_matches(&rule.statement.from, topic) => {
                String::from_utf8_lossy(payload).into_owned()
            }
            None => continue,
        };
        routed = true;
        for target in &rule.targets {
            match target {
                Target::Queue { queue, .. } => {
                    if let Some((_, tx)) = queues.iter().find(|(q, _)| q == queue) {
                        *next_id += 1;
                        let _ =
                            tx.send(Queued { id: *next_id, body: body.clone(), sent_ms: now, receives: 0 });
                    }
                }
                Target::Function { .. } => invoke_direct(deps, stats, &body).await,
            }
        }
    }
    if routed {
        stats.routed.fetch_add(1, Relaxed);
    } else {
        stats.unrouted.fetch_add(1, Relaxed);
    }
}

/// A rule → Lambda action: the handler's direct-invocation path, retried like Lambda's async retries.
async fn invoke_direct(deps: &EmbeddedDeps, stats: &Stats, body: &str) {
    for attempt in 1..=3 {
        let Ok(raw) = serde_json::value::RawValue::from_string(body.to_owned()) else { return };
        match handler::handle(deps, LambdaEvent::new(raw, LambdaContext::default())).await {
            // Counted from the function's metrics.
            Ok(_) => return,
            Err(e) => {
                warn!(attempt, error = %e, "direct invocation failed");
                stats.retried.fetch_add(1, Relaxed);
            }
        }
    }
    stats.dead_lettered.fetch_add(1, Relaxed);
}

/// A local SQS queue and its Lambda event source mapping: batches of up to `batch_size`
/// (waiting at most `window`), failed messages redelivered, after `MAX_RECEIVES` dead-lettered.
async fn consume_queue(
    mut rx: mpsc::UnboundedReceiver<Queued>,
    requeue: mpsc::UnboundedSender<Queued>,
    batch_size: usize,
    window: Duration,
    deps: Arc<EmbeddedDeps>,
    stats: Arc<Stats>,
    mut draining: watch::Receiver<bool>,
) {
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = draining.wait_for(|d| *d) => {
                if rx.is_empty() {
                    return;
                }
                continue;
            }
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + window;
        while batch.len() < batch_size {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => batch.push(m),
                _ => break,
            }
        }
        deliver(batch, &requeue, &deps, &stats).await;
    }
}

async fn deliver(
    batch: Vec<Queued>,
    requeue: &mpsc::UnboundedSender<Queued>,
    deps: &EmbeddedDeps,
    stats: &Stats,
) {
    let mut event = SqsEvent::default();
    event.records = batch
        .iter()
        .map(|q| {
            let mut m = SqsMessage::default();
            m.message_id = Some(format!("local-{}", q.id));
            m.body = Some(q.body.clone());
            m.attributes.insert("SentTimestamp".into(), q.sent_ms.to_string());
            m.attributes.insert("ApproximateReceiveCount".into(), (q.receives + 1).to_string());
            m.event_source = Some("aws:sqs".into());
            m
        })
        .collect();
    // Invoked as Lambda invokes it: the event as JSON, the batch response back.
    let response = match invoke_sqs(deps, &event).await {
        Ok(r) => r,
        Err(e) => {
            // The whole invocation failed: SQS would redeliver every message.
            warn!(error = %e, "queue batch invocation failed");
            fleet_shared::lambda::batch_response(event.records.iter().filter_map(|m| m.message_id.as_deref()))
        }
    };
    let failed: std::collections::HashSet<&str> =
        response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
    let now = time::now_ms();
    let mut latencies = Vec::with_capacity(batch.len());
    for q in batch {
        if failed.contains(format!("local-{}", q.id).as_str()) {
            if q.receives + 1 >= MAX_RECEIVES {
                warn!(message = q.id, "message failed {MAX_RECEIVES} times: dead-lettered");
                stats.dead_lettered.fetch_add(1, Relaxed);
            } else {
                stats.retried.fetch_add(1, Relaxed);
                let _ = requeue.send(Queued { receives: q.receives + 1, ..q });
            }
        } else {
            latencies.push((now - q.sent_ms).max(0) as u32);
        }
    }
    stats.record_latencies(latencies, now);
}

/// One SQS batch through the function's own entry point, as JSON in and out.
async fn invoke_sqs(deps: &EmbeddedDeps, event: &SqsEvent) -> Result<SqsBatchResponse> {
    let raw = serde_json::value::to_raw_value(event)?;
    match handler::handle(deps, LambdaEvent::new(raw, LambdaContext::default())).await? {
        handler::Response::Sqs(r) => Ok(r),
        handler::Response::Direct(_) => bail!("an SQS event was answered as a direct invocation"),
    }
}

impl LocalStack {
    /// Stop taking new work, drain what the broker acknowledged, flush the queues, stop HTTP.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop_rules.send(true);
        self.rules_task.await.context("rules engine")?;
        let _ = self.drain_queues.send(true);
        for t in self.queue_tasks {
            t.await.context("queue consumer")?;
        }
        self.http_task.abort();
        info!("local stack stopped; every acknowledged message was handled");
        Ok(())
    }
}
