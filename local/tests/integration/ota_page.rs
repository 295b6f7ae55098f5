//! The dashboard's OTA pages and `/api/campaigns` over a real SQLite store: campaigns written
//! through [`CampaignStore`], the local stack's router served on loopback, plain HTTP GETs.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use fleet_shared::adapters::embedded::SqliteStore;
use fleet_shared::ota::campaign::{Campaign, CampaignSpec, State};
use fleet_shared::ports::CampaignStore;
use fleet_shared::time;
use serde_json::Value;

use crate::support::{dashboard, get};

/// Rotations `rot-0` .. `rot-2` stored a second apart, the newest halted, and the dashboard on
/// their store (kept while the directory lives).
async fn three_rotations_served() -> Result<(tempfile::TempDir, SocketAddr)> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join("fleet.sqlite"))?;
    let (n, now) = (3, time::now_ms());
    for i in 0..n {
        let spec = CampaignSpec::rotation(&format!("rot-{i}"), "sensor", "1.4.2");
        let mut c = Campaign::rotation(spec, now - (n - i) as i64 * 1_000)?;
        if i + 1 == n {
            c.state = State::Halted { reason: "stage 1: 4 of 4 failed".into() };
        }
        store.put_campaign(&c).await?;
    }
    Ok((dir, dashboard(&store).await?))
}

#[tokio::test]
async fn the_ota_pages_list_the_campaigns_running_ones_first_and_show_one_with_why_it_ended() -> Result<()> {
    // GIVEN three stored rotations, the newest halted, and the dashboard on their store
    let (_dir, addr) = three_rotations_served().await?;
    // WHEN /ota is read
    let (status, html) = get(addr, "/ota").await?;
    // THEN all three are listed, those not ended first, newest first, each linking to its page
    assert_eq!(status, 200, "{html}");
    let at = |id: &str| html.find(&format!(r#"href="/ota/{id}""#)).with_context(|| format!("{id}: {html}"));
    assert!(at("rot-1")? < at("rot-0")? && at("rot-0")? < at("rot-2")?, "{html}");
    assert!(
        html.contains(r#"id="campaigns-total">3<"#) && html.contains(r#"id="campaigns-failed">1<"#),
        "{html}"
    );
    // AND the halted one's page says why, and an unknown id is a 404 page
    let (status, one) = get(addr, "/ota/rot-2").await?;
    assert_eq!(status, 200, "{one}");
    assert!(
        one.contains(r#"id="campaign-state">halted<"#) && one.contains("stage 1: 4 of 4 failed"),
        "{one}"
    );
    let (status, none) = get(addr, "/ota/no-such").await?;
    assert_eq!(status, 404, "{none}");
    // AND the fleet page links to them
    let (_, fleet) = get(addr, "/").await?;
    assert!(fleet.contains(r#"href="/ota""#), "{fleet}");
    Ok(())
}

#[tokio::test]
async fn api_campaigns_pages_through_every_campaign_by_id() -> Result<()> {
    // GIVEN three stored rotations, served
    let (_dir, addr) = three_rotations_served().await?;
    // WHEN they are read two at a time
    let (status, body) = get(addr, "/api/campaigns?limit=2").await?;
    assert_eq!(status, 200, "{body}");
    let first: Value = serde_json::from_str(&body)?;
    let next = first["next"].as_str().context("a next page")?;
    let (_, body) = get(addr, &format!("/api/campaigns?limit=2&cursor={next}")).await?;
    let second: Value = serde_json::from_str(&body)?;
    // THEN the pages hold them all once, by id, the last one saying it is the last
    let ids: Vec<&str> = [&first, &second]
        .iter()
        .flat_map(|p| p["items"].as_array().into_iter().flatten())
        .filter_map(|c| c["spec"]["id"].as_str())
        .collect();
    assert_eq!(ids, ["rot-0", "rot-1", "rot-2"]);
    assert!(second.get("next").is_none(), "{second}");
    // AND an empty page is refused
    let (status, _) = get(addr, "/api/campaigns?limit=0").await?;
    assert_eq!(status, 400);
    Ok(())
}
