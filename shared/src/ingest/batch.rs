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
    /// Distinct valid readings, in first-seen order.
    pub readings: Vec<Reading>,
    /// `origin[i]` is the index of the message `readings[i]` was decoded from.
    pub origin: Vec<usize>,
    /// `(message index, reading index)` for messages repeating an earlier one in this batch.
    pub duplicates: Vec<(usize, usize)>,
    pub quarantined: Vec<Quarantined>,
}

impl Plan {
    /// Indices of every message carrying reading `r` (the original and its in-batch repeats).
    pub fn messages_of(&self, r: usize) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.origin[r])
            .chain(self.duplicates.iter().filter(move |(_, d)| *d == r).map(|(m, _)| *m))
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
            Ok(reading) => match seen.get(&reading.id) {
                Some(&first) => plan.duplicates.push((index, first)),
                None => {
                    seen.insert(reading.id.clone(), plan.readings.len());
                    plan.readings.push(reading);
                    plan.origin.push(index);
                }
            },
            Err(rejection) => plan.quarantined.push(Quarantined {
                index,
                thing: rejection.thing,
                problems: rejection.problems,
            }),
        }
    }
    plan
}
