//! The Jobs service of the local IoT Core: AWS IoT Jobs' device MQTT API over the jobs in the
//! local database, which OTA campaigns, functions and `fleetctl` create and cancel through
//! `JobsControl` (in this process or another one on the same file).
//!
//! A device publishes on `$aws/things/<t>/jobs/get` (`GetPendingJobExecutions`),
//! `…/jobs/start-next` (`StartNextPendingJobExecution`), `…/jobs/<jobId|$next>/get`
//! (`DescribeJobExecution`) and `…/jobs/<jobId>/update` (`UpdateJobExecution`); the service
//! answers on the request topic plus `/accepted` or `/rejected`, with AWS's payloads (times in
//! seconds, `clientToken` echoed, errors `{code, message, timestamp, clientToken,
//! executionState}` with AWS's codes). It tells a device on `…/jobs/notify-next` when its next
//! pending execution is another one and on `…/jobs/notify` when one joined or left its pending
//! list, and publishes `$aws/events/jobExecution/<jobId>/<status>` when an execution ends and
//! `$aws/events/job/<jobId>/completed|canceled`, in AWS's event format, to subscribers and to
//! the rules engine. Answers and notifications go to subscribers only (AWS's answers do not
//! pass through the broker: no rule sees them).
//!
//! What devices and rules must be told is recorded by the store with each change
//! ([`SqliteStore::job_outbox`]); this service publishes it after every request and on a
//! [`TICK`] that also runs the sweep (in-progress timeouts, rollout rates, jobs completing),
//! so jobs created or cancelled by another process reach devices within a second. It is
//! acknowledged once published, so a stop in between publishes it again (at least once).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use fleet_shared::adapters::embedded::{
    DeviceStatus, ExecutionEvent, ExecutionUpdate, JobEvent, JobExecution, JobOutbox, SqliteStore, StartNext,
    StatusDetails, UpdateRefused, LOCAL_ARN_PREFIX,
};
use fleet_shared::model::{JobId, JobStatus, ThingName, MAX_JOB_TIMEOUT_MINUTES};
use fleet_shared::StoreError;
use serde_json::{json, Map, Value};
use tracing::warn;

/// How often the service sweeps and tells devices and rules what changed out of band.
pub const TICK: Duration = Duration::from_secs(1);
/// What one read of the outbox takes at most of each kind.
const OUTBOX_BATCH: usize = 256;
/// Reads of the outbox one flush makes at most; the next request or tick goes on.
const OUTBOX_ROUNDS: usize = 64;
/// The most pending executions a `notify` message lists (AWS's `ListNotification`).
const NOTIFY_LIST_MAX: usize = 15;
/// `statusDetails` names: 1–128 characters of `[a-zA-Z0-9:_-]`; values: 1–1024 characters,
/// no control characters (AWS's `DetailsKey` and `DetailsValue`).
const MAX_DETAILS_KEY_LEN: usize = 128;
const MAX_DETAILS_VALUE_LEN: usize = 1024;
/// A `clientToken`: at most 64 characters (AWS's `ClientToken`).
const MAX_CLIENT_TOKEN_LEN: usize = 64;
/// `stepTimeoutInMinutes` of an update that cancels the step timer.
const CANCEL_STEP_TIMER: i64 = -1;
/// The job id that stands for the thing's next pending execution in `DescribeJobExecution`.
pub const NEXT: &str = "$next";

/// What a publish on a jobs topic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsRequest {
    /// The request topic: answers go to it plus `/accepted` or `/rejected`.
    pub topic: String,
    /// As written in the topic (checked when the request is served).
    pub thing: String,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `…/jobs/get`
    GetPending,
    /// `…/jobs/start-next`
    StartNext,
    /// `…/jobs/<jobId|$next>/get`
    Describe(String),
    /// `…/jobs/<jobId>/update`
    Update(String),
    /// Another topic under `…/jobs/` that is no answer either: `InvalidTopic`.
    Unknown,
}

/// The levels after `$aws/things/<t>/jobs/`, if `topic` is under it.
fn jobs_levels(topic: &str) -> Option<(&str, Vec<&str>)> {
    let mut levels = topic.split('/');
    let (Some("$aws"), Some("things"), Some(thing), Some("jobs")) =
        (levels.next(), levels.next(), levels.next(), levels.next())
    else {
        return None;
    };
    Some((thing, levels.collect()))
}

fn is_answer(rest: &[&str]) -> bool {
    matches!(
        rest,
        ["notify" | "notify-next"]
            | ["get" | "start-next", "accepted" | "rejected"]
            | [_, "get" | "update", "accepted" | "rejected"]
    )
}

/// A topic the Jobs service publishes on (`…/jobs/…/accepted|rejected`, `…/jobs/notify`,
/// `…/jobs/notify-next`): devices may subscribe to it, not publish on it.
pub fn is_answer_topic(topic: &str) -> bool {
    jobs_levels(topic).is_some_and(|(_, rest)| is_answer(&rest))
}

impl JobsRequest {
    /// A request on `$aws/things/<t>/jobs/…`; `None` for other topics and for the service's
    /// own answer topics.
    pub fn parse(topic: &str) -> Option<Self> {
        let (thing, rest) = jobs_levels(topic)?;
        if is_answer(&rest) {
            return None;
        }
        let op = match rest.as_slice() {
            ["get"] => Op::GetPending,
            ["start-next"] => Op::StartNext,
            [job, "get"] => Op::Describe((*job).to_owned()),
            [job, "update"] => Op::Update((*job).to_owned()),
            _ => Op::Unknown,
        };
        Some(Self { topic: topic.to_owned(), thing: thing.to_owned(), op })
    }
}

/// One message the service publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Also to the rules engine (events); otherwise to subscribers only (answers, notices).
    pub to_rules: bool,
}

/// Where the service's messages go: the broker.
pub trait Publish: Sync {
    /// Publish one message; `false` if it did not reach all it is for (the broker is stopping),
    /// so that it is published again later.
    fn publish(&self, message: Publication) -> impl Future<Output = bool> + Send;
}

/// Why a request is answered on `…/rejected`.
#[derive(Debug, Clone, PartialEq)]
struct Rejection {
    code: &'static str,
    message: String,
    /// The execution as it stands (`InvalidStateTransition`, `VersionMismatch`).
    state: Option<Box<JobExecution>>,
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection { code: "InvalidRequest", message: message.into(), state: None }
}

fn internal(e: &StoreError) -> Rejection {
    warn!(error = %e, "jobs store failed; request answered InternalError");
    Rejection { code: "InternalError", message: "The jobs store failed; try again".into(), state: None }
}

fn seconds(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

fn details_value(d: &StatusDetails) -> Value {
    Value::Object(d.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
}

/// `JobExecution` as the device API shows it.
fn execution(e: &JobExecution, thing_name: bool, document: bool) -> Value {
    let mut v = Map::new();
    v.insert("jobId".into(), json!(e.job_id.as_str()));
    if thing_name {
        v.insert("thingName".into(), json!(e.thing.as_str()));
    }
    v.insert("status".into(), json!(e.status.as_str()));
    if !e.status_details.is_empty() {
        v.insert("statusDetails".into(), details_value(&e.status_details));
    }
    v.insert("queuedAt".into(), json!(seconds(e.queued_at_ms)));
    if let Some(started) = e.started_at_ms {
        v.insert("startedAt".into(), json!(seconds(started)));
    }
    v.insert("lastUpdatedAt".into(), json!(seconds(e.last_updated_at_ms)));
    v.insert("versionNumber".into(), json!(e.version));
    v.insert("executionNumber".into(), json!(e.execution_number));
    if document {
        v.insert("jobDocument".into(), e.document.clone());
    }
    Value::Object(v)
}

/// `JobExecutionSummary`.
fn summary(e: &JobExecution) -> Value {
    let mut v = json!({
        "jobId": e.job_id.as_str(),
        "queuedAt": seconds(e.queued_at_ms),
        "lastUpdatedAt": seconds(e.last_updated_at_ms),
        "versionNumber": e.version,
        "executionNumber": e.execution_number,
    });
    if let Some(started) = e.started_at_ms {
        v["startedAt"] = json!(seconds(started));
    }
    v
}

/// `JobExecutionState`.
fn execution_state(e: &JobExecution) -> Value {
    let mut v = json!({"status": e.status.as_str(), "versionNumber": e.version});
    if !e.status_details.is_empty() {
        v["statusDetails"] = details_value(&e.status_details);
    }
    v
}

/// The request body: an object (an empty payload is `{}`).
fn body(payload: &[u8]) -> Result<Map<String, Value>, Rejection> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(payload) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("The request must be a JSON object")),
        Err(e) => Err(Rejection {
            code: "InvalidJson",
            message: format!("The request could not be read as UTF-8 JSON: {e}"),
            state: None,
        }),
    }
}

fn client_token(m: &Map<String, Value>) -> Result<Option<Value>, Rejection> {
    match m.get("clientToken") {
        None | Some(Value::Null) => Ok(None),
        Some(t @ Value::String(s)) if s.chars().count() <= MAX_CLIENT_TOKEN_LEN => Ok(Some(t.clone())),
        Some(Value::String(_)) => {
            Err(invalid(format!("clientToken must be at most {MAX_CLIENT_TOKEN_LEN} characters")))
        }
        Some(_) => Err(invalid("clientToken must be a string")),
    }
}

fn flag(m: &Map<String, Value>, name: &str, default: bool) -> Result<bool, Rejection> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(format!("{name} must be true or false"))),
    }
}

/// A non-negative whole number, as a JSON number or a string of digits (AWS's embedded SDK
/// sends `expectedVersion` as a string).
fn number(m: &Map<String, Value>, name: &str) -> Result<Option<u64>, Rejection> {
    let bad = || invalid(format!("{name} must be a non-negative whole number"));
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(bad),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map(Some).map_err(|_| bad())
        }
        Some(_) => Err(bad()),
    }
}

/// `stepTimeoutInMinutes` of `StartNextPendingJobExecution`: 1–10080 minutes.
fn step_timeout(m: &Map<String, Value>) -> Result<Option<u32>, Rejection> {
    let minutes = number(m, "stepTimeoutInMinutes")?;
    match minutes.map(u32::try_from) {
        None => Ok(None),
        Some(Ok(t)) if (1..=MAX_JOB_TIMEOUT_MINUTES).contains(&t) => Ok(Some(t)),
        Some(_) => Err(invalid(format!("stepTimeoutInMinutes must be 1-{MAX_JOB_TIMEOUT_MINUTES}"))),
    }
}

/// `stepTimeoutInMinutes` of `UpdateJobExecution`: as [`step_timeout`] (`Some(Some(t))`), or -1,
/// which cancels the current step timer (`Some(None)`).
fn update_step_timeout(m: &Map<String, Value>) -> Result<Option<Option<u32>>, Rejection> {
    if m.get("stepTimeoutInMinutes").and_then(Value::as_i64) == Some(CANCEL_STEP_TIMER) {
        return Ok(Some(None));
    }
    step_timeout(m).map(|t| t.map(Some)).map_err(|_| {
        invalid(format!(
            "stepTimeoutInMinutes must be 1-{MAX_JOB_TIMEOUT_MINUTES}, or {CANCEL_STEP_TIMER} to cancel the step timer"
        ))
    })
}

fn status_details(m: &Map<String, Value>) -> Result<Option<StatusDetails>, Rejection> {
    let details = match m.get("statusDetails") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(d)) => d,
        Some(_) => return Err(invalid("statusDetails must be an object of strings")),
    };
    let mut out = StatusDetails::new();
    for (k, v) in details {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_DETAILS_KEY_LEN
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
        if !key_ok {
            return Err(invalid(format!(
                "statusDetails name {k:?}: expected 1-{MAX_DETAILS_KEY_LEN} characters of [a-zA-Z0-9:_-]"
            )));
        }
        let Value::String(v) = v else {
            return Err(invalid(format!("statusDetails.{k} must be a string")));
        };
        let count = v.chars().count();
        if count == 0 || count > MAX_DETAILS_VALUE_LEN || v.chars().any(char::is_control) {
            return Err(invalid(format!(
                "statusDetails.{k}: expected 1-{MAX_DETAILS_VALUE_LEN} characters, no control characters"
            )));
        }
        out.insert(k.clone(), v.clone());
    }
    Ok(Some(out))
}

fn job_id(raw: &str) -> Result<JobId, Rejection> {
    JobId::parse(raw).map_err(|e| invalid(e.to_string()))
}

fn not_found(thing: &ThingName, job: &str) -> Rejection {
    Rejection {
        code: "ResourceNotFound",
        message: format!("No job execution of job {job} for thing {thing}"),
        state: None,
    }
}

/// The Jobs service.
pub struct Jobs {
    store: SqliteStore,
    /// One flush at a time, so nothing is published twice by two flushes at once.
    flushing: tokio::sync::Mutex<()>,
}

impl Jobs {
    pub fn new(store: SqliteStore) -> Self {
        Self { store, flushing: tokio::sync::Mutex::new(()) }
    }

    /// Serve one request: its answer, then whatever it changed for devices and rules.
    pub async fn serve(&self, request: &JobsRequest, payload: &[u8], now_ms: i64, out: &impl Publish) {
        // An answer goes to subscribers only: it is always delivered.
        out.publish(self.answer(request, payload, now_ms).await).await;
        self.flush_logged(now_ms, out).await;
    }

    /// The sweep (timeouts, rollouts, jobs completing), then everything not yet told.
    pub async fn tick(&self, now_ms: i64, out: &impl Publish) {
        if let Err(e) = self.store.sweep_jobs(now_ms).await {
            warn!(error = %e, "jobs sweep failed; retried next tick");
        }
        self.flush_logged(now_ms, out).await;
    }

    async fn flush_logged(&self, now_ms: i64, out: &impl Publish) {
        if let Err(e) = self.flush(now_ms, out).await {
            warn!(error = %e, "jobs notifications not published; retried next tick");
        }
    }

    /// Publish what devices and rules have not been told, and record it as told; how many
    /// messages were published. What did not reach all it is for stays to be told (again).
    pub async fn flush(&self, now_ms: i64, out: &impl Publish) -> Result<usize, StoreError> {
        let _one = self.flushing.lock().await;
        let mut published = 0;
        for _ in 0..OUTBOX_ROUNDS {
            let outbox = self.store.job_outbox(OUTBOX_BATCH).await?;
            if outbox.is_empty() {
                break;
            }
            let mut delivered = true;
            for message in publications(&outbox, now_ms) {
                delivered &= out.publish(message).await;
                published += 1;
            }
            if !delivered {
                warn!(
                    "jobs events not taken by the stopping rules engine: published again at the next start"
                );
                break;
            }
            self.store.ack_job_outbox(&outbox).await?;
        }
        Ok(published)
    }

    /// The answer to one request (`…/accepted` or `…/rejected`); never fails.
    pub async fn answer(&self, request: &JobsRequest, payload: &[u8], now_ms: i64) -> Publication {
        let now_s = seconds(now_ms);
        let parsed = body(payload).and_then(|m| Ok((client_token(&m)?, m)));
        let (token, result) = match parsed {
            Ok((token, m)) => (token, self.respond(request, &m, now_ms).await),
            Err(r) => (None, Err(r)),
        };
        let (suffix, mut v) = match result {
            Ok(accepted) => ("accepted", Value::Object(accepted)),
            Err(r) => {
                let mut v = json!({"code": r.code, "message": r.message});
                if let Some(state) = &r.state {
                    v["executionState"] = execution_state(state);
                }
                ("rejected", v)
            }
        };
        v["timestamp"] = json!(now_s);
        if let Some(t) = token {
            v["clientToken"] = t;
        }
        Publication {
            topic: format!("{}/{suffix}", request.topic),
            payload: v.to_string().into_bytes(),
            to_rules: false,
        }
    }

    async fn respond(
        &self,
        request: &JobsRequest,
        m: &Map<String, Value>,
        now_ms: i64,
    ) -> Result<Map<String, Value>, Rejection> {
        if request.op == Op::Unknown {
            return Err(Rejection {
                code: "InvalidTopic",
                message: format!("{} is no operation of the Jobs API", request.topic),
                state: None,
            });
        }
        let thing = ThingName::parse(&request.thing).map_err(|e| invalid(e.to_string()))?;
        let mut out = Map::new();
        match &request.op {
            Op::Unknown => {}
            Op::GetPending => {
                let pending = self.store.pending_job_executions(&thing).await.map_err(|e| internal(&e))?;
                let (running, queued): (Vec<_>, Vec<_>) = pending
                    .iter()
                    .partition(|e| e.status == fleet_shared::model::ExecutionStatus::InProgress);
                out.insert("inProgressJobs".into(), running.into_iter().map(summary).collect());
                out.insert("queuedJobs".into(), queued.into_iter().map(summary).collect());
            }
            Op::StartNext => {
                let start =
                    StartNext { status_details: status_details(m)?, step_timeout_minutes: step_timeout(m)? };
                let started = self
                    .store
                    .start_next_job_execution(&thing, &start, now_ms)
                    .await
                    .map_err(|e| internal(&e))?;
                if let Some(e) = started {
                    out.insert("execution".into(), execution(&e, true, true));
                }
            }
            Op::Describe(job) => {
                let document = flag(m, "includeJobDocument", true)?;
                let execution_number = number(m, "executionNumber")?;
                let found = if job == NEXT {
                    let pending =
                        self.store.pending_job_executions(&thing).await.map_err(|e| internal(&e))?;
                    pending.into_iter().next()
                } else {
                    let id = job_id(job)?;
                    let found = self
                        .store
                        .describe_job_execution(&thing, &id, execution_number)
                        .await
                        .map_err(|e| internal(&e))?;
                    Some(found.ok_or_else(|| not_found(&thing, job))?)
                };
                if let Some(e) = found {
                    out.insert("execution".into(), execution(&e, true, document));
                }
            }
            Op::Update(job) => {
                if job == NEXT {
                    return Err(invalid("$next cannot be updated: name the job"));
                }
                let id = job_id(job)?;
                let status = match m.get("status") {
                    None | Some(Value::Null) => return Err(invalid("status is required")),
                    Some(Value::String(s)) => DeviceStatus::parse(s).ok_or_else(|| {
                        invalid(format!(
                            "status {s:?}: a device may set IN_PROGRESS, SUCCEEDED, FAILED or REJECTED"
                        ))
                    })?,
                    Some(_) => return Err(invalid("status must be a string")),
                };
                let update = ExecutionUpdate {
                    status,
                    status_details: status_details(m)?,
                    expected_version: number(m, "expectedVersion")?,
                    execution_number: number(m, "executionNumber")?,
                    step_timeout_minutes: update_step_timeout(m)?,
                };
                let (state, document) =
                    (flag(m, "includeJobExecutionState", false)?, flag(m, "includeJobDocument", false)?);
                let updated = self
                    .store
                    .update_job_execution(&thing, &id, &update, now_ms)
                    .await
                    .map_err(|e| internal(&e))?;
                let e = match updated {
                    Ok(e) => e,
                    Err(UpdateRefused::NotFound) => return Err(not_found(&thing, job)),
                    Err(UpdateRefused::InvalidStateTransition(current)) => {
                        return Err(Rejection {
                            code: "InvalidStateTransition",
                            message: format!(
                                "Job execution of {job} for {thing} is {}: no further update is accepted",
                                current.status
                            ),
                            state: Some(Box::new(current)),
                        })
                    }
                    Err(UpdateRefused::VersionMismatch(current)) => {
                        return Err(Rejection {
                            code: "VersionMismatch",
                            message: format!(
                                "expectedVersion {} is not the job execution's version {}",
                                update.expected_version.unwrap_or_default(),
                                current.version
                            ),
                            state: Some(Box::new(current)),
                        })
                    }
                };
                if state {
                    out.insert("executionState".into(), execution_state(&e));
                }
                if document {
                    out.insert("jobDocument".into(), e.document.clone());
                }
            }
        }
        Ok(out)
    }
}

/// `$aws/things/<t>/jobs/<name>` (notify, notify-next).
fn thing_topic(thing: &ThingName, name: &str) -> String {
    format!("$aws/things/{thing}/jobs/{name}")
}

/// What the outbox tells, in order: per thing `notify` then `notify-next`, then executions'
/// events, then jobs' events.
fn publications(outbox: &JobOutbox, now_ms: i64) -> Vec<Publication> {
    let now_s = seconds(now_ms);
    let mut out = Vec::new();
    let subscribers =
        |topic: String, v: Value| Publication { topic, payload: v.to_string().into_bytes(), to_rules: false };
    for n in &outbox.notices {
        if n.pending_changed {
            let mut jobs = Map::new();
            let listed = &n.pending[..n.pending.len().min(NOTIFY_LIST_MAX)];
            for e in listed {
                let list = jobs.entry(e.status.as_str()).or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(a) = list {
                    a.push(summary(e));
                }
            }
            out.push(subscribers(thing_topic(&n.thing, "notify"), json!({"timestamp": now_s, "jobs": jobs})));
        }
        if n.next_changed {
            let mut v = json!({"timestamp": now_s});
            if let Some(e) = &n.next {
                v["execution"] = execution(e, false, true);
            }
            out.push(subscribers(thing_topic(&n.thing, "notify-next"), v));
        }
    }
    out.extend(outbox.execution_events.iter().map(execution_event));
    out.extend(outbox.job_events.iter().map(job_event));
    out
}

fn thing_arn(thing: &ThingName) -> String {
    format!("{LOCAL_ARN_PREFIX}:thing/{thing}")
}

/// `$aws/events/jobExecution/<jobId>/<status>`, in AWS's event format.
fn execution_event(e: &ExecutionEvent) -> Publication {
    let operation = e.status.as_str().to_ascii_lowercase();
    let mut v = json!({
        "eventType": "JOB_EXECUTION",
        "eventId": event_id(),
        "timestamp": seconds(e.at_ms),
        "operation": operation,
        "jobId": e.job_id.as_str(),
        "thingArn": thing_arn(&e.thing),
        "status": e.status.as_str(),
    });
    if !e.status_details.is_empty() {
        v["statusDetails"] = details_value(&e.status_details);
    }
    Publication {
        topic: format!("$aws/events/jobExecution/{}/{operation}", e.job_id),
        payload: v.to_string().into_bytes(),
        to_rules: true,
    }
}

/// `$aws/events/job/<jobId>/completed|canceled`, in AWS's event format.
fn job_event(j: &JobEvent) -> Publication {
    // The store makes an event due only when a job completes or is cancelled.
    let (operation, status) = match j.status {
        JobStatus::Completed => ("completed", "COMPLETED"),
        JobStatus::Canceled => ("canceled", "CANCELED"),
        JobStatus::InProgress => ("in_progress", "IN_PROGRESS"),
    };
    let mut v = json!({
        "eventType": "JOB",
        "eventId": event_id(),
        "timestamp": seconds(j.last_updated_at_ms),
        "operation": operation,
        "jobId": j.job_id.as_str(),
        "status": status,
        "targetSelection": "SNAPSHOT",
        "targets": j.targets.iter().map(thing_arn).collect::<Vec<_>>(),
        "createdAt": j.created_at_ms,
        "lastUpdatedAt": j.last_updated_at_ms,
    });
    if !j.description.is_empty() {
        v["description"] = json!(j.description);
    }
    if let Some(at) = j.completed_at_ms {
        v["completedAt"] = json!(at);
    }
    if j.status == JobStatus::Completed {
        let c = &j.counts;
        v["jobProcessDetails"] = json!({
            "numberOfCanceledThings": c.canceled,
            "numberOfRejectedThings": c.rejected,
            "numberOfFailedThings": c.failed,
            "numberOfRemovedThings": c.removed,
            "numberOfSucceededThings": c.succeeded,
            "numberOfTimedOutThings": c.timed_out,
        });
    }
    Publication {
        topic: format!("$aws/events/job/{}/{operation}", j.job_id),
        payload: v.to_string().into_bytes(),
        to_rules: true,
    }
}

/// A random (version 4) UUID, as AWS's `eventId`; a counter-based one if the system has no
/// randomness to give.
fn event_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        let n = COUNTER.fetch_add(1, Relaxed);
        b[..8].copy_from_slice(&fleet_shared::time::now_ms().to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_shared::model::NewJob;
    use std::sync::Mutex;

    const T0: i64 = 1_764_000_000_000;

    /// Everything published, in order.
    #[derive(Default)]
    struct Sent(Mutex<Vec<Publication>>);

    impl Publish for Sent {
        async fn publish(&self, message: Publication) -> bool {
            self.0.lock().expect("lock").push(message);
            true
        }
    }

    impl Sent {
        /// Topic and JSON of everything published since the last call.
        fn take(&self) -> Vec<(String, Value, bool)> {
            std::mem::take(&mut *self.0.lock().expect("lock"))
                .into_iter()
                .map(|p| (p.topic, serde_json::from_slice(&p.payload).expect("JSON"), p.to_rules))
                .collect()
        }
    }

    fn new_job(id: &str, targets: &[&str]) -> anyhow::Result<NewJob> {
        Ok(NewJob {
            job_id: JobId::parse(id)?,
            targets: targets.iter().map(|t| ThingName::parse(t)).collect::<Result<_, _>>()?,
            document: json!({"operation": "install", "fw": "2.1.0"}),
            description: "firmware 2.1.0".into(),
            max_per_minute: None,
            in_progress_timeout_minutes: None,
        })
    }

    fn req(topic: &str) -> JobsRequest {
        JobsRequest::parse(topic).expect("a jobs request")
    }

    async fn ask(jobs: &Jobs, topic: &str, body: Value, now_ms: i64) -> (String, Value) {
        let p = jobs.answer(&req(topic), body.to_string().as_bytes(), now_ms).await;
        assert!(!p.to_rules, "answers reach no rule");
        (p.topic, serde_json::from_slice(&p.payload).expect("JSON"))
    }

    fn topics(sent: &[(String, Value, bool)]) -> Vec<&str> {
        sent.iter().map(|(t, _, _)| t.as_str()).collect()
    }

    #[test]
    fn parses_request_topics_and_tells_answers_apart() {
        let op = |t: &str| JobsRequest::parse(t).map(|r| (r.thing, r.op));
        assert_eq!(op("$aws/things/d1/jobs/get"), Some(("d1".into(), Op::GetPending)));
        assert_eq!(op("$aws/things/d1/jobs/start-next"), Some(("d1".into(), Op::StartNext)));
        assert_eq!(op("$aws/things/d1/jobs/$next/get"), Some(("d1".into(), Op::Describe("$next".into()))));
        assert_eq!(op("$aws/things/d1/jobs/fw-1/get"), Some(("d1".into(), Op::Describe("fw-1".into()))));
        assert_eq!(op("$aws/things/d1/jobs/fw-1/update"), Some(("d1".into(), Op::Update("fw-1".into()))));
        assert_eq!(op("$aws/things/d1/jobs/fw-1/delete"), Some(("d1".into(), Op::Unknown)));
        assert_eq!(op("$aws/things/d1/jobs"), Some(("d1".into(), Op::Unknown)));
        for answer in [
            "$aws/things/d1/jobs/get/accepted",
            "$aws/things/d1/jobs/start-next/rejected",
            "$aws/things/d1/jobs/fw-1/get/accepted",
            "$aws/things/d1/jobs/$next/get/rejected",
            "$aws/things/d1/jobs/fw-1/update/accepted",
            "$aws/things/d1/jobs/notify",
            "$aws/things/d1/jobs/notify-next",
        ] {
            assert!(is_answer_topic(answer), "{answer}");
            assert_eq!(JobsRequest::parse(answer), None, "{answer} is no request");
        }
        for other in ["$aws/things/d1/shadow/update", "dt/fleet/d1/telemetry", "$aws/things/d1/jobs/get"] {
            assert!(!is_answer_topic(other), "{other}");
        }
        assert_eq!(JobsRequest::parse("$aws/things/d1/shadow/get"), None);
    }

    #[tokio::test]
    async fn a_device_is_told_of_its_job_starts_it_and_reports_success_once() -> anyhow::Result<()> {
        // GIVEN a job for d1 and d2, created out of band
        let store = SqliteStore::in_memory()?;
        store.create_job_at(&new_job("fw-2-1-0", &["d1", "d2"])?, T0).await?;
        let (jobs, sent) = (Jobs::new(store.clone()), Sent::default());
        // WHEN the service ticks
        jobs.tick(T0 + 1_000, &sent).await;
        // THEN each device is told its list and its next execution, with the document
        let told = sent.take();
        assert_eq!(
            topics(&told),
            [
                "$aws/things/d1/jobs/notify",
                "$aws/things/d1/jobs/notify-next",
                "$aws/things/d2/jobs/notify",
                "$aws/things/d2/jobs/notify-next"
            ]
        );
        assert_eq!(
            told[0].1,
            json!({"timestamp": 1_764_000_001, "jobs": {"QUEUED": [{"jobId": "fw-2-1-0",
                "queuedAt": 1_764_000_000, "lastUpdatedAt": 1_764_000_000, "versionNumber": 1,
                "executionNumber": 1}]}})
        );
        assert_eq!(
            told[1].1,
            json!({"timestamp": 1_764_000_001, "execution": {"jobId": "fw-2-1-0", "status": "QUEUED",
                "queuedAt": 1_764_000_000, "lastUpdatedAt": 1_764_000_000, "versionNumber": 1,
                "executionNumber": 1, "jobDocument": {"operation": "install", "fw": "2.1.0"}}})
        );
        assert!(told.iter().all(|(_, _, rules)| !rules), "notices reach no rule");
        // AND a second tick tells nothing again
        jobs.tick(T0 + 2_000, &sent).await;
        assert!(sent.take().is_empty());

        // WHEN d1 starts its next execution
        let start = json!({"clientToken": "s1", "statusDetails": {"step": "download"}});
        let (topic, answer) = ask(&jobs, "$aws/things/d1/jobs/start-next", start, T0 + 3_000).await;
        // THEN it is in progress, with its document, details and version 2
        assert_eq!(topic, "$aws/things/d1/jobs/start-next/accepted");
        assert_eq!(
            answer,
            json!({"clientToken": "s1", "timestamp": 1_764_000_003, "execution": {"jobId": "fw-2-1-0",
                "thingName": "d1", "status": "IN_PROGRESS", "statusDetails": {"step": "download"},
                "queuedAt": 1_764_000_000, "startedAt": 1_764_000_003, "lastUpdatedAt": 1_764_000_003,
                "versionNumber": 2, "executionNumber": 1,
                "jobDocument": {"operation": "install", "fw": "2.1.0"}}})
        );

        // WHEN it reports success (expectedVersion as the embedded SDK sends it, a string)
        let done = json!({"status": "SUCCEEDED", "expectedVersion": "2", "statusDetails": {"fw": "2.1.0"},
                          "includeJobExecutionState": true, "clientToken": "u1"});
        jobs.serve(
            &req("$aws/things/d1/jobs/fw-2-1-0/update"),
            done.to_string().as_bytes(),
            T0 + 4_000,
            &sent,
        )
        .await;
        let told = sent.take();
        // THEN the update is accepted, d1 has nothing left, and the success is an event for rules
        assert_eq!(
            topics(&told),
            [
                "$aws/things/d1/jobs/fw-2-1-0/update/accepted",
                "$aws/things/d1/jobs/notify",
                "$aws/things/d1/jobs/notify-next",
                "$aws/events/jobExecution/fw-2-1-0/succeeded"
            ]
        );
        assert_eq!(
            told[0].1,
            json!({"clientToken": "u1", "timestamp": 1_764_000_004, "executionState": {"status": "SUCCEEDED",
                "versionNumber": 3, "statusDetails": {"step": "download", "fw": "2.1.0"}}})
        );
        assert_eq!(told[1].1, json!({"timestamp": 1_764_000_004, "jobs": {}}));
        assert_eq!(told[2].1, json!({"timestamp": 1_764_000_004}));
        let (_, event, to_rules) = &told[3];
        assert!(to_rules);
        assert_eq!(
            (
                &event["eventType"],
                &event["operation"],
                &event["status"],
                &event["jobId"],
                &event["timestamp"]
            ),
            (
                &json!("JOB_EXECUTION"),
                &json!("succeeded"),
                &json!("SUCCEEDED"),
                &json!("fw-2-1-0"),
                &json!(1_764_000_004)
            )
        );
        assert_eq!(event["thingArn"], json!(format!("{LOCAL_ARN_PREFIX}:thing/d1")));
        assert_eq!(event["statusDetails"], json!({"step": "download", "fw": "2.1.0"}));
        assert_eq!(event["eventId"].as_str().map(str::len), Some(36));

        // WHEN it reports success again
        let again = json!({"status": "SUCCEEDED", "clientToken": "u2"});
        let (topic, answer) = ask(&jobs, "$aws/things/d1/jobs/fw-2-1-0/update", again, T0 + 5_000).await;
        // THEN it is refused as an invalid state transition, with the execution as it stands
        assert_eq!(topic, "$aws/things/d1/jobs/fw-2-1-0/update/rejected");
        assert_eq!(
            (&answer["code"], &answer["clientToken"]),
            (&json!("InvalidStateTransition"), &json!("u2"))
        );
        assert_eq!(answer["executionState"]["status"], "SUCCEEDED");
        assert_eq!(answer["executionState"]["versionNumber"], 3);

        // WHEN d2 fails, the last execution to finish
        let failed = json!({"status": "FAILED"});
        jobs.serve(
            &req("$aws/things/d2/jobs/fw-2-1-0/update"),
            failed.to_string().as_bytes(),
            T0 + 6_000,
            &sent,
        )
        .await;
        // THEN the job completed, announced after its last execution's event, with its counts
        let told = sent.take();
        assert_eq!(
            topics(&told),
            [
                "$aws/things/d2/jobs/fw-2-1-0/update/accepted",
                "$aws/things/d2/jobs/notify",
                "$aws/things/d2/jobs/notify-next",
                "$aws/events/jobExecution/fw-2-1-0/failed",
                "$aws/events/job/fw-2-1-0/completed"
            ]
        );
        let job = &told[4].1;
        assert_eq!(
            (&job["eventType"], &job["status"], &job["completedAt"]),
            (&json!("JOB"), &json!("COMPLETED"), &json!(T0 + 6_000))
        );
        assert_eq!(job["jobProcessDetails"]["numberOfSucceededThings"], 1);
        assert_eq!(job["jobProcessDetails"]["numberOfFailedThings"], 1);
        assert_eq!(
            job["targets"],
            json!([format!("{LOCAL_ARN_PREFIX}:thing/d1"), format!("{LOCAL_ARN_PREFIX}:thing/d2")])
        );
        Ok(())
    }

    #[tokio::test]
    async fn pending_lists_describe_and_version_checks_answer_as_aws_does() -> anyhow::Result<()> {
        // GIVEN two jobs for d1, the first started
        let store = SqliteStore::in_memory()?;
        store.create_job_at(&new_job("job-a", &["d1"])?, T0).await?;
        store.create_job_at(&new_job("job-b", &["d1"])?, T0 + 1_000).await?;
        let jobs = Jobs::new(store);
        ask(&jobs, "$aws/things/d1/jobs/start-next", json!({}), T0 + 2_000).await;
        // THEN the pending list has one in progress and one queued, as summaries
        let (topic, list) =
            ask(&jobs, "$aws/things/d1/jobs/get", json!({"clientToken": "g"}), T0 + 3_000).await;
        assert_eq!(topic, "$aws/things/d1/jobs/get/accepted");
        assert_eq!(
            list,
            json!({"clientToken": "g", "timestamp": 1_764_000_003,
                "inProgressJobs": [{"jobId": "job-a", "queuedAt": 1_764_000_000, "startedAt": 1_764_000_002,
                    "lastUpdatedAt": 1_764_000_002, "versionNumber": 2, "executionNumber": 1}],
                "queuedJobs": [{"jobId": "job-b", "queuedAt": 1_764_000_001, "lastUpdatedAt": 1_764_000_001,
                    "versionNumber": 1, "executionNumber": 1}]})
        );
        // AND $next is the one in progress; a named one comes without its document if asked
        let (topic, next) = ask(&jobs, "$aws/things/d1/jobs/$next/get", json!({}), T0).await;
        assert_eq!(
            (topic.as_str(), &next["execution"]["jobId"]),
            ("$aws/things/d1/jobs/$next/get/accepted", &json!("job-a"))
        );
        let (_, b) =
            ask(&jobs, "$aws/things/d1/jobs/job-b/get", json!({"includeJobDocument": false}), T0).await;
        assert_eq!((&b["execution"]["status"], b["execution"].get("jobDocument")), (&json!("QUEUED"), None));
        // AND nothing next for another thing is an answer without execution; a missing one is not found
        let (topic, none) = ask(&jobs, "$aws/things/d2/jobs/$next/get", json!({}), T0).await;
        assert_eq!(
            (topic.as_str(), none),
            ("$aws/things/d2/jobs/$next/get/accepted", json!({"timestamp": 1_764_000_000}))
        );
        let (topic, none) = ask(&jobs, "$aws/things/d2/jobs/start-next", json!({}), T0).await;
        assert_eq!(
            (topic.as_str(), none),
            ("$aws/things/d2/jobs/start-next/accepted", json!({"timestamp": 1_764_000_000}))
        );
        let (topic, missing) = ask(&jobs, "$aws/things/d2/jobs/job-a/get", json!({}), T0).await;
        assert_eq!(
            (topic.as_str(), &missing["code"]),
            ("$aws/things/d2/jobs/job-a/get/rejected", &json!("ResourceNotFound"))
        );
        let (_, missing) =
            ask(&jobs, "$aws/things/d2/jobs/job-a/update", json!({"status": "SUCCEEDED"}), T0).await;
        assert_eq!(missing["code"], "ResourceNotFound");
        // AND an update expecting another version is refused with the execution as it stands
        let stale = json!({"status": "SUCCEEDED", "expectedVersion": 1});
        let (topic, refused) = ask(&jobs, "$aws/things/d1/jobs/job-a/update", stale, T0 + 4_000).await;
        assert_eq!(topic, "$aws/things/d1/jobs/job-a/update/rejected");
        assert_eq!(refused["code"], "VersionMismatch");
        assert_eq!(refused["executionState"], json!({"status": "IN_PROGRESS", "versionNumber": 2}));
        // AND the right version applies; the answer carries only what was asked for
        let (_, ok) = ask(
            &jobs,
            "$aws/things/d1/jobs/job-a/update",
            json!({"status": "IN_PROGRESS", "expectedVersion": 2,
            "includeJobDocument": true}),
            T0 + 5_000,
        )
        .await;
        assert_eq!(
            ok,
            json!({"timestamp": 1_764_000_005, "jobDocument": {"operation": "install", "fw": "2.1.0"}})
        );
        Ok(())
    }

    #[tokio::test]
    async fn malformed_requests_are_rejected_with_a_reason() -> anyhow::Result<()> {
        let store = SqliteStore::in_memory()?;
        store.create_job_at(&new_job("job-a", &["d1"])?, T0).await?;
        let jobs = Jobs::new(store);
        let update = "$aws/things/d1/jobs/job-a/update";
        let long_token = json!({"status": "FAILED", "clientToken": "t".repeat(65)}).to_string();
        let cases: Vec<(&str, &[u8], &str)> = vec![
            (update, long_token.as_bytes(), "InvalidRequest"),
            (update, b"{not json", "InvalidJson"),
            (update, b"\xff\xfe", "InvalidJson"),
            (update, b"[1, 2]", "InvalidRequest"),
            (update, br#"{"status": "SUCCEEDED", "clientToken": 7}"#, "InvalidRequest"),
            (update, br#"{}"#, "InvalidRequest"),
            (update, br#"{"status": 1}"#, "InvalidRequest"),
            (update, br#"{"status": "TIMED_OUT"}"#, "InvalidRequest"),
            (update, br#"{"status": "DONE"}"#, "InvalidRequest"),
            (update, br#"{"status": "FAILED", "statusDetails": {"code": 3}}"#, "InvalidRequest"),
            (update, br#"{"status": "FAILED", "statusDetails": {"a b": "x"}}"#, "InvalidRequest"),
            (update, br#"{"status": "FAILED", "statusDetails": {"why": ""}}"#, "InvalidRequest"),
            (update, br#"{"status": "FAILED", "statusDetails": {"why": "a\nb"}}"#, "InvalidRequest"),
            (update, br#"{"status": "FAILED", "statusDetails": ["why"]}"#, "InvalidRequest"),
            (update, br#"{"status": "FAILED", "expectedVersion": -1}"#, "InvalidRequest"),
            (update, br#"{"status": "FAILED", "expectedVersion": "v1"}"#, "InvalidRequest"),
            (update, br#"{"status": "FAILED", "expectedVersion": 1.5}"#, "InvalidRequest"),
            (update, br#"{"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0}"#, "InvalidRequest"),
            (update, br#"{"status": "IN_PROGRESS", "stepTimeoutInMinutes": 10081}"#, "InvalidRequest"),
            (update, br#"{"status": "IN_PROGRESS", "stepTimeoutInMinutes": -2}"#, "InvalidRequest"),
            ("$aws/things/d1/jobs/start-next", br#"{"stepTimeoutInMinutes": -1}"#, "InvalidRequest"),
            (update, br#"{"status": "FAILED", "includeJobDocument": "yes"}"#, "InvalidRequest"),
            ("$aws/things/d1/jobs/$next/update", br#"{"status": "FAILED"}"#, "InvalidRequest"),
            ("$aws/things/d1/jobs/job.a/get", b"", "InvalidRequest"),
            ("$aws/things/d*1/jobs/get", b"", "InvalidRequest"),
            ("$aws/things/d1/jobs/job-a/cancel", b"", "InvalidTopic"),
            ("$aws/things/d1/jobs/start-next", br#"{"stepTimeoutInMinutes": "soon"}"#, "InvalidRequest"),
        ];
        for (topic, payload, code) in cases {
            let p = jobs.answer(&req(topic), payload, T0).await;
            let answer: Value = serde_json::from_slice(&p.payload)?;
            assert_eq!(p.topic, format!("{topic}/rejected"), "{}", String::from_utf8_lossy(payload));
            assert_eq!(answer["code"], code, "{}: {answer}", String::from_utf8_lossy(payload));
            assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
            assert_eq!(answer["timestamp"], 1_764_000_000);
        }
        // AND none of them changed the execution; a rejected request still echoes its token
        let (_, a) = ask(&jobs, update, json!({"status": "DONE", "clientToken": "t"}), T0).await;
        assert_eq!(a["clientToken"], "t");
        let (_, d) = ask(&jobs, "$aws/things/d1/jobs/job-a/get", json!({}), T0).await;
        assert_eq!(
            (&d["execution"]["status"], &d["execution"]["versionNumber"]),
            (&json!("QUEUED"), &json!(1))
        );
        Ok(())
    }

    #[tokio::test]
    async fn an_update_with_a_step_timeout_of_minus_one_cancels_the_step_timer() -> anyhow::Result<()> {
        // GIVEN d1 and d2 in progress on a job, each with a one-minute step timer
        let store = SqliteStore::in_memory()?;
        store.create_job_at(&new_job("job-a", &["d1", "d2"])?, T0).await?;
        let (jobs, sent) = (Jobs::new(store.clone()), Sent::default());
        for thing in ["d1", "d2"] {
            let start = json!({"stepTimeoutInMinutes": 1});
            let (topic, _) = ask(&jobs, &format!("$aws/things/{thing}/jobs/start-next"), start, T0).await;
            assert_eq!(topic, format!("$aws/things/{thing}/jobs/start-next/accepted"));
        }
        // WHEN d1 cancels its step timer, with a token of 64 characters (128 bytes)
        let token = "é".repeat(64);
        let cancel = json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": -1, "clientToken": token});
        let (topic, answer) = ask(&jobs, "$aws/things/d1/jobs/job-a/update", cancel, T0 + 1_000).await;
        // THEN the update is accepted, its token echoed
        assert_eq!(topic, "$aws/things/d1/jobs/job-a/update/accepted", "{answer}");
        assert_eq!(answer["clientToken"], json!(token));
        // AND when the minute has passed, only d2 timed out
        jobs.tick(T0 + 60_000, &sent).await;
        let timed_out: Vec<String> = sent.take().into_iter().filter(|m| m.2).map(|m| m.0).collect();
        assert_eq!(timed_out, ["$aws/events/jobExecution/job-a/timed_out"]);
        let (_, d1) = ask(&jobs, "$aws/things/d1/jobs/job-a/get", json!({}), T0 + 60_000).await;
        let (_, d2) = ask(&jobs, "$aws/things/d2/jobs/job-a/get", json!({}), T0 + 60_000).await;
        assert_eq!(
            (&d1["execution"]["status"], &d2["execution"]["status"]),
            (&json!("IN_PROGRESS"), &json!("TIMED_OUT"))
        );
        Ok(())
    }

    /// A broker whose rules engine has stopped taking messages.
    struct Stopping(Sent);

    impl Publish for Stopping {
        async fn publish(&self, message: Publication) -> bool {
            let to_rules = message.to_rules;
            self.0.publish(message).await;
            !to_rules
        }
    }

    #[tokio::test]
    async fn an_event_the_rules_engine_could_not_take_is_published_again() -> anyhow::Result<()> {
        // GIVEN a job whose only execution succeeded while the rules engine was stopping
        let store = SqliteStore::in_memory()?;
        store.create_job_at(&new_job("job-a", &["d1"])?, T0).await?;
        let jobs = Jobs::new(store.clone());
        let stopping = Stopping(Sent::default());
        let done = json!({"status": "SUCCEEDED"}).to_string();
        jobs.serve(&req("$aws/things/d1/jobs/job-a/update"), done.as_bytes(), T0 + 1_000, &stopping).await;
        let first: Vec<String> = stopping.0.take().into_iter().filter(|m| m.2).map(|m| m.0).collect();
        assert_eq!(first, ["$aws/events/jobExecution/job-a/succeeded"]);
        // WHEN the service starts again with a working broker
        let sent = Sent::default();
        jobs.tick(T0 + 2_000, &sent).await;
        // THEN the event is published again, then the job's
        let again: Vec<String> = sent.take().into_iter().filter(|m| m.2).map(|m| m.0).collect();
        assert_eq!(again, ["$aws/events/jobExecution/job-a/succeeded", "$aws/events/job/job-a/completed"]);
        jobs.tick(T0 + 3_000, &sent).await;
        assert!(sent.take().is_empty(), "published once delivered");
        Ok(())
    }

    #[tokio::test]
    async fn executions_timed_out_or_canceled_out_of_band_are_announced_on_the_next_tick(
    ) -> anyhow::Result<()> {
        // GIVEN d1 in progress on a job with a one-minute timeout, and d2 queued on another job
        let store = SqliteStore::in_memory()?;
        let mut job = new_job("job-a", &["d1"])?;
        job.in_progress_timeout_minutes = Some(1);
        store.create_job_at(&job, T0).await?;
        store.create_job_at(&new_job("job-b", &["d2"])?, T0).await?;
        let (jobs, sent) = (Jobs::new(store.clone()), Sent::default());
        ask(&jobs, "$aws/things/d1/jobs/start-next", json!({}), T0).await;
        jobs.tick(T0, &sent).await;
        sent.take();
        // WHEN a minute passes and job-b is cancelled by another client of the store
        store.cancel_job_at(&JobId::parse("job-b")?, false, T0 + 30_000).await?;
        jobs.tick(T0 + 60_000, &sent).await;
        // THEN both devices learn they have nothing next, and rules get the events
        let told = sent.take();
        let rules: Vec<&str> = told.iter().filter(|(_, _, r)| *r).map(|(t, _, _)| t.as_str()).collect();
        assert_eq!(
            rules,
            [
                "$aws/events/jobExecution/job-b/canceled",
                "$aws/events/jobExecution/job-a/timed_out",
                "$aws/events/job/job-b/canceled",
                "$aws/events/job/job-a/completed"
            ]
        );
        let next: Vec<(&str, &Value)> = told
            .iter()
            .filter(|(t, _, _)| t.ends_with("notify-next"))
            .map(|(t, v, _)| (t.as_str(), v))
            .collect();
        assert_eq!(
            next,
            [
                ("$aws/things/d1/jobs/notify-next", &json!({"timestamp": 1_764_000_060})),
                ("$aws/things/d2/jobs/notify-next", &json!({"timestamp": 1_764_000_060}))
            ]
        );
        let canceled = &told
            .iter()
            .find(|(t, _, _)| t == "$aws/events/job/job-b/canceled")
            .ok_or_else(|| anyhow::anyhow!("no canceled event"))?
            .1;
        assert_eq!((&canceled["status"], canceled.get("jobProcessDetails")), (&json!("CANCELED"), None));
        Ok(())
    }
}
