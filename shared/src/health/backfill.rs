//! Counting the devices already connected when fleet health is deployed onto a running fleet.
//!
//! The connected gauge moves with each presence write from this version on
//! ([`super::signals::presence`]). A device connected before the upgrade has a stored presence
//! without `counted_in` and would count only from its next connection, so connectivity would
//! read low (and page) until every device reconnected. [`count_connected`] walks the stored
//! presences once and counts each such device, in the same conditional transaction a presence
//! event uses: a device whose presence changed meanwhile is left to that event. Running it again
//! counts nothing twice (a counted device has `counted_in`).

use serde::Serialize;

use super::tally::{counter, Bucket, Cohort, HealthDelta};
use crate::error::StoreError;
use crate::ports::{DeviceRegistry, PresenceStore};

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Backfilled {
    /// Presences read.
    pub devices: u64,
    /// Connected devices counted now.
    pub counted: u64,
    /// Connected devices whose presence changed while this ran (their event counts them).
    pub changed_meanwhile: u64,
}

/// Count every connected device not yet in the connected gauge, `page` presences at a time.
pub async fn count_connected<P: PresenceStore, R: DeviceRegistry>(
    presence: &P,
    registry: &R,
    page: usize,
) -> Result<Backfilled, StoreError> {
    let mut done = Backfilled::default();
    let mut after = None;
    loop {
        let (items, next) = presence.presence_page(after.as_ref(), page).await?;
        done.devices += items.len() as u64;
        let uncounted: Vec<_> =
            items.into_iter().filter(|(_, p)| p.connected && p.counted_in.is_none()).collect();
        if !uncounted.is_empty() {
            let things: Vec<_> = uncounted.iter().map(|(t, _)| t.clone()).collect();
            let devices = registry.get_many(&things).await?;
            for (thing, stored) in uncounted {
                let cohort = Cohort::of(devices.get(&thing), None).without_fw();
                let mut gauge = HealthDelta::default();
                gauge.add(Bucket::Gauge, &cohort, counter::CONNECTED, 1);
                let mut next = stored.clone();
                next.counted_in = Some(cohort);
                if presence.put_presence(&thing, &next, Some(&stored.place), &gauge).await? {
                    done.counted += 1;
                } else {
                    done.changed_meanwhile += 1;
                }
            }
        }
        match next {
            Some(n) => after = Some(n),
            None => return Ok(done),
        }
    }
}

#[cfg(all(test, feature = "embedded"))]
mod tests {
    use super::*;
    use crate::adapters::embedded::SqliteStore;
    use crate::health::presence::{fold, LifecycleEvent};
    use crate::ports::{HealthLedger, PresenceReader};

    #[tokio::test]
    async fn devices_connected_before_the_upgrade_are_counted_once() -> anyhow::Result<()> {
        // GIVEN three devices: two connected and one disconnected, stored by an older version
        // (no counted_in, nothing in the gauge)
        let db = SqliteStore::in_memory()?;
        for (i, kind) in ["connected", "connected", "disconnected"].iter().enumerate() {
            let json =
                format!(r#"{{"clientId":"d{i}","timestamp":100,"eventType":"{kind}","versionNumber":1}}"#);
            let (thing, e) = LifecycleEvent::parse(json.as_bytes())?;
            let p = fold(None, [&e]).expect("a state");
            assert!(db.put_presence(&thing, &p, None, &HealthDelta::default()).await?);
        }
        // WHEN the backfill runs, in pages of 2, twice
        let first = count_connected(&db, &db, 2).await?;
        let second = count_connected(&db, &db, 2).await?;
        // THEN the two connected ones are counted, once
        assert_eq!(first, Backfilled { devices: 3, counted: 2, changed_meanwhile: 0 });
        assert_eq!(second.counted, 0);
        let gauges = db.buckets(&[Bucket::Gauge]).await?;
        let connected: i64 = gauges[&Bucket::Gauge].values().map(|t| t.get(counter::CONNECTED)).sum();
        assert_eq!(connected, 2);
        // AND a later disconnect takes one out again
        let (thing, e) = LifecycleEvent::parse(
            br#"{"clientId":"d0","timestamp":200,"eventType":"disconnected","versionNumber":1}"#,
        )?;
        let stored = db.presence(&thing).await?.expect("stored");
        let next = fold(Some(&stored), [&e]).expect("a state");
        let mut gauge = HealthDelta::default();
        crate::health::signals::presence(&mut gauge, Some(&stored), &next);
        assert!(db.put_presence(&thing, &next, Some(&stored.place), &gauge).await?);
        let gauges = db.buckets(&[Bucket::Gauge]).await?;
        assert_eq!(gauges[&Bucket::Gauge].values().map(|t| t.get(counter::CONNECTED)).sum::<i64>(), 1);
        Ok(())
    }
}
