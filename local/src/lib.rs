//! The local IoT Core: the AWS side of a fleet on one laptop, organised as IoT Core's services.
//!
//! | module | emulates |
//! |---|---|
//! | [`broker`] | the message broker: MQTT 3.1.1 and 5 on one port, the device policy on every connect/publish/subscribe, lifecycle events ([`lifecycle`], [`policy`]) |
//! | [`rules`] | the rules engine: the template's topic rules and their SQL |
//! | [`queue`] | SQS queues and the Lambda event source mappings that read them |
//! | [`schedule`] | EventBridge schedules |
//! | [`functions`] | Lambda: functions by name, JSON in and out; [`catalog`] says which handler is which |
//! | [`jobs`] | IoT Jobs' device MQTT API, notifications and job events over the jobs in the database |
//! | [`provisioning`], [`ca`] | fleet provisioning by claim (CreateKeysAndCertificate, RegisterThing with the pre-provisioning hook), certificates from a local CA |
//! | [`http`], [`dashboard`] | a JSON API and dashboard over the embedded store |
//!
//! What runs is read from `infra/template.yaml` ([`template`]): which rule feeds which queue or
//! function, which function runs on which schedule, and the device policy.
//! Everything runs on the embedded backend (SQLite), in one process.

pub mod broker;
pub mod ca;
pub mod catalog;
pub mod dashboard;
pub mod functions;
pub mod http;
pub mod jobs;
pub mod lifecycle;
pub mod policy;
pub mod provisioning;
pub mod queue;
pub mod rules;
pub mod schedule;
pub mod shadow;
pub mod shadow_client;
pub mod stats;
pub mod template;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::commands::CommandSigner;
use fleet_shared::lambda::EmbeddedBackend;
use fleet_shared::metrics::MetricsOut;
use fleet_shared::ota::manifest::ManifestSigner;
use fleet_shared::{time, Env};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use self::broker::{Broker, BrokerOptions};
use self::rules::Engine;
use self::stats::Stats;
use self::template::{Rule, Target, Template};

/// The template compiled in, used when `infra/template.yaml` is not at hand.
pub const BUILT_IN_TEMPLATE: &str = include_str!("../../infra/template.yaml");

#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub bind: std::net::IpAddr,
    /// MQTT 3.1.1 and 5, one port (0: any free port).
    pub mqtt_port: u16,
    pub http_port: u16,
    pub db: PathBuf,
    /// `None`: `infra/template.yaml` if present, else the built-in copy.
    pub template: Option<PathBuf>,
    /// Longest a local queue waits to fill a batch.
    pub batch_window: Duration,
    /// The functions' variables, as in the cloud (e.g. the ingest time rules).
    pub env: Env,
    /// How long a shutdown may take to handle what was acknowledged before it gives up.
    pub drain_deadline: Duration,
}

impl LocalOptions {
    /// On loopback, any free ports, this repository's template, no variables, short batch windows:
    /// an embedded IoT Core for tests and tools that start one in-process.
    pub fn ephemeral(db: &Path) -> Self {
        Self {
            bind: [127, 0, 0, 1].into(),
            mqtt_port: 0,
            http_port: 0,
            db: db.to_path_buf(),
            template: Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/template.yaml"))),
            batch_window: Duration::from_millis(10),
            env: Env::from_fn(|_| None),
            drain_deadline: Duration::from_secs(10),
        }
    }
}

// The validity of the certificates fleet provisioning issues is a variable of `env`
// (`FLEET_LOCAL_CERT_VALIDITY_DAYS`, see [`provisioning::ProvisioningOptions::from_env`]).

pub struct LocalStack {
    pub stats: Arc<Stats>,
    pub store: SqliteStore,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub template: Template,
    pub template_source: String,
    /// Fleet provisioning (`None`: the template has no provisioning template): its claim
    /// certificate and the local CA.
    pub provisioning: Option<Arc<provisioning::Provisioning>>,
    /// The key commands are signed with here: its id and public half (what devices trust).
    pub command_key: (String, fleet_shared::commands::VerifyingKey),
    functions: Arc<functions::Functions>,
    broker: Broker,
    drain_deadline: Duration,
    drain_queues: watch::Sender<bool>,
    engine_task: JoinHandle<()>,
    queue_tasks: Vec<JoinHandle<()>>,
    timers: Vec<JoinHandle<()>>,
    http_task: JoinHandle<()>,
}

fn load_template(opts: &LocalOptions) -> Result<(Template, String)> {
    let default = Path::new("infra/template.yaml");
    let (text, source) = match &opts.template {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None if default.exists() => (std::fs::read_to_string(default)?, default.display().to_string()),
        None => (BUILT_IN_TEMPLATE.to_owned(), "built-in infra/template.yaml".to_owned()),
    };
    let template = Template::read(&text).with_context(|| source.clone())?;
    Ok((template, source))
}

/// Where the local IoT Core keeps its command signing key unless told otherwise: next to its
/// database (`<db>.command-key`).
pub fn command_key_file(db: &Path) -> PathBuf {
    let mut p = db.to_path_buf().into_os_string();
    p.push(".command-key");
    PathBuf::from(p)
}

/// A signing key's seed text from `path`: made first if missing (32 random bytes in base64,
/// owner-readable only; another process on the same database making it first is fine).
fn key_file(what: &str, path: &Path) -> Result<String> {
    if !path.exists() {
        use base64::Engine as _;
        use std::io::Write as _;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness for the {what}: {e}"))?;
        let mut file = std::fs::OpenOptions::new();
        file.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
        match file.open(path) {
            Ok(mut f) => f
                .write_all(base64::engine::general_purpose::STANDARD.encode(seed).as_bytes())
                .with_context(|| format!("writing the {what} {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("writing the {what} {}", path.display())),
        }
    }
    std::fs::read_to_string(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// The command signing key's file, and the functions' variables naming it (`FLEET_COMMAND_KEY_FILE`,
/// `FLEET_COMMAND_KEY_ID`). Unless the user gave one, the key is `<db>.command-key`, 32 random
/// bytes in base64, made (owner-readable only) on first start.
fn command_key(opts: &LocalOptions) -> Result<(CommandSigner, Env)> {
    let kid = opts.env.optional("FLEET_COMMAND_KEY_ID").unwrap_or_else(|| "local".to_owned());
    let path =
        opts.env.optional("FLEET_COMMAND_KEY_FILE").map_or_else(|| command_key_file(&opts.db), PathBuf::from);
    let text = key_file("command key", &path)?;
    let signer = CommandSigner::from_text(kid.clone(), &text).with_context(|| path.display().to_string())?;
    let base = opts.env.clone();
    let file = path.display().to_string();
    let env = Env::from_fn(move |k| match k {
        "FLEET_COMMAND_KEY_FILE" => Some(file.clone()),
        "FLEET_COMMAND_KEY_ID" => Some(kid.clone()),
        _ => base.optional(k),
    });
    Ok((signer, env))
}

/// The id of the local firmware signing key (`<db>.firmware-key`), as manifests name it.
pub const FIRMWARE_KEY_ID: &str = "local-fw";

/// Where the local IoT Core keeps its firmware signing key: next to its database
/// (`<db>.firmware-key`).
pub fn firmware_key_file(db: &Path) -> PathBuf {
    let mut p = db.to_path_buf().into_os_string();
    p.push(".firmware-key");
    PathBuf::from(p)
}

/// The local firmware signing key ([`FIRMWARE_KEY_ID`]): `<db>.firmware-key`, 32 random bytes
/// in base64, made (owner-readable only) if missing, as on the local IoT Core's first start.
/// Local campaigns' manifests are signed with it (`fleetctl demo --ota`, tests); its own key,
/// not the command key, as devices trust it for another power.
pub fn firmware_signer(db: &Path) -> Result<ManifestSigner> {
    let path = firmware_key_file(db);
    let text = key_file("firmware key", &path)?;
    ManifestSigner::from_text(FIRMWARE_KEY_ID, &text).with_context(|| path.display().to_string())
}

/// `FLEET_FIRMWARE_KEYS` trusting the local firmware key: `local-fw=<public key, base64>`, for
/// whoever checks manifests signed with it (campaigns, devices). Makes the key if missing.
pub fn firmware_keys_var(db: &Path) -> Result<String> {
    use base64::Engine as _;
    let key = firmware_signer(db)?.verifying_key();
    Ok(format!("{FIRMWARE_KEY_ID}={}", base64::engine::general_purpose::STANDARD.encode(key.as_bytes())))
}

pub async fn start(opts: &LocalOptions) -> Result<LocalStack> {
    let (template, template_source) = load_template(opts)?;
    let store = SqliteStore::open(&opts.db)?;
    let stats = Arc::new(Stats::default());
    // The functions' metrics feed the counters, as their EMF lines feed CloudWatch.
    let metric_stats = Arc::clone(&stats);
    let metrics = MetricsOut::Collect(Arc::new(move |set| metric_stats.record_metrics(set)));
    // The key command-dispatch signs with: the user's (FLEET_COMMAND_KEY_FILE), else one kept
    // next to the database, made on first start.
    let (command_key, env) = command_key(opts)?;
    // Campaigns trust the local firmware key (made on first start), unless the user names keys.
    let firmware_keys = firmware_keys_var(&opts.db)?;
    let env = Env::from_fn(move |k| match k {
        "FLEET_FIRMWARE_KEYS" => env.optional(k).or_else(|| Some(firmware_keys.clone())),
        _ => env.optional(k),
    });
    let backend = EmbeddedBackend { db: store.clone(), env };
    // Functions that write shadows (twin-sync's stale-desired releases) reach the shadow
    // service over MQTT, as an operator would, once the broker listens.
    let mqtt_addr = Arc::new(std::sync::OnceLock::new());
    let functions = Arc::new(catalog::functions(&backend, &metrics, Arc::clone(&mqtt_addr))?);
    for (function, by) in template.invoked_functions() {
        if !functions.contains(function) {
            bail!("{by} invokes {function}, which has no local handler (add it to fleet-local's catalog.rs)");
        }
    }

    // HTTP first: a taken port fails before anything else starts.
    let http_listener = tokio::net::TcpListener::bind(SocketAddr::new(opts.bind, opts.http_port))
        .await
        .with_context(|| format!("HTTP port {}", opts.http_port))?;
    let http = http_listener.local_addr()?;

    // One queue (and consumer) per queue an SQS action sends to.
    let (drain_queues, drain_rx) = watch::channel(false);
    let mut queues = HashMap::new();
    let mut queue_tasks = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    for rule in &template.rules {
        for t in &rule.targets {
            if let Target::Queue { queue, function, batch_size, max_concurrency } = t {
                if queues.contains_key(queue) {
                    continue;
                }
                let config = queue::QueueConfig {
                    function: function.clone(),
                    batch_size: *batch_size,
                    // One laptop: as many batches at a time as it has cores, within the limit.
                    concurrency: (*max_concurrency).clamp(1, cores),
                    window: opts.batch_window,
                };
                let (sender, task) =
                    queue::spawn(config, Arc::clone(&functions), Arc::clone(&stats), drain_rx.clone());
                queues.insert(queue.clone(), sender);
                queue_tasks.push(task);
            }
        }
    }

    let provisioning = if template.provisioning.is_empty() {
        None
    } else {
        let options = provisioning::ProvisioningOptions::from_env(&opts.env)?;
        let now = time::now_ms();
        let ca = ca::LocalCa::open(&store, now).await?;
        let (claim, _) = ca.claim(&store, now).await?;
        info!(claim = %claim, "fleet provisioning: claim holders connect with MQTT username cert/<claim id>");
        Some(Arc::new(provisioning::Provisioning::new(
            store.clone(),
            Arc::clone(&functions),
            template.provisioning.clone(),
            ca,
            claim,
            options,
        )))
    };
    let broker_opts = BrokerOptions {
        addr: SocketAddr::new(opts.bind, opts.mqtt_port),
        policy: template.device_policy.clone(),
        max_payload_bytes: fleet_shared::ingest::envelope::MAX_PAYLOAD_BYTES,
        shadows: shadow::Shadows::restore(store.local_shadows().await?),
        shadow_store: Some(store.clone()),
        claim_policy: template.claim_policy.clone(),
        provisioning: provisioning.clone(),
        jobs: Some(Arc::new(jobs::Jobs::new(store.clone()))),
    };
    let (broker, mut intake) = Broker::start(broker_opts, Arc::clone(&stats)).await?;
    let _ = mqtt_addr.set(broker.addr);
    let engine = Engine {
        rules: template.rules.clone(),
        queues,
        functions: Arc::clone(&functions),
        stats: Arc::clone(&stats),
        errors: store.clone(),
    };
    let engine_task = tokio::spawn(async move {
        while let Some(inbound) = intake.next().await {
            engine.route(&inbound).await;
        }
    });
    let timers = template
        .schedules
        .iter()
        .map(|s| schedule::spawn(s.clone(), Arc::clone(&functions), Arc::clone(&stats)))
        .collect();

    let state =
        http::AppState { store: store.clone(), stats: Arc::clone(&stats), started_ms: time::now_ms() };
    let http_task = tokio::spawn(http::serve(http_listener, state));

    Ok(LocalStack {
        stats,
        store,
        mqtt: broker.addr,
        http,
        template,
        template_source,
        provisioning,
        command_key: (command_key.kid().to_owned(), command_key.verifying_key()),
        functions,
        broker,
        drain_deadline: opts.drain_deadline,
        drain_queues,
        engine_task,
        queue_tasks,
        timers,
        http_task,
    })
}

impl LocalStack {
    pub fn rules(&self) -> &[Rule] {
        &self.template.rules
    }

    /// Invoke one of the template's functions by logical id, as Lambda's Invoke would.
    pub async fn invoke(&self, function: &str, event: &serde_json::Value) -> Result<serde_json::Value> {
        self.functions.invoke(function, event).await.map_err(|e| anyhow::anyhow!("{function}: {e}"))
    }

    /// Run a scheduled function now, with the event its timer sends (EventBridge's shape);
    /// its answer.
    pub async fn run_schedule(&self, function: &str) -> Result<serde_json::Value> {
        let event = schedule::scheduled_event(function, time::now_ms());
        Ok(self.functions.invoke(function, &event).await?)
    }

    /// Stop intake (no new connections; publishes from now on are left unacknowledged), handle
    /// everything already acknowledged — rules, queues, functions — within the drain deadline,
    /// then disconnect every client and stop.
    pub async fn shutdown(self) -> Result<()> {
        let LocalStack {
            broker,
            drain_deadline,
            drain_queues,
            engine_task,
            queue_tasks,
            timers,
            http_task,
            ..
        } = self;
        broker.stop_intake();
        let drained = tokio::time::timeout(drain_deadline, async {
            engine_task.await.context("rules engine")?;
            let _ = drain_queues.send(true);
            for t in queue_tasks {
                t.await.context("queue consumer")?;
            }
            anyhow::Ok(())
        })
        .await;
        for t in &timers {
            t.abort();
        }
        broker.stop().await;
        http_task.abort();
        match drained {
            Ok(result) => result?,
            Err(_) => bail!(
                "the drain deadline ({drain_deadline:?}) passed before every acknowledged message was handled"
            ),
        }
        info!("local IoT Core stopped; every acknowledged message was handled");
        Ok(())
    }
}
