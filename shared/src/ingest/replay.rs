//! Replay: re-ingest the raw archive — the source of truth — through today's pipeline into
//! the hot store, device state and quarantine. Idempotent like any delivery: replaying twice
//! changes nothing. This is also the path to a new hot store. The archive itself is not
//! written again.

use serde::Serialize;

use super::archive::{decode_lines, ArchiveObject, RAW_PREFIX};
use super::envelope::IngestPolicy;
use super::event::OwnedInbound;
use super::service::{ingest_batch, IngestPorts};
use crate::error::StoreError;
use crate::ports::{ArchiveReader, DeviceRegistry, Quarantine, RawArchive, TelemetrySink};
use crate::time::parse_timestream_time;

/// Messages handed to the pipeline at once.
pub const REPLAY_CHUNK: usize = 1_000;

/// The archive port of a replay: its lines already are in the archive.
pub struct AlreadyArchived;

impl RawArchive for AlreadyArchived {
    async fn put_raw(&self, _object: &ArchiveObject) -> Result<(), StoreError> {
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplayReport {
    pub objects: usize,
    pub messages: usize,
    pub accepted: usize,
    pub duplicates: usize,
    pub late: usize,
    pub quarantined: usize,
    pub failed: usize,
}

/// The hour an archive key is partitioned under (`raw/dt=YYYY-MM-DD/hour=HH/...`), in ms.
fn partition_ms(key: &str) -> Option<i64> {
    let date = key.split("dt=").nth(1)?.get(..10)?;
    let hour = key.split("hour=").nth(1)?.get(..2)?;
    parse_timestream_time(&format!("{date} {hour}:00:00"))
}

/// The ports a replay uses: the ingest ports but the archive, and the archive reader.
pub struct ReplayPorts<'a, R, S, Q, X> {
    pub registry: &'a R,
    pub sink: &'a S,
    pub quarantine: &'a Q,
    pub reader: &'a X,
}

/// Replay every raw object under `prefix` (which must lie under `raw/`).
pub async fn replay<R, S, Q, X>(
    ports: ReplayPorts<'_, R, S, Q, X>,
    policy: &IngestPolicy,
    now_ms: i64,
    prefix: &str,
) -> Result<ReplayReport, StoreError>
where
    R: DeviceRegistry,
    S: TelemetrySink,
    Q: Quarantine,
    X: ArchiveReader,
{
    let reader = ports.reader;
    let mut report = ReplayReport::default();
    for key in reader.archive_keys(prefix).await? {
        if !key.starts_with(RAW_PREFIX) {
            continue;
        }
        let body = reader.archive_object(&key).await?;
        let lines = decode_lines(&body).map_err(|e| StoreError::permanent("archive object decode", e))?;
        let received_ms = partition_ms(&key).unwrap_or(now_ms);
        let messages: Vec<OwnedInbound> = lines
            .into_iter()
            .enumerate()
            .map(|(i, body)| OwnedInbound::new(format!("{key}#{i}"), received_ms, body))
            .collect();
        report.objects += 1;
        for chunk in messages.chunks(REPLAY_CHUNK) {
            let inbound: Vec<_> = chunk.iter().map(OwnedInbound::borrow).collect();
            let ingest = IngestPorts {
                registry: ports.registry,
                sink: ports.sink,
                archive: &AlreadyArchived,
                quarantine: ports.quarantine,
            };
            let o = ingest_batch(ingest, policy, now_ms, &inbound).await;
            report.messages += o.messages;
            report.accepted += o.accepted;
            report.duplicates += o.duplicates;
            report.late += o.late;
            report.quarantined += o.quarantined.len();
            report.failed += o.failed.len();
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_partition_hour_from_the_key() {
        assert_eq!(partition_ms("raw/dt=2025-11-24/hour=16/abc.ndjson.gz"), Some(1_764_000_000_000));
        assert_eq!(partition_ms("raw/other"), None);
    }
}
