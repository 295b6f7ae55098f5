//! Reading telemetry back from the raw archive, for deployments without a hot store
//! (`HotStore=none`): a [`TelemetryQuery`] over any [`ArchiveReader`]. It lists the hour
//! partitions that can hold readings since `since_ms`, decodes each object's lines with the
//! same decoder ingest uses, keeps one thing's valid readings and enriches them from the
//! registry, as the hot store would have stored them.
//!
//! It reads whole objects, so it suits an operator looking at one device over hours or days.
//! The listing starts at the first partition that can qualify, so the archive's age costs
//! nothing.
//! Fleet-wide or long-range questions go to Athena (the template's Glue table over the same
//! objects); a range that would read more than [`MAX_OBJECTS`] objects is refused saying so.

use std::collections::{BTreeMap, HashSet};

use futures_util::future::try_join_all;

use super::archive::{decode_lines, RAW_PREFIX};
use super::envelope::{decode, IngestPolicy};
use super::service::enrich;
use crate::error::StoreError;
use crate::model::{MessageId, StoredReading, ThingName};
use crate::ports::{ArchiveReader, DeviceRegistry, TelemetryQuery};
use crate::time::utc_date_hour;

/// Most archive objects one query reads (each is one ingest batch).
pub const MAX_OBJECTS: usize = 5_000;
/// Objects fetched at once.
const CONCURRENT_GETS: usize = 8;
const HOUR_MS: i64 = 3_600_000;

/// Telemetry read from the raw archive.
pub struct ArchiveTelemetry<X, R> {
    pub archive: X,
    pub registry: R,
    pub policy: IngestPolicy,
    /// Milliseconds since the epoch (tests pass a fixed clock).
    pub clock: fn() -> i64,
}

/// The hour partition (`dt=YYYY-MM-DD/hour=HH`) of a raw key, comparable as a string.
fn partition(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(RAW_PREFIX)?;
    let end = rest.find("/hour=")? + "/hour=".len() + 2;
    rest.get(..end)
}

fn partition_of_ms(ms: i64) -> String {
    let (date, hour) = utc_date_hour(ms);
    format!("dt={date}/hour={hour:02}")
}

impl<X: ArchiveReader, R: DeviceRegistry> ArchiveTelemetry<X, R> {
    /// Keys of the raw objects whose partition can hold readings since `since_ms`, listed from
    /// that partition on (keys sort by `dt=`/`hour=`), never the archive before it. An object
    /// is filed under its batch's latest arrival, and a reading's time is at most its arrival
    /// plus the clock-skew tolerance: one hour of margin covers both.
    async fn keys_since(&self, since_ms: i64) -> Result<Vec<String>, StoreError> {
        let first = partition_of_ms(since_ms.saturating_sub(HOUR_MS).max(0));
        // Every key of that hour and later sorts after "raw/dt=…/hour=HH" (its "/…" follows).
        let start_after = format!("{RAW_PREFIX}{first}");
        let keys = self.archive.archive_keys_after(RAW_PREFIX, &start_after, MAX_OBJECTS + 1).await?;
        if keys.len() > MAX_OBJECTS {
            return Err(StoreError::permanent(
                "archive telemetry query",
                format!(
                    "more than {MAX_OBJECTS} archive objects since the requested time: narrow --since \
                     (e.g. --since 1h) or query the archive with Athena (README, \"Querying telemetry\")"
                ),
            ));
        }
        Ok(keys.into_iter().filter(|k| partition(k).is_some()).collect())
    }
}

impl<X: ArchiveReader, R: DeviceRegistry> TelemetryQuery for ArchiveTelemetry<X, R> {
    async fn telemetry(
        &self,
        thing: &ThingName,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredReading>, StoreError> {
        let now_ms = (self.clock)();
        let keys = self.keys_since(since_ms).await?;
        let needle = thing.as_str().as_bytes();
        let mut found: BTreeMap<(i64, u32, u64), crate::model::Reading> = BTreeMap::new();
        let mut seen: HashSet<MessageId> = HashSet::new();
        // A few objects at a time (a loop, not a closure: the futures must stay `Send`).
        for chunk in keys.chunks(CONCURRENT_GETS) {
            let mut gets = Vec::with_capacity(chunk.len());
            for key in chunk {
                gets.push(self.archive.archive_object(key));
            }
            for body in try_join_all(gets).await? {
                let lines =
                    decode_lines(&body).map_err(|e| StoreError::permanent("archive object decode", e))?;
                for line in lines {
                    // Most lines are other devices': skip them before decoding.
                    if !line.windows(needle.len()).any(|w| w == needle) {
                        continue;
                    }
                    let Ok(readings) = decode(&line, &self.policy, now_ms) else { continue };
                    for reading in readings {
                        if reading.id.thing != *thing
                            || reading.time_ms < since_ms
                            || !seen.insert(reading.id.clone())
                        {
                            continue;
                        }
                        found.insert((reading.time_ms, reading.id.boot, reading.id.seq), reading);
                    }
                }
            }
        }
        let device = self.registry.get_many(std::slice::from_ref(thing)).await?.remove(thing);
        Ok(found.into_values().take(limit).map(|r| enrich(&r, device.as_ref())).collect())
    }
}

#[cfg(all(test, feature = "embedded"))]
mod tests {
    use super::*;
    use crate::adapters::embedded::SqliteStore;
    use crate::model::DeviceRegistration;
    use crate::ports::{DeviceAdmin, RawArchive};

    const T0: i64 = 1_764_000_000_000; // 2025-11-24T16:00:00Z
    const DAY_MS: i64 = 24 * HOUR_MS;

    fn body(thing: &str, seq: u64, ts: i64) -> Vec<u8> {
        format!(
            r#"{{"v":1,"seq":{seq},"boot":1,"ts":{ts},"m":{{"temp_c":{seq}.5}},"thing":"{thing}","rx_ms":{},"client_id":"{thing}"}}"#,
            ts + 50
        )
        .into_bytes()
    }

    #[test]
    fn reads_the_partition_of_a_raw_key() {
        assert_eq!(partition("raw/dt=2025-11-24/hour=16/ab.ndjson.gz"), Some("dt=2025-11-24/hour=16"));
        assert_eq!(partition("quarantine/dt=2025-11-24/hour=16/ab.ndjson.gz"), None);
        assert_eq!(partition_of_ms(T0), "dt=2025-11-24/hour=16");
    }

    #[tokio::test]
    async fn one_things_readings_since_a_time_oldest_first_deduplicated_and_enriched() -> anyhow::Result<()> {
        // GIVEN an archive of three batches over two days: two things, one repeated delivery,
        // one payload that does not decode
        let db = SqliteStore::in_memory()?;
        let reg = DeviceRegistration {
            class: "meter".into(),
            region: "eu-west-1".into(),
            fw: "1.0.0".into(),
            registered_at_ms: 5,
        };
        db.register(&[(ThingName::parse("a")?, reg)]).await?;
        let batches: [(i64, Vec<Vec<u8>>); 3] = [
            (T0 - 2 * DAY_MS, vec![body("a", 1, T0 - 2 * DAY_MS), body("b", 1, T0 - 2 * DAY_MS)]),
            (T0, vec![body("a", 3, T0 + 20), body("a", 2, T0 + 10), b"{\"thing\":\"a\",".to_vec()]),
            (T0 + HOUR_MS, vec![body("a", 3, T0 + 20), body("b", 2, T0 + HOUR_MS)]),
        ];
        for (rx, bodies) in &batches {
            let object = crate::ingest::raw_object(bodies.iter().map(Vec::as_slice), *rx)
                .ok_or_else(|| anyhow::anyhow!("empty batch"))?;
            db.put_raw(&object).await?;
        }
        let query = ArchiveTelemetry {
            archive: db.clone(),
            registry: db,
            policy: IngestPolicy::default().unbounded_hot_window(),
            clock: || T0 + 2 * HOUR_MS,
        };
        // WHEN one thing's readings since an hour before the second batch are read
        let got = query.telemetry(&ThingName::parse("a")?, T0 - HOUR_MS, 10).await?;
        // THEN seq 2 and 3, once each, oldest first, tagged with the registration
        let seqs: Vec<u64> = got.iter().map(|r| r.reading.id.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        assert!(got.iter().all(|r| r.class == "meter" && r.region.as_deref() == Some("eu-west-1")));
        // AND from the start of time, with a limit, the oldest first
        let all = query.telemetry(&ThingName::parse("a")?, 0, 2).await?;
        assert_eq!(all.iter().map(|r| r.reading.id.seq).collect::<Vec<_>>(), vec![1, 2]);
        Ok(())
    }
}
