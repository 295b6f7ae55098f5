//! Presence over every arrival order: all permutations of two sessions' events with each event
//! delivered twice, one event at a time and in batches, end in the state of the last session.

use super::*;

fn event(kind: Kind, version: i64, at_ms: i64, reason: Option<&str>) -> LifecycleEvent {
    LifecycleEvent {
        client_id: "sensor-001".into(),
        timestamp: at_ms,
        event_type: kind,
        version_number: version,
        session_identifier: Some(format!("s-{version}")),
        disconnect_reason: reason.map(str::to_owned),
        client_initiated_disconnect: reason.map(|r| r == "CLIENT_INITIATED_DISCONNECT"),
        principal_identifier: Some(format!("cert-{version}")),
    }
}

/// Every ordering of `items` (Heap's algorithm).
fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    fn heap<T: Clone>(k: usize, a: &mut Vec<T>, out: &mut Vec<Vec<T>>) {
        if k <= 1 {
            out.push(a.clone());
            return;
        }
        for i in 0..k {
            heap(k - 1, a, out);
            let j = if k.is_multiple_of(2) { i } else { 0 };
            a.swap(j, k - 1);
        }
    }
    let mut a = items.to_vec();
    let mut out = Vec::new();
    heap(a.len(), &mut a, &mut out);
    out
}

fn one_at_a_time(events: &[LifecycleEvent]) -> Option<Presence> {
    let mut state = None;
    for e in events {
        if let Some(next) = fold(state.as_ref(), [e]) {
            state = Some(next);
        }
    }
    state
}

#[test]
fn any_order_with_duplicates_ends_in_the_last_sessions_state() {
    let c1 = event(Kind::Connected, 1, 100, None);
    let d1 = event(Kind::Disconnected, 1, 200, Some("CONNECTION_LOST"));
    let c2 = event(Kind::Connected, 5, 300, None);
    let d2 = event(Kind::Disconnected, 5, 450, Some("MQTT_KEEP_ALIVE_TIMEOUT"));
    let expected = Presence {
        connected: false,
        place: d2.place(),
        session_started_ms: Some(300),
        session_ms: Some(150),
        disconnect_reason: Some("MQTT_KEEP_ALIVE_TIMEOUT".into()),
        session: Some("s-5".into()),
        counted_in: None,
        principal: Some("cert-5".into()),
    };
    // 4 events, each twice: 8! orders of delivery.
    let events = [c1.clone(), d1.clone(), c2.clone(), d2.clone(), c1, d1, c2, d2];
    let orders = permutations(&events);
    assert_eq!(orders.len(), 40_320);
    for order in &orders {
        assert_eq!(one_at_a_time(order).as_ref(), Some(&expected), "one at a time: {order:?}");
        // The same order split into two batches, and as one batch.
        let (a, b) = order.split_at(3);
        let after_a = fold(None, a);
        let end = fold(after_a.as_ref(), b).or(after_a);
        assert_eq!(end.as_ref(), Some(&expected), "two batches: {order:?}");
        assert_eq!(fold(None, order).as_ref(), Some(&expected), "one batch: {order:?}");
    }
}

#[test]
fn an_open_last_session_is_connected_whatever_came_late() {
    let c1 = event(Kind::Connected, 1, 100, None);
    let d1 = event(Kind::Disconnected, 1, 200, Some("DUPLICATE_CLIENTID"));
    let c2 = event(Kind::Connected, 2, 190, None); // took the client id over
    for order in permutations(&[c1, d1, c2.clone()]) {
        let p = one_at_a_time(&order).expect("a state");
        assert!(p.connected, "{order:?}");
        assert_eq!((p.place, p.session_started_ms, p.session_ms), (c2.place(), Some(190), None));
    }
}

#[test]
fn a_stale_event_never_flips_a_device_and_changes_nothing() {
    let now = fold(None, [&event(Kind::Connected, 9, 900, None)]).expect("state");
    let old_disconnect = event(Kind::Disconnected, 8, 950, Some("CONNECTION_LOST"));
    assert_eq!(apply(Some(&now), &old_disconnect), Applied::Stale);
    assert_eq!(fold(Some(&now), [&old_disconnect]), None, "nothing to write");
}

#[test]
fn events_are_parsed_strictly() {
    let ok = br#"{"clientId":"sensor-001","timestamp":1764000000000,"eventType":"disconnected",
        "sessionIdentifier":"a","principalIdentifier":"p","clientInitiatedDisconnect":false,
        "disconnectReason":"AUTH_ERROR","versionNumber":3}"#;
    let (thing, e) = LifecycleEvent::parse(ok).expect("parses");
    assert_eq!(
        (thing.as_str(), e.event_type, e.disconnect_reason.as_deref()),
        ("sensor-001", Kind::Disconnected, Some("AUTH_ERROR"))
    );
    for (bad, what) in [
        (
            &br#"{"clientId":"sensor-001","timestamp":1,"eventType":"subscribed","versionNumber":1}"#[..],
            "not a lifecycle event",
        ),
        (
            br#"{"clientId":"a/b","timestamp":1,"eventType":"connected","versionNumber":1}"#,
            "not a thing name",
        ),
        (br#"{"clientId":"x","timestamp":1,"eventType":"connected","versionNumber":-1}"#, "negative"),
        (
            br#"{"clientId":"claim-sensor-001","timestamp":1,"eventType":"connected","versionNumber":1}"#,
            "a claim session's",
        ),
        (b"\xff", "not a lifecycle event"),
    ] {
        let err = LifecycleEvent::parse(bad).expect_err(what).to_string();
        assert!(err.contains(what), "{err}");
    }
}

#[test]
fn a_version_reset_after_an_hour_offline_starts_a_newer_count() {
    // Session 7 ends; the device stays offline two hours, and AWS counts from 0 again.
    const HOUR: i64 = 3_600_000;
    let c7 = event(Kind::Connected, 7, 1_000, None);
    let d7 = event(Kind::Disconnected, 7, 1_000 + HOUR / 6, Some("CONNECTION_LOST"));
    let c0 = event(Kind::Connected, 0, 1_000 + 2 * HOUR, None);
    let d0 = event(Kind::Disconnected, 0, 1_000 + 3 * HOUR, Some("CLIENT_INITIATED_DISCONNECT"));
    let c1 = event(Kind::Connected, 1, 1_000 + 3 * HOUR + 60_000, None);
    // Every arrival order of the five, each twice, ends connected in session 1 of the new count.
    let events = [c7.clone(), d7.clone(), c0.clone(), d0.clone(), c1.clone()];
    for order in permutations(&events) {
        let doubled: Vec<LifecycleEvent> = order.iter().chain(order.iter().rev()).cloned().collect();
        let p = one_at_a_time(&doubled).expect("a state");
        assert!(p.connected && p.place == c1.place(), "{order:?} -> {p:?}");
        assert_eq!(fold(None, &doubled).as_ref(), Some(&p), "one batch: {order:?}");
    }
    // And a late event of the old count never flips the new one.
    let now = fold(None, [&c0]).expect("state");
    assert_eq!(apply(Some(&now), &d7), Applied::Stale);
}

#[test]
fn the_principal_is_the_latest_sessions_certificate_whatever_arrives_late() {
    // GIVEN a session with certificate cert-1, then (a rotation) one with cert-2
    let c1 = event(Kind::Connected, 1, 100, None);
    let d1 = event(Kind::Disconnected, 1, 200, Some("CLIENT_INITIATED_DISCONNECT"));
    let c2 = event(Kind::Connected, 2, 300, None);
    // THEN in any order the device is known to use cert-2
    for order in permutations(&[c1.clone(), d1.clone(), c2.clone()]) {
        let p = one_at_a_time(&order).expect("a state");
        assert_eq!(p.principal.as_deref(), Some("cert-2"), "{order:?}");
    }
    // AND a disconnect that names no principal keeps its session's
    let mut d2 = event(Kind::Disconnected, 2, 400, Some("CONNECTION_LOST"));
    d2.principal_identifier = None;
    let p = fold(None, [&c1, &d1, &c2, &d2]).expect("a state");
    assert_eq!((p.connected, p.principal.as_deref()), (false, Some("cert-2")));
    // AND events without one (as stored before principals were kept) leave it unknown
    let mut bare = event(Kind::Connected, 3, 500, None);
    bare.principal_identifier = None;
    assert_eq!(fold(Some(&p), [&bare]).expect("a state").principal, None);
}
