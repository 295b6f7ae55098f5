//! The campaign engine: one tick of a campaign against the ports (the fleet, IoT Jobs, the
//! health ledger), deciding with the pure rules of [`super::campaign`]. The ota-orchestrator
//! function ticks every active campaign on its schedule; `fleetctl ota` ticks them locally.
//!
//! A tick is safe to repeat and to crash in: a stage's or the rollback's job has a fixed id, so
//! a job created by a tick whose campaign write was lost is found again (IoT Jobs answers a
//! second create with a conflict) and adopted, and the campaign store refuses a write from a
//! tick that read an older version.
//!
//! A certificate rotation ([`Change::Certificate`]) runs on the same stages: its devices are
//! those of the class and firmware marked `rotation_due` ([`RotationReads::due`]; only those
//! are read, by key, [`DeviceAdmin::devices_among`]), its jobs carry [`rotation_document`],
//! its gate is [`Engine::rotation_verdict`], and a rollback halts it.

use std::collections::BTreeSet;

use serde_json::json;

use super::campaign::{
    assess, plan_stage, Campaign, CampaignSpec, Change, Skip, StageState, StageStep, State,
};
use super::gate::{self, Verdict};
use super::manifest::{FirmwareManifest, ManifestVerifier};
use crate::error::{ErrorKind, StoreError};
use crate::health::gate::GateError;
use crate::health::slo::Catalog;
use crate::health::tally::{counter, minute_of, Bucket, Cohort, HealthDelta, UNKNOWN};
use crate::model::{Enrolment, ExecutionStatus, JobCounts, JobId, JobProgress, JobStatus, NewJob, ThingName};
use crate::ports::{
    Allowlist, CertMarks, DeviceAdmin, HealthCounters, JobsControl, PresenceReader, SloReader,
};

/// What `operation` a Fleetline OTA job document carries.
pub const OTA_OPERATION: &str = "fleetline.ota";
/// What `operation` a certificate rotation job document carries.
pub const ROTATE_OPERATION: &str = "fleetline.rotate_cert";

#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("manifest for {fw}: {why}")]
    Manifest { fw: String, why: String },
    /// Job ids are the account's: another stack's campaign, or an earlier one of this id, made it.
    #[error(
        "job {job} exists and is not this campaign's (created as {description:?}): job ids are the \
         account's, so create the campaign again under an id not used in this account and region"
    )]
    JobTaken { job: JobId, description: String },
}

impl OtaError {
    pub fn is_transient(&self) -> bool {
        match self {
            OtaError::Store(e) | OtaError::Gate(GateError::Store(e)) => e.is_transient(),
            _ => false,
        }
    }
}

/// The job document a device gets: the signed manifest it checks before it installs.
pub fn job_document(campaign: &str, manifest: &FirmwareManifest) -> serde_json::Value {
    json!({ "operation": OTA_OPERATION, "campaign": campaign, "manifest": manifest })
}

/// The job document of a certificate rotation: the device makes a new key and rotates over its
/// own connection (CreateCertificateFromCsr, then RegisterThing with its current certificate as
/// the claim), connects with the new certificate, and reports from that connection.
pub fn rotation_document(campaign: &str) -> serde_json::Value {
    json!({ "operation": ROTATE_OPERATION, "campaign": campaign })
}

/// What one tick did.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    /// The campaign changed and must be stored.
    pub changed: bool,
    /// One line on where it stands.
    pub summary: String,
    /// Installs that finished since the last tick, for fleet health's `ota` SLO (counted
    /// before the campaign is stored: a lost write counts them again, never drops them).
    pub finished: Vec<Finished>,
}

/// Installs of one firmware that finished since the campaign's last tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub class: String,
    /// The firmware installed (the new one in a stage, the old one in a rollback).
    pub fw: String,
    pub succeeded: u64,
    /// FAILED or TIMED_OUT (a device refusing, REJECTED, is not a failed install).
    pub failed: u64,
}

/// Add `finished` installs to fleet health's counters for the `ota` SLO (`ota_ok`, `ota_fail`),
/// per class and firmware: the region is not known per job, so the cohort is `<class>/-/<fw>`.
/// Called before the ticked campaign is stored (a lost write counts again, never drops).
pub async fn count_finished<W: HealthCounters>(
    health: &W,
    finished: &[Finished],
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut delta = HealthDelta::default();
    let bucket = Bucket::Minute(minute_of(now_ms));
    for f in finished {
        let cohort = Cohort::new(&f.class, UNKNOWN, &f.fw);
        delta.add(bucket, &cohort, counter::OTA_SUCCEEDED, f.succeeded as i64);
        delta.add(bucket, &cohort, counter::OTA_FAILED, f.failed as i64);
    }
    if delta.is_empty() {
        return Ok(());
    }
    health.add_health(&delta).await
}

/// What finished between `counted` and `now`; `counted` becomes `now`.
fn newly(class: &str, fw: &str, now: &JobCounts, counted: &mut JobCounts) -> Option<Finished> {
    let succeeded = now.succeeded.saturating_sub(counted.succeeded);
    let failed = (now.failed + now.timed_out).saturating_sub(counted.failed + counted.timed_out);
    *counted = *now;
    (succeeded + failed > 0).then(|| Finished {
        class: class.to_owned(),
        fw: fw.to_owned(),
        succeeded,
        failed,
    })
}

/// What a certificate rotation campaign reads: who is due one, and whether a device has rotated.
pub trait RotationReads: Send + Sync {
    /// The devices marked `rotation_due`.
    fn due(&self) -> impl std::future::Future<Output = Result<BTreeSet<ThingName>, StoreError>> + Send;

    /// Whether `thing` has rotated: it has no mark any more (the daily check clears it once the
    /// old certificate is retired), or its serial is provisioned with another certificate than
    /// the one it was marked for and its latest session used that one.
    fn rotated(
        &self,
        thing: &ThingName,
    ) -> impl std::future::Future<Output = Result<bool, StoreError>> + Send;
}

/// The ports [`RotationReads`] is answered from: the daily check's marks (the Devices table),
/// presence (the Devices table) and the allowlist (the Certificates table).
pub struct RotationPorts<M, P, A> {
    pub marks: M,
    pub presence: P,
    pub allowlist: A,
}

impl<S: Clone> RotationPorts<S, S, S> {
    /// All three from one store (SQLite holds them all).
    pub fn of(store: &S) -> Self {
        Self { marks: store.clone(), presence: store.clone(), allowlist: store.clone() }
    }
}

impl<M: CertMarks, P: PresenceReader, A: Allowlist> RotationReads for RotationPorts<M, P, A> {
    async fn due(&self) -> Result<BTreeSet<ThingName>, StoreError> {
        Ok(self.marks.rotation_due().await?.into_iter().map(|(t, _)| t).collect())
    }

    async fn rotated(&self, thing: &ThingName) -> Result<bool, StoreError> {
        let Some(mark) = self.marks.cert_status(thing).await? else { return Ok(true) };
        let current = match self.allowlist.entry(thing).await?.map(|e| e.enrolment) {
            Some(Enrolment::Provisioned { certificate, .. }) if certificate != mark.certificate => {
                certificate
            }
            _ => return Ok(false),
        };
        let principal = self.presence.presence(thing).await?.and_then(|p| p.principal);
        Ok(principal.as_deref() == Some(current.as_str()))
    }
}

/// The ports a tick reads and acts on.
pub struct Engine<'a, F, J, H, R> {
    /// The device registry: who a stage can pick.
    pub fleet: &'a F,
    pub jobs: &'a J,
    pub health: &'a H,
    /// What a certificate rotation reads.
    pub rotation: &'a R,
    pub catalog: &'a Catalog,
    /// The keys manifests must be signed with: a campaign sends only verified manifests.
    pub verifier: &'a ManifestVerifier,
}

impl<'a, S, R> Engine<'a, S, S, S, R> {
    /// An engine over one store that is the registry, IoT Jobs and the SLO ledger at once
    /// (SQLite: the CLI's embedded backend, the local IoT Core, tests).
    pub fn over(store: &'a S, rotation: &'a R, catalog: &'a Catalog, verifier: &'a ManifestVerifier) -> Self {
        Engine { fleet: store, jobs: store, health: store, rotation, catalog, verifier }
    }
}

impl<F: DeviceAdmin, J: JobsControl, H: SloReader, R: RotationReads> Engine<'_, F, J, H, R> {
    /// Check a new campaign's manifests (signed by a trusted key, for its class and firmware);
    /// a certificate rotation has none.
    pub fn check_manifests(&self, c: &Campaign) -> Result<(), OtaError> {
        if c.spec.change == Change::Certificate {
            return Ok(());
        }
        let Some((firmware, rollback)) = c.manifests() else {
            let why = "a firmware campaign stored without its manifests".to_owned();
            return Err(OtaError::Manifest { fw: c.spec.to_fw.clone(), why });
        };
        for (m, fw) in [(firmware, &c.spec.to_fw), (rollback, &c.spec.from_fw)] {
            let fail = |why: String| Err(OtaError::Manifest { fw: m.fw().to_owned(), why });
            if m.fw() != fw || m.class() != c.spec.class {
                return fail(format!(
                    "it is for {}/{}, the campaign needs {}/{fw}",
                    m.class(),
                    m.fw(),
                    c.spec.class
                ));
            }
            if let Err(e) = self.verifier.verify(m) {
                return fail(format!("{}: {e}", e.code()));
            }
        }
        Ok(())
    }

    /// Check that no job of a new campaign's ids exists yet: job ids are the account's, and an
    /// id used before (by another stack, or an earlier campaign) cannot be used again.
    pub async fn check_ids_free(&self, c: &Campaign) -> Result<(), OtaError> {
        let jobs = (0..c.spec.stages.len()).map(|s| c.spec.stage_job(s)).chain([c.spec.rollback_job()]);
        for job in jobs {
            if let Some(found) = self.jobs.job_progress(&job).await? {
                return Err(OtaError::JobTaken { job, description: found.description });
            }
        }
        Ok(())
    }

    /// Check a new campaign before it is stored: its manifests ([`Self::check_manifests`]) and
    /// its job ids ([`Self::check_ids_free`]).
    pub async fn check_new(&self, c: &Campaign) -> Result<(), OtaError> {
        self.check_manifests(c)?;
        self.check_ids_free(c).await
    }

    /// Move `c` on as far as it can go now.
    pub async fn tick(&self, c: &mut Campaign, now_ms: i64) -> Result<Tick, OtaError> {
        let before = c.clone();
        if let Some(why) = &c.paused {
            return Ok(Tick { changed: false, summary: format!("paused: {why}"), finished: vec![] });
        }
        if c.state.is_final() {
            return Ok(Tick { changed: false, summary: c.state.name().to_owned(), finished: vec![] });
        }
        self.check_manifests(c)?;
        let mut finished = Vec::new();
        let summary = match c.state.clone() {
            State::Pending => self.start_stage(c, 0, now_ms).await?,
            State::Stage(stage) => self.look_at_stage(c, stage, now_ms, &mut finished).await?,
            State::RollingBack { reason, job, started_ms, mut counted } => {
                let progress = self.progress(&job).await?;
                let counts = progress.counts;
                finished.extend(newly(&c.spec.class, &c.spec.from_fw, &counts, &mut counted));
                c.state =
                    State::RollingBack { reason: reason.clone(), job: job.clone(), started_ms, counted };
                // Settled when IoT Jobs says the job is: a rollout still releasing devices has
                // nothing pending between its batches, and its group must outlive it.
                if progress.status != JobStatus::InProgress {
                    let failed = counts.failed + counts.timed_out + counts.rejected;
                    let text = format!(
                        "rolled back to {}: {} of {} devices, {failed} failed to roll back",
                        c.spec.from_fw,
                        counts.succeeded,
                        counts.total()
                    );
                    c.note(now_ms, &text);
                    for job in self.stage_jobs(c).await?.iter().chain([&job]) {
                        self.retire(c, job, now_ms).await;
                    }
                    c.state = State::RolledBack { reason };
                    text
                } else {
                    format!("rolling back: {} of {} pending", counts.pending(), counts.total())
                }
            }
            State::RolledBack { .. } | State::Halted { .. } | State::Completed | State::Aborted { .. } => {
                unreachable!("final states return above")
            }
        };
        Ok(Tick { changed: *c != before, summary, finished })
    }

    /// Free what a settled job holds ([`JobsControl::retire_job`]). A failure does not hold the
    /// campaign up: it is logged and noted, and the job's group is left for an operator.
    async fn retire(&self, c: &mut Campaign, job: &JobId, now_ms: i64) {
        if let Err(e) = self.jobs.retire_job(job).await {
            tracing::warn!(campaign = %c.spec.id, %job, error = %e, "job not retired");
            c.note(now_ms, format!("job {job} not retired (its thing group is left): {e}"));
        }
    }

    async fn progress(&self, job: &JobId) -> Result<JobProgress, OtaError> {
        match self.jobs.job_progress(job).await? {
            Some(p) => Ok(p),
            None => Err(StoreError::permanent("job_progress", format!("job {job} does not exist")).into()),
        }
    }

    async fn counts(&self, job: &JobId) -> Result<JobCounts, OtaError> {
        Ok(self.progress(job).await?.counts)
    }

    async fn look_at_stage(
        &self,
        c: &mut Campaign,
        mut stage: StageState,
        now_ms: i64,
        finished: &mut Vec<Finished>,
    ) -> Result<String, OtaError> {
        let counts = self.counts(&stage.job).await?;
        // Installs feed the ota SLO; a rotation installs nothing.
        if c.spec.change == Change::Firmware {
            finished.extend(newly(&c.spec.class, &c.spec.to_fw, &counts, &mut stage.counted));
        }
        c.state = State::Stage(stage.clone());
        let mut step = assess(&c.spec, &stage, &counts, None, now_ms);
        if step == StageStep::AskGate {
            let verdict = match c.spec.change {
                Change::Firmware => self.verdict(&c.spec, now_ms).await?,
                Change::Certificate => self.rotation_verdict(&stage.job).await?,
            };
            step = assess(&c.spec, &stage, &counts, Some(&verdict), now_ms);
        }
        match step {
            StageStep::Wait(why) => {
                stage.last = Some(why.clone());
                c.state = State::Stage(stage);
                Ok(why)
            }
            StageStep::Settled(why) => {
                stage.settled_ms = Some(now_ms);
                stage.last = Some(why.clone());
                c.note(now_ms, &why);
                c.state = State::Stage(stage);
                Ok(why)
            }
            StageStep::Advance => {
                c.note(now_ms, format!("stage {}: the gate passed", stage.stage + 1));
                self.retire(c, &stage.job, now_ms).await;
                self.start_stage(c, stage.stage + 1, now_ms).await
            }
            StageStep::RollBack(why) => self.roll_back(c, why, now_ms).await,
            StageStep::Pause(why) => {
                c.note(now_ms, format!("paused: {why}"));
                c.paused = Some(why.clone());
                Ok(why)
            }
            StageStep::AskGate => unreachable!("assess with a verdict does not ask for one"),
        }
    }

    async fn verdict(&self, spec: &CampaignSpec, now_ms: i64) -> Result<Verdict, OtaError> {
        let Some(report) = self.health.latest_health().await? else {
            return Ok(Verdict::Wait("fleet-health has not closed a minute yet".into()));
        };
        let age = minute_of(now_ms) - report.minute;
        if age > gate::MAX_HEALTH_AGE_MINUTES {
            return Ok(Verdict::Wait(format!(
                "fleet-health's newest closed minute is {age} minutes old (more than {}): it is failing \
                 or behind, and an older window may end before this stage began",
                gate::MAX_HEALTH_AGE_MINUTES
            )));
        }
        let (verdict, _) = gate::evaluate(
            self.health,
            self.catalog,
            &spec.gate,
            &spec.canary(),
            &spec.control(),
            report.minute,
        )
        .await?;
        Ok(verdict)
    }

    /// A rotation stage's gate: every device whose execution SUCCEEDED has rotated
    /// ([`RotationReads::rotated`]: its serial moved to another certificate than the one it was
    /// marked for, and its latest session used that one; or its mark is gone). The device's
    /// word is not enough: one that reports success and still connects with the expiring
    /// certificate, or with another certificate attached to it, holds the stage up until it
    /// pauses. Up to three reads per device that reported success, per tick after the soak.
    pub async fn rotation_verdict(&self, job: &JobId) -> Result<Verdict, OtaError> {
        let (mut done, mut unseen) = (0usize, Vec::new());
        for (thing, status) in self.jobs.job_executions(job).await? {
            if status != ExecutionStatus::Succeeded {
                continue;
            }
            done += 1;
            if !self.rotation.rotated(&thing).await? {
                unseen.push(thing);
            }
        }
        Ok(match unseen.first() {
            None => Verdict::Advance,
            Some(first) => Verdict::Wait(format!(
                "{} of {done} devices that report a new certificate have not connected with one \
                 yet (first: {first})",
                unseen.len()
            )),
        })
    }

    /// Things the stages' jobs reached, with their executions' status.
    async fn reached(&self, jobs: &[JobId]) -> Result<Vec<(ThingName, ExecutionStatus)>, OtaError> {
        let mut out = Vec::new();
        for job in jobs {
            out.extend(self.jobs.job_executions(job).await?);
        }
        Ok(out)
    }

    /// The stages' jobs that exist: those the campaign recorded, and any other stage's job of
    /// its own that IoT Jobs knows (created by a tick whose campaign write was lost to an
    /// operator's); a job of the same id made by someone else is left alone.
    async fn stage_jobs(&self, c: &Campaign) -> Result<Vec<JobId>, OtaError> {
        let mut out = Vec::new();
        for stage in 0..c.spec.stages.len() {
            let job = c.spec.stage_job(stage);
            let ours = c.jobs.contains(&job)
                || self.jobs.job_progress(&job).await?.is_some_and(|p| c.owns_job(&p.description));
            if ours {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// Cancel what is still queued in every stage's job.
    async fn cancel_stages(&self, c: &Campaign) -> Result<Vec<JobId>, OtaError> {
        let jobs = self.stage_jobs(c).await?;
        for job in &jobs {
            self.jobs.cancel_job(job, false).await?;
        }
        Ok(jobs)
    }

    /// Start stage `first` (or the next one with devices to take); complete after the last.
    async fn start_stage(&self, c: &mut Campaign, first: usize, now_ms: i64) -> Result<String, OtaError> {
        let fleet = match c.spec.change {
            Change::Firmware => self.fleet.devices().await?,
            // A rotation may take only the devices due: it reads those, not the whole registry.
            Change::Certificate => {
                let due: Vec<ThingName> = self.rotation.due().await?.into_iter().collect();
                self.fleet.devices_among(&due).await?
            }
        };
        // Devices the earlier stages' jobs reached (a stage's own job, if a lost write left it
        // behind, is adopted below, not counted as earlier).
        let mut earlier: Vec<(usize, BTreeSet<ThingName>)> = Vec::new();
        for job in self.stage_jobs(c).await? {
            let index = (0..c.spec.stages.len()).find(|&i| c.spec.stage_job(i) == job).unwrap_or(usize::MAX);
            let things = self.jobs.job_executions(&job).await?.into_iter().map(|(t, _)| t).collect();
            earlier.push((index, things));
        }
        for stage in first..c.spec.stages.len() {
            let already: BTreeSet<ThingName> =
                earlier.iter().filter(|(i, _)| *i < stage).flat_map(|(_, t)| t.iter().cloned()).collect();
            let plan = plan_stage(&c.spec, &fleet, &already, stage, c.population, now_ms);
            if stage == 0 {
                if plan.eligible == 0 {
                    let due =
                        if c.spec.change == Change::Certificate { " due a new certificate" } else { "" };
                    let why = format!(
                        "no {} device on {}{due} is eligible ({} skipped)",
                        c.spec.class,
                        c.spec.from_fw,
                        plan.skipped.len()
                    );
                    c.note(now_ms, format!("paused: {why}"));
                    c.paused = Some(why.clone());
                    return Ok(why);
                }
                c.population = plan.eligible;
            }
            if plan.targets.is_empty() {
                c.note(now_ms, format!("stage {}: no device left to take", stage + 1));
                continue;
            }
            let job = c.spec.stage_job(stage);
            let (document, change) = match c.manifests() {
                Some((firmware, _)) if c.spec.change == Change::Firmware => {
                    (job_document(&c.spec.id, firmware), format!("{} -> {}", c.spec.from_fw, c.spec.to_fw))
                }
                _ => (rotation_document(&c.spec.id), format!("rotate certificates on {}", c.spec.from_fw)),
            };
            let new = NewJob {
                job_id: job.clone(),
                targets: plan.targets.clone(),
                document,
                description: format!("{} stage {}: {change}{}", c.spec.id, stage + 1, c.job_stamp()),
                max_per_minute: Some(c.spec.max_per_minute),
                in_progress_timeout_minutes: Some(c.spec.install_timeout_minutes),
            };
            let targets = self.create_or_adopt(c, &new).await?;
            if !c.jobs.contains(&job) {
                c.jobs.push(job.clone());
            }
            c.targeted = already.len() as u64 + targets;
            let taken = plan.skipped.iter().filter(|(_, why)| *why == Skip::AlreadyTargeted).count();
            let earlier =
                if taken > 0 { format!(", {taken} taken by earlier stages") } else { String::new() };
            let text = format!(
                "stage {} of {} ({}%): {targets} devices{earlier}, {} skipped by preconditions",
                stage + 1,
                c.spec.stages.len(),
                c.spec.stages[stage],
                plan.skipped.len() - taken
            );
            c.note(now_ms, &text);
            c.state = State::Stage(StageState {
                stage,
                job,
                targets,
                started_ms: now_ms,
                settled_ms: None,
                last: None,
                counted: JobCounts::default(),
            });
            return Ok(text);
        }
        c.note(
            now_ms,
            match c.spec.change {
                Change::Firmware => format!("completed: {} devices on {}", c.targeted, c.spec.to_fw),
                Change::Certificate => {
                    format!("completed: {} devices rotated their certificates", c.targeted)
                }
            },
        );
        c.state = State::Completed;
        Ok("completed".into())
    }

    /// Create `job`; one of `c`'s that exists already (a tick that crashed after creating it)
    /// is adopted, one made by someone else is an error. Returns how many things it targets.
    async fn create_or_adopt(&self, c: &Campaign, job: &NewJob) -> Result<u64, OtaError> {
        match self.jobs.create_job(job).await {
            Ok(()) => Ok(job.targets.len() as u64),
            Err(e) if e.kind == ErrorKind::Conflict => {
                let found = self.progress(&job.job_id).await?;
                if !c.owns_job(&found.description) {
                    return Err(OtaError::JobTaken {
                        job: job.job_id.clone(),
                        description: found.description,
                    });
                }
                Ok(found.counts.total())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Cancel what is queued, and send the old firmware to every device a stage reached.
    pub async fn roll_back(&self, c: &mut Campaign, reason: String, now_ms: i64) -> Result<String, OtaError> {
        self.check_manifests(c)?;
        let stage_jobs = self.cancel_stages(c).await?;
        let Some((_, rollback)) = c.manifests().filter(|_| c.spec.change == Change::Firmware) else {
            // A rotation has nothing to undo: it halts.
            c.note(
                now_ms,
                format!(
                    "halted: {reason} (nothing to roll back: devices that rotated keep their new \
                 certificate, the others their current one)"
                ),
            );
            for job in &stage_jobs {
                self.retire(c, job, now_ms).await;
            }
            c.state = State::Halted { reason: reason.clone() };
            return Ok(format!("halted: {reason}"));
        };
        let rollback = rollback.clone();
        // Every device that may run the new firmware: installed, installing, and those whose
        // install failed or timed out after writing it (a device reboots before it reports).
        // One that never changed answers the old manifest `already_installed`.
        let reached: Vec<ThingName> = self
            .reached(&stage_jobs)
            .await?
            .into_iter()
            .filter(|(_, s)| {
                use ExecutionStatus::*;
                matches!(s, Succeeded | InProgress | Failed | TimedOut)
            })
            .map(|(t, _)| t)
            .collect();
        c.note(now_ms, format!("rolling back: {reason}"));
        if reached.is_empty() {
            c.note(now_ms, "rolled back: no device had installed the firmware");
            for job in &stage_jobs {
                self.retire(c, job, now_ms).await;
            }
            c.state = State::RolledBack { reason: reason.clone() };
            return Ok(format!("rolled back: {reason}"));
        }
        let job = c.spec.rollback_job();
        let new = NewJob {
            job_id: job.clone(),
            targets: reached,
            document: job_document(&c.spec.id, &rollback),
            description: format!(
                "{} rollback: {} -> {}{}",
                c.spec.id,
                c.spec.to_fw,
                c.spec.from_fw,
                c.job_stamp()
            ),
            max_per_minute: Some(c.spec.max_per_minute),
            in_progress_timeout_minutes: Some(c.spec.install_timeout_minutes),
        };
        let targets = self.create_or_adopt(c, &new).await?;
        c.state = State::RollingBack {
            reason: reason.clone(),
            job,
            started_ms: now_ms,
            counted: JobCounts::default(),
        };
        Ok(format!("rolling back {targets} devices: {reason}"))
    }

    /// An operator stops the campaign where it is: what is queued is canceled, devices keep
    /// what they have.
    pub async fn abort(&self, c: &mut Campaign, reason: String, now_ms: i64) -> Result<(), OtaError> {
        let mut jobs = self.cancel_stages(c).await?;
        if let State::RollingBack { job, .. } = &c.state {
            self.jobs.cancel_job(job, false).await?;
            jobs.push(job.clone());
        }
        for job in &jobs {
            self.retire(c, job, now_ms).await;
        }
        c.note(now_ms, format!("aborted: {reason}"));
        c.state = State::Aborted { reason };
        c.paused = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::adapters::embedded::{DeviceStatus, ExecutionUpdate, SqliteStore, StartNext};
    use crate::health::ledger::HealthReport;
    use crate::health::tally::{counter, Cohort, Tally};
    use crate::model::JobStatus;
    use crate::ota::campaign::tests::campaign;
    use crate::ota::campaign::Preconditions;
    use crate::ota::manifest::ManifestSigner;
    use crate::ports::{CampaignStore, HealthLedger};
    use crate::time;

    const MIN: i64 = 60_000;

    struct World {
        _dir: tempfile::TempDir,
        db: SqliteStore,
        rotation: RotationPorts<SqliteStore, SqliteStore, SqliteStore>,
        catalog: Catalog,
        verifier: ManifestVerifier,
    }

    impl World {
        /// `n` sensors on 1.4.2, registered.
        async fn new(n: usize) -> anyhow::Result<Self> {
            let dir = tempfile::tempdir()?;
            let db = SqliteStore::open(&dir.path().join("fleet.sqlite"))?;
            db.register(&crate::ota::test_sensors(n, "1.4.2")).await?;
            let key = ManifestSigner::from_bytes("test", &[7; 32])?.verifying_key();
            let verifier = ManifestVerifier::new(vec![("test".into(), key)]);
            let rotation = RotationPorts::of(&db);
            Ok(Self { _dir: dir, db, rotation, catalog: Catalog::builtin(), verifier })
        }

        #[allow(clippy::type_complexity)]
        fn engine(
            &self,
        ) -> Engine<
            '_,
            SqliteStore,
            SqliteStore,
            SqliteStore,
            RotationPorts<SqliteStore, SqliteStore, SqliteStore>,
        > {
            Engine::over(&self.db, &self.rotation, &self.catalog, &self.verifier)
        }

        /// Tick, store, and read back (as the orchestrator does).
        async fn tick(&self, id: &str, now_ms: i64) -> anyhow::Result<(Campaign, Tick)> {
            let mut c = self.db.campaign(id).await?.expect("stored");
            let tick = self.engine().tick(&mut c, now_ms).await?;
            if tick.changed {
                self.db.put_campaign(&c).await?;
            }
            Ok((self.db.campaign(id).await?.expect("stored"), tick))
        }

        /// Every device with a pending execution of `job` takes it and answers `status`.
        async fn devices_answer(&self, job: &JobId, status: DeviceStatus) -> anyhow::Result<usize> {
            self.db.sweep_jobs(time::now_ms()).await?;
            let mut answered = 0;
            for (thing, s) in self.db.job_executions(job).await? {
                if s != ExecutionStatus::Queued {
                    continue;
                }
                let started =
                    self.db.start_next_job_execution(&thing, &StartNext::default(), time::now_ms()).await?;
                assert_eq!(started.as_ref().map(|e| &e.job_id), Some(job), "{thing} starts {job}");
                self.answer(&thing, job, status).await?;
                answered += 1;
            }
            Ok(answered)
        }

        /// `thing` reports its execution of `job` as `status`.
        async fn answer(&self, thing: &ThingName, job: &JobId, status: DeviceStatus) -> anyhow::Result<()> {
            let update = ExecutionUpdate {
                status,
                status_details: None,
                expected_version: None,
                execution_number: None,
                step_timeout_minutes: None,
            };
            let answer = self.db.update_job_execution(thing, job, &update, time::now_ms()).await?;
            answer.map(|_| ()).map_err(|refused| anyhow::anyhow!("{thing} {job}: {refused:?}"))
        }

        /// Two hours of ingest counts ending at `last_minute`: the canary (sensors on 1.5.0)
        /// quarantines `canary_bad` of 1,000 messages a minute, the control none.
        async fn ledger(&self, last_minute: i64, canary_bad: i64) -> anyhow::Result<()> {
            let tally = |rx: i64, bad: i64| {
                let mut t = Tally::default();
                t.add(counter::RECEIVED, rx);
                t.add(counter::QUARANTINED, bad);
                t
            };
            let canary: Cohort = "sensor/eu-west/1.5.0".parse()?;
            let control: Cohort = "sensor/eu-west/1.4.2".parse()?;
            let first = last_minute - 119;
            for m in first..=last_minute {
                let n = m - first + 1;
                let rows = [
                    (canary.clone(), tally(1_000 * n, canary_bad * n)),
                    (control.clone(), tally(1_000 * n, 0)),
                ];
                self.db.close_minute(m, &rows).await?;
            }
            let report = HealthReport {
                minute: last_minute,
                computed_at_ms: (last_minute + 1) * MIN,
                cohorts: vec![],
            };
            self.db.put_health(&report).await?;
            Ok(())
        }
    }

    fn spec(id: &str) -> CampaignSpec {
        CampaignSpec {
            stages: vec![1, 10, 100],
            soak_minutes: 30,
            preconditions: Preconditions { min_battery_pct: None, seen_within_minutes: None },
            gate: crate::ota::gate::GatePolicy { slos: vec!["ingest".into()], ..Default::default() },
            ..CampaignSpec::new(id, "sensor", "1.4.2", "1.5.0")
        }
    }

    fn stage_of(c: &Campaign) -> &StageState {
        match &c.state {
            State::Stage(s) => s,
            other => panic!("not in a stage: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_campaign_widens_on_a_healthy_gate_and_rolls_back_every_reached_device_on_a_burning_one(
    ) -> anyhow::Result<()> {
        // GIVEN 200 sensors on 1.4.2 and a campaign of 1 %, 10 %, 100 %
        let w = World::new(200).await?;
        w.db.put_campaign(&campaign(spec("fw150"))?).await?;
        let t0 = time::now_ms();

        // WHEN it ticks: stage 1 sends the signed manifest to 2 devices
        let (c, _) = w.tick("fw150", t0).await?;
        let s1 = stage_of(&c).clone();
        assert_eq!((s1.stage, s1.targets, c.population), (0, 2, 200));
        let execs = w.db.job_executions(&s1.job).await?;
        assert_eq!(execs.len(), 2);
        // THEN it waits while the installs are pending
        let (_, tick) = w.tick("fw150", t0 + MIN).await?;
        assert!(tick.summary.contains("2 of 2 installs pending"), "{}", tick.summary);
        // WHEN both devices install it, the stage settles, then soaks
        assert_eq!(w.devices_answer(&s1.job, DeviceStatus::Succeeded).await?, 2);
        let (c, tick) = w.tick("fw150", t0 + 2 * MIN).await?;
        assert_eq!(stage_of(&c).settled_ms, Some(t0 + 2 * MIN));
        // AND the two installs are reported to fleet health once, as 1.5.0's
        let installed = Finished { class: "sensor".into(), fw: "1.5.0".into(), succeeded: 2, failed: 0 };
        assert_eq!(tick.finished, [installed]);
        let (_, tick) = w.tick("fw150", t0 + 10 * MIN).await?;
        assert!(tick.summary.contains("soaking"), "{}", tick.summary);
        assert_eq!(tick.finished, []);
        // AND after the soak, while fleet-health's newest closed minute is 40 minutes old (it
        // stopped), the gate waits: that window ends before the stage began
        w.ledger(crate::health::tally::minute_of(t0), 0).await?;
        let (_, tick) = w.tick("fw150", t0 + 40 * MIN).await?;
        assert!(tick.summary.contains("newest closed minute is 40 minutes old"), "{}", tick.summary);
        // AND once it closes minutes again, a healthy canary opens stage 2: 18 more devices,
        // none twice
        w.ledger(crate::health::tally::minute_of(t0) + 40, 0).await?;
        let (c, _) = w.tick("fw150", t0 + 41 * MIN).await?;
        let s2 = stage_of(&c).clone();
        assert_eq!((s2.stage, s2.targets, c.targeted), (1, 18, 20));
        let first: BTreeSet<_> = execs.iter().map(|(t, _)| t.clone()).collect();
        let second = w.db.job_executions(&s2.job).await?;
        assert!(second.iter().all(|(t, _)| !first.contains(t)));

        // WHEN stage 2 installs and then burns 1 % of its messages (10x the ingest budget)
        assert_eq!(w.devices_answer(&s2.job, DeviceStatus::Succeeded).await?, 18);
        w.tick("fw150", t0 + 42 * MIN).await?;
        w.ledger(crate::health::tally::minute_of(t0) + 80, 10).await?;
        let (c, tick) = w.tick("fw150", t0 + 80 * MIN).await?;
        // THEN the gate rolls it back: the old firmware goes to all 20 devices the stages reached
        let State::RollingBack { job, reason, .. } = &c.state else { panic!("{:?}", c.state) };
        assert!(reason.contains("gate: ingest: the canary burns 10.00x"), "{reason}");
        assert!(tick.summary.contains("rolling back 20 devices"), "{}", tick.summary);
        let document =
            w.db.start_next_job_execution(&second[0].0, &StartNext::default(), time::now_ms()).await?;
        let document = document.expect("the rollback reaches a stage 2 device").document;
        assert_eq!(document["manifest"]["fw"], "1.4.2");
        assert_eq!(document["operation"], OTA_OPERATION);
        // AND once they report it installed, the campaign is rolled back, for good
        let rb = job.clone();
        w.answer(&second[0].0, &rb, DeviceStatus::Succeeded).await?;
        assert_eq!(w.devices_answer(&rb, DeviceStatus::Succeeded).await?, 19);
        let (c, tick) = w.tick("fw150", t0 + 90 * MIN).await?;
        assert!(matches!(c.state, State::RolledBack { .. }), "{:?}", c.state);
        assert!(tick.summary.contains("20 of 20 devices, 0 failed"), "{}", tick.summary);
        let (_, tick) = w.tick("fw150", t0 + 100 * MIN).await?;
        assert!(!tick.changed);
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_install_rolls_back_at_once_and_cancels_what_is_queued() -> anyhow::Result<()> {
        // GIVEN a campaign whose first stage reaches 3 of 300 devices
        let w = World::new(300).await?;
        w.db.put_campaign(&campaign(spec("fw150"))?).await?;
        let t0 = time::now_ms();
        let (c, _) = w.tick("fw150", t0).await?;
        let s1 = stage_of(&c).clone();
        assert_eq!(s1.targets, 3);
        // WHEN one device reports the install FAILED (the others have not started)
        w.db.sweep_jobs(time::now_ms()).await?;
        let (thing, _) = w.db.job_executions(&s1.job).await?.remove(0);
        w.db.start_next_job_execution(&thing, &StartNext::default(), time::now_ms()).await?;
        w.answer(&thing, &s1.job, DeviceStatus::Failed).await?;
        let (c, tick) = w.tick("fw150", t0 + MIN).await?;
        // THEN it rolls back without waiting for health data: the queued installs are canceled,
        // and the old firmware goes to the one device that tried (it may have written the new
        // one before failing), none other
        assert!(
            matches!(&c.state, State::RollingBack { reason, .. } if reason.contains("1 of 1 finished installs failed")),
            "{:?}",
            c.state
        );
        assert!(tick.summary.starts_with("rolling back 1 devices"), "{}", tick.summary);
        assert_eq!(w.db.job_executions(&c.spec.rollback_job()).await?, [(thing, ExecutionStatus::Queued)]);
        assert_eq!(
            tick.finished,
            [Finished { class: "sensor".into(), fw: "1.5.0".into(), succeeded: 0, failed: 1 }]
        );
        let progress = w.db.job_progress(&s1.job).await?.expect("job");
        assert_eq!(
            (progress.counts.failed, progress.counts.canceled, progress.status),
            (1, 2, JobStatus::Canceled)
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_tick_refuses_a_manifest_no_trusted_key_signed() -> anyhow::Result<()> {
        let mut w = World::new(10).await?;
        w.db.put_campaign(&campaign(spec("fw150"))?).await?;
        let other = ManifestSigner::from_bytes("test", &[8; 32])?.verifying_key();
        w.verifier = ManifestVerifier::new(vec![("test".into(), other)]);
        let err = w.tick("fw150", time::now_ms()).await.expect_err("refused");
        assert!(err.to_string().contains("bad_signature"), "{err}");
        assert_eq!(w.db.job_progress(&spec("fw150").stage_job(0)).await?, None, "no job was sent");
        Ok(())
    }

    #[tokio::test]
    async fn a_job_created_by_a_tick_whose_write_was_lost_is_adopted() -> anyhow::Result<()> {
        // GIVEN a tick that created stage 1's job but whose campaign write never happened
        let w = World::new(100).await?;
        let stored = campaign(spec("fw150"))?;
        w.db.put_campaign(&stored).await?;
        let mut lost = w.db.campaign("fw150").await?.expect("stored");
        w.engine().tick(&mut lost, time::now_ms()).await?;
        // WHEN the next tick starts again from the stored (pending) campaign
        let (c, _) = w.tick("fw150", time::now_ms()).await?;
        // THEN it adopts the job instead of failing, and the campaign is in stage 1
        assert_eq!(stage_of(&c).targets, 1);
        assert_eq!(w.db.job_executions(&stage_of(&c).job).await?.len(), 1);
        // AND a stage job a lost write left behind (stage 2, the campaign still says stage 1)
        // is found by an operator's rollback: cancelled, and its devices rolled back too
        let s1 = stage_of(&c).clone();
        let stray = ThingName::parse("sensor-099")?;
        let lost_stage = NewJob {
            job_id: c.spec.stage_job(1),
            targets: vec![stray.clone(), ThingName::parse("sensor-098")?],
            document: job_document(&c.spec.id, c.firmware.as_ref().expect("a firmware campaign")),
            description: format!("stage 2 of a lost write{}", c.job_stamp()),
            max_per_minute: None,
            in_progress_timeout_minutes: None,
        };
        w.db.create_job(&lost_stage).await?;
        w.devices_answer(&s1.job, DeviceStatus::Succeeded).await?;
        w.db.start_next_job_execution(&stray, &StartNext::default(), time::now_ms()).await?;
        w.answer(&stray, &lost_stage.job_id, DeviceStatus::Succeeded).await?;
        let mut operator = w.db.campaign("fw150").await?.expect("stored");
        w.engine().roll_back(&mut operator, "operator".into(), time::now_ms()).await?;
        let rolled: Vec<_> =
            w.db.job_executions(&c.spec.rollback_job()).await?.into_iter().map(|(t, _)| t).collect();
        assert!(rolled.contains(&stray) && rolled.len() == 2, "{rolled:?}");
        let stray_job = w.db.job_progress(&lost_stage.job_id).await?.expect("the lost stage's job");
        assert_eq!((stray_job.counts.canceled, stray_job.counts.succeeded), (1, 1));
        // AND a write from the stale copy is refused
        lost.version = 1;
        assert!(w.db.put_campaign(&lost).await.is_err());
        Ok(())
    }

    #[tokio::test]
    async fn a_job_of_its_id_made_by_someone_else_is_never_adopted_cancelled_or_rolled_back(
    ) -> anyhow::Result<()> {
        // GIVEN another stack in the account that already sent fw150's stage 1 to two devices
        let w = World::new(100).await?;
        let theirs = campaign(spec("fw150"))?;
        let their_job = NewJob {
            job_id: theirs.spec.stage_job(0),
            targets: vec![ThingName::parse("sensor-001")?, ThingName::parse("sensor-002")?],
            document: job_document("fw150", theirs.firmware.as_ref().expect("a firmware campaign")),
            description: format!("fw150 stage 1: 1.4.2 -> 1.5.0{}", theirs.job_stamp()),
            max_per_minute: None,
            in_progress_timeout_minutes: None,
        };
        w.db.create_job(&their_job).await?;
        let ours = campaign(spec("fw150"))?;
        assert_ne!(ours.owner, theirs.owner);
        // WHEN an operator creates a campaign of the same id here, THEN it is refused, naming the job
        let refused = w.engine().check_ids_free(&ours).await.expect_err("the id is taken");
        assert!(
            matches!(&refused, OtaError::JobTaken { job, .. } if job.as_str() == "fw150-s1"),
            "{refused}"
        );
        // WHEN one is stored anyway (as before ids were checked) and ticks, THEN it fails for
        // good (the orchestrator pauses it) without adopting the other stack's job
        w.db.put_campaign(&ours).await?;
        let mut c = w.db.campaign("fw150").await?.expect("stored");
        let failed = w.engine().tick(&mut c, time::now_ms()).await.expect_err("not ours");
        assert!(matches!(failed, OtaError::JobTaken { .. }) && !failed.is_transient(), "{failed}");
        // AND an operator's rollback neither cancels that job nor sends its devices anything
        let mut c = w.db.campaign("fw150").await?.expect("stored");
        let summary = w.engine().roll_back(&mut c, "operator".into(), time::now_ms()).await?;
        assert!(matches!(c.state, State::RolledBack { .. }), "{summary}");
        let untouched = w.db.job_progress(&their_job.job_id).await?.expect("their job");
        assert_eq!((untouched.status, untouched.counts.queued), (JobStatus::InProgress, 2));
        assert!(w.db.job_progress(&c.spec.rollback_job()).await?.is_none());
        // AND the jobs a campaign makes carry its stamp
        let mine = campaign(spec("fw151"))?;
        w.db.put_campaign(&mine).await?;
        let (c, _) = w.tick("fw151", time::now_ms()).await?;
        let made = w.db.job_progress(&stage_of(&c).job).await?.expect("stage 1");
        assert!(made.description.ends_with(&mine.job_stamp()) && mine.owns_job(&made.description));
        Ok(())
    }

    /// sensor-000..`due` marked rotation due for certificate `old-<n>`, and every sensor's
    /// latest session on its old certificate.
    async fn due_for_rotation(w: &World, n: usize, due: usize) -> anyhow::Result<Vec<ThingName>> {
        use crate::certs::expiry::ExpiryClass;
        use crate::ports::{Allowlist, CertMark, DeviceCertStatus};
        let things: Vec<ThingName> =
            crate::ota::test_sensors(n, "1.4.2").into_iter().map(|(t, _)| t).collect();
        let marks: Vec<(ThingName, CertMark)> = things
            .iter()
            .take(due)
            .map(|t| {
                let mark = CertMark {
                    certificate: old_cert(t),
                    class: ExpiryClass::Warning,
                    not_after_ms: time::now_ms() + 20 * 24 * 60 * MIN,
                    rotation_due: true,
                    checked_ms: time::now_ms(),
                };
                (t.clone(), mark)
            })
            .collect();
        w.db.mark_cert_status(&marks).await?;
        for (i, t) in things.iter().enumerate() {
            let entry = crate::model::AllowlistEntry {
                serial: t.clone(),
                class: "sensor".into(),
                region: "eu-west".into(),
                added_ms: 1,
                enrolment: Enrolment::Allowed,
            };
            w.db.allow(&[entry]).await?;
            w.db.enrol(t, &old_cert(t), 2).await?;
            connect(w, t, old_cert(t).as_str(), i as i64 + 1).await?;
        }
        Ok(things[..due].to_vec())
    }

    fn old_cert(thing: &ThingName) -> crate::model::CertificateId {
        crate::model::CertificateId::of_der(format!("old certificate of {thing}").as_bytes())
    }

    fn new_cert(thing: &ThingName) -> crate::model::CertificateId {
        crate::model::CertificateId::of_der(format!("new certificate of {thing}").as_bytes())
    }

    /// `thing` rotates (the hook moves its serial to its new certificate), then opens session
    /// `version` with `principal`.
    async fn rotate_then_connect(
        w: &World,
        thing: &ThingName,
        principal: &str,
        version: i64,
    ) -> anyhow::Result<()> {
        w.db.rotate(thing, &old_cert(thing), &new_cert(thing), 3).await?;
        connect(w, thing, principal, version).await
    }

    /// `thing` opens session `version` with `principal`, as presence records it.
    async fn connect(w: &World, thing: &ThingName, principal: &str, version: i64) -> anyhow::Result<()> {
        use crate::health::presence::{fold, LifecycleEvent};
        use crate::ports::PresenceStore;
        let event = serde_json::json!({"clientId": thing.as_str(), "timestamp": time::now_ms() + version,
            "eventType": "connected", "versionNumber": version, "principalIdentifier": principal});
        let (_, e) = LifecycleEvent::parse(event.to_string().as_bytes())?;
        let stored = w.db.presence(thing).await?;
        let next = fold(stored.as_ref(), [&e]).expect("a later session");
        let expected = stored.as_ref().map(|p| p.place);
        assert!(w.db.put_presence(thing, &next, expected.as_ref(), &HealthDelta::default()).await?);
        Ok(())
    }

    fn rotation_spec(id: &str) -> CampaignSpec {
        CampaignSpec {
            stages: vec![50, 100],
            soak_minutes: 0,
            preconditions: Preconditions { min_battery_pct: None, seen_within_minutes: None },
            ..CampaignSpec::rotation(id, "sensor", "1.4.2")
        }
    }

    /// The registry on SQLite, except that listing it fails: what reads only by key passes.
    struct ByKeyOnly<'a>(&'a SqliteStore);

    impl DeviceAdmin for ByKeyOnly<'_> {
        async fn register(
            &self,
            devices: &[(ThingName, crate::model::DeviceRegistration)],
        ) -> Result<(), StoreError> {
            self.0.register(devices).await
        }

        async fn device(&self, thing: &ThingName) -> Result<Option<crate::model::Device>, StoreError> {
            self.0.device(thing).await
        }

        async fn devices(&self) -> Result<Vec<crate::model::Device>, StoreError> {
            Err(StoreError::permanent("devices", "the whole registry was listed"))
        }

        async fn devices_among(&self, things: &[ThingName]) -> Result<Vec<crate::model::Device>, StoreError> {
            self.0.devices_among(things).await
        }
    }

    #[tokio::test]
    async fn a_rotation_reads_the_devices_due_by_key_never_the_whole_registry() -> anyhow::Result<()> {
        // GIVEN 40 sensors, 4 of them due a new certificate, and a registry that cannot be listed
        let w = World::new(40).await?;
        let due = due_for_rotation(&w, 40, 4).await?;
        let fleet = ByKeyOnly(&w.db);
        let engine = Engine {
            fleet: &fleet,
            jobs: &w.db,
            health: &w.db,
            rotation: &w.rotation,
            catalog: &w.catalog,
            verifier: &w.verifier,
        };
        // WHEN a rotation of one stage (100 %) ticks
        let one_stage = CampaignSpec { stages: vec![100], ..rotation_spec("rot-keys") };
        let mut c = Campaign::rotation(one_stage, time::now_ms())?;
        let tick = engine.tick(&mut c, time::now_ms()).await?;
        // THEN its stage reaches the 4 due, and only them
        let s1 = stage_of(&c);
        assert_eq!((s1.targets, c.population), (4, 4), "{}", tick.summary);
        let mut reached: Vec<ThingName> =
            w.db.job_executions(&s1.job).await?.into_iter().map(|(t, _)| t).collect();
        reached.sort();
        assert_eq!(reached, due);
        // AND a firmware campaign, which picks from the whole registry, does list it
        let mut firmware = campaign(CampaignSpec { stages: vec![100], ..spec("fw-keys") })?;
        let listed = engine.tick(&mut firmware, time::now_ms()).await;
        assert!(listed.is_err_and(|e| e.to_string().contains("the whole registry was listed")));
        Ok(())
    }

    #[tokio::test]
    async fn a_rotation_takes_only_devices_due_and_widens_once_they_connect_with_a_new_certificate(
    ) -> anyhow::Result<()> {
        // GIVEN 20 sensors, 10 of them due a new certificate, and a rotation of 50 %, 100 %
        let w = World::new(20).await?;
        let due = due_for_rotation(&w, 20, 10).await?;
        w.db.put_campaign(&Campaign::rotation(rotation_spec("rot1"), time::now_ms())?).await?;
        let t0 = time::now_ms();
        // WHEN it ticks: stage 1 sends the rotation job to 5 of the 10 due, no other device
        let (c, _) = w.tick("rot1", t0).await?;
        let s1 = stage_of(&c).clone();
        assert_eq!((s1.targets, c.population), (5, 10));
        let reached: Vec<ThingName> =
            w.db.job_executions(&s1.job).await?.into_iter().map(|(t, _)| t).collect();
        assert!(reached.iter().all(|t| due.contains(t)), "{reached:?}");
        let first = &reached[0];
        let started = w.db.start_next_job_execution(first, &StartNext::default(), time::now_ms()).await?;
        assert_eq!(started.map(|e| e.document), Some(rotation_document("rot1")));
        // AND the devices report success while their latest sessions still use the old certificates
        w.answer(first, &s1.job, DeviceStatus::Succeeded).await?;
        assert_eq!(w.devices_answer(&s1.job, DeviceStatus::Succeeded).await?, 4);
        let (_, tick) = w.tick("rot1", t0 + MIN).await?;
        assert!(tick.summary.contains("5 of 5 rotated"), "{}", tick.summary);
        // THEN the gate does not take their word for it
        let (_, tick) = w.tick("rot1", t0 + 2 * MIN).await?;
        assert!(
            tick.summary.contains("5 of 5 devices that report a new certificate have not"),
            "{}",
            tick.summary
        );
        // WHEN three rotate and connect with their new certificates, a fourth rotates but connects
        // with another certificate attached to it, and the fifth's mark is cleared by the daily
        // check (its old certificate retired)
        for t in reached.iter().take(3) {
            rotate_then_connect(&w, t, new_cert(t).as_str(), 100).await?;
        }
        rotate_then_connect(&w, &reached[3], "a-spare-certificate", 100).await?;
        let (_, tick) = w.tick("rot1", t0 + 3 * MIN).await?;
        // THEN the gate still waits for the one not seen on its new certificate
        assert!(tick.summary.contains("2 of 5 devices"), "{}", tick.summary);
        connect(&w, &reached[3], new_cert(&reached[3]).as_str(), 101).await?;
        crate::ports::DeviceCertStatus::clear_cert_status(&w.db, std::slice::from_ref(&reached[4])).await?;
        // THEN stage 2 takes the other 5 due devices, and only them
        let (c, tick) = w.tick("rot1", t0 + 4 * MIN).await?;
        let s2 = stage_of(&c).clone();
        assert_eq!((s2.stage, s2.targets), (1, 5), "{}", tick.summary);
        let second: Vec<ThingName> =
            w.db.job_executions(&s2.job).await?.into_iter().map(|(t, _)| t).collect();
        assert!(second.iter().all(|t| due.contains(t) && !reached.contains(t)), "{second:?}");
        // AND no rotation counted as an install for the ota SLO
        assert!(tick.finished.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn a_failing_rotation_halts_with_nothing_to_roll_back() -> anyhow::Result<()> {
        // GIVEN a rotation whose first stage's devices fail it
        let w = World::new(20).await?;
        due_for_rotation(&w, 20, 20).await?;
        w.db.put_campaign(&Campaign::rotation(rotation_spec("rot2"), time::now_ms())?).await?;
        let t0 = time::now_ms();
        let (c, _) = w.tick("rot2", t0).await?;
        let s1 = stage_of(&c).clone();
        assert_eq!(w.devices_answer(&s1.job, DeviceStatus::Failed).await?, 10);
        // WHEN it ticks
        let (c, tick) = w.tick("rot2", t0 + MIN).await?;
        // THEN it halts, with no rollback job (devices keep what they have)
        assert!(matches!(c.state, State::Halted { .. }), "{:?}", c.state);
        assert!(tick.summary.starts_with("halted"), "{}", tick.summary);
        assert!(w.db.job_progress(&c.spec.rollback_job()).await?.is_none());
        assert!(c.log.iter().any(|l| l.text.contains("nothing to roll back")), "{:?}", c.log);
        Ok(())
    }

    #[tokio::test]
    async fn a_rotation_with_no_device_due_pauses_for_an_operator() -> anyhow::Result<()> {
        // GIVEN five sensors, none due a new certificate, and a rotation
        let w = World::new(5).await?;
        due_for_rotation(&w, 5, 0).await?;
        w.db.put_campaign(&Campaign::rotation(rotation_spec("rot3"), time::now_ms())?).await?;
        // WHEN it ticks
        let (c, tick) = w.tick("rot3", time::now_ms()).await?;
        // THEN it pauses, saying why, and sends nothing
        assert!(tick.summary.contains("due a new certificate is eligible"), "{}", tick.summary);
        assert!(c.paused.is_some() && c.jobs.is_empty());
        Ok(())
    }

    #[test]
    fn a_rotation_changes_no_firmware_and_a_firmware_spec_is_no_rotation() {
        // GIVEN a rotation spec naming another firmware to go to, and a firmware campaign's spec
        let mut moves_firmware = rotation_spec("rot4");
        moves_firmware.to_fw = "1.5.0".into();
        // WHEN either is made a rotation, THEN it is refused
        assert!(Campaign::rotation(moves_firmware, 0).is_err());
        assert!(Campaign::rotation(spec("fw9"), 0).is_err());
    }
}
