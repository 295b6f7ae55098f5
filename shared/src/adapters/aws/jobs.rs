//! [`IotJobs`]: AWS IoT Jobs' control plane ([`JobsControl`]), what an OTA campaign asks of it:
//! create a stage's job, cancel it, read its progress and its executions.
//!
//! Calls are signed with SigV4 on the SDK's HTTPS connector through [`SignedClient`] (service
//! `iot`), as [`super::IotControlPlane`] does, and for the same reason: `aws-sdk-iot` would be
//! compiled for a handful of calls. The wire format is the documented REST-JSON one:
//!
//! | call | request |
//! |---|---|
//! | CreateJob | `PUT /jobs/<id>`: `targets` (ARNs), `document` (the JSON document as a string), `description`, `targetSelection: SNAPSHOT`, `jobExecutionsRolloutConfig.maximumPerMinute`, `timeoutConfig.inProgressTimeoutInMinutes` |
//! | CancelJob | `PUT /jobs/<id>/cancel?force=` |
//! | DescribeJob | `GET /jobs/<id>`: `job.status`, `job.description`, `job.jobProcessDetails.numberOf<Status>Things` |
//! | ListJobExecutionsForJob | `GET /jobs/<id>/things?maxResults=&nextToken=` (every page) |
//! | CreateThingGroup | `POST /thing-groups/<name>` (jobs over [`MAX_JOB_TARGETS`] only) |
//! | AddThingToThingGroup | `PUT /thing-groups/addThingToThingGroup` (the same) |
//! | DeleteThingGroup | `DELETE /thing-groups/<name>` (`retire_job`: the campaign is done with the job) |
//!
//! Targets are thing ARNs: `FLEET_THING_ARN_PREFIX` (`arn:<partition>:iot:<region>:<account>:thing/`)
//! and the thing's name. AWS accepts at most [`MAX_JOB_TARGETS`] targets in a job, so a job
//! for more things first gets a static thing group of its own, `fleetline-job-<job id>`
//! (CreateThingGroup; a group that exists already, from an earlier attempt, is used as it is),
//! each thing is added to it ([`MAX_CONCURRENT_REQUESTS`] at a time, an add that fails
//! transiently, e.g. throttled, retried with backoff; adding a member again changes nothing),
//! and the job targets the group's ARN. The job is a SNAPSHOT job: its executions are the
//! group's things when it is created. A failure before CreateJob leaves the group to the
//! retry, which completes it. The group is deleted when the campaign is done with the job
//! ([`JobsControl::retire_job`], DeleteThingGroup): a thing may belong to at most 10 static
//! groups, so they must not pile up.
//!
//! The job is checked before anything is sent: at least one target, none twice, a rollout
//! rate within [`MAX_PER_MINUTE`](crate::model::MAX_PER_MINUTE), a timeout within [`MAX_JOB_TIMEOUT_MINUTES`](crate::model::MAX_JOB_TIMEOUT_MINUTES), a
//! document of at most [`MAX_JOB_DOCUMENT_BYTES`](crate::model::MAX_JOB_DOCUMENT_BYTES) as compact JSON; anything else is a
//! [`Permanent`](ErrorKind::Permanent) error, as AWS's own refusal would be.
//!
//! Errors: a job id that exists (`ResourceAlreadyExistsException`, 409) is a
//! [`Conflict`](ErrorKind::Conflict) (AWS never reuses a job id); an unknown job
//! (`ResourceNotFoundException`) is `None` to DescribeJob and no executions to the list, a
//! permanent error to CancelJob. Cancelling a job that has completed or was cancelled
//! changes nothing: if AWS refuses it, the job's status is read and the refusal dropped.
//! Throttling, 5xx and connection failures are [`Transient`](ErrorKind::Transient). The
//! endpoint is `AWS_ENDPOINT_URL_IOT`, else the config's endpoint URL (moto in tests), else
//! `https://iot.<region>.amazonaws.com`.

use aws_config::SdkConfig;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::json;

use super::signed::{percent as encode, ApiError, SignedClient};
use super::{batch_backoff, MAX_CONCURRENT_REQUESTS};
use crate::env::{ConfigError, Env};
use crate::error::{ErrorKind, StoreError};
use crate::model::{
    ExecutionStatus, JobCounts, JobId, JobProgress, JobStatus, NewJob, ThingName, MAX_JOB_TARGETS,
};
use crate::ports::JobsControl;

/// The variable naming the account's thing ARNs, up to the thing's name.
pub const THING_ARN_PREFIX_VAR: &str = "FLEET_THING_ARN_PREFIX";
/// The most executions one ListJobExecutionsForJob page holds.
pub const MAX_EXECUTIONS_PAGE: usize = 250;
/// The name of the thing group a job over [`MAX_JOB_TARGETS`] targets: this and the job id.
pub const JOB_GROUP_PREFIX: &str = "fleetline-job-";

/// AWS IoT Jobs' control plane.
pub struct IotJobs {
    client: SignedClient,
    /// `arn:<partition>:iot:<region>:<account>:thing/`.
    thing_arn_prefix: String,
    /// `arn:<partition>:iot:<region>:<account>:thinggroup/`.
    group_arn_prefix: String,
    page_size: usize,
}

impl IotJobs {
    /// `FLEET_THING_ARN_PREFIX`, with the process's `SdkConfig` (credentials, region, endpoint).
    pub fn from_env(sdk: &SdkConfig, env: &Env) -> Result<Self, ConfigError> {
        let prefix = env.required(THING_ARN_PREFIX_VAR)?;
        Self::new(SignedClient::new(sdk, "iot", "AWS_ENDPOINT_URL_IOT", "iot")?, prefix)
    }

    /// On a given client (tests: a scripted server), for things whose ARNs start with
    /// `thing_arn_prefix` (`arn:<partition>:iot:<region>:<account>:thing/`).
    pub fn new(client: SignedClient, thing_arn_prefix: impl Into<String>) -> Result<Self, ConfigError> {
        let thing_arn_prefix = thing_arn_prefix.into();
        let group_arn_prefix = thing_arn_prefix
            .strip_suffix(":thing/")
            .filter(|account| account.starts_with("arn:") && account.split(':').count() == 5)
            .map(|account| format!("{account}:thinggroup/"))
            .ok_or_else(|| ConfigError::Invalid {
                var: THING_ARN_PREFIX_VAR,
                value: thing_arn_prefix.clone(),
                expected: "arn:<partition>:iot:<region>:<account>:thing/",
            })?;
        Ok(Self { client, thing_arn_prefix, group_arn_prefix, page_size: MAX_EXECUTIONS_PAGE })
    }

    /// With smaller ListJobExecutionsForJob pages (1 to [`MAX_EXECUTIONS_PAGE`]).
    pub fn page_size(mut self, executions: usize) -> Self {
        self.page_size = executions.clamp(1, MAX_EXECUTIONS_PAGE);
        self
    }

    fn thing_arn(&self, thing: &ThingName) -> String {
        format!("{}{thing}", self.thing_arn_prefix)
    }

    /// The job's own thing group with every target in it; its ARN.
    async fn job_group(&self, job: &NewJob) -> Result<String, StoreError> {
        const OP: &str = "iot CreateThingGroup";
        let group = format!("{JOB_GROUP_PREFIX}{}", job.job_id);
        let properties = json!({
            "thingGroupProperties": {"thingGroupDescription": format!("targets of job {}", job.job_id)}
        });
        match self
            .client
            .call(OP, "POST", &format!("/thing-groups/{group}"), &[], properties.to_string().as_bytes())
            .await
        {
            Ok(_) => {}
            // An earlier attempt of this create made it (AWS answers an identical create
            // with success, and this only when the properties differ).
            Err(e) if already_exists(&e) => {}
            Err(e) => return Err(e),
        }
        // The first failure that outlasts its retries ends the create (the rest is dropped).
        stream::iter(job.targets.clone())
            .map(|thing| self.add_to_group(&group, thing))
            .buffer_unordered(MAX_CONCURRENT_REQUESTS)
            .try_collect::<()>()
            .await?;
        Ok(format!("{}{group}", self.group_arn_prefix))
    }

    /// AddThingToThingGroup, retried with backoff while the failure is transient.
    async fn add_to_group(&self, group: &str, thing: ThingName) -> Result<(), StoreError> {
        const OP: &str = "iot AddThingToThingGroup";
        let body = json!({"thingGroupName": group, "thingName": thing.as_str()}).to_string();
        let mut delays = batch_backoff();
        loop {
            match self
                .client
                .call(OP, "PUT", "/thing-groups/addThingToThingGroup", &[], body.as_bytes())
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.is_transient() => match delays.next() {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// DescribeJob: `None` for an unknown job.
    async fn describe(&self, job: &JobId) -> Result<Option<JobProgress>, StoreError> {
        const OP: &str = "iot DescribeJob";
        let body = match self.client.call(OP, "GET", &format!("/jobs/{job}"), &[], &[]).await {
            Ok(body) => body,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let described: Described = decode(OP, &body)?;
        let status = match described.job.status.as_str() {
            // Waiting for its start time: in progress, as far as a campaign is concerned.
            "SCHEDULED" => JobStatus::InProgress,
            // Being deleted: as good as gone (DescribeJob answers ResourceNotFound next).
            "DELETION_IN_PROGRESS" => return Ok(None),
            other => JobStatus::parse(other)
                .ok_or_else(|| StoreError::permanent(OP, format!("unknown job status {other:?}")))?,
        };
        Ok(Some(JobProgress {
            status,
            counts: described.job.job_process_details.counts(),
            description: described.job.description,
        }))
    }
}

/// CreateJob's body for these targets.
fn create_body(job: &NewJob, document: String, targets: Vec<String>) -> serde_json::Value {
    let mut body = json!({"targets": targets, "document": document, "targetSelection": "SNAPSHOT"});
    // AWS's pattern for a description needs at least one character.
    if !job.description.is_empty() {
        body["description"] = json!(job.description);
    }
    if let Some(rate) = job.max_per_minute {
        body["jobExecutionsRolloutConfig"] = json!({"maximumPerMinute": rate});
    }
    if let Some(minutes) = job.in_progress_timeout_minutes {
        body["timeoutConfig"] = json!({"inProgressTimeoutInMinutes": minutes});
    }
    body
}

fn decode<T: serde::de::DeserializeOwned>(op: &'static str, body: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(body).map_err(|e| StoreError::permanent(op, e))
}

// AWS IoT names its error in the `x-amzn-ErrorType` header and not always in the body (moto's
// ResourceAlreadyExists body has none); `SignedClient` reads the header first, the body's code
// otherwise, and the status, which each error has its own of in these calls, decides too.

/// ResourceAlreadyExistsException (409).
fn already_exists(e: &StoreError) -> bool {
    e.source
        .downcast_ref::<ApiError>()
        .is_some_and(|a| a.status == 409 || a.code == "ResourceAlreadyExistsException")
}

/// InvalidRequestException (400) or InvalidStateTransitionException (409): how AWS may
/// refuse to cancel a job that is no longer in progress.
fn refused(e: &StoreError) -> bool {
    !e.is_transient() && e.source.downcast_ref::<ApiError>().is_some_and(|a| matches!(a.status, 400 | 409))
}

/// ResourceNotFoundException (404).
fn not_found(e: &StoreError) -> bool {
    e.source
        .downcast_ref::<ApiError>()
        .is_some_and(|a| a.status == 404 || a.code == "ResourceNotFoundException")
}

#[derive(Deserialize)]
struct Described {
    job: DescribedJob,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribedJob {
    status: String,
    /// Absent when the job was created without one.
    #[serde(default)]
    description: String,
    #[serde(default)]
    job_process_details: ProcessDetails,
}

/// `jobProcessDetails`: each count absent when AWS leaves it out (zero).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ProcessDetails {
    number_of_queued_things: u64,
    number_of_in_progress_things: u64,
    number_of_succeeded_things: u64,
    number_of_failed_things: u64,
    number_of_rejected_things: u64,
    number_of_timed_out_things: u64,
    number_of_canceled_things: u64,
    number_of_removed_things: u64,
}

impl ProcessDetails {
    fn counts(&self) -> JobCounts {
        JobCounts {
            queued: self.number_of_queued_things,
            in_progress: self.number_of_in_progress_things,
            succeeded: self.number_of_succeeded_things,
            failed: self.number_of_failed_things,
            rejected: self.number_of_rejected_things,
            timed_out: self.number_of_timed_out_things,
            canceled: self.number_of_canceled_things,
            removed: self.number_of_removed_things,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecutionsPage {
    #[serde(default)]
    execution_summaries: Vec<ExecutionSummary>,
    next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecutionSummary {
    thing_arn: String,
    job_execution_summary: ExecutionStatusOnly,
}

#[derive(Deserialize)]
struct ExecutionStatusOnly {
    status: String,
}

impl ExecutionSummary {
    fn into_domain(self, op: &'static str) -> Result<(ThingName, ExecutionStatus), StoreError> {
        let name = self
            .thing_arn
            .split_once(":thing/")
            .map(|(_, name)| name)
            .ok_or_else(|| StoreError::permanent(op, format!("not a thing ARN: {:?}", self.thing_arn)))?;
        let thing = ThingName::parse(name).map_err(|e| StoreError::permanent(op, e))?;
        let status = ExecutionStatus::parse(&self.job_execution_summary.status).ok_or_else(|| {
            StoreError::permanent(
                op,
                format!("unknown execution status {:?}", self.job_execution_summary.status),
            )
        })?;
        Ok((thing, status))
    }
}

impl JobsControl for IotJobs {
    async fn create_job(&self, job: &NewJob) -> Result<(), StoreError> {
        const OP: &str = "iot CreateJob";
        let document = job.check().map_err(|e| StoreError::permanent(OP, e))?;
        let targets = if job.targets.len() <= MAX_JOB_TARGETS {
            job.targets.iter().map(|t| self.thing_arn(t)).collect()
        } else {
            vec![self.job_group(job).await?]
        };
        let body = create_body(job, document, targets).to_string();
        match self.client.call(OP, "PUT", &format!("/jobs/{}", job.job_id), &[], body.as_bytes()).await {
            Ok(_) => Ok(()),
            Err(e) if already_exists(&e) => Err(StoreError::new(OP, ErrorKind::Conflict, e.source)),
            Err(e) => Err(e),
        }
    }

    async fn cancel_job(&self, job: &JobId, force: bool) -> Result<(), StoreError> {
        const OP: &str = "iot CancelJob";
        let path = format!("/jobs/{job}/cancel?force={force}");
        match self.client.call(OP, "PUT", &path, &[], b"{}").await {
            Ok(_) => Ok(()),
            Err(e) if refused(&e) => {
                // Refused: if the job is over (completed, or cancelled before), nothing was
                // to change, as the port promises; otherwise the refusal stands.
                match self.describe(job).await {
                    Ok(Some(p)) if p.status != JobStatus::InProgress => Ok(()),
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn job_progress(&self, job: &JobId) -> Result<Option<JobProgress>, StoreError> {
        self.describe(job).await
    }

    async fn retire_job(&self, job: &JobId) -> Result<(), StoreError> {
        const OP: &str = "iot DeleteThingGroup";
        let group = format!("{JOB_GROUP_PREFIX}{job}");
        match self.client.call(OP, "DELETE", &format!("/thing-groups/{group}"), &[], &[]).await {
            Ok(_) => Ok(()),
            // A job of at most 100 targets never had a group; a retire repeated finds none.
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn job_executions(&self, job: &JobId) -> Result<Vec<(ThingName, ExecutionStatus)>, StoreError> {
        const OP: &str = "iot ListJobExecutionsForJob";
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/jobs/{job}/things?maxResults={}", self.page_size);
            if let Some(t) = &token {
                path.push_str(&format!("&nextToken={}", encode(t)));
            }
            let body = match self.client.call(OP, "GET", &path, &[], &[]).await {
                Ok(body) => body,
                // An unknown job has no executions (the port's contract); a job that
                // disappears between pages is an error.
                Err(e) if token.is_none() && not_found(&e) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let page: ExecutionsPage = decode(OP, &body)?;
            for summary in page.execution_summaries {
                out.push(summary.into_domain(OP)?);
            }
            match page.next_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {

    use aws_credential_types::provider::SharedCredentialsProvider;
    use aws_credential_types::Credentials;

    use super::*;
    use crate::adapters::aws::scripted::Scripted;
    use crate::model::{InvalidJob, MAX_JOB_DOCUMENT_BYTES, MAX_JOB_TIMEOUT_MINUTES};

    const PREFIX: &str = "arn:aws:iot:eu-west-1:123456789012:thing/";

    fn jobs(url: &str) -> IotJobs {
        let creds = Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
        let client =
            SignedClient::with_endpoint("iot", url, "eu-west-1", SharedCredentialsProvider::new(creds));
        IotJobs::new(client, PREFIX).expect("valid prefix")
    }

    fn thing(s: &str) -> ThingName {
        ThingName::parse(s).expect("thing name")
    }

    fn new_job(id: &str, targets: usize) -> NewJob {
        NewJob {
            job_id: JobId::parse(id).expect("job id"),
            targets: (0..targets).map(|n| thing(&format!("d{n:03}"))).collect(),
            document: json!({"operation": "install", "firmware": "2.1.0"}),
            description: "stage 1".into(),
            max_per_minute: Some(50),
            in_progress_timeout_minutes: Some(30),
        }
    }

    #[test]
    fn the_thing_arn_prefix_must_name_an_accounts_things() {
        let creds = SharedCredentialsProvider::new(Credentials::new("a", "b", None, None, "test"));
        let client = || SignedClient::with_endpoint("iot", "http://127.0.0.1:1", "eu-west-1", creds.clone());
        let jobs = IotJobs::new(client(), PREFIX).expect("valid");
        assert_eq!(jobs.group_arn_prefix, "arn:aws:iot:eu-west-1:123456789012:thinggroup/");
        assert_eq!(jobs.thing_arn(&thing("d1")), format!("{PREFIX}d1"));
        for bad in ["arn:aws:iot:eu-west-1:123456789012:thing", "thing/", "arn:aws:iot:123456789012:thing/"] {
            let err = IotJobs::new(client(), bad).err().expect("invalid prefix");
            assert!(matches!(err, ConfigError::Invalid { var: THING_ARN_PREFIX_VAR, .. }), "{bad}: {err}");
        }
        let missing = IotJobs::from_env(&aws_config::SdkConfig::builder().build(), &Env::from_pairs(&[]));
        assert_eq!(missing.err(), Some(ConfigError::Missing(THING_ARN_PREFIX_VAR)));
    }

    #[test]
    fn jobs_aws_would_refuse_are_refused_before_sending() {
        let mut cases = vec![(new_job("j", 0), InvalidJob::NoTargets)];
        let mut twice = new_job("j", 2);
        twice.targets.push(thing("d001"));
        cases.push((twice, InvalidJob::DuplicateTarget(thing("d001"))));
        for rate in [0, 1001] {
            let mut job = new_job("j", 1);
            job.max_per_minute = Some(rate);
            cases.push((job, InvalidJob::RolloutRate(rate)));
        }
        for minutes in [0, MAX_JOB_TIMEOUT_MINUTES + 1] {
            let mut job = new_job("j", 1);
            job.in_progress_timeout_minutes = Some(minutes);
            cases.push((job, InvalidJob::Timeout(minutes)));
        }
        let mut big = new_job("j", 1);
        big.document = json!({"blob": "x".repeat(MAX_JOB_DOCUMENT_BYTES)});
        let size = big.document.to_string().len();
        cases.push((big, InvalidJob::DocumentTooLarge(size)));
        for (job, expected) in cases {
            assert_eq!(job.check(), Err(expected));
        }
        let ok = new_job("j", 1);
        let document = ok.check().expect("a valid job");
        assert!(!document.contains(' '), "compact: {document}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&document).ok(), Some(ok.document));
    }

    #[tokio::test]
    async fn a_job_is_created_with_its_document_as_a_string_and_an_existing_id_is_a_conflict() {
        let server = Scripted::start(vec![
            (200, r#"{"jobArn":"arn:aws:iot:eu-west-1:123456789012:job/j1","jobId":"j1"}"#),
            // As AWS answers it: the code in a header (which the client does not read).
            (409, r#"{"message":"Job j1 already exists","resourceId":"j1"}"#),
        ])
        .await;
        let iot = jobs(&server.url);
        iot.create_job(&new_job("j1", 2)).await.expect("created");
        let again = iot.create_job(&new_job("j1", 2)).await.expect_err("exists");
        assert_eq!(again.kind, ErrorKind::Conflict, "{again}");

        let seen = server.seen();
        assert!(seen[0].0.starts_with("PUT /jobs/j1 "), "{}", seen[0].0);
        let body: serde_json::Value = serde_json::from_str(&seen[0].1).expect("a JSON body");
        let document = body["document"].as_str().map(serde_json::from_str::<serde_json::Value>);
        assert_eq!(document.and_then(Result::ok), Some(new_job("j1", 2).document), "a JSON string");
        assert_eq!(
            body,
            json!({
                "targets": [format!("{PREFIX}d000"), format!("{PREFIX}d001")],
                "document": body["document"].clone(),
                "description": "stage 1",
                "targetSelection": "SNAPSHOT",
                "jobExecutionsRolloutConfig": {"maximumPerMinute": 50},
                "timeoutConfig": {"inProgressTimeoutInMinutes": 30},
            })
        );
    }

    #[tokio::test]
    async fn the_error_type_header_names_the_error_when_the_body_does_not() {
        // AWS IoT names a throttled call in x-amzn-ErrorType; the body has only a message
        let server = Scripted::start(vec![
            (400, r#"ThrottlingException:http://internal.amazon.com/coral/com.amazonaws.iot/|{"message":"Rate exceeded"}"#),
            (400, r#"{"message":"Rate exceeded"}"#),
        ])
        .await;
        let iot = jobs(&server.url);
        let id = JobId::parse("j1").expect("id");
        let throttled = iot.job_progress(&id).await.expect_err("throttled");
        assert!(
            throttled.is_transient() && throttled.to_string().contains("ThrottlingException"),
            "{throttled}"
        );
        // without the header the same answer is an unknown error that no retry mends
        let unknown = iot.job_progress(&id).await.expect_err("an error");
        assert_eq!(unknown.kind, ErrorKind::Permanent, "{unknown}");
    }

    #[tokio::test]
    async fn a_job_over_the_target_limit_targets_its_own_thing_group() {
        let targets = MAX_JOB_TARGETS + 1;
        // The group exists (an earlier attempt), one add is throttled once, then the job.
        let mut answers = vec![(409, r#"{"message":"exists","resourceId":"g"}"#)];
        answers.push((429, r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#));
        answers.extend((0..targets).map(|_| (200, "{}")));
        answers.push((200, r#"{"jobId":"big"}"#));
        let server = Scripted::start(answers).await;
        jobs(&server.url).create_job(&new_job("big", targets)).await.expect("created");

        let seen = server.seen();
        assert_eq!(seen.len(), targets + 3);
        assert!(seen[0].0.starts_with("POST /thing-groups/fleetline-job-big "), "{}", seen[0].0);
        let mut added: Vec<String> = seen[1..=targets + 1]
            .iter()
            .map(|(line, body)| {
                assert!(line.starts_with("PUT /thing-groups/addThingToThingGroup "), "{line}");
                let b: serde_json::Value = serde_json::from_str(body).expect("JSON");
                assert_eq!(b["thingGroupName"], "fleetline-job-big");
                b["thingName"].as_str().unwrap_or_default().to_owned()
            })
            .collect();
        added.sort();
        added.dedup();
        assert_eq!(added.len(), targets, "every target added once the throttled one was retried");
        let create: serde_json::Value = serde_json::from_str(&seen[targets + 2].1).expect("JSON");
        assert_eq!(
            create["targets"],
            json!(["arn:aws:iot:eu-west-1:123456789012:thinggroup/fleetline-job-big"])
        );
    }

    #[tokio::test]
    async fn executions_are_read_from_every_page_in_thing_order() {
        let server = Scripted::start(vec![
            (
                200,
                r#"{"executionSummaries":[{"thingArn":"arn:aws:iot:eu-west-1:123456789012:thing/d2","jobExecutionSummary":{"status":"QUEUED","executionNumber":1}}],"nextToken":"n/2+"}"#,
            ),
            (
                200,
                r#"{"executionSummaries":[{"thingArn":"arn:aws:iot:eu-west-1:123456789012:thing/d1","jobExecutionSummary":{"status":"SUCCEEDED"}}]}"#,
            ),
            (404, r#"{"__type":"ResourceNotFoundException","message":"no such job"}"#),
            (429, r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#),
        ])
        .await;
        let iot = jobs(&server.url).page_size(1);
        let id = JobId::parse("j1").expect("id");
        let listed = iot.job_executions(&id).await.expect("listed");
        assert_eq!(
            listed,
            [(thing("d1"), ExecutionStatus::Succeeded), (thing("d2"), ExecutionStatus::Queued)]
        );
        assert!(iot.job_executions(&id).await.expect("unknown job").is_empty());
        let throttled = iot.job_executions(&id).await.expect_err("throttled");
        assert!(throttled.is_transient(), "{throttled}");
        let seen = server.seen();
        assert!(seen[0].0.starts_with("GET /jobs/j1/things?maxResults=1 "), "{}", seen[0].0);
        assert!(
            seen[1].0.starts_with("GET /jobs/j1/things?maxResults=1&nextToken=n%2F2%2B "),
            "{}",
            seen[1].0
        );
    }

    #[tokio::test]
    async fn progress_counts_executions_by_status_and_an_unknown_job_has_none() {
        let server = Scripted::start(vec![
            (
                200,
                r#"{"job":{"jobId":"j1","status":"IN_PROGRESS","description":"stage 1 [campaign 00ff]","jobProcessDetails":{"numberOfQueuedThings":3,"numberOfSucceededThings":5,"numberOfTimedOutThings":1}}}"#,
            ),
            (200, r#"{"job":{"jobId":"j1","status":"COMPLETED","jobProcessDetails":{}}}"#),
            (404, r#"{"__type":"ResourceNotFoundException","message":"no such job"}"#),
            (200, r#"{"job":{"jobId":"j1","status":"PAUSED"}}"#),
        ])
        .await;
        let iot = jobs(&server.url);
        let id = JobId::parse("j1").expect("id");
        let progress = iot.job_progress(&id).await.expect("described").expect("known");
        assert_eq!(progress.status, JobStatus::InProgress);
        assert_eq!(progress.description, "stage 1 [campaign 00ff]");
        assert_eq!(
            (
                progress.counts.queued,
                progress.counts.succeeded,
                progress.counts.timed_out,
                progress.counts.total()
            ),
            (3, 5, 1, 9)
        );
        let done = iot.job_progress(&id).await.expect("described").expect("known");
        assert_eq!((done.status, done.counts), (JobStatus::Completed, JobCounts::default()));
        assert_eq!(done.description, "", "a job created without a description");
        assert_eq!(iot.job_progress(&id).await.expect("unknown"), None);
        let odd = iot.job_progress(&id).await.expect_err("an unknown status");
        assert_eq!(odd.kind, ErrorKind::Permanent);
    }

    #[tokio::test]
    async fn retiring_a_job_deletes_its_thing_group_and_a_job_without_one_is_fine() {
        let server = Scripted::start(vec![
            (200, "{}"),
            (404, r#"{"__type":"ResourceNotFoundException","message":"no such group"}"#),
            (500, r#"{"__type":"InternalFailureException","message":"try again"}"#),
        ])
        .await;
        let iot = jobs(&server.url);
        let id = JobId::parse("big").expect("id");
        iot.retire_job(&id).await.expect("the group is deleted");
        iot.retire_job(&id).await.expect("no group left: nothing to do");
        let failed = iot.retire_job(&id).await.expect_err("a server failure");
        assert!(failed.is_transient());
        let seen = server.seen();
        assert!(seen[0].0.starts_with("DELETE /thing-groups/fleetline-job-big "), "{}", seen[0].0);
    }

    #[tokio::test]
    async fn cancelling_a_finished_job_changes_nothing_and_an_unknown_job_is_permanent() {
        let refused = r#"{"__type":"InvalidRequestException","message":"Job j1 is COMPLETED"}"#;
        let server = Scripted::start(vec![
            (400, refused),
            (200, r#"{"job":{"jobId":"j1","status":"COMPLETED"}}"#),
            (400, refused),
            (200, r#"{"job":{"jobId":"j1","status":"IN_PROGRESS"}}"#),
            (404, r#"{"__type":"ResourceNotFoundException","message":"no such job"}"#),
        ])
        .await;
        let iot = jobs(&server.url);
        let id = JobId::parse("j1").expect("id");
        iot.cancel_job(&id, true).await.expect("a finished job stays as it is");
        let stands = iot.cancel_job(&id, false).await.expect_err("refused while in progress");
        assert!(stands.to_string().contains("InvalidRequestException"), "{stands}");
        let unknown = iot.cancel_job(&id, false).await.expect_err("unknown");
        assert_eq!(unknown.kind, ErrorKind::Permanent);
        let seen = server.seen();
        assert!(seen[0].0.starts_with("PUT /jobs/j1/cancel?force=true "), "{}", seen[0].0);
        assert!(seen[2].0.starts_with("PUT /jobs/j1/cancel?force=false "), "{}", seen[2].0);
        assert_eq!(seen.len(), 5, "an unknown job is not described");
    }
}
