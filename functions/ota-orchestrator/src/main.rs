//! ota-orchestrator: the Lambda entry point. Wiring only: tracing, the backend chosen once,
//! `Deps` built once per cold start, run.
#![recursion_limit = "256"]

use fleet_shared::lambda::{self, Backend};
use fleet_shared::Env;
use lambda_runtime::{service_fn, Error};
use ota_orchestrator::handler::{self, Deps, FUNCTION};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    // A cold start that cannot become ready is counted (`InitFailed`) before Lambda sees it.
    let failed = |e: lambda::StartupError| lambda::init_failed(FUNCTION, &Env::process(), e);
    match Backend::from_env().await.map_err(failed)? {
        Backend::Aws(aws) => {
            let deps = Deps::on_aws(&aws).map_err(failed)?;
            lambda_runtime::run(service_fn(|event| handler::handle(&deps, event))).await
        }
        #[cfg(feature = "embedded")]
        Backend::Embedded(embedded) => {
            let deps = Deps::on_embedded(&embedded).map_err(failed)?;
            lambda_runtime::run(service_fn(|event| handler::handle(&deps, event))).await
        }
    }
}
