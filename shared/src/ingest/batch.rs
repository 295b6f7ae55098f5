//! Batch planning: decode every message of a batch, drop in-batch redeliveries, and set
//! aside what must be quarantined. Pure: no I/O, time comes in as `now_ms`.

use std::collections::HashMap;

use super::envelope::{decode, IngestPolicy};
use super::reason::Problem;
use crate::model::{MessageId, Reading};

/// One message as the trigger delivered it.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// SQS message id (stable across redeliveries), or a synthetic id for direct invocations.
    pub message_id: &'a str,
    /// When the message entered Fleetline (SQS `SentTimestamp`); stable across redeliveries,
    /// so archive and quarantine object keys are too.
    pub received_ms: i64,
    pub body: &'a [u8],
    /// Set when the trigger could not deliver a message at all (an SQS record that is not an
    /// SQS message): quarantined with this problem, `body` holding what arrived instead.
    pub defect: Option<&'a Problem>,
}

/// A message that will not be stored, with the reasons.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    pub index: usize,
    pub thing: Option<String>,
    pub problems: Vec<Problem>,
}

/// What to do with a batch.
#[derive(Debug, Default)]
pub struct Plan {
    /// Distinct valid readings, in first-seen order (a v2 pack contributes several).
    pub readings: Vec<Reading>,
    /// `origin[i]` is the index of the message `readings[i]` was decoded from.
    pub origin: Vec<usize>,
    /// `(message index, reading index)` for each reading a message repeats from an earlier one
    /// in this batch (a pack repeating several readings appears once per reading).
    pub duplicates: Vec<(usize, usize)>,
    pub quarantined: Vec<Quarantined>,
}

impl Plan {
    /// For each reading, the messages repeating it later in this batch.
    pub fn repeats(&self) -> Vec<Vec<usize>> {
        // Sized by `origin`, which has one entry per reading and stays when the readings are taken.
        let mut out = vec![Vec::new(); self.origin.len()];
        for &(m, r) in &self.duplicates {
            out[r].push(m);
        }
        out
    }

    /// Every one of `messages` is accounted for exactly once: quarantined, or carrying at least
    /// one reading (as its first carrier or as a repeat), never both.
    pub fn accounts_for(&self, messages: usize) -> bool {
        let mut carrying = vec![false; messages];
        for &m in self.origin.iter().chain(self.duplicates.iter().map(|(m, _)| m)) {
            carrying[m] = true;
        }
        let quarantined: std::collections::HashSet<usize> =
            self.quarantined.iter().map(|q| q.index).collect();
        quarantined.len() == self.quarantined.len()
            && (0..messages).all(|m| carrying[m] != quarantined.contains(&m))
    }
}

pub fn plan(messages: &[Inbound<'_>], policy: &IngestPolicy, now_ms: i64) -> Plan {
    let mut plan = Plan {
        readings: Vec::with_capacity(messages.len()),
        origin: Vec::with_capacity(messages.len()),
        ..Plan::default()
    };
    let mut seen: HashMap<MessageId, usize> = HashMap::with_capacity(messages.len());
    for (index, m) in messages.iter().enumerate() {
        if let Some(defect) = m.defect {
            plan.quarantined.push(Quarantined { index, thing: None, problems: vec![defect.clone()] });
            continue;
        }
        match decode(m.body, policy, now_ms) {
            // A v2 pack carries several readings: each is deduplicated on its own identity.
            Ok(readings) => {
                for reading in readings {
                    match seen.get(&reading.id) {
                        Some(&first) => plan.duplicates.push((index, first)),
                        None => {
                            seen.insert(reading.id.clone(), plan.readings.len());
                            plan.readings.push(reading);
                            plan.origin.push(index);
                        }
                    }
                }
            }
            Err(rejection) => plan.quarantined.push(Quarantined {
                index,
                thing: rejection.thing,
                problems: rejection.problems,
            }),
        }
    }
    plan
}
