//! Ticks OTA campaigns ([`fleet_shared::ota::engine`]): every 5 minutes on a schedule (every
//! active campaign), and when IoT Jobs says something a campaign should act on without waiting
//! (a rule on `$aws/events/job/+/completed`: a stage's job settled; on
//! `$aws/events/jobExecution/+/failed|timed_out`: an install failed), then only the campaign
//! that job belongs to.
//!
//! Not every execution event: a tick asks IoT Jobs for the job's counts (DescribeJob, a
//! control-plane call with a low rate limit), and a stage of 10,000 devices would make 10,000
//! of them for nothing; the completed job's event says the same once.
//!
//! One campaign's failure does not hold up another's (a store that fails for one is retried by
//! the next tick, after the others ran). A campaign whose tick fails for good (a
//! manifest no trusted key signed any more, a job that vanished, a job of its ids that another
//! stack or an earlier campaign made, an unknown SLO) is paused with
//! the reason, for an operator; a transient failure (throttling) leaves it as it was and fails
//! the invocation after the others ran, so the next tick tries again. Campaigns are written
//! only over the version read: an operator's pause in between wins, and this tick's write is
//! dropped (logged) to be redone by the next.
//!
//! Installs that finished since a campaign's last tick are added to the health counters
//! (`ota_ok`, `ota_fail`) of `<class>/-/<fw>`, which fleet-health turns into the `ota` SLO.
//!
//! Metrics (dimensions `Stage`, `Function`): `CampaignsActive`, `CampaignsPaused`,
//! `CampaignsRolledBack` (firmware campaigns this run moved to rolling back) and
//! `CampaignsHalted` (certificate rotations this run halted), each counted by the run that
//! stored the change: each an alarm worth having. (A campaign an operator rolls back or halts
//! with `fleetctl` is not counted: the operator knows.)

use std::sync::Arc;

use fleet_shared::adapters::aws::{CampaignsTable, CertificatesTable, DevicesTable, HealthTable, IotJobs};
use fleet_shared::error::ErrorKind;
use fleet_shared::health::slo::Catalog;
use fleet_shared::lambda::{AwsBackend, Retryable, StartupError};
use fleet_shared::metrics::{MetricSet, MetricsOut, Unit};
use fleet_shared::ota::campaign::{campaign_of_job, Campaign, State};
use fleet_shared::ota::engine::{count_finished, Engine, OtaError, RotationPorts, RotationReads};
use fleet_shared::ota::manifest::{ManifestVerifier, FIRMWARE_KEYS_VAR};
use fleet_shared::ports::{CampaignStore, DeviceAdmin, HealthCounters, JobsControl, SloReader};
use fleet_shared::{time, StoreError};
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{info, warn};

pub const FUNCTION: &str = "ota-orchestrator";

/// Everything the handler needs, built once per cold start.
pub struct Deps<C, F, J, H, R> {
    pub campaigns: C,
    /// The device registry: who a stage can pick.
    pub fleet: F,
    pub jobs: J,
    /// The SLO ledger the gate reads, and the counters finished installs add to (`ota` SLO).
    pub health: H,
    /// What a certificate rotation reads: the daily check's marks and presence (Devices
    /// table), the allowlist (Certificates table).
    pub rotation: R,
    pub catalog: Catalog,
    /// The firmware keys manifests must be signed with (`FLEET_FIRMWARE_KEYS`).
    pub verifier: ManifestVerifier,
    pub clock: fn() -> i64,
    pub metrics: MetricsOut,
}

/// A certificate rotation's reads on AWS.
pub type AwsRotation = RotationPorts<DevicesTable, DevicesTable, CertificatesTable>;

impl Deps<CampaignsTable, DevicesTable, IotJobs, HealthTable, AwsRotation> {
    /// On AWS: the Campaigns table (`FLEET_CAMPAIGNS_TABLE`), the Devices table
    /// (`FLEET_DEVICES_TABLE`), IoT Jobs (`FLEET_THING_ARN_PREFIX`), the Health table
    /// (`FLEET_HEALTH_TABLE`), the Certificates table (`FLEET_CERTIFICATES_TABLE`: serials'
    /// allowlist entries, for rotations), the trusted firmware keys (`FLEET_FIRMWARE_KEYS`, the template's
    /// `FirmwareKeys`). Deployed without keys, it starts, and every campaign it ticks is paused
    /// for its manifest's unknown key: nothing is ever sent unsigned.
    pub fn on_aws(aws: &AwsBackend) -> Result<Self, StartupError> {
        let verifier = if aws.env.optional(FIRMWARE_KEYS_VAR).is_some_and(|k| !k.trim().is_empty()) {
            ManifestVerifier::from_env(&aws.env)?
        } else {
            warn!("{FIRMWARE_KEYS_VAR} is empty: no firmware key is trusted, campaigns will pause");
            ManifestVerifier::new(Vec::new())
        };
        // One Devices table client: the registry, the marks and presence are its items.
        let devices = DevicesTable::from_env(&aws.sdk, &aws.env)?;
        Ok(Self {
            campaigns: CampaignsTable::from_env(&aws.sdk, &aws.env)?,
            rotation: RotationPorts {
                marks: devices.clone(),
                presence: devices.clone(),
                allowlist: CertificatesTable::from_env(&aws.sdk, &aws.env)?,
            },
            fleet: devices,
            jobs: IotJobs::from_env(&aws.sdk, &aws.env)?,
            health: HealthTable::from_env(&aws.sdk, &aws.env)?,
            catalog: Catalog::builtin(),
            verifier,
            clock: time::now_ms,
            metrics: MetricsOut::stdout(&aws.env)?,
        })
    }
}

#[cfg(feature = "embedded")]
pub type EmbeddedDeps = Deps<
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
    fleet_shared::adapters::embedded::SqliteStore,
    RotationPorts<
        fleet_shared::adapters::embedded::SqliteStore,
        fleet_shared::adapters::embedded::SqliteStore,
        fleet_shared::adapters::embedded::SqliteStore,
    >,
>;

#[cfg(feature = "embedded")]
impl EmbeddedDeps {
    /// On the embedded backend: the one SQLite database (the local IoT Core's jobs); the stage
    /// is `local`.
    pub fn on_embedded(e: &fleet_shared::lambda::EmbeddedBackend) -> Result<Self, StartupError> {
        Ok(Self {
            campaigns: e.db.clone(),
            fleet: e.db.clone(),
            rotation: RotationPorts::of(&e.db),
            jobs: e.db.clone(),
            health: e.db.clone(),
            catalog: Catalog::builtin(),
            verifier: ManifestVerifier::from_env(&e.env)?,
            clock: time::now_ms,
            metrics: MetricsOut::Stdout { stage: "local".to_owned() },
        })
    }
}

/// What happened to one campaign in this run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticked {
    pub campaign: String,
    pub state: String,
    pub paused: bool,
    pub summary: String,
}

/// The invocation's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub ticked: Vec<Ticked>,
}

/// The part of a job or job-execution event that names the job.
#[derive(Deserialize)]
struct JobEvent {
    #[serde(rename = "jobId")]
    job_id: Option<String>,
}

pub async fn handle<C, F, J, H, R>(
    deps: &Deps<C, F, J, H, R>,
    event: LambdaEvent<Box<RawValue>>,
) -> Result<Answer, Retryable>
where
    C: CampaignStore,
    F: DeviceAdmin,
    J: JobsControl,
    H: SloReader + HealthCounters,
    R: RotationReads,
{
    // A job's event ticks its campaign; anything else (the schedule, an operator's invoke) all.
    let job = serde_json::from_str::<JobEvent>(event.payload.get()).ok().and_then(|e| e.job_id);
    let only = match &job {
        Some(job) => match campaign_of_job(job) {
            Some(id) => Some(id),
            None => {
                info!(job, "not a campaign's job");
                return Ok(Answer { ticked: vec![] });
            }
        },
        None => None,
    };
    run(deps, only, (deps.clock)())
        .await
        .map_err(|e| Retryable { what: "OTA campaigns not ticked", source: Arc::new(e) })
}

/// Tick the active campaigns (or only `only`), store what changed, emit the metrics.
pub async fn run<C, F, J, H, R>(
    deps: &Deps<C, F, J, H, R>,
    only: Option<&str>,
    now: i64,
) -> Result<Answer, StoreError>
where
    C: CampaignStore,
    F: DeviceAdmin,
    J: JobsControl,
    H: SloReader + HealthCounters,
    R: RotationReads,
{
    let campaigns: Vec<Campaign> = match only {
        Some(id) => deps.campaigns.campaign(id).await?.into_iter().collect(),
        None => deps.campaigns.campaigns().await?,
    };
    let engine = Engine {
        fleet: &deps.fleet,
        jobs: &deps.jobs,
        health: &deps.health,
        rotation: &deps.rotation,
        catalog: &deps.catalog,
        verifier: &deps.verifier,
    };
    let mut ticked = Vec::new();
    let mut retry = None;
    let (mut paused, mut rolled_back, mut halted) = (0, 0, 0);
    for mut c in campaigns.into_iter().filter(|c| !c.state.is_final()) {
        let was_rolling_back = matches!(c.state, State::RollingBack { .. });
        let read = c.clone();
        // Whether this run wrote what the tick changed: a change is counted by the run that
        // stored it, not by each run that tries.
        let mut written = false;
        let summary = if c.paused.is_some() {
            format!("paused: {}", c.paused.as_deref().unwrap_or_default())
        } else {
            match engine.tick(&mut c, now).await {
                Ok(tick) => match count_finished(&deps.health, &tick.finished, now).await {
                    Ok(()) if !tick.changed => tick.summary,
                    Ok(()) => match store(&deps.campaigns, &c).await {
                        Ok(stored) => {
                            written = stored;
                            tick.summary
                        }
                        Err(e) => {
                            warn!(campaign = %c.spec.id, error = %e, "not stored; the next tick redoes it");
                            let summary = format!("not stored: {e}");
                            retry.get_or_insert(e);
                            summary
                        }
                    },
                    // Not stored: the next tick sees the same installs finished and counts them.
                    Err(e) => {
                        warn!(campaign = %c.spec.id, error = %e, "installs not counted; the next tick retries");
                        let summary = format!("not ticked: {e}");
                        retry.get_or_insert(e);
                        summary
                    }
                },
                Err(e) if e.is_transient() => {
                    warn!(campaign = %c.spec.id, error = %e, "tick failed; the next one retries");
                    let summary = format!("not ticked: {e}");
                    retry.get_or_insert(match e {
                        OtaError::Store(s) => s,
                        other => StoreError::transient("ota tick", other.to_string()),
                    });
                    summary
                }
                Err(e) => {
                    // Nothing a retry mends: an operator must look. The campaign as it was read
                    // is paused, not what the failed tick left half changed.
                    let why = format!("tick failed: {e}");
                    warn!(campaign = %c.spec.id, error = %e, "campaign paused");
                    c = read;
                    c.note(now, format!("paused: {why}"));
                    c.paused = Some(why.clone());
                    if let Err(e) = store(&deps.campaigns, &c).await {
                        warn!(campaign = %c.spec.id, error = %e, "pause not stored");
                        retry.get_or_insert(e);
                    }
                    why
                }
            }
        };
        paused += u32::from(c.paused.is_some());
        rolled_back += u32::from(
            written
                && !was_rolling_back
                && matches!(c.state, State::RollingBack { .. } | State::RolledBack { .. }),
        );
        // Final states are not ticked: halted now, and written, is halted by this run.
        halted += u32::from(written && matches!(c.state, State::Halted { .. }));
        info!(campaign = %c.spec.id, state = c.state.name(), summary = %summary, "ticked");
        ticked.push(Ticked {
            campaign: c.spec.id.clone(),
            state: c.state.name().to_owned(),
            paused: c.paused.is_some(),
            summary,
        });
    }
    deps.metrics.emit(&[MetricSet {
        timestamp_ms: now,
        dimensions: vec![("Function", FUNCTION.to_owned())],
        values: vec![
            ("CampaignsActive", ticked.len() as f64, Unit::Count),
            ("CampaignsPaused", f64::from(paused), Unit::Count),
            ("CampaignsRolledBack", f64::from(rolled_back), Unit::Count),
            ("CampaignsHalted", f64::from(halted), Unit::Count),
        ],
    }]);
    match retry {
        Some(e) => Err(e),
        None => Ok(Answer { ticked }),
    }
}

/// Write a ticked campaign; another writer in between (an operator) wins: `false`.
async fn store<C: CampaignStore>(campaigns: &C, c: &Campaign) -> Result<bool, StoreError> {
    match campaigns.put_campaign(c).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind == ErrorKind::Conflict => {
            warn!(campaign = %c.spec.id, "changed by someone else during the tick; the next tick starts from that");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use fleet_shared::adapters::embedded::{DeviceStatus, ExecutionUpdate, SqliteStore, StartNext};
    use fleet_shared::health::tally::{counter, minute_of, Bucket, Cohort, UNKNOWN};
    use fleet_shared::model::JobId;
    use fleet_shared::ota::campaign::CampaignSpec;
    use fleet_shared::ota::manifest::{ManifestSigner, UnsignedManifest};
    use fleet_shared::ports::{DeviceAdmin, HealthLedger};
    use lambda_runtime::Context;

    use super::*;

    const SCHEDULED: &str = include_str!("../../../events/ota-orchestrator/scheduled.json");
    const JOB_COMPLETED: &str = include_str!("../../../events/ota-orchestrator/job-completed.json");
    const EXECUTION_FAILED: &str = include_str!("../../../events/ota-orchestrator/job-execution-failed.json");

    type TestDeps = Deps<
        SqliteStore,
        SqliteStore,
        SqliteStore,
        SqliteStore,
        RotationPorts<SqliteStore, SqliteStore, SqliteStore>,
    >;

    fn signer(seed: u8) -> ManifestSigner {
        ManifestSigner::from_bytes("fw", &[seed; 32]).expect("key")
    }

    /// 50 sensors on 1.4.2, and the handler's deps over their database, trusting key 7.
    async fn fleet(dir: &tempfile::TempDir) -> anyhow::Result<TestDeps> {
        let db = SqliteStore::open(&dir.path().join("fleet.sqlite"))?;
        db.register(&fleet_shared::ota::test_sensors(50, "1.4.2")).await?;
        Ok(Deps {
            campaigns: db.clone(),
            fleet: db.clone(),
            rotation: RotationPorts::of(&db),
            jobs: db.clone(),
            health: db,
            catalog: Catalog::builtin(),
            verifier: ManifestVerifier::new(vec![("fw".into(), signer(7).verifying_key())]),
            clock: time::now_ms,
            metrics: MetricsOut::Off,
        })
    }

    /// A stored campaign `id` (1.4.2 -> 1.5.0, stages 10 %, 100 %), its manifests signed by `seed`.
    async fn campaign(deps: &TestDeps, id: &str, seed: u8) -> anyhow::Result<()> {
        let sign = |fw: &str| {
            let unsigned = UnsignedManifest::for_image(
                fw,
                "sensor",
                format!("https://fw.example.com/{fw}.bin"),
                fw.as_bytes(),
            );
            signer(seed).sign(unsigned)
        };
        let mut spec = CampaignSpec::new(id, "sensor", "1.4.2", "1.5.0");
        spec.stages = vec![10, 100];
        spec.preconditions.min_battery_pct = None;
        spec.preconditions.seen_within_minutes = None;
        let c = Campaign::new(spec, sign("1.5.0")?, sign("1.4.2")?, time::now_ms())?;
        deps.campaigns.put_campaign(&c).await?;
        Ok(())
    }

    fn event(json: &str) -> anyhow::Result<LambdaEvent<Box<RawValue>>> {
        Ok(LambdaEvent::new(RawValue::from_string(json.to_owned())?, Context::default()))
    }

    /// Every device `job` reached starts it and answers `status(i)` (the i-th of them); how many.
    async fn devices_answer(
        deps: &TestDeps,
        job: &JobId,
        status: impl Fn(usize) -> DeviceStatus,
    ) -> anyhow::Result<usize> {
        deps.jobs.sweep_jobs(time::now_ms()).await?;
        let reached = deps.jobs.job_executions(job).await?;
        for (i, (thing, _)) in reached.iter().enumerate() {
            deps.jobs.start_next_job_execution(thing, &StartNext::default(), time::now_ms()).await?;
            let update = ExecutionUpdate {
                status: status(i),
                status_details: None,
                expected_version: None,
                execution_number: None,
                step_timeout_minutes: None,
            };
            deps.jobs
                .update_job_execution(thing, job, &update, time::now_ms())
                .await?
                .map_err(|r| anyhow::anyhow!("{r:?}"))?;
        }
        Ok(reached.len())
    }

    fn state(answer: &Answer, id: &str) -> Option<(String, bool)> {
        answer.ticked.iter().find(|t| t.campaign == id).map(|t| (t.state.clone(), t.paused))
    }

    #[tokio::test]
    async fn the_schedule_starts_every_pending_campaign_and_a_job_event_ticks_only_its_own(
    ) -> anyhow::Result<()> {
        // GIVEN two pending campaigns on 50 sensors
        let dir = tempfile::tempdir()?;
        let deps = fleet(&dir).await?;
        campaign(&deps, "fw150", 7).await?;
        campaign(&deps, "other", 7).await?;
        // WHEN a job event for fw150's stage 1 arrives first
        let answer = handle(&deps, event(JOB_COMPLETED)?).await?;
        // THEN only fw150 is ticked: it starts stage 1 (10 % of 50)
        assert_eq!(answer.ticked.len(), 1);
        assert_eq!(state(&answer, "fw150"), Some(("stage".into(), false)));
        let progress = deps.jobs.job_progress(&JobId::parse("fw150-s1")?).await?.expect("stage 1's job");
        assert_eq!(progress.counts.total(), 5);
        // WHEN the schedule ticks
        let answer = handle(&deps, event(SCHEDULED)?).await?;
        // THEN both are ticked, and the other starts too
        assert_eq!(answer.ticked.len(), 2);
        assert_eq!(state(&answer, "other"), Some(("stage".into(), false)));
        let stored = deps.campaigns.campaign("fw150").await?.expect("stored");
        assert!(
            stored.log.iter().any(|e| e.text.starts_with("stage 1 of 2 (10%): 5 devices")),
            "{:?}",
            stored.log
        );
        // AND a failed install's event ticks fw150 alone
        let answer = handle(&deps, event(EXECUTION_FAILED)?).await?;
        assert_eq!(answer.ticked.iter().map(|t| t.campaign.as_str()).collect::<Vec<_>>(), ["fw150"]);

        // WHEN fw150's five devices install it (four succeed, one fails) and the schedule ticks
        let job = JobId::parse("fw150-s1")?;
        let status = |i| if i == 0 { DeviceStatus::Failed } else { DeviceStatus::Succeeded };
        assert_eq!(devices_answer(&deps, &job, status).await?, 5);
        let now = time::now_ms();
        let answer = run(&deps, Some("fw150"), now).await?;
        // THEN the campaign rolls back (1 of 5 failed, over the 5 % limit) and fleet health
        // counted the installs for the ota SLO, as 1.5.0's
        assert_eq!(state(&answer, "fw150"), Some(("rolling_back".into(), false)));
        let minute = minute_of(now);
        let counters = deps.health.buckets(&[Bucket::Minute(minute)]).await?;
        let ota = &counters[&Bucket::Minute(minute)][&Cohort::new("sensor", UNKNOWN, "1.5.0")];
        assert_eq!((ota.get(counter::OTA_SUCCEEDED), ota.get(counter::OTA_FAILED)), (4, 1));
        Ok(())
    }

    #[tokio::test]
    async fn a_failing_rotation_ends_halted_and_is_counted_as_halted_not_rolled_back() -> anyhow::Result<()> {
        use fleet_shared::certs::expiry::ExpiryClass;
        use fleet_shared::model::{CertificateId, ThingName};
        use fleet_shared::ports::{CertMark, DeviceCertStatus};
        // GIVEN 10 of the 50 sensors due to rotate, a rotation over them, and its first stage
        // out, the handler's metrics collected
        let dir = tempfile::tempdir()?;
        let mut deps = fleet(&dir).await?;
        let sets: Arc<std::sync::Mutex<Vec<MetricSet>>> = Arc::default();
        let seen = Arc::clone(&sets);
        deps.metrics = MetricsOut::Collect(Arc::new(move |m| seen.lock().expect("lock").push(m.clone())));
        let due: Vec<(ThingName, CertMark)> = fleet_shared::ota::test_sensors(10, "1.4.2")
            .into_iter()
            .enumerate()
            .map(|(i, (t, _))| -> anyhow::Result<_> {
                let mark = CertMark {
                    certificate: CertificateId::parse(&format!("{i:064x}"))?,
                    class: ExpiryClass::Warning,
                    not_after_ms: time::now_ms() + 86_400_000,
                    rotation_due: true,
                    checked_ms: time::now_ms(),
                };
                Ok((t, mark))
            })
            .collect::<anyhow::Result<_>>()?;
        deps.fleet.mark_cert_status(&due).await?;
        let mut spec = CampaignSpec::rotation("rot", "sensor", "1.4.2");
        spec.stages = vec![50, 100];
        spec.preconditions.min_battery_pct = None;
        spec.preconditions.seen_within_minutes = None;
        deps.campaigns.put_campaign(&Campaign::rotation(spec, time::now_ms())?).await?;
        handle(&deps, event(SCHEDULED)?).await?;
        // WHEN the stage's devices fail to rotate and the schedule ticks
        let job = JobId::parse("rot-s1")?;
        assert_eq!(devices_answer(&deps, &job, |_| DeviceStatus::Failed).await?, 5);
        sets.lock().expect("lock").clear();
        let answer = handle(&deps, event(SCHEDULED)?).await?;
        // THEN it ends halted, and this run counts one halted campaign and none rolled back
        assert_eq!(state(&answer, "rot"), Some(("halted".into(), false)));
        let metric = |name: &str| -> Option<f64> {
            sets.lock()
                .expect("lock")
                .iter()
                .flat_map(|s| s.values.clone())
                .find(|v| v.0 == name)
                .map(|v| v.1)
        };
        assert_eq!((metric("CampaignsHalted"), metric("CampaignsRolledBack")), (Some(1.0), Some(0.0)));
        // AND the next run counts it no more
        sets.lock().expect("lock").clear();
        handle(&deps, event(SCHEDULED)?).await?;
        assert_eq!(metric("CampaignsHalted"), Some(0.0));
        Ok(())
    }

    #[tokio::test]
    async fn a_campaign_whose_manifest_no_trusted_key_signed_is_paused_and_the_others_go_on(
    ) -> anyhow::Result<()> {
        // GIVEN a campaign signed by a key the orchestrator does not trust, and a good one
        let dir = tempfile::tempdir()?;
        let deps = fleet(&dir).await?;
        campaign(&deps, "rogue", 9).await?;
        campaign(&deps, "fw150", 7).await?;
        // WHEN the schedule ticks
        let answer = handle(&deps, event(SCHEDULED)?).await?;
        // THEN the rogue one is paused with the reason and sent nothing; the good one started
        assert_eq!(state(&answer, "rogue"), Some(("pending".into(), true)));
        let rogue = deps.campaigns.campaign("rogue").await?.expect("stored");
        assert!(
            rogue
                .paused
                .as_deref()
                .is_some_and(|why| why.contains("unknown_kid") || why.contains("bad_signature")),
            "{:?}",
            rogue.paused
        );
        assert_eq!(deps.jobs.job_progress(&JobId::parse("rogue-s1")?).await?, None);
        assert_eq!(state(&answer, "fw150"), Some(("stage".into(), false)));
        // AND the next tick leaves the paused one alone
        let again = handle(&deps, event(SCHEDULED)?).await?;
        assert!(again.ticked.iter().any(|t| t.campaign == "rogue" && t.summary.starts_with("paused:")));
        Ok(())
    }

    #[tokio::test]
    async fn an_event_for_a_job_no_campaign_owns_ticks_nothing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let deps = fleet(&dir).await?;
        campaign(&deps, "fw150", 7).await?;
        let foreign = JOB_COMPLETED.replace("\"fw150-s1\"", "\"reboot-everything\"");
        let answer = handle(&deps, event(&foreign)?).await?;
        assert!(answer.ticked.is_empty());
        let stored = deps.campaigns.campaign("fw150").await?.expect("stored");
        assert_eq!(stored.state, State::Pending);
        Ok(())
    }
}
