//! The cloud's side of a command: what it keeps about each one sent ([`CommandRecord`]) and
//! what an acknowledgement does to it ([`settle`]).
//!
//! A command is `sent` until its device's ack settles it: `succeeded`, `failed` or `rejected`
//! (the device refused it: [`super::Rejection::code`] is the reason). An ack settles a command
//! once: a second ack for it is a duplicate, an ack for a command nobody sent (or sent to
//! another device) is unknown, and an ack arriving more than [`ACK_GRACE_MS`] after the command
//! expired is counted expired and leaves it `sent` (a reader sees it as expired). A `rejected`
//! ack saying `replayed` or `out_of_order` answers a *copy* of a command the device already
//! handled (a QoS 1 redelivery, a replay): it never settles the command, whose own ack may still
//! be on its way; it counts as a duplicate. Each is counted by command-ack; none changes a
//! record.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{AckStatus, CommandAck, VerifierConfig};

/// How long after `expires_at` an ack still settles its command: a device accepts a command
/// until `expires_at` plus its clock-skew tolerance (30 s by default), and its ack then travels.
pub const ACK_GRACE_MS: i64 = VerifierConfig::DEFAULT_SKEW_MS as i64 + 30_000;

/// A command's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    Sent,
    Succeeded,
    Failed,
    Rejected,
}

impl CommandStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
        }
    }
}

impl From<AckStatus> for CommandStatus {
    fn from(s: AckStatus) -> Self {
        match s {
            AckStatus::Succeeded => Self::Succeeded,
            AckStatus::Failed => Self::Failed,
            AckStatus::Rejected => Self::Rejected,
        }
    }
}

/// What the cloud keeps about one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub cmd_id: String,
    pub thing: String,
    pub seq: u64,
    pub name: String,
    #[serde(default)]
    pub args: Map<String, Value>,
    pub issued_at: i64,
    pub expires_at: i64,
    pub status: CommandStatus,
    /// When the ack that settled it arrived, and how long after issue.
    #[serde(default)]
    pub acked_at: Option<i64>,
    #[serde(default)]
    pub latency_ms: Option<i64>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub result: Option<Map<String, Value>>,
    /// The device's health cohort when sent (`class/region/fw`), where its latency counts.
    pub cohort: String,
}

impl CommandRecord {
    /// `sent`, and past the time its ack could still settle it.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.status == CommandStatus::Sent && now_ms > self.expires_at + ACK_GRACE_MS
    }

    /// The status a reader sees: `expired` for a command never answered in time.
    pub fn shown_status(&self, now_ms: i64) -> &'static str {
        if self.is_expired(now_ms) {
            "expired"
        } else {
            self.status.as_str()
        }
    }
}

/// What an ack does.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// The command is settled by this ack: store it (conditional on it still being `sent`).
    Now(Box<CommandRecord>),
    /// No such command for this device.
    Unknown,
    /// The command was already settled.
    Duplicate,
    /// The ack came after the command expired.
    Expired,
}

/// The ack `ack` from `thing` (the topic's, not the payload's), arrived at `rx_ms`, for the
/// stored command `stored`.
pub fn settle(stored: Option<&CommandRecord>, thing: &str, ack: &CommandAck, rx_ms: i64) -> Settled {
    let Some(cmd) = stored.filter(|c| c.thing == thing) else { return Settled::Unknown };
    let about_a_copy = ack.status == AckStatus::Rejected
        && matches!(ack.reason.as_deref(), Some("replayed") | Some("out_of_order"));
    if cmd.status != CommandStatus::Sent || about_a_copy {
        return Settled::Duplicate;
    }
    if rx_ms > cmd.expires_at + ACK_GRACE_MS {
        return Settled::Expired;
    }
    let mut next = cmd.clone();
    next.status = ack.status.into();
    next.acked_at = Some(rx_ms);
    next.latency_ms = Some((rx_ms - cmd.issued_at).max(0));
    next.reason = ack.reason.clone();
    next.result = ack.result.clone();
    Settled::Now(Box::new(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent() -> CommandRecord {
        CommandRecord {
            cmd_id: "c-1".into(),
            thing: "sensor-1".into(),
            seq: 3,
            name: "reboot".into(),
            args: Map::new(),
            issued_at: 1_000,
            expires_at: 61_000,
            status: CommandStatus::Sent,
            acked_at: None,
            latency_ms: None,
            reason: None,
            result: None,
            cohort: "sensor/eu/1.0".into(),
        }
    }

    fn ack(status: AckStatus) -> CommandAck {
        CommandAck { cmd_id: "c-1".into(), status, reason: None, result: None }
    }

    #[test]
    fn an_ack_settles_a_sent_command_once_with_its_latency() {
        let Settled::Now(done) = settle(Some(&sent()), "sensor-1", &ack(AckStatus::Succeeded), 1_250) else {
            panic!("settled")
        };
        assert_eq!(
            (done.status, done.latency_ms, done.acked_at),
            (CommandStatus::Succeeded, Some(250), Some(1_250))
        );
        assert_eq!(settle(Some(&done), "sensor-1", &ack(AckStatus::Failed), 1_300), Settled::Duplicate);
    }

    #[test]
    fn acks_for_unknown_or_other_devices_commands_and_late_acks_change_nothing() {
        assert_eq!(settle(None, "sensor-1", &ack(AckStatus::Succeeded), 1_250), Settled::Unknown);
        assert_eq!(settle(Some(&sent()), "sensor-2", &ack(AckStatus::Succeeded), 1_250), Settled::Unknown);
        let late = 61_000 + ACK_GRACE_MS;
        assert!(matches!(
            settle(Some(&sent()), "sensor-1", &ack(AckStatus::Succeeded), late),
            Settled::Now(_)
        ));
        assert_eq!(settle(Some(&sent()), "sensor-1", &ack(AckStatus::Succeeded), late + 1), Settled::Expired);
        assert_eq!(sent().shown_status(late + 1), "expired");
        assert_eq!(sent().shown_status(late), "sent");
    }

    #[test]
    fn a_refusal_of_a_copy_never_settles_the_command() {
        // A QoS 1 redelivery refused as a replay may be answered before the command's own ack.
        for reason in ["replayed", "out_of_order"] {
            let copy = CommandAck { reason: Some(reason.into()), ..ack(AckStatus::Rejected) };
            assert_eq!(settle(Some(&sent()), "sensor-1", &copy, 1_100), Settled::Duplicate, "{reason}");
        }
        // A refusal of the command itself (tampered on its way, too late) settles it.
        let refused = CommandAck { reason: Some("bad_signature".into()), ..ack(AckStatus::Rejected) };
        assert!(matches!(settle(Some(&sent()), "sensor-1", &refused, 1_100), Settled::Now(_)));
    }
}
