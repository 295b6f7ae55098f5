//! The ingest function's real handler on the AWS adapters against moto, under the load the
//! issue names (SQS batches of 1,000 messages from 100 devices): every HTTP request the SDK
//! clients send is counted by operation (an interceptor, so SDK retries count too), and the
//! process CPU time of each invocation is measured. The request count is held by a test
//! (`tests/tests/load_moto.rs`); the CPU figure only by the bench that prints it
//! (`cargo bench -p fleet-tests --bench ingest_moto`, via `scripts/bench-moto.sh`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use fleet_shared::adapters::aws::{DevicesTable, HealthTable, HotStore, S3Archive, TimestreamSink};
use fleet_shared::ingest::{sim, IngestPolicy, OwnedInbound};
use fleet_shared::metrics::MetricsOut;
use fleet_shared::model::{Device, ThingName};
use fleet_shared::ports::DeviceAdmin;
use fleet_shared::time;
use ingest_telemetry::handler::{handle, Deps, Response};
use lambda_runtime::{Context as LambdaContext, LambdaEvent};
use serde_json::value::RawValue;

use crate::moto;

/// Counts the requests SDK clients transmit, by `service:operation`.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter(Arc<Mutex<BTreeMap<String, usize>>>);

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let op =
            cfg.load::<Metadata>().map_or("unknown".to_owned(), |m| format!("{}:{}", m.service(), m.name()));
        *self.0.lock().expect("counter lock").entry(op).or_default() += 1;
        Ok(())
    }
}

impl RequestCounter {
    /// The counts so far, and start again from zero.
    pub fn take(&self) -> BTreeMap<String, usize> {
        std::mem::take(&mut *self.0.lock().expect("counter lock"))
    }
}

/// This process's CPU time (all threads).
pub fn process_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_PROCESS_CPUTIME_ID exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What a run of batches through the handler took.
#[derive(Debug, Clone)]
pub struct LoadFigures {
    pub batches: usize,
    pub messages: usize,
    /// HTTP requests sent, by `service:operation`.
    pub requests: BTreeMap<String, usize>,
    /// Process CPU time spent inside the handler.
    pub cpu: Duration,
    /// Process CPU time of the in-memory pipeline ([`sim::in_memory_pipeline`]) on a copy of
    /// the same batches, each measured right after the handler took it: the same messages
    /// under the same conditions (fresh data, warm code), with no store behind it.
    pub in_memory_cpu: Duration,
}

impl LoadFigures {
    pub fn total_requests(&self) -> usize {
        self.requests.values().sum()
    }

    pub fn requests_per_1000_messages(&self) -> f64 {
        self.total_requests() as f64 * 1_000.0 / self.messages as f64
    }

    pub fn cpu_per_message(&self) -> Duration {
        self.cpu / self.messages as u32
    }

    pub fn in_memory_cpu_per_message(&self) -> Duration {
        self.in_memory_cpu / self.messages as u32
    }
}

/// The SQS event Lambda delivers for `batch`.
pub fn sqs_event(batch: &[OwnedInbound]) -> Result<Box<RawValue>> {
    let mut event = SqsEvent::default();
    event.records = batch
        .iter()
        .map(|m| {
            let mut r = SqsMessage::default();
            r.message_id = Some(m.message_id.clone());
            r.body = Some(String::from_utf8(m.body.clone()).expect("simulated bodies are UTF-8"));
            r.attributes.insert("SentTimestamp".into(), m.received_ms.to_string());
            r.event_source = Some("aws:sqs".into());
            r
        })
        .collect();
    Ok(RawValue::from_string(serde_json::to_string(&event)?)?)
}

/// The shape of a load run.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub devices: usize,
    pub messages_per_batch: usize,
    /// Measured batches, after one unmeasured batch that opens connections and creates each
    /// device's state item (a warm function in the steady state).
    pub batches: usize,
    /// Write Timestream too (`HotStore=timestream`), or only the archive (`none`).
    pub timestream: bool,
}

/// Run `load` through the ingest handler on fresh moto resources, the devices registered.
pub async fn ingest_on_moto(load: Load) -> Result<LoadFigures> {
    let resources = moto::fresh_resources().await?;
    let sdk = moto::sdk_config().await?;
    let counter = RequestCounter::default();
    let dynamodb = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk).interceptor(counter.clone()).build(),
    );
    let timestream = aws_sdk_timestreamwrite::Client::from_conf(
        aws_sdk_timestreamwrite::config::Builder::from(&sdk).interceptor(counter.clone()).build(),
    );
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true).interceptor(counter.clone()).build(),
    );
    let archive = S3Archive::new(s3, &resources.archive_bucket);
    let deps = Deps {
        registry: DevicesTable::new(dynamodb.clone(), &resources.devices_table),
        health: HealthTable::new(dynamodb, &resources.health_table),
        sink: if load.timestream {
            HotStore::Timestream(TimestreamSink::new(
                timestream,
                &resources.telemetry_database,
                &resources.telemetry_table,
            ))
        } else {
            HotStore::None
        },
        archive: archive.clone(),
        quarantine: archive,
        policy: IngestPolicy::default(),
        clock: time::now_ms,
        metrics: MetricsOut::Off,
    };
    let registrations = sim::registrations(load.devices);
    deps.registry.register(&registrations).await?;
    let devices: HashMap<ThingName, Device> = registrations
        .into_iter()
        .map(|(thing, registration)| {
            (thing.clone(), Device { thing, registration: Some(registration), state: None })
        })
        .collect();

    let per_device = (load.messages_per_batch / load.devices) as u64;
    let (mut cpu, mut in_memory_cpu) = (Duration::ZERO, Duration::ZERO);
    let mut messages = 0;
    for k in 0..=load.batches {
        if k == 1 {
            counter.take();
        }
        let now = time::now_ms();
        let batch = sim::fleet_batch_from(
            load.devices,
            load.messages_per_batch,
            1 + k as u64 * per_device,
            now,
            k as u64 + 1,
        );
        let event = LambdaEvent::new(sqs_event(&batch)?, LambdaContext::default());
        let before = process_cpu();
        let response = handle(&deps, event).await.context("handler failed")?;
        let handled = process_cpu();
        sim::in_memory_pipeline(&batch, &devices, &deps.policy, now);
        if k > 0 {
            cpu += handled - before;
            in_memory_cpu += process_cpu() - handled;
            messages += batch.len();
        }
        let Response::Sqs(r) = response else { anyhow::bail!("expected an SQS response") };
        ensure!(
            r.batch_item_failures.is_empty(),
            "batch {k}: {} messages failed",
            r.batch_item_failures.len()
        );
    }
    Ok(LoadFigures { batches: load.batches, messages, requests: counter.take(), cpu, in_memory_cpu })
}
