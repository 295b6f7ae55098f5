//! The campaign state machine: one firmware, rolled out over IoT Jobs in stages, each stage
//! gated on fleet health, rolled back on its own when the canary fails (pure: no clock, no I/O;
//! the engine feeds it what the jobs service and the health ledger say).
//!
//! A campaign takes the devices of one class that run one firmware (`from_fw`) to another
//! (`to_fw`). Who takes part is decided when a stage starts ([`plan_stage`]): the class and
//! firmware must match and the preconditions hold (battery, recently heard from). Devices are
//! taken in a fixed order per campaign ([`rank`]: a hash of campaign id and thing), so stage
//! 1's 1 % is a spread of the fleet, and a stage never picks again a device an earlier stage
//! targeted. Stage sizes are cumulative percentages of the devices eligible when the campaign
//! started (its `population`).
//!
//! A stage ([`assess`]):
//! 1. rolls back at once when more than `max_failure_pct` of its finished executions FAILED or
//!    TIMED_OUT (a firmware that does not install needs no health data to be judged);
//! 2. waits for its executions to settle (none queued or in progress); still pending after
//!    `stage_timeout_minutes`, it pauses for an operator;
//! 3. pauses when it settled with no device updated (all rejected or canceled: nothing to judge);
//! 4. soaks `soak_minutes`, then asks the gate (canary `class/*/to_fw` against control
//!    `class/*/from_fw`, [`super::gate`]): advance to the next stage or complete, wait, or roll
//!    back. A gate that still waits `stage_timeout_minutes` after the soak pauses the campaign.
//!
//! Rolling back cancels what is still queued and sends the `from_fw` manifest to every device
//! a stage reached (succeeded or in progress); the campaign is rolled back when that job settles.
//!
//! The same stages, preconditions, timeouts and failure limit rotate certificates
//! ([`Change::Certificate`]): the devices of one class and firmware that the daily expiry check
//! marked `rotation_due` get a `fleetline.rotate_cert` job, each makes a new key and rotates
//! over its own connection (CreateCertificateFromCsr, RegisterThing with its current
//! certificate as the claim), and a stage's gate is that every device reporting success has
//! connected with a certificate other than the one that expires. There is nothing to roll back
//! (a device that rotated keeps the new certificate, the others their current one): "rolling
//! back" a rotation halts it, canceling what is queued.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::gate::{GatePolicy, Verdict};
use super::manifest::FirmwareManifest;
use crate::health::tally::Cohort;
use crate::model::{validate_label, Device, JobCounts, JobId, ThingName, MAX_JOB_ID_LEN};

/// Longest campaign id: its jobs are `<id>-s<n>` and `<id>-rb` within IoT Jobs' 64 characters.
pub const MAX_CAMPAIGN_ID_LEN: usize = MAX_JOB_ID_LEN - 8;
/// Entries kept in a campaign's log (the oldest go first).
pub const MAX_LOG_ENTRIES: usize = 100;

/// What a campaign changes on its devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Install `to_fw` (signed manifests; rolled back to `from_fw`).
    #[default]
    Firmware,
    /// Rotate the certificates of devices marked `rotation_due`, on `from_fw` (= `to_fw`: the
    /// firmware that carries out the rotation job).
    Certificate,
}

impl Change {
    /// What a stage's logs call the devices' work: (`installs`, `installed`) for firmware,
    /// (`rotations`, `rotated`) for certificates.
    pub fn work(self) -> (&'static str, &'static str) {
        match self {
            Change::Firmware => ("installs", "installed"),
            Change::Certificate => ("rotations", "rotated"),
        }
    }
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignSpec {
    /// 1–56 characters of `[A-Za-z0-9_-]`.
    pub id: String,
    /// What the campaign changes (campaigns stored before certificate rotation are firmware's).
    #[serde(default)]
    pub change: Change,
    /// Device class the firmware is built for.
    pub class: String,
    /// Firmware the devices run now; rolled back to.
    pub from_fw: String,
    /// Firmware the campaign installs.
    pub to_fw: String,
    /// Cumulative percentages of the population, strictly increasing, ending at 100
    /// (e.g. `[1, 10, 50, 100]`).
    pub stages: Vec<u32>,
    /// How long a settled stage is watched before the gate is asked.
    pub soak_minutes: i64,
    /// How long a stage may stay pending, or its gate wait after the soak, before the campaign
    /// pauses for an operator.
    pub stage_timeout_minutes: i64,
    /// FAILED + TIMED_OUT over finished executions above this percentage rolls back.
    pub max_failure_pct: f64,
    /// Executions IoT Jobs starts per minute (1–1000).
    pub max_per_minute: u32,
    /// An execution in progress longer than this times out.
    pub install_timeout_minutes: u32,
    pub preconditions: Preconditions,
    pub gate: GatePolicy,
}

/// What a device must satisfy to be picked for a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preconditions {
    /// Its last reported battery, when set; a device that never reported one is skipped.
    pub min_battery_pct: Option<f64>,
    /// It sent telemetry within this many minutes.
    pub seen_within_minutes: Option<i64>,
}

impl Default for Preconditions {
    fn default() -> Self {
        Self { min_battery_pct: Some(30.0), seen_within_minutes: Some(60) }
    }
}

impl CampaignSpec {
    /// A spec with the usual stages (1 %, 10 %, 50 %, 100 %) and limits.
    pub fn new(id: &str, class: &str, from_fw: &str, to_fw: &str) -> Self {
        Self {
            id: id.to_owned(),
            change: Change::Firmware,
            class: class.to_owned(),
            from_fw: from_fw.to_owned(),
            to_fw: to_fw.to_owned(),
            stages: vec![1, 10, 50, 100],
            soak_minutes: 60,
            stage_timeout_minutes: 24 * 60,
            max_failure_pct: 5.0,
            max_per_minute: 100,
            install_timeout_minutes: 60,
            preconditions: Preconditions::default(),
            gate: GatePolicy::default(),
        }
    }

    /// A certificate rotation of the `class` devices on `fw` that are due one, with the usual
    /// stages and limits.
    pub fn rotation(id: &str, class: &str, fw: &str) -> Self {
        Self { change: Change::Certificate, ..Self::new(id, class, fw, fw) }
    }

    /// Every rule a spec must follow, the first one broken as an error.
    pub fn check(&self) -> Result<(), InvalidSpec> {
        let bad = |why: String| Err(InvalidSpec(why));
        let id_ok = !self.id.is_empty()
            && self.id.len() <= MAX_CAMPAIGN_ID_LEN
            && self.id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if !id_ok {
            return bad(format!(
                "campaign id {:?}: expected 1-{MAX_CAMPAIGN_ID_LEN} characters of [A-Za-z0-9_-]",
                self.id
            ));
        }
        for (what, v) in [("class", &self.class), ("from_fw", &self.from_fw), ("to_fw", &self.to_fw)] {
            validate_label(what, v).map_err(|e| InvalidSpec(e.to_string()))?;
        }
        match self.change {
            Change::Firmware if self.from_fw == self.to_fw => {
                return bad(format!("from_fw and to_fw are both {}", self.to_fw));
            }
            Change::Certificate if self.from_fw != self.to_fw => {
                return bad(format!(
                    "a certificate rotation changes no firmware: from_fw {} and to_fw {} must be one",
                    self.from_fw, self.to_fw
                ));
            }
            _ => {}
        }
        let increasing = self.stages.windows(2).all(|w| w[0] < w[1]);
        if self.stages.is_empty() || !increasing || self.stages[0] == 0 || self.stages.last() != Some(&100) {
            return bad(format!(
                "stages {:?}: expected strictly increasing percentages from 1 ending at 100",
                self.stages
            ));
        }
        if self.soak_minutes < 0 || self.stage_timeout_minutes < 1 {
            return bad("soak_minutes must be >= 0 and stage_timeout_minutes >= 1".into());
        }
        if !(0.0..=100.0).contains(&self.max_failure_pct) {
            return bad(format!("max_failure_pct {} is not a percentage", self.max_failure_pct));
        }
        if !crate::model::MAX_PER_MINUTE.contains(&self.max_per_minute) {
            return bad(format!("max_per_minute {} is outside IoT Jobs' 1-1000", self.max_per_minute));
        }
        if !(1..=10_080).contains(&self.install_timeout_minutes) {
            return bad(format!(
                "install_timeout_minutes {} is outside IoT Jobs' 1-10080",
                self.install_timeout_minutes
            ));
        }
        if let Err(why) = self.gate.check(&crate::health::slo::Catalog::builtin()) {
            return bad(why);
        }
        Ok(())
    }

    /// The job of stage `stage` (0-based): `<id>-s<stage + 1>`.
    pub fn stage_job(&self, stage: usize) -> JobId {
        JobId::parse(&format!("{}-s{}", self.id, stage + 1))
            .expect("a checked campaign id makes valid job ids")
    }

    /// The rollback job: `<id>-rb`.
    pub fn rollback_job(&self) -> JobId {
        JobId::parse(&format!("{}-rb", self.id)).expect("a checked campaign id makes valid job ids")
    }

    /// The devices running the new firmware (`class/*/to_fw`).
    pub fn canary(&self) -> Cohort {
        Cohort::new(&self.class, "*", &self.to_fw)
    }

    /// The devices still on the old firmware (`class/*/from_fw`).
    pub fn control(&self) -> Cohort {
        Cohort::new(&self.class, "*", &self.from_fw)
    }

    /// Devices stage `stage` has reached in all, counted from the population.
    pub fn stage_goal(&self, stage: usize, population: u64) -> u64 {
        let pct = u64::from(self.stages[stage]);
        (population * pct).div_ceil(100)
    }
}

/// The campaign a job belongs to: `<id>` of `<id>-s<n>` or `<id>-rb`; `None` for another job.
pub fn campaign_of_job(job: &str) -> Option<&str> {
    if let Some(id) = job.strip_suffix("-rb") {
        return Some(id).filter(|id| !id.is_empty());
    }
    let (id, stage) = job.rsplit_once("-s")?;
    let numbered = !stage.is_empty() && stage.bytes().all(|b| b.is_ascii_digit());
    Some(id).filter(|id| numbered && !id.is_empty())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid campaign: {0}")]
pub struct InvalidSpec(pub String);

/// Where a campaign is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Created; the next tick starts stage 1.
    Pending,
    /// A stage's job is out.
    Stage(StageState),
    /// Rolling back: the rollback job is out.
    RollingBack {
        reason: String,
        job: JobId,
        started_ms: i64,
        /// The job's counts already reported to fleet health (the `ota` SLO).
        #[serde(default)]
        counted: JobCounts,
    },
    RolledBack {
        reason: String,
    },
    /// A certificate rotation stopped for its failures (or by an operator's roll back): its
    /// queued jobs canceled, nothing undone (devices that rotated keep their new certificate,
    /// the others their current one).
    Halted {
        reason: String,
    },
    Completed,
    /// Stopped by an operator; devices keep what they have.
    Aborted {
        reason: String,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Stage(_) => "stage",
            State::RollingBack { .. } => "rolling_back",
            State::RolledBack { .. } => "rolled_back",
            State::Halted { .. } => "halted",
            State::Completed => "completed",
            State::Aborted { .. } => "aborted",
        }
    }

    /// The names ([`Self::name`], also the stored `state` tag) of the states no tick changes.
    pub const FINAL_NAMES: [&'static str; 4] = ["rolled_back", "halted", "completed", "aborted"];

    /// No tick changes it any more.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            State::RolledBack { .. } | State::Halted { .. } | State::Completed | State::Aborted { .. }
        )
    }

    /// The names of the states where it went wrong.
    pub const FAILURE_NAMES: [&'static str; 3] = ["rolling_back", "rolled_back", "halted"];

    /// It went wrong: rolling back, rolled back, or halted.
    pub fn is_failure(&self) -> bool {
        matches!(self, State::RollingBack { .. } | State::RolledBack { .. } | State::Halted { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageState {
    /// 0-based.
    pub stage: usize,
    pub job: JobId,
    pub targets: u64,
    pub started_ms: i64,
    /// When the stage was first seen with nothing pending.
    pub settled_ms: Option<i64>,
    /// What the last look at it found.
    pub last: Option<String>,
    /// The job's counts already reported to fleet health (the `ota` SLO).
    #[serde(default)]
    pub counted: JobCounts,
}

/// One line of a campaign's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub at_ms: i64,
    pub text: String,
}

/// A campaign as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    pub spec: CampaignSpec,
    /// The signed manifest of `to_fw`, sent to the stages (a firmware campaign's only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareManifest>,
    /// The signed manifest of `from_fw`, sent when rolling back (a firmware campaign's only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<FirmwareManifest>,
    pub state: State,
    /// Set by an operator or a timeout: ticks look but change nothing until resumed.
    pub paused: Option<String>,
    /// Devices eligible when stage 1 started: what the stages' percentages count from.
    pub population: u64,
    /// Devices the stages' jobs targeted so far.
    pub targeted: u64,
    /// The stages' jobs created so far, in order.
    pub jobs: Vec<JobId>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub log: Vec<LogEntry>,
    /// Bumped by every store; a write must name the version it read.
    pub version: u64,
    /// 128 random bits (hex) made with the campaign, stamped on its jobs' descriptions. Job ids
    /// are the account's, so a job with one of this campaign's ids that lacks the stamp belongs
    /// to someone else (another stack in the account, or an earlier campaign of the same id)
    /// and is never adopted, cancelled or rolled back. Empty in campaigns stored before it
    /// existed, which take any job of their ids as theirs.
    #[serde(default)]
    pub owner: String,
}

impl Campaign {
    /// A campaign for `spec`, with the manifests of its two firmware (checked to be for its
    /// class and versions; their signatures are the engine's to check, with its trusted keys).
    pub fn new(
        spec: CampaignSpec,
        firmware: FirmwareManifest,
        rollback: FirmwareManifest,
        now_ms: i64,
    ) -> Result<Self, InvalidSpec> {
        if spec.change != Change::Firmware {
            return Err(InvalidSpec("a firmware campaign needs a firmware spec".into()));
        }
        for (m, fw) in [(&firmware, &spec.to_fw), (&rollback, &spec.from_fw)] {
            if m.fw() != fw || m.class() != spec.class {
                return Err(InvalidSpec(format!(
                    "the manifest for {}/{} does not fit a campaign that needs {}/{fw}",
                    m.class(),
                    m.fw(),
                    spec.class
                )));
            }
        }
        let created = format!("created: {} {} -> {}", spec.class, spec.from_fw, spec.to_fw);
        Self::with(spec, Some(firmware), Some(rollback), created, now_ms)
    }

    /// A certificate rotation campaign for `spec` ([`CampaignSpec::rotation`]).
    pub fn rotation(spec: CampaignSpec, now_ms: i64) -> Result<Self, InvalidSpec> {
        if spec.change != Change::Certificate {
            return Err(InvalidSpec("a certificate rotation needs a rotation spec".into()));
        }
        let created = format!(
            "created: rotate the certificates of {} devices on {} that are due one",
            spec.class, spec.from_fw
        );
        Self::with(spec, None, None, created, now_ms)
    }

    fn with(
        spec: CampaignSpec,
        firmware: Option<FirmwareManifest>,
        rollback: Option<FirmwareManifest>,
        created: String,
        now_ms: i64,
    ) -> Result<Self, InvalidSpec> {
        spec.check()?;
        let mut token = [0u8; 16];
        getrandom::fill(&mut token)
            .map_err(|e| InvalidSpec(format!("no randomness for the campaign's owner stamp: {e}")))?;
        let mut c = Self {
            spec,
            firmware,
            rollback,
            state: State::Pending,
            paused: None,
            population: 0,
            targeted: 0,
            jobs: Vec::new(),
            created_ms: now_ms,
            updated_ms: now_ms,
            log: Vec::new(),
            version: 0,
            owner: token.iter().map(|b| format!("{b:02x}")).collect(),
        };
        c.note(now_ms, created);
        Ok(c)
    }

    /// What it changes, for people: `sensor 1.4.2 -> 1.5.0`, `sensor 1.4.2: new certificates`.
    pub fn change_text(&self) -> String {
        let s = &self.spec;
        match s.change {
            Change::Firmware => format!("{} {} -> {}", s.class, s.from_fw, s.to_fw),
            Change::Certificate => format!("{} {}: new certificates", s.class, s.from_fw),
        }
    }

    /// The stage it is in, for people: `2/3 (50%)`, or `-` outside the stages.
    pub fn stage_text(&self) -> String {
        match &self.state {
            State::Stage(s) => {
                let pct = self.spec.stages.get(s.stage).map_or_else(String::new, |p| format!(" ({p}%)"));
                format!("{}/{}{pct}", s.stage + 1, self.spec.stages.len())
            }
            _ => "-".to_owned(),
        }
    }

    /// Its state's name, `(paused)` added while paused.
    pub fn state_text(&self) -> String {
        match &self.paused {
            Some(_) => format!("{} (paused)", self.state.name()),
            None => self.state.name().to_owned(),
        }
    }

    /// Why it ended, for a campaign that rolled back, halted or was aborted.
    pub fn end_reason(&self) -> Option<&str> {
        match &self.state {
            State::RolledBack { reason } | State::Halted { reason } | State::Aborted { reason } => {
                Some(reason)
            }
            _ => None,
        }
    }

    /// A firmware campaign's manifests: the one to install and the one to roll back to.
    pub fn manifests(&self) -> Option<(&FirmwareManifest, &FirmwareManifest)> {
        self.firmware.as_ref().zip(self.rollback.as_ref())
    }

    /// What this campaign's jobs' descriptions end with: ` [campaign <owner>]` (nothing for a
    /// campaign stored before stamps existed).
    pub fn job_stamp(&self) -> String {
        if self.owner.is_empty() {
            return String::new();
        }
        format!(" [campaign {}]", self.owner)
    }

    /// Whether a job of one of this campaign's ids, created with `description`, is this
    /// campaign's (always, for a campaign stored before jobs were stamped).
    pub fn owns_job(&self, description: &str) -> bool {
        self.owner.is_empty() || description.ends_with(&self.job_stamp())
    }

    /// Add a line to the log (keeping the newest [`MAX_LOG_ENTRIES`]).
    pub fn note(&mut self, at_ms: i64, text: impl Into<String>) {
        self.log.push(LogEntry { at_ms, text: text.into() });
        if self.log.len() > MAX_LOG_ENTRIES {
            let excess = self.log.len() - MAX_LOG_ENTRIES;
            self.log.drain(..excess);
        }
        self.updated_ms = self.updated_ms.max(at_ms);
    }
}

/// Why a device is not picked for a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    OtherClass,
    OtherFirmware,
    AlreadyTargeted,
    BatteryUnknown,
    BatteryLow,
    NotSeenRecently,
}

/// Where a device falls in a campaign's order: the first 8 bytes of SHA-256 over
/// `<campaign id>/<thing>`, so the order is fixed per campaign, spread over the fleet, and
/// differs between campaigns.
pub fn rank(campaign_id: &str, thing: &ThingName) -> u64 {
    let digest =
        Sha256::new().chain_update(campaign_id).chain_update(b"/").chain_update(thing.as_str()).finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 8 bytes"))
}

/// Whether `device` may take part now (class, firmware, preconditions).
pub fn eligibility(spec: &CampaignSpec, device: &Device, now_ms: i64) -> Result<(), Skip> {
    if device.class() != spec.class {
        return Err(Skip::OtherClass);
    }
    let fw = device
        .state
        .as_ref()
        .and_then(|s| s.fw.as_deref())
        .or(device.registration.as_ref().map(|r| r.fw.as_str()));
    if fw != Some(spec.from_fw.as_str()) {
        return Err(Skip::OtherFirmware);
    }
    if let Some(min) = spec.preconditions.min_battery_pct {
        match device.state.as_ref().and_then(|s| s.battery_pct) {
            None => return Err(Skip::BatteryUnknown),
            Some(b) if b < min => return Err(Skip::BatteryLow),
            Some(_) => {}
        }
    }
    if let Some(minutes) = spec.preconditions.seen_within_minutes {
        let seen = device.state.as_ref().map(|s| s.last_rx_ms);
        if seen.is_none_or(|at| now_ms - at > minutes * 60_000) {
            return Err(Skip::NotSeenRecently);
        }
    }
    Ok(())
}

/// Who a stage targets.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StagePlan {
    /// In the campaign's order.
    pub targets: Vec<ThingName>,
    /// Devices of the campaign's class and firmware left out, with why.
    pub skipped: Vec<(ThingName, Skip)>,
    /// Devices eligible now (before the stage's cut): the population when stage 1 starts.
    pub eligible: u64,
}

/// Pick stage `stage`'s devices from `fleet`: eligible, not `already` targeted, in rank order,
/// as many as the stage's goal minus what earlier stages targeted (`population` 0 means stage 1
/// is starting and the eligible devices are the population).
pub fn plan_stage(
    spec: &CampaignSpec,
    fleet: &[Device],
    already: &BTreeSet<ThingName>,
    stage: usize,
    population: u64,
    now_ms: i64,
) -> StagePlan {
    let mut eligible = Vec::new();
    let mut skipped = Vec::new();
    for d in fleet {
        let verdict = if already.contains(&d.thing) {
            Err(Skip::AlreadyTargeted)
        } else {
            eligibility(spec, d, now_ms)
        };
        match verdict {
            Ok(()) => eligible.push((rank(&spec.id, &d.thing), d.thing.clone())),
            Err(Skip::OtherClass | Skip::OtherFirmware) => {}
            Err(why) => skipped.push((d.thing.clone(), why)),
        }
    }
    eligible.sort();
    let count = eligible.len() as u64;
    let population = if population == 0 { count } else { population };
    // The last stage takes every device eligible now, also those that were not when the
    // campaign started (offline, low battery): "100 %" leaves nobody behind.
    let goal = if stage + 1 == spec.stages.len() { u64::MAX } else { spec.stage_goal(stage, population) };
    let wanted = usize::try_from(goal.saturating_sub(already.len() as u64)).unwrap_or(usize::MAX);
    let targets = eligible.into_iter().take(wanted).map(|(_, t)| t).collect();
    StagePlan { targets, skipped, eligible: count }
}

/// What a look at a stage decides.
#[derive(Debug, Clone, PartialEq)]
pub enum StageStep {
    /// Nothing to do yet, and why.
    Wait(String),
    /// The stage settled now (record the time), and why it waits.
    Settled(String),
    /// The stage has soaked: ask the gate, then look again with its verdict.
    AskGate,
    /// Start the next stage, or complete after the last.
    Advance,
    RollBack(String),
    Pause(String),
}

/// Judge a stage from its job's counts and, once it has soaked, the gate's verdict (pure).
pub fn assess(
    spec: &CampaignSpec,
    stage: &StageState,
    counts: &JobCounts,
    verdict: Option<&Verdict>,
    now_ms: i64,
) -> StageStep {
    let n = stage.stage + 1;
    let (work, done) = spec.change.work();
    // Installs that ended: a device that refused (REJECTED) or was never reached (CANCELED,
    // REMOVED) tried nothing, and must not dilute the failures of those that did.
    let bad = counts.failed + counts.timed_out;
    let finished = counts.succeeded + bad;
    if bad > 0 && bad as f64 * 100.0 > spec.max_failure_pct * finished as f64 {
        return StageStep::RollBack(format!(
            "stage {n}: {bad} of {finished} finished {work} failed or timed out (limit {}%)",
            spec.max_failure_pct
        ));
    }
    let timeout_ms = spec.stage_timeout_minutes * 60_000;
    let Some(settled_ms) = stage.settled_ms else {
        // Every target has an execution before the stage can settle: on AWS a rollout creates
        // them as it releases devices, so nothing pending is not yet everything done.
        if counts.pending() > 0 || counts.total() < stage.targets.max(1) {
            if now_ms - stage.started_ms > timeout_ms {
                return StageStep::Pause(format!(
                    "stage {n}: {} of {} {work} still pending after {} min",
                    counts.pending(),
                    stage.targets,
                    spec.stage_timeout_minutes
                ));
            }
            return StageStep::Wait(format!(
                "stage {n}: {} of {} {work} pending, {} succeeded",
                counts.pending(),
                stage.targets,
                counts.succeeded
            ));
        }
        if counts.succeeded == 0 {
            return StageStep::Pause(format!(
                "stage {n}: no device {done} {}: {} rejected, {} canceled, {} removed",
                match spec.change {
                    Change::Firmware => spec.to_fw.as_str(),
                    Change::Certificate => "its certificate",
                },
                counts.rejected,
                counts.canceled,
                counts.removed
            ));
        }
        return StageStep::Settled(format!(
            "stage {n}: {} of {} {done}; soaking {} min",
            counts.succeeded, stage.targets, spec.soak_minutes
        ));
    };
    let soaked_at = settled_ms + spec.soak_minutes * 60_000;
    if now_ms < soaked_at {
        return StageStep::Wait(format!(
            "stage {n}: soaking, {} min left",
            (soaked_at - now_ms + 59_999) / 60_000
        ));
    }
    match verdict {
        None => StageStep::AskGate,
        Some(Verdict::Advance) => StageStep::Advance,
        Some(Verdict::RollBack(why)) => StageStep::RollBack(format!("stage {n}: gate: {why}")),
        Some(Verdict::Wait(why)) if now_ms - soaked_at > timeout_ms => StageStep::Pause(format!(
            "stage {n}: the gate still waits {} min after the soak: {why}",
            spec.stage_timeout_minutes
        )),
        Some(Verdict::Wait(why)) => StageStep::Wait(format!("stage {n}: gate waits: {why}")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{DeviceRegistration, DeviceState, ExecutionStatus};
    use crate::ota::manifest::{ManifestSigner, UnsignedManifest};

    const NOW: i64 = 1_764_000_000_000;
    const MIN: i64 = 60_000;

    fn spec() -> CampaignSpec {
        CampaignSpec::new("fw150", "sensor", "1.4.2", "1.5.0")
    }

    /// A campaign for `spec` with manifests signed by a test key.
    pub(crate) fn campaign(spec: CampaignSpec) -> Result<Campaign, InvalidSpec> {
        let signer = ManifestSigner::from_bytes("test", &[7; 32]).expect("key");
        let sign = |fw: &str| {
            let image = format!("image of {fw}");
            let url = format!("https://fw.example.com/{}/{fw}.bin", spec.class);
            signer
                .sign(UnsignedManifest::for_image(fw, spec.class.as_str(), url, image.as_bytes()))
                .expect("signed")
        };
        let (to, from) = (sign(&spec.to_fw), sign(&spec.from_fw));
        Campaign::new(spec, to, from, NOW)
    }

    fn device(name: &str, class: &str, fw: &str, battery: Option<f64>, seen_ms: i64) -> Device {
        Device {
            thing: ThingName::parse(name).expect("thing"),
            registration: Some(DeviceRegistration {
                class: class.into(),
                region: "eu-west".into(),
                fw: "1.0.0".into(),
                registered_at_ms: 0,
            }),
            state: Some(DeviceState {
                last_ts_ms: seen_ms,
                last_rx_ms: seen_ms,
                boot: 1,
                seq: 1,
                battery_pct: battery,
                fw: Some(fw.into()),
            }),
        }
    }

    fn fleet(n: usize) -> Vec<Device> {
        (0..n).map(|i| device(&format!("sensor-{i:04}"), "sensor", "1.4.2", Some(80.0), NOW - MIN)).collect()
    }

    fn counts(pairs: &[(ExecutionStatus, u64)]) -> JobCounts {
        let mut c = JobCounts::default();
        for (s, n) in pairs {
            c.add(*s, *n);
        }
        c
    }

    fn stage(settled_ms: Option<i64>) -> StageState {
        StageState {
            stage: 1,
            job: spec().stage_job(1),
            targets: 10,
            started_ms: NOW - 30 * MIN,
            settled_ms,
            last: None,
            counted: JobCounts::default(),
        }
    }

    #[test]
    fn the_final_and_failure_names_are_those_states_names_and_their_stored_tags() -> anyhow::Result<()> {
        let reason = || "r".to_owned();
        let all = [
            State::Pending,
            State::RollingBack {
                reason: reason(),
                job: JobId::parse("j")?,
                started_ms: 0,
                counted: JobCounts::default(),
            },
            State::RolledBack { reason: reason() },
            State::Halted { reason: reason() },
            State::Completed,
            State::Aborted { reason: reason() },
        ];
        for s in &all {
            assert_eq!(State::FINAL_NAMES.contains(&s.name()), s.is_final(), "{s:?}");
            assert_eq!(State::FAILURE_NAMES.contains(&s.name()), s.is_failure(), "{s:?}");
            assert_eq!(serde_json::to_value(s)?["state"], s.name(), "{s:?}");
        }
        Ok(())
    }

    #[test]
    fn a_campaign_stored_before_rotations_existed_reads_as_the_firmware_campaign_it_was() -> anyhow::Result<()>
    {
        // GIVEN a firmware campaign as stored before campaigns had a change (no `change` in its
        // spec), and as stored now
        let now = campaign(spec())?;
        let mut before = serde_json::to_value(&now)?;
        before["spec"].as_object_mut().map(|s| s.remove("change"));
        // WHEN both are read back
        let read: Campaign = serde_json::from_value(before)?;
        // THEN the old one is the same firmware campaign, manifests and all
        assert_eq!(read, now);
        assert_eq!(read.spec.change, Change::Firmware);
        // AND a firmware campaign written now keeps the fields older binaries read
        let written = serde_json::to_value(&now)?;
        assert!(written.get("firmware").is_some() && written.get("rollback").is_some(), "{written}");
        Ok(())
    }

    #[test]
    fn a_spec_is_checked_before_a_campaign_exists() {
        assert!(campaign(spec()).is_ok());
        let broken: [fn(&mut CampaignSpec); 7] = [
            |s| s.id = "fw 1.5".into(),
            |s| s.id = "x".repeat(57),
            |s| s.to_fw = s.from_fw.clone(),
            |s| s.stages = vec![10, 5, 100],
            |s| s.stages = vec![1, 50],
            |s| s.max_per_minute = 0,
            |s| s.gate.slos.clear(),
        ];
        for (i, breaks) in broken.iter().enumerate() {
            let mut s = spec();
            breaks(&mut s);
            assert!(campaign(s).is_err(), "case {i}");
        }
    }

    #[test]
    fn a_job_id_names_its_campaign() {
        assert_eq!(campaign_of_job("fw150-s2"), Some("fw150"));
        assert_eq!(campaign_of_job("fw-s1-s12"), Some("fw-s1"));
        assert_eq!(campaign_of_job("fw150-rb"), Some("fw150"));
        for other in ["fw150", "fw150-s", "fw150-sx", "-s1", "-rb", "reboot-all"] {
            assert_eq!(campaign_of_job(other), None, "{other}");
        }
    }

    #[test]
    fn job_ids_name_the_campaign_and_the_stage() {
        let s = CampaignSpec { id: "x".repeat(MAX_CAMPAIGN_ID_LEN), ..spec() };
        assert_eq!(s.stage_job(0).as_str(), format!("{}-s1", s.id));
        assert_eq!(s.rollback_job().as_str(), format!("{}-rb", s.id));
        assert_eq!(spec().canary().to_string(), "sensor/*/1.5.0");
        assert_eq!(spec().control().to_string(), "sensor/*/1.4.2");
    }

    #[test]
    fn stages_take_cumulative_shares_of_the_population_in_a_fixed_spread_order() {
        // GIVEN 1,000 eligible sensors
        let fleet = fleet(1_000);
        let s = spec();
        // WHEN stage 1 (1 %) and then stage 2 (10 %) are planned
        let first = plan_stage(&s, &fleet, &BTreeSet::new(), 0, 0, NOW);
        let already: BTreeSet<_> = first.targets.iter().cloned().collect();
        let second = plan_stage(&s, &fleet, &already, 1, first.eligible, NOW);
        // THEN stage 1 takes 10 devices, stage 2 the next 90, none twice
        assert_eq!((first.eligible, first.targets.len(), second.targets.len()), (1_000, 10, 90));
        assert!(second.targets.iter().all(|t| !already.contains(t)));
        // AND the order is the campaign's rank, stable and not the names' order
        let again = plan_stage(&s, &fleet, &BTreeSet::new(), 0, 0, NOW);
        assert_eq!(first.targets, again.targets);
        let by_name: Vec<_> = fleet.iter().take(10).map(|d| d.thing.clone()).collect();
        assert_ne!(first.targets, by_name);
        // AND another campaign spreads differently
        let other =
            plan_stage(&CampaignSpec { id: "fw150b".into(), ..s }, &fleet, &BTreeSet::new(), 0, 0, NOW);
        assert_ne!(first.targets, other.targets);
    }

    #[test]
    fn a_small_fleet_still_gets_a_canary_and_the_last_stage_takes_everyone_left() {
        let fleet = fleet(7);
        let s = spec();
        let first = plan_stage(&s, &fleet, &BTreeSet::new(), 0, 0, NOW);
        assert_eq!(first.targets.len(), 1, "1 % of 7 rounds up to one device");
        let already: BTreeSet<_> = first.targets.iter().cloned().collect();
        let last = plan_stage(&s, &fleet, &already, 3, 7, NOW);
        assert_eq!(last.targets.len(), 6);
        // devices that became eligible after the start (9 now, 7 then) are not left behind
        let grown = self::fleet(9);
        assert_eq!(plan_stage(&s, &grown, &already, 3, 7, NOW).targets.len(), 8);
        // while an earlier stage still counts from the population at the start
        assert_eq!(plan_stage(&s, &grown, &already, 1, 7, NOW).targets.len(), 0, "10 % of 7 is 1, taken");
    }

    #[test]
    fn preconditions_leave_devices_out_with_a_reason() {
        let s = spec();
        let fleet = vec![
            device("ok", "sensor", "1.4.2", Some(80.0), NOW - MIN),
            device("low", "sensor", "1.4.2", Some(10.0), NOW - MIN),
            device("silent", "sensor", "1.4.2", Some(80.0), NOW - 61 * MIN),
            device("nobattery", "sensor", "1.4.2", None, NOW - MIN),
            device("gateway", "gateway", "1.4.2", Some(80.0), NOW - MIN),
            device("newer", "sensor", "1.5.0", Some(80.0), NOW - MIN),
        ];
        let plan = plan_stage(&s, &fleet, &BTreeSet::new(), 3, 0, NOW);
        let names = |v: &[ThingName]| v.iter().map(|t| t.as_str().to_owned()).collect::<Vec<_>>();
        assert_eq!(names(&plan.targets), ["ok"]);
        let skipped: Vec<_> = plan.skipped.iter().map(|(t, why)| (t.as_str(), why.clone())).collect();
        assert_eq!(
            skipped,
            [
                ("low", Skip::BatteryLow),
                ("silent", Skip::NotSeenRecently),
                ("nobattery", Skip::BatteryUnknown)
            ]
        );
        // a device with no telemetry yet is judged by the firmware it was registered with
        let mut fresh = device("fresh", "sensor", "x", None, 0);
        fresh.state = None;
        fresh.registration.as_mut().expect("registered").fw = "1.4.2".into();
        let lax = CampaignSpec {
            preconditions: Preconditions { min_battery_pct: None, seen_within_minutes: None },
            ..s
        };
        assert_eq!(eligibility(&lax, &fresh, NOW), Ok(()));
    }

    #[test]
    fn failed_installs_roll_back_before_any_health_data() {
        use ExecutionStatus::*;
        let c = counts(&[(Succeeded, 3), (Failed, 1), (InProgress, 6)]);
        let step = assess(&spec(), &stage(None), &c, None, NOW);
        assert!(matches!(&step, StageStep::RollBack(why) if why.contains("1 of 4")), "{step:?}");
        // rejected (a device refusing, e.g. on low battery) is not a failed install
        let c = counts(&[(Succeeded, 19), (Rejected, 5)]);
        assert!(matches!(assess(&spec(), &stage(None), &c, None, NOW), StageStep::Settled(_)));
        // nor does it dilute the failures: 1 of 6 installs failed, whatever the 20 refusals
        let c = counts(&[(Succeeded, 5), (Rejected, 20), (Canceled, 3), (Failed, 1)]);
        let step = assess(&spec(), &stage(None), &c, None, NOW);
        assert!(matches!(&step, StageStep::RollBack(why) if why.contains("1 of 6")), "{step:?}");
    }

    #[test]
    fn a_stage_waits_for_its_installs_then_soaks_then_asks_the_gate() {
        use ExecutionStatus::*;
        let s = spec();
        let pending = counts(&[(Succeeded, 4), (Queued, 6)]);
        assert!(matches!(assess(&s, &stage(None), &pending, None, NOW), StageStep::Wait(_)));
        // a rollout that has released 4 of its 10 devices (AWS creates executions as it goes)
        let released = counts(&[(Succeeded, 4)]);
        assert!(matches!(assess(&s, &stage(None), &released, None, NOW), StageStep::Wait(_)));
        let done = counts(&[(Succeeded, 10)]);
        assert!(matches!(assess(&s, &stage(None), &done, None, NOW), StageStep::Settled(_)));
        let soaking = stage(Some(NOW - 59 * MIN));
        assert_eq!(
            assess(&s, &soaking, &done, None, NOW),
            StageStep::Wait("stage 2: soaking, 1 min left".into())
        );
        let soaked = stage(Some(NOW - 60 * MIN));
        assert_eq!(assess(&s, &soaked, &done, None, NOW), StageStep::AskGate);
        assert_eq!(assess(&s, &soaked, &done, Some(&Verdict::Advance), NOW), StageStep::Advance);
        let rb = assess(&s, &soaked, &done, Some(&Verdict::RollBack("ingest burns".into())), NOW);
        assert_eq!(rb, StageStep::RollBack("stage 2: gate: ingest burns".into()));
    }

    #[test]
    fn a_stuck_stage_or_a_gate_that_never_decides_pauses_for_an_operator() {
        use ExecutionStatus::*;
        let s = CampaignSpec { stage_timeout_minutes: 120, ..spec() };
        let mut stuck = stage(None);
        stuck.started_ms = NOW - 121 * MIN;
        let step = assess(&s, &stuck, &counts(&[(Succeeded, 9), (InProgress, 1)]), None, NOW);
        assert!(
            matches!(&step, StageStep::Pause(why) if why.contains("1 of 10 installs still pending")),
            "{step:?}"
        );
        let waiting = stage(Some(NOW - (60 + 121) * MIN));
        let wait = Verdict::Wait("the canary has 3 events".into());
        let step = assess(&s, &waiting, &counts(&[(Succeeded, 10)]), Some(&wait), NOW);
        assert!(matches!(step, StageStep::Pause(_)), "{step:?}");
        let step = assess(&s, &stage(Some(NOW - 61 * MIN)), &counts(&[(Succeeded, 10)]), Some(&wait), NOW);
        assert!(matches!(step, StageStep::Wait(_)), "{step:?}");
    }

    #[test]
    fn a_stage_where_no_device_installed_pauses_instead_of_waiting_on_an_empty_canary() {
        use ExecutionStatus::*;
        let step = assess(&spec(), &stage(None), &counts(&[(Rejected, 8), (Canceled, 2)]), None, NOW);
        assert!(matches!(&step, StageStep::Pause(why) if why.contains("8 rejected")), "{step:?}");
    }

    #[test]
    fn the_log_keeps_the_newest_entries() -> anyhow::Result<()> {
        let mut c = campaign(spec())?;
        for i in 0..150 {
            c.note(NOW + i, format!("entry {i}"));
        }
        assert_eq!(c.log.len(), MAX_LOG_ENTRIES);
        assert_eq!(c.log.last().map(|e| e.text.as_str()), Some("entry 149"));
        assert_eq!(c.updated_ms, NOW + 149);
        Ok(())
    }

    #[test]
    fn a_campaign_round_trips_through_json() -> anyhow::Result<()> {
        let mut c = campaign(spec())?;
        c.state = State::Stage(stage(Some(NOW)));
        let back: Campaign = serde_json::from_str(&serde_json::to_string(&c)?)?;
        assert_eq!(back, c);
        Ok(())
    }
}
