//! The deployed start-up path: `Backend::from_env()` + `Deps::on_aws()` with the SDK's own
//! `AWS_ENDPOINT_URL` pointing at moto, as a Lambda starts with the template's variables, then
//! one event through `handler::handle`. Endpoint discovery must stay off when an endpoint
//! override is set, or Timestream would be sent to AWS's own host. One test in its own binary:
//! it sets process environment variables.

use anyhow::{bail, ensure, Result};
use fleet_shared::lambda::Backend;
use fleet_tests::{archive_objects, moto};
use ingest_telemetry::handler::{handle, Deps, Response};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::value::RawValue;

const VALID_V1: &str = include_str!("../../events/ingest-telemetry/sqs-valid-v1.json");

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn a_cold_start_from_the_environment_sends_every_client_to_the_endpoint_override() -> Result<()> {
    // GIVEN moto resources and the environment a Lambda gets from the template and the SDK
    let r = moto::fresh_resources().await?;
    let mut vars = vec![
        ("AWS_ENDPOINT_URL", moto::endpoint()?),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("FLEET_BACKEND", "aws".into()),
    ];
    vars.extend(r.vars());
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    // WHEN the deps are built as main.rs builds them, and a batch goes through the handler
    let Backend::Aws(aws) = Backend::from_env().await? else {
        bail!("FLEET_BACKEND=aws built another backend")
    };
    let deps = Deps::on_aws(&aws).await?;
    let event = LambdaEvent::new(RawValue::from_string(VALID_V1.to_owned())?, Context::default());
    let Response::Sqs(response) = handle(&deps, event).await? else { bail!("not an SQS response") };
    // THEN DynamoDB, Timestream and S3 all answered from moto
    ensure!(response.batch_item_failures.is_empty(), "retried: {:?}", response.batch_item_failures);
    ensure!(archive_objects(&deps.archive, "raw/").await?.len() == 1, "raw archive object missing");
    Ok(())
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn a_function_that_misses_one_of_its_variables_fails_start_up_naming_it() -> Result<()> {
    let env = fleet_shared::Env::from_pairs(&[("FLEET_BACKEND", "aws"), ("FLEET_DEVICES_TABLE", "d")]);
    let Backend::Aws(aws) = Backend::connect(env).await? else { bail!("not aws") };
    let err = Deps::on_aws(&aws).await.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(err.contains("FLEET_ARCHIVE_BUCKET") || err.contains("FLEET_TELEMETRY_DB"), "{err}");
    Ok(())
}
