//! fleetctl: Fleetline's operator CLI. Embedded backend (SQLite) by default; set
//! `FLEET_BACKEND=aws` and the functions' variables to work against AWS.

#![recursion_limit = "256"]

mod commands;
mod demo;
mod firmware;
mod ota;
mod output;
mod signals;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The command line as parsed: a [`Command`] on the fleet's backend, or one that needs none.
#[derive(Parser)]
#[command(name = "fleetctl", version, about = "Operate a Fleetline IoT fleet backend")]
struct Invocation {
    /// SQLite file of the embedded backend (ignored with FLEET_BACKEND=aws).
    #[arg(long, global = true, env = "FLEET_DB", default_value = "fleetline.sqlite")]
    db: PathBuf,
    /// Print stable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Toplevel,
}

#[derive(Subcommand)]
enum Toplevel {
    #[command(flatten)]
    Fleet(Command),
    /// Signed firmware manifests for OTA campaigns: sign an image's, check one as a device does.
    Firmware {
        #[command(subcommand)]
        command: firmware::FirmwareCommand,
    },
}

/// A command on the fleet's backend, with the global options (`commands::run`).
pub struct Cli {
    pub db: PathBuf,
    pub json: bool,
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Register, list and inspect devices.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// A device's stored readings, oldest first.
    Telemetry {
        thing: String,
        /// RFC 3339 time (2025-11-24T16:00:00Z) or a duration ago (15m, 2h, 7d).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Quarantined payloads and why.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
    /// Run IoT Core on this machine: MQTT broker, the template's topic rules, the functions
    /// in-process on the embedded backend, and an HTTP API + dashboard. Ctrl-C stops it cleanly.
    Local {
        #[command(flatten)]
        stack: StackArgs,
    },
    /// The local stack plus simulated devices publishing over MQTT; ends with a report.
    Demo {
        #[command(flatten)]
        stack: StackArgs,
        #[arg(long, default_value_t = 50)]
        devices: usize,
        /// How long devices publish (e.g. 60s, 2m).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Readings per second per device (devices sending packs publish every --pack readings).
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Readings per message for the quarter of devices that send v2 packs (1-100).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=100))]
        pack: u16,
        /// Keep the stack (and dashboard) up after the report, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Devices start with only the provisioning claim and provision themselves
        /// (CreateKeysAndCertificate, RegisterThing) before publishing; their serials are put
        /// on the allowlist first. Certificates are valid FLEET_LOCAL_CERT_VALIDITY_DAYS days
        /// (default 365).
        #[arg(long)]
        provision: bool,
        /// FROM:TO (e.g. 1.4.2:1.5.0): also create an OTA campaign, per class of the devices on
        /// FROM, taking them to TO (manifests of the demo's synthetic images signed with the
        /// local firmware key, <db>.firmware-key); the demo ticks it (see --ota-every).
        #[arg(long, value_parser = demo::OtaUpgrade::parse)]
        ota: Option<demo::OtaUpgrade>,
        /// With --ota: how often the demo runs the local ota-orchestrator while devices publish,
        /// as its 5-minute schedule would, but soon enough to watch a stage go out (0s: leave the
        /// campaigns to that schedule).
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        ota_every: std::time::Duration,
        /// Rotate the devices' certificates (implies --provision): they provision with
        /// certificates valid 20 days (unless FLEET_LOCAL_CERT_VALIDITY_DAYS says otherwise);
        /// once all have, the demo runs the daily expiry check, which marks them due, and
        /// creates a rotation campaign per class and firmware, ticked like --ota's (see
        /// --ota-every). Each device makes a new key, gets a certificate for it over its own
        /// connection, and reconnects with it.
        #[arg(long)]
        rotate: bool,
    },
    /// Re-ingest the raw archive (the source of truth) into the hot store, device state and
    /// quarantine. Idempotent; also the path to a new hot store.
    Replay {
        /// Archive key prefix, e.g. raw/dt=2025-11-24/ (must lie under raw/).
        #[arg(long, default_value = "raw/")]
        prefix: String,
    },
    /// Device twins: mirrored shadows, their delta and drift.
    Twin {
        #[command(subcommand)]
        command: TwinCommand,
    },
    /// Feed sample events (SQS batches or single rule payloads, as in events/) through the
    /// ingest pipeline and print what was stored.
    Ingest {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The provisioning allowlist: serial numbers that may provision (fleet provisioning's
    /// pre-provisioning hook reads it).
    Allowlist {
        #[command(subcommand)]
        command: AllowlistCommand,
    },
    /// The certificate inventory and provisioning findings.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Signed commands to devices (Ed25519, per-device sequence, expiry) and their acks.
    Command {
        #[command(subcommand)]
        command: CommandCommand,
    },
    /// OTA campaigns: staged rollouts of signed firmware over IoT Jobs, gated on fleet health,
    /// rolled back on failure; and the health gate on its own.
    Ota {
        #[command(subcommand)]
        command: OtaCommand,
    },
}

#[derive(Subcommand)]
pub enum OtaCommand {
    #[command(flatten)]
    Campaign(CampaignCommand),
    /// Compare a canary cohort with its control over a window, SLO by SLO, on the ledger
    /// fleet-health keeps: advance, wait (too few events, or a fleet-wide burn) or roll back
    /// (the canary burns its budget and more than --max-ratio times the control).
    Gate {
        /// The devices on the new firmware, as class/region/firmware with `*` (e.g. sensor/*/1.5.0).
        #[arg(long)]
        canary: String,
        /// The devices compared with, e.g. sensor/*/1.4.2.
        #[arg(long)]
        control: String,
        #[command(flatten)]
        gate: GateArgs,
    },
}

/// How a campaign rolls out: its stages, their timing and limits, and who may take part.
#[derive(clap::Args)]
pub struct RolloutArgs {
    /// Cumulative percentages of the eligible devices, ending at 100.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 10, 50, 100])]
    pub stages: Vec<u32>,
    /// How long a settled stage is watched before the gate is asked.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub soak: std::time::Duration,
    /// Pause for an operator when a stage stays pending, or its gate waits, this long.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub stage_timeout: std::time::Duration,
    /// Roll back (a rotation: halt) when more than this percentage of a stage's finished
    /// executions failed.
    #[arg(long, default_value_t = 5.0)]
    pub max_failure_pct: f64,
    /// Installs IoT Jobs starts per minute (1-1000).
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// An install in progress longer than this times out (counts as failed).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub install_timeout: std::time::Duration,
    /// Devices whose last reported battery is below this are left out (0: no check).
    #[arg(long, default_value_t = 30.0)]
    pub min_battery: f64,
    /// Only devices heard from within this time take part (0s: no check).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub seen_within: std::time::Duration,
}

/// How strictly a canary is judged against its control (`ota gate`, and a campaign's gate).
#[derive(clap::Args)]
pub struct GateArgs {
    /// SLOs from infra/slos.json to compare (repeat or comma-separate). `connectivity` is
    /// counted per class and region only, so it cannot tell firmware apart.
    #[arg(long = "slo", value_delimiter = ',', default_values_t = ["ingest".to_owned(), "freshness".to_owned()])]
    slos: Vec<String>,
    /// The window both are read over, ending at the last minute fleet-health closed.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    window: std::time::Duration,
    /// Canary events each SLO needs in the window before it is judged.
    #[arg(long, default_value_t = 100)]
    min_events: i64,
    /// Roll back when the canary burns its budget (burn rate > 1) and more than this many
    /// times the control's rate.
    #[arg(long, default_value_t = 2.0)]
    max_ratio: f64,
    /// Wait (widen nothing) while the canary burns faster than this, whoever causes it.
    #[arg(long, default_value_t = 6.0)]
    max_burn: f64,
}

impl GateArgs {
    /// The policy these flags give, refused (with why) if it cannot judge anything.
    pub fn policy(self) -> anyhow::Result<fleet_shared::ota::gate::GatePolicy> {
        if !self.window.as_secs().is_multiple_of(60) || self.window.subsec_nanos() != 0 {
            anyhow::bail!(
                "--window {}: the SLO ledger is kept per minute; give whole minutes (e.g. 90m)",
                humantime::format_duration(self.window)
            );
        }
        let policy = fleet_shared::ota::gate::GatePolicy {
            slos: self.slos,
            window_minutes: i64::try_from(self.window.as_secs() / 60).unwrap_or(i64::MAX),
            min_events: self.min_events,
            max_ratio: self.max_ratio,
            max_burn: self.max_burn,
        };
        policy.check(&fleet_shared::health::slo::Catalog::builtin()).map_err(anyhow::Error::msg)?;
        Ok(policy)
    }
}

/// Campaigns, on either backend (on AWS the Campaigns, Devices and Health tables and IoT Jobs,
/// from the functions' variables); firmware campaigns trust the firmware keys in
/// FLEET_FIRMWARE_KEYS, `kid=public-key[,...]` (creating one needs them; a tick without them
/// moves only certificate rotations).
#[derive(Subcommand)]
pub enum CampaignCommand {
    /// Create a campaign from two signed manifests (`fleetctl firmware sign`): the firmware to
    /// install, and the one the devices run now, which a rollback sends. It starts on the
    /// next tick.
    Create {
        /// 1-56 characters of A-Z a-z 0-9 _ -; its jobs are <id>-s<n> and <id>-rb.
        #[arg(long)]
        id: String,
        /// The manifest of the firmware to install.
        #[arg(long)]
        manifest: PathBuf,
        /// The manifest of the firmware the devices run now.
        #[arg(long)]
        rollback_manifest: PathBuf,
        #[command(flatten)]
        rollout: RolloutArgs,
        /// The gate each stage asks (canary class/*/new against control class/*/old).
        #[command(flatten)]
        gate: GateArgs,
    },
    /// Create a certificate rotation campaign: the devices of a class on a firmware that the
    /// daily expiry check marked rotation_due get, stage by stage, a job to make a new key and
    /// rotate over their own connection; a stage passes once its devices are seen connected
    /// with their new certificates. It starts on the next tick.
    RotateCerts {
        /// 1-56 characters of A-Z a-z 0-9 _ -; its jobs are <id>-s<n>.
        #[arg(long)]
        id: String,
        /// The device class.
        #[arg(long)]
        class: String,
        /// The firmware the devices run (one that carries out fleetline.rotate_cert jobs).
        #[arg(long)]
        fw: String,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// Every campaign, newest first.
    List,
    /// One campaign: its state, stage, and log.
    Show { id: String },
    /// Move every active campaign (or one) on as far as it can go now: what the
    /// orchestrator's schedule does.
    Tick { id: Option<String> },
    /// Stop a campaign from moving on (its current stage's installs go on).
    Pause {
        id: String,
        #[arg(long, default_value = "operator")]
        reason: String,
    },
    /// Let a paused campaign move on again.
    Resume { id: String },
    /// End a campaign where it is: queued installs are canceled, devices keep what they have.
    Abort {
        id: String,
        #[arg(long, default_value = "operator")]
        reason: String,
    },
    /// Roll a campaign back now: queued installs are canceled, every device a stage reached
    /// gets the old firmware.
    Rollback {
        id: String,
        #[arg(long, default_value = "operator")]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum CommandCommand {
    /// Sign and send a command through command-dispatch: on AWS by invoking the function
    /// (FLEET_COMMAND_FUNCTION), locally through the running local IoT Core's broker, signed
    /// with its key (<db>.command-key). Prints the command's id.
    Send {
        thing: String,
        name: String,
        /// Arguments: a JSON object (integers, strings, booleans; no floats).
        #[arg(default_value = "{}")]
        args: String,
        /// How long the device may take to get it (e.g. 60s, 5m; at most a day).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The local IoT Core's MQTT listener (embedded backend).
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: std::net::SocketAddr,
    },
    /// One command: sent, succeeded, failed, rejected (by the device, with its reason) or
    /// expired, with the device's result and the delivery latency.
    Status { cmd_id: String },
    /// A device's commands, newest first.
    List {
        thing: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Subcommand)]
pub enum AllowlistCommand {
    /// Allow serial numbers to provision, as devices of a class in a region.
    Add {
        #[arg(required = true)]
        serials: Vec<String>,
        #[arg(long)]
        class: String,
        #[arg(long)]
        region: String,
    },
    /// Take a serial number that has not provisioned off the list.
    Remove { serial: String },
    /// Put a provisioned serial number back to allowed: for a device whose provisioning did not
    /// complete after the hook enrolled it, and that now asks with a new certificate.
    Reset { serial: String },
    /// Entries by serial number, with where each stands.
    List {
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Subcommand)]
pub enum CertsCommand {
    /// One certificate from the inventory.
    Show { id: String },
    /// Certificates expiring within a duration (and those expired in the last week), soonest first.
    Expiring {
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        within: std::time::Duration,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Reconcile the inventory with AWS IoT's registry (or the local IoT Core's) now, all of it:
    /// adopt certificates made outside the hook, follow status changes, report inactive
    /// certificates still attached, shared certificates, devices whose only certificate expired.
    Reconcile {
        /// Registry calls in flight at once (the control plane throttles; calls back off).
        #[arg(long, default_value_t = fleet_shared::certs::reconcile::DEFAULT_CONCURRENCY)]
        concurrency: usize,
    },
    /// Findings: claim certificates that keep asking for unknown serials; a serial's audit trail.
    Findings {
        /// Also the provisioning audit trail of this serial number.
        #[arg(long)]
        serial: Option<String>,
    },
}

#[derive(clap::Args, Clone)]
pub struct StackArgs {
    /// Address every listener binds to.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// MQTT port (3.1.1 and 5 on one port, as IoT Core).
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// SAM template whose topic rules to run (default: infra/template.yaml if present, else built in).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Longest a local queue waits to fill a batch, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub batch_window_ms: u64,
    /// On Ctrl-C or SIGTERM: how long to keep handling what was acknowledged before giving up.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_deadline: std::time::Duration,
}

#[derive(Subcommand)]
pub enum DevicesCommand {
    /// Register (or re-register) a device.
    Register {
        thing: String,
        #[arg(long)]
        class: String,
        #[arg(long)]
        region: String,
        #[arg(long)]
        fw: String,
    },
    /// Every known device: registered, or seen only through its telemetry.
    List,
    /// One device: registration and last reported state.
    Show { thing: String },
    /// A device's connectivity from IoT Core's lifecycle events: connected or not, since when,
    /// its last session's length and why it ended.
    Presence { thing: String },
    /// Take a device out of service: marked decommissioned on the allowlist (never provisioned
    /// again), every certificate attached to its thing set INACTIVE in AWS IoT (or the local
    /// IoT Core) and the inventory, the decision in its audit trail. History is kept.
    Decommission { thing: String },
    /// After a certificate rotation: set INACTIVE every certificate attached to the thing except
    /// the one its serial is provisioned with, in AWS IoT (or the local IoT Core) and the
    /// inventory; the decision in its audit trail. The current certificate must be ACTIVE and
    /// in use: the device's latest session (its presence) authenticated with it.
    RetireCerts {
        thing: String,
        /// Retire even though presence has not seen the device connect with its current
        /// certificate (e.g. its latest session was recorded before presence kept principals).
        #[arg(long)]
        force: bool,
    },
    /// Once, after deploying fleet health onto a running fleet: count the devices already
    /// connected (stored by an older version) in fleet health's connected gauge. Reads every
    /// device's presence; running it again counts nothing twice.
    CountConnected {
        #[arg(long, default_value_t = 500)]
        page: usize,
    },
}

#[derive(Subcommand)]
pub enum TwinCommand {
    /// One twin: desired, reported, delta, version, drift.
    Show {
        thing: String,
        /// A named shadow (default: the classic shadow).
        #[arg(long, default_value = "")]
        shadow: String,
    },
    /// Set desired values through the shadow service (`key=value`, values parsed as JSON when
    /// they parse, strings otherwise; `key=null` deletes; `a.b=1` nests). Retries version
    /// conflicts; prints the version applied, or that it gave up, or why it was rejected.
    Set {
        thing: String,
        #[arg(required = true)]
        values: Vec<String>,
        #[arg(long, default_value = "")]
        shadow: String,
        /// The local IoT Core's MQTT listener (embedded backend).
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: std::net::SocketAddr,
    },
    /// Delete a shadow through the shadow service (the twin mirrors the delete; a shadow
    /// created again continues its version numbers).
    Delete {
        thing: String,
        #[arg(long, default_value = "")]
        shadow: String,
        /// The local IoT Core's MQTT listener (embedded backend).
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: std::net::SocketAddr,
    },
    /// Twins whose reported key has a value, from an index (indexed keys: fw), e.g. fw=1.4.2.
    Query {
        filter: String,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        cohort: Cohort,
    },
    /// Stale-desired policies: after how long a drifting key is marked diverged, and whether
    /// it is then released (removed from the shadow's desired state).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Twins drifting (desired not reported) for longer than a duration, oldest drift first.
    Drift {
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        cohort: Cohort,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Every policy.
    List,
    /// Add or replace the policy of a top-level desired key.
    Set {
        key: String,
        /// How long the key may drift before it is marked diverged (at least 1m).
        #[arg(long, value_parser = humantime::parse_duration)]
        after: std::time::Duration,
        /// report: mark and count; release: also remove the key from the shadow's desired state.
        #[arg(long, value_enum, default_value_t = PolicyAction::Report)]
        action: PolicyAction,
    },
    /// Remove a key's policy.
    Remove { key: String },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum PolicyAction {
    Report,
    Release,
}

/// Keep only devices of a class and/or region, from the device registry (one batched lookup
/// of the twins the index returned: the cost follows the answer, never the fleet).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct Cohort {
    /// Only devices registered with this class.
    #[arg(long)]
    pub class: Option<String>,
    /// Only devices registered in this region.
    #[arg(long)]
    pub region: Option<String>,
}

#[derive(Subcommand)]
pub enum QuarantineCommand {
    /// Quarantined messages, oldest first.
    List {
        /// RFC 3339 time or a duration ago; default: everything.
        #[arg(long)]
        since: Option<String>,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Invocation { db, json, command } = Invocation::parse();
    let cli = match command {
        Toplevel::Fleet(command) => Cli { db, json, command },
        Toplevel::Firmware { command } => return exit_code(firmware::run(command)),
    };
    // The demo expects quarantines and drives a live progress line: only errors by default.
    let default_filter = if matches!(cli.command, Command::Demo { .. }) { "error" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    exit_code(commands::run(cli).await)
}

/// Success, or the error on stderr and failure.
fn exit_code(outcome: anyhow::Result<()>) -> std::process::ExitCode {
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader went away (`fleetctl ... | head`): not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetctl: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause shown only when the message before it does not
/// already end with it (a store error's message includes its source).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_chain_does_not_repeat_a_source_its_message_already_ends_with() {
        let inner = std::io::Error::other("no answer");
        let store = fleet_shared::StoreError::transient("mqtt shadow request", inner);
        let e = anyhow::Error::new(store).context("twin set");
        assert_eq!(super::error_chain(&e), "twin set: mqtt shadow request failed (transient): no answer");
    }
}
