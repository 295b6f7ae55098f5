//! IoT Jobs as Fleetline uses them: a job sends one document to a set of things, and each
//! thing's copy of it is an execution with its own status. Names and statuses are AWS IoT
//! Jobs' own, so the AWS adapter maps them one to one and the local IoT Core serves the same
//! device API (`$aws/things/<t>/jobs/...`).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ThingName;

/// Longest job id AWS IoT Jobs accepts.
pub const MAX_JOB_ID_LEN: usize = 64;
/// Largest job document AWS IoT Jobs accepts (32 KB).
pub const MAX_JOB_DOCUMENT_BYTES: usize = 32 * 1024;
/// AWS's limit on things named directly in a job's `targets`: a job for more reaches them
/// through a thing group.
pub const MAX_JOB_TARGETS: usize = 100;
/// AWS IoT Jobs' `maximumPerMinute` rollout bounds.
pub const MAX_PER_MINUTE: std::ops::RangeInclusive<u32> = 1..=1000;
/// The longest `inProgressTimeoutInMinutes` and `stepTimeoutInMinutes` AWS IoT Jobs accepts
/// (7 days).
pub const MAX_JOB_TIMEOUT_MINUTES: u32 = 10_080;

/// A job id as AWS IoT Jobs allows it: 1–64 characters of `[a-zA-Z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job id {0:?}: expected 1-64 characters of [a-zA-Z0-9_-]")]
pub struct InvalidJobId(pub String);

impl JobId {
    pub fn parse(s: &str) -> Result<Self, InvalidJobId> {
        Self::try_from(s.to_owned())
    }

    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_JOB_ID_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = InvalidJobId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if Self::is_valid(&s) {
            Ok(Self(s))
        } else {
            Err(InvalidJobId(s))
        }
    }
}

impl From<JobId> for String {
    fn from(j: JobId) -> Self {
        j.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One thing's copy of a job, as AWS IoT Jobs names its states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExecutionStatus {
    Queued,
    InProgress,
    Succeeded,
    Failed,
    Rejected,
    TimedOut,
    Canceled,
    Removed,
}

impl ExecutionStatus {
    pub const ALL: [ExecutionStatus; 8] = [
        Self::Queued,
        Self::InProgress,
        Self::Succeeded,
        Self::Failed,
        Self::Rejected,
        Self::TimedOut,
        Self::Canceled,
        Self::Removed,
    ];

    /// No further update is accepted in this state.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::InProgress)
    }

    /// AWS's spelling (`IN_PROGRESS`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::InProgress => "IN_PROGRESS",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Rejected => "REJECTED",
            Self::TimedOut => "TIMED_OUT",
            Self::Canceled => "CANCELED",
            Self::Removed => "REMOVED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for ExecutionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job as a whole, as AWS IoT Jobs names its states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    InProgress,
    Canceled,
    Completed,
}

impl JobStatus {
    /// AWS's spelling (`IN_PROGRESS`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "IN_PROGRESS",
            Self::Canceled => "CANCELED",
            Self::Completed => "COMPLETED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::InProgress, Self::Canceled, Self::Completed].into_iter().find(|v| v.as_str() == s)
    }
}

/// A job both backends refuse before anything is stored or sent (AWS would refuse it too).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidJob {
    #[error("a job needs at least one target")]
    NoTargets,
    #[error("thing {0} is a target twice")]
    DuplicateTarget(ThingName),
    #[error("the job document is {0} bytes as JSON; at most {MAX_JOB_DOCUMENT_BYTES} are accepted")]
    DocumentTooLarge(usize),
    #[error("maximumPerMinute {0} is outside 1-1000")]
    RolloutRate(u32),
    #[error("inProgressTimeoutInMinutes {0} is outside 1-{MAX_JOB_TIMEOUT_MINUTES}")]
    Timeout(u32),
}

/// A job to create: one document for every target thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    pub job_id: JobId,
    pub targets: Vec<ThingName>,
    /// The job document (at most [`MAX_JOB_DOCUMENT_BYTES`] as JSON).
    pub document: serde_json::Value,
    pub description: String,
    /// Executions started per minute (`jobExecutionsRolloutConfig.maximumPerMinute`).
    pub max_per_minute: Option<u32>,
    /// An execution in progress longer than this times out (`timeoutConfig`).
    pub in_progress_timeout_minutes: Option<u32>,
}

impl NewJob {
    /// Every rule AWS IoT Jobs sets on a new job; the document as sent (compact JSON).
    pub fn check(&self) -> Result<String, InvalidJob> {
        if self.targets.is_empty() {
            return Err(InvalidJob::NoTargets);
        }
        let mut seen = std::collections::HashSet::with_capacity(self.targets.len());
        if let Some(twice) = self.targets.iter().find(|t| !seen.insert(*t)) {
            return Err(InvalidJob::DuplicateTarget(twice.clone()));
        }
        if let Some(rate) = self.max_per_minute.filter(|r| !MAX_PER_MINUTE.contains(r)) {
            return Err(InvalidJob::RolloutRate(rate));
        }
        if let Some(t) =
            self.in_progress_timeout_minutes.filter(|t| !(1..=MAX_JOB_TIMEOUT_MINUTES).contains(t))
        {
            return Err(InvalidJob::Timeout(t));
        }
        let document = self.document.to_string();
        if document.len() > MAX_JOB_DOCUMENT_BYTES {
            return Err(InvalidJob::DocumentTooLarge(document.len()));
        }
        Ok(document)
    }
}

/// How a job's executions stand (`DescribeJob`'s `jobProcessDetails`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    pub queued: u64,
    pub in_progress: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub rejected: u64,
    pub timed_out: u64,
    pub canceled: u64,
    pub removed: u64,
}

impl JobCounts {
    pub fn add(&mut self, status: ExecutionStatus, n: u64) {
        let slot = match status {
            ExecutionStatus::Queued => &mut self.queued,
            ExecutionStatus::InProgress => &mut self.in_progress,
            ExecutionStatus::Succeeded => &mut self.succeeded,
            ExecutionStatus::Failed => &mut self.failed,
            ExecutionStatus::Rejected => &mut self.rejected,
            ExecutionStatus::TimedOut => &mut self.timed_out,
            ExecutionStatus::Canceled => &mut self.canceled,
            ExecutionStatus::Removed => &mut self.removed,
        };
        *slot += n;
    }

    /// Executions not yet in a terminal state.
    pub fn pending(&self) -> u64 {
        self.queued + self.in_progress
    }

    pub fn total(&self) -> u64 {
        self.pending() + self.finished()
    }

    /// Executions in a terminal state.
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed + self.rejected + self.timed_out + self.canceled + self.removed
    }
}

/// A job's state and its executions' counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    pub status: JobStatus,
    pub counts: JobCounts,
    /// What the job was created with (a campaign stamps its jobs' descriptions to know them).
    pub description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_follow_aws_iot_jobs_charset() {
        assert!(JobId::parse("fw-1_5_0-s1").is_ok());
        assert!(JobId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a.b", "a/b", &"a".repeat(65)] {
            assert!(JobId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn statuses_round_trip_in_aws_spelling() -> anyhow::Result<()> {
        for s in ExecutionStatus::ALL {
            assert_eq!(ExecutionStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s)?, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(ExecutionStatus::parse("DONE"), None);
        Ok(())
    }

    #[test]
    fn job_statuses_round_trip_in_aws_spelling() {
        for s in [JobStatus::InProgress, JobStatus::Canceled, JobStatus::Completed] {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobStatus::parse("SCHEDULED"), None);
    }

    #[test]
    fn counts_tell_pending_from_finished() {
        let mut c = JobCounts::default();
        c.add(ExecutionStatus::Queued, 3);
        c.add(ExecutionStatus::InProgress, 1);
        c.add(ExecutionStatus::Succeeded, 5);
        c.add(ExecutionStatus::Failed, 1);
        assert_eq!((c.pending(), c.finished(), c.total()), (4, 6, 10));
    }
}
