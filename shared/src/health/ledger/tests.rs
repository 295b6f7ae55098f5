use std::collections::BTreeMap;

use super::*;
use crate::health::presence::{Kind, Place, Presence};
use crate::health::signals;
use crate::health::tally::{Bucket, HealthDelta, MINUTE_MS};
use crate::model::{Device, DeviceRegistration, DeviceState, ThingName};
use crate::ports::LedgerRow;

/// An in-memory store of counters and ledger rows, closing minutes as fleet-health does.
#[derive(Default)]
struct Book {
    counters: BTreeMap<Bucket, BTreeMap<Cohort, Tally>>,
    heads: BTreeMap<Cohort, LedgerRow>,
    rows: BTreeMap<(Cohort, i64), Tally>,
}

impl Book {
    fn add(&mut self, delta: &HealthDelta) {
        for ((bucket, cohort), t) in &delta.0 {
            self.counters.entry(*bucket).or_default().entry(cohort.clone()).or_default().add_all(t);
        }
    }

    fn bucket(&self, b: Bucket) -> BTreeMap<Cohort, Tally> {
        self.counters.get(&b).cloned().unwrap_or_default()
    }

    fn close(&mut self, minute: i64) {
        let latest = |t: BTreeMap<Cohort, Tally>| -> BTreeMap<Cohort, i64> {
            t.into_iter().map(|(c, t)| (c, t.get(counter::LATEST))).collect()
        };
        let hour = minute / 60;
        let mut active: BTreeMap<Cohort, i64> = BTreeMap::new();
        for h in hour - 23..=hour {
            for (c, n) in latest(self.bucket(Bucket::Hour(h))) {
                *active.entry(c).or_default() += n;
            }
        }
        let reads = MinuteReads {
            minute,
            counters: self.bucket(Bucket::Minute(minute)),
            previous_latest: latest(self.bucket(Bucket::Minute(minute - 1))),
            next_latest: latest(self.bucket(Bucket::Minute(minute + 1))),
            active,
            gauges: self.bucket(Bucket::Gauge),
            sample_levels: true,
        };
        for (c, t) in close_minute(&mut self.heads, &reads) {
            self.rows.insert((c, minute), t);
        }
    }

    fn row_at(&self, cohort: &Cohort, minute: i64) -> Option<Tally> {
        self.rows
            .range((cohort.clone(), i64::MIN)..=(cohort.clone(), minute))
            .next_back()
            .map(|(_, t)| t.clone())
    }

    fn evaluate(&self, cohort: &Cohort, minute: i64) -> CohortHealth {
        let catalog = Catalog::builtin();
        let head = self.row_at(cohort, minute).unwrap_or_default();
        let last = window(&head, self.row_at(cohort, minute - 1).as_ref());
        evaluate(&catalog, cohort, minute, &head, &|w| self.row_at(cohort, minute - w), &last)
    }
}

fn device(class: &str, fw: &str, state: Option<DeviceState>) -> Device {
    Device {
        thing: ThingName::parse("d").unwrap(),
        registration: Some(DeviceRegistration {
            class: class.into(),
            region: "eu".into(),
            fw: fw.into(),
            registered_at_ms: 1,
        }),
        state,
    }
}

fn state(rx_ms: i64, boot: u32, battery: f64) -> DeviceState {
    DeviceState {
        last_ts_ms: rx_ms,
        last_rx_ms: rx_ms,
        boot,
        seq: 1,
        battery_pct: Some(battery),
        fw: Some("1.0".into()),
    }
}

fn status<'a>(h: &'a CohortHealth, slo: &str) -> &'a SloStatus {
    h.slos.iter().find(|s| s.slo == slo).unwrap()
}

#[test]
fn slis_of_a_fixed_history_equal_hand_computed_values() {
    // GIVEN four devices of one cohort; minute 0 all report (and one bad message arrives),
    // minute 1 d1 and d2, minute 2 d1 (d1 rebooted, its battery fell 1 % in a minute),
    // minute 3 nobody; three devices connected throughout.
    let base = 100_000 * MINUTE_MS; // minute 100,000: whole hours apart from 0 do not matter
    let m = |i: i64| 100_000 + i;
    let cohort = Cohort::new("sensor", "eu", "1.0");
    let mut book = Book::default();
    let mut stored: BTreeMap<&'static str, Option<DeviceState>> =
        ["d1", "d2", "d3", "d4"].into_iter().map(|d| (d, None)).collect();
    let mut report = |book: &mut Book, minute: i64, who: &[&'static str], reboot: bool| {
        let mut delta = HealthDelta::default();
        for d in who {
            let before = device("sensor", "1.0", stored[d].clone());
            let boot = if reboot && *d == "d1" { 2 } else { 1 };
            let battery = 90.0 - (minute - m(0)) as f64;
            let after = state(minute * MINUTE_MS + 1_000, boot, battery);
            signals::telemetry(&mut delta, Some(&before), &after);
            stored.insert(d, Some(after));
        }
        book.add(&delta);
    };
    let mut connected = HealthDelta::default();
    for _ in 0..3 {
        let now = Presence {
            connected: true,
            place: Place { version: 1, kind: Kind::Connected, at_ms: base },
            session_started_ms: Some(base),
            session_ms: None,
            disconnect_reason: None,
            session: None,
            counted_in: Some(cohort.without_fw()),
            principal: None,
        };
        signals::presence(&mut connected, None, &now);
    }
    book.add(&connected);

    let mut rx = HealthDelta::default();
    signals::received(&mut rx, base, &cohort, 5, 1);
    book.add(&rx);
    report(&mut book, m(0), &["d1", "d2", "d3", "d4"], false);
    book.close(m(0));
    let mut rx = HealthDelta::default();
    signals::received(&mut rx, base + MINUTE_MS, &cohort, 2, 0);
    book.add(&rx);
    report(&mut book, m(1), &["d1", "d2"], false);
    book.close(m(1));
    let mut rx = HealthDelta::default();
    signals::received(&mut rx, base + 2 * MINUTE_MS, &cohort, 1, 0);
    book.add(&rx);
    report(&mut book, m(2), &["d1"], true);
    book.close(m(2));
    book.close(m(3));

    // WHEN the fleet is evaluated after minute 3
    let h = book.evaluate(&Cohort::fleet(), m(3));

    // THEN fresh device-minutes are 4 + 4 + 2 + 1 of 4 x 4 active
    let fresh = status(&h, "freshness");
    assert_eq!((fresh.good, fresh.total), (11, 16));
    assert!((fresh.sli.unwrap() - 11.0 / 16.0).abs() < 1e-12);
    // ... 5 % budget, 31.25 % bad: burning 6.25 times too fast, 5.25 budgets overspent
    assert!((fresh.budget_remaining - (1.0 - 0.3125 / 0.05)).abs() < 1e-9);
    // ... connected 3 of 4 each minute
    let conn = status(&h, "connectivity");
    assert_eq!((conn.good, conn.total), (12, 16));
    // ... 1 of 8 messages quarantined
    let ingest = status(&h, "ingest");
    assert_eq!((ingest.good, ingest.total), (7, 8));
    assert_eq!(h.last_hour.ingest_error_rate, Some(0.125));
    // ... one reboot in 16 device-minutes: 3.75 per device-hour
    assert_eq!(h.last_hour.reboots_per_device_hour, Some(3.75));
    // ... battery fell 1 % per minute between readings of one boot (d1's minute-2 reading
    // is a new boot and gives no rate): 60 %/h
    assert_eq!(h.last_hour.battery_discharge_pct_per_hour, Some(60.0));
    // ... no commands, no OTA: no data, the whole budget left
    assert_eq!(status(&h, "command-latency").sli, None);
    assert_eq!(status(&h, "ota").budget_remaining, 1.0);
    // ... and at the end of minute 3 one device is fresh (d1, minute 2), four are active
    assert_eq!(
        (h.last_hour.devices_fresh, h.last_hour.devices_active, h.last_hour.devices_connected),
        (1, 4, 3)
    );
    // The class in its region says the same; the firmware cohort too, but for connectivity,
    // which is counted per class and region.
    let base = book.evaluate(&cohort, m(3));
    assert_eq!(status(&base, "freshness"), fresh);
    assert_eq!(status(&base, "ingest"), ingest);
    assert_eq!(status(&base, "connectivity").sli, None);
    assert_eq!(book.evaluate(&Cohort::new("sensor", "eu", "*"), m(3)).slos, h.slos);
}

/// Close `minutes` minutes of a 100-device cohort whose fresh devices per minute `fresh(i)`
/// gives; returns, per minute, the alerts firing for freshness.
fn freshness_history(minutes: i64, fresh: impl Fn(i64) -> i64) -> Vec<Vec<String>> {
    let cohort = Cohort::new("sensor", "eu", "1.0");
    let mut book = Book::default();
    let mut out = Vec::new();
    for i in 0..minutes {
        // The devices fresh this minute; those of the last minute moved on (or went stale).
        let mut t = Tally::default();
        t.add(counter::LATEST, fresh(i));
        book.counters.insert(Bucket::Minute(i), BTreeMap::from([(cohort.clone(), t)]));
        book.counters.remove(&Bucket::Minute(i - 1));
        // 100 devices active: the hour buckets say so.
        let mut active = Tally::default();
        active.add(counter::LATEST, 100);
        book.counters.insert(Bucket::Hour(i / 60), BTreeMap::from([(cohort.clone(), active)]));
        book.counters.remove(&Bucket::Hour(i / 60 - 1));
        book.close(i);
        out.push(status(&book.evaluate(&Cohort::fleet(), i), "freshness").firing.clone());
    }
    out
}

#[test]
fn burn_rate_alerts_stay_quiet_in_a_healthy_history() {
    // GIVEN 7 hours with 97-99 of 100 devices fresh (well inside a 95 % objective), and a
    // short dip to 80 for 10 minutes
    let alerts = freshness_history(7 * 60, |i| if (200..210).contains(&i) { 80 } else { 97 + i % 3 });
    // THEN no alert ever fires
    assert!(alerts.iter().all(|a| a.is_empty()), "{:?}", alerts.iter().position(|a| !a.is_empty()));
}

#[test]
fn burn_rate_alerts_fire_in_an_outage_and_stop_after_it() {
    // GIVEN 6 healthy hours, then no device fresh for 150 minutes, then healthy again
    let alerts = freshness_history(10 * 60, |i| if (360..510).contains(&i) { 0 } else { 99 });
    let firing = |i: usize, sev: &str| alerts[i].iter().any(|a| a == sev);
    // THEN nothing fires before the outage
    assert!(alerts[..360].iter().all(|a| a.is_empty()));
    // ... the page fires once the last hour is more than 72 % bad (14.4 x 5 %), within 45
    // minutes; the ticket once the last 6 hours are more than 30 % bad (6 x 5 %), later
    let page = (360..510).find(|&i| firing(i, "page")).expect("the page fires");
    let ticket = (360..510).find(|&i| firing(i, "ticket")).expect("the ticket fires");
    assert!(page - 360 <= 45, "paged after {} minutes", page - 360);
    assert!(ticket > page && ticket - 360 <= 110, "ticket after {} minutes", ticket - 360);
    assert!(firing(509, "page") && firing(509, "ticket"), "still alerting while the outage lasts");
    // ... and each stops within its short window of the recovery (5 and 30 minutes), though
    // its long window is still mostly bad
    assert!((515..alerts.len()).all(|i| !firing(i, "page")));
    assert!((540..alerts.len()).all(|i| !firing(i, "ticket")));
}

#[test]
fn closing_a_minute_moves_only_the_cohorts_that_changed_and_their_aggregates() {
    let a = Cohort::new("sensor", "eu", "1.0");
    let b = Cohort::new("gateway", "us", "2.0");
    let mut heads = BTreeMap::new();
    let mut rx = Tally::default();
    rx.add(counter::RECEIVED, 3);
    let reads =
        MinuteReads { minute: 7, counters: BTreeMap::from([(a.clone(), rx)]), ..MinuteReads::default() };
    let rows = close_minute(&mut heads, &reads);
    let names: Vec<String> = rows.iter().map(|(c, _)| c.to_string()).collect();
    assert_eq!(names, ["*/*/*", "sensor/eu/*", "sensor/eu/1.0"]);
    let mut rx2 = Tally::default();
    rx2.add(counter::RECEIVED, 2);
    let reads =
        MinuteReads { minute: 8, counters: BTreeMap::from([(b.clone(), rx2)]), ..MinuteReads::default() };
    let rows = close_minute(&mut heads, &reads);
    let fleet = rows.iter().find(|(c, _)| *c == Cohort::fleet()).unwrap();
    assert_eq!(fleet.1.get(counter::RECEIVED), 5);
    assert!(!rows.iter().any(|(c, _)| *c == a), "a did not change");
    // Closing minute 8 again (a run that stopped after writing it) adds nothing twice.
    assert!(close_minute(&mut heads, &reads).is_empty());
    assert_eq!(heads[&Cohort::fleet()].1.get(counter::RECEIVED), 5);
}
