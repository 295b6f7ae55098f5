//! The port contract: behaviour every backend must show, written once ([`port_contract!`]
//! instantiates the whole suite for a backend) and run against the embedded store
//! (in-process) and the AWS adapters (on moto). Each check returns `Err` with what differed.
//! [`jobs_contract!`] does the same for IoT Jobs' control plane ([`JobsControl`]) and
//! [`campaigns_contract!`] for where OTA campaigns are kept ([`CampaignStore`]), on both
//! backends too. Job ids are made unique per test process: IoT Jobs never reuses one, and
//! moto's one registry outlives a test run.
//!
//! What moto cannot check is named, not faked: moto's Timestream only appends (no 100-record
//! limit, no key semantics, no queries), so on AWS the sink check proves only that a batch
//! over the request limit is taken with one status per reading; request chunking, conflicts
//! (`ExistingVersion`), retention rejections and bisection are checked against scripted
//! service answers in `shared/src/adapters/aws/mock_tests.rs`.

use anyhow::{bail, ensure, Context, Result};
use fleet_shared::ingest::{raw_object, Problem, QuarantineLine, Reason};
use fleet_shared::model::{
    DeviceRegistration, DeviceState, ExecutionStatus, JobId, JobStatus, MessageId, Metric, NewJob, Reading,
    ReadingFlags, ShadowName, StoredReading, ThingName, Twin,
};
use fleet_shared::ports::{
    Allowlist, ArchiveReader, AuditEvent, CampaignStore, CertMark, CertificateInventory, DeviceAdmin,
    DeviceCertStatus, DeviceRegistry, JobsControl, ProvisioningAudit, Quarantine, QuarantineReader,
    RawArchive, Reports, TelemetrySink, TwinPolicies, TwinStore, WriteStatus,
};
use fleet_shared::twin::{apply, sync, ShadowEvent, TwinChange, TwinEvent};

/// One backend's adapters for the contract: the devices table, the hot store, the archive
/// bucket (raw + quarantine), the twins table, the certificates table, presence (devices and
/// health tables), the health table, the commands table.
pub struct Ports<D, S, A, T, C, P, H, K> {
    pub devices: D,
    pub sink: S,
    pub archive: A,
    pub twins: T,
    pub certs: C,
    pub presence: P,
    pub health: H,
    pub commands: K,
}

/// The whole contract suite as tests, for the backend `ports()` builds. Extra attributes
/// (e.g. `#[ignore = "needs moto"]`) go on every test.
#[macro_export]
macro_rules! port_contract {
    ($(#[$attr:meta])* ports = $ports:expr) => {
        $crate::port_contract!(@one [$(#[$attr])*] $ports; registration_round_trips_and_lists_sorted(devices));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; enrichment_lookup_returns_known_and_omits_unknown(devices));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; device_state_only_moves_forward(devices));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; concurrent_state_writes_end_at_the_newest(devices));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; a_message_keeps_its_first_arrival_whoever_pins_it(devices));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; archive_put_is_idempotent_by_key(archive));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; quarantine_round_trips_lines_once(archive));
        $crate::port_contract!(@one [$(#[$attr])*] $ports;
            sink_accepts_a_batch_over_the_request_limit_with_one_status_per_reading(sink));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; twin_writes_are_conditional_on_the_revision(twins));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; drifting_twins_are_read_oldest_drift_first(twins));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; the_drift_summary_counts_drifting_twins_and_the_oldest_start(twins));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; drifting_pages_walk_every_drifting_twin_once(twins));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; twins_are_found_by_reported_firmware(twins));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; stale_desired_policies_are_set_replaced_and_removed_by_key(twins));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; a_serial_enrols_once_and_keeps_its_history(certs));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; devices_racing_for_one_serial_leave_one_winner(certs));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; a_provisioned_serial_rotates_only_from_its_certificate(certs));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; rotations_racing_from_one_certificate_leave_one_winner(certs));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; device_cert_status_round_trips_and_leaves_the_device_alone(devices));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; presence_is_written_only_over_the_presence_read(presence, health));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; health_counters_add_up_and_the_ledger_answers_windows(health));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; commands_are_sequenced_per_device_and_settled_once(commands));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; reports_are_written_under_reports_only(archive));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; expiring_certificates_are_read_by_window_only(certs));
        $crate::port_contract!(@one [$(#[$attr])*] $ports; the_audit_trail_and_claim_counters_keep_every_decision(certs));
    };
    (@one [$($attrs:tt)*] $ports:expr; $check:ident($a:ident, $b:ident)) => {
        #[tokio::test]
        $($attrs)*
        async fn $check() -> anyhow::Result<()> {
            let ports = $ports.await?;
            $crate::contract::$check(&ports.$a, &ports.$b).await
        }
    };
    (@one [$($attrs:tt)*] $ports:expr; $check:ident($port:ident)) => {
        #[tokio::test]
        $($attrs)*
        async fn $check() -> anyhow::Result<()> {
            let ports = $ports.await?;
            $crate::contract::$check(&ports.$port).await
        }
    };
}

/// The IoT Jobs control plane's contract ([`JobsControl`]) as tests, for the backend `jobs`
/// builds (a future that gives the adapter). Extra attributes go on every test.
#[macro_export]
macro_rules! jobs_contract {
    ($(#[$attr:meta])* jobs = $jobs:expr) => {
        $crate::jobs_contract!(@one [$(#[$attr])*] $jobs; a_job_is_created_once_with_every_target_queued);
        $crate::jobs_contract!(@one [$(#[$attr])*] $jobs; cancelling_a_job_cancels_its_queued_executions_once);
        $crate::jobs_contract!(@one [$(#[$attr])*] $jobs; a_job_without_targets_is_refused_as_permanent);
    };
    (@one [$($attrs:tt)*] $jobs:expr; $check:ident) => {
        #[tokio::test]
        $($attrs)*
        async fn $check() -> anyhow::Result<()> {
            let jobs = $jobs.await?;
            $crate::contract::$check(&jobs).await
        }
    };
}

/// The campaign store's contract ([`CampaignStore`]) as tests, for the backend `campaigns`
/// builds (a future that gives a store holding no campaign). Extra attributes go on every test.
#[macro_export]
macro_rules! campaigns_contract {
    ($(#[$attr:meta])* campaigns = $store:expr) => {
        $crate::campaigns_contract!(@one [$(#[$attr])*] $store; a_campaign_is_created_once_and_written_only_over_the_version_read);
        $crate::campaigns_contract!(@one [$(#[$attr])*] $store; campaigns_are_listed_newest_first);
    };
    (@one [$($attrs:tt)*] $store:expr; $check:ident) => {
        #[tokio::test]
        $($attrs)*
        async fn $check() -> anyhow::Result<()> {
            let store = $store.await?;
            $crate::contract::$check(&store).await
        }
    };
}

use crate::archive_objects;

pub fn thing(n: usize) -> ThingName {
    ThingName::parse(&format!("contract-{n:04}")).expect("valid thing name")
}

fn registration(class: &str) -> DeviceRegistration {
    DeviceRegistration {
        class: class.into(),
        region: "eu-west".into(),
        fw: "1.0.0".into(),
        registered_at_ms: 1_700_000_000_000,
    }
}

fn state(ts: i64, battery: Option<f64>) -> DeviceState {
    DeviceState {
        last_ts_ms: ts,
        last_rx_ms: ts + 10,
        boot: 1,
        seq: ts as u64,
        battery_pct: battery,
        fw: Some("1.0.1".into()),
    }
}

/// Registering more devices than one batch request holds; listing returns all, sorted; read by
/// key, the known ones among those asked, sorted, as the listing has them.
pub async fn registration_round_trips_and_lists_sorted<S: DeviceAdmin>(s: &S) -> Result<()> {
    let devices: Vec<_> = (0..30).rev().map(|n| (thing(n), registration("env"))).collect();
    s.register(&devices).await?;
    let listed = s.devices().await?;
    ensure!(listed.len() == 30, "listed {} devices, registered 30", listed.len());
    ensure!(listed.windows(2).all(|w| w[0].thing < w[1].thing), "not sorted by thing");
    let asked = [thing(12), thing(999), thing(3), thing(29), thing(3)];
    let among = s.devices_among(&asked).await?;
    let expected: Vec<_> = listed.iter().filter(|d| asked.contains(&d.thing)).cloned().collect();
    ensure!(among.len() == 3 && among == expected, "among {asked:?}: {among:?}");
    ensure!(s.devices_among(&[]).await?.is_empty(), "none asked, none read");
    let one = s.device(&thing(7)).await?.context("device 7 missing")?;
    ensure!(one.registration == Some(registration("env")), "registration differs: {:?}", one.registration);
    s.register(&[(thing(7), registration("gateway"))]).await?;
    let again = s.device(&thing(7)).await?.context("device 7 missing")?;
    ensure!(again.class() == "gateway", "re-registration not applied: {}", again.class());
    ensure!(s.device(&thing(999)).await?.is_none(), "unknown device found");
    Ok(())
}

/// The enrichment lookup spans several requests and omits unknown things.
pub async fn enrichment_lookup_returns_known_and_omits_unknown<S: DeviceAdmin + DeviceRegistry>(
    s: &S,
) -> Result<()> {
    let registered: Vec<_> = (100..160).map(|n| (thing(n), registration("env"))).collect();
    s.register(&registered).await?;
    let asked: Vec<ThingName> = (100..220).map(thing).collect();
    let found = s.get_many(&asked).await?;
    ensure!(found.len() == 60, "found {} of 60 registered", found.len());
    ensure!(found.values().all(|d| d.class() == "env"), "wrong class");
    ensure!(!found.contains_key(&thing(200)), "unknown thing returned");
    Ok(())
}

/// Device state only moves forward in time; a missing battery keeps the last one.
pub async fn device_state_only_moves_forward<S: DeviceAdmin + DeviceRegistry>(s: &S) -> Result<()> {
    let t = thing(300);
    s.register(&[(t.clone(), registration("env"))]).await?;
    let failed = s.record_states(&[(t.clone(), state(2_000, Some(80.0)))]).await;
    ensure!(failed.is_empty(), "state write failed: {failed:?}");
    let failed = s.record_states(&[(t.clone(), state(1_000, Some(99.0)))]).await;
    ensure!(failed.is_empty(), "an older state must be ignored, not fail: {failed:?}");
    let d = s.device(&t).await?.context("device missing")?;
    ensure!(d.state == Some(state(2_000, Some(80.0))), "older state applied: {:?}", d.state);
    s.record_states(&[(t.clone(), state(3_000, None))]).await;
    let d = s.device(&t).await?.context("device missing")?;
    let st = d.state.context("no state")?;
    ensure!(st.last_ts_ms == 3_000 && st.battery_pct == Some(80.0), "newer state wrong: {st:?}");
    ensure!(d.registration == Some(registration("env")), "state write touched the registration");
    // a thing only known from telemetry becomes a device without registration
    let stray = thing(301);
    s.record_states(&[(stray.clone(), state(5, None))]).await;
    let d = s.device(&stray).await?.context("telemetry-only device missing")?;
    ensure!(d.registration.is_none() && d.state.is_some(), "stray device wrong: {d:?}");
    Ok(())
}

/// Invocations racing to record one new device's state (each creating it, or updating what
/// another created) end with the newest state, whatever order they land in.
pub async fn concurrent_state_writes_end_at_the_newest<S: DeviceAdmin + DeviceRegistry>(s: &S) -> Result<()> {
    let t = thing(400);
    let writes = [5_000, 9_000, 1_000, 7_000, 3_000, 8_000].map(|ts| {
        let states = vec![(t.clone(), state(ts, Some(ts as f64 / 100.0)))];
        async move { s.record_states(&states).await }
    });
    let failed: Vec<_> = futures_util::future::join_all(writes).await.into_iter().flatten().collect();
    ensure!(failed.is_empty(), "concurrent state writes failed: {failed:?}");
    let d = s.device(&t).await?.context("device missing")?;
    ensure!(d.state == Some(state(9_000, Some(90.0))), "not the newest state: {:?}", d.state);
    Ok(())
}

/// A skew-corrected message is pinned to its first arrival: a later copy gets the first
/// arrival back, other messages (another seq, boot or thing) their own, and copies racing to
/// pin one message all get the same answer.
pub async fn a_message_keeps_its_first_arrival_whoever_pins_it<S: DeviceRegistry>(s: &S) -> Result<()> {
    let id = |t: usize, boot: u32, seq: u64| MessageId { thing: thing(t), boot, seq };
    let first = s.first_arrivals(&[(id(500, 1, 7), 1_000), (id(500, 1, 8), 1_100)]).await;
    let first: Vec<i64> = first.into_iter().collect::<Result<_, _>>()?;
    ensure!(first == [1_000, 1_100], "new messages pin their own arrival: {first:?}");
    // 30 messages in one call: more than one request's worth of statements on DynamoDB
    let mut arrivals = vec![(id(500, 1, 7), 5_000), (id(500, 2, 7), 5_000), (id(501, 1, 7), 5_000)];
    arrivals.extend((100..127).map(|seq| (id(502, 1, seq), 6_000)));
    let again: Vec<i64> = s.first_arrivals(&arrivals).await.into_iter().collect::<Result<_, _>>()?;
    ensure!(
        again[..3] == [1_000, 5_000, 5_000],
        "a copy gets the first arrival, others their own: {again:?}"
    );
    ensure!(again[3..].iter().all(|&rx| rx == 6_000), "{again:?}");
    // copies of one message racing to pin it
    let racing = [9_000, 9_500, 8_000, 9_900, 8_500].map(|rx| {
        let arrival = [(id(503, 1, 1), rx)];
        async move { s.first_arrivals(&arrival).await }
    });
    let answers: Vec<i64> =
        futures_util::future::join_all(racing).await.into_iter().flatten().collect::<Result<_, _>>()?;
    ensure!(
        answers.len() == 5 && answers.windows(2).all(|w| w[0] == w[1]),
        "racing copies disagree: {answers:?}"
    );
    ensure!([9_000, 9_500, 8_000, 9_900, 8_500].contains(&answers[0]), "{answers:?}");
    Ok(())
}

/// The same archive object written twice is one object with the same bytes.
pub async fn archive_put_is_idempotent_by_key<S: RawArchive + ArchiveReader>(s: &S) -> Result<()> {
    let object = raw_object([&b"{\"a\":1}"[..], b"{\"b\":2}"], 1_764_000_000_000).context("object")?;
    s.put_raw(&object).await?;
    s.put_raw(&object).await?;
    let stored = archive_objects(s, "raw/").await?;
    ensure!(stored.len() == 1, "{} objects after two identical puts", stored.len());
    ensure!(stored.get(object.key()).map(Vec::as_slice) == Some(object.body()), "stored bytes differ");
    Ok(())
}

/// Quarantined lines come back once each, original bytes intact (UTF-8 or not).
pub async fn quarantine_round_trips_lines_once<S: Quarantine + QuarantineReader>(s: &S) -> Result<()> {
    let problem = |r| vec![Problem::new(r, Some("m".into()), "detail")];
    let lines = vec![
        QuarantineLine::new(
            "q-1",
            1_764_000_000_000,
            Some("t1".into()),
            problem(Reason::NoMetrics),
            b"{\"m\":{}}",
        ),
        QuarantineLine::new(
            "q-2",
            1_764_000_000_001,
            None,
            problem(Reason::MalformedJson),
            &[0xff, 0x00, 0x7b],
        ),
    ];
    s.put_quarantined(&lines, 1_764_000_000_000).await?;
    s.put_quarantined(&lines, 1_764_000_000_000).await?;
    let back = s.quarantined(0).await?;
    ensure!(back.len() == 2, "{} lines after putting 2 twice", back.len());
    ensure!(back == lines, "lines differ: {back:?}");
    ensure!(back[1].original() == vec![0xff, 0x00, 0x7b], "binary payload altered");
    Ok(())
}

pub fn reading(n: usize) -> StoredReading {
    StoredReading {
        reading: Reading {
            id: MessageId { thing: thing(n % 10), boot: 1, seq: n as u64 },
            time_ms: 1_764_000_000_000 + n as i64,
            device_time_ms: 1_764_000_000_000 + n as i64,
            rx_ms: 1_764_000_000_100 + n as i64,
            fw: Some("1.0.0".into()),
            metrics: vec![
                Metric { name: "temp_c".into(), value: 20.5 },
                Metric { name: "hum_pct".into(), value: 41.0 },
            ],
            battery_pct: Some(77.0),
            uptime_s: Some(3600),
            test: n.is_multiple_of(2),
            flags: ReadingFlags::default(),
            schema_version: 1,
        },
        class: "env".into(),
        region: None,
        enrichment_version: 1,
    }
}

/// A write over the per-request limit succeeds with one status per reading, and writing the
/// same readings again is never a failure.
pub async fn sink_accepts_a_batch_over_the_request_limit_with_one_status_per_reading<S: TelemetrySink>(
    s: &S,
) -> Result<()> {
    let readings: Vec<_> = (0..250).map(reading).collect();
    let statuses = s.write(&readings).await;
    ensure!(statuses.len() == 250, "{} statuses for 250 readings", statuses.len());
    let written = statuses.iter().filter(|s| **s == WriteStatus::Written).count();
    ensure!(
        written == 250,
        "{written} of 250 written: {:?}",
        statuses.iter().find(|s| **s != WriteStatus::Written)
    );
    // replaying can only ever be written (same record) or a duplicate, never a failure
    let again = s.write(&readings).await;
    ensure!(
        again.iter().all(|s| matches!(s, WriteStatus::Written | WriteStatus::Duplicate)),
        "replay failed: {:?}",
        again.iter().find(|s| !s.is_stored())
    );
    Ok(())
}

/// A different payload under a stored `(thing, boot, seq)` is a conflict, and the stored
/// reading stays as it was. (Timestream's side of this is scripted in the mock tests.)
pub async fn sink_reports_another_payload_under_a_stored_key_as_a_conflict<S: TelemetrySink>(
    s: &S,
) -> Result<()> {
    let original = reading(7);
    ensure!(s.write(std::slice::from_ref(&original)).await == [WriteStatus::Written], "first write");
    let mut other = original.clone();
    other.reading.metrics[0].value = 99.0;
    let status = s.write(&[other]).await;
    ensure!(
        status[0].kind() == Some(fleet_shared::ErrorKind::Conflict),
        "another payload under the same key: {:?}",
        status[0]
    );
    let mut redelivered = original.clone();
    redelivered.reading.rx_ms += 5_000;
    ensure!(s.write(&[redelivered]).await == [WriteStatus::Duplicate], "a redelivery is a duplicate");
    Ok(())
}

/// A documents event for `thing`'s `shadow` at `version`, desired fw `d`, reported fw `r`.
fn shadow_update(
    thing: &ThingName,
    shadow: &str,
    version: u64,
    d: &str,
    r: &str,
    at_s: i64,
) -> Result<TwinEvent> {
    let doc = serde_json::json!({"state":{"desired":{"fw":d},"reported":{"fw":r}},
        "metadata":{"desired":{"fw":{"timestamp":at_s}}},"version":version});
    Ok(TwinEvent {
        thing: thing.clone(),
        shadow: ShadowName::parse(shadow)?,
        event: ShadowEvent::Updated {
            previous: None,
            current: Box::new(serde_json::from_value(doc)?),
            at_ms: at_s * 1000,
        },
    })
}

/// A twin is created once, then written only over the revision it was read at; named and
/// classic shadows of one thing are separate twins.
pub async fn twin_writes_are_conditional_on_the_revision<S: TwinStore>(s: &S) -> Result<()> {
    let t = thing(500);
    let (twin, _) = apply(None, &shadow_update(&t, "", 1, "2", "1", 1_000)?);
    let first = Twin { revision: 1, ..twin.clone() };
    ensure!(s.put_twin(&first).await?, "a new twin was not created");
    ensure!(!s.put_twin(&first).await?, "a second create over an existing twin succeeded");
    let (newer, _) = apply(Some(first.clone()), &shadow_update(&t, "", 2, "2", "2", 2_000)?);
    let second = Twin { revision: 2, ..newer };
    ensure!(s.put_twin(&second).await?, "a write over the revision read failed");
    ensure!(
        !s.put_twin(&Twin { revision: 2, ..first.clone() }).await?,
        "a write over a stale revision succeeded"
    );
    let stored = s.twin(&t, &ShadowName::classic()).await?.context("twin missing")?;
    ensure!(stored == second, "stored twin differs: {stored:?}");
    ensure!(
        s.twin(&t, &ShadowName::parse("config")?).await?.is_none(),
        "a named shadow that was never written"
    );
    let change = sync(s, &shadow_update(&t, "config", 1, "a", "b", 3_000)?).await?;
    ensure!(change == TwinChange::Applied, "named shadow not applied: {change:?}");
    let named = s.twin(&t, &ShadowName::parse("config")?).await?.context("named twin missing")?;
    ensure!(named.version == 1 && named.drift_since_ms == Some(3_000_000), "named twin wrong: {named:?}");
    Ok(())
}

/// Drifting twins come back oldest drift first, up to the limit; twins in sync never.
pub async fn drifting_twins_are_read_oldest_drift_first<S: TwinStore>(s: &S) -> Result<()> {
    let base = 1_700_000_000; // seconds; far before any other contract twin
    for (n, (d, r, at_s)) in
        [("2", "1", 30), ("1", "1", 10), ("2", "0", 20), ("1", "2", 40)].into_iter().enumerate()
    {
        sync(s, &shadow_update(&thing(600 + n), "", 1, d, r, base + at_s)?).await?;
    }
    let drifting = s.drifting_since((base + 35) * 1000, 100).await?;
    let names: Vec<&str> = drifting.iter().map(|t| t.thing.as_str()).collect();
    ensure!(names == ["contract-0602", "contract-0600"], "drifting since before base+35 s: {names:?}");
    // back in sync: no longer listed
    sync(s, &shadow_update(&thing(602), "", 2, "2", "2", base + 50)?).await?;
    let drifting = s.drifting_since((base + 35) * 1000, 1).await?;
    let names: Vec<&str> = drifting.iter().map(|t| t.thing.as_str()).collect();
    ensure!(names == ["contract-0600"], "after contract-0602 caught up, limit 1: {names:?}");
    Ok(())
}

/// The drift summary counts every drifting twin and the oldest start, and lets go of a twin
/// back in sync (relative to what other checks left in the shared store).
pub async fn the_drift_summary_counts_drifting_twins_and_the_oldest_start<S: TwinStore>(s: &S) -> Result<()> {
    let before = s.drift_summary().await?;
    // GIVEN two twins drifting, one since before anything else in the store
    let oldest_s = 1_000; // seconds
    sync(s, &shadow_update(&thing(800), "", 1, "2", "1", oldest_s)?).await?;
    sync(s, &shadow_update(&thing(801), "", 1, "2", "1", 1_600_000_000)?).await?;
    // WHEN the summary is read
    let during = s.drift_summary().await?;
    // THEN both count and the oldest start is the first one's
    ensure!(during.drifting == before.drifting + 2, "{before:?} then {during:?}");
    ensure!(during.oldest_since_ms == Some(oldest_s * 1000), "oldest: {during:?}");
    // WHEN both catch up
    sync(s, &shadow_update(&thing(800), "", 2, "2", "2", oldest_s + 5)?).await?;
    sync(s, &shadow_update(&thing(801), "", 2, "2", "2", 1_600_000_005)?).await?;
    // THEN the summary is what it was
    let after = s.drift_summary().await?;
    ensure!(after == before, "{before:?} then, after catching up, {after:?}");
    Ok(())
}

/// Paging through the drift index meets every twin drifting since before the bound exactly
/// once, however small the pages, and none that drifts later or not at all.
pub async fn drifting_pages_walk_every_drifting_twin_once<S: TwinStore>(s: &S) -> Result<()> {
    // GIVEN 37 twins drifting since 1..=37 s, one drifting later, one in sync
    for n in 0..37 {
        sync(s, &shadow_update(&thing(900 + n), "", 1, "2", "1", 1 + n as i64)?).await?;
    }
    sync(s, &shadow_update(&thing(990), "", 1, "2", "1", 10_000)?).await?;
    sync(s, &shadow_update(&thing(991), "", 1, "2", "2", 5)?).await?;
    // WHEN they are read in pages of 5 up to 100 s
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let (page, next) = s.drifting_page(100_000, cursor, 5).await?;
        seen.extend(page.into_iter().map(|t| t.thing.to_string()));
        pages += 1;
        ensure!(pages < 100, "the pages never end");
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    // THEN each of the 37 comes exactly once
    seen.sort();
    let want: Vec<String> = (0..37).map(|n| thing(900 + n).to_string()).collect();
    ensure!(seen == want, "{} seen: {seen:?}", seen.len());
    Ok(())
}

/// Twins are found by the firmware they report, and leave that answer when they report another.
pub async fn twins_are_found_by_reported_firmware<S: TwinStore>(s: &S) -> Result<()> {
    for (n, fw) in [(700, "3.0.0"), (701, "3.0.1"), (702, "3.0.0")] {
        sync(s, &shadow_update(&thing(n), "", 1, "3.0.1", fw, 1_000)?).await?;
    }
    let found = s.reporting_fw("3.0.0", 10).await?;
    let names: Vec<&str> = found.iter().map(|t| t.thing.as_str()).collect();
    ensure!(names == ["contract-0700", "contract-0702"], "fw 3.0.0: {names:?}");
    sync(s, &shadow_update(&thing(700), "", 2, "3.0.1", "3.0.1", 2_000)?).await?;
    let names: Vec<String> = s.reporting_fw("3.0.0", 10).await?.iter().map(|t| t.thing.to_string()).collect();
    ensure!(names == ["contract-0702"], "after 0700 updated: {names:?}");
    ensure!(s.reporting_fw("3.0.1", 1).await?.len() == 1, "limit");
    Ok(())
}

/// Stale-desired policies: set, replaced per key, removed; removing an absent one says so.
pub async fn stale_desired_policies_are_set_replaced_and_removed_by_key<S: TwinPolicies>(
    s: &S,
) -> Result<()> {
    use fleet_shared::model::StaleAction::{Release, Report};
    use fleet_shared::twin::policy::StalePolicy;
    ensure!(s.policies().await?.is_empty(), "a fresh store has no policies");
    // GIVEN two policies, then mode's replaced
    s.set_policy(&StalePolicy::new("mode", 3_600_000, Report)?).await?;
    s.set_policy(&StalePolicy::new("fw", 86_400_000, Release)?).await?;
    s.set_policy(&StalePolicy::new("mode", 7_200_000, Release)?).await?;
    // THEN both are listed by key, mode with its new window and action
    let listed = s.policies().await?;
    ensure!(
        listed
            == [StalePolicy::new("fw", 86_400_000, Release)?, StalePolicy::new("mode", 7_200_000, Release)?],
        "{listed:?}"
    );
    // WHEN fw is removed, twice
    ensure!(s.remove_policy("fw").await?, "fw had a policy");
    ensure!(!s.remove_policy("fw").await?, "fw has no policy any more");
    // THEN only mode is left
    let left: Vec<String> = s.policies().await?.into_iter().map(|p| p.key).collect();
    ensure!(left == ["mode"], "{left:?}");
    Ok(())
}

fn allow(serial: &str) -> Result<fleet_shared::model::AllowlistEntry> {
    Ok(fleet_shared::model::AllowlistEntry {
        serial: ThingName::parse(serial)?,
        class: "env-sensor".into(),
        region: "eu-west".into(),
        added_ms: 1,
        enrolment: fleet_shared::model::Enrolment::Allowed,
    })
}

/// The allowlist: a serial enrols with one certificate (again with it: a retry), never with
/// another; a decommissioned one never; listing pages by serial; only unprovisioned entries
/// can be removed; re-adding keeps the enrolment.
pub async fn a_serial_enrols_once_and_keeps_its_history<S: Allowlist>(s: &S) -> Result<()> {
    use fleet_shared::model::{CertificateId, Enrolment};
    use fleet_shared::ports::Enrolled;
    let (a, b) = (CertificateId::of_der(b"a"), CertificateId::of_der(b"b"));
    let serial = |n: &str| ThingName::parse(n);
    s.allow(&[allow("s-1")?, allow("s-2")?, allow("s-3")?]).await?;
    ensure!(s.enrol(&serial("s-1")?, &a, 10).await? == Enrolled::Yes, "first enrolment");
    ensure!(s.enrol(&serial("s-1")?, &a, 11).await? == Enrolled::Yes, "a retry with the same certificate");
    ensure!(s.enrol(&serial("s-1")?, &b, 12).await? == Enrolled::Taken(a.clone()), "another certificate");
    ensure!(s.enrol(&serial("nope")?, &a, 12).await? == Enrolled::Unknown, "not listed");
    ensure!(s.decommission(&serial("s-2")?, 13).await?.is_some(), "s-2 was listed");
    ensure!(s.enrol(&serial("s-2")?, &b, 14).await? == Enrolled::Decommissioned, "decommissioned");
    // re-adding s-1 with another class keeps its enrolment
    let mut again = allow("s-1")?;
    again.class = "gateway".into();
    s.allow(&[again]).await?;
    let e = s.entry(&serial("s-1")?).await?.context("s-1")?;
    ensure!(e.class == "gateway", "class updated: {e:?}");
    ensure!(
        matches!(e.enrolment, Enrolment::Provisioned { ref certificate, at_ms: 10, .. } if *certificate == a),
        "{e:?}"
    );
    // an operator may put a provisioned serial back (its provisioning never completed)
    ensure!(!s.reset(&serial("s-3")?).await?, "s-3 is not provisioned");
    ensure!(s.reset(&serial("s-1")?).await?, "s-1 reset");
    ensure!(s.enrol(&serial("s-1")?, &b, 15).await? == Enrolled::Yes, "s-1 enrols with a new certificate");
    // only the unprovisioned s-3 can be removed
    ensure!(!s.disallow(&serial("s-1")?).await? && !s.disallow(&serial("s-2")?).await?, "history is kept");
    ensure!(s.disallow(&serial("s-3")?).await?, "s-3 removed");
    let first = s.entries(None, 1).await?;
    let rest = s.entries(first.last().map(|e| &e.serial), 10).await?;
    let names: Vec<String> = first.iter().chain(&rest).map(|e| e.serial.to_string()).collect();
    ensure!(names == ["s-1", "s-2"], "{names:?}");
    Ok(())
}

fn cert(n: u8, not_after_ms: i64) -> fleet_shared::model::Certificate {
    fleet_shared::model::Certificate {
        id: fleet_shared::model::CertificateId::of_der(&[n]),
        thing: ThingName::parse(&format!("dev-{n}")).ok(),
        serial: format!("{n:02x}"),
        issuer: "CN=ca".into(),
        subject: format!("CN=dev-{n}"),
        not_before_ms: 0,
        not_after_ms,
        status: fleet_shared::model::CertStatus::Active,
        recorded_ms: 1,
    }
}

/// A provisioned serial rotates from its certificate to a new one, once; from any other
/// certificate, or when it is not provisioned, it does not.
pub async fn a_provisioned_serial_rotates_only_from_its_certificate<S: Allowlist>(s: &S) -> Result<()> {
    use fleet_shared::model::{CertificateId, Enrolment};
    use fleet_shared::ports::Enrolled;
    let [a, b, c] = [b"a", b"b", b"c"].map(|d| CertificateId::of_der(d));
    let serial = |n: &str| ThingName::parse(n);
    s.allow(&[allow("r-1")?, allow("r-2")?, allow("r-3")?]).await?;
    ensure!(s.enrol(&serial("r-1")?, &a, 10).await? == Enrolled::Yes, "r-1 enrols with a");
    // r-1 rotates from a to b; again is a retry; from a to c is too late: b holds it
    ensure!(s.rotate(&serial("r-1")?, &a, &b, 20).await? == Enrolled::Yes, "a -> b");
    ensure!(s.rotate(&serial("r-1")?, &a, &b, 21).await? == Enrolled::Yes, "a retry");
    ensure!(s.rotate(&serial("r-1")?, &a, &c, 22).await? == Enrolled::Taken(b.clone()), "a is superseded");
    let e = s.entry(&serial("r-1")?).await?.context("r-1")?;
    ensure!(
        matches!(e.enrolment, Enrolment::Provisioned { ref certificate, at_ms: 20, .. } if *certificate == b),
        "r-1 is provisioned with b since 20: {e:?}"
    );
    ensure!(e.class == "env-sensor" && e.added_ms == 1, "the rest of the entry is kept: {e:?}");
    // a serial only allowed, decommissioned or unknown does not rotate
    ensure!(s.rotate(&serial("r-2")?, &a, &b, 23).await? == Enrolled::NotProvisioned, "r-2 is only allowed");
    ensure!(
        s.entry(&serial("r-2")?).await?.is_some_and(|e| e.enrolment == Enrolment::Allowed),
        "r-2 unchanged"
    );
    ensure!(s.enrol(&serial("r-3")?, &c, 24).await? == Enrolled::Yes, "r-3 enrols");
    ensure!(s.decommission(&serial("r-3")?, 25).await?.is_some(), "r-3 decommissioned");
    ensure!(
        s.rotate(&serial("r-3")?, &c, &a, 26).await? == Enrolled::Decommissioned,
        "r-3 is out of service"
    );
    ensure!(s.rotate(&serial("nope")?, &a, &b, 27).await? == Enrolled::Unknown, "not listed");
    Ok(())
}

/// Two rotations of one serial from its certificate at once: one wins, the other finds the
/// serial taken by the winner's certificate.
pub async fn rotations_racing_from_one_certificate_leave_one_winner<S: Allowlist>(s: &S) -> Result<()> {
    use fleet_shared::model::{CertificateId, Enrolment};
    use fleet_shared::ports::Enrolled;
    let [old, x, y] = [&b"old"[..], &b"x"[..], &b"y"[..]].map(CertificateId::of_der);
    let serial = ThingName::parse("race-rot")?;
    s.allow(&[allow("race-rot")?]).await?;
    ensure!(s.enrol(&serial, &old, 1).await? == Enrolled::Yes, "enrolled");
    let (rx, ry) = futures_util::join!(s.rotate(&serial, &old, &x, 2), s.rotate(&serial, &old, &y, 2));
    let (rx, ry) = (rx?, ry?);
    let e = s.entry(&serial).await?.context("entry")?;
    let Enrolment::Provisioned { certificate: winner, .. } = e.enrolment else { bail!("{e:?}") };
    let expected = if winner == x {
        (Enrolled::Yes, Enrolled::Taken(x.clone()))
    } else {
        (Enrolled::Taken(y.clone()), Enrolled::Yes)
    };
    ensure!((rx.clone(), ry.clone()) == expected, "winner {winner}: {rx:?} {ry:?}");
    Ok(())
}

/// The expiry window `[from, to)` returns exactly the certificates whose notAfter falls in it,
/// soonest first, across day boundaries.
pub async fn expiring_certificates_are_read_by_window_only<S: CertificateInventory>(s: &S) -> Result<()> {
    const DAY: i64 = 86_400_000;
    let t0 = 1_764_000_000_000;
    // GIVEN certificates expiring before, at the start of, inside (over three days), at the end
    // of, and after the window [t0, t0 + 3 days)
    let at = [t0 - 1, t0, t0 + DAY / 2, t0 + DAY + 5, t0 + 2 * DAY + 7, t0 + 3 * DAY - 1, t0 + 3 * DAY];
    for (n, ms) in at.iter().enumerate() {
        s.record(&cert(n as u8, *ms)).await?;
    }
    // WHEN the window is read
    let found = s.expiring(t0, t0 + 3 * DAY, 100).await?;
    // THEN the five inside, soonest first
    let got: Vec<i64> = found.iter().map(|c| c.not_after_ms).collect();
    ensure!(got == at[1..6], "{got:?}");
    ensure!(s.expiring(t0, t0 + 3 * DAY, 2).await?.len() == 2, "limit");
    // AND a certificate reads back whole; recording it again replaces it
    let mut c = cert(3, t0 + DAY + 5);
    ensure!(s.certificate(&c.id).await? == Some(c.clone()), "read back");
    c.status = fleet_shared::model::CertStatus::Inactive;
    s.record(&c).await?;
    ensure!(s.certificate(&c.id).await?.map(|c| c.status) == Some(c.status), "replaced");
    Ok(())
}

/// Every decision is in its serial's trail, in order; a claim certificate is listed once it
/// asked for the threshold of unknown serials.
pub async fn the_audit_trail_and_claim_counters_keep_every_decision<S: ProvisioningAudit>(
    s: &S,
) -> Result<()> {
    use fleet_shared::certs::hook::SUSPICIOUS_UNKNOWN_SERIALS;
    let event = |at_ms: i64, outcome: &str| AuditEvent {
        at_ms,
        serial: "s-9".into(),
        claim_certificate: "claim".into(),
        certificate: None,
        outcome: outcome.into(),
        reason: (outcome == "refused").then(|| "unknown_serial: s-9".to_owned()),
    };
    for (at, outcome) in [(5, "refused"), (6, "refused"), (7, "allowed")] {
        s.audit(&event(at, outcome)).await?;
    }
    let trail = s.trail("s-9").await?;
    ensure!(trail == [event(5, "refused"), event(6, "refused"), event(7, "allowed")], "{trail:?}");
    ensure!(s.trail("other").await?.is_empty(), "another serial's trail");
    for n in 1..SUSPICIOUS_UNKNOWN_SERIALS {
        ensure!(s.unknown_serial("claim-x", n as i64).await? == n, "count {n}");
    }
    ensure!(s.suspicious_claims().await?.is_empty(), "below the threshold");
    s.unknown_serial("claim-x", 99).await?;
    s.unknown_serial("claim-y", 99).await?;
    let listed = s.suspicious_claims().await?;
    ensure!(listed == [("claim-x".to_owned(), SUSPICIOUS_UNKNOWN_SERIALS)], "{listed:?}");
    Ok(())
}

/// A device's certificate status reads back as written, replaces the previous one, and does
/// not disturb the device's registration.
pub async fn device_cert_status_round_trips_and_leaves_the_device_alone<S: DeviceCertStatus + DeviceAdmin>(
    s: &S,
) -> Result<()> {
    use fleet_shared::certs::expiry::ExpiryClass;
    let t = thing(850);
    s.register(&[(t.clone(), registration("env-sensor"))]).await?;
    let mark = |class, not_after_ms| CertMark {
        certificate: fleet_shared::model::CertificateId::of_der(b"c"),
        class,
        not_after_ms,
        rotation_due: true,
        checked_ms: 5,
    };
    ensure!(s.cert_status(&t).await?.is_none(), "nothing checked yet");
    s.mark_cert_status(&[(t.clone(), mark(ExpiryClass::Warning, 100))]).await?;
    s.mark_cert_status(&[(t.clone(), mark(ExpiryClass::Critical, 100))]).await?;
    ensure!(s.cert_status(&t).await? == Some(mark(ExpiryClass::Critical, 100)), "the newest mark");
    let d = s.device(&t).await?.context("device")?;
    ensure!(d.registration.is_some_and(|r| r.class == "env-sensor"), "registration kept");
    // The rotation listing holds the marks due, and only those (other tests' devices aside).
    let not_due = CertMark { rotation_due: false, ..mark(ExpiryClass::Warning, 200) };
    s.mark_cert_status(&[(thing(852), not_due)]).await?;
    let mine = [t.clone(), thing(852)];
    let due: Vec<_> = s.rotation_due().await?.into_iter().filter(|(d, _)| mine.contains(d)).collect();
    ensure!(due == [(t.clone(), mark(ExpiryClass::Critical, 100))], "{due:?}");
    // A mark replaced by one not due leaves the listing; marked due again, it is back.
    s.mark_cert_status(&[(t.clone(), CertMark { rotation_due: false, ..mark(ExpiryClass::Critical, 100) })])
        .await?;
    ensure!(!s.rotation_due().await?.iter().any(|(d, _)| mine.contains(d)), "no longer due once re-marked");
    s.mark_cert_status(&[(t.clone(), mark(ExpiryClass::Critical, 100))]).await?;
    ensure!(s.rotation_due().await?.iter().any(|(d, _)| *d == t), "due again");
    s.clear_cert_status(&[t.clone(), thing(851), thing(852)]).await?;
    ensure!(s.cert_status(&t).await?.is_none(), "the mark is cleared");
    ensure!(!s.rotation_due().await?.iter().any(|(d, _)| mine.contains(d)), "no longer due");
    ensure!(s.device(&t).await?.is_some(), "clearing a mark keeps the device");
    Ok(())
}

/// Reports are stored under `reports/` and read back whole; another prefix is refused by the
/// AWS adapter (the grant covers `reports/*` only) and is never written.
pub async fn reports_are_written_under_reports_only<S: Reports + ArchiveReader>(s: &S) -> Result<()> {
    s.put_report("reports/cert-expiry/2025-11-24.json", br#"{"expired":1}"#).await?;
    ensure!(
        s.archive_object("reports/cert-expiry/2025-11-24.json").await? == br#"{"expired":1}"#,
        "read back"
    );
    ensure!(
        s.report("reports/cert-expiry/2025-11-24.json").await?.as_deref() == Some(&br#"{"expired":1}"#[..]),
        "read back as a report"
    );
    ensure!(s.report("reports/cert-expiry/1999-01-01.json").await?.is_none(), "a missing report is None");
    Ok(())
}

/// Eight devices presenting one serial at once, each with its own certificate: exactly one
/// enrols; every other learns which certificate won.
pub async fn devices_racing_for_one_serial_leave_one_winner<S: Allowlist>(s: &S) -> Result<()> {
    use fleet_shared::model::{CertificateId, Enrolment};
    use fleet_shared::ports::Enrolled;
    let serial = ThingName::parse("s-race")?;
    s.allow(&[allow("s-race")?]).await?;
    let certs: Vec<CertificateId> = (0..8u8).map(|n| CertificateId::of_der(&[n])).collect();
    let outcomes = futures_util::future::join_all(certs.iter().map(|c| s.enrol(&serial, c, 20))).await;
    let outcomes = outcomes.into_iter().collect::<Result<Vec<_>, _>>()?;
    let winners = outcomes.iter().filter(|o| **o == Enrolled::Yes).count();
    ensure!(winners == 1, "{winners} winners: {outcomes:?}");
    let e = s.entry(&serial).await?.context("entry")?;
    let Enrolment::Provisioned { certificate: won, .. } = e.enrolment else {
        anyhow::bail!("not provisioned: {e:?}")
    };
    for (c, o) in certs.iter().zip(&outcomes) {
        let want = if *c == won { Enrolled::Yes } else { Enrolled::Taken(won.clone()) };
        ensure!(*o == want, "{c}: {o:?}, expected {want:?}");
    }
    Ok(())
}

pub async fn presence_is_written_only_over_the_presence_read<
    S: fleet_shared::ports::PresenceStore,
    H: fleet_shared::ports::HealthLedger,
>(
    s: &S,
    health: &H,
) -> Result<()> {
    use fleet_shared::health::presence::{fold, LifecycleEvent};
    use fleet_shared::health::tally::{counter, Bucket, Cohort, HealthDelta};
    let t = thing(860);
    let cohort = Cohort::new("env-sensor", "eu-west", "1.0");
    let event = |json: &str| LifecycleEvent::parse(json.as_bytes()).map(|(_, e)| e);
    let c1 = event(r#"{"clientId":"x","timestamp":100,"eventType":"connected","versionNumber":1}"#)?;
    let d1 = event(
        r#"{"clientId":"x","timestamp":200,"eventType":"disconnected","versionNumber":1,"disconnectReason":"CONNECTION_LOST"}"#,
    )?;
    let gauge = |n: i64| {
        let mut d = HealthDelta::default();
        d.add(Bucket::Gauge, &cohort, counter::CONNECTED, n);
        d
    };
    let connected_now = || async {
        let b = health.buckets(&[Bucket::Gauge]).await?;
        anyhow::Ok(
            b.get(&Bucket::Gauge).and_then(|g| g.get(&cohort)).map_or(0, |t| t.get(counter::CONNECTED)),
        )
    };
    ensure!(s.presence(&t).await?.is_none(), "no presence yet");
    let connected = fold(None, [&c1]).context("a state")?;
    ensure!(s.put_presence(&t, &connected, None, &gauge(1)).await?, "the first write");
    ensure!(!s.put_presence(&t, &connected, None, &gauge(1)).await?, "a second first write loses");
    ensure!(connected_now().await? == 1, "the gauge moved with the write that won only");
    let ended = fold(Some(&connected), [&d1]).context("a state")?;
    let stale_read = fold(None, [&d1]).context("a state")?.place;
    ensure!(
        !s.put_presence(&t, &ended, Some(&stale_read), &gauge(-1)).await?,
        "a write over another read loses"
    );
    ensure!(
        s.put_presence(&t, &ended, Some(&connected.place), &gauge(-1)).await?,
        "a write over the read wins"
    );
    ensure!(s.presence(&t).await? == Some(ended.clone()), "read back");
    ensure!(connected_now().await? == 0, "the gauge is back to 0");
    // Operators page through every device's presence (and nothing else of a device).
    let other = thing(861);
    ensure!(s.put_presence(&other, &connected, None, &HealthDelta::default()).await?, "another device");
    let (first, next) = s.presence_page(None, 1).await?;
    let (rest, end) = match next {
        Some(n) => s.presence_page(Some(&n), 10).await?,
        None => (Vec::new(), None),
    };
    let mut all: Vec<_> = first.into_iter().chain(rest).collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(end.is_none(), "two presences, two pages at most");
    ensure!(all == vec![(t.clone(), ended), (other, connected)], "{all:?}");
    Ok(())
}

pub async fn health_counters_add_up_and_the_ledger_answers_windows<
    S: fleet_shared::ports::HealthCounters + fleet_shared::ports::HealthLedger,
>(
    s: &S,
) -> Result<()> {
    use fleet_shared::health::tally::{counter, Bucket, Cohort, HealthDelta, Tally};
    let a = Cohort::new("env-sensor", "eu-west", "1.0");
    let b = Cohort::new("gateway", "us-east", "-");
    // GIVEN two writers adding to one minute at once, and one to an hour
    let mut d1 = HealthDelta::default();
    d1.add(Bucket::Minute(1_000), &a, counter::RECEIVED, 7);
    d1.add(Bucket::Minute(1_000), &b, counter::QUARANTINED, 1);
    let mut d2 = HealthDelta::default();
    d2.add(Bucket::Minute(1_000), &a, counter::RECEIVED, 5);
    d2.add(Bucket::Minute(1_000), &a, counter::LATEST, -2);
    d2.add(Bucket::Hour(16), &a, counter::LATEST, 3);
    let (r1, r2) = tokio::join!(s.add_health(&d1), s.add_health(&d2));
    r1?;
    r2?;
    // THEN each bucket reads back summed, by cohort; an empty bucket is absent
    let got = s.buckets(&[Bucket::Minute(1_000), Bucket::Hour(16), Bucket::Minute(999)]).await?;
    ensure!(got.len() == 2, "two buckets with counts: {got:?}");
    let minute = &got[&Bucket::Minute(1_000)];
    ensure!(minute[&a].get(counter::RECEIVED) == 12 && minute[&a].get(counter::LATEST) == -2, "{minute:?}");
    ensure!(minute[&b].get(counter::QUARANTINED) == 1, "{minute:?}");
    ensure!(got[&Bucket::Hour(16)][&a].get(counter::LATEST) == 3, "{got:?}");

    // GIVEN ledger rows at minutes 10 and 20
    ensure!(s.closed_through().await?.is_none(), "nothing closed yet");
    let row = |n: i64| {
        let mut t = Tally::default();
        t.add(counter::RECEIVED, n);
        t
    };
    s.close_minute(10, &[(a.clone(), row(5)), (Cohort::fleet(), row(5))]).await?;
    s.close_minute(20, &[(a.clone(), row(9))]).await?;
    s.close_minute(20, &[(a.clone(), row(9))]).await?; // idempotent
                                                       // THEN a window's start is the newest row at or before it
    ensure!(s.closed_through().await? == Some(20), "cursor");
    ensure!(s.row_at(&a, 9).await?.is_none(), "before the first row");
    ensure!(s.row_at(&a, 15).await? == Some((10, row(5))), "between rows");
    ensure!(s.row_at(&a, 20).await? == Some((20, row(9))), "at a row");
    ensure!(s.row_at(&a, 1_000).await? == Some((20, row(9))), "after the last");
    let heads = s.heads().await?;
    ensure!(
        heads.len() == 2 && heads[&a] == (20, row(9)) && heads[&Cohort::fleet()] == (10, row(5)),
        "{heads:?}"
    );
    Ok(())
}

pub async fn commands_are_sequenced_per_device_and_settled_once<S: fleet_shared::ports::CommandStore>(
    s: &S,
) -> Result<()> {
    use fleet_shared::commands::{CommandRecord, CommandStatus};
    let (a, b) = (thing(870), thing(871));
    // Concurrent dispatches to one device never share a seq; each device counts from 1.
    let seqs = futures_util::future::try_join_all((0..8).map(|_| s.next_seq(&a))).await?;
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    ensure!(sorted == (1..=8).collect::<Vec<u64>>(), "seqs {seqs:?}");
    ensure!(s.next_seq(&b).await? == 1, "another device starts at 1");
    let record = |seq: u64| CommandRecord {
        cmd_id: format!("c-contract-{seq}"),
        thing: a.to_string(),
        seq,
        name: "reboot".into(),
        args: Default::default(),
        issued_at: 1_000,
        expires_at: 61_000,
        status: CommandStatus::Sent,
        acked_at: None,
        latency_ms: None,
        reason: None,
        result: None,
        cohort: "sensor/eu/-".into(),
    };
    for seq in 1..=3 {
        s.put_command(&record(seq)).await?;
    }
    ensure!(
        s.put_command(&record(2)).await.is_err_and(|e| e.kind == fleet_shared::ErrorKind::Conflict),
        "an id twice"
    );
    ensure!(s.command("c-contract-2").await? == Some(record(2)), "read back");
    ensure!(s.command("c-contract-9").await?.is_none(), "unknown");
    let listed: Vec<u64> = s.commands_of(&a, 2).await?.iter().map(|c| c.seq).collect();
    ensure!(listed == [3, 2], "newest first, limited: {listed:?}");
    ensure!(s.commands_of(&b, 10).await?.is_empty(), "the counter is not a command");
    let mut done = record(2);
    done.status = CommandStatus::Succeeded;
    done.latency_ms = Some(40);
    ensure!(s.settle_command(&done).await?, "settled");
    let mut again = done.clone();
    again.status = CommandStatus::Failed;
    ensure!(!s.settle_command(&again).await?, "settled once");
    ensure!(s.command("c-contract-2").await? == Some(done), "the first ack stands");
    Ok(())
}

/// `s` and a tag of this test process (its id and start), so a job id is never used twice on
/// a store that outlives the process.
pub fn job_id(s: &str) -> Result<JobId> {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() % 0x1_0000_0000);
        format!("{:x}-{started:x}", std::process::id())
    });
    Ok(JobId::parse(&format!("{s}-{run}"))?)
}

fn new_job(id: &JobId, targets: &[usize]) -> Result<NewJob> {
    Ok(NewJob {
        job_id: id.clone(),
        targets: targets.iter().map(|n| thing(*n)).collect(),
        document: serde_json::json!({"operation": "install", "firmware": "2.1.0"}),
        description: "contract".into(),
        max_per_minute: None,
        in_progress_timeout_minutes: None,
    })
}

/// A job gives every target a QUEUED execution, listed in thing order, and keeps the
/// description it was created with; its id cannot be used again (a Conflict, whatever the
/// second job holds); an unknown job has no progress.
pub async fn a_job_is_created_once_with_every_target_queued<S: JobsControl>(s: &S) -> Result<()> {
    let id = job_id("contract-job-create")?;
    s.create_job(&new_job(&id, &[902, 900, 901])?).await?;
    let progress = s.job_progress(&id).await?.context("the job just created")?;
    ensure!(progress.status == JobStatus::InProgress, "status {:?}", progress.status);
    ensure!((progress.counts.queued, progress.counts.total()) == (3, 3), "counts {:?}", progress.counts);
    ensure!(progress.description == "contract", "description {:?}", progress.description);
    let listed = s.job_executions(&id).await?;
    let expected: Vec<_> = [900, 901, 902].iter().map(|n| (thing(*n), ExecutionStatus::Queued)).collect();
    ensure!(listed == expected, "executions {listed:?}");
    let again = s.create_job(&new_job(&id, &[903])?).await;
    ensure!(
        again.as_ref().is_err_and(|e| e.kind == fleet_shared::ErrorKind::Conflict),
        "an id twice: {again:?}"
    );
    ensure!(s.job_executions(&id).await? == expected, "the second create changed the job");
    let unknown = job_id("contract-job-unknown")?;
    ensure!(s.job_progress(&unknown).await?.is_none(), "progress of an unknown job");
    ensure!(s.job_executions(&unknown).await?.is_empty(), "executions of an unknown job");
    Ok(())
}

/// Cancelling turns the queued executions and the job CANCELED; cancelling again (even with
/// force) changes nothing.
pub async fn cancelling_a_job_cancels_its_queued_executions_once<S: JobsControl>(s: &S) -> Result<()> {
    let id = job_id("contract-job-cancel")?;
    s.create_job(&new_job(&id, &[910, 911])?).await?;
    s.cancel_job(&id, false).await?;
    let progress = s.job_progress(&id).await?.context("the job just cancelled")?;
    ensure!(progress.status == JobStatus::Canceled, "status {:?}", progress.status);
    ensure!((progress.counts.canceled, progress.counts.pending()) == (2, 0), "counts {:?}", progress.counts);
    let listed = s.job_executions(&id).await?;
    ensure!(listed.iter().all(|(_, st)| *st == ExecutionStatus::Canceled), "executions {listed:?}");
    s.cancel_job(&id, true).await?;
    ensure!(s.job_progress(&id).await? == Some(progress), "a second cancel changed the job");
    Ok(())
}

/// A job with no target is refused as permanent (retrying cannot help), and not stored.
pub async fn a_job_without_targets_is_refused_as_permanent<S: JobsControl>(s: &S) -> Result<()> {
    let id = job_id("contract-job-empty")?;
    let refused = s.create_job(&new_job(&id, &[])?).await;
    ensure!(refused.as_ref().is_err_and(|e| e.kind == fleet_shared::ErrorKind::Permanent), "{refused:?}");
    ensure!(s.job_progress(&id).await?.is_none(), "a refused job was stored");
    Ok(())
}

/// A campaign `id` created at `created_ms`, its manifests signed by a test key.
pub fn campaign(id: &str, created_ms: i64) -> Result<fleet_shared::ota::campaign::Campaign> {
    use fleet_shared::ota::campaign::{Campaign, CampaignSpec};
    use fleet_shared::ota::manifest::{ManifestSigner, UnsignedManifest};
    let signer = ManifestSigner::from_bytes("contract", &[9; 32])?;
    let sign = |fw: &str| {
        let url = format!("https://fw.example.com/sensor/{fw}.bin");
        signer.sign(UnsignedManifest::for_image(fw, "sensor", url, fw.as_bytes()))
    };
    let spec = CampaignSpec::new(id, "sensor", "1.4.2", "1.5.0");
    Ok(Campaign::new(spec, sign("1.5.0")?, sign("1.4.2")?, created_ms)?)
}

/// A campaign is created once (a second create is a Conflict); a write names the version it
/// read and bumps it; a write over a version that has moved on is a Conflict and changes nothing.
pub async fn a_campaign_is_created_once_and_written_only_over_the_version_read<S: CampaignStore>(
    s: &S,
) -> Result<()> {
    let created = campaign("contract-c1", 1_764_000_000_000)?;
    ensure!(s.campaign("contract-c1").await?.is_none(), "a campaign before it was created");
    ensure!(s.put_campaign(&created).await? == 1, "the first version is 1");
    let stored = s.campaign("contract-c1").await?.context("the campaign just created")?;
    ensure!(stored.version == 1, "stored at version {}", stored.version);
    ensure!(stored == fleet_shared::ota::campaign::Campaign { version: 1, ..created.clone() }, "read back");
    let twice = s.put_campaign(&created).await;
    ensure!(
        twice.as_ref().is_err_and(|e| e.kind == fleet_shared::ErrorKind::Conflict),
        "created twice: {twice:?}"
    );

    // A pause and a tick both read version 1; the first to write wins.
    let mut paused = stored.clone();
    paused.paused = Some("operator".into());
    let mut ticked = stored.clone();
    ticked.updated_ms += 60_000;
    ensure!(s.put_campaign(&paused).await? == 2, "a write at the version read bumps it");
    let stale = s.put_campaign(&ticked).await;
    ensure!(
        stale.as_ref().is_err_and(|e| e.kind == fleet_shared::ErrorKind::Conflict),
        "a stale write: {stale:?}"
    );
    let now = s.campaign("contract-c1").await?.context("the campaign")?;
    ensure!(
        now == fleet_shared::ota::campaign::Campaign { version: 2, ..paused },
        "the pause stands: {now:?}"
    );
    Ok(())
}

/// Every campaign is listed, newest first (same creation time: by id).
pub async fn campaigns_are_listed_newest_first<S: CampaignStore>(s: &S) -> Result<()> {
    ensure!(s.campaigns().await?.is_empty(), "campaigns in a new store");
    for (id, created_ms) in
        [("contract-b", 2_000), ("contract-old", 1_000), ("contract-new", 3_000), ("contract-a", 2_000)]
    {
        s.put_campaign(&campaign(id, created_ms)?).await?;
    }
    let listed: Vec<(String, u64)> =
        s.campaigns().await?.into_iter().map(|c| (c.spec.id, c.version)).collect();
    let expected: Vec<(String, u64)> = ["contract-new", "contract-a", "contract-b", "contract-old"]
        .iter()
        .map(|id| ((*id).to_owned(), 1))
        .collect();
    ensure!(listed == expected, "listed {listed:?}");
    Ok(())
}
