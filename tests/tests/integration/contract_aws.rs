//! The port contract on the AWS adapters, against the moto server that `scripts/test.sh`
//! starts on loopback (`FLEET_TEST_AWS_ENDPOINT`). See `fleet_tests::contract` for what moto
//! can and cannot check. IoT Jobs runs on moto as patched by `scripts/moto_server.py` (job ids
//! unique, thing groups expanded, counts and completion from the executions, cancel applied).

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::aws::jobs::{JOB_GROUP_PREFIX, MAX_EXECUTIONS_PAGE};
use fleet_shared::adapters::aws::{IotControlPlane, SignedClient};
use fleet_shared::model::{ExecutionStatus, JobStatus, NewJob, ThingName, MAX_JOB_TARGETS};
use fleet_shared::ports::JobsControl;
use fleet_tests::{contract, moto};

fleet_tests::port_contract!(
    #[ignore = "needs the moto server started by scripts/test.sh"]
    ports = moto::fresh_ports()
);

fleet_tests::jobs_contract!(
    #[ignore = "needs the moto server started by scripts/test.sh"]
    jobs = moto::fresh_jobs()
);

fleet_tests::campaigns_contract!(
    #[ignore = "needs the moto server started by scripts/test.sh"]
    campaigns = moto::fresh_campaigns()
);

/// More targets than a job may name: the adapter puts them in the job's own thing group and
/// the job targets the group; every thing gets an execution, listed over several pages and
/// counted by DescribeJob; cancelling cancels them all.
#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn a_job_over_the_target_limit_reaches_every_thing_through_its_thing_group() -> Result<()> {
    // GIVEN 150 registered things (a group holds only things the registry knows)
    const THINGS: usize = 150;
    let sdk = moto::sdk_config().await?;
    let registry = IotControlPlane::new(&sdk)?;
    let id = contract::job_id("contract-job-group")?;
    let things: Vec<ThingName> =
        (0..THINGS).map(|n| ThingName::parse(&format!("{id}-{n:03}"))).collect::<Result<_, _>>()?;
    for thing in &things {
        registry.create_thing(thing).await?;
    }
    ensure!(THINGS > MAX_JOB_TARGETS && THINGS > 64);
    let jobs = moto::fresh_jobs().await?.page_size(64);

    // WHEN a job is created for all of them
    let job = NewJob {
        job_id: id.clone(),
        targets: things.iter().rev().cloned().collect(),
        document: serde_json::json!({"operation": "install", "firmware": "2.1.0"}),
        description: "over the target limit".into(),
        max_per_minute: Some(100),
        in_progress_timeout_minutes: Some(60),
    };
    jobs.create_job(&job).await?;

    // THEN the job targets one thing group, its own
    let iot = SignedClient::new(&sdk, "iot", "AWS_ENDPOINT_URL_IOT", "iot")?;
    let described: serde_json::Value = serde_json::from_slice(
        &iot.call("test DescribeJob", "GET", &format!("/jobs/{id}"), &[], &[]).await?,
    )?;
    let group_arn =
        format!("arn:aws:iot:{}:{}:thinggroup/{JOB_GROUP_PREFIX}{id}", moto::REGION, moto::ACCOUNT);
    ensure!(
        described["job"]["targets"] == serde_json::json!([group_arn]),
        "targets {}",
        described["job"]["targets"]
    );
    // AND every thing has a queued execution, read over three pages, in thing order
    ensure!(THINGS.div_ceil(64) == 3 && 64 < MAX_EXECUTIONS_PAGE);
    let listed = jobs.job_executions(&id).await?;
    let expected: Vec<_> = things.iter().map(|t| (t.clone(), ExecutionStatus::Queued)).collect();
    ensure!(listed == expected, "{} executions listed, first {:?}", listed.len(), listed.first());
    let progress = jobs.job_progress(&id).await?.context("the job just created")?;
    ensure!(progress.status == JobStatus::InProgress, "status {:?}", progress.status);
    ensure!((progress.counts.queued, progress.counts.total()) == (150, 150), "counts {:?}", progress.counts);
    // AND a retried create is a conflict, which leaves the group as it was
    let again = jobs.create_job(&job).await;
    ensure!(again.as_ref().is_err_and(|e| e.kind == fleet_shared::ErrorKind::Conflict), "{again:?}");
    let listed: BTreeSet<_> = jobs.job_executions(&id).await?.into_iter().map(|(t, _)| t).collect();
    ensure!(listed.len() == THINGS, "{} executions after the retry", listed.len());

    // WHEN it is cancelled THEN every execution is
    jobs.cancel_job(&id, false).await?;
    let progress = jobs.job_progress(&id).await?.context("the job just cancelled")?;
    ensure!(progress.status == JobStatus::Canceled, "status {:?}", progress.status);
    ensure!(
        (progress.counts.canceled, progress.counts.pending()) == (150, 0),
        "counts {:?}",
        progress.counts
    );

    // WHEN the campaign retires the settled job THEN its thing group is gone (a thing can be
    // in only 10 static groups), the executions stay, and a second retire changes nothing
    jobs.retire_job(&id).await?;
    let group = iot
        .call("test DescribeThingGroup", "GET", &format!("/thing-groups/{JOB_GROUP_PREFIX}{id}"), &[], &[])
        .await;
    ensure!(group.is_err(), "the group is still there: {group:?}");
    ensure!(jobs.job_executions(&id).await?.len() == THINGS, "executions lost with the group");
    jobs.retire_job(&id).await?;
    Ok(())
}

/// An unknown job cannot be cancelled (a permanent error: retrying cannot help).
#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn cancelling_an_unknown_job_is_a_permanent_error() -> Result<()> {
    let jobs = moto::fresh_jobs().await?;
    let refused = jobs.cancel_job(&contract::job_id("contract-job-nowhere")?, true).await;
    ensure!(refused.as_ref().is_err_and(|e| e.kind == fleet_shared::ErrorKind::Permanent), "{refused:?}");
    Ok(())
}
