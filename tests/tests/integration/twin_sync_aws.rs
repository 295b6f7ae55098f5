//! twin-sync on the AWS adapter (the Twins table on moto, with its drift index), through its
//! own entry point `handler::handle`: an out-of-order batch with a duplicate ends at the
//! highest version, a drifting twin is found through the index, a delete is mirrored.

use anyhow::{anyhow, ensure, Context, Result};
use fleet_shared::metrics::MetricsOut;
use fleet_shared::model::{ShadowName, ThingName};
use fleet_shared::ports::TwinStore;
use fleet_tests::moto;
use lambda_runtime::{Context as LambdaContext, LambdaEvent};
use serde_json::value::RawValue;
use twin_sync::handler::{handle, Deps, Response};

const OUT_OF_ORDER: &str = include_str!("../../../events/twin-sync/sqs-out-of-order.json");
const NAMED: &str = include_str!("../../../events/twin-sync/documents-named.json");
const DELETE: &str = include_str!("../../../events/twin-sync/delete-classic.json");

fn now() -> i64 {
    1_764_000_400_000
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn shadow_events_through_the_handler_on_dynamodb_converge_and_drift_is_indexed() -> Result<()> {
    let a = moto::fresh_adapters().await?;
    let deps = Deps {
        twins: a.twins.clone(),
        shadows: None::<fleet_shared::ports::NoShadowService>,
        clock: now,
        metrics: MetricsOut::Off,
    };
    let invoke = |event: &str| {
        let payload = RawValue::from_string(event.to_owned()).expect("JSON");
        handle(&deps, LambdaEvent::new(payload, LambdaContext::default()))
    };
    // an out-of-order SQS batch with a duplicate and an unreadable event
    let Response::Sqs(r) = invoke(OUT_OF_ORDER).await? else { return Err(anyhow!("expected SQS")) };
    ensure!(r.batch_item_failures.is_empty(), "failures: {:?}", r.batch_item_failures);
    let thing = ThingName::parse("sensor-001")?;
    let t = a.twins.twin(&thing, &ShadowName::classic()).await?.context("twin missing")?;
    ensure!((t.version, t.drift_since_ms) == (3, None), "classic twin: {t:?}");
    // a drifting named shadow is listed from the drift index
    invoke(NAMED).await?;
    let drifting = a.twins.drifting_since(now(), 10).await?;
    let names: Vec<(&str, &str)> = drifting.iter().map(|t| (t.thing.as_str(), t.shadow.as_str())).collect();
    ensure!(names == [("sensor-002", "config")], "drifting: {names:?}");
    // a delete is mirrored
    invoke(DELETE).await?;
    let t = a.twins.twin(&thing, &ShadowName::classic()).await?.context("twin missing")?;
    ensure!(t.deleted && t.version == 3, "after delete: {t:?}");
    Ok(())
}
