//! The commands: parse arguments into domain values, call the ports, print.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use fleet_shared::ingest::{
    ingest_batch, messages_from_event, BatchOutcome, Inbound, IngestPorts, OwnedInbound,
};
use fleet_shared::model::{validate_label, DeviceRegistration, ThingName};
use fleet_shared::ports::{DeviceAdmin, FleetQuery};
use fleet_shared::{time, Config, Store};

use crate::output;
use crate::{Cli, Command, DevicesCommand, QuarantineCommand};

/// The functions' configuration, with the embedded backend as the default.
fn config(cli: &Cli) -> Result<Config> {
    let db = cli.db.to_string_lossy().into_owned();
    Ok(Config::from_lookup(|k| match std::env::var(k).ok() {
        Some(v) => Some(v),
        None if k == "FLEET_BACKEND" => Some("embedded".to_owned()),
        None if k == "FLEET_DB" => Some(db.clone()),
        None => None,
    })?)
}

fn local_options(cli: &Cli, a: &crate::StackArgs) -> Result<crate::local::LocalOptions> {
    let config = config(cli)?;
    if !matches!(config.backend, fleet_shared::Backend::Embedded { .. }) {
        bail!("the local stack runs on the embedded backend: unset FLEET_BACKEND or set it to embedded");
    }
    Ok(crate::local::LocalOptions {
        bind: a.bind,
        mqtt_port: a.mqtt_port,
        mqtt5_port: a.mqtt5_port,
        http_port: a.http_port,
        db: cli.db.clone(),
        template: a.template.clone(),
        batch_window: std::time::Duration::from_millis(a.batch_window_ms),
        policy: config.policy,
    })
}

pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Local { stack } => return local(local_options(&cli, stack)?).await,
        Command::Demo { stack, devices, duration, rate, keep_running, seed } => {
            let opts = crate::demo::DemoOptions {
                devices: *devices,
                duration: *duration,
                rate: *rate,
                keep_running: *keep_running,
                seed: *seed,
                quirks: fleet_shared::sim::Quirks::default(),
            };
            return crate::demo::run(local_options(&cli, stack)?, opts, cli.json).await;
        }
        _ => {}
    }
    let config = config(&cli)?;
    let store = Store::connect(&config).await?;
    let json = cli.json;
    match cli.command {
        Command::Devices { command } => devices(&store, command, json).await,
        Command::Telemetry { thing, since, limit } => {
            let thing = ThingName::parse(&thing)?;
            let since_ms = since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
            let readings = store.telemetry(&thing, since_ms, limit).await?;
            output::readings(&readings, json)
        }
        Command::Quarantine { command: QuarantineCommand::List { since } } => {
            let since_ms = since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
            output::quarantine(&store.quarantined(since_ms).await?, json)
        }
        Command::Local { .. } | Command::Demo { .. } => unreachable!("handled above"),
        Command::Replay { prefix } => {
            if !prefix.starts_with(fleet_shared::ingest::archive::RAW_PREFIX) {
                bail!("--prefix {prefix:?} must lie under raw/");
            }
            let report =
                fleet_shared::ingest::replay(&store, &store, &config.policy, time::now_ms(), &prefix).await?;
            output::replay(&report, json)?;
            if report.failed > 0 {
                bail!("{} messages failed to store; replay again (it is idempotent)", report.failed);
            }
            Ok(())
        }
        Command::Ingest { files } => {
            for file in &files {
                let outcome = ingest_file(&store, &config, file).await?;
                output::ingest_outcome(file, &outcome, json)?;
            }
            Ok(())
        }
    }
}

async fn local(opts: crate::local::LocalOptions) -> Result<()> {
    let stack = crate::local::start(&opts).await?;
    eprintln!("fleetline local stack ({})", opts.db.display());
    eprintln!("  MQTT 3.1.1  mqtt://{}   MQTT 5  mqtt://{}", stack.mqtt, stack.mqtt5);
    eprintln!("  dashboard   http://{}/   API http://{}/api/health", stack.http, stack.http);
    for rule in &stack.rules {
        eprintln!("  rule {} ({}): {}", rule.name, stack.template_source, rule.sql);
    }
    eprintln!(
        "  publish e.g.: mosquitto_pub -p {} -t dt/fleet/sensor-001/telemetry -q 1 -m '{{...}}'",
        stack.mqtt.port()
    );
    eprintln!("Ctrl-C stops it.");
    tokio::signal::ctrl_c().await?;
    eprintln!("stopping: draining acknowledged messages ...");
    let stats = std::sync::Arc::clone(&stack.stats);
    stack.shutdown().await?;
    let s = stats.snapshot(fleet_shared::time::now_ms());
    eprintln!(
        "stopped: stored {}, duplicates {}, quarantined {}, dead-lettered {}",
        s.stored, s.duplicates, s.quarantined, s.dead_lettered
    );
    Ok(())
}

async fn devices(store: &Store, command: DevicesCommand, json: bool) -> Result<()> {
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
    }
}

/// `--since`: an RFC 3339 time, or a duration before now.
fn parse_since(s: &str) -> Result<i64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let d = t.duration_since(std::time::UNIX_EPOCH).context("time before 1970")?;
        return Ok(d.as_millis() as i64);
    }
    let ago = humantime::parse_duration(s).with_context(|| {
        format!("--since {s:?}: expected an RFC 3339 time or a duration like 15m, 2h, 7d")
    })?;
    Ok(time::now_ms() - ago.as_millis() as i64)
}

/// One events/ file: an SQS event (`Records[].body`) or one rule payload object.
async fn ingest_file(store: &Store, config: &Config, file: &Path) -> Result<BatchOutcome> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let now = time::now_ms();
    let owned = messages_from_event(&text, now).with_context(|| format!("{} is not JSON", file.display()))?;
    let inbound: Vec<Inbound<'_>> = owned.iter().map(OwnedInbound::borrow).collect();
    let ports = IngestPorts { registry: store, sink: store, archive: store, quarantine: store };
    Ok(ingest_batch(ports, &config.policy, now, &inbound).await)
}
