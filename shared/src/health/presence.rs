//! Presence: IoT Core's lifecycle events (`$aws/events/presence/connected|disconnected/<clientId>`)
//! → each device's connectivity, in session order.
//!
//! AWS says lifecycle events may arrive out of order and more than once. A connect and the
//! disconnect that ends the same session share a `versionNumber`, which grows with every new
//! connection of a client id; within a session the disconnect comes after the connect. So an
//! event's place is `(versionNumber, connected < disconnected, timestamp)`, and a device's state
//! is the event with the greatest place: a stale event (an older session's, or a session's
//! connect after its disconnect) never flips a device. It still says something: a session's
//! connect arriving after its disconnect gives the session's length.
//!
//! AWS resets a client's `versionNumber` to 0 once it has stayed disconnected for about an hour
//! (longer for persistent sessions, after their time to live). So an event with a lower
//! version that is [`RESET_GAP_MS`] or more later than another belongs to a newer count and
//! comes after it ([`is_after`]); within that gap versions decide, as when a new connection
//! takes a client id over and the old session's disconnect is stamped a moment after the new
//! session's connect. A connect and a disconnect belong to one session when they share its
//! `versionNumber` and, where both carry one, its `sessionIdentifier`.

use serde::{Deserialize, Serialize};

use crate::certs::hook::CLAIM_CLIENT_PREFIX;
use crate::model::ThingName;

/// The lifecycle event's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Connected,
    Disconnected,
}

/// One lifecycle event, as IoT Core publishes it (the fields presence uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleEvent {
    pub client_id: String,
    /// Milliseconds since the epoch.
    pub timestamp: i64,
    pub event_type: Kind,
    pub version_number: i64,
    #[serde(default)]
    pub session_identifier: Option<String>,
    #[serde(default)]
    pub disconnect_reason: Option<String>,
    #[serde(default)]
    pub client_initiated_disconnect: Option<bool>,
    /// The credential the session authenticated with: for a device with an X.509 certificate,
    /// the certificate's id.
    #[serde(default)]
    pub principal_identifier: Option<String>,
}

/// Why an event is not one presence can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not a lifecycle event: {0}")]
    Malformed(String),
    #[error("client id {0:?} is not a thing name (presence is kept per thing)")]
    NotAThing(String),
    /// A fleet-provisioning claim session's (`claim-…`), not a device's: nothing to record.
    #[error("client id {0:?} is a claim session's (fleet provisioning), not a device's")]
    ClaimSession(String),
    #[error("versionNumber {0} is negative")]
    BadVersion(i64),
}

impl LifecycleEvent {
    /// A lifecycle event's JSON; the client id must be a thing name (a device connects as its
    /// thing) and not a claim session's ([`CLAIM_CLIENT_PREFIX`]), the version not negative.
    pub fn parse(json: &[u8]) -> Result<(ThingName, Self), EventError> {
        let e: Self = serde_json::from_slice(json).map_err(|err| EventError::Malformed(err.to_string()))?;
        if e.client_id.starts_with(CLAIM_CLIENT_PREFIX) {
            return Err(EventError::ClaimSession(e.client_id));
        }
        let thing = ThingName::parse(&e.client_id).map_err(|_| EventError::NotAThing(e.client_id.clone()))?;
        if e.version_number < 0 {
            return Err(EventError::BadVersion(e.version_number));
        }
        Ok((thing, e))
    }

    /// Where this event stands among a device's events: the greatest is its state.
    pub fn place(&self) -> Place {
        Place { version: self.version_number, kind: self.event_type, at_ms: self.timestamp }
    }
}

/// A lower `versionNumber` at least this much later than another event is a new count (AWS
/// resets it after about an hour disconnected), not an older event.
pub const RESET_GAP_MS: i64 = 30 * 60 * 1000;

/// Whether `a` comes after `b` in a device's history.
pub fn is_after(a: &Place, b: &Place) -> bool {
    if a.version < b.version && a.at_ms >= b.at_ms.saturating_add(RESET_GAP_MS) {
        return true; // a is in a newer count
    }
    if a.version > b.version && b.at_ms >= a.at_ms.saturating_add(RESET_GAP_MS) {
        return false; // b is in a newer count
    }
    a > b
}

/// An event's place in a device's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Place {
    pub version: i64,
    pub kind: Kind,
    pub at_ms: i64,
}

/// A device's connectivity: its latest session, as far as its events tell. The same whatever
/// order the events arrive in, and however often.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub connected: bool,
    /// The place of the event this state comes from.
    pub place: Place,
    /// When the latest session began (its connect seen).
    pub session_started_ms: Option<i64>,
    /// The latest session's length, once it ended and both its ends were seen.
    pub session_ms: Option<i64>,
    /// Why the latest session ended (`MQTT_KEEP_ALIVE_TIMEOUT`, `CONNECTION_LOST`,
    /// `DUPLICATE_CLIENTID`, `AUTH_ERROR`, ...); `None` while connected.
    pub disconnect_reason: Option<String>,
    /// The latest session's `sessionIdentifier`, when its events carry one.
    #[serde(default)]
    pub session: Option<String>,
    /// While connected: the cohort whose connected gauge counts this device (set by the
    /// presence function; [`crate::health::signals::presence`] moves the count with it).
    #[serde(default)]
    pub counted_in: Option<crate::health::tally::Cohort>,
    /// The credential the latest session authenticated with (`principalIdentifier`: for a
    /// device, its certificate's id), when its events carry one. After a certificate
    /// rotation, the proof that the device uses its new certificate.
    #[serde(default)]
    pub principal: Option<String>,
}

/// Whether `e` is an event of the session `p` describes.
fn same_session(p: &Presence, e: &LifecycleEvent) -> bool {
    p.place.version == e.version_number
        && match (&p.session, &e.session_identifier) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
}

/// What one event does to a device's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The state moves to this event.
    Now(Presence),
    /// An older event: the state stays, but it adds what it knows (a session's start or
    /// length).
    Enriched(Presence),
    /// Already known, or older with nothing to add.
    Stale,
}

/// Apply one event to a device's presence (`None`: never seen).
pub fn apply(current: Option<&Presence>, e: &LifecycleEvent) -> Applied {
    let place = e.place();
    let Some(cur) = current else {
        return Applied::Now(first(e));
    };
    if is_after(&place, &cur.place) {
        let next = match e.event_type {
            Kind::Connected => Presence {
                connected: true,
                place,
                session_started_ms: Some(e.timestamp),
                session_ms: None,
                disconnect_reason: None,
                session: e.session_identifier.clone(),
                counted_in: None,
                principal: e.principal_identifier.clone(),
            },
            Kind::Disconnected => {
                // Its connect seen (it is the state now): the session's start and length.
                let same = cur.place.kind == Kind::Connected && same_session(cur, e);
                let started = same.then_some(cur.session_started_ms).flatten();
                Presence {
                    connected: false,
                    place,
                    session_started_ms: started,
                    session_ms: started.map(|s| e.timestamp.saturating_sub(s)),
                    disconnect_reason: e.disconnect_reason.clone(),
                    session: e.session_identifier.clone(),
                    counted_in: None,
                    principal: e
                        .principal_identifier
                        .clone()
                        .or_else(|| same.then(|| cur.principal.clone()).flatten()),
                }
            }
        };
        return Applied::Now(next);
    }
    // A connect arriving after its own session's disconnect: the session's start and length.
    if place.kind == Kind::Connected
        && cur.place.kind == Kind::Disconnected
        && same_session(cur, e)
        && e.timestamp <= cur.place.at_ms
        && cur.session_started_ms.is_none()
    {
        let mut next = cur.clone();
        next.session_started_ms = Some(e.timestamp);
        next.principal = next.principal.or_else(|| e.principal_identifier.clone());
        next.session_ms = Some(cur.place.at_ms.saturating_sub(e.timestamp));
        return Applied::Enriched(next);
    }
    Applied::Stale
}

fn first(e: &LifecycleEvent) -> Presence {
    let connected = e.event_type == Kind::Connected;
    Presence {
        connected,
        place: e.place(),
        session_started_ms: connected.then_some(e.timestamp),
        session_ms: None,
        disconnect_reason: if connected { None } else { e.disconnect_reason.clone() },
        session: e.session_identifier.clone(),
        counted_in: None,
        principal: e.principal_identifier.clone(),
    }
}

/// Apply events in any order to a device's presence: the state of the greatest, with what the
/// others add. `None` when nothing changed.
pub fn fold<'a>(
    current: Option<&Presence>,
    events: impl IntoIterator<Item = &'a LifecycleEvent>,
) -> Option<Presence> {
    let mut events: Vec<&LifecycleEvent> = events.into_iter().collect();
    // In time order (any order ends in the same state; this one applies the fewest states).
    events.sort_by_key(|e| (e.timestamp, e.place()));
    let mut state = current.cloned();
    let mut changed = false;
    for e in events {
        match apply(state.as_ref(), e) {
            Applied::Now(p) | Applied::Enriched(p) => {
                state = Some(p);
                changed = true;
            }
            Applied::Stale => {}
        }
    }
    changed.then_some(state).flatten()
}

#[cfg(test)]
mod tests;
