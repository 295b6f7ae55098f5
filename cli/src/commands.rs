//! The commands: parse arguments into domain values, build the ports the command uses on the
//! configured backend (the functions' own variables; embedded SQLite by default), call them, print.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use fleet_shared::adapters::aws::{
    CampaignsTable, CertificatesTable, CommandsTable, DevicesTable, HealthTable, HotStore, HotStoreKind,
    IotControlPlane, IotDataShadows, IotJobs, LambdaInvoker, PresenceTables, S3Archive, TelemetryReader,
    TwinsTable,
};
use fleet_shared::certs::{decommission, reconcile};
use fleet_shared::health::backfill::count_connected;
use fleet_shared::health::slo::Catalog;
use fleet_shared::health::tally::Cohort as HealthCohort;
use fleet_shared::ingest::{
    ingest_batch, messages_from_event, replay, BatchOutcome, Inbound, IngestPolicy, IngestPorts,
    OwnedInbound, ReplayPorts,
};
use fleet_shared::lambda::Backend;
use fleet_shared::model::{
    validate_label, AllowlistEntry, CertificateId, DeviceRegistration, Enrolment, ShadowName, StaleAction,
    ThingName, Twin,
};
use fleet_shared::ota::engine::{Engine, RotationPorts};
use fleet_shared::ota::gate::evaluate;
use fleet_shared::ota::manifest::{ManifestVerifier, FIRMWARE_KEYS_VAR};
use fleet_shared::ports::{
    Allowlist, ArchiveReader, CertificateControl, CertificateInventory, CertificateRegistry, CommandStore,
    DeviceAdmin, DeviceRegistry, PresenceReader, ProvisioningAudit, Quarantine, QuarantineReader, RawArchive,
    ShadowService, SloReader, TelemetryQuery, TelemetrySink, TwinPolicies, TwinStore,
};
use fleet_shared::twin::policy::StalePolicy;
use fleet_shared::twin::write::WriteOutcome;
use fleet_shared::{time, BackendKind, Env};

use crate::output;
use crate::{
    AllowlistCommand, CampaignCommand, CertsCommand, Cli, Cohort, Command, CommandCommand, DevicesCommand,
    OtaCommand, PolicyAction, PolicyCommand, QuarantineCommand, TwinCommand,
};

/// The functions' variables, with the embedded backend (on `--db`) as the default.
fn env(cli: &Cli) -> Env {
    let db = cli.db.to_string_lossy().into_owned();
    Env::from_fn(move |k| match std::env::var(k).ok() {
        Some(v) => Some(v),
        None if k == "FLEET_BACKEND" => Some("embedded".to_owned()),
        None if k == "FLEET_DB" => Some(db.clone()),
        None => None,
    })
}

fn local_options(cli: &Cli, a: &crate::StackArgs) -> Result<fleet_local::LocalOptions> {
    let env = env(cli);
    if !matches!(env.backend()?, BackendKind::Embedded { .. }) {
        bail!("the local stack runs on the embedded backend: unset FLEET_BACKEND or set it to embedded");
    }
    Ok(fleet_local::LocalOptions {
        bind: a.bind,
        mqtt_port: a.mqtt_port,
        http_port: a.http_port,
        db: cli.db.clone(),
        template: a.template.clone(),
        batch_window: std::time::Duration::from_millis(a.batch_window_ms),
        env,
        drain_deadline: a.drain_deadline,
    })
}

pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Local { stack } => return local(local_options(&cli, stack)?).await,
        Command::Demo {
            stack,
            devices,
            duration,
            rate,
            pack,
            keep_running,
            seed,
            provision,
            ota,
            ota_every,
            rotate,
        } => {
            let opts = crate::demo::DemoOptions {
                devices: *devices,
                duration: *duration,
                rate: *rate,
                pack: usize::from(*pack),
                keep_running: *keep_running,
                seed: *seed,
                quirks: fleet_shared::ingest::sim::Quirks::default(),
                provision: *provision || *rotate,
                ota: ota.clone(),
                ota_every: *ota_every,
                rotate: *rotate,
            };
            return crate::demo::run(local_options(&cli, stack)?, opts, cli.json).await;
        }
        _ => {}
    }
    let env = env(&cli);
    let kind = env.backend()?;
    let policy = IngestPolicy::from_env(&env, &kind)?;
    let json = cli.json;
    // Each command builds only the ports it uses, as a function would.
    match Backend::connect(env).await? {
        Backend::Aws(aws) => {
            let (sdk, env) = (&aws.sdk, &aws.env);
            // Only the commands that read or write telemetry need to know the hot store.
            let hot_policy = || -> Result<IngestPolicy> { Ok(HotStoreKind::from_env(env)?.policy(policy)) };
            match cli.command {
                Command::Devices { command: DevicesCommand::CountConnected { page } } => {
                    let devices = DevicesTable::from_env(sdk, env)?;
                    let presence =
                        PresenceTables { devices: devices.clone(), health: HealthTable::from_env(sdk, env)? };
                    output::backfilled(&count_connected(&presence, &devices, page).await?, json)
                }
                Command::Devices { command: DevicesCommand::Decommission { thing } } => {
                    let certs_table = CertificatesTable::from_env(sdk, env)?;
                    let iot = IotControlPlane::new(sdk)?;
                    let ports = decommission::Ports {
                        allowlist: &certs_table,
                        registry: &iot,
                        inventory: &certs_table,
                        audit: &certs_table,
                    };
                    decommission_device(ports, &thing, json).await
                }
                Command::Devices { command: DevicesCommand::RetireCerts { thing, force } } => {
                    let certs_table = CertificatesTable::from_env(sdk, env)?;
                    let iot = IotControlPlane::new(sdk)?;
                    let ports = decommission::Ports {
                        allowlist: &certs_table,
                        registry: &iot,
                        inventory: &certs_table,
                        audit: &certs_table,
                    };
                    retire_certs(ports, &DevicesTable::from_env(sdk, env)?, &thing, force, json).await
                }
                Command::Devices { command } => {
                    devices(&DevicesTable::from_env(sdk, env)?, command, json).await
                }
                Command::Telemetry { thing, since, limit } => {
                    // From the hot store the deployment has, else from the raw archive.
                    telemetry(&TelemetryReader::from_env(sdk, env, policy)?, &thing, since, limit, json).await
                }
                Command::Quarantine { command } => {
                    quarantine(&S3Archive::from_env(sdk, env)?, command, json).await
                }
                Command::Twin { command: TwinCommand::Set { thing, values, shadow, .. } } => {
                    twin_set(&IotDataShadows::from_env(sdk, env)?, &thing, &shadow, &values, json).await
                }
                Command::Twin { command: TwinCommand::Delete { thing, shadow, .. } } => {
                    twin_delete(&IotDataShadows::from_env(sdk, env)?, &thing, &shadow, json).await
                }
                Command::Twin { command: TwinCommand::Policy { command } } => {
                    twin_policy(&TwinsTable::from_env(sdk, env)?, command, json).await
                }
                Command::Twin { command } => {
                    // The registry only for --class/--region, so twin commands need only the
                    // Twins table otherwise.
                    let registry = match env.optional("FLEET_DEVICES_TABLE") {
                        Some(_) => Some(DevicesTable::from_env(sdk, env)?),
                        None => None,
                    };
                    twin(&TwinsTable::from_env(sdk, env)?, registry.as_ref(), command, json).await
                }
                Command::Replay { prefix } => {
                    let archive = S3Archive::from_env(sdk, env)?;
                    let ports = ReplayPorts {
                        registry: &DevicesTable::from_env(sdk, env)?,
                        sink: &HotStore::from_env(sdk, env).await?,
                        quarantine: &archive,
                        reader: &archive,
                    };
                    run_replay(ports, &hot_policy()?, &prefix, json).await
                }
                Command::Ingest { files } => {
                    let archive = S3Archive::from_env(sdk, env)?;
                    let ports = IngestPorts {
                        registry: &DevicesTable::from_env(sdk, env)?,
                        sink: &HotStore::from_env(sdk, env).await?,
                        archive: &archive,
                        quarantine: &archive,
                    };
                    ingest_files(ports, &hot_policy()?, &files, json).await
                }
                Command::Allowlist { command } => {
                    allowlist(&CertificatesTable::from_env(sdk, env)?, command, json).await
                }
                Command::Certs { command: CertsCommand::Reconcile { concurrency } } => {
                    let certs_table = CertificatesTable::from_env(sdk, env)?;
                    reconcile_now(&IotControlPlane::new(sdk)?, &certs_table, concurrency, json).await
                }
                Command::Certs { command } => {
                    let certs_table = CertificatesTable::from_env(sdk, env)?;
                    certs(&certs_table, &certs_table, command, json).await
                }
                Command::Command { command: CommandCommand::Send { thing, name, args, ttl, .. } } => {
                    let function = env.required("FLEET_COMMAND_FUNCTION")?;
                    let request = command_request(&thing, &name, &args, ttl)?;
                    let sent =
                        LambdaInvoker::new(sdk)?.invoke(&function, &serde_json::to_value(&request)?).await?;
                    output::command_sent(&serde_json::from_value(sent)?, json)
                }
                Command::Command { command } => {
                    commands_read(&CommandsTable::from_env(sdk, env)?, command, json).await
                }
                Command::Ota { command: OtaCommand::Campaign(command) } => {
                    let verifier = campaign_verifier(env, &command)?;
                    let catalog = crate::ota::catalog();
                    let (fleet, jobs) = (DevicesTable::from_env(sdk, env)?, IotJobs::from_env(sdk, env)?);
                    let health = HealthTable::from_env(sdk, env)?;
                    let rotation = RotationPorts {
                        marks: fleet.clone(),
                        presence: fleet.clone(),
                        allowlist: CertificatesTable::from_env(sdk, env)?,
                    };
                    let engine = Engine {
                        fleet: &fleet,
                        jobs: &jobs,
                        health: &health,
                        rotation: &rotation,
                        catalog: &catalog,
                        verifier: &verifier,
                    };
                    crate::ota::run(&CampaignsTable::from_env(sdk, env)?, &engine, command, json).await
                }
                Command::Ota { command } => ota(&HealthTable::from_env(sdk, env)?, command, json).await,
                Command::Local { .. } | Command::Demo { .. } => unreachable!("handled above"),
            }
        }
        Backend::Embedded(e) => {
            let db = &e.db;
            match cli.command {
                Command::Devices { command: DevicesCommand::CountConnected { page } } => {
                    output::backfilled(&count_connected(db, db, page).await?, json)
                }
                Command::Devices { command: DevicesCommand::Decommission { thing } } => {
                    let ports = decommission::Ports { allowlist: db, registry: db, inventory: db, audit: db };
                    decommission_device(ports, &thing, json).await
                }
                Command::Devices { command: DevicesCommand::RetireCerts { thing, force } } => {
                    let ports = decommission::Ports { allowlist: db, registry: db, inventory: db, audit: db };
                    retire_certs(ports, db, &thing, force, json).await
                }
                Command::Devices { command } => devices(db, command, json).await,
                Command::Telemetry { thing, since, limit } => telemetry(db, &thing, since, limit, json).await,
                Command::Quarantine { command } => quarantine(db, command, json).await,
                Command::Twin { command: TwinCommand::Set { thing, values, shadow, mqtt } } => {
                    twin_set(
                        &fleet_local::shadow_client::MqttShadows::connect(mqtt),
                        &thing,
                        &shadow,
                        &values,
                        json,
                    )
                    .await
                }
                Command::Twin { command: TwinCommand::Delete { thing, shadow, mqtt } } => {
                    twin_delete(
                        &fleet_local::shadow_client::MqttShadows::connect(mqtt),
                        &thing,
                        &shadow,
                        json,
                    )
                    .await
                }
                Command::Twin { command: TwinCommand::Policy { command } } => {
                    twin_policy(db, command, json).await
                }
                Command::Twin { command } => twin(db, Some(db), command, json).await,
                Command::Allowlist { command } => allowlist(db, command, json).await,
                Command::Certs { command: CertsCommand::Reconcile { concurrency } } => {
                    reconcile_now(db, db, concurrency, json).await
                }
                Command::Certs { command } => certs(db, db, command, json).await,
                Command::Replay { prefix } => {
                    let ports = ReplayPorts { registry: db, sink: db, quarantine: db, reader: db };
                    run_replay(ports, &policy, &prefix, json).await
                }
                Command::Ingest { files } => {
                    let ports = IngestPorts { registry: db, sink: db, archive: db, quarantine: db };
                    ingest_files(ports, &policy, &files, json).await
                }
                Command::Command { command: CommandCommand::Send { thing, name, args, ttl, mqtt } } => {
                    // The same function code, signing with the local IoT Core's key and
                    // publishing through its broker (which must be running).
                    let key_file = e.env.optional("FLEET_COMMAND_KEY_FILE").unwrap_or_else(|| {
                        fleet_local::command_key_file(&cli.db).to_string_lossy().into_owned()
                    });
                    let kid = e.env.optional("FLEET_COMMAND_KEY_ID").unwrap_or_else(|| "local".to_owned());
                    let env = fleet_shared::Env::from_fn(move |k| match k {
                        "FLEET_COMMAND_KEY_FILE" => Some(key_file.clone()),
                        "FLEET_COMMAND_KEY_ID" => Some(kid.clone()),
                        _ => None,
                    });
                    let backend = fleet_shared::lambda::EmbeddedBackend { db: db.clone(), env };
                    let mut deps = command_dispatch::handler::EmbeddedDeps::embedded(
                        &backend,
                        fleet_shared::adapters::embedded::MqttPublisher::at(mqtt),
                    )
                    .map_err(|err| {
                        anyhow::anyhow!("{err} (is `fleetctl local` running on this database?)")
                    })?;
                    // Its metrics are the local IoT Core's business, not this command's output.
                    deps.metrics = fleet_shared::metrics::MetricsOut::Off;
                    let request = command_request(&thing, &name, &args, ttl)?;
                    let sent = command_dispatch::handler::dispatch(&deps, request).await?;
                    output::command_sent(&sent, json)
                }
                Command::Command { command } => commands_read(db, command, json).await,
                Command::Ota { command: OtaCommand::Campaign(command) } => {
                    let verifier = campaign_verifier(&e.env, &command)?;
                    let catalog = crate::ota::catalog();
                    let rotation = RotationPorts::of(db);
                    let engine = Engine::over(db, &rotation, &catalog, &verifier);
                    crate::ota::run(db, &engine, command, json).await
                }
                Command::Ota { command } => ota(db, command, json).await,
                Command::Local { .. } | Command::Demo { .. } => unreachable!("handled above"),
            }
        }
    }
}

async fn telemetry(
    query: &impl TelemetryQuery,
    thing: &str,
    since: Option<String>,
    limit: usize,
    json: bool,
) -> Result<()> {
    let thing = ThingName::parse(thing)?;
    let since_ms = since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
    output::readings(&query.telemetry(&thing, since_ms, limit).await?, json)
}

async fn quarantine(reader: &impl QuarantineReader, command: QuarantineCommand, json: bool) -> Result<()> {
    let QuarantineCommand::List { since } = command;
    let since_ms = since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
    output::quarantine(&reader.quarantined(since_ms).await?, json)
}

async fn run_replay<R, S, Q, X>(
    ports: ReplayPorts<'_, R, S, Q, X>,
    policy: &IngestPolicy,
    prefix: &str,
    json: bool,
) -> Result<()>
where
    R: DeviceRegistry,
    S: TelemetrySink,
    Q: Quarantine,
    X: ArchiveReader,
{
    if !prefix.starts_with(fleet_shared::ingest::archive::RAW_PREFIX) {
        bail!("--prefix {prefix:?} must lie under raw/");
    }
    let report = replay(ports, policy, time::now_ms(), prefix).await?;
    output::replay(&report, json)?;
    if report.failed > 0 {
        bail!("{} messages failed to store; replay again (it is idempotent)", report.failed);
    }
    Ok(())
}

async fn ingest_files<R, S, A, Q>(
    ports: IngestPorts<'_, R, S, A, Q>,
    policy: &IngestPolicy,
    files: &[std::path::PathBuf],
    json: bool,
) -> Result<()>
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
{
    for file in files {
        let outcome = ingest_file(ports, policy, file).await?;
        output::ingest_outcome(file, &outcome, json)?;
    }
    Ok(())
}

async fn local(opts: fleet_local::LocalOptions) -> Result<()> {
    let stack = fleet_local::start(&opts).await?;
    eprintln!("fleetline local IoT Core ({})", opts.db.display());
    eprintln!("  MQTT 3.1.1 and 5  mqtt://{}", stack.mqtt);
    eprintln!("  dashboard         http://{}/   API http://{}/api/health", stack.http, stack.http);
    for rule in stack.rules() {
        eprintln!("  rule {} ({}): {}", rule.name, stack.template_source, rule.sql);
    }
    match &stack.template.device_policy {
        Some(p) => eprintln!(
            "  device policy {}: client id = thing name, own topics only (MQTT username {} is exempt)",
            p.name,
            fleet_local::broker::OPERATOR_USERNAME
        ),
        None => eprintln!("  no device policy in the template: every client may publish anywhere"),
    }
    if let (Some(p), Some(t)) = (&stack.provisioning, stack.template.provisioning.first()) {
        eprintln!(
            "  fleet provisioning: template {}, claim holders connect with MQTT username {}{}",
            t.name,
            fleet_local::broker::CERTIFICATE_USERNAME_PREFIX,
            p.claim
        );
    }
    {
        use base64::Engine as _;
        let (kid, key) = &stack.command_key;
        eprintln!(
            "  signed commands: key {kid}, public key (Ed25519, base64) {}; fleetctl command send <thing> <name>",
            base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
        );
        eprintln!(
            "  firmware manifests: key {} ({}); campaigns and devices trust FLEET_FIRMWARE_KEYS={}",
            fleet_local::FIRMWARE_KEY_ID,
            fleet_local::firmware_key_file(&opts.db).display(),
            fleet_local::firmware_keys_var(&opts.db)?
        );
    }
    eprintln!(
        "  publish e.g.: mosquitto_pub -p {} -i sensor-001 -t dt/fleet/sensor-001/telemetry -q 1 -m '{{...}}'",
        stack.mqtt.port()
    );
    eprintln!("Ctrl-C (SIGINT) or SIGTERM stops it; a second signal exits at once.");
    let signal = crate::signals::first_stop_signal().await?;
    eprintln!("{signal}: stopping, draining acknowledged messages (a second signal exits at once) ...");
    crate::signals::exit_on_second_signal();
    let stats = std::sync::Arc::clone(&stack.stats);
    stack.shutdown().await?;
    let s = stats.snapshot(fleet_shared::time::now_ms());
    eprintln!(
        "stopped: delivered {}, stored {}, duplicates {}, quarantined {}, dead-lettered {}, refused by policy {}",
        s.delivered,
        s.metric("Accepted"),
        s.metric("Duplicates"),
        s.metric("Quarantined"),
        s.dead_lettered,
        s.refused_by_policy
    );
    Ok(())
}

async fn devices(
    store: &(impl DeviceAdmin + PresenceReader),
    command: DevicesCommand,
    json: bool,
) -> Result<()> {
    match command {
        DevicesCommand::Register { thing, class, region, fw } => {
            let thing = ThingName::parse(&thing)?;
            validate_label("class", &class)?;
            validate_label("region", &region)?;
            validate_label("fw", &fw)?;
            let registration = DeviceRegistration { class, region, fw, registered_at_ms: time::now_ms() };
            store.register(&[(thing.clone(), registration)]).await?;
            let device =
                store.device(&thing).await?.ok_or_else(|| anyhow!("{thing} vanished after registering"))?;
            output::device(&device, json)
        }
        DevicesCommand::List => output::devices(&store.devices().await?, json),
        DevicesCommand::Show { thing } => {
            let thing = ThingName::parse(&thing)?;
            match store.device(&thing).await? {
                Some(d) => output::device(&d, json),
                None => bail!("no device {thing}"),
            }
        }
        DevicesCommand::Presence { thing } => {
            let thing = ThingName::parse(&thing)?;
            match store.presence(&thing).await? {
                Some(p) => output::presence(&thing, &p, json),
                None => bail!("no lifecycle event of {thing} recorded yet"),
            }
        }
        DevicesCommand::Decommission { .. } | DevicesCommand::RetireCerts { .. } => {
            unreachable!("needs the certificate ports: handled by run")
        }
        DevicesCommand::CountConnected { .. } => unreachable!("needs the presence store: handled by run"),
    }
}

async fn decommission_device<A, R, I, P>(
    ports: decommission::Ports<'_, A, R, I, P>,
    thing: &str,
    json: bool,
) -> Result<()>
where
    A: Allowlist,
    R: CertificateRegistry + CertificateControl,
    I: CertificateInventory,
    P: ProvisioningAudit,
{
    let thing = ThingName::parse(thing)?;
    let done = decommission::decommission(ports, &thing, time::now_ms()).await?;
    output::decommissioned(&done, json)
}

async fn retire_certs<A, R, I, P>(
    ports: decommission::Ports<'_, A, R, I, P>,
    presence: &impl PresenceReader,
    thing: &str,
    force: bool,
    json: bool,
) -> Result<()>
where
    A: Allowlist,
    R: CertificateRegistry + CertificateControl,
    I: CertificateInventory,
    P: ProvisioningAudit,
{
    let thing = ThingName::parse(thing)?;
    let in_use = if force {
        decommission::InUse::Vouched
    } else {
        decommission::InUse::from_presence(presence.presence(&thing).await?.as_ref())
    };
    let scope = decommission::Scope::Attached;
    let done = decommission::retire_superseded(ports, &thing, &in_use, scope, time::now_ms()).await?;
    output::retired(&done, json)
}

/// A whole reconciliation, now (no budget, no cursor: the scheduled function keeps its own).
async fn reconcile_now(
    registry: &impl CertificateRegistry,
    inventory: &impl CertificateInventory,
    concurrency: usize,
    json: bool,
) -> Result<()> {
    let opts = reconcile::Options { concurrency: concurrency.max(1), ..reconcile::Options::default() };
    let result = reconcile::reconcile(registry, inventory, None, time::now_ms(), &opts).await?;
    output::reconciliation(&result, json)
}

/// How many twins an index query reads when a cohort filters them afterwards.
const COHORT_READ: usize = 10_000;

impl Cohort {
    fn is_all(&self) -> bool {
        self.class.is_none() && self.region.is_none()
    }

    /// How many twins to read from an index for `limit` answers in this cohort.
    fn read(&self, limit: usize) -> usize {
        if self.is_all() {
            limit
        } else {
            limit.max(COHORT_READ)
        }
    }
}

/// The first `limit` twins whose device is in `cohort` (all of them when it names no class
/// or region).
async fn in_cohort<R: DeviceRegistry>(
    registry: Option<&R>,
    twins: Vec<Twin>,
    cohort: &Cohort,
    limit: usize,
) -> Result<Vec<Twin>> {
    if cohort.is_all() {
        return Ok(twins);
    }
    let registry =
        registry.context("--class and --region read the device registry: set FLEET_DEVICES_TABLE")?;
    let mut things: Vec<ThingName> = twins.iter().map(|t| t.thing.clone()).collect();
    things.sort();
    things.dedup();
    let devices = registry.get_many(&things).await?;
    let member = |thing: &ThingName| {
        devices.get(thing).is_some_and(|d| {
            cohort.class.as_deref().is_none_or(|c| d.class() == c)
                && cohort.region.as_deref().is_none_or(|r| d.region() == Some(r))
        })
    };
    Ok(twins.into_iter().filter(|t| member(&t.thing)).take(limit).collect())
}

async fn twin<R: DeviceRegistry>(
    store: &impl TwinStore,
    registry: Option<&R>,
    command: TwinCommand,
    json: bool,
) -> Result<()> {
    match command {
        TwinCommand::Show { thing, shadow } => {
            let (thing, shadow) = (ThingName::parse(&thing)?, ShadowName::parse(&shadow)?);
            match store.twin(&thing, &shadow).await? {
                Some(t) => output::twin(&t, json),
                None => bail!("no twin for {thing} / shadow {shadow}"),
            }
        }
        TwinCommand::Policy { .. } => bail!("twin policy is handled with the policies store"),
        TwinCommand::Set { .. } | TwinCommand::Delete { .. } => {
            bail!("twin set and delete go through the shadow service, not the twins store")
        }
        TwinCommand::Query { filter, limit, cohort } => {
            let (key, value) = filter
                .split_once('=')
                .with_context(|| format!("{filter:?}: expected key=value, e.g. fw=1.4.2"))?;
            if key != "fw" {
                bail!("reported.{key} is not indexed (indexed: fw): querying it would read every twin");
            }
            let found = store.reporting_fw(value, cohort.read(limit)).await?;
            output::twins(&in_cohort(registry, found, &cohort, limit).await?, json)
        }
        TwinCommand::Drift { older_than, limit, cohort } => {
            let before = time::now_ms() - older_than.as_millis() as i64;
            let drifting = store.drifting_since(before, cohort.read(limit)).await?;
            let drifting = in_cohort(registry, drifting, &cohort, limit).await?;
            output::drifting(&drifting, time::now_ms(), json)
        }
    }
}

/// `twin set`: the desired patch from `key=value` arguments.
fn desired_patch(values: &[String]) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut patch = serde_json::Map::new();
    for kv in values {
        let (key, raw) = kv.split_once('=').with_context(|| format!("{kv:?}: expected key=value"))?;
        let value = serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.to_owned()));
        let mut path: Vec<&str> = key.split('.').collect();
        let last = path.pop().filter(|k| !k.is_empty()).with_context(|| format!("{kv:?}: empty key"))?;
        let mut node = &mut patch;
        for part in path {
            let entry =
                node.entry(part.to_owned()).or_insert_with(|| serde_json::Value::Object(Default::default()));
            if !entry.is_object() {
                bail!("{kv:?}: {part} is set to a value and used as an object");
            }
            node = entry.as_object_mut().context("object")?;
        }
        node.insert(last.to_owned(), value);
    }
    Ok(patch)
}

async fn twin_set(
    svc: &impl ShadowService,
    thing: &str,
    shadow: &str,
    values: &[String],
    json: bool,
) -> Result<()> {
    let (thing, shadow) = (ThingName::parse(thing)?, ShadowName::parse(shadow)?);
    let patch = desired_patch(values)?;
    let token = format!("fleetctl-{}-{}", std::process::id(), time::now_ms());
    let outcome = fleet_shared::twin::write::set_desired(svc, &thing, &shadow, &patch, &token).await?;
    output::write_outcome(&thing, &shadow, &outcome, json)?;
    match outcome {
        WriteOutcome::Applied { .. } => Ok(()),
        WriteOutcome::GaveUp { attempts } => bail!("gave up after {attempts} version conflicts"),
        WriteOutcome::Rejected { code, message } => bail!("rejected ({code}): {message}"),
    }
}

async fn allowlist(store: &impl Allowlist, command: AllowlistCommand, json: bool) -> Result<()> {
    match command {
        AllowlistCommand::Add { serials, class, region } => {
            validate_label("class", &class)?;
            validate_label("region", &region)?;
            let now = time::now_ms();
            let entries = serials
                .iter()
                .map(|s| {
                    Ok(AllowlistEntry {
                        serial: fleet_shared::certs::hook::serial(s)?,
                        class: class.clone(),
                        region: region.clone(),
                        added_ms: now,
                        enrolment: Enrolment::Allowed,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            store.allow(&entries).await?;
            let mut shown = Vec::new();
            for e in &entries {
                shown.extend(store.entry(&e.serial).await?);
            }
            output::allowlist(&shown, json)
        }
        AllowlistCommand::Remove { serial } => {
            let serial = ThingName::parse(&serial)?;
            if !store.disallow(&serial).await? {
                bail!("{serial} is not on the list, or has provisioned or been decommissioned (kept as history)");
            }
            Ok(())
        }
        AllowlistCommand::Reset { serial } => {
            let serial = ThingName::parse(&serial)?;
            if !store.reset(&serial).await? {
                bail!("{serial} is not provisioned (only a provisioned serial can be reset)");
            }
            output::allowlist(&store.entry(&serial).await?.into_iter().collect::<Vec<_>>(), json)
        }
        AllowlistCommand::List { limit } => {
            let mut all = Vec::new();
            let mut after: Option<ThingName> = None;
            while all.len() < limit {
                let page = store.entries(after.as_ref(), (limit - all.len()).min(1000)).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.serial.clone());
                let full = page.len() == (limit - all.len()).min(1000);
                all.extend(page);
                if !full {
                    break;
                }
            }
            output::allowlist(&all, json)
        }
    }
}

async fn certs(
    inventory: &impl CertificateInventory,
    audit: &impl ProvisioningAudit,
    command: CertsCommand,
    json: bool,
) -> Result<()> {
    match command {
        CertsCommand::Show { id } => {
            let id = CertificateId::parse(&id)?;
            match inventory.certificate(&id).await? {
                Some(c) => output::certificates(&[c], time::now_ms(), json),
                None => bail!("no certificate {id} in the inventory"),
            }
        }
        CertsCommand::Expiring { within, limit } => {
            let now = time::now_ms();
            let within_ms = i64::try_from(within.as_millis()).context("--within is too long")?;
            // Expired in the last week too: those devices are the ones already cut off.
            let found = inventory.expiring(now - 7 * 86_400_000, now + within_ms, limit).await?;
            output::certificates(&found, now, json)
        }
        CertsCommand::Reconcile { .. } => unreachable!("needs the registry: handled by run"),
        CertsCommand::Findings { serial } => {
            let claims = audit.suspicious_claims().await?;
            let trail = match serial {
                Some(s) => audit.trail(&s).await?,
                None => Vec::new(),
            };
            output::findings(&claims, &trail, json)
        }
    }
}

async fn twin_policy(store: &impl TwinPolicies, command: PolicyCommand, json: bool) -> Result<()> {
    match command {
        PolicyCommand::List => output::policies(&store.policies().await?, json),
        PolicyCommand::Set { key, after, action } => {
            let action = match action {
                PolicyAction::Report => StaleAction::Report,
                PolicyAction::Release => StaleAction::Release,
            };
            let after_ms = i64::try_from(after.as_millis()).context("--after is too long")?;
            store.set_policy(&StalePolicy::new(&key, after_ms, action)?).await?;
            output::policies(&store.policies().await?, json)
        }
        PolicyCommand::Remove { key } => {
            if !store.remove_policy(&key).await? {
                bail!("no policy for {key:?}");
            }
            output::policies(&store.policies().await?, json)
        }
    }
}

async fn twin_delete(svc: &impl ShadowService, thing: &str, shadow: &str, json: bool) -> Result<()> {
    let (thing, shadow) = (ThingName::parse(thing)?, ShadowName::parse(shadow)?);
    let version = svc.delete_shadow(&thing, &shadow).await?;
    output::deleted(&thing, &shadow, version, json)?;
    if version.is_none() {
        bail!("no shadow {shadow} for {thing}");
    }
    Ok(())
}

/// `--since`: an RFC 3339 time, or a duration before now.
fn parse_since(s: &str) -> Result<i64> {
    if let Some(ms) = time::parse_rfc3339(s) {
        return Ok(ms);
    }
    let ago = humantime::parse_duration(s).with_context(|| {
        format!("--since {s:?}: expected an RFC 3339 time or a duration like 15m, 2h, 7d")
    })?;
    Ok(time::now_ms() - ago.as_millis() as i64)
}

/// One events/ file: an SQS event (`Records[].body`) or one rule payload object.
async fn ingest_file<R, S, A, Q>(
    ports: IngestPorts<'_, R, S, A, Q>,
    policy: &IngestPolicy,
    file: &Path,
) -> Result<BatchOutcome>
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
{
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let now = time::now_ms();
    let owned = messages_from_event(&text, now);
    let inbound: Vec<Inbound<'_>> = owned.iter().map(OwnedInbound::borrow).collect();
    Ok(ingest_batch(ports, policy, now, &inbound).await)
}

/// What `fleetctl command send` asks command-dispatch for.
fn command_request(
    thing: &str,
    name: &str,
    args: &str,
    ttl: std::time::Duration,
) -> Result<command_dispatch::handler::Request> {
    let args: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(args).context("the arguments are not a JSON object")?;
    Ok(command_dispatch::handler::Request {
        thing: thing.to_owned(),
        name: name.to_owned(),
        args,
        ttl_s: Some(ttl.as_secs()),
    })
}

/// `command status` and `command list`.
async fn commands_read(store: &impl CommandStore, command: CommandCommand, json: bool) -> Result<()> {
    let now = time::now_ms();
    match command {
        CommandCommand::Status { cmd_id } => match store.command(&cmd_id).await? {
            Some(c) => output::commands(&[c], now, json),
            None => bail!("no command {cmd_id}"),
        },
        CommandCommand::List { thing, limit } => {
            let thing = ThingName::parse(&thing)?;
            output::commands(&store.commands_of(&thing, limit.clamp(1, 1_000)).await?, now, json)
        }
        CommandCommand::Send { .. } => unreachable!("sent by the caller"),
    }
}

/// The firmware keys a campaign command trusts (`FLEET_FIRMWARE_KEYS`), for those that check
/// manifests: required to create a firmware campaign; tick and rollback ask for them per
/// campaign (only firmware campaigns carry manifests: a certificate rotation moves without
/// them), and when set they must parse. The other commands only read and write campaigns.
fn campaign_verifier(env: &Env, command: &CampaignCommand) -> Result<ManifestVerifier> {
    use CampaignCommand::*;
    let none = ManifestVerifier::new(Vec::new());
    if !matches!(command, Create { .. } | Tick { .. } | Rollback { .. }) {
        return Ok(none);
    }
    match env.optional(FIRMWARE_KEYS_VAR) {
        Some(keys) => crate::ota::trusted_keys(&keys),
        None if matches!(command, Create { .. }) => crate::ota::trusted_keys(""),
        None => Ok(none),
    }
}

/// `fleetctl ota gate`: the gate over the window that ends at the last minute fleet-health
/// closed.
async fn ota<R: SloReader>(reader: &R, command: OtaCommand, json: bool) -> Result<()> {
    let OtaCommand::Gate { canary, control, gate } = command else {
        unreachable!("campaign commands are run by the caller");
    };
    let parse = |p: &str| -> Result<HealthCohort> {
        p.parse().map_err(|e| anyhow!("{p:?} is not a cohort (class/region/firmware, * for any): {e}"))
    };
    let (canary, control) = (parse(&canary)?, parse(&control)?);
    let policy = gate.policy()?;
    let Some(report) = reader.latest_health().await? else {
        bail!("fleet-health has not closed a minute yet: no ledger to judge from");
    };
    let catalog = Catalog::builtin();
    let (verdict, comparisons) = evaluate(reader, &catalog, &policy, &canary, &control, report.minute)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    output::ota_gate(&verdict, &comparisons, report.minute, json)
}

#[cfg(test)]
mod tests {
    use fleet_shared::adapters::embedded::SqliteStore;
    use fleet_shared::twin::{sync, TwinEvent};

    use super::*;

    fn drifting(thing: &str, at_s: i64) -> Result<TwinEvent> {
        let body = serde_json::json!({
            "current": {"state": {"desired": {"fw": "2"}, "reported": {"fw": "1"}},
                        "metadata": {"desired": {"fw": {"timestamp": at_s}}}, "version": 1},
            "timestamp": at_s, "thing": thing, "shadow": ""});
        Ok(TwinEvent::parse(body.to_string().as_bytes())?)
    }

    #[tokio::test]
    async fn a_cohort_keeps_the_first_twins_of_its_class_and_region_from_the_registry() -> Result<()> {
        // GIVEN four drifting twins: two env-sensors in eu-west, one in us-east, one gateway
        let db = SqliteStore::in_memory()?;
        let reg = |class: &str, region: &str| DeviceRegistration {
            class: class.into(),
            region: region.into(),
            fw: "1".into(),
            registered_at_ms: 1,
        };
        db.register(&[
            (ThingName::parse("a")?, reg("env-sensor", "eu-west")),
            (ThingName::parse("b")?, reg("env-sensor", "us-east")),
            (ThingName::parse("c")?, reg("gateway", "eu-west")),
            (ThingName::parse("d")?, reg("env-sensor", "eu-west")),
        ])
        .await?;
        for (i, thing) in ["a", "b", "c", "d"].into_iter().enumerate() {
            sync(&db, &drifting(thing, 1_000 + i as i64)?).await?;
        }
        let twins = db.drifting_since(i64::MAX, 100).await?;
        let names = |ts: &[Twin]| ts.iter().map(|t| t.thing.to_string()).collect::<Vec<_>>();
        let cohort = |class: Option<&str>, region: Option<&str>| Cohort {
            class: class.map(str::to_owned),
            region: region.map(str::to_owned),
        };
        // WHEN filtered by class and region, by region only, with a limit, and not at all
        let both =
            in_cohort(Some(&db), twins.clone(), &cohort(Some("env-sensor"), Some("eu-west")), 100).await?;
        let region = in_cohort(Some(&db), twins.clone(), &cohort(None, Some("eu-west")), 100).await?;
        let first = in_cohort(Some(&db), twins.clone(), &cohort(Some("env-sensor"), None), 1).await?;
        let all = in_cohort(Some(&db), twins.clone(), &Cohort::default(), 100).await?;
        // THEN each keeps exactly its members, oldest drift first
        assert_eq!(names(&both), ["a", "d"]);
        assert_eq!(names(&region), ["a", "c", "d"]);
        assert_eq!(names(&first), ["a"]);
        assert_eq!(all.len(), 4);
        // AND without a registry only the unfiltered form works
        let none: Option<&SqliteStore> = None;
        assert_eq!(in_cohort(none, twins.clone(), &Cohort::default(), 100).await?.len(), 4);
        assert!(in_cohort(none, twins, &cohort(Some("x"), None), 100).await.is_err());
        // AND an index read for a cohort reads more than the limit
        assert_eq!((cohort(Some("x"), None).read(5), Cohort::default().read(5)), (COHORT_READ, 5));
        Ok(())
    }
}
