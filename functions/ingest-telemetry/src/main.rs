//! ingest-telemetry: the Lambda entry point. Wiring only: tracing, the backend chosen once,
//! `Deps` built once per cold start, run.
#![recursion_limit = "256"]

use fleet_shared::lambda::{self, Backend};
use ingest_telemetry::handler::{self, Deps};
use lambda_runtime::{service_fn, Error};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    match Backend::from_env().await? {
        Backend::Aws(aws) => {
            let deps = Deps::on_aws(&aws).await?;
            lambda_runtime::run(service_fn(|event| handler::handle(&deps, event))).await
        }
        #[cfg(feature = "embedded")]
        Backend::Embedded(embedded) => {
            let deps = Deps::on_embedded(&embedded)?;
            lambda_runtime::run(service_fn(|event| handler::handle(&deps, event))).await
        }
    }
}
