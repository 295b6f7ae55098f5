//! A simulated device's command handling (feature `sim`): what `fleetctl demo` devices run on
//! `cmd/fleet/<thing>/req`. Every message goes through [`CommandVerifier`]; an accepted command
//! is obeyed and answered `succeeded` (or `failed` for a name the device does not know), a
//! refused one answered `rejected` with its reason code, and counted by reason.

use std::collections::BTreeMap;

use serde_json::{json, Map};

use super::{response_topic, AckStatus, CommandAck, CommandVerifier};

/// What the device does for an accepted command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reboot,
    Ping,
}

/// The answer to one message: the ack to publish (on [`response_topic`]), what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub topic: String,
    pub ack: Option<CommandAck>,
    pub action: Option<Action>,
}

/// One device's command handling and its counts.
pub struct SimulatedCommands {
    verifier: CommandVerifier,
    thing: String,
    pub obeyed: u64,
    /// Refused commands by [`Rejection::code`].
    pub refused: BTreeMap<&'static str, u64>,
}

impl SimulatedCommands {
    pub fn new(thing: impl Into<String>, verifier: CommandVerifier) -> Self {
        Self { verifier, thing: thing.into(), obeyed: 0, refused: BTreeMap::new() }
    }

    /// A message on the device's request topic, at device time `now_ms`.
    pub fn receive(&mut self, raw: &[u8], now_ms: i64) -> Answer {
        let topic = response_topic(&self.thing);
        match self.verifier.verify(raw, now_ms) {
            Ok(cmd) => {
                let (status, action, result) = match cmd.name.as_str() {
                    "reboot" => (AckStatus::Succeeded, Some(Action::Reboot), None),
                    "ping" => {
                        let mut r = Map::new();
                        r.insert("pong".into(), json!(now_ms));
                        (AckStatus::Succeeded, Some(Action::Ping), Some(r))
                    }
                    _ => (AckStatus::Failed, None, None),
                };
                self.obeyed += u64::from(action.is_some());
                let reason = (status == AckStatus::Failed).then(|| format!("unknown command {}", cmd.name));
                let ack = CommandAck { cmd_id: cmd.cmd_id, status, reason, result };
                Answer { topic, ack: Some(ack), action }
            }
            Err(why) => {
                *self.refused.entry(why.code()).or_default() += 1;
                Answer { topic, ack: CommandAck::rejected(raw, &why), action: None }
            }
        }
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{CommandSigner, ReplayState, UnsignedCommand, VerifierConfig};

    #[test]
    fn obeys_a_signed_command_once_and_counts_its_replay() {
        let key = CommandSigner::from_bytes("k1", &[9; 32]).unwrap();
        let config = VerifierConfig::new("sensor-1", vec![("k1".into(), key.verifying_key())]);
        let mut device =
            SimulatedCommands::new("sensor-1", CommandVerifier::new(config, ReplayState::default()).unwrap());
        let cmd = key
            .sign(UnsignedCommand {
                cmd_id: "c-1".into(),
                thing: "sensor-1".into(),
                seq: 1,
                issued_at: 1_000,
                expires_at: 61_000,
                name: "reboot".into(),
                args: Map::new(),
            })
            .unwrap()
            .to_json();
        let first = device.receive(cmd.as_bytes(), 2_000);
        assert_eq!(
            (first.action, first.ack.as_ref().map(|a| a.status)),
            (Some(Action::Reboot), Some(AckStatus::Succeeded))
        );
        assert_eq!(first.topic, "cmd/fleet/sensor-1/res");
        let again = device.receive(cmd.as_bytes(), 2_100);
        assert_eq!(again.action, None);
        assert_eq!(again.ack.unwrap().reason.as_deref(), Some("replayed"));
        assert_eq!((device.obeyed, device.refused.get("replayed").copied()), (1, Some(1)));
    }
}
