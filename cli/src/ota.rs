//! `fleetctl ota` campaigns: create one from two signed manifests, list and show them, tick
//! them (what the orchestrator's schedule does), and the operator's pause, resume, abort and
//! roll back. The campaign engine is `fleet_shared::ota::engine`; this only parses and prints.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use fleet_shared::health::slo::Catalog;
use fleet_shared::ota::campaign::{Campaign, CampaignSpec, Change, Preconditions, State};
use fleet_shared::ota::engine::{count_finished, Engine, RotationReads};
use fleet_shared::ota::manifest::{FirmwareManifest, ManifestVerifier};
use fleet_shared::ports::{CampaignStore, DeviceAdmin, HealthCounters, JobsControl, SloReader};
use fleet_shared::time;

use crate::output;
use crate::{CampaignCommand, RolloutArgs};

/// The firmware keys campaigns trust: `kid=public key` pairs (hex or base64), comma-separated,
/// as `FLEET_FIRMWARE_KEYS` holds them.
pub fn trusted_keys(text: &str) -> Result<ManifestVerifier> {
    ManifestVerifier::from_keys_text(text)
        .map_err(|e| anyhow!("{e}: set FLEET_FIRMWARE_KEYS to kid=public-key[,kid=public-key]"))
}

fn read_manifest(path: &Path) -> Result<FirmwareManifest> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    FirmwareManifest::parse(&raw).map_err(|e| anyhow!("{}: {} ({e})", path.display(), e.code()))
}

/// `spec` with the stages, timing, limits and preconditions an operator asked for.
fn rolled_out(r: &RolloutArgs, spec: CampaignSpec) -> CampaignSpec {
    let minutes = |d: std::time::Duration| i64::try_from(d.as_secs() / 60).unwrap_or(i64::MAX);
    CampaignSpec {
        stages: r.stages.clone(),
        soak_minutes: minutes(r.soak),
        stage_timeout_minutes: minutes(r.stage_timeout),
        max_failure_pct: r.max_failure_pct,
        max_per_minute: r.rate,
        install_timeout_minutes: u32::try_from(minutes(r.install_timeout)).unwrap_or(u32::MAX),
        preconditions: Preconditions {
            min_battery_pct: (r.min_battery > 0.0).then_some(r.min_battery),
            seen_within_minutes: (!r.seen_within.is_zero()).then(|| minutes(r.seen_within)),
        },
        ..spec
    }
}

/// Store a new campaign the engine checked; print it as stored.
async fn store_new<S: CampaignStore>(store: &S, campaign: &Campaign, json: bool) -> Result<()> {
    store.put_campaign(campaign).await.map_err(|e| anyhow!("{e}"))?;
    output::campaign(&load(store, &campaign.spec.id).await?, json)
}

async fn load<S: CampaignStore>(store: &S, id: &str) -> Result<Campaign> {
    store.campaign(id).await?.ok_or_else(|| anyhow!("no campaign {id:?}"))
}

/// Run one campaign command; `verifier` is needed by those that tick or create.
pub async fn run<S, F, J, H, R>(
    store: &S,
    engine: &Engine<'_, F, J, H, R>,
    command: CampaignCommand,
    json: bool,
) -> Result<()>
where
    S: CampaignStore,
    F: DeviceAdmin,
    J: JobsControl,
    H: SloReader + HealthCounters,
    R: RotationReads,
{
    let now = time::now_ms();
    match command {
        CampaignCommand::Create { id, manifest, rollback_manifest, rollout, gate } => {
            let firmware = read_manifest(&manifest)?;
            let rollback = read_manifest(&rollback_manifest)?;
            let spec = CampaignSpec {
                gate: gate.policy()?,
                ..rolled_out(&rollout, CampaignSpec::new(&id, firmware.class(), rollback.fw(), firmware.fw()))
            };
            let campaign = Campaign::new(spec, firmware, rollback, now)?;
            engine.check_new(&campaign).await?;
            store_new(store, &campaign, json).await
        }
        CampaignCommand::RotateCerts { id, class, fw, rollout } => {
            let spec = rolled_out(&rollout, CampaignSpec::rotation(&id, &class, &fw));
            let campaign = Campaign::rotation(spec, now)?;
            engine.check_new(&campaign).await?;
            store_new(store, &campaign, json).await
        }
        CampaignCommand::List => output::campaigns(&store.campaigns().await?, json),
        CampaignCommand::Show { id } => output::campaign(&load(store, &id).await?, json),
        CampaignCommand::Tick { id } => {
            let one = id.is_some();
            let campaigns = match id {
                Some(id) => vec![load(store, &id).await?],
                None => store.campaigns().await?,
            };
            let mut lines = Vec::new();
            for mut c in campaigns.into_iter().filter(|c| !c.state.is_final() && c.paused.is_none()) {
                if let Err(why) = keys_for(&c, engine.verifier) {
                    // Asked for by id, it is an error; among all, the others still tick.
                    if one {
                        return Err(why);
                    }
                    lines.push((c.spec.id.clone(), c.state.name(), format!("skipped: {why}")));
                    continue;
                }
                let tick =
                    engine.tick(&mut c, now).await.with_context(|| format!("campaign {}", c.spec.id))?;
                // As the orchestrator does: finished installs feed the ota SLO before the store.
                count_finished(engine.health, &tick.finished, now).await?;
                if tick.changed {
                    store.put_campaign(&c).await?;
                }
                lines.push((c.spec.id.clone(), c.state.name(), tick.summary));
            }
            output::campaign_ticks(&lines, json)
        }
        CampaignCommand::Pause { id, reason } => {
            let mut c = load(store, &id).await?;
            if c.state.is_final() {
                bail!("campaign {id} has ended ({})", c.state.name());
            }
            c.note(now, format!("paused by an operator: {reason}"));
            c.paused = Some(reason);
            store.put_campaign(&c).await?;
            output::campaign(&load(store, &id).await?, json)
        }
        CampaignCommand::Resume { id } => {
            let mut c = load(store, &id).await?;
            let Some(why) = c.paused.take() else { bail!("campaign {id} is not paused") };
            c.note(now, format!("resumed by an operator (was paused: {why})"));
            // A stage whose gate waited too long starts its wait again.
            if let State::Stage(s) = &mut c.state {
                if s.settled_ms.is_some() {
                    s.settled_ms = Some(now - c.spec.soak_minutes * 60_000);
                } else {
                    s.started_ms = now;
                }
            }
            store.put_campaign(&c).await?;
            output::campaign(&load(store, &id).await?, json)
        }
        CampaignCommand::Abort { id, reason } => {
            let mut c = load(store, &id).await?;
            if c.state.is_final() {
                bail!("campaign {id} has ended ({})", c.state.name());
            }
            engine.abort(&mut c, reason, now).await?;
            store.put_campaign(&c).await?;
            output::campaign(&load(store, &id).await?, json)
        }
        CampaignCommand::Rollback { id, reason } => {
            let mut c = load(store, &id).await?;
            if !matches!(c.state, State::Stage(_)) {
                bail!("campaign {id} is {}: only a campaign in a stage can be rolled back", c.state.name());
            }
            keys_for(&c, engine.verifier)?;
            c.paused = None;
            engine.roll_back(&mut c, format!("by an operator: {reason}"), now).await?;
            store.put_campaign(&c).await?;
            output::campaign(&load(store, &id).await?, json)
        }
    }
}

/// A firmware campaign's manifests are checked on every tick and rollback, so without a
/// trusted key (`FLEET_FIRMWARE_KEYS` unset) it is not touched; a rotation carries none.
fn keys_for(c: &Campaign, verifier: &ManifestVerifier) -> Result<()> {
    if c.spec.change == Change::Firmware && verifier.is_empty() {
        bail!(
            "campaign {} is a firmware campaign: set FLEET_FIRMWARE_KEYS to kid=public-key[,kid=public-key] to move it",
            c.spec.id
        );
    }
    Ok(())
}

/// The built-in SLO catalog the gate reads (as `fleetctl ota gate` does).
pub fn catalog() -> Catalog {
    Catalog::builtin()
}
