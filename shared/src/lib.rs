//! `fleet-shared`: Fleetline's domain types and rules, the ports they need, the adapters that
//! implement those ports on AWS and on the embedded (SQLite) backend, and what every Lambda
//! function shares.
//!
//! Map of the crate:
//! - [`model`]: plain data: [`model::ThingName`], [`model::Reading`], [`model::Device`].
//! - [`ingest`]: telemetry ingestion (used by ingest-telemetry and operators only): envelope
//!   decode + upcast, reason codes, the event rule, batch planning, archive encoding, the use
//!   case over the ports, its metrics, replay, and (feature `sim`) simulated devices.
//! - [`twin`]: device twins (pure): shadow events, AWS delta semantics, ordering by version,
//!   drift start.
//! - [`certs`]: device certificates (pure): PEM reading, expiry classes and index buckets,
//!   the pre-provisioning hook's decision.
//! - [`commands`]: signed, sequenced, expiring commands to devices: the envelope and its
//!   canonical signing bytes, the cloud's signer, the device-side verifier (anti-replay
//!   window, clock skew), acknowledgements.
//! - [`health`]: presence from lifecycle events, health counters, the SLO catalog, the
//!   ledger, burn rates and the OTA gate's question.
//! - [`ports`]: small traits in domain types, one per capability / IAM grant.
//! - [`adapters`]: one AWS adapter per resource (feature `aws`), all from one `aws_config`
//!   load; the SQLite implementation of the same ports (feature `embedded`), with migrations.
//! - [`lambda`] (feature `lambda`): cold-start wiring, SQS partial-batch responses, `Diagnostic`s.
//! - [`env`]: reading variables once, errors naming the missing one. [`error`]: typed store errors.
//! - [`metrics`]: CloudWatch Embedded Metric Format lines. [`time`]: UTC time through `jiff`.
//! - [`hash`]: FNV-1a for stable shard keys and fingerprints.
//! - [`text`]: device-supplied strings made safe to show (control characters escaped).

pub mod adapters;
pub mod certs;
pub mod commands;
pub mod env;
pub mod error;
pub mod hash;
pub mod health;
pub mod ingest;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod metrics;
pub mod model;
pub mod ota;
pub mod ports;
pub mod text;
pub mod time;
pub mod twin;

pub use env::{BackendKind, ConfigError, Env};
pub use error::{ErrorKind, StoreError};
