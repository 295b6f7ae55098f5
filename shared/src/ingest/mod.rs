//! Telemetry ingestion: envelope decoding and upcasting, validation reasons, batch planning,
//! archive encoding, the event rule (SQS batch or rule payload), the use case that drives the
//! ports, its metrics, and replay. Only ingest-telemetry (and operators) use this module.

pub mod archive;
pub mod archive_query;
pub mod batch;
pub mod envelope;
pub mod event;
pub mod metrics;
pub mod reason;
pub mod replay;
pub mod service;
#[cfg(feature = "sim")]
pub mod sim;
pub mod strict;

pub use archive::{decode_lines, quarantine_object, raw_object, ArchiveObject, QuarantineLine};
pub use archive_query::ArchiveTelemetry;
pub use batch::{plan, Inbound, Plan};
pub use envelope::{decode, IngestPolicy, Rejection};
pub use event::{direct_message, messages_from_event, parse_event, OwnedInbound, Trigger};
pub use reason::{Problem, Reason};
pub use replay::{replay, ReplayPorts, ReplayReport};
pub use service::{ingest_batch, BatchOutcome, FailedMessage, IngestPorts, QuarantinedMessage};
