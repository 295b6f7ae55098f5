//! Telemetry ingestion: envelope decoding and upcasting, validation reasons, batch planning,
//! archive encoding, and the use case that drives the ports.

pub mod archive;
pub mod batch;
pub mod envelope;
pub mod reason;
pub mod replay;
pub mod samples;
pub mod service;

pub use archive::{decode_lines, quarantine_object, raw_object, ArchiveObject, QuarantineLine};
pub use batch::{plan, Inbound, Plan};
pub use envelope::{decode, IngestPolicy, Rejection};
pub use reason::{Problem, Reason};
pub use replay::{replay, ReplayReport};
pub use samples::{direct_message, messages_from_event, OwnedInbound};
pub use service::{ingest_batch, BatchOutcome, FailedMessage, IngestPorts, QuarantinedMessage};
