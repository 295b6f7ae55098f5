//! IoT Jobs on SQLite: [`JobsControl`] (what OTA campaigns ask of the control plane), and the
//! device side the local IoT Core serves over MQTT (`fleet_local::jobs`), as inherent methods:
//! a thing's pending executions, start-next, describe, update, the sweep (in-progress timeouts,
//! the rollout rate, jobs completing) and an outbox of what devices and rules must be told.
//!
//! Jobs are created and cancelled out of band (a function or `fleetctl`, possibly another
//! process on the same file), so everything a device or a rule must learn is recorded in the
//! database in the transaction that changes it: a thing whose pending executions may have
//! changed is marked in `job_notices`, an execution or a job that reached a terminal state is
//! marked `event_due`. The local IoT Core reads that outbox ([`SqliteStore::job_outbox`]),
//! publishes, then acknowledges what it published ([`SqliteStore::ack_job_outbox`]): a crash
//! in between publishes again, never loses a notice.
//!
//! Every execution row exists from the job's creation (QUEUED, counted in [`JobProgress`]);
//! `visible_at_ms` says when the rollout (`max_per_minute`, in target order) let its device
//! see it. Until then the device API behaves as if it did not exist, as on AWS, where the
//! execution is only created then. Versions start at 1 and grow by one on every change.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::SqliteStore;
use crate::error::StoreError;
use crate::model::{ExecutionStatus, JobCounts, JobId, JobProgress, JobStatus, NewJob, ThingName};
use crate::ports::JobsControl;

/// Migration step 15 (see `MIGRATIONS` in `sqlite.rs`).
pub(super) const JOBS_SCHEMA: &str = "
CREATE TABLE jobs (
    job_id             TEXT    NOT NULL PRIMARY KEY,
    status             TEXT    NOT NULL, -- IN_PROGRESS | CANCELED | COMPLETED
    document           TEXT    NOT NULL, -- the job document (JSON)
    description        TEXT    NOT NULL,
    created_at_ms      INTEGER NOT NULL,
    last_updated_at_ms INTEGER NOT NULL,
    completed_at_ms    INTEGER,
    max_per_minute     INTEGER,          -- rollout rate; NULL: every execution at once
    timeout_minutes    INTEGER,          -- in-progress timeout; NULL: none
    event_due          INTEGER NOT NULL DEFAULT 0 -- 1: its completed/canceled event is unpublished
) WITHOUT ROWID;
CREATE INDEX jobs_event_due ON jobs (last_updated_at_ms) WHERE event_due = 1;
CREATE TABLE job_executions (
    job_id             TEXT    NOT NULL,
    thing              TEXT    NOT NULL,
    target_index       INTEGER NOT NULL, -- position in the job's targets: the rollout order
    status             TEXT    NOT NULL,
    status_details     TEXT    NOT NULL DEFAULT '{}', -- JSON object of strings
    queued_at_ms       INTEGER NOT NULL,
    visible_at_ms      INTEGER,          -- when the rollout showed it to the device; NULL: not yet
    started_at_ms      INTEGER,
    last_updated_at_ms INTEGER NOT NULL,
    step_deadline_ms   INTEGER,          -- stepTimeoutInMinutes, from the last start or update
    version            INTEGER NOT NULL,
    execution_number   INTEGER NOT NULL,
    force_canceled     INTEGER NOT NULL DEFAULT 0,
    event_due          INTEGER NOT NULL DEFAULT 0, -- 1: its terminal event is unpublished
    PRIMARY KEY (job_id, thing)
) WITHOUT ROWID;
CREATE INDEX job_executions_by_thing ON job_executions (thing, status);
CREATE INDEX job_executions_rollout ON job_executions (job_id, target_index) WHERE visible_at_ms IS NULL;
CREATE INDEX job_executions_in_progress ON job_executions (job_id) WHERE status = 'IN_PROGRESS';
CREATE INDEX job_executions_event_due ON job_executions (last_updated_at_ms) WHERE event_due = 1;
CREATE TABLE job_notices (
    thing    TEXT    NOT NULL PRIMARY KEY,
    next_job TEXT,                       -- the next pending execution last announced (notify-next)
    pending  TEXT    NOT NULL DEFAULT '[]', -- the pending job ids last announced (notify), JSON
    dirty    INTEGER NOT NULL DEFAULT 0  -- changes since then; 0: announced
) WITHOUT ROWID;
CREATE INDEX job_notices_dirty ON job_notices (thing) WHERE dirty > 0;
";

/// The window `max_per_minute` counts releases in.
const ROLLOUT_WINDOW_MS: i64 = 60_000;

/// A job execution's `statusDetails`: name/value pairs the device reports.
pub type StatusDetails = BTreeMap<String, String>;

/// One thing's execution of a job, as the device API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobExecution {
    pub job_id: JobId,
    pub thing: ThingName,
    pub status: ExecutionStatus,
    pub status_details: StatusDetails,
    pub queued_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub last_updated_at_ms: i64,
    pub version: u64,
    pub execution_number: u64,
    /// The job's document.
    pub document: serde_json::Value,
}

/// The statuses a device may set (`UpdateJobExecution`'s `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    InProgress,
    Succeeded,
    Failed,
    Rejected,
}

impl DeviceStatus {
    /// From AWS's spelling; `None` for anything a device may not set.
    pub fn parse(s: &str) -> Option<Self> {
        match ExecutionStatus::parse(s)? {
            ExecutionStatus::InProgress => Some(Self::InProgress),
            ExecutionStatus::Succeeded => Some(Self::Succeeded),
            ExecutionStatus::Failed => Some(Self::Failed),
            ExecutionStatus::Rejected => Some(Self::Rejected),
            _ => None,
        }
    }

    pub fn status(self) -> ExecutionStatus {
        match self {
            Self::InProgress => ExecutionStatus::InProgress,
            Self::Succeeded => ExecutionStatus::Succeeded,
            Self::Failed => ExecutionStatus::Failed,
            Self::Rejected => ExecutionStatus::Rejected,
        }
    }
}

/// What a device sends with `StartNextPendingJobExecution`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StartNext {
    /// Merged into the execution's details when it is started.
    pub status_details: Option<StatusDetails>,
    /// The step timer: the execution times out unless updated within this many minutes.
    pub step_timeout_minutes: Option<u32>,
}

/// What a device sends with `UpdateJobExecution`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionUpdate {
    pub status: DeviceStatus,
    /// Merged into the execution's details (a name given again is replaced); `None`: unchanged.
    pub status_details: Option<StatusDetails>,
    /// The update applies only if the execution's version is this one.
    pub expected_version: Option<u64>,
    /// The update applies only to this execution number.
    pub execution_number: Option<u64>,
    /// With `IN_PROGRESS`: `Some(Some(m))` a new step timer of `m` minutes from now,
    /// `Some(None)` no step timer any more (AWS's -1); `None`: the timer stands.
    pub step_timeout_minutes: Option<Option<u32>>,
}

/// Why an update changed nothing (AWS's error codes).
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateRefused {
    /// `ResourceNotFound`: no such execution for this thing (or not yet released to it).
    NotFound,
    /// `InvalidStateTransition`: the execution is in a terminal state; as it stands.
    InvalidStateTransition(JobExecution),
    /// `VersionMismatch`: `expectedVersion` is not the current one; as it stands.
    VersionMismatch(JobExecution),
}

/// What one [`SqliteStore::sweep_jobs`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Executions in progress past their job's timeout or their step timer: now TIMED_OUT.
    pub timed_out: usize,
    /// Executions the rollout showed to their devices.
    pub released: usize,
    /// Jobs whose every execution is now terminal: COMPLETED.
    pub completed: usize,
}

/// What devices and rules have not been told yet ([`SqliteStore::job_outbox`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobOutbox {
    pub notices: Vec<ThingNotice>,
    /// Executions that reached a terminal state, oldest change first.
    pub execution_events: Vec<ExecutionEvent>,
    /// Jobs that completed or were cancelled, once none of their executions' events is due.
    pub job_events: Vec<JobEvent>,
}

impl JobOutbox {
    pub fn is_empty(&self) -> bool {
        self.notices.is_empty() && self.execution_events.is_empty() && self.job_events.is_empty()
    }
}

/// A thing whose pending executions may have changed since it was last told.
#[derive(Debug, Clone, PartialEq)]
pub struct ThingNotice {
    pub thing: ThingName,
    /// The next pending execution is another one than last announced (`notify-next`).
    pub next_changed: bool,
    /// The next pending execution (`$next`); `None`: nothing is pending.
    pub next: Option<JobExecution>,
    /// An execution joined or left the pending list since it was last announced (`notify`).
    pub pending_changed: bool,
    /// Every pending execution, in progress first, then queued, oldest first.
    pub pending: Vec<JobExecution>,
    /// The change count this notice was computed at (the acknowledgement compares it).
    dirty: i64,
}

/// An execution that reached a terminal state (`$aws/events/jobExecution/<job>/<status>`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionEvent {
    pub job_id: JobId,
    pub thing: ThingName,
    pub status: ExecutionStatus,
    pub status_details: StatusDetails,
    pub at_ms: i64,
}

/// A job that completed or was cancelled (`$aws/events/job/<job>/completed|canceled`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    pub job_id: JobId,
    pub status: JobStatus,
    /// In target order.
    pub targets: Vec<ThingName>,
    pub description: String,
    pub created_at_ms: i64,
    pub last_updated_at_ms: i64,
    pub completed_at_ms: Option<i64>,
    pub counts: JobCounts,
}

/// A job id the store already has, or one it does not know (an invalid job is
/// [`crate::model::InvalidJob`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobsError {
    #[error("job {0} exists already (job ids are never reused)")]
    Exists(JobId),
    #[error("no job {0}")]
    Unknown(JobId),
}

const IN_PROGRESS: &str = "IN_PROGRESS";

fn conv(i: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
}

#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?}")]
struct UnknownStatus(String);

fn status_at(r: &Row<'_>, i: usize) -> rusqlite::Result<ExecutionStatus> {
    let s: String = r.get(i)?;
    ExecutionStatus::parse(&s).ok_or_else(|| conv(i, UnknownStatus(s)))
}

fn job_status_at(r: &Row<'_>, i: usize) -> rusqlite::Result<JobStatus> {
    let s: String = r.get(i)?;
    JobStatus::parse(&s).ok_or_else(|| conv(i, UnknownStatus(s)))
}

fn thing_at(r: &Row<'_>, i: usize) -> rusqlite::Result<ThingName> {
    ThingName::parse(&r.get::<_, String>(i)?).map_err(|e| conv(i, e))
}

fn job_id_at(r: &Row<'_>, i: usize) -> rusqlite::Result<JobId> {
    JobId::parse(&r.get::<_, String>(i)?).map_err(|e| conv(i, e))
}

fn details_at(r: &Row<'_>, i: usize) -> rusqlite::Result<StatusDetails> {
    serde_json::from_str(&r.get::<_, String>(i)?).map_err(|e| conv(i, e))
}

fn details_json(d: &StatusDetails) -> String {
    // A map of strings always encodes.
    serde_json::to_string(d).unwrap_or_else(|_| "{}".to_owned())
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The columns [`execution_from_row`] reads, over `job_executions e JOIN jobs j`.
const EXECUTION_COLUMNS: &str =
    "e.job_id, e.thing, e.status, e.status_details, e.queued_at_ms, e.started_at_ms,
    e.last_updated_at_ms, e.version, e.execution_number, j.document";

fn execution_from_row(r: &Row<'_>) -> rusqlite::Result<JobExecution> {
    Ok(JobExecution {
        job_id: job_id_at(r, 0)?,
        thing: thing_at(r, 1)?,
        status: status_at(r, 2)?,
        status_details: details_at(r, 3)?,
        queued_at_ms: r.get(4)?,
        started_at_ms: r.get(5)?,
        last_updated_at_ms: r.get(6)?,
        version: count(r.get(7)?),
        execution_number: count(r.get(8)?),
        document: serde_json::from_str(&r.get::<_, String>(9)?).map_err(|e| conv(9, e))?,
    })
}

/// A read-modify-write transaction that takes the write lock at once, so two processes on the
/// file wait for each other (`busy_timeout`) instead of failing to upgrade a read.
fn immediate(c: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    c.transaction_with_behavior(TransactionBehavior::Immediate)
}

/// One execution the thing's device can see.
fn visible_execution(tx: &Connection, thing: &str, job: &str) -> rusqlite::Result<Option<JobExecution>> {
    tx.prepare_cached(&format!(
        "SELECT {EXECUTION_COLUMNS} FROM job_executions e JOIN jobs j ON j.job_id = e.job_id
         WHERE e.thing = ?1 AND e.job_id = ?2 AND e.visible_at_ms IS NOT NULL"
    ))?
    .query_row(params![thing, job], execution_from_row)
    .optional()
}

/// The thing's pending executions its device can see: in progress first, then queued, each
/// oldest first.
fn pending_of(c: &Connection, thing: &str) -> rusqlite::Result<Vec<JobExecution>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {EXECUTION_COLUMNS} FROM job_executions e JOIN jobs j ON j.job_id = e.job_id
         WHERE e.thing = ?1 AND e.status IN ('IN_PROGRESS', 'QUEUED') AND e.visible_at_ms IS NOT NULL
         ORDER BY e.status = 'QUEUED', e.queued_at_ms, e.job_id"
    ))?;
    let rows = st.query_map([thing], execution_from_row)?;
    rows.collect()
}

/// The thing's pending executions may have changed: its device is to be told.
fn mark_dirty(tx: &Connection, thing: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO job_notices (thing, dirty) VALUES (?1, 1)
         ON CONFLICT (thing) DO UPDATE SET dirty = dirty + 1",
    )?
    .execute([thing])
    .map(drop)
}

/// Show the job's next executions to their devices, in target order, as many as its rollout
/// rate allows in the last minute (all of them without a rate). How many were shown.
fn release(tx: &Connection, job: &str, rate: Option<u32>, now_ms: i64) -> rusqlite::Result<usize> {
    let budget = match rate {
        None => i64::MAX,
        Some(rate) => {
            let recent: i64 = tx
                .prepare_cached(
                    "SELECT COUNT(*) FROM job_executions WHERE job_id = ?1 AND visible_at_ms > ?2",
                )?
                .query_row(params![job, now_ms - ROLLOUT_WINDOW_MS], |r| r.get(0))?;
            i64::from(rate) - recent
        }
    };
    if budget <= 0 {
        return Ok(0);
    }
    let things: Vec<String> = {
        let mut st = tx.prepare_cached(
            "SELECT thing FROM job_executions
             WHERE job_id = ?1 AND visible_at_ms IS NULL AND status = 'QUEUED'
             ORDER BY target_index LIMIT ?2",
        )?;
        let rows = st.query_map(params![job, budget], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut show =
        tx.prepare_cached("UPDATE job_executions SET visible_at_ms = ?3 WHERE job_id = ?1 AND thing = ?2")?;
    for thing in &things {
        show.execute(params![job, thing, now_ms])?;
        mark_dirty(tx, thing)?;
    }
    Ok(things.len())
}

/// Complete the job if it is in progress and none of its executions is pending; whether it did.
fn settle_job(tx: &Connection, job: &str, now_ms: i64) -> rusqlite::Result<bool> {
    let changed = tx
        .prepare_cached(
            "UPDATE jobs SET status = 'COMPLETED', completed_at_ms = ?2, last_updated_at_ms = ?2,
                 event_due = 1
             WHERE job_id = ?1 AND status = 'IN_PROGRESS' AND NOT EXISTS (
                 SELECT 1 FROM job_executions WHERE job_id = ?1 AND status IN ('QUEUED', 'IN_PROGRESS'))",
        )?
        .execute(params![job, now_ms])?;
    Ok(changed == 1)
}

fn counts_of(c: &Connection, job: &str) -> rusqlite::Result<JobCounts> {
    let mut st =
        c.prepare_cached("SELECT status, COUNT(*) FROM job_executions WHERE job_id = ?1 GROUP BY status")?;
    let rows = st.query_map([job], |r| Ok((status_at(r, 0)?, count(r.get(1)?))))?;
    let mut counts = JobCounts::default();
    for row in rows {
        let (status, n) = row?;
        counts.add(status, n);
    }
    Ok(counts)
}

fn step_deadline(now_ms: i64, minutes: Option<u32>) -> Option<i64> {
    minutes.map(|m| now_ms + i64::from(m) * 60_000)
}

impl SqliteStore {
    /// [`JobsControl::create_job`] at a given time: the job, one QUEUED execution per target,
    /// and the first ones its rollout allows shown to their devices.
    pub async fn create_job_at(&self, job: &NewJob, now_ms: i64) -> Result<(), StoreError> {
        const OP: &str = "sqlite job create";
        let document = job.check().map_err(|e| StoreError::permanent(OP, e))?;
        let (id, targets) = (job.job_id.clone(), job.targets.clone());
        let (description, rate, timeout) =
            (job.description.clone(), job.max_per_minute, job.in_progress_timeout_minutes);
        let key = id.to_string();
        let created = self
            .with(OP, move |c| {
                let tx = immediate(c)?;
                let inserted = tx.execute(
                    "INSERT INTO jobs (job_id, status, document, description, created_at_ms,
                        last_updated_at_ms, max_per_minute, timeout_minutes)
                     VALUES (?1, 'IN_PROGRESS', ?2, ?3, ?4, ?4, ?5, ?6) ON CONFLICT (job_id) DO NOTHING",
                    params![key, document, description, now_ms, rate, timeout],
                )?;
                if inserted == 0 {
                    return Ok(false);
                }
                {
                    let mut st = tx.prepare_cached(
                        "INSERT INTO job_executions (job_id, thing, target_index, status, queued_at_ms,
                            last_updated_at_ms, version, execution_number)
                         VALUES (?1, ?2, ?3, 'QUEUED', ?4, ?4, 1, 1)",
                    )?;
                    for (i, thing) in targets.iter().enumerate() {
                        st.execute(params![key, thing.as_str(), i as i64, now_ms])?;
                    }
                }
                release(&tx, &key, rate, now_ms)?;
                tx.commit()?;
                Ok(true)
            })
            .await?;
        if created {
            Ok(())
        } else {
            Err(StoreError::conflict(OP, JobsError::Exists(id)))
        }
    }

    /// [`JobsControl::cancel_job`] at a given time.
    pub async fn cancel_job_at(&self, job: &JobId, force: bool, now_ms: i64) -> Result<(), StoreError> {
        const OP: &str = "sqlite job cancel";
        let key = job.to_string();
        let known = self
            .with(OP, move |c| {
                let tx = immediate(c)?;
                let status: Option<String> = tx
                    .query_row("SELECT status FROM jobs WHERE job_id = ?1", [&key], |r| r.get(0))
                    .optional()?;
                match status.as_deref() {
                    None => return Ok(false),
                    Some(IN_PROGRESS) => {}
                    Some(_) => return Ok(true),
                }
                let things: Vec<String> = {
                    let mut st = tx.prepare_cached(
                        "SELECT thing FROM job_executions
                         WHERE job_id = ?1 AND (status = 'QUEUED' OR (?2 AND status = 'IN_PROGRESS'))",
                    )?;
                    let rows = st.query_map(params![key, force], |r| r.get(0))?;
                    rows.collect::<rusqlite::Result<_>>()?
                };
                // SET reads the row as it was: force_canceled is whether it was in progress.
                tx.execute(
                    "UPDATE job_executions SET force_canceled = (status = 'IN_PROGRESS'), status = 'CANCELED',
                        version = version + 1, last_updated_at_ms = ?3, event_due = 1
                     WHERE job_id = ?1 AND (status = 'QUEUED' OR (?2 AND status = 'IN_PROGRESS'))",
                    params![key, force, now_ms],
                )?;
                for thing in &things {
                    mark_dirty(&tx, thing)?;
                }
                tx.execute(
                    "UPDATE jobs SET status = 'CANCELED', last_updated_at_ms = ?2, event_due = 1
                     WHERE job_id = ?1",
                    params![key, now_ms],
                )?;
                tx.commit()?;
                Ok(true)
            })
            .await?;
        if known {
            Ok(())
        } else {
            Err(StoreError::permanent(OP, JobsError::Unknown(job.clone())))
        }
    }

    /// The thing's pending executions its device can see (`GetPendingJobExecutions`): in
    /// progress first, then queued, each oldest first.
    pub async fn pending_job_executions(&self, thing: &ThingName) -> Result<Vec<JobExecution>, StoreError> {
        let thing = thing.to_string();
        self.with("sqlite job executions pending", move |c| pending_of(c, &thing)).await
    }

    /// `StartNextPendingJobExecution`: the thing's next pending execution. One in progress is
    /// returned as it stands; a queued one is moved to IN_PROGRESS first (its details merged,
    /// its step timer set), in one transaction, so two calls never start two executions.
    /// `None`: nothing is pending.
    pub async fn start_next_job_execution(
        &self,
        thing: &ThingName,
        start: &StartNext,
        now_ms: i64,
    ) -> Result<Option<JobExecution>, StoreError> {
        let thing = thing.to_string();
        let start = start.clone();
        self.with("sqlite job execution start next", move |c| {
            let tx = immediate(c)?;
            let Some(next) = pending_of(&tx, &thing)?.into_iter().next() else { return Ok(None) };
            if next.status == ExecutionStatus::InProgress {
                return Ok(Some(next));
            }
            let mut details = next.status_details.clone();
            details.extend(start.status_details.unwrap_or_default());
            tx.prepare_cached(
                "UPDATE job_executions SET status = 'IN_PROGRESS', status_details = ?3, started_at_ms = ?4,
                    last_updated_at_ms = ?4, step_deadline_ms = ?5, version = version + 1
                 WHERE job_id = ?1 AND thing = ?2",
            )?
            .execute(params![
                next.job_id.as_str(),
                thing,
                details_json(&details),
                now_ms,
                step_deadline(now_ms, start.step_timeout_minutes)
            ])?;
            mark_dirty(&tx, &thing)?;
            let started = visible_execution(&tx, &thing, next.job_id.as_str())?;
            tx.commit()?;
            Ok(started)
        })
        .await
    }

    /// `DescribeJobExecution`: one execution of the thing, whatever its status; `None` if it
    /// has none of that job (or not yet released to it), or not with that execution number.
    pub async fn describe_job_execution(
        &self,
        thing: &ThingName,
        job: &JobId,
        execution_number: Option<u64>,
    ) -> Result<Option<JobExecution>, StoreError> {
        let (thing, job) = (thing.to_string(), job.to_string());
        let found =
            self.with("sqlite job execution describe", move |c| visible_execution(c, &thing, &job)).await?;
        Ok(found.filter(|e| execution_number.is_none_or(|n| n == e.execution_number)))
    }

    /// `UpdateJobExecution`: checks, in this order, that the execution exists for the device,
    /// that it is not terminal, and that `expected_version` (if given) is its version; then
    /// sets the status, merges the details, bumps the version and, for a terminal status,
    /// completes the job if nothing else is pending. The execution as it is now, or why not.
    pub async fn update_job_execution(
        &self,
        thing: &ThingName,
        job: &JobId,
        update: &ExecutionUpdate,
        now_ms: i64,
    ) -> Result<Result<JobExecution, UpdateRefused>, StoreError> {
        let (thing, job) = (thing.to_string(), job.to_string());
        let update = update.clone();
        self.with("sqlite job execution update", move |c| {
            let tx = immediate(c)?;
            let Some(current) = visible_execution(&tx, &thing, &job)? else {
                return Ok(Err(UpdateRefused::NotFound));
            };
            if update.execution_number.is_some_and(|n| n != current.execution_number) {
                return Ok(Err(UpdateRefused::NotFound));
            }
            if current.status.is_terminal() {
                return Ok(Err(UpdateRefused::InvalidStateTransition(current)));
            }
            if update.expected_version.is_some_and(|v| v != current.version) {
                return Ok(Err(UpdateRefused::VersionMismatch(current)));
            }
            let status = update.status.status();
            let mut details = current.status_details.clone();
            details.extend(update.status_details.clone().unwrap_or_default());
            let in_progress = status == ExecutionStatus::InProgress;
            let started =
                if in_progress { current.started_at_ms.or(Some(now_ms)) } else { current.started_at_ms };
            // `Some(deadline)`: the step deadline is replaced (by none when the timer is cancelled).
            let step = update.step_timeout_minutes.filter(|_| in_progress).map(|t| step_deadline(now_ms, t));
            tx.prepare_cached(
                "UPDATE job_executions SET status = ?3, status_details = ?4, started_at_ms = ?5,
                    last_updated_at_ms = ?6,
                    step_deadline_ms = CASE WHEN ?9 THEN ?7 ELSE step_deadline_ms END,
                    version = version + 1, event_due = ?8
                 WHERE job_id = ?1 AND thing = ?2",
            )?
            .execute(params![
                job,
                thing,
                status.as_str(),
                details_json(&details),
                started,
                now_ms,
                step.flatten(),
                status.is_terminal(),
                step.is_some()
            ])?;
            mark_dirty(&tx, &thing)?;
            if status.is_terminal() {
                settle_job(&tx, &job, now_ms)?;
            }
            let after = visible_execution(&tx, &thing, &job)?;
            tx.commit()?;
            Ok(after.ok_or(UpdateRefused::NotFound))
        })
        .await
    }

    /// Time out executions in progress past their job's in-progress timeout or their step
    /// timer, show executions to their devices as the rollout rates allow, and complete the
    /// jobs left with nothing pending. Run about once a second by the local IoT Core.
    pub async fn sweep_jobs(&self, now_ms: i64) -> Result<SweepReport, StoreError> {
        self.with("sqlite jobs sweep", move |c| {
            let tx = immediate(c)?;
            let mut report = SweepReport::default();
            let expired: Vec<(String, String)> = {
                let mut st = tx.prepare_cached(
                    "SELECT e.job_id, e.thing FROM job_executions e JOIN jobs j ON j.job_id = e.job_id
                     WHERE e.status = 'IN_PROGRESS'
                       AND ((j.timeout_minutes IS NOT NULL
                             AND e.started_at_ms + j.timeout_minutes * 60000 <= ?1)
                            OR e.step_deadline_ms <= ?1)",
                )?;
                let rows = st.query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            {
                let mut time_out = tx.prepare_cached(
                    "UPDATE job_executions SET status = 'TIMED_OUT', version = version + 1,
                        last_updated_at_ms = ?3, event_due = 1
                     WHERE job_id = ?1 AND thing = ?2",
                )?;
                for (job, thing) in &expired {
                    time_out.execute(params![job, thing, now_ms])?;
                    mark_dirty(&tx, thing)?;
                }
            }
            report.timed_out = expired.len();
            let rolling: Vec<(String, u32)> = {
                let mut st = tx.prepare_cached(
                    "SELECT job_id, max_per_minute FROM jobs j
                     WHERE status = 'IN_PROGRESS' AND max_per_minute IS NOT NULL AND EXISTS (
                         SELECT 1 FROM job_executions e
                         WHERE e.job_id = j.job_id AND e.visible_at_ms IS NULL)",
                )?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for (job, rate) in &rolling {
                report.released += release(&tx, job, Some(*rate), now_ms)?;
            }
            let mut jobs: Vec<&String> = expired.iter().map(|(job, _)| job).collect();
            jobs.sort_unstable();
            jobs.dedup();
            for job in jobs {
                report.completed += usize::from(settle_job(&tx, job, now_ms)?);
            }
            tx.commit()?;
            Ok(report)
        })
        .await
    }

    /// What devices and rules have not been told yet, at most `limit` of each kind: things
    /// whose pending executions changed (with what they now are), executions that reached a
    /// terminal state, and jobs that completed or were cancelled (a job's event waits until
    /// its executions' events are acknowledged). Changes nothing: acknowledge what was
    /// published with [`SqliteStore::ack_job_outbox`].
    pub async fn job_outbox(&self, limit: usize) -> Result<JobOutbox, StoreError> {
        let limit = limit.max(1) as i64;
        self.with("sqlite jobs outbox", move |c| {
            let tx = c.transaction()?;
            let dirty: Vec<(ThingName, Option<String>, String, i64)> = {
                let mut st = tx.prepare_cached(
                    "SELECT thing, next_job, pending, dirty FROM job_notices
                     WHERE dirty > 0 ORDER BY thing LIMIT ?1",
                )?;
                let rows =
                    st.query_map([limit], |r| Ok((thing_at(r, 0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut notices = Vec::with_capacity(dirty.len());
            for (thing, announced_next, announced, dirty) in dirty {
                let pending = pending_of(&tx, thing.as_str())?;
                let mut announced: Vec<String> = serde_json::from_str(&announced).map_err(|e| conv(2, e))?;
                announced.sort_unstable();
                let mut now: Vec<&str> = pending.iter().map(|e| e.job_id.as_str()).collect();
                now.sort_unstable();
                let next = pending.first().cloned();
                notices.push(ThingNotice {
                    thing,
                    next_changed: next.as_ref().map(|e| e.job_id.as_str()) != announced_next.as_deref(),
                    next,
                    pending_changed: now != announced,
                    pending,
                    dirty,
                });
            }
            let execution_events: Vec<ExecutionEvent> = {
                let mut st = tx.prepare_cached(
                    "SELECT job_id, thing, status, status_details, last_updated_at_ms FROM job_executions
                     WHERE event_due = 1 ORDER BY last_updated_at_ms, job_id, thing LIMIT ?1",
                )?;
                let rows = st.query_map([limit], |r| {
                    Ok(ExecutionEvent {
                        job_id: job_id_at(r, 0)?,
                        thing: thing_at(r, 1)?,
                        status: status_at(r, 2)?,
                        status_details: details_at(r, 3)?,
                        at_ms: r.get(4)?,
                    })
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let jobs: Vec<(JobId, JobStatus, String, i64, i64, Option<i64>)> = {
                let mut st = tx.prepare_cached(
                    "SELECT job_id, status, description, created_at_ms, last_updated_at_ms, completed_at_ms
                     FROM jobs j
                     WHERE event_due = 1 AND NOT EXISTS (
                         SELECT 1 FROM job_executions e WHERE e.job_id = j.job_id AND e.event_due = 1)
                     ORDER BY last_updated_at_ms, job_id LIMIT ?1",
                )?;
                let rows = st.query_map([limit], |r| {
                    Ok((job_id_at(r, 0)?, job_status_at(r, 1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut job_events = Vec::with_capacity(jobs.len());
            for (job_id, status, description, created_at_ms, last_updated_at_ms, completed_at_ms) in jobs {
                let targets = {
                    let mut st = tx.prepare_cached(
                        "SELECT thing FROM job_executions WHERE job_id = ?1 ORDER BY target_index",
                    )?;
                    let rows = st.query_map([job_id.as_str()], |r| thing_at(r, 0))?;
                    rows.collect::<rusqlite::Result<_>>()?
                };
                let counts = counts_of(&tx, job_id.as_str())?;
                job_events.push(JobEvent {
                    job_id,
                    status,
                    targets,
                    description,
                    created_at_ms,
                    last_updated_at_ms,
                    completed_at_ms,
                    counts,
                });
            }
            tx.commit()?;
            Ok(JobOutbox { notices, execution_events, job_events })
        })
        .await
    }

    /// Record that `outbox` was published: each thing's announced next and pending executions
    /// are now those of its notice (and it is clean unless it changed again since), and the
    /// events are no longer due.
    pub async fn ack_job_outbox(&self, outbox: &JobOutbox) -> Result<(), StoreError> {
        let notices: Vec<(String, Option<String>, String, i64)> = outbox
            .notices
            .iter()
            .map(|n| {
                let ids: Vec<&str> = n.pending.iter().map(|e| e.job_id.as_str()).collect();
                let pending = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_owned());
                (n.thing.to_string(), n.next.as_ref().map(|e| e.job_id.to_string()), pending, n.dirty)
            })
            .collect();
        let executions: Vec<(String, String)> =
            outbox.execution_events.iter().map(|e| (e.job_id.to_string(), e.thing.to_string())).collect();
        let jobs: Vec<(String, &'static str)> =
            outbox.job_events.iter().map(|j| (j.job_id.to_string(), JobStatus::as_str(j.status))).collect();
        self.with("sqlite jobs outbox ack", move |c| {
            let tx = immediate(c)?;
            {
                let mut st = tx.prepare_cached(
                    "UPDATE job_notices SET next_job = ?2, pending = ?3,
                        dirty = CASE WHEN dirty = ?4 THEN 0 ELSE dirty END
                     WHERE thing = ?1",
                )?;
                for (thing, next, pending, dirty) in &notices {
                    st.execute(params![thing, next, pending, dirty])?;
                }
                let mut st = tx.prepare_cached(
                    "UPDATE job_executions SET event_due = 0 WHERE job_id = ?1 AND thing = ?2",
                )?;
                for (job, thing) in &executions {
                    st.execute(params![job, thing])?;
                }
                let mut st =
                    tx.prepare_cached("UPDATE jobs SET event_due = 0 WHERE job_id = ?1 AND status = ?2")?;
                for (job, status) in &jobs {
                    st.execute(params![job, status])?;
                }
            }
            tx.commit()
        })
        .await
    }
}

impl JobsControl for SqliteStore {
    async fn create_job(&self, job: &NewJob) -> Result<(), StoreError> {
        self.create_job_at(job, crate::time::now_ms()).await
    }

    async fn cancel_job(&self, job: &JobId, force: bool) -> Result<(), StoreError> {
        self.cancel_job_at(job, force, crate::time::now_ms()).await
    }

    async fn job_progress(&self, job: &JobId) -> Result<Option<JobProgress>, StoreError> {
        let key = job.to_string();
        self.with("sqlite job progress", move |c| {
            let tx = c.transaction()?;
            let Some((status, description)) = tx
                .query_row("SELECT status, description FROM jobs WHERE job_id = ?1", [&key], |r| {
                    Ok((job_status_at(r, 0)?, r.get(1)?))
                })
                .optional()?
            else {
                return Ok(None);
            };
            let counts = counts_of(&tx, &key)?;
            tx.commit()?;
            Ok(Some(JobProgress { status, counts, description }))
        })
        .await
    }

    /// Local jobs hold nothing on the way (no thing groups): nothing to free.
    async fn retire_job(&self, _job: &JobId) -> Result<(), StoreError> {
        Ok(())
    }

    async fn job_executions(&self, job: &JobId) -> Result<Vec<(ThingName, ExecutionStatus)>, StoreError> {
        let key = job.to_string();
        self.with("sqlite job executions", move |c| {
            let mut st = c.prepare_cached(
                "SELECT thing, status FROM job_executions WHERE job_id = ?1 ORDER BY thing",
            )?;
            let rows = st.query_map([key], |r| Ok((thing_at(r, 0)?, status_at(r, 1)?)))?;
            rows.collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::model::MAX_JOB_DOCUMENT_BYTES;
    use anyhow::Context as _;
    use serde_json::json;

    const T0: i64 = 1_764_000_000_000;
    const MINUTE: i64 = 60_000;

    fn thing(s: &str) -> ThingName {
        ThingName::parse(s).expect("thing name")
    }

    fn id(s: &str) -> JobId {
        JobId::parse(s).expect("job id")
    }

    fn new_job(job: &str, targets: &[&str]) -> NewJob {
        NewJob {
            job_id: id(job),
            targets: targets.iter().map(|t| thing(t)).collect(),
            document: json!({"operation": "install", "job": job}),
            description: format!("install for {job}"),
            max_per_minute: None,
            in_progress_timeout_minutes: None,
        }
    }

    fn details(pairs: &[(&str, &str)]) -> StatusDetails {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn update(status: DeviceStatus) -> ExecutionUpdate {
        ExecutionUpdate {
            status,
            status_details: None,
            expected_version: None,
            execution_number: None,
            step_timeout_minutes: None,
        }
    }

    async fn status_of(s: &SqliteStore, job: &str, t: &str) -> anyhow::Result<Option<ExecutionStatus>> {
        let all = s.job_executions(&id(job)).await?;
        Ok(all.into_iter().find(|(x, _)| x.as_str() == t).map(|(_, st)| st))
    }

    async fn updated(
        s: &SqliteStore,
        t: &str,
        job: &str,
        u: ExecutionUpdate,
        now: i64,
    ) -> anyhow::Result<JobExecution> {
        s.update_job_execution(&thing(t), &id(job), &u, now)
            .await?
            .map_err(|r| anyhow::anyhow!("refused: {r:?}"))
    }

    #[tokio::test]
    async fn start_next_starts_the_oldest_queued_execution_and_then_returns_the_one_in_progress(
    ) -> anyhow::Result<()> {
        // GIVEN two jobs for d1, the older first, and one for d2
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1"]), T0).await?;
        s.create_job_at(&new_job("job-b", &["d1", "d2"]), T0 + 1_000).await?;
        let pending: Vec<_> =
            s.pending_job_executions(&thing("d1")).await?.into_iter().map(|e| e.job_id).collect();
        assert_eq!(pending, [id("job-a"), id("job-b")]);
        // WHEN d1 starts its next execution, with details and a step timer
        let start = StartNext {
            status_details: Some(details(&[("step", "download")])),
            step_timeout_minutes: Some(5),
        };
        let started =
            s.start_next_job_execution(&thing("d1"), &start, T0 + 2_000).await?.context("one pending")?;
        // THEN the older job is in progress, with its document, details, start time and version 2
        assert_eq!((started.job_id.as_str(), started.status), ("job-a", ExecutionStatus::InProgress));
        assert_eq!(started.document, json!({"operation": "install", "job": "job-a"}));
        assert_eq!(started.status_details, details(&[("step", "download")]));
        assert_eq!((started.started_at_ms, started.queued_at_ms, started.version), (Some(T0 + 2_000), T0, 2));
        // AND starting again returns the same execution unchanged (details are not touched)
        let again = s.start_next_job_execution(&thing("d1"), &StartNext::default(), T0 + 3_000).await?;
        assert_eq!(again.as_ref(), Some(&started));
        // AND once it succeeded, the next start is the younger job
        updated(&s, "d1", "job-a", update(DeviceStatus::Succeeded), T0 + 4_000).await?;
        let next = s.start_next_job_execution(&thing("d1"), &StartNext::default(), T0 + 5_000).await?;
        assert_eq!(next.map(|e| (e.job_id, e.status)), Some((id("job-b"), ExecutionStatus::InProgress)));
        assert!(s.start_next_job_execution(&thing("d3"), &StartNext::default(), T0).await?.is_none());
        Ok(())
    }

    #[tokio::test]
    async fn executions_in_progress_come_before_queued_ones_whatever_their_age() -> anyhow::Result<()> {
        // GIVEN two queued jobs for d1
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1"]), T0).await?;
        s.create_job_at(&new_job("job-b", &["d1"]), T0 + 1_000).await?;
        // WHEN the device starts the younger one itself
        updated(&s, "d1", "job-b", update(DeviceStatus::InProgress), T0 + 2_000).await?;
        // THEN it is listed, and started next, first
        let pending: Vec<_> =
            s.pending_job_executions(&thing("d1")).await?.into_iter().map(|e| (e.job_id, e.status)).collect();
        assert_eq!(
            pending,
            [(id("job-b"), ExecutionStatus::InProgress), (id("job-a"), ExecutionStatus::Queued)]
        );
        let next = s.start_next_job_execution(&thing("d1"), &StartNext::default(), T0 + 3_000).await?;
        assert_eq!(next.map(|e| e.job_id), Some(id("job-b")));
        Ok(())
    }

    #[tokio::test]
    async fn an_update_with_another_expected_version_is_refused_with_the_execution_as_it_stands(
    ) -> anyhow::Result<()> {
        // GIVEN a queued execution (version 1)
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1"]), T0).await?;
        // WHEN an update expects version 5
        let mut u = update(DeviceStatus::InProgress);
        u.expected_version = Some(5);
        u.status_details = Some(details(&[("a", "1")]));
        let refused = s.update_job_execution(&thing("d1"), &id("job-a"), &u, T0 + 1).await?;
        // THEN it is refused with the execution unchanged
        let Err(UpdateRefused::VersionMismatch(current)) = refused else { anyhow::bail!("{refused:?}") };
        assert_eq!((current.version, current.status), (1, ExecutionStatus::Queued));
        assert!(current.status_details.is_empty());
        // AND with the right version it applies; later details merge into earlier ones
        u.expected_version = Some(1);
        let first = updated(&s, "d1", "job-a", u, T0 + 2).await?;
        assert_eq!(
            (first.version, first.status, first.started_at_ms),
            (2, ExecutionStatus::InProgress, Some(T0 + 2))
        );
        let mut u = update(DeviceStatus::InProgress);
        u.status_details = Some(details(&[("a", "2"), ("b", "x")]));
        let second = updated(&s, "d1", "job-a", u, T0 + 3).await?;
        assert_eq!(second.status_details, details(&[("a", "2"), ("b", "x")]));
        assert_eq!(
            (second.version, second.started_at_ms, second.last_updated_at_ms),
            (3, Some(T0 + 2), T0 + 3)
        );
        // AND details left out stay as they are
        let third = updated(&s, "d1", "job-a", update(DeviceStatus::InProgress), T0 + 4).await?;
        assert_eq!((third.version, third.status_details), (4, details(&[("a", "2"), ("b", "x")])));
        Ok(())
    }

    #[tokio::test]
    async fn a_terminal_execution_refuses_every_further_update() -> anyhow::Result<()> {
        // GIVEN an execution that succeeded
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1", "d2"]), T0).await?;
        let done = updated(&s, "d1", "job-a", update(DeviceStatus::Succeeded), T0 + 1).await?;
        // WHEN the device sends any status again, even with the right version
        for status in
            [DeviceStatus::InProgress, DeviceStatus::Succeeded, DeviceStatus::Failed, DeviceStatus::Rejected]
        {
            let mut u = update(status);
            u.expected_version = Some(done.version);
            let refused = s.update_job_execution(&thing("d1"), &id("job-a"), &u, T0 + 2).await?;
            // THEN it is an invalid state transition, answered with the execution as it stands
            assert_eq!(refused, Err(UpdateRefused::InvalidStateTransition(done.clone())), "{status:?}");
        }
        // AND unknown executions, or another execution number, are not found
        let u = update(DeviceStatus::Succeeded);
        assert_eq!(
            s.update_job_execution(&thing("d3"), &id("job-a"), &u, T0).await?,
            Err(UpdateRefused::NotFound)
        );
        assert_eq!(
            s.update_job_execution(&thing("d2"), &id("job-x"), &u, T0).await?,
            Err(UpdateRefused::NotFound)
        );
        let mut u = update(DeviceStatus::Succeeded);
        u.execution_number = Some(2);
        assert_eq!(
            s.update_job_execution(&thing("d2"), &id("job-a"), &u, T0).await?,
            Err(UpdateRefused::NotFound)
        );
        assert_eq!(s.describe_job_execution(&thing("d2"), &id("job-a"), Some(2)).await?, None);
        let described = s.describe_job_execution(&thing("d1"), &id("job-a"), Some(1)).await?;
        assert_eq!(described, Some(done));
        Ok(())
    }

    #[tokio::test]
    async fn cancel_without_force_leaves_executions_in_progress_to_finish() -> anyhow::Result<()> {
        // GIVEN a job for three things, d1's execution in progress
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1", "d2", "d3"]), T0).await?;
        s.start_next_job_execution(&thing("d1"), &StartNext::default(), T0 + 1).await?;
        // WHEN it is cancelled without force
        s.cancel_job_at(&id("job-a"), false, T0 + 2).await?;
        // THEN the queued executions are canceled, the one in progress is not, the job is CANCELED
        let progress = s.job_progress(&id("job-a")).await?.context("known job")?;
        assert_eq!(progress.status, JobStatus::Canceled);
        assert_eq!((progress.counts.in_progress, progress.counts.canceled), (1, 2));
        assert!(s.pending_job_executions(&thing("d2")).await?.is_empty());
        // AND d1 may still finish; the job stays CANCELED
        updated(&s, "d1", "job-a", update(DeviceStatus::Succeeded), T0 + 3).await?;
        let progress = s.job_progress(&id("job-a")).await?.context("known job")?;
        assert_eq!(
            (progress.status, progress.counts.succeeded, progress.counts.canceled),
            (JobStatus::Canceled, 1, 2)
        );
        // AND cancelling again, even with force, changes nothing
        s.cancel_job_at(&id("job-a"), true, T0 + 4).await?;
        assert_eq!(s.job_progress(&id("job-a")).await?, Some(progress));
        Ok(())
    }

    #[tokio::test]
    async fn cancel_with_force_cancels_executions_in_progress_too() -> anyhow::Result<()> {
        // GIVEN a job with d1's execution in progress
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1", "d2"]), T0).await?;
        s.start_next_job_execution(&thing("d1"), &StartNext::default(), T0 + 1).await?;
        // WHEN it is cancelled with force
        s.cancel_job_at(&id("job-a"), true, T0 + 2).await?;
        // THEN every execution is CANCELED and the device's report comes too late
        assert_eq!(status_of(&s, "job-a", "d1").await?, Some(ExecutionStatus::Canceled));
        assert_eq!(status_of(&s, "job-a", "d2").await?, Some(ExecutionStatus::Canceled));
        let refused = s
            .update_job_execution(&thing("d1"), &id("job-a"), &update(DeviceStatus::Succeeded), T0 + 3)
            .await?;
        let canceled = ExecutionStatus::Canceled;
        assert!(matches!(refused, Err(UpdateRefused::InvalidStateTransition(ref e)) if e.status == canceled));
        // AND an unknown job cannot be cancelled
        let err = s.cancel_job_at(&id("job-x"), false, T0).await.expect_err("unknown job");
        assert_eq!(err.kind, ErrorKind::Permanent);
        Ok(())
    }

    #[tokio::test]
    async fn executions_in_progress_longer_than_the_timeout_or_their_step_timer_time_out(
    ) -> anyhow::Result<()> {
        // GIVEN a job with a 10-minute in-progress timeout; d1 started at T0, d2 queued
        let s = SqliteStore::in_memory()?;
        let mut job = new_job("job-a", &["d1", "d2"]);
        job.in_progress_timeout_minutes = Some(10);
        s.create_job_at(&job, T0).await?;
        s.start_next_job_execution(&thing("d1"), &StartNext::default(), T0).await?;
        // WHEN the sweep runs just before and at ten minutes
        assert_eq!(s.sweep_jobs(T0 + 10 * MINUTE - 1).await?, SweepReport::default());
        let report = s.sweep_jobs(T0 + 10 * MINUTE).await?;
        // THEN d1 timed out; the queued d2 did not (the timer runs from the start)
        assert_eq!(report, SweepReport { timed_out: 1, released: 0, completed: 0 });
        assert_eq!(status_of(&s, "job-a", "d1").await?, Some(ExecutionStatus::TimedOut));
        assert_eq!(status_of(&s, "job-a", "d2").await?, Some(ExecutionStatus::Queued));
        // AND a step timer ends an execution sooner; the job then completes
        let start = StartNext { status_details: None, step_timeout_minutes: Some(1) };
        s.start_next_job_execution(&thing("d2"), &start, T0 + 20 * MINUTE).await?;
        assert_eq!(s.sweep_jobs(T0 + 21 * MINUTE - 1).await?.timed_out, 0);
        let report = s.sweep_jobs(T0 + 21 * MINUTE).await?;
        assert_eq!(report, SweepReport { timed_out: 1, released: 0, completed: 1 });
        let progress = s.job_progress(&id("job-a")).await?.context("known job")?;
        assert_eq!((progress.status, progress.counts.timed_out), (JobStatus::Completed, 2));
        Ok(())
    }

    #[tokio::test]
    async fn an_update_resets_or_cancels_the_step_timer_and_one_without_a_timeout_keeps_it(
    ) -> anyhow::Result<()> {
        // GIVEN d1 and d2 each started with a one-minute step timer (no in-progress timeout)
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1", "d2"]), T0).await?;
        let start = StartNext { status_details: None, step_timeout_minutes: Some(1) };
        for t in ["d1", "d2"] {
            s.start_next_job_execution(&thing(t), &start, T0).await?.context("one pending")?;
        }
        // WHEN d1 cancels its timer (AWS's -1) and d2 reports progress without a timeout
        let cancel = ExecutionUpdate { step_timeout_minutes: Some(None), ..update(DeviceStatus::InProgress) };
        updated(&s, "d1", "job-a", cancel, T0 + 1_000).await?;
        updated(&s, "d2", "job-a", update(DeviceStatus::InProgress), T0 + 1_000).await?;
        // THEN at the minute d2 times out and d1 does not, then or a day later
        assert_eq!(s.sweep_jobs(T0 + MINUTE).await?.timed_out, 1);
        assert_eq!(status_of(&s, "job-a", "d2").await?, Some(ExecutionStatus::TimedOut));
        assert_eq!(s.sweep_jobs(T0 + 24 * 60 * MINUTE).await?.timed_out, 0);
        assert_eq!(status_of(&s, "job-a", "d1").await?, Some(ExecutionStatus::InProgress));
        // AND a new timer set by an update runs from that update
        let reset =
            ExecutionUpdate { step_timeout_minutes: Some(Some(2)), ..update(DeviceStatus::InProgress) };
        updated(&s, "d1", "job-a", reset, T0 + 30 * 60 * MINUTE).await?;
        assert_eq!(s.sweep_jobs(T0 + 30 * 60 * MINUTE + 2 * MINUTE - 1).await?.timed_out, 0);
        assert_eq!(s.sweep_jobs(T0 + 30 * 60 * MINUTE + 2 * MINUTE).await?.timed_out, 1);
        Ok(())
    }

    #[tokio::test]
    async fn the_rollout_shows_executions_at_its_rate_in_target_order() -> anyhow::Result<()> {
        // GIVEN a job for five things at 2 per minute, targets not in name order
        let s = SqliteStore::in_memory()?;
        let mut job = new_job("job-a", &["d3", "d1", "d5", "d2", "d4"]);
        job.max_per_minute = Some(2);
        s.create_job_at(&job, T0).await?;
        let visible = |s: SqliteStore| async move {
            let mut out = Vec::new();
            for t in ["d1", "d2", "d3", "d4", "d5"] {
                if !s.pending_job_executions(&thing(t)).await?.is_empty() {
                    out.push(t);
                }
            }
            anyhow::Ok(out)
        };
        // THEN the first two targets see it at once; every target counts as queued
        assert_eq!(visible(s.clone()).await?, ["d1", "d3"]);
        assert_eq!(s.job_progress(&id("job-a")).await?.map(|p| p.counts.queued), Some(5));
        // AND a target not yet reached cannot describe or update it
        assert_eq!(s.describe_job_execution(&thing("d5"), &id("job-a"), None).await?, None);
        let refused =
            s.update_job_execution(&thing("d5"), &id("job-a"), &update(DeviceStatus::Succeeded), T0).await?;
        assert_eq!(refused, Err(UpdateRefused::NotFound));
        // WHEN the sweep runs within the minute, then after it, then after the next
        assert_eq!(s.sweep_jobs(T0 + 30_000).await?.released, 0);
        assert_eq!(s.sweep_jobs(T0 + MINUTE).await?.released, 2);
        assert_eq!(visible(s.clone()).await?, ["d1", "d2", "d3", "d5"]);
        assert_eq!(s.sweep_jobs(T0 + 2 * MINUTE).await?.released, 1);
        // THEN the next two followed in target order, then the last
        assert_eq!(visible(s.clone()).await?, ["d1", "d2", "d3", "d4", "d5"]);
        assert_eq!(s.sweep_jobs(T0 + 3 * MINUTE).await?, SweepReport::default());
        Ok(())
    }

    #[tokio::test]
    async fn a_job_completes_when_every_execution_is_terminal_and_counts_each_status() -> anyhow::Result<()> {
        // GIVEN a job for four things
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1", "d2", "d3", "d4"]), T0).await?;
        // WHEN three finish, one of each terminal status a device can report
        updated(&s, "d1", "job-a", update(DeviceStatus::Succeeded), T0 + 1).await?;
        updated(&s, "d2", "job-a", update(DeviceStatus::Failed), T0 + 2).await?;
        updated(&s, "d3", "job-a", update(DeviceStatus::Rejected), T0 + 3).await?;
        updated(&s, "d4", "job-a", update(DeviceStatus::InProgress), T0 + 4).await?;
        // THEN the job is still in progress, counted by status
        let progress = s.job_progress(&id("job-a")).await?.context("known job")?;
        let mut expected = JobCounts::default();
        for st in [
            ExecutionStatus::Succeeded,
            ExecutionStatus::Failed,
            ExecutionStatus::Rejected,
            ExecutionStatus::InProgress,
        ] {
            expected.add(st, 1);
        }
        assert_eq!((progress.status, progress.counts), (JobStatus::InProgress, expected));
        assert_eq!(progress.description, "install for job-a");
        // AND once the last one succeeds it is COMPLETED
        updated(&s, "d4", "job-a", update(DeviceStatus::Succeeded), T0 + 5).await?;
        let progress = s.job_progress(&id("job-a")).await?.context("known job")?;
        assert_eq!(
            (progress.status, progress.counts.succeeded, progress.counts.pending()),
            (JobStatus::Completed, 2, 0)
        );
        let listed: Vec<_> = s.job_executions(&id("job-a")).await?.into_iter().map(|(t, _)| t).collect();
        assert_eq!(listed, [thing("d1"), thing("d2"), thing("d3"), thing("d4")]);
        assert_eq!(s.job_progress(&id("job-x")).await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn a_job_id_is_created_once_and_invalid_jobs_are_refused() -> anyhow::Result<()> {
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1"]), T0).await?;
        let again = s.create_job_at(&new_job("job-a", &["d2"]), T0 + 1).await.expect_err("an id twice");
        assert_eq!(again.kind, ErrorKind::Conflict);
        assert_eq!(s.job_executions(&id("job-a")).await?, [(thing("d1"), ExecutionStatus::Queued)]);
        let mut bad = vec![new_job("job-b", &[]), new_job("job-b", &["d1", "d2", "d1"])];
        for (rate, timeout) in [(Some(0), None), (Some(1001), None), (None, Some(0)), (None, Some(10_081))] {
            let mut job = new_job("job-b", &["d1"]);
            (job.max_per_minute, job.in_progress_timeout_minutes) = (rate, timeout);
            bad.push(job);
        }
        let mut big = new_job("job-b", &["d1"]);
        big.document = json!({"blob": "x".repeat(MAX_JOB_DOCUMENT_BYTES)});
        bad.push(big);
        for job in bad {
            let err = s.create_job_at(&job, T0).await.expect_err("invalid job");
            assert_eq!(err.kind, ErrorKind::Permanent, "{err}");
        }
        assert_eq!(s.job_progress(&id("job-b")).await?, None, "nothing of a refused job is stored");
        Ok(())
    }

    fn next_of(n: &ThingNotice) -> Option<&str> {
        n.next.as_ref().map(|e| e.job_id.as_str())
    }

    #[tokio::test]
    async fn the_outbox_tells_each_change_once_and_a_jobs_event_follows_its_executions_events(
    ) -> anyhow::Result<()> {
        // GIVEN a job for d1 and d2
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1", "d2"]), T0).await?;
        // THEN both things are to be told it is next and pending; nothing else
        let out = s.job_outbox(100).await?;
        let told: Vec<_> = out
            .notices
            .iter()
            .map(|n| (n.thing.as_str(), n.next_changed, next_of(n), n.pending_changed))
            .collect();
        assert_eq!(told, [("d1", true, Some("job-a"), true), ("d2", true, Some("job-a"), true)]);
        assert!(out.execution_events.is_empty() && out.job_events.is_empty());
        // AND once acknowledged, nothing is left
        s.ack_job_outbox(&out).await?;
        assert!(s.job_outbox(100).await?.is_empty());
        // WHEN a second job joins d1's list behind the first
        s.create_job_at(&new_job("job-b", &["d1"]), T0 + 1).await?;
        let out = s.job_outbox(100).await?;
        // THEN d1's list changed, its next did not
        let told: Vec<_> =
            out.notices.iter().map(|n| (n.thing.as_str(), n.next_changed, n.pending_changed)).collect();
        assert_eq!(told, [("d1", false, true)]);
        assert_eq!(out.notices[0].pending.len(), 2);
        s.ack_job_outbox(&out).await?;
        // WHEN d1 starts job-a (its next stays the same) and then succeeds
        s.start_next_job_execution(&thing("d1"), &StartNext::default(), T0 + 2).await?;
        let out = s.job_outbox(100).await?;
        assert!(out.notices.iter().all(|n| !n.next_changed && !n.pending_changed), "{out:?}");
        s.ack_job_outbox(&out).await?;
        let mut u = update(DeviceStatus::Succeeded);
        u.status_details = Some(details(&[("fw", "2.1.0")]));
        updated(&s, "d1", "job-a", u, T0 + 3).await?;
        let out = s.job_outbox(100).await?;
        // THEN job-b is d1's next, and the success is an event (the job is still running)
        let told: Vec<_> = out
            .notices
            .iter()
            .map(|n| (n.thing.as_str(), n.next_changed, next_of(n), n.pending_changed))
            .collect();
        assert_eq!(told, [("d1", true, Some("job-b"), true)]);
        let event = &out.execution_events[..];
        assert_eq!(event.len(), 1);
        assert_eq!(
            (event[0].thing.as_str(), event[0].status, event[0].at_ms),
            ("d1", ExecutionStatus::Succeeded, T0 + 3)
        );
        assert_eq!(event[0].status_details, details(&[("fw", "2.1.0")]));
        assert!(out.job_events.is_empty());
        s.ack_job_outbox(&out).await?;
        // WHEN job-a is cancelled (another process may do it: it is all in the file)
        s.cancel_job_at(&id("job-a"), false, T0 + 4).await?;
        let out = s.job_outbox(100).await?;
        // THEN d2 is told it has nothing next, and its execution's event comes before the job's
        let told: Vec<_> =
            out.notices.iter().map(|n| (n.thing.as_str(), n.next_changed, next_of(n))).collect();
        assert_eq!(told, [("d2", true, None)]);
        let events: Vec<_> = out.execution_events.iter().map(|e| (e.thing.as_str(), e.status)).collect();
        assert_eq!(events, [("d2", ExecutionStatus::Canceled)]);
        assert!(out.job_events.is_empty(), "the job's event waits for its executions' events");
        s.ack_job_outbox(&out).await?;
        let out = s.job_outbox(100).await?;
        assert!(out.notices.is_empty() && out.execution_events.is_empty());
        let job = &out.job_events[..];
        assert_eq!(job.len(), 1);
        assert_eq!(
            (job[0].job_id.as_str(), job[0].status, job[0].completed_at_ms),
            ("job-a", JobStatus::Canceled, None)
        );
        assert_eq!(job[0].targets, [thing("d1"), thing("d2")]);
        assert_eq!((job[0].counts.succeeded, job[0].counts.canceled, job[0].created_at_ms), (1, 1, T0));
        s.ack_job_outbox(&out).await?;
        assert!(s.job_outbox(100).await?.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn a_change_made_while_a_notice_is_published_is_told_again() -> anyhow::Result<()> {
        // GIVEN d1's notice read for publication
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1"]), T0).await?;
        let out = s.job_outbox(100).await?;
        // WHEN d1 finishes its job before the notice is acknowledged
        updated(&s, "d1", "job-a", update(DeviceStatus::Succeeded), T0 + 1).await?;
        s.ack_job_outbox(&out).await?;
        // THEN d1 is told again, now that nothing is pending, and the job completed
        let out = s.job_outbox(100).await?;
        let told: Vec<_> =
            out.notices.iter().map(|n| (n.thing.as_str(), n.next_changed, next_of(n))).collect();
        assert_eq!(told, [("d1", true, None)]);
        assert_eq!(out.execution_events.len(), 1);
        s.ack_job_outbox(&out).await?;
        let out = s.job_outbox(100).await?;
        let job: Vec<_> =
            out.job_events.iter().map(|j| (j.status, j.completed_at_ms, j.counts.succeeded)).collect();
        assert_eq!(job, [(JobStatus::Completed, Some(T0 + 1), 1)]);
        Ok(())
    }

    #[tokio::test]
    async fn the_outbox_hands_out_at_most_its_limit_and_the_rest_next_time() -> anyhow::Result<()> {
        let s = SqliteStore::in_memory()?;
        s.create_job_at(&new_job("job-a", &["d1", "d2", "d3"]), T0).await?;
        let first = s.job_outbox(2).await?;
        assert_eq!(first.notices.len(), 2);
        s.ack_job_outbox(&first).await?;
        let second = s.job_outbox(2).await?;
        assert_eq!(second.notices.iter().map(|n| n.thing.as_str()).collect::<Vec<_>>(), ["d3"]);
        Ok(())
    }
}
