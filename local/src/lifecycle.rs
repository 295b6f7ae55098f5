//! IoT Core's lifecycle events: `$aws/events/presence/connected/<clientId>` and
//! `…/disconnected/<clientId>`, with the JSON IoT Core publishes.
//!
//! A connect and the disconnect that ends the same session carry one `versionNumber`; it grows
//! with every connection of a client id (here: the connect time in milliseconds, kept strictly
//! increasing, so it also grows across restarts of the local IoT Core). A connection that takes
//! over a client id ends the older session with `DUPLICATE_CLIENTID`.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use serde::Serialize;

/// Why a session ended, as IoT Core names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DisconnectReason {
    ClientInitiatedDisconnect,
    ConnectionLost,
    MqttKeepAliveTimeout,
    DuplicateClientid,
    ServerInitiatedDisconnect,
    ClientError,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connected {
    pub client_id: String,
    pub timestamp: i64,
    pub event_type: &'static str,
    pub session_identifier: String,
    pub principal_identifier: String,
    pub ip_address: String,
    pub version_number: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Disconnected {
    pub client_id: String,
    pub timestamp: i64,
    pub event_type: &'static str,
    pub session_identifier: String,
    pub principal_identifier: String,
    pub client_initiated_disconnect: bool,
    pub disconnect_reason: DisconnectReason,
    pub version_number: i64,
}

pub fn connected_topic(client_id: &str) -> String {
    format!("$aws/events/presence/connected/{client_id}")
}

pub fn disconnected_topic(client_id: &str) -> String {
    format!("$aws/events/presence/disconnected/{client_id}")
}

struct Session {
    id: String,
    principal: String,
    version: i64,
    taken_over: bool,
}

/// The open sessions of every client id, to pair each disconnect with its connect.
#[derive(Default)]
pub struct Sessions {
    open: HashMap<String, VecDeque<Session>>,
    /// The last version given to each client id, kept for a reconnect within the same
    /// millisecond; entries older than [`VERSION_MEMORY_MS`] are dropped (the clock has moved
    /// past them, so a new version is larger anyway).
    last_version: HashMap<String, i64>,
    started: u64,
}

const VERSION_MEMORY_MS: i64 = 60_000;

impl Sessions {
    /// A client connected: its event. An open session of the same client id is being taken over.
    pub fn connect(
        &mut self,
        client_id: &str,
        principal: &str,
        ip: Option<IpAddr>,
        now_ms: i64,
    ) -> Connected {
        let last = self.last_version.get(client_id).copied().unwrap_or(i64::MIN);
        let version = now_ms.max(last.saturating_add(1));
        self.last_version.insert(client_id.to_owned(), version);
        self.started += 1;
        if self.started.is_multiple_of(1024) {
            self.last_version.retain(|_, v| *v > now_ms - VERSION_MEMORY_MS);
        }
        let id = format!("{:016x}-{:08x}", now_ms, self.started);
        let open = self.open.entry(client_id.to_owned()).or_default();
        for older in open.iter_mut() {
            older.taken_over = true;
        }
        open.push_back(Session {
            id: id.clone(),
            principal: principal.to_owned(),
            version,
            taken_over: false,
        });
        Connected {
            client_id: client_id.to_owned(),
            timestamp: now_ms,
            event_type: "connected",
            session_identifier: id,
            principal_identifier: principal.to_owned(),
            ip_address: ip.map_or_else(String::new, |ip| ip.to_string()),
            version_number: version,
        }
    }

    /// The principal of `client_id`'s newest open session (`None`: none is open).
    pub fn newest_principal(&self, client_id: &str) -> Option<&str> {
        self.open.get(client_id)?.back().map(|s| s.principal.as_str())
    }

    /// A connection of `client_id` ended (the oldest open one: a taken-over session ends first).
    /// `None` when no session of it is open (its connect was never seen).
    pub fn disconnect(
        &mut self,
        client_id: &str,
        client_initiated: bool,
        reason: DisconnectReason,
        now_ms: i64,
    ) -> Option<Disconnected> {
        let open = self.open.get_mut(client_id)?;
        let session = open.pop_front()?;
        if open.is_empty() {
            self.open.remove(client_id);
        }
        let reason = if session.taken_over { DisconnectReason::DuplicateClientid } else { reason };
        Some(Disconnected {
            client_id: client_id.to_owned(),
            timestamp: now_ms,
            event_type: "disconnected",
            session_identifier: session.id,
            principal_identifier: session.principal,
            client_initiated_disconnect: client_initiated && !session.taken_over,
            disconnect_reason: reason,
            version_number: session.version,
        })
    }

    pub fn open_sessions(&self) -> usize {
        self.open.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_shares_its_version_and_reconnects_grow_it() {
        let mut s = Sessions::default();
        let c1 = s.connect("sensor-001", "local/sensor-001", Some([127, 0, 0, 1].into()), 1_000);
        let d1 = s.disconnect("sensor-001", true, DisconnectReason::ClientInitiatedDisconnect, 2_000);
        let d1 = d1.expect("open session");
        assert_eq!((c1.version_number, d1.version_number), (1_000, 1_000));
        assert_eq!(c1.session_identifier, d1.session_identifier);
        // A reconnect within the same millisecond still gets a larger version.
        let c2 = s.connect("sensor-001", "p", None, 1_000);
        assert_eq!(c2.version_number, 1_001);
        let json = serde_json::to_value(&d1).expect("json");
        assert_eq!(json["disconnectReason"], "CLIENT_INITIATED_DISCONNECT");
        assert_eq!(json["clientInitiatedDisconnect"], true);
        assert_eq!(serde_json::to_value(&c1).expect("json")["ipAddress"], "127.0.0.1");
    }

    #[test]
    fn a_taken_over_session_ends_as_duplicate_clientid() {
        let mut s = Sessions::default();
        let first = s.connect("x", "p", None, 10);
        let second = s.connect("x", "p", None, 20);
        let d = s.disconnect("x", false, DisconnectReason::ConnectionLost, 21).expect("open");
        assert_eq!(
            (d.version_number, d.disconnect_reason),
            (first.version_number, DisconnectReason::DuplicateClientid)
        );
        let d = s.disconnect("x", false, DisconnectReason::ConnectionLost, 30).expect("open");
        assert_eq!(
            (d.version_number, d.disconnect_reason),
            (second.version_number, DisconnectReason::ConnectionLost)
        );
        assert!(s.disconnect("x", true, DisconnectReason::ClientInitiatedDisconnect, 31).is_none());
        assert_eq!(s.open_sessions(), 0);
    }
}
