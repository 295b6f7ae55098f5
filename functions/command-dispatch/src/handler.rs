//! An operator's command → a signed envelope on `cmd/fleet/<thing>/req`.
//!
//! Invoked directly (`fleetctl command send`, which calls Lambda's Invoke; the local IoT Core
//! serves the same call) with `{"thing":..,"name":..,"args":{..},"ttl_s":60}`. For a known
//! device it takes the device's next `seq` (an atomic counter per device, so two dispatches
//! never share one), signs `{cmd_id, thing, seq, issued_at, expires_at, name, args, kid}` with
//! the deployment's Ed25519 key (`fleet_shared::commands`), records the command as `sent`,
//! publishes it (QoS 1) and answers `{"cmd_id","seq","issued_at","expires_at","topic"}`.
//!
//! The signing key is loaded once per cold start: on AWS from an SSM SecureString
//! (`FLEET_COMMAND_KEY_PARAM`, 32 bytes in base64 or hex), locally from a file
//! (`FLEET_COMMAND_KEY_FILE`, which `fleetctl local` creates); `FLEET_COMMAND_KEY_ID` names it
//! (`kid`) so devices can trust two keys during a rotation.
//!
//! Errors: bad input or an unknown device is `InvalidCommand` (not retried); a store or
//! publish failure is `Retryable`. A command recorded but not published stays `sent` and
//! shows as expired once its time is up. Metrics: `CommandsSent`, `CommandsRefused`,
//! `PublishFailed`.

use fleet_shared::adapters::aws::{
    CommandsTable, DevicesTable, HealthTable, IotControlPlane, IotDataShadows, SsmParameter,
};
use fleet_shared::commands::{request_topic, CommandRecord, CommandSigner, CommandStatus, UnsignedCommand};
use fleet_shared::health::signals;
use fleet_shared::health::tally::{counter, Cohort, HealthDelta};
use fleet_shared::lambda::{diagnostic, AwsBackend, ErrorType, Retryable, StartupError};
use fleet_shared::metrics::{MetricSet, MetricsOut, Unit};
use fleet_shared::model::ThingName;
use fleet_shared::ports::{CommandPublisher, CommandStore, DeviceRegistry, HealthCounters};
use fleet_shared::{time, ConfigError, Env, StoreError};
use lambda_runtime::{Diagnostic, LambdaEvent};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub const FUNCTION: &str = "command-dispatch";

/// The longest a command may live (devices refuse longer ones by default too).
pub const MAX_TTL_S: u64 = 24 * 3600;
/// A command's life when the operator does not say.
pub const DEFAULT_TTL_S: u64 = 60;

/// Everything the handler needs, built once per cold start.
pub struct Deps<S, P, R, H> {
    /// Commands table: the per-device counter and the records.
    pub commands: S,
    /// IoT Core's data plane (locally the broker).
    pub publisher: P,
    /// Devices table: the device must exist; its health cohort.
    pub registry: R,
    /// Health table: commands sent per cohort.
    pub health: H,
    pub signer: CommandSigner,
    pub clock: fn() -> i64,
    pub metrics: MetricsOut,
}

/// The signing key from its text (32 bytes, base64 or hex) and its id.
fn signer(env: &Env, text: &str) -> Result<CommandSigner, StartupError> {
    let kid = env.optional("FLEET_COMMAND_KEY_ID").unwrap_or_else(|| "default".to_owned());
    CommandSigner::from_text(kid, text).map_err(|e| {
        StartupError::Config(ConfigError::Invalid {
            var: "FLEET_COMMAND_KEY_PARAM",
            value: e.to_string(),
            expected: "an Ed25519 seed: 32 bytes in base64 or hex",
        })
    })
}

impl Deps<CommandsTable, IotDataShadows, DevicesTable, HealthTable> {
    /// On AWS: the Commands, Devices and Health tables, IoT Core's data plane
    /// (`FLEET_IOT_DATA_ENDPOINT`, else the account's, from DescribeEndpoint), and the key from
    /// SSM (`FLEET_COMMAND_KEY_PARAM`).
    pub async fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        let param = aws.env.required("FLEET_COMMAND_KEY_PARAM")?;
        let ssm = SsmParameter::new(&aws.sdk)?;
        let key = ssm.get(&param).await?;
        let publisher = match IotDataShadows::configured(&aws.sdk, &aws.env)? {
            Some(named) => named,
            None => {
                let endpoint = IotControlPlane::new(&aws.sdk)?.data_endpoint().await?;
                IotDataShadows::at(&aws.sdk, &endpoint)
            }
        };
        Ok(Self {
            commands: CommandsTable::from_env(&aws.sdk, &aws.env)?,
            publisher,
            registry: DevicesTable::from_env(&aws.sdk, &aws.env)?,
            health: HealthTable::from_env(&aws.sdk, &aws.env)?,
            signer: signer(&aws.env, &key)?,
            clock: time::now_ms,
            metrics: MetricsOut::stdout(&aws.env)?,
        })
    }
}

#[cfg(feature = "embedded")]
pub type EmbeddedDeps = Deps<
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::MqttPublisher,
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
>;

#[cfg(feature = "embedded")]
impl EmbeddedDeps {
    /// On the embedded backend: the SQLite database, the key file (`FLEET_COMMAND_KEY_FILE`),
    /// and the local IoT Core's broker (`FLEET_MQTT_ADDR`, default 127.0.0.1:1883).
    pub fn on_embedded(e: &fleet_shared::lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        let addr = e.env.optional("FLEET_MQTT_ADDR").unwrap_or_else(|| "127.0.0.1:1883".to_owned());
        let addr = addr.parse().map_err(|_| ConfigError::Invalid {
            var: "FLEET_MQTT_ADDR",
            value: addr.clone(),
            expected: "host:port of the local IoT Core's MQTT listener",
        })?;
        Self::embedded(e, fleet_shared::adapters::embedded::MqttPublisher::at(addr))
    }

    /// With a given publisher (the local stack's, bound when its broker listens).
    pub fn embedded(
        e: &fleet_shared::lambda::EmbeddedBackend,
        publisher: fleet_shared::adapters::embedded::MqttPublisher,
    ) -> Result<Self, StartupError> {
        let path = e.env.required("FLEET_COMMAND_KEY_FILE")?;
        let text = std::fs::read_to_string(&path).map_err(|err| ConfigError::Invalid {
            var: "FLEET_COMMAND_KEY_FILE",
            value: format!("{path}: {err}"),
            expected: "a readable file holding the key",
        })?;
        Ok(Self {
            commands: e.db.clone(),
            publisher,
            registry: e.db.clone(),
            health: e.db.clone(),
            signer: signer(&e.env, &text)?,
            clock: time::now_ms,
            metrics: MetricsOut::Stdout { stage: "local".to_owned() },
        })
    }
}

/// What an operator asks for.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub thing: String,
    pub name: String,
    #[serde(default)]
    pub args: Map<String, Value>,
    /// Seconds the command may wait for its device (default 60, at most a day).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// The answer: what was sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    pub cmd_id: String,
    pub seq: u64,
    pub issued_at: i64,
    pub expires_at: i64,
    pub topic: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error(transparent)]
    Retryable(#[from] Retryable),
}

impl ErrorType for DispatchError {
    fn error_type(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "InvalidCommand",
            Self::Retryable(r) => r.error_type(),
        }
    }
}

impl From<DispatchError> for Diagnostic {
    fn from(e: DispatchError) -> Self {
        diagnostic(&e)
    }
}

fn retry(what: &'static str) -> impl FnOnce(StoreError) -> DispatchError {
    move |e| DispatchError::Retryable(Retryable { what, source: std::sync::Arc::new(e) })
}

/// A command's id: unique per (thing, seq) without a random source, in the envelope's charset.
pub fn command_id(thing: &ThingName, seq: u64) -> String {
    let digest = Sha256::digest(thing.as_str().as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("c{hex}-{seq}")
}

pub async fn handle<S, P, R, H>(
    deps: &Deps<S, P, R, H>,
    event: LambdaEvent<Box<RawValue>>,
) -> Result<Sent, DispatchError>
where
    S: CommandStore,
    P: CommandPublisher,
    R: DeviceRegistry,
    H: HealthCounters,
{
    let request: Request = match serde_json::from_str(event.payload.get()) {
        Ok(r) => r,
        Err(e) => return Err(refused(deps, e.to_string())),
    };
    dispatch(deps, request).await
}

fn refused<S, P, R, H>(deps: &Deps<S, P, R, H>, why: String) -> DispatchError {
    warn!(reason = %why, "command refused");
    emit(deps, "CommandsRefused");
    DispatchError::Invalid(why)
}

fn emit<S, P, R, H>(deps: &Deps<S, P, R, H>, metric: &'static str) {
    deps.metrics.emit(&[MetricSet {
        timestamp_ms: (deps.clock)(),
        dimensions: vec![("Function", FUNCTION.to_owned())],
        values: vec![(metric, 1.0, Unit::Count)],
    }]);
}

/// Sign, record and publish one command.
pub async fn dispatch<S, P, R, H>(deps: &Deps<S, P, R, H>, request: Request) -> Result<Sent, DispatchError>
where
    S: CommandStore,
    P: CommandPublisher,
    R: DeviceRegistry,
    H: HealthCounters,
{
    let thing = ThingName::parse(&request.thing).map_err(|e| refused(deps, e.to_string()))?;
    let ttl_s = request.ttl_s.unwrap_or(DEFAULT_TTL_S);
    if !(1..=MAX_TTL_S).contains(&ttl_s) {
        return Err(refused(deps, format!("ttl_s {ttl_s} is not 1-{MAX_TTL_S}")));
    }
    let now = (deps.clock)();
    // Checked with the longest seq it could get, so the size check holds for the real one.
    let mut unsigned = UnsignedCommand {
        cmd_id: command_id(&thing, u64::MAX),
        thing: thing.to_string(),
        seq: u64::MAX,
        issued_at: now,
        expires_at: now + (ttl_s * 1000) as i64,
        name: request.name,
        args: request.args,
    };
    // The envelope rules (name charset, args without floats, size) before a seq is spent.
    deps.signer.check(&unsigned).map_err(|e| refused(deps, e.to_string()))?;
    let devices =
        deps.registry.get_many(std::slice::from_ref(&thing)).await.map_err(retry("device not looked up"))?;
    let Some(device) = devices.get(&thing) else {
        return Err(refused(deps, format!("no device {thing}")));
    };
    let seq = deps.commands.next_seq(&thing).await.map_err(retry("command counter not incremented"))?;
    unsigned.seq = seq;
    unsigned.cmd_id = command_id(&thing, seq);
    let envelope = deps.signer.sign(unsigned).map_err(|e| refused(deps, e.to_string()))?;
    let cohort = Cohort::of(Some(device), None);
    let record = CommandRecord {
        cmd_id: envelope.cmd_id.clone(),
        thing: envelope.thing.clone(),
        seq,
        name: envelope.name.clone(),
        args: envelope.args.clone(),
        issued_at: envelope.issued_at,
        expires_at: envelope.expires_at,
        status: CommandStatus::Sent,
        acked_at: None,
        latency_ms: None,
        reason: None,
        result: None,
        cohort: cohort.to_string(),
    };
    deps.commands.put_command(&record).await.map_err(retry("command not recorded"))?;
    let topic = request_topic(thing.as_str());
    if let Err(e) = deps.publisher.publish(&topic, envelope.to_json().as_bytes()).await {
        emit(deps, "PublishFailed");
        return Err(retry("command not published")(e));
    }
    let mut delta = HealthDelta::default();
    signals::command(&mut delta, now, &cohort, counter::COMMANDS_SENT);
    if let Err(e) = deps.health.add_health(&delta).await {
        warn!(error = %e, "command not counted for fleet health");
    }
    emit(deps, "CommandsSent");
    info!(thing = %thing, cmd_id = %record.cmd_id, seq, name = %record.name, "command sent");
    Ok(Sent { cmd_id: record.cmd_id, seq, issued_at: record.issued_at, expires_at: record.expires_at, topic })
}

#[cfg(test)]
mod tests;
