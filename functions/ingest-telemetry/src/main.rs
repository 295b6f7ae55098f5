//! ingest-telemetry: the Lambda entry point. Wiring only: tracing, deps once, run.
#![recursion_limit = "256"]

use ingest_telemetry::handler;
use lambda_runtime::{service_fn, Error};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let deps = handler::Deps::from_env().await?;
    lambda_runtime::run(service_fn(|event| handler::handle(&deps, event))).await
}
