//! IoT Jobs on the local IoT Core, end to end with real MQTT clients: a job created through
//! `JobsControl` (as an OTA campaign or `fleetctl` creates it, out of band) reaches a device on
//! `notify-next`, the device starts it and reports success over the Jobs MQTT API, the job
//! execution event reaches subscribers, `job_progress` counts it, and a report after success is
//! refused. A device cannot act on another thing's jobs.

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::embedded::LOCAL_ARN_PREFIX;
use fleet_shared::model::{ExecutionStatus, JobId, JobStatus, NewJob, ThingName};
use fleet_shared::ports::JobsControl;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{json, Value};

use crate::support::{client, start, until};

/// The next message on `topic`, as JSON.
async fn message(events: &mut EventLoop, topic: &str) -> Result<Value> {
    until(events, |e| match e {
        Event::Incoming(Packet::Publish(p)) if p.topic == topic => serde_json::from_slice(&p.payload).ok(),
        _ => None,
    })
    .await
    .with_context(|| format!("waiting for {topic}"))
}

async fn subscribed(client: &AsyncClient, events: &mut EventLoop, filter: &str) -> Result<()> {
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    until(events, |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_told_of_a_job_starts_it_and_reports_success_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stack = start(&dir.path().join("fleet.sqlite")).await?;
    let job = JobId::parse("fw-2-1-0-stage-1")?;
    let document =
        json!({"operation": "install", "fw": "2.1.0", "url": "https://firmware.example.com/2.1.0.bin"});

    // GIVEN an operator watching job execution events, and sensor-001 listening to its jobs topics
    let (operator, mut operator_events) = client(&stack, "ota-console", Some("operator"));
    subscribed(&operator, &mut operator_events, "$aws/events/jobExecution/+/+").await?;
    let (device, mut events) = client(&stack, "sensor-001", None);
    subscribed(&device, &mut events, "$aws/things/sensor-001/jobs/#").await?;

    // WHEN a job for sensor-001 and sensor-002 is created through the control plane
    stack
        .store
        .create_job(&NewJob {
            job_id: job.clone(),
            targets: vec![ThingName::parse("sensor-001")?, ThingName::parse("sensor-002")?],
            document: document.clone(),
            description: "stage 1".into(),
            max_per_minute: None,
            in_progress_timeout_minutes: Some(30),
        })
        .await?;

    // THEN the device is told on notify-next (by the service's timer)
    let next = message(&mut events, "$aws/things/sensor-001/jobs/notify-next").await?;
    ensure!(next["execution"]["jobId"] == job.as_str(), "{next}");
    ensure!(next["execution"]["status"] == "QUEUED", "{next}");

    // WHEN it starts its next execution
    device
        .publish("$aws/things/sensor-001/jobs/start-next", QoS::AtLeastOnce, false, r#"{"clientToken":"s1"}"#)
        .await?;
    let started = message(&mut events, "$aws/things/sensor-001/jobs/start-next/accepted").await?;
    // THEN the answer carries the job document, and the execution is in progress
    ensure!(started["clientToken"] == "s1", "{started}");
    ensure!(started["execution"]["jobDocument"] == document, "{started}");
    ensure!(started["execution"]["status"] == "IN_PROGRESS", "{started}");
    ensure!(started["execution"]["thingName"] == "sensor-001", "{started}");
    let version = started["execution"]["versionNumber"].as_u64().context("versionNumber")?;

    // WHEN it reports progress and cancels the step timer (AWS's -1)
    let update = format!("$aws/things/sensor-001/jobs/{job}/update");
    let progress = json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": -1, "expectedVersion": version,
                          "includeJobExecutionState": true, "clientToken": "p1"});
    device.publish(&update, QoS::AtLeastOnce, false, progress.to_string()).await?;
    // THEN the update is accepted
    let accepted = message(&mut events, &format!("{update}/accepted")).await?;
    ensure!(accepted["clientToken"] == "p1", "{accepted}");
    let version = accepted["executionState"]["versionNumber"].as_u64().context("versionNumber")?;

    // WHEN it reports success with the version it holds
    let done = json!({"status": "SUCCEEDED", "expectedVersion": version, "statusDetails": {"fw": "2.1.0"},
                      "clientToken": "u1"});
    device.publish(&update, QoS::AtLeastOnce, false, done.to_string()).await?;
    // THEN the update is accepted
    let accepted = message(&mut events, &format!("{update}/accepted")).await?;
    ensure!(accepted["clientToken"] == "u1", "{accepted}");
    // AND the job execution event reaches subscribers in AWS's format
    let event = message(&mut operator_events, &format!("$aws/events/jobExecution/{job}/succeeded")).await?;
    ensure!(event["eventType"] == "JOB_EXECUTION" && event["status"] == "SUCCEEDED", "{event}");
    ensure!(event["thingArn"] == format!("{LOCAL_ARN_PREFIX}:thing/sensor-001"), "{event}");
    ensure!(event["statusDetails"] == json!({"fw": "2.1.0"}), "{event}");
    // AND the control plane counts one success and one execution still queued
    let progress = stack.store.job_progress(&job).await?.context("the job")?;
    ensure!(progress.status == JobStatus::InProgress, "{progress:?}");
    ensure!(
        (progress.counts.succeeded, progress.counts.queued, progress.counts.total()) == (1, 1, 2),
        "{progress:?}"
    );

    // WHEN it reports success a second time
    device.publish(&update, QoS::AtLeastOnce, false, r#"{"status":"SUCCEEDED","clientToken":"u2"}"#).await?;
    // THEN it is refused: the execution is terminal
    let rejected = message(&mut events, &format!("{update}/rejected")).await?;
    ensure!(rejected["code"] == "InvalidStateTransition", "{rejected}");
    ensure!(rejected["clientToken"] == "u2", "{rejected}");
    ensure!(rejected["executionState"]["status"] == "SUCCEEDED", "{rejected}");

    // WHEN sensor-001 tries to start sensor-002's execution, or to publish a jobs answer
    device.publish("$aws/things/sensor-002/jobs/start-next", QoS::AtLeastOnce, false, "{}").await?;
    device.publish("$aws/things/sensor-001/jobs/notify-next", QoS::AtLeastOnce, false, "{}").await?;
    for _ in 0..2 {
        until(&mut events, |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await?;
    }
    let stats = std::sync::Arc::clone(&stack.stats);
    let store = stack.store.clone();
    stack.shutdown().await?;
    // THEN both were refused and sensor-002's execution is still queued
    ensure!(stats.snapshot(0).refused_by_policy == 2, "{:?}", stats.snapshot(0));
    let executions = store.job_executions(&job).await?;
    ensure!(
        executions
            == [
                (ThingName::parse("sensor-001")?, ExecutionStatus::Succeeded),
                (ThingName::parse("sensor-002")?, ExecutionStatus::Queued)
            ],
        "{executions:?}"
    );
    Ok(())
}
