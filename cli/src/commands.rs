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

pub async fn run(cli: Cli) -> Result<()> {
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
        Command::Quarantine {
            command: QuarantineCommand::List { since },
        } => {
            let since_ms = since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
            output::quarantine(&store.quarantined(since_ms).await?, json)
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

async fn devices(store: &Store, command: DevicesCommand, json: bool) -> Result<()> {
    match command {
        DevicesCommand::Register {
            thing,
            class,
            region,
            fw,
        } => {
            let thing = ThingName::parse(&thing)?;
            validate_label("class", &class)?;
            validate_label("region", &region)?;
            validate_label("fw", &fw)?;
            let registration = DeviceRegistration {
                class,
                region,
                fw,
                registered_at_ms: time::now_ms(),
            };
            store.register(&[(thing.clone(), registration)]).await?;
            let device = store
                .device(&thing)
                .await?
                .ok_or_else(|| anyhow!("{thing} vanished after registering"))?;
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
        let d = t
            .duration_since(std::time::UNIX_EPOCH)
            .context("time before 1970")?;
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
    let ports = IngestPorts {
        registry: store,
        sink: store,
        archive: store,
        quarantine: store,
    };
    Ok(ingest_batch(ports, &config.policy, now, &inbound).await)
}
