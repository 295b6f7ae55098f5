//! The port contract on the embedded (SQLite) backend: every port on one in-memory database.

use anyhow::Result;
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::ports::TelemetryQuery;
use fleet_tests::contract::{self, Ports};

/// Every port on the one store.
type Embedded = Ports<
    SqliteStore,
    SqliteStore,
    SqliteStore,
    SqliteStore,
    SqliteStore,
    SqliteStore,
    SqliteStore,
    SqliteStore,
>;

async fn ports() -> Result<Embedded> {
    let db = SqliteStore::in_memory()?;
    Ok(Ports {
        devices: db.clone(),
        sink: db.clone(),
        archive: db.clone(),
        twins: db.clone(),
        certs: db.clone(),
        presence: db.clone(),
        health: db.clone(),
        commands: db,
    })
}

fleet_tests::port_contract!(ports = ports());

/// IoT Jobs' control plane on the same kind of store (the local IoT Core's jobs service).
async fn jobs() -> Result<SqliteStore> {
    Ok(SqliteStore::in_memory()?)
}

fleet_tests::jobs_contract!(jobs = jobs());

/// Where OTA campaigns are kept, on a store of its own.
async fn campaigns() -> Result<SqliteStore> {
    Ok(SqliteStore::in_memory()?)
}

fleet_tests::campaigns_contract!(campaigns = campaigns());

/// Key semantics need a store that has them: SQLite here, Timestream through scripted
/// answers in the adapter's mock tests (moto's Timestream only appends).
#[tokio::test]
async fn sink_reports_another_payload_under_a_stored_key_as_a_conflict() -> Result<()> {
    contract::sink_reports_another_payload_under_a_stored_key_as_a_conflict(&ports().await?.sink).await
}

#[tokio::test]
async fn sink_stores_each_message_once_and_reads_it_back() -> Result<()> {
    let db = ports().await?.sink;
    contract::sink_accepts_a_batch_over_the_request_limit_with_one_status_per_reading(&db).await?;
    let rows = db.telemetry(&contract::thing(3), 0, 1000).await?;
    anyhow::ensure!(rows.len() == 25, "{} rows for thing 3, expected 25", rows.len());
    Ok(())
}
