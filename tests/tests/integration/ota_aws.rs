//! The ota-orchestrator function on the AWS adapters (the Campaigns, Devices and Health tables
//! on DynamoDB, IoT Jobs through the control plane, all on moto), built as its `main.rs`
//! builds it (`Deps::on_aws`, from the template's variables): the schedule starts a campaign's
//! first stage as an IoT job on the devices' thing ARNs; a manifest signed by a key the
//! deployment does not trust pauses the campaign and sends nothing.

use anyhow::{ensure, Context, Result};
use base64::Engine as _;
use fleet_shared::lambda::AwsBackend;
use fleet_shared::metrics::MetricsOut;
use fleet_shared::model::{DeviceRegistration, ExecutionStatus, JobId, ThingName};
use fleet_shared::ota::campaign::{Campaign, CampaignSpec};
use fleet_shared::ota::manifest::{ManifestSigner, UnsignedManifest};
use fleet_shared::ports::{CampaignStore, DeviceAdmin, JobsControl};
use fleet_shared::{time, Env};
use fleet_tests::moto;
use lambda_runtime::{Context as LambdaContext, LambdaEvent};
use ota_orchestrator::handler::{handle, Deps};
use serde_json::value::RawValue;

const SCHEDULED: &str = include_str!("../../../events/ota-orchestrator/scheduled.json");

fn signer(seed: u8) -> ManifestSigner {
    ManifestSigner::from_bytes("fw2026", &[seed; 32]).expect("key")
}

/// Campaign `id` (sensor 1.4.2 -> 1.5.0, stages 10 %, 100 %), manifests signed by `seed`.
fn campaign(id: &str, seed: u8) -> Result<Campaign> {
    let sign = |fw: &str| {
        let url = format!("https://fw.example.com/{fw}.bin");
        signer(seed).sign(UnsignedManifest::for_image(fw, "sensor", url, fw.as_bytes()))
    };
    let mut spec = CampaignSpec::new(id, "sensor", "1.4.2", "1.5.0");
    spec.stages = vec![10, 100];
    spec.preconditions.min_battery_pct = None;
    spec.preconditions.seen_within_minutes = None;
    Ok(Campaign::new(spec, sign("1.5.0")?, sign("1.4.2")?, time::now_ms())?)
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn the_schedule_sends_a_trusted_campaigns_first_stage_to_thing_arns_and_pauses_an_untrusted_one(
) -> Result<()> {
    // GIVEN 30 sensors on 1.4.2 in the Devices table, and the function's variables as the
    // template sets them (trusting key 7)
    let r = moto::fresh_resources().await?;
    let run = moto::unique("ota");
    let public = base64::engine::general_purpose::STANDARD.encode(signer(7).verifying_key().as_bytes());
    let mut vars = r.vars();
    vars.push(("FLEET_FIRMWARE_KEYS", format!("fw2026={public}")));
    let env = Env::from_fn(move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()));
    let mut deps = Deps::on_aws(&AwsBackend { sdk: moto::sdk_config().await?, env }).context("on_aws")?;
    deps.metrics = MetricsOut::Off;
    let things: Vec<ThingName> =
        (0..30).map(|i| ThingName::parse(&format!("{run}-{i:02}"))).collect::<Result<_, _>>()?;
    let registration = DeviceRegistration {
        class: "sensor".into(),
        region: "eu-west".into(),
        fw: "1.4.2".into(),
        registered_at_ms: 0,
    };
    let devices: Vec<_> = things.iter().map(|t| (t.clone(), registration.clone())).collect();
    deps.fleet.register(&devices).await?;
    // AND two campaigns: one signed with the trusted key, one with another key
    let (good, rogue) = (format!("{run}-good"), format!("{run}-rogue"));
    deps.campaigns.put_campaign(&campaign(&good, 7)?).await?;
    deps.campaigns.put_campaign(&campaign(&rogue, 9)?).await?;

    // WHEN the schedule invokes the function
    let event = LambdaEvent::new(RawValue::from_string(SCHEDULED.to_owned())?, LambdaContext::default());
    let answer = handle(&deps, event).await?;

    // THEN the trusted campaign's stage 1 is an IoT job on 3 of the 30 sensors, queued
    let ticked = |id: &str| answer.ticked.iter().find(|t| t.campaign == id).cloned();
    let t = ticked(&good).context("the good campaign was ticked")?;
    ensure!(t.state == "stage" && !t.paused, "{t:?}");
    let job = JobId::parse(&format!("{good}-s1"))?;
    let executions = deps.jobs.job_executions(&job).await?;
    ensure!(executions.len() == 3, "{executions:?}");
    ensure!(
        executions.iter().all(|(t, s)| things.contains(t) && *s == ExecutionStatus::Queued),
        "{executions:?}"
    );
    let stored = deps.campaigns.campaign(&good).await?.context("stored")?;
    ensure!((stored.population, stored.targeted, stored.version) == (30, 3, 2), "{stored:?}");
    // AND the untrusted one is paused with the reason, and has no job
    let t = ticked(&rogue).context("the rogue campaign was ticked")?;
    ensure!(t.paused && t.summary.contains("bad_signature"), "{t:?}");
    ensure!(deps.jobs.job_progress(&JobId::parse(&format!("{rogue}-s1"))?).await?.is_none());
    Ok(())
}
