//! Replay on the embedded backend: the raw archive alone rebuilds the hot store exactly, and
//! replaying into a store that already has everything changes nothing.

use anyhow::{ensure, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::ingest::ArchiveObject;
use fleet_shared::ingest::{
    ingest_batch, messages_from_event, replay, IngestPolicy, IngestPorts, OwnedInbound, ReplayPorts,
};
use fleet_shared::model::{DeviceRegistration, ThingName};
use fleet_shared::ports::{ArchiveReader, DeviceAdmin, RawArchive, TelemetryQuery};

const EVENTS: [&str; 6] = [
    include_str!("../../../events/ingest-telemetry/sqs-valid-v1.json"),
    include_str!("../../../events/ingest-telemetry/sqs-valid-v2.json"),
    include_str!("../../../events/ingest-telemetry/sqs-mixed-batch.json"),
    include_str!("../../../events/ingest-telemetry/sqs-duplicate-batch.json"),
    include_str!("../../../events/ingest-telemetry/sqs-clock-skew.json"),
    include_str!("../../../events/ingest-telemetry/direct-v1.json"),
];
const NOW: i64 = 1_764_000_001_000;

async fn registered_store() -> Result<SqliteStore> {
    let store = SqliteStore::in_memory()?;
    let reg = DeviceRegistration {
        class: "env-sensor".into(),
        region: "eu-west".into(),
        fw: "1.4.0".into(),
        registered_at_ms: 1,
    };
    let things = ["sensor-001", "sensor-002", "sensor-003"];
    let regs: Vec<_> =
        things.iter().map(|t| Ok((ThingName::parse(t)?, reg.clone()))).collect::<Result<_>>()?;
    store.register(&regs).await?;
    Ok(store)
}

async fn all_readings(store: &SqliteStore) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for t in ["sensor-001", "sensor-002", "sensor-003", "stray-900"] {
        out.extend(
            store
                .telemetry(&ThingName::parse(t)?, 0, 1000)
                .await?
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    Ok(out)
}

#[tokio::test]
async fn the_raw_archive_alone_rebuilds_the_hot_store() -> Result<()> {
    // GIVEN a store that ingested every sample event
    let original = registered_store().await?;
    for event in EVENTS {
        let owned = messages_from_event(event, NOW);
        let inbound: Vec<_> = owned.iter().map(OwnedInbound::borrow).collect();
        let ports =
            IngestPorts { registry: &original, sink: &original, archive: &original, quarantine: &original };
        let o = ingest_batch(ports, &IngestPolicy::default(), NOW, &inbound).await;
        ensure!(o.failed.is_empty(), "{o:?}");
    }
    let expected = all_readings(&original).await?;
    ensure!(expected.len() == 17, "{} readings ingested", expected.len());

    // AND a new store holding only a copy of that archive (and the registry)
    let rebuilt = registered_store().await?;
    for key in original.archive_keys("raw/").await? {
        let body = original.archive_object(&key).await?;
        rebuilt.put_raw(&ArchiveObject::new(key, body, 0)).await?;
    }

    // WHEN the archive is replayed
    let ports = ReplayPorts { registry: &rebuilt, sink: &rebuilt, quarantine: &rebuilt, reader: &rebuilt };
    let report = replay(ports, &IngestPolicy::default(), NOW, "raw/").await?;

    // THEN the hot store holds exactly the original readings
    ensure!(report.failed == 0 && report.quarantined == 0, "{report:?}");
    ensure!(report.accepted == expected.len(), "{report:?}");
    ensure!(all_readings(&rebuilt).await? == expected, "rebuilt readings differ");

    // AND replaying into the original changes nothing: every message is a duplicate
    let ports =
        ReplayPorts { registry: &original, sink: &original, quarantine: &original, reader: &original };
    let again = replay(ports, &IngestPolicy::default(), NOW, "raw/").await?;
    ensure!(again.accepted == 0 && again.duplicates == again.messages && again.failed == 0, "{again:?}");
    ensure!(all_readings(&original).await? == expected, "replay changed the original");
    Ok(())
}
