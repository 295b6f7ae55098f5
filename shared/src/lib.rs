//! `fleet-shared`: Fleetline's domain types and rules, the ports they need, and the
//! adapters that implement those ports on AWS and on the embedded (SQLite) backend.
//!
//! Map of the crate:
//! - [`model`]: plain data: [`model::ThingName`], [`model::Reading`], [`model::Device`].
//! - [`ingest`]: telemetry ingestion: envelope decode + upcast ([`ingest::envelope`]),
//!   the reason-code vocabulary ([`ingest::reason`]), batch planning, archive encoding and
//!   the use case driving the ports ([`ingest::service`]). Pure, except the use case's port calls.
//! - [`ports`]: small traits in domain types, one per capability / IAM grant.
//! - [`adapters`]: `aws` (DynamoDB, Timestream, S3; feature `aws`) and `embedded`
//!   (SQLite; feature `embedded`) implementations of the same ports.
//! - [`config`]: `Config::from_env()`; [`store`]: the backend it selects, built once per cold start.
//! - [`metrics`]: CloudWatch Embedded Metric Format lines. [`time`]: UTC calendar helpers.
//! - [`sim`]: simulated devices (deterministic telemetry for benches, load tests and demos).

pub mod adapters;
pub mod config;
pub mod error;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod ports;
pub mod sim;
pub mod store;
pub mod time;

pub use config::{Backend, Config, ConfigError};
pub use error::{ErrorKind, StoreError};
pub use store::Store;
