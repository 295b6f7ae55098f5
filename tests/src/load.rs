//! The ingest function's real handler on the AWS adapters against moto, under the load the
//! issue names (SQS batches of 1,000 messages from 100 devices): every HTTP request the SDK
//! clients send is counted by operation (an interceptor, so SDK retries count too), and the
//! process CPU time of each invocation is measured. The request count is held by a test
//! (`tests/tests/integration/load_moto.rs`); the CPU figure only by the bench that prints it
//! (`cargo bench -p fleet-tests --features test-support --bench ingest_moto`, via
//! `scripts/bench-moto.sh`), which also runs the same handler with the SDK clients answered in
//! process ([`ingest_on_mocks`]) to separate the handler's own work from the network path.
//!
//! The runs are synchronous on a current-thread runtime, so it runs only when blocked on: to set
//! up, for the unmeasured warm-up batch, and for each measured invocation inside
//! [`handler_turn`]. Everything an invocation causes (the SDK's connection tasks included, on
//! this one thread) happens inside that call; what a connection task still had to do when the
//! previous call returned runs at the start of the next (negligible: the end of a response
//! already read). So the CPU clock read around it, and the instructions
//! `benches/ingest_instructions.rs` counts inside it by name under callgrind, are the
//! invocation's cost; [`pipeline_turn`] is the reference it is compared with.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
#[cfg(feature = "test-support")]
use aws_sdk_dynamodb::types::{AttributeValue, BatchStatementResponse};
#[cfg(feature = "test-support")]
use aws_smithy_mocks::{mock, mock_client, RuleMode};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use fleet_shared::adapters::aws::{
    DevicesTable, HealthTable, HotStore, S3Archive, TimestreamSink, REGISTRATION_CACHE_TTL,
};
use fleet_shared::ingest::{sim, IngestPolicy, OwnedInbound};
use fleet_shared::metrics::MetricsOut;
use fleet_shared::model::{Device, DeviceRegistration, ThingName};
use fleet_shared::ports::{
    DeviceAdmin, DeviceRegistry, HealthCounters, Quarantine, RawArchive, TelemetrySink,
};
use fleet_shared::time;
use ingest_telemetry::handler::{handle, Deps, Response};
use lambda_runtime::{Context as LambdaContext, LambdaEvent};
use serde_json::value::RawValue;
use tokio::runtime::Runtime;

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

/// Sleeps the thread for a while before each request is transmitted: a server that takes that
/// long to answer, without the server. The thread is asleep, so the pause itself costs no CPU
/// time; what it changes is that the handler resumes after an idle wait, as it does against
/// moto (requests go one at a time, as the sleep blocks the runtime's only thread).
#[cfg(feature = "test-support")]
#[derive(Debug, Clone, Copy)]
struct PauseBeforeTransmit(Duration);

#[cfg(feature = "test-support")]
impl Intercept for PauseBeforeTransmit {
    fn name(&self) -> &'static str {
        "PauseBeforeTransmit"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if !self.0.is_zero() {
            std::thread::sleep(self.0);
        }
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

/// A runtime for [`ingest_on_moto`] and [`ingest_on_mocks`]: one thread, as a Lambda function
/// with one vCPU or less has, so the process CPU clock measures one invocation at a time.
pub fn runtime() -> Result<Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Run `load` through the ingest handler on fresh moto resources, the devices registered.
pub fn ingest_on_moto(rt: &Runtime, load: Load) -> Result<LoadFigures> {
    let (deps, registrations, counter) = rt.block_on(moto_deps(load))?;
    run(rt, &deps, &registrations, load, &counter)
}

type AwsDeps = Deps<DevicesTable, HotStore, S3Archive, S3Archive, HealthTable>;

async fn moto_deps(load: Load) -> Result<(AwsDeps, Vec<(ThingName, DeviceRegistration)>, RequestCounter)> {
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
    let sink = load
        .timestream
        .then(|| TimestreamSink::new(timestream, &resources.telemetry_database, &resources.telemetry_table));
    let archive = S3Archive::new(s3, &resources.archive_bucket);
    let deps = ingest_deps(
        DevicesTable::new(dynamodb.clone(), &resources.devices_table)
            .caching_registrations(REGISTRATION_CACHE_TTL),
        HealthTable::new(dynamodb, &resources.health_table),
        sink,
        archive,
    );
    let registrations = sim::registrations(load.devices);
    deps.registry.register(&registrations).await?;
    Ok((deps, registrations, counter))
}

/// Run `load` through the same handler on the same AWS adapters, each SDK client answered in
/// process by aws-smithy-mocks (success, the devices registered): the SDK still builds,
/// serialises and signs every request, but nothing crosses a socket. Against
/// [`ingest_on_moto`], what the network and the server's connection handling cost the handler.
///
/// `pause`: how long each request waits before it is answered (see [`PauseBeforeTransmit`]:
/// the requests then go one at a time); zero answers at once.
#[cfg(feature = "test-support")]
pub fn ingest_on_mocks(rt: &Runtime, load: Load, pause: Duration) -> Result<LoadFigures> {
    let registrations = sim::registrations(load.devices);
    // Each thing's registration, and the firmware its simulated device reports (sim-00007: 7).
    let registered: HashMap<String, (DeviceRegistration, &'static str)> = registrations
        .iter()
        .enumerate()
        .map(|(i, (t, r))| (t.as_str().to_owned(), (r.clone(), sim::firmware(i))))
        .collect();
    let batch_get = mock!(aws_sdk_dynamodb::Client::batch_get_item).then_compute_output(move |req| {
        let mut out = aws_sdk_dynamodb::operation::batch_get_item::BatchGetItemOutput::builder();
        for (table, keys) in req.request_items().into_iter().flatten() {
            // Each device registered, with the state a batch a moment ago left (as on moto
            // after the warm-up batch).
            let last_ms = AttributeValue::N((time::now_ms() - 1_000).to_string());
            let items = keys.keys().iter().filter_map(|k| {
                let (registration, fw) = registered.get(k.get("thing")?.as_s().ok()?)?;
                let mut item = k.clone();
                match k.get("item")?.as_s().ok()?.as_str() {
                    "registration" => {
                        item.insert("class".into(), AttributeValue::S(registration.class.clone()));
                        item.insert("region".into(), AttributeValue::S(registration.region.clone()));
                        let at = registration.registered_at_ms.to_string();
                        item.insert("registered_at_ms".into(), AttributeValue::N(at));
                    }
                    "state" => {
                        item.insert("last_ts_ms".into(), last_ms.clone());
                        item.insert("last_rx_ms".into(), last_ms.clone());
                        item.insert("boot".into(), AttributeValue::N(sim::BOOT.to_string()));
                        item.insert("fw_reported".into(), AttributeValue::S((*fw).to_owned()));
                    }
                    _ => return None,
                }
                Some(item)
            });
            out = out.responses(table, items.collect());
        }
        out.build()
    });
    let statements = mock!(aws_sdk_dynamodb::Client::batch_execute_statement).then_compute_output(|req| {
        let applied = req.statements().iter().map(|_| BatchStatementResponse::builder().build());
        aws_sdk_dynamodb::operation::batch_execute_statement::BatchExecuteStatementOutput::builder()
            .set_responses(Some(applied.collect()))
            .build()
    });
    let update = mock!(aws_sdk_dynamodb::Client::update_item)
        .then_output(|| aws_sdk_dynamodb::operation::update_item::UpdateItemOutput::builder().build());
    let write = mock!(aws_sdk_timestreamwrite::Client::write_records).then_output(|| {
        aws_sdk_timestreamwrite::operation::write_records::WriteRecordsOutput::builder().build()
    });
    let put = mock!(aws_sdk_s3::Client::put_object)
        .then_output(|| aws_sdk_s3::operation::put_object::PutObjectOutput::builder().build());
    let counter = RequestCounter::default();
    let pause = PauseBeforeTransmit(pause);
    let dynamodb =
        mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&batch_get, &statements, &update], |conf| {
            conf.interceptor(counter.clone()).interceptor(pause)
        });
    let s3 = mock_client!(aws_sdk_s3, RuleMode::MatchAny, [&put], |conf| {
        conf.interceptor(counter.clone()).interceptor(pause)
    });
    let sink = load.timestream.then(|| {
        let client = mock_client!(aws_sdk_timestreamwrite, RuleMode::MatchAny, [&write], |conf| {
            conf.interceptor(counter.clone()).interceptor(pause)
        });
        TimestreamSink::new(client, "fleet", "telemetry")
    });
    let deps = ingest_deps(
        DevicesTable::new(dynamodb.clone(), "Devices").caching_registrations(REGISTRATION_CACHE_TTL),
        HealthTable::new(dynamodb, "Health"),
        sink,
        S3Archive::new(s3, "archive"),
    );
    run(rt, &deps, &registrations, load, &counter)
}

/// The ingest function's deps on these adapters (`HotStore=timestream` when a sink is given).
fn ingest_deps(
    registry: DevicesTable,
    health: HealthTable,
    timestream: Option<TimestreamSink>,
    archive: S3Archive,
) -> AwsDeps {
    Deps {
        registry,
        health,
        sink: timestream.map_or(HotStore::None, HotStore::Timestream),
        archive: archive.clone(),
        quarantine: archive,
        policy: IngestPolicy::default(),
        clock: time::now_ms,
        metrics: MetricsOut::Off,
    }
}

/// One unmeasured batch, then `load.batches` measured ones through `deps`' handler, each
/// followed by the in-memory pipeline on the same messages.
fn run<R, S, A, Q, H>(
    rt: &Runtime,
    deps: &Deps<R, S, A, Q, H>,
    registrations: &[(ThingName, DeviceRegistration)],
    load: Load,
    counter: &RequestCounter,
) -> Result<LoadFigures>
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
    H: HealthCounters,
{
    let devices: HashMap<ThingName, Device> = registrations
        .iter()
        .map(|(thing, registration)| {
            let device =
                Device { thing: thing.clone(), registration: Some(registration.clone()), state: None };
            (thing.clone(), device)
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
        let response = if k == 0 {
            // The warm-up, outside the two measured functions.
            rt.block_on(handle(deps, event)).context("handler failed")?
        } else {
            let before = process_cpu();
            let response = handler_turn(rt, deps, event).context("handler failed")?;
            let handled = process_cpu();
            pipeline_turn(&batch, &devices, &deps.policy, now);
            cpu += handled - before;
            in_memory_cpu += process_cpu() - handled;
            messages += batch.len();
            response
        };
        let Response::Sqs(r) = response else { anyhow::bail!("expected an SQS response") };
        ensure!(
            r.batch_item_failures.is_empty(),
            "batch {k}: {} messages failed",
            r.batch_item_failures.len()
        );
    }
    Ok(LoadFigures { batches: load.batches, messages, requests: counter.take(), cpu, in_memory_cpu })
}

/// One invocation of the handler, and the only place the runtime runs (see the module docs).
#[inline(never)]
pub fn handler_turn<R, S, A, Q, H>(
    rt: &Runtime,
    deps: &Deps<R, S, A, Q, H>,
    event: LambdaEvent<Box<RawValue>>,
) -> Result<Response>
where
    R: DeviceRegistry,
    S: TelemetrySink,
    A: RawArchive,
    Q: Quarantine,
    H: HealthCounters,
{
    Ok(rt.block_on(handle(deps, event))?)
}

/// The in-memory pipeline on the batch the handler just took: the reference.
#[inline(never)]
pub fn pipeline_turn(
    batch: &[OwnedInbound],
    devices: &HashMap<ThingName, Device>,
    policy: &IngestPolicy,
    now_ms: i64,
) -> usize {
    sim::in_memory_pipeline(batch, devices, policy, now_ms)
}
