//! Properties of twin mirroring over generated shadow histories (updates and deletes, with
//! AWS's version numbering that continues after a delete):
//! - any permutation, with duplicates, of a shadow's events converges to the highest version's
//!   state, and `drift_since` is when drift started in that version's history;
//! - the same events through `twin::sync` on SQLite from concurrent tasks end in the same twin.

use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::model::{ShadowName, ThingName, Twin};
use fleet_shared::ports::TwinStore;
use fleet_shared::twin::{apply, sync, ShadowDocument, ShadowEvent, TwinEvent};
use proptest::prelude::*;
use serde_json::{json, Value};

const T0_S: i64 = 1_764_000_000;

/// One step of a shadow's life: an update to (desired fw, reported fw), or a delete.
#[derive(Debug, Clone, Copy)]
enum Step {
    Update(u8, u8),
    Delete,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        8 => (0u8..3, 0u8..3).prop_map(|(d, r)| Step::Update(d, r)),
        1 => Just(Step::Delete),
    ];
    proptest::collection::vec(step, 1..14)
}

fn doc(version: u64, desired: u8, reported: u8, at_s: i64) -> Value {
    json!({"state":{"desired":{"fw":desired.to_string(),"mode":"eco"},"reported":{"fw":reported.to_string(),"mode":"eco","bat":50}},
           "metadata":{"desired":{"fw":{"timestamp":at_s}},"reported":{"fw":{"timestamp":at_s}}},
           "version":version})
}

/// What a history should end in: version, deleted, drift start, and fw's own drift start
/// (the run refusing the fw desired now).
type Expected = (u64, bool, Option<i64>, Option<i64>);

/// The events a history produces, and what the twin should end in.
fn history(steps: &[Step]) -> (Vec<TwinEvent>, Expected) {
    let thing = ThingName::parse("dev-1").expect("thing");
    let event = |e| TwinEvent { thing: thing.clone(), shadow: ShadowName::classic(), event: e };
    let mut events = Vec::new();
    let (mut version, mut previous): (u64, Option<Value>) = (0, None);
    let mut deleted = true;
    // (version, drifting, desired fw, at_ms) of each update since the last delete
    let mut run: Vec<(u64, bool, u8, i64)> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let at_s = T0_S + 10 * i as i64;
        match *step {
            Step::Update(d, r) => {
                version += 1;
                let current = doc(version, d, r, at_s);
                events.push(event(ShadowEvent::Updated {
                    previous: previous.clone().map(|p| serde_json::from_value(p).expect("doc")),
                    current: Box::new(
                        serde_json::from_value::<ShadowDocument>(current.clone()).expect("doc"),
                    ),
                    at_ms: at_s * 1000,
                }));
                previous = Some(current);
                deleted = false;
                run.push((version, d != r, d, at_s * 1000));
            }
            Step::Delete if !deleted => {
                events.push(event(ShadowEvent::Deleted { version, at_ms: at_s * 1000 }));
                previous = None;
                deleted = true;
                run.clear();
            }
            Step::Delete => {}
        }
    }
    let since = if deleted {
        None
    } else {
        run.iter().rev().take_while(|(_, drifting, _, _)| *drifting).last().map(|&(_, _, _, at)| at)
    };
    let fw_since = match run.last() {
        Some(&(_, true, wanted, _)) if !deleted => run
            .iter()
            .rev()
            .take_while(|&&(_, drifting, d, _)| drifting && d == wanted)
            .last()
            .map(|&(_, _, _, at)| at),
        _ => None,
    };
    (events, (version, deleted, since, fw_since))
}

/// The events in a shuffled order, some twice.
fn delivered() -> impl Strategy<Value = (Vec<TwinEvent>, Expected)> {
    steps().prop_flat_map(|steps| {
        let (events, expected) = history(&steps);
        let n = events.len().max(1);
        (Just(events), proptest::collection::vec(0..n, 0..6), Just(expected)).prop_flat_map(
            |(events, dups, expected)| {
                let mut all = events.clone();
                all.extend(dups.into_iter().filter_map(|i| events.get(i).cloned()));
                (Just(all).prop_shuffle(), Just(expected))
            },
        )
    })
}

fn final_twin(events: &[TwinEvent]) -> Option<Twin> {
    events.iter().fold(None, |stored, e| Some(apply(stored, e).0))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_order_with_duplicates_converges_to_the_highest_version((events, expected) in delivered()) {
        prop_assume!(!events.is_empty());
        let twin = final_twin(&events).expect("events");
        let (version, deleted, since, fw_since) = expected;
        prop_assert_eq!((twin.version, twin.deleted, twin.drift_since_ms), (version, deleted, since));
        prop_assert_eq!(twin.history.key_drift_since_ms("fw"), fw_since, "fw's own drift start");
        // and the same as delivering them in order, once each
        let mut in_order = events.clone();
        in_order.sort_by_key(|e| match &e.event {
            ShadowEvent::Updated { current, .. } => (current.version, 0),
            ShadowEvent::Deleted { version, .. } => (*version, 1),
        });
        in_order.dedup();
        let reference = final_twin(&in_order).expect("events");
        prop_assert_eq!((&twin.desired, &twin.reported, &twin.delta), (&reference.desired, &reference.reported, &reference.delta));
    }
}

#[tokio::test]
async fn concurrent_syncs_of_one_shadow_end_in_the_twin_of_all_its_events() {
    let steps: Vec<Step> =
        (0..20).map(|i| if i == 9 { Step::Delete } else { Step::Update(i % 3, (i / 2) % 3) }).collect();
    let (events, (version, deleted, since, _)) = history(&steps);
    let store = SqliteStore::in_memory().expect("store");
    // four tasks each deliver every event, in different orders
    let tasks = (0..4).map(|k| {
        let (store, mut mine) = (store.clone(), events.clone());
        mine.rotate_left(k * 5);
        if k % 2 == 1 {
            mine.reverse();
        }
        tokio::spawn(async move {
            for e in &mine {
                sync(&store, e).await.expect("synced");
            }
        })
    });
    for t in tasks.collect::<Vec<_>>() {
        t.await.expect("task");
    }
    let twin =
        store.twin(&ThingName::parse("dev-1").expect("thing"), &ShadowName::classic()).await.expect("read");
    let twin = twin.expect("twin stored");
    assert_eq!((twin.version, twin.deleted, twin.drift_since_ms), (version, deleted, since));
    let reference = final_twin(&events).expect("events");
    assert_eq!(Twin { revision: 0, ..twin }, Twin { revision: 0, ..reference });
}

#[tokio::test]
async fn drifting_twins_are_listed_oldest_drift_first_from_the_index() {
    let store = SqliteStore::in_memory().expect("store");
    for (n, (d, r, at_s)) in
        [(2u8, 1u8, 300i64), (1, 1, 100), (2, 0, 200), (1, 2, 400)].into_iter().enumerate()
    {
        let e = TwinEvent {
            thing: ThingName::parse(&format!("dev-{n}")).expect("thing"),
            shadow: ShadowName::classic(),
            event: ShadowEvent::Updated {
                previous: None,
                current: serde_json::from_value(doc(1, d, r, at_s)).expect("doc"),
                at_ms: at_s * 1000,
            },
        };
        sync(&store, &e).await.expect("synced");
    }
    let drifting = store.drifting_since(350_000, 10).await.expect("query");
    let names: Vec<&str> = drifting.iter().map(|t| t.thing.as_str()).collect();
    assert_eq!(names, ["dev-2", "dev-0"], "dev-1 is in sync, dev-3 drifts only since 400 s");
    assert_eq!(store.drifting_since(i64::MAX, 1).await.expect("query").len(), 1, "limit");
}
